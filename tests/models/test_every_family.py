"""The per-family contract, run for every family in ``EVERY_FAMILY``: the zeroing oracles of head and neuron pruning,
layer dropping (with KV-cache generation for decoders), make_student, save -> reload with identical logits (plain
``from_pretrained`` wherever the config can express the shapes) and a short distillation run with pruning."""

import copy
import json

import pytest
import torch
import transformers
from transformers import Trainer

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.student import make_student
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.loading import from_pretrained, save_pretrained
from hf_compress.models.families import FAMILIES, block_module, ffn_size, get_family, get_layers, head_counts, head_dim
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.surgery import drop_layers, prune_ffn_neurons, prune_heads, skip_layers
from tests.conftest import TokenDataset, zero_slices
from tests.tiny_models import ENCODER_DECODERS, EVERY_DECODER, HEADS, family_inputs, lm_head, tiny_inputs, tiny_model

# Layer 1 loses query heads 0 and 1 (a whole KV group under GQA 4/2), layer 3 loses heads 1 and 3 (one query head
# from within each group). Encoder-decoders have 2 + 2 blocks: these are encoder block 1 and decoder block 1.
HEADS_PLAN = {1: [0, 1], 3: [1, 3]}
NEURONS_PLAN = {0: [1, 2, 3], 2: list(range(0, 32, 3))}


def _logits(model):
    with torch.no_grad():
        return model(**family_inputs(model.config.model_type)).logits  # family names are model types


def _params(model):
    return sum(p.numel() for p in model.parameters())


def _columns(model, layer, role, index):
    """The input columns ``index`` of projection ``role`` of block ``layer`` (rows of a Conv1D weight)."""
    return [(block_module(model, layer, role), "weight", 0 if get_family(model).conv1d else 1, index)]


def _head_columns(model, layer, heads):
    dim = head_dim(model, layer)
    return _columns(model, layer, "o", torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in heads]))


def _heads_refused(family):
    return FAMILIES[tiny_model(family).config.model_type].heads_refused is not None


def test_prune_heads_equals_zeroed_output_projection_columns(every_family):
    model, reference = tiny_model(every_family, lm_head(every_family)), tiny_model(every_family, lm_head(every_family))
    if _heads_refused(every_family):
        with pytest.raises(ValueError, match="`heads` cannot be removed from a .* model: its"):
            prune_heads(model, HEADS_PLAN)
        return
    for layer, heads in HEADS_PLAN.items():
        zero_slices(_head_columns(reference, layer, heads))
    before = _params(model)
    prune_heads(model, HEADS_PLAN)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    assert _params(model) < before
    _, kv = head_counts(tiny_model(every_family), 0)
    assert head_counts(model, 1) == (2, kv // 2 if kv == 2 else 2)  # a whole group (and its KV head) went
    assert head_counts(model, 3) == (2, kv if kv == 2 else 2)  # one query head per group: the KV heads stay


def test_prune_ffn_neurons_equals_zeroed_down_columns(every_family):
    model, reference = tiny_model(every_family, lm_head(every_family)), tiny_model(every_family, lm_head(every_family))
    for layer, neurons in NEURONS_PLAN.items():
        zero_slices(_columns(reference, layer, "down", torch.tensor(neurons)))
    before = _params(model)
    prune_ffn_neurons(model, NEURONS_PLAN)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    assert _params(model) < before
    assert [ffn_size(model, layer) for layer in range(4)] == [29, 32, 21, 32]


def test_drop_layers_equals_skipping_them_and_generates_with_a_cache(every_family):
    model = tiny_model(every_family, lm_head(every_family))
    reference = copy.deepcopy(model)
    handles = skip_layers(reference, torch.tensor([True, False, True, False]))
    expected = _logits(reference)
    for handle in handles:
        handle.remove()
    drop_layers(model, [1, 3])
    assert len(get_layers(model)) == 2
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)
    if every_family in EVERY_DECODER:
        ids = tiny_inputs(batch=1)["input_ids"]
        kwargs = dict(max_new_tokens=4, do_sample=False, pad_token_id=0)
        with torch.no_grad():
            cached = model.generate(ids, use_cache=True, **kwargs)
            uncached = model.generate(ids, use_cache=False, **kwargs)
        assert torch.equal(cached, uncached) and cached.shape[1] == ids.shape[1] + 4


