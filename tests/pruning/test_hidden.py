import math
import shutil

import pytest
import torch
import transformers
from torch import nn

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.models import families
from hf_compress.pruning import drop_layers, prune_heads, prune_hidden
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.hidden import (
    centre_layer_norms,
    check_zero_channel_oracle,
    first_output,
    hidden_layout,
    zero_hidden_channels,
)
from tests.tiny_models import DECODERS, ENCODERS, tiny_inputs, tiny_model

RMS_FAMILIES = ["llama", "mistral", "qwen2", "qwen3"]
LM_HEAD = {family: "masked_lm" if family in ENCODERS else "causal_lm" for family in ENCODERS + DECODERS}
CHANNELS = [1, 6, 7, 13]


def _logits(model, inputs=None):
    return first_output(model, inputs or tiny_inputs())


@pytest.mark.parametrize("head", ["lm", "seq_cls", "base"])
def test_dead_channels_leave_outputs_unchanged(family, head):
    model = tiny_model(family, LM_HEAD[family] if head == "lm" else head)
    zero_hidden_channels(model, CHANNELS)
    keep = torch.tensor([c for c in range(16) if c not in CHANNELS])
    handles = centre_layer_norms(model, keep)  # no hooks for RMSNorm families: the plain definition holds there
    before = _logits(model)
    for handle in handles:
        handle.remove()
    prune_hidden(model, CHANNELS)
    handles = centre_layer_norms(model)
    after = _logits(model)
    for handle in handles:
        handle.remove()
    if head == "base":
        before = before[..., keep]
    assert model.config.hidden_size == 12
    assert after.shape == before.shape
    tolerance = 1e-3 if family == "qwen3" else 1e-5  # see test_oracle_check_returns_the_difference_for_every_family
    torch.testing.assert_close(after, before, rtol=tolerance, atol=tolerance)
    assert (len(handles) == 0) == (family in RMS_FAMILIES)


def test_rms_norm_gain_and_epsilon_are_rescaled():
    model = tiny_model("llama", "causal_lm")
    norm = model.model.norm
    weight, eps = norm.weight.detach().clone(), norm.variance_epsilon
    prune_hidden(model, CHANNELS)
    keep = [c for c in range(16) if c not in CHANNELS]
    torch.testing.assert_close(model.model.norm.weight.detach(), weight[keep] * math.sqrt(16 / 12))
    assert model.model.norm.variance_epsilon == pytest.approx(eps * 16 / 12)
    assert model.config.rms_norm_eps == pytest.approx(eps * 16 / 12)


def test_layer_norm_rule_is_exact_for_centred_inputs_only():
    torch.manual_seed(0)
    norm = nn.LayerNorm(16)
    nn.init.normal_(norm.weight)
    nn.init.normal_(norm.bias)
    dead = torch.tensor(CHANNELS)
    keep = torch.tensor([c for c in range(16) if c not in CHANNELS])
    pruned = nn.LayerNorm(12, eps=norm.eps * 16 / 12)
    with torch.no_grad():
        pruned.weight.copy_(norm.weight[keep] * math.sqrt(16 / 12))
        pruned.bias.copy_(norm.bias[keep])
    x = torch.randn(5, 16).index_fill(1, dead, 0.0)
    centred = (x - x[:, keep].mean(-1, keepdim=True)).index_fill(1, dead, 0.0)
    torch.testing.assert_close(pruned(centred[:, keep]), norm(centred)[:, keep])
    shifted = x + 3.0 * torch.ones(16).index_fill(0, dead, 0.0)  # mean over the kept channels far from zero
    assert (pruned(shifted[:, keep]) - norm(shifted)[:, keep]).abs().max() > 1e-2


def test_oracle_check_returns_the_difference_for_every_family(family):
    # Qwen3's per-head q / k norms share `rms_norm_eps`, scaled with the hidden norms: eps-level slack there
    bound = 1e-4 if family == "qwen3" else 1e-6
    assert check_zero_channel_oracle(tiny_model(family, LM_HEAD[family]), CHANNELS) < bound


