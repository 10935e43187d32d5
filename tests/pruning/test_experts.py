"""Mixture-of-experts families (Mixtral, Qwen2-MoE, Qwen3-MoE): expert / expert-neuron surgery against oracles,
router statistics, heads and layers as for Llama, make_student, PruningCallback in DistillationTrainer, save/reload."""

import types

import pytest
import torch
import transformers
from torch.nn import functional as F

from hf_compress.distillation.config import DistillationConfig
from hf_compress.distillation.student import make_student
from hf_compress.distillation.trainer import DistillationTrainer
from hf_compress.loading import from_pretrained, save_pretrained
from hf_compress.models.families import expert_module, ffn_size, get_layers, head_counts, num_experts
from hf_compress.pruning.activations import activation_scores
from hf_compress.pruning.callback import PruningCallback
from hf_compress.pruning.config import PruningConfig
from hf_compress.pruning.experts import (
    RouterStatistics,
    expert_importance,
    prune_expert_neurons,
    prune_expert_neurons_by_activation,
    prune_experts,
    prune_experts_by_router,
    router_statistics,
    select_expert_neurons,
    select_experts,
)
from hf_compress.pruning.surgery import drop_layers, layer_structure, prune_ffn_neurons, prune_heads, record_structure
from tests.conftest import RandomTokenDataset, value_slices, zero_slices
from tests.tiny_models import VOCAB, tiny_inputs

MOE = ["mixtral", "qwen2_moe", "qwen3_moe"]
WIDTH = 16  # neurons per expert


def moe_config(family: str, **overrides) -> transformers.PretrainedConfig:
    """Hidden 16, 2 layers, 4 heads (GQA 4/2), 4 experts of 16 neurons, top-2, vocabulary 64."""
    common = dict(
        vocab_size=VOCAB,
        hidden_size=16,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_experts_per_tok=2,
        max_position_embeddings=64,
        tie_word_embeddings=False,
        pad_token_id=0,
    )
    if family == "mixtral":
        common.update(num_local_experts=4, intermediate_size=WIDTH)
        return transformers.MixtralConfig(**{**common, **overrides})
    common.update(num_experts=4, moe_intermediate_size=WIDTH, intermediate_size=32)
    if family == "qwen2_moe":
        return transformers.Qwen2MoeConfig(**{**common, "shared_expert_intermediate_size": 8, **overrides})
    return transformers.Qwen3MoeConfig(**{**common, "head_dim": 4, **overrides})


def moe_model(family: str, seed: int = 0, **overrides):
    torch.manual_seed(seed)
    return transformers.AutoModelForCausalLM.from_config(moe_config(family, **overrides)).eval()


@pytest.fixture(params=MOE)
def family(request) -> str:
    return request.param


def _logits(model, inputs=None):
    with torch.no_grad():
        return model.eval()(**(inputs or tiny_inputs())).logits


def _mask_router(model, layer: int, removed: list[int]) -> None:
    """The oracle: the router's own math with ``removed`` experts' logits at -inf (softmax, top-k, renormalise)."""
    router = get_layers(model)[layer].mlp.gate
    renormalize = getattr(router, "norm_topk_prob", True)  # Mixtral always renormalises the top-k

    def forward(self, hidden_states):
        logits = F.linear(hidden_states.reshape(-1, self.hidden_dim), self.weight)
        logits[:, removed] = float("-inf")
        top, index = logits.float().softmax(-1).topk(self.top_k, dim=-1)
        if renormalize:
            top = top / top.sum(-1, keepdim=True)
        return logits, top.to(logits.dtype), index

    router.forward = types.MethodType(forward, router)


def test_moe_structure_is_found(family):
    model = moe_model(family)
    assert [head_counts(model, i) for i in range(2)] == [(4, 2), (4, 2)]
    assert [ffn_size(model, i) for i in range(2)] == [WIDTH, WIDTH]
    assert [num_experts(model, i) for i in range(2)] == [4, 4]
    assert layer_structure(model)[0] == {"num_heads": 4, "num_kv_heads": 2, "head_dim": 4, "ffn": WIDTH, "experts": 4}
    record_structure(model)
    assert not hasattr(model.config, "hf_compress")  # the unpruned config already builds every layer


