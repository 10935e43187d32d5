"""Importance scores on hand-made tensors and on tiny models of every family."""

import pytest
import torch

from hf_compress.models.families import ffn_size, head_slices, neuron_slices
from hf_compress.pruning.importance import (
    block_influence,
    block_influence_scores,
    head_groups,
    layer_scores,
    layer_unit_scores,
    magnitude_score,
    normalize_per_layer,
    taylor_score,
    unit_layout,
    unit_scores,
)
from hf_compress.pruning.surgery import skip_layers
from tests.tiny_models import tiny_inputs, tiny_model


def test_magnitude_score_is_the_norm_of_all_slices():
    assert magnitude_score([torch.tensor([3.0]), torch.tensor([[4.0]])]) == pytest.approx(5.0)
    assert magnitude_score([torch.tensor([-1.0, 2.0])], p=1) == pytest.approx(3.0)


def test_taylor_score_is_sum_of_abs_weight_times_grad():
    w, g = torch.tensor([1.0, -2.0, 3.0]), torch.tensor([0.5, 0.5, -1.0])
    assert taylor_score([w], [g]) == pytest.approx(0.5 + 1.0 + 3.0)


def test_block_influence_hand_made():
    x = torch.tensor([[[1.0, 0.0], [0.0, 1.0]]])
    assert block_influence(x, x) == pytest.approx(0.0, abs=1e-6)
    assert block_influence(x, -x) == pytest.approx(2.0)
    assert block_influence(x, x.flip(-1)) == pytest.approx(1.0)
    out = torch.stack([x[0, 0], -x[0, 1]])[None]  # token 0 unchanged, token 1 reversed
    assert block_influence(x, out) == pytest.approx(1.0)
    assert block_influence(x, out, attention_mask=torch.tensor([[1, 0]])) == pytest.approx(0.0, abs=1e-6)


def test_normalize_per_layer():
    out = normalize_per_layer({0: torch.tensor([3.0, 4.0]), 1: torch.tensor([0.0, 2.0])})
    assert torch.allclose(out[0], torch.tensor([0.6, 0.8])) and torch.allclose(out[1], torch.tensor([0.0, 1.0]))


def test_head_groups_follow_gqa():
    assert head_groups(tiny_model("bert"), 0) == [[0], [1], [2], [3]]
    assert head_groups(tiny_model("llama"), 0) == [[0, 1], [2, 3]]


def _slice_norm(model, slices):
    return magnitude_score([getattr(m, n).index_select(d, i) for m, n, d, i in slices])


def test_head_magnitude_matches_slices(family):
    model = tiny_model(family)
    scores = unit_scores(model, "heads")
    assert len(scores) == 4
    for unit, heads in enumerate(head_groups(model, 1)):
        assert scores[1][unit] == pytest.approx(float(_slice_norm(model, head_slices(model, 1, heads))), rel=1e-5)


def test_neuron_magnitude_matches_slices(family):
    model = tiny_model(family)
    scores = unit_scores(model, "ffn_neurons")
    assert scores[2].shape == (32,)
    for neuron in (0, 7, 31):
        expected = float(_slice_norm(model, neuron_slices(model, 2, [neuron])))
        assert scores[2][neuron] == pytest.approx(expected, rel=1e-5)


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "llama"])
def test_zeroed_units_score_zero(family_name):
    model = tiny_model(family_name)
    with torch.no_grad():
        for m, n, d, i in head_slices(model, 0, head_groups(model, 0)[1]) + neuron_slices(model, 3, [5]):
            getattr(m, n).index_fill_(d, i, 0.0)
    heads, neurons = unit_scores(model, "heads"), unit_scores(model, "ffn_neurons")
    assert heads[0][1] == 0 and (heads[0][0] > 0) and (heads[1] > 0).all()
    assert neurons[3][5] == 0 and (neurons[3][:5] > 0).all()


def test_taylor_with_unit_grads_is_l1_magnitude():
    model = tiny_model("bert")
    for p in model.parameters():
        p.grad = torch.ones_like(p)
    taylor = unit_scores(model, "heads", "taylor")
    l1 = unit_scores(model, "heads", "magnitude", p=1)
    assert torch.allclose(taylor[2], l1[2], rtol=1e-5)


def test_taylor_follows_real_gradients():
    model = tiny_model("llama", "causal_lm").train()
    inputs = tiny_inputs()
    model(**inputs, labels=inputs["input_ids"]).loss.backward()
    scores = unit_scores(model, "ffn_neurons", "taylor")
    assert all((s >= 0).all() and s.sum() > 0 for s in scores.values())
    assert layer_scores(model, "taylor").shape == (4,)


