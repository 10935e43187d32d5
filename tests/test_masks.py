"""Masks: construction, selection, application to weights / grads / optimizer state, layer skipping, persistence."""

import pytest
import torch

from hf_compress.pruning.architectures import head_slices, neuron_slices
from hf_compress.pruning.importance import unit_scores
from hf_compress.pruning.masks import (
    PruningMasks,
    load_masks,
    mask_grads,
    mask_optimizer_state,
    mask_weights,
    save_masks,
    select_units,
    skip_layers,
)
from tests.conftest import tiny_inputs, tiny_model


def _masks(model, pooler="pooler.dense.weight"):
    masks = PruningMasks.full(model, ["heads", "ffn_neurons", "layers", "unstructured"], [pooler])
    masks.heads[1][[0, 2]] = False
    masks.ffn_neurons[3][[4, 5, 6]] = False
    masks.layers[2] = False
    masks.weights[pooler][0, :3] = False
    return masks


def test_full_masks_shapes_and_sparsity():
    model = tiny_model("llama")
    masks = PruningMasks.full(model, ["heads", "ffn_neurons", "layers"])
    assert [m.shape for m in masks.heads.values()] == [(4,)] * 4
    assert masks.ffn_neurons[0].shape == (32,) and masks.layers.tolist() == [True] * 4
    assert masks.sparsity() == {"heads": 0.0, "ffn_neurons": 0.0, "layers": 0.0}


def test_removed_and_sparsity():
    masks = _masks(tiny_model("bert"))
    assert masks.removed("heads") == {1: [0, 2]}
    assert masks.removed("ffn_neurons") == {3: [4, 5, 6]}
    assert masks.removed("layers") == [2]
    sparsity = masks.sparsity()
    assert sparsity["heads"] == pytest.approx(2 / 16) and sparsity["ffn_neurons"] == pytest.approx(3 / 128)
    assert sparsity["layers"] == 0.25 and sparsity["unstructured"] == pytest.approx(3 / 256)


def test_save_load_round_trip(tmp_path):
    masks = _masks(tiny_model("bert"))
    path = tmp_path / "pruning_masks.safetensors"
    save_masks(masks, str(path), extra={"heads.0": torch.arange(4.0)})
    loaded, extra = load_masks(str(path))
    assert loaded.fingerprint() == masks.fingerprint()
    assert loaded.removed("heads") == {1: [0, 2]} and loaded.removed("layers") == [2]
    assert torch.equal(loaded.weights["pooler.dense.weight"], masks.weights["pooler.dense.weight"])
    assert torch.equal(extra["heads.0"], torch.arange(4.0))
    masks.heads[0][3] = False
    assert loaded.fingerprint() != masks.fingerprint()


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "llama", "distilbert"])
def test_mask_weights_zeroes_slices(family_name):
    model = tiny_model(family_name)
    masks = PruningMasks.full(model, ["heads", "ffn_neurons"])
    masks.heads[0][[2, 3]] = False  # one whole GQA group for the Llama family
    masks.ffn_neurons[1][:8] = False
    mask_weights(model, masks)
    for m, name, dim, index in head_slices(model, 0, [2, 3]) + neuron_slices(model, 1, list(range(8))):
        assert getattr(m, name).index_select(dim, index).abs().sum() == 0
    assert (unit_scores(model, "heads")[0][:1] > 0).all() and (unit_scores(model, "ffn_neurons")[1][8:] > 0).all()


def test_mask_grads_and_optimizer_state():
    model = tiny_model("bert", "seq_cls").train()
    masks = _masks(model, "bert.pooler.dense.weight")
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.1)
    inputs = tiny_inputs()
    model(**inputs, labels=torch.tensor([0, 1])).loss.backward()
    optimizer.step()
    mask_grads(model, masks)
    mask_optimizer_state(optimizer, model, masks)
    for m, name, dim, index in head_slices(model, 1, [0, 2]):
        param = getattr(m, name)
        assert param.grad.index_select(dim, index).abs().sum() == 0
        assert optimizer.state[param]["exp_avg"].index_select(dim, index).abs().sum() == 0
        assert optimizer.state[param]["exp_avg"].abs().sum() > 0
    pooler = model.bert.pooler.dense.weight
    assert pooler.grad[0, :3].abs().sum() == 0 and optimizer.state[pooler]["exp_avg_sq"][0, :3].abs().sum() == 0


def test_select_units_local_and_min_keep():
    scores = {0: torch.tensor([3.0, 1.0, 2.0, 4.0]), 1: torch.tensor([1.0, 2.0, 3.0, 4.0])}
    keep = {0: torch.ones(4, dtype=torch.bool), 1: torch.ones(4, dtype=torch.bool)}
    new = select_units(scores, keep, 0.5, "local")
    assert new[0].tolist() == [True, False, False, True] and new[1].tolist() == [False, False, True, True]
    new = select_units(scores, keep, 0.9, "local", min_keep=2)
    assert [int(m.sum()) for m in new.values()] == [2, 2]


def test_select_units_global_uses_normalised_scores():
    scores = {0: torch.tensor([10.0, 10.0, 10.0, 1.0]), 1: torch.tensor([0.1, 0.2, 0.3, 0.4])}
    keep = {0: torch.ones(4, dtype=torch.bool), 1: torch.ones(4, dtype=torch.bool)}
    new = select_units(scores, keep, 0.25, "global")
    assert new[0].tolist() == [True, True, True, False] and new[1].tolist() == [False, True, True, True]


def test_select_units_never_revives():
    scores = {0: torch.tensor([0.1, 5.0, 1.0, 2.0])}
    keep = {0: torch.tensor([True, False, True, True])}  # unit 1 was removed although it now scores high
    new = select_units(scores, keep, 0.5, "global")
    assert new[0].tolist() == [False, False, True, True]
    assert select_units(scores, keep, 0.0, "global")[0].tolist() == keep[0].tolist()


def test_skip_layers_makes_blocks_identity():
    model = tiny_model("llama")
    handles = skip_layers(model, torch.tensor([True, False, True, True]))
    hidden = model(**tiny_inputs(), output_hidden_states=True).hidden_states
    assert torch.equal(hidden[1], hidden[2]) and not torch.equal(hidden[0], hidden[1])
    for handle in handles:
        handle.remove()
    hidden = model(**tiny_inputs(), output_hidden_states=True).hidden_states
    assert not torch.equal(hidden[1], hidden[2])