@pytest.mark.parametrize(
    ("family", "overrides"),
    [
        ("mixtral", {}),  # always renormalises the top-k weights
        ("qwen2_moe", {"norm_topk_prob": False}),
        ("qwen2_moe", {"norm_topk_prob": True}),
        ("qwen3_moe", {"norm_topk_prob": False}),
        ("qwen3_moe", {"norm_topk_prob": True}),
    ],
)
def test_removing_experts_equals_masking_their_router_logits(family, overrides):
    removed = {0: [1], 1: [0, 3]}
    model, reference = moe_model(family, **overrides), moe_model(family, **overrides)
    original = _logits(reference)
    for layer in removed:
        _mask_router(reference, layer, [])
    torch.testing.assert_close(_logits(reference), original, rtol=0, atol=1e-6)  # the oracle is the router's math
    for layer, experts in removed.items():
        _mask_router(reference, layer, experts)
    prune_experts(model, removed)
    assert [num_experts(model, i) for i in range(2)] == [3, 2]
    assert get_layers(model)[1].mlp.gate.weight.shape == (2, 16)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)
    assert not torch.allclose(_logits(model), original, atol=1e-4)


def test_removing_expert_neurons_equals_zeroing_their_down_columns(family):
    per_expert = {e: list(range(e, e + 8)) for e in range(4)}  # different neurons, the same number, in each expert
    neurons = {0: list(range(0, WIDTH, 2)), 1: per_expert}
    model, reference = moe_model(family), moe_model(family)
    with torch.no_grad():
        expert_module(reference, 0).down_proj[:, :, neurons[0]] = 0
        for expert, columns in per_expert.items():
            expert_module(reference, 1).down_proj[expert, :, columns] = 0
    prune_expert_neurons(model, neurons)
    assert expert_module(model, 1).gate_up_proj.shape == (4, 16, 16)
    assert expert_module(model, 1).down_proj.shape == (4, 16, 8)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)
    assert getattr(model.config, "hf_compress", None) is None  # uniform width: the config expresses it
    assert getattr(model.config, "moe_intermediate_size", model.config.intermediate_size) == 8


def test_uniform_removal_reloads_with_plain_from_pretrained(family, tmp_path):
    model = moe_model(family)
    prune_experts(model, {0: [2], 1: [0]})
    prune_expert_neurons(model, {0: list(range(8)), 1: list(range(8, 16))})
    prune_heads(model, {0: [0, 1], 1: [2, 3]})
    assert getattr(model.config, "hf_compress", None) is None
    config = model.config
    assert getattr(config, "num_local_experts", getattr(config, "num_experts", None)) == 3
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert torch.equal(_logits(reloaded), _logits(model))
    assert [num_experts(reloaded, i) for i in range(2)] == [3, 3]


def test_per_layer_structure_reloads_with_hf_compress(family, tmp_path):
    model = moe_model(family)
    prune_experts(model, {1: [0, 3]})
    prune_expert_neurons(model, {0: list(range(8))})
    prune_heads(model, {1: [0, 1]})
    recorded = model.config.hf_compress["layers"]
    assert [(layer["experts"], layer["ffn"], layer["num_heads"]) for layer in recorded] == [(4, 8, 4), (2, 16, 2)]
    save_pretrained(model, tmp_path)
    with pytest.raises((RuntimeError, ValueError), match="(?i)size"):
        transformers.AutoModelForCausalLM.from_pretrained(tmp_path)  # never a silently wrong model
    reloaded = from_pretrained(tmp_path)
    assert layer_structure(reloaded) == layer_structure(model)
    assert torch.equal(_logits(reloaded), _logits(model))


def test_top_k_must_stay_valid(family):
    model = moe_model(family)
    before = expert_module(model, 0).gate_up_proj
    with pytest.raises(ValueError, match="`num_experts_per_tok`=2"):
        prune_experts(model, {1: [0], 0: [0, 1, 2]})
    assert expert_module(model, 0).gate_up_proj is before and num_experts(model, 1) == 4  # nothing changed