def test_make_student_round_trips_through_plain_from_pretrained(every_family, tmp_path):
    teacher = tiny_model(every_family, lm_head(every_family))
    student = make_student(teacher, layers=[0, 3])
    assert student.config.hf_compress["teacher_layers"] == [0, 3] and len(get_layers(teacher)) == 4
    student.save_pretrained(tmp_path)
    reloaded = HEADS[lm_head(every_family)].from_pretrained(tmp_path)
    assert len(get_layers(reloaded)) == 2
    torch.testing.assert_close(_logits(reloaded), _logits(student), atol=0, rtol=0)


@pytest.mark.parametrize("uniform", [True, False])
def test_save_and_reload_give_identical_logits(every_family, uniform, tmp_path):
    model = tiny_model(every_family, lm_head(every_family))
    refused = _heads_refused(every_family)
    if not refused:
        prune_heads(model, {layer: [1, 3] for layer in range(4)} if uniform else HEADS_PLAN)
    prune_ffn_neurons(model, {layer: list(range(8)) for layer in range(4)} if uniform else NEURONS_PLAN)
    save_pretrained(model, tmp_path)
    torch.testing.assert_close(_logits(from_pretrained(tmp_path)), _logits(model), atol=0, rtol=0)
    recorded = json.loads((tmp_path / "config.json").read_text()).get("hf_compress", {})
    plain = uniform and (refused or get_family(model).config_head_dim is not None)
    assert ("layers" not in recorded) == plain  # expressible shapes are written to the config fields instead
    if plain:
        reloaded = HEADS[lm_head(every_family)].from_pretrained(tmp_path)
        torch.testing.assert_close(_logits(reloaded), _logits(model), atol=0, rtol=0)


def test_distillation_with_pruning_callback_ends_smaller(every_family, tmp_path):
    head = lm_head(every_family)
    teacher, student = tiny_model(every_family, head, seed=1), tiny_model(every_family, head, seed=2).train()
    targets = {"ffn_neurons": 0.5} if _heads_refused(every_family) else {"heads": 0.5, "ffn_neurons": 0.5}
    config = PruningConfig(targets=targets, schedule="linear", start_step=1, end_step=2, importance="taylor")
    args = DistillationConfig(
        str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=1e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        alpha=0.5,
        temperature=2.0,
    )
    before = _params(student)
    kwargs = dict(model=student, args=args, train_dataset=TokenDataset(family=every_family))
    if every_family == "whisper":  # DistillationTrainer has no speech-to-text head yet: the callback runs in a Trainer
        trainer = Trainer(**kwargs, callbacks=[PruningCallback(config)])
    else:
        trainer = DistillationTrainer(**kwargs, teacher_model=teacher, callbacks=[PruningCallback(config)])
    trainer.train()
    assert sum(ffn_size(student, layer) for layer in range(4)) == 64
    if "heads" in targets:
        assert sum(head_counts(student, layer)[0] for layer in range(4)) == 8
    assert _params(student) < before
    trainer.save_model(str(tmp_path / "final"))
    torch.testing.assert_close(_logits(from_pretrained(tmp_path / "final")), _logits(student.eval()), atol=0, rtol=0)


def test_single_kv_head_prunes_query_heads_within_its_group(tmp_path):
    """Gemma 3 270M has 4 query heads over 1 KV head: heads can only go from within that group."""
    model, reference = (tiny_model("gemma3_text", "causal_lm", num_key_value_heads=1) for _ in range(2))
    plan = {0: [1, 2], 2: [0]}
    for layer, heads in plan.items():
        zero_slices(_head_columns(reference, layer, heads))
    prune_heads(model, plan)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    assert [head_counts(model, layer) for layer in range(4)] == [(2, 1), (4, 1), (3, 1), (4, 1)]
    save_pretrained(model, tmp_path)
    torch.testing.assert_close(_logits(from_pretrained(tmp_path)), _logits(model), atol=0, rtol=0)


