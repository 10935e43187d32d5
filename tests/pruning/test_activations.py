import pytest
import torch

from hf_compress.models.families import block_module
from hf_compress.pruning.activations import (
    activation_scores,
    block_skip_scores,
    channel_abs_sum,
    head_norm_sum,
    kl_to_reference,
)
from hf_compress.pruning.hidden import first_output, prune_hidden, zero_hidden_channels
from tests.conftest import zero_slices
from tests.tiny_models import tiny_inputs, tiny_model

BATCHES = [tiny_inputs(seed=1), tiny_inputs(seed=2)]


def test_channel_abs_sum_counts_only_unmasked_tokens():
    x = torch.tensor([[[1.0, -2.0], [3.0, 0.0], [100.0, 100.0]]])
    total, count = channel_abs_sum(x, torch.tensor([[1, 1, 0]]))
    assert total.tolist() == [4.0, 2.0]
    assert count.item() == 2.0


def test_head_norm_sum_is_the_l2_norm_of_each_head_slice():
    x = torch.tensor([[[3.0, 4.0, 0.0, 1.0]]])
    total, count = head_norm_sum(x, num_heads=2)
    torch.testing.assert_close(total, torch.tensor([5.0, 1.0]))
    assert count.item() == 1.0


def test_scores_have_one_value_per_unit(family):
    model = tiny_model(family)
    scores = activation_scores(model, BATCHES)
    assert scores.hidden.shape == (16,)
    assert set(scores.heads) == set(range(4)) and scores.heads[0].shape == (4,)
    assert scores.ffn_neurons[3].shape == (32,)
    groups = scores.head_group_scores(model)[0]
    assert groups.shape == ((2,) if family in ("llama", "mistral", "qwen2", "qwen3") else (4,))
    torch.testing.assert_close(groups.sum(), scores.heads[0].sum())


def test_dead_units_score_zero(family):
    model = tiny_model(family)
    zero_hidden_channels(model, [2, 9])
    with torch.no_grad():  # neuron 5 of layer 1 fires nothing: zero its input rows
        up = block_module(model, 1, "up")
        dim = 1 if type(up).__name__ == "Conv1D" else 0
        zero_slices(
            [(up, "weight", dim, torch.tensor([5]))]
            + ([(up, "bias", 0, torch.tensor([5]))] if up.bias is not None else [])
        )
        gate = block_module(model, 1, "gate")
        if gate is not None:
            zero_slices([(gate, "weight", 0, torch.tensor([5]))])
    scores = activation_scores(model, BATCHES)
    assert scores.hidden[[2, 9]].abs().max() == 0
    assert scores.hidden.min() == 0 and (scores.hidden > 0).sum() == 14
    assert scores.ffn_neurons[1][5] == 0 and (scores.ffn_neurons[1] > 0).sum() >= 30


def test_low_activation_channels_cost_less_than_high_ones():
    model = tiny_model("llama", "causal_lm")
    reference = first_output(model, BATCHES[0])
    order = activation_scores(model, BATCHES).hidden.argsort()
    damage = {}
    for name, channels in (("low", order[:4]), ("high", order[-4:])):
        pruned = prune_hidden(tiny_model("llama", "causal_lm"), channels)
        damage[name] = float(kl_to_reference(first_output(pruned, BATCHES[0]), reference))
    assert damage["low"] < damage["high"]


@pytest.mark.parametrize("with_labels", [False, True])
def test_skipping_an_identity_block_costs_nothing(with_labels):
    model = tiny_model("llama", "causal_lm")
    zero_slices([(block_module(model, 2, role), "weight", 0, torch.arange(16)) for role in ("o", "down")])
    batches = [{**b, "labels": b["input_ids"]} if with_labels else b for b in BATCHES]
    scores = block_skip_scores(model, batches)
    assert scores.shape == (4,)
    assert scores[2].abs() < 1e-6
    assert scores.abs().argmin() == 2 and scores.abs().max() > 1e-5  # a loss may also drop when a block goes


def test_empty_calibration_is_an_error():
    with pytest.raises(ValueError, match="`batches` is empty"):
        activation_scores(tiny_model("bert"), [])
