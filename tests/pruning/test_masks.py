"""Masks: construction, application to weights / grads / optimizer state, layer skipping, persistence."""

import copy

import pytest
import torch

from hf_compress.models.families import head_slices, neuron_slices
from hf_compress.pruning.importance import unit_layout, unit_scores
from hf_compress.pruning.masks import (
    ParamMask,
    PruningMasks,
    load_masks,
    mask_changes,
    mask_grads,
    mask_optimizer_state,
    mask_weights,
    parameter_masks,
    save_masks,
    structured_slices,
)
from hf_compress.pruning.surgery import skip_layers
from tests.tiny_models import tiny_inputs, tiny_model


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


def test_skip_layers_makes_blocks_identity():
    model = tiny_model("llama")
    handles = skip_layers(model, torch.tensor([True, False, True, True]))
    hidden = model(**tiny_inputs(), output_hidden_states=True).hidden_states
    assert torch.equal(hidden[1], hidden[2]) and not torch.equal(hidden[0], hidden[1])
    for handle in handles:
        handle.remove()
    hidden = model(**tiny_inputs(), output_hidden_states=True).hidden_states
    assert not torch.equal(hidden[1], hidden[2])


def _zeroed_by_slices(model, masks):
    reference = copy.deepcopy(model)
    params = dict(reference.named_parameters())
    names = {id(p): n for n, p in model.named_parameters()}
    with torch.no_grad():
        for param, dim, index in structured_slices(model, masks):
            params[names[id(param)]].index_fill_(dim, index, 0)
    return reference


@pytest.mark.parametrize("family_name", ["bert", "gpt2", "llama", "distilbert"])
def test_parameter_masks_from_layouts_zero_exactly_the_slices(family_name):
    model = tiny_model(family_name)
    masks = PruningMasks.full(model, ["heads", "ffn_neurons"])
    masks.heads[0][[2, 3]] = False  # a whole GQA group for the Llama family
    masks.heads[3][:2] = False
    masks.ffn_neurons[1][[0, 5, 6, 31]] = False
    masks.ffn_neurons[2][:20] = False  # many neurons: applied with mul_ instead of index_fill_
    layouts = {t: unit_layout(model, t) for t in ("heads", "ffn_neurons")}
    fast, slow = parameter_masks(model, masks, layouts), parameter_masks(model, masks)
    assert [id(e.param) for e in fast] == [id(e.param) for e in slow]
    assert all(torch.equal(a.keep, b.keep) for a, b in zip(fast, slow, strict=True))
    assert any(e.index is not None for e in fast) and any(e.index is None for e in fast)
    reference = _zeroed_by_slices(model, masks)
    mask_weights(model, masks, fast)
    for (name, a), (_, b) in zip(model.named_parameters(), reference.named_parameters(), strict=True):
        assert torch.equal(a, b), name


def test_parameter_masks_refuse_a_split_gqa_group_like_the_slices():
    model = tiny_model("llama")
    masks = PruningMasks.full(model, ["heads"])
    masks.heads[0][0] = False  # half of the query group of KV head 0
    with pytest.raises(ValueError, match="splits the query group"):
        parameter_masks(model, masks, {"heads": unit_layout(model, "heads")})


def test_mask_changes_zero_only_what_is_new():
    model = tiny_model("bert", "seq_cls").train()
    masks = _masks(model, "bert.pooler.dense.weight")
    before = parameter_masks(model, masks)
    mask_weights(model, masks, before)
    grown = PruningMasks(
        heads={k: v.clone() for k, v in masks.heads.items()},
        ffn_neurons=dict(masks.ffn_neurons),
        layers=masks.layers,
        weights={k: v.clone() for k, v in masks.weights.items()},
    )
    grown.heads[1][3] = False
    grown.weights["bert.pooler.dense.weight"][1, :4] = False
    after = parameter_masks(model, grown)
    changes = mask_changes(before, after)
    query = model.bert.encoder.layer[1].attention.self.query.weight
    changed = {id(e.param) for e in changes}
    assert id(query) in changed and id(model.bert.encoder.layer[3].intermediate.dense.weight) not in changed
    entry = next(e for e in changes if e.param is query)
    assert entry.dim == 0 and entry.index.tolist() == list(range(12, 16))  # head 3 only, head 0/2 already zero
    assert mask_changes(after, after) == []
    mask_weights(model, grown, changes)
    reference = copy.deepcopy(model)
    mask_weights(reference, grown)
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), reference.parameters(), strict=True))


def test_param_mask_index_and_multiplier_agree():
    weight = torch.randn(8, 6)
    keep = torch.ones(1, 6, dtype=torch.bool)
    keep[0, [1, 4]] = False
    by_index = ParamMask(weight, keep.float(), dim=1, index=torch.tensor([1, 4]))
    by_mul = ParamMask(weight, keep.float())
    a, b = weight.clone(), weight.clone()
    by_index.apply(a)
    by_mul.apply(b)
    assert torch.equal(a, b) and a[:, [1, 4]].abs().sum() == 0 and (a[:, 0] != 0).all()


def test_masks_equals():
    masks = _masks(tiny_model("bert"))
    same = PruningMasks.from_state_dict({k: v.clone() for k, v in masks.state_dict().items()})
    assert masks.equals(same)
    same.ffn_neurons[0][0] = False
    assert not masks.equals(same) and not masks.equals(PruningMasks())