def test_unknown_method_raises():
    with pytest.raises(ValueError, match="`method` must be 'magnitude' or 'taylor'"):
        unit_scores(tiny_model("bert"), "heads", "random")
    with pytest.raises(ValueError, match="`target` must be 'heads' or 'ffn_neurons'"):
        unit_scores(tiny_model("bert"), "layers")


def test_layer_magnitude_scores_positive():
    scores = layer_scores(tiny_model("gpt2"))
    assert scores.shape == (4,) and (scores > 0).all()


@pytest.mark.parametrize("family_name", ["bert", "llama", "gpt2", "distilbert"])
def test_block_influence_scores_zero_for_identity_block(family_name):
    model = tiny_model(family_name)
    batches = [tiny_inputs(seed=1), tiny_inputs(seed=2)]
    scores = block_influence_scores(model, batches)
    assert scores.shape == (4,) and (scores > 0).all()
    handles = skip_layers(model, torch.tensor([True, False, True, True]))
    skipped = block_influence_scores(model, batches)
    for handle in handles:
        handle.remove()
    assert skipped[1] == pytest.approx(0.0, abs=1e-5) and skipped[0] == pytest.approx(float(scores[0]), rel=1e-5)
    assert not model.training


def test_block_influence_needs_batches():
    with pytest.raises(ValueError, match="`batches` is empty"):
        block_influence_scores(tiny_model("bert"), [])


def _reference_unit_scores(model, target, method, p=2.0):
    """The per-unit definition: gather each unit's slices and reduce them on their own (no layout, no batching)."""
    scores = {}
    for layer in range(len(unit_layout(model, target))):
        if target == "heads":
            units = [head_slices(model, layer, heads) for heads in head_groups(model, layer)]
        else:
            units = [neuron_slices(model, layer, [n]) for n in range(ffn_size(model, layer))]
        values = []
        for slices in units:
            total = torch.tensor(0.0)
            for module, name, dim, index in slices:
                param = getattr(module, name)
                if method == "magnitude":
                    total = total + (param.detach().index_select(dim, index).abs() ** p).sum()
                elif param.grad is not None:
                    total = total + (param.detach() * param.grad).index_select(dim, index).abs().sum()
            values.append(total ** (1 / p) if method == "magnitude" else total)
        scores[layer] = torch.stack(values)
    return scores


@pytest.mark.parametrize("target", ["heads", "ffn_neurons"])
def test_vectorised_scores_equal_the_per_unit_definition(family, target):
    model = tiny_model(family)
    g = torch.Generator().manual_seed(0)
    for param in model.parameters():
        param.grad = torch.randn(param.shape, generator=g)
    model.get_input_embeddings().weight.grad = None  # a parameter without gradient contributes nothing
    layout = unit_layout(model, target)
    for method, p in (("magnitude", 2.0), ("magnitude", 1.0), ("magnitude", 3.0), ("taylor", 2.0)):
        expected = _reference_unit_scores(model, target, method, p)
        got = unit_scores(model, target, method, p)
        assert unit_scores(model, target, method, p, layout=layout).keys() == got.keys() == expected.keys()
        for layer, value in expected.items():
            assert got[layer].shape == value.shape
            assert torch.allclose(got[layer], value, rtol=1e-5, atol=1e-7), (method, p, layer)
            assert torch.equal(unit_scores(model, target, method, p, layout=layout)[layer], got[layer])


def test_layout_covers_every_position_once(family):
    model = tiny_model(family)
    for target, count in (("heads", len(head_groups(model, 0))), ("ffn_neurons", 32)):
        num_units, rows = unit_layout(model, target)[1]
        assert num_units == count
        for param, dim, index, ids in rows:
            positions = torch.arange(param.shape[dim]) if index is None else index
            assert len(positions) == len(ids) == len(set(positions.tolist()))
            assert ids.min() >= 0 and ids.max() < num_units


def test_taylor_of_layer_units_skips_parameters_without_grad():
    model = tiny_model("gpt2")
    num_units, rows = unit_layout(model, "ffn_neurons")[0]
    assert torch.equal(layer_unit_scores(num_units, rows, "taylor"), torch.zeros(num_units))
    with pytest.raises(ValueError, match="`target` must be 'heads' or 'ffn_neurons'"):
        unit_layout(model, "layers")