def test_live_layer_norm_models_stay_close_without_centring():
    model = tiny_model("bert", "masked_lm")
    zero_hidden_channels(model, CHANNELS)
    before = _logits(model)
    prune_hidden(model, CHANNELS)
    assert (before - _logits(model)).abs().max() < 0.5 * before.abs().max()


@pytest.mark.parametrize("family", RMS_FAMILIES)
def test_uniform_width_reloads_with_plain_from_pretrained(family, tmp_path):
    model = tiny_model(family, "causal_lm")
    prune_hidden(model, CHANNELS)
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_size == 12
    assert "layers" not in (getattr(reloaded.config, "hf_compress", None) or {})
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", ["bert", "roberta", "distilbert", "gpt2"])
def test_head_width_families_reload_plainly_when_heads_follow_hidden(family, tmp_path):
    head = LM_HEAD[family]
    model = tiny_model(family, head)
    prune_heads(model, {layer: [2] for layer in range(4)})  # 4 heads of width 4 -> 3 heads
    prune_hidden(model, [0, 5, 10, 15])  # 16 -> 12 = 3 heads x 4
    expected = _logits(model)
    model.save_pretrained(tmp_path)
    cls = transformers.AutoModelForMaskedLM if head == "masked_lm" else transformers.AutoModelForCausalLM
    reloaded = cls.from_pretrained(tmp_path).eval()
    assert reloaded.config.num_attention_heads == 3
    torch.testing.assert_close(_logits(reloaded), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("family", DECODERS)
def test_generate_with_cache_matches_without_after_width_and_depth(family):
    model = tiny_model(family, "causal_lm")
    prune_hidden(model, CHANNELS)
    drop_layers(model, [1])
    prompt = tiny_inputs(batch=1, seq=5)
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    with_cache = model.generate(**prompt, use_cache=True, **kwargs)
    without = model.generate(**prompt, use_cache=False, **kwargs)
    assert with_cache.shape[1] == 11
    assert torch.equal(with_cache, without)


def test_gemma_embedding_scale_and_tied_head_keep_the_function(monkeypatch, tmp_path):
    monkeypatch.setitem(families.FAMILIES, "gemma", families.FAMILIES["llama"])
    config = transformers.GemmaConfig(
        vocab_size=64,
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        pad_token_id=0,
        tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    model = transformers.GemmaForCausalLM(config).eval()
    layout = hidden_layout(model)
    assert {norm.offset for norm in layout.norms} == {1.0}  # Gemma's (1 + weight) gains are detected
    zero_hidden_channels(model, CHANNELS)
    before = _logits(model)
    prune_hidden(model, CHANNELS)
    assert float(model.model.embed_tokens.embed_scale) == pytest.approx(math.sqrt(12))
    torch.testing.assert_close(_logits(model), before, rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)
    reloaded = transformers.GemmaForCausalLM.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(_logits(reloaded), before, rtol=1e-5, atol=1e-5)


def test_wrong_channels_are_one_sentence_errors():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match=r"`channels` must be hidden-channel indices in \[0, 16\)"):
        prune_hidden(model, [16])
    with pytest.raises(ValueError, match="removes all 16 hidden channels"):
        prune_hidden(model, list(range(16)))
    assert model.config.hidden_size == 16


def test_unknown_hidden_size_parameter_is_refused():
    model = tiny_model("llama")
    model.extra = nn.Module()
    model.extra.scale = nn.Parameter(torch.ones(3, 16))
    with pytest.raises(ValueError, match="'extra.scale' of shape \\(3, 16\\)"):
        prune_hidden(model, CHANNELS)


# ---- inside training: PruningCallback with the "hidden" target -----------------------------------------------------


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n: int = 16, seq: int = 8):
        self.ids = torch.randint(3, 64, (n, seq), generator=torch.Generator().manual_seed(0))

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "attention_mask": torch.ones_like(self.ids[i]), "labels": self.ids[i]}


class _KeptSizes(transformers.TrainerCallback):
    """Hidden channels the pruning callback keeps after every step (it runs after the pruning callback)."""

    def __init__(self, pruning: PruningCallback):
        self.pruning, self.sizes = pruning, []

    def on_step_end(self, args, state, control, **kwargs):
        self.sizes.append(int(self.pruning.masks.hidden.sum()))