@pytest.mark.parametrize(
    ("neurons", "match"),
    [
        ({0: {0: [1], 1: [1, 2]}}, "same number of neurons"),
        ({0: list(range(3))}, "multiple of 8"),
        ({0: list(range(WIDTH))}, "multiple of 8"),
        ({0: [WIDTH]}, "outside"),
        ({2: [0]}, "layer index 2"),
    ],
)
def test_expert_neuron_argument_errors(neurons, match):
    with pytest.raises(ValueError, match=match):
        prune_expert_neurons(moe_model("qwen3_moe"), neurons)


def test_dense_ffn_surgery_points_to_the_expert_surgery():
    with pytest.raises(ValueError, match="prune_expert_neurons"):
        prune_ffn_neurons(moe_model("mixtral"), {1: list(range(8))})


def test_router_statistics_match_the_router_logits(family):
    model = moe_model(family)
    inputs = tiny_inputs(batch=2, seq=8)
    inputs["attention_mask"][1, 5:] = 0  # padding is left out
    stats = router_statistics(model, [inputs])
    with torch.no_grad():
        logits = model(**inputs, output_router_logits=True).router_logits
    keep = inputs["attention_mask"].flatten().bool()
    for layer in range(2):
        top = logits[layer][keep].softmax(-1).topk(2, dim=-1).indices
        assert stats[layer].tokens == 13
        assert torch.equal(stats[layer].counts, torch.bincount(top.flatten(), minlength=4).float())
        torch.testing.assert_close(stats[layer].frequency.sum(), torch.tensor(2.0))
        assert (stats[layer].mean_weight > 0).all() and (stats[layer].mean_weight <= 1).all()


def test_expert_scores_and_selection():
    stats = RouterStatistics(4, torch.tensor([4.0, 2, 2, 0]), torch.tensor([2.0, 1, 1.5, 0]), torch.ones(4))
    assert expert_importance({0: stats}, "frequency")[0].tolist() == [1.0, 0.5, 0.5, 0.0]
    assert expert_importance({0: stats}, "weight")[0].tolist() == [0.5, 0.5, 0.75, 0.0]
    assert select_experts(expert_importance({0: stats}), 0.5, min_keep=2) == {0: [1, 3]}
    assert select_experts({0: torch.tensor([3.0, 1, 2, 0])}, 0.9, min_keep=2) == {0: [1, 3]}  # top-k kept
    with pytest.raises(ValueError, match="`method`"):
        expert_importance({0: stats}, "gini")


def test_prune_experts_by_router_removes_the_least_used(family):
    model = moe_model(family)
    batches = [tiny_inputs(batch=4, seq=8, seed=s) for s in range(2)]
    mass = expert_importance(router_statistics(model, batches))
    removed = prune_experts_by_router(model, batches, sparsity=0.25)
    assert removed == {layer: [int(scores.argmin())] for layer, scores in mass.items()}
    assert [num_experts(model, i) for i in range(2)] == [3, 3]


def test_expert_neuron_activations_match_the_experts_own_forward(family):
    """Oracle: with top-1 routing and identity down projections, each expert's output for a token is its gate weight
    times the activation vector it feeds ``down_proj``: the scores are the mean |activation| over routed tokens."""
    model = moe_model(family, num_experts_per_tok=1)
    inputs = tiny_inputs(batch=2, seq=8, seed=3)
    inputs["attention_mask"][1, 5:] = 0  # padding is left out
    captured = {}
    with torch.no_grad():
        for layer in range(2):
            experts = expert_module(model, layer)
            experts.down_proj.copy_(torch.eye(WIDTH).expand_as(experts.down_proj))  # hidden 16 == width 16

            def hook(module, args, output, layer=layer):
                captured[layer] = (args[1], args[2], output)

            experts.register_forward_hook(hook)
    scores = activation_scores(model, [inputs]).expert_neurons
    assert set(scores) == {0, 1} and scores[0].shape == (4, WIDTH)
    keep = inputs["attention_mask"].flatten().bool()
    for layer, (index, weights, output) in captured.items():
        act = (output / weights[:, :1])[keep].abs()
        for expert in range(4):
            routed = index[keep, 0] == expert
            expected = act[routed].mean(0) if routed.any() else torch.zeros(WIDTH)
            torch.testing.assert_close(scores[layer][expert], expected, rtol=1e-4, atol=1e-6)


