"""Unstructured magnitude pruning and the sparsity report."""

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from hf_compress.pruning.unstructured import (
    magnitude_masks,
    magnitude_prune,
    prunable_weights,
    sparsity_report,
)
from tests.tiny_models import tiny_inputs, tiny_model


def test_magnitude_masks_hand_made():
    masks = magnitude_masks({"w": torch.tensor([0.1, -3.0, 0.5, 2.0])}, 0.5)
    assert masks["w"].tolist() == [False, True, False, True]


def test_global_vs_local_scope():
    weights = {"a": torch.tensor([1.0, 2.0, 3.0, 4.0]), "b": torch.tensor([10.0, 20.0, 30.0, 40.0])}
    glob = magnitude_masks(weights, 0.5, "global")
    assert glob["a"].tolist() == [False] * 4 and glob["b"].tolist() == [True] * 4
    local = magnitude_masks(weights, 0.5, "local")
    assert local["a"].tolist() == [False, False, True, True] and local["b"].tolist() == [False, False, True, True]


def test_previous_masks_stay_removed():
    weights = {"w": torch.tensor([5.0, 1.0, 2.0, 3.0])}
    masks = magnitude_masks(weights, 0.25, previous={"w": torch.tensor([False, True, True, True])})
    assert masks["w"].tolist() == [False, True, True, True]


def test_magnitude_masks_validates():
    with pytest.raises(ValueError, match=r"`sparsity` must be in \[0, 1\), got 1.0"):
        magnitude_masks({"w": torch.ones(2)}, 1.0)
    with pytest.raises(ValueError, match="`scope` must be 'global' or 'local'"):
        magnitude_masks({"w": torch.ones(2)}, 0.5, "layer")


def test_prunable_weights_excludes_output_head_and_embeddings():
    model = tiny_model("llama", "causal_lm")
    names = prunable_weights(model)
    assert "lm_head.weight" not in names and not any("embed" in n for n in names)
    assert len(names) == 4 * 7  # q, k, v, o, gate, up, down per block
    assert "lm_head.weight" in prunable_weights(model, include="lm_head")


def test_gpt2_conv1d_is_prunable():
    model = tiny_model("gpt2", "causal_lm")
    names = prunable_weights(model)
    assert "transformer.h.0.attn.c_attn.weight" in names
    assert all(isinstance(model.get_submodule(n.removesuffix(".weight")), Conv1D) for n in names)


def test_include_exclude_globs_and_regexes():
    model = tiny_model("bert")
    only_query = prunable_weights(model, include="*.query")
    assert len(only_query) == 4 and all(n.endswith("query.weight") for n in only_query)
    by_regex = prunable_weights(model, include=r"encoder\.layer\.[01]\..*")
    assert len(by_regex) == 2 * 6
    no_attention = prunable_weights(model, exclude=["*attention*"])
    assert not any("attention" in n for n in no_attention) and len(no_attention) == 4 * 2 + 1


@pytest.mark.parametrize("scope", ["global", "local"])
def test_magnitude_prune_reaches_requested_sparsity(family, scope):
    model = tiny_model(family)
    head_before = model.get_output_embeddings()
    weights = prunable_weights(model)
    report = magnitude_prune(model, 0.6, scope=scope)
    total = sum(w.numel() for w in weights.values())
    zeros = sum(int((w == 0).sum()) for w in weights.values())
    assert zeros / total == pytest.approx(0.6, abs=1e-3)
    if scope == "local":
        assert all(float((w == 0).float().mean()) == pytest.approx(0.6, abs=0.02) for w in weights.values())
    assert head_before is None or (head_before.weight != 0).all()
    assert report.nonzero_params == sum(int(torch.count_nonzero(p)) for p in model.parameters())


def test_magnitude_prune_is_permanent_and_keeps_smallest_out():
    model = tiny_model("bert", "seq_cls")
    before = {n: w.detach().clone() for n, w in prunable_weights(model).items()}
    magnitude_prune(model, 0.5)
    model.requires_grad_(False)
    names = [n for n, _ in model.named_parameters()]
    assert not any(n.endswith("_orig") for n in names) and not any(n.endswith("_mask") for n in names)
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())
    after = prunable_weights(model)
    largest_removed = max(float(before[n][after[n] == 0].abs().max()) for n in after)
    smallest_kept = min(float(after[n][after[n] != 0].abs().min()) for n in after)
    assert largest_removed <= smallest_kept
    model(**tiny_inputs())  # still runs


def test_magnitude_prune_with_empty_selection_raises():
    with pytest.raises(ValueError, match="select no nn.Linear or Conv1D weight"):
        magnitude_prune(tiny_model("bert"), 0.5, include="nothing")


def test_sparsity_report_counts_and_size():
    model = tiny_model("bert")
    report = sparsity_report(model)
    numel = sum(p.numel() for p in model.parameters())
    nonzero = sum(int(torch.count_nonzero(p)) for p in model.parameters())  # biases start at zero
    assert report.total_params == numel and report.size_bytes == 4 * numel
    assert report.sparsity == pytest.approx(1 - nonzero / numel) and report.prunable_sparsity == 0.0
    with torch.no_grad():
        model.encoder.layer[0].attention.self.query.weight.zero_()
    report = sparsity_report(model)
    assert report.modules["encoder.layer.0.attention.self.query"] == {"total": 256, "nonzero": 0, "sparsity": 1.0}
    assert report.total_params - report.nonzero_params >= 256 and report.size_bytes == 4 * numel
    as_dict = report.to_dict()
    assert set(as_dict) >= {"modules", "total_params", "nonzero_params", "sparsity", "size_bytes", "note"}
    assert "no speedup" in as_dict["note"]


def test_sparsity_report_counts_tied_weights_once():
    model = tiny_model("gpt2", "causal_lm")  # lm_head tied to wte
    unique = {id(p): p.numel() for p in model.parameters()}
    assert sparsity_report(model).total_params == sum(unique.values())
    half = nn.Linear(4, 4).half()
    assert sparsity_report(half).size_bytes == 2 * 20