def _run(model, folder, config, resume=None, max_steps=8, save_steps=None, record=False):
    saving = dict(save_strategy="steps", save_steps=save_steps) if save_steps else dict(save_strategy="no")
    args = DistillationConfig(
        str(folder),
        max_steps=max_steps,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        disable_tqdm=True,
        seed=0,
        alpha=0.5,
        temperature=2.0,
        **saving,
    )
    callback = PruningCallback(config)
    callbacks = [callback, _KeptSizes(callback)] if record else [callback]
    trainer = DistillationTrainer(
        model=model,
        teacher_model=tiny_model("llama", "causal_lm", seed=1),
        args=args,
        train_dataset=_Tokens(),
        callbacks=callbacks,
    )
    trainer.train(resume_from_checkpoint=resume)
    return trainer, callbacks[-1] if record else callback


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_hidden_target_inside_distillation_ends_smaller_and_reloads(importance, tmp_path):
    student = tiny_model("llama", "causal_lm", seed=2).train()
    config = PruningConfig(
        targets={"hidden": 0.25, "heads": 0.5}, schedule="linear", start_step=1, end_step=4, importance=importance
    )
    before = sum(p.numel() for p in student.parameters())
    trainer, callback = _run(student, tmp_path, config, max_steps=6)
    assert student.config.hidden_size == 12 and len(callback.removed["hidden"]) == 4
    assert sum(p.numel() for p in student.parameters()) < 0.8 * before
    assert trainer.teacher_model.config.hidden_size == 16
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    torch.testing.assert_close(_logits(reloaded), _logits(student.eval()), rtol=0, atol=1e-6)


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_hidden_target_resumes_bit_identically(importance, tmp_path):
    config = PruningConfig(
        targets={"hidden": 0.25}, schedule="cubic", start_step=2, end_step=8, frequency=2, importance=importance
    )
    full = tiny_model("llama", "causal_lm").train()
    _, full_cb = _run(full, tmp_path / "a", config, max_steps=10, save_steps=5)
    shutil.copytree(tmp_path / "a" / "checkpoint-5", tmp_path / "b" / "checkpoint-5")
    resumed = tiny_model("llama", "causal_lm").train()
    _, resumed_cb = _run(
        resumed, tmp_path / "b", config, max_steps=10, save_steps=5, resume=str(tmp_path / "b" / "checkpoint-5")
    )
    assert resumed_cb.removed == full_cb.removed and len(full_cb.removed["hidden"]) == 4
    for (name, a), (_, b) in zip(full.state_dict().items(), resumed.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    ("targets", "heads", "hidden"), [({"hidden": 0.3}, 4, 12), ({"hidden": 0.2, "heads": 0.5}, 2, 14)]
)
def test_hidden_target_keeps_a_size_the_config_saves_at_every_step(targets, heads, hidden, tmp_path):
    # 0.3 of 16 channels would keep 11 (0.2: 13), which LlamaConfig refuses: the kept size is rounded to a multiple of
    # the heads the config will hold (4, or 2 once the local head pruning removes one KV group in every layer)
    student = tiny_model("llama", "causal_lm", seed=2).train()
    config = PruningConfig(targets=targets, schedule="linear", start_step=1, end_step=6, scope="local")
    trainer, recorder = _run(student, tmp_path, config, max_steps=7, record=True)
    sizes = recorder.sizes
    assert all(size % 4 == 0 or size == sizes[-1] for size in sizes) and sizes == sorted(sizes, reverse=True)
    assert sizes[-1] == hidden and 16 > sizes[3]  # pruned before the last step too
    assert student.config.hidden_size == hidden and student.config.num_attention_heads == heads
    trainer.save_model(str(tmp_path / "final"))
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "final").eval()
    assert reloaded.config.hidden_size % reloaded.config.num_attention_heads == 0
    torch.testing.assert_close(_logits(reloaded), _logits(student.eval()), rtol=0, atol=1e-6)