def test_dead_expert_neurons_score_zero(family):
    model = moe_model(family)
    with torch.no_grad():  # neuron 5 of expert 2, layer 1: zero its gate and up rows
        expert_module(model, 1).gate_up_proj[2, [5, WIDTH + 5]] = 0
    batches = [tiny_inputs(batch=4, seq=8, seed=s) for s in range(2)]
    scores = activation_scores(model, batches)
    assert scores.expert_neurons[1][2][5] == 0
    assert (scores.expert_neurons[1] > 0).sum() >= 4 * WIDTH - 4  # the others fire (experts routed to)
    assert scores.ffn_neurons == {}  # no dense block in these models
    assert scores.hidden.shape == (16,) and scores.heads[0].shape == (4,)


def test_select_expert_neurons_keeps_an_aligned_width_per_expert():
    scores = torch.rand(3, 16, generator=torch.Generator().manual_seed(0))
    plan = select_expert_neurons({1: scores}, sparsity=0.3)  # keeps round(0.7 * 16 / 8) * 8 = 8
    assert set(plan[1]) == {0, 1, 2}
    for expert, removed in plan[1].items():
        assert removed == sorted(scores[expert].argsort()[:8].tolist())
    assert select_expert_neurons({1: scores}, sparsity=0.1) == {}  # rounds back to the full width
    assert len(select_expert_neurons({1: scores}, sparsity=0.99)[1][0]) == 8  # never below one multiple
    with pytest.raises(ValueError, match="`sparsity`"):
        select_expert_neurons({1: scores}, sparsity=1.0)
    with pytest.raises(ValueError, match=r"`scores\[1\]` must have shape \(experts, ffn\)"):
        select_expert_neurons({1: scores[0]}, sparsity=0.5)


def test_prune_expert_neurons_by_activation_equals_zeroing_them(family, tmp_path):
    model, reference = moe_model(family), moe_model(family)
    batches = [tiny_inputs(batch=4, seq=8, seed=s) for s in range(2)]
    removed = prune_expert_neurons_by_activation(model, batches, sparsity=0.5)
    assert set(removed) == {0, 1} and all(len(r) == 8 for plan in removed.values() for r in plan.values())
    with torch.no_grad():
        for layer, plan in removed.items():
            for expert, neurons in plan.items():
                expert_module(reference, layer).down_proj[expert][:, neurons] = 0
    assert [expert_module(model, i).down_proj.shape[2] for i in range(2)] == [8, 8]
    inputs = tiny_inputs(batch=2, seq=8, seed=5)
    torch.testing.assert_close(_logits(model, inputs), _logits(reference, inputs), rtol=1e-5, atol=1e-5)
    model.save_pretrained(tmp_path)  # a uniform width: plain from_pretrained rebuilds it
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    torch.testing.assert_close(_logits(reloaded, inputs), _logits(model, inputs), rtol=0, atol=0)
    with pytest.raises(ValueError, match="has no routed experts"):
        prune_expert_neurons_by_activation(transformers.AutoModelForCausalLM.from_config(
            transformers.LlamaConfig(vocab_size=64, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=16)), batches, 0.5)  # fmt: skip


def test_heads_pruning_equals_zeroed_value_rows(family):
    model, reference = moe_model(family), moe_model(family)
    zero_slices(value_slices(reference, 1, [2, 3]))
    prune_heads(model, {1: [2, 3]})
    assert head_counts(model, 1) == (2, 1)
    torch.testing.assert_close(_logits(model), _logits(reference), rtol=1e-5, atol=1e-5)


def test_drop_layers_then_generate_with_cache(family, tmp_path):
    model = drop_layers(moe_model(family), [0])
    prompt = tiny_inputs(batch=1, seq=5)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    cached = model.generate(**prompt, use_cache=True, **kw)
    assert cached.shape == (1, 11)
    assert torch.equal(cached, model.generate(**prompt, use_cache=False, **kw))
    model.save_pretrained(tmp_path)
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(model))