def test_single_kv_head_model_is_head_pruned_by_the_callback(tmp_path):
    student = tiny_model("gemma3_text", "causal_lm", num_key_value_heads=1).train()
    config = PruningConfig(targets={"heads": 0.5}, schedule="one_shot", scope="local")
    args = DistillationConfig(
        str(tmp_path), max_steps=2, per_device_train_batch_size=4, report_to="none", use_cpu=True, save_strategy="no"
    )
    trainer = DistillationTrainer(
        model=student,
        teacher_model=tiny_model("gemma3_text", "causal_lm", seed=1, num_key_value_heads=1),
        args=args,
        train_dataset=TokenDataset(),
        callbacks=[PruningCallback(config)],
    )
    trainer.train()
    assert [head_counts(student, layer) for layer in range(4)] == [(2, 1)] * 4
    trainer.save_model(str(tmp_path / "final"))
    reloaded = HEADS["causal_lm"].from_pretrained(tmp_path / "final")  # uniform: plain transformers loads it
    torch.testing.assert_close(_logits(reloaded), _logits(student.eval()), atol=0, rtol=0)


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_encoder_decoder_student_keeps_the_encoder_and_chosen_decoder_blocks(family, tmp_path):
    """The distil-whisper recipe: the whole encoder, some decoder blocks (flat numbering: decoder block j is 2 + j)."""
    teacher = tiny_model(family, lm_head(family))
    student = make_student(teacher, num_layers=1)
    assert student.config.hf_compress["teacher_layers"] == [0, 1, 2]
    assert (student.config.encoder_layers, student.config.decoder_layers) == (2, 1)
    assert len(get_layers(make_student(teacher, layers=[0, 1, 3]))) == 3
    with pytest.raises(ValueError, match="every block of the encoder"):
        make_student(teacher, layers=[2, 3])


@pytest.mark.parametrize("family", ENCODER_DECODERS)
def test_cross_attention_heads_have_their_own_option(family, tmp_path):
    model, reference = tiny_model(family, lm_head(family)), tiny_model(family, lm_head(family))
    dim = head_dim(model, 2, cross=True)
    zero_slices([(block_module(reference, 2, "cross_o"), "weight", 1, torch.arange(dim, 3 * dim))])  # heads 1, 2
    prune_heads(model, {}, cross_heads={2: [1, 2]})
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    assert head_counts(model, 2, cross=True) == (2, 2) and head_counts(model, 2) == (4, 4)
    with pytest.raises(ValueError, match="has no cross-attention"):
        prune_heads(model, {}, cross_heads={0: [0]})
    save_pretrained(model, tmp_path)
    torch.testing.assert_close(_logits(from_pretrained(tmp_path)), _logits(model), atol=0, rtol=0)


@pytest.mark.parametrize("family", ["gemma2", "gemma3_text", "smollm3", "modernbert"])
def test_dropping_the_first_block_keeps_each_kept_blocks_attention_kind(family):
    """Sliding / full (and SmolLM3's NoPE) layers are per block: the kept blocks keep theirs after renumbering."""
    model = tiny_model(family, lm_head(family))
    before = {name: list(getattr(model.config, name, None) or []) for name in ("layer_types", "no_rope_layers")}
    reference = copy.deepcopy(model)
    handles = skip_layers(reference, torch.tensor([False, True, True, True]))
    expected = _logits(reference)
    for handle in handles:
        handle.remove()
    drop_layers(model, [0])
    assert model.config.layer_types == before["layer_types"][1:]
    if family == "smollm3":
        assert model.config.no_rope_layers == before["no_rope_layers"][1:]
    torch.testing.assert_close(_logits(model), expected, atol=1e-5, rtol=1e-5)


def test_deberta_relative_position_projections_follow_their_heads():
    """Without `share_att_key`, DeBERTa's pos_key_proj / pos_query_proj carry per-head rows that go with the head."""
    overrides = dict(share_att_key=False)
    model, reference = (tiny_model("deberta-v2", "masked_lm", **overrides) for _ in range(2))
    for layer, heads in HEADS_PLAN.items():
        zero_slices(_head_columns(reference, layer, heads))
    prune_heads(model, HEADS_PLAN)
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    assert block_module(model, 1, "attention").pos_key_proj.out_features == 2 * head_dim(model, 1)


def test_olmo2_head_refusal_names_the_norms():
    with pytest.raises(ValueError, match="`q_norm` / `k_norm` RMSNorm normalise over all heads together"):
        prune_heads(tiny_model("olmo2"), {0: [0, 1]})


def test_albert_is_refused_with_the_reason():
    config = transformers.AlbertConfig(
        vocab_size=64, embedding_size=8, hidden_size=16, num_attention_heads=4, intermediate_size=32
    )
    with pytest.raises(ValueError, match="shares one set of block weights across all its layers"):
        make_student(transformers.AlbertModel(config), num_layers=1)