@pytest.mark.parametrize("family", ["qwen2_moe", "qwen3_moe"])
def test_dense_blocks_among_sparse_ones(family, tmp_path):
    """`mlp_only_layers`: dense blocks keep their MLP; dropping blocks rewrites the layout for plain reloading."""
    model = moe_model(family, num_hidden_layers=3, mlp_only_layers=[1])
    assert [num_experts(model, i) for i in range(3)] == [4, 0, 4]
    prune_experts(model, {0: [1], 2: [3]})
    prune_expert_neurons(model, {0: list(range(8)), 1: [0, 5], 2: {e: list(range(e, e + 8)) for e in range(3)}})
    assert [ffn_size(model, i) for i in range(3)] == [8, 30, 8]
    save_pretrained(model, tmp_path / "pruned")
    assert torch.equal(_logits(from_pretrained(tmp_path / "pruned")), _logits(model))
    drop_layers(model, [0])
    assert model.config.mlp_only_layers == [0] and model.config.decoder_sparse_step == 1
    drop_layers(model, [1])  # only the dense block is left
    assert getattr(model.config, "hf_compress", None) is None  # the config builds it again
    model.save_pretrained(tmp_path / "dropped")
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "dropped")
    assert expert_module(reloaded, 0) is None and ffn_size(reloaded, 0) == 30
    assert torch.equal(_logits(reloaded), _logits(model))


def test_make_student_keeps_the_experts(family, tmp_path):
    teacher = moe_model(family)
    student = make_student(teacher, num_layers=1)
    assert len(get_layers(student)) == 1 and num_experts(student, 0) == 4
    student.save_pretrained(tmp_path)
    assert torch.equal(_logits(transformers.AutoModelForCausalLM.from_pretrained(tmp_path)), _logits(student))


@pytest.mark.parametrize("importance", ["magnitude", "activation"])
def test_pruning_callback_inside_distillation_trainer(family, importance, tmp_path):
    """Experts pruned one-shot by router statistics, then heads pruned while distilling from the full teacher."""
    teacher, student = moe_model(family, seed=1), moe_model(family, seed=2)
    prune_experts_by_router(student, [tiny_inputs(batch=4, seq=8, seed=s) for s in range(2)], sparsity=0.25)
    before = sum(p.numel() for p in student.parameters())
    args = DistillationConfig(
        str(tmp_path),
        max_steps=3,
        per_device_train_batch_size=4,
        learning_rate=5e-2,
        report_to="none",
        use_cpu=True,
        save_strategy="no",
        disable_tqdm=True,
        alpha=0.5,
    )
    config = PruningConfig(targets={"heads": 0.5}, schedule="one_shot", start_step=1, importance=importance)
    callback = PruningCallback(config)
    trainer = DistillationTrainer(
        model=student, teacher_model=teacher, args=args, train_dataset=RandomTokenDataset(n=12), callbacks=[callback]
    )
    trainer.train()
    assert sum(head_counts(student, i)[0] for i in range(2)) == 4
    assert sum(p.numel() for p in student.parameters()) < before
    assert [num_experts(student, i) for i in range(2)] == [3, 3]
    assert [head_counts(teacher, i) for i in range(2)] == [(4, 2), (4, 2)] and num_experts(teacher, 0) == 4
    trainer.save_model(str(tmp_path / "final"))
    assert torch.equal(_logits(from_pretrained(tmp_path / "final")), _logits(student))


def test_pruning_callback_refuses_ffn_neurons_of_experts(tmp_path):
    args = DistillationConfig(str(tmp_path), max_steps=1, report_to="none", use_cpu=True, save_strategy="no")
    callback = PruningCallback(PruningConfig(targets={"ffn_neurons": 0.5}))
    trainer = DistillationTrainer(
        model=moe_model("mixtral"),
        teacher_model=moe_model("mixtral"),
        args=args,
        train_dataset=RandomTokenDataset(n=4),
    )
    trainer.add_callback(callback)
    with pytest.raises(ValueError, match="prune_expert_neurons"):
        trainer.train()
