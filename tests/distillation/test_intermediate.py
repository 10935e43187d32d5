"""Tests of hf_compress.distillation.intermediate: the layer map and the hidden-state / attention terms."""

import pytest
import torch

from hf_compress.distillation.config import default_layer_map
from hf_compress.distillation.intermediate import (
    mapped_attention_loss,
    mapped_hidden_loss,
    output_flags,
    projection_widths,
    resolve_layer_map,
)
from hf_compress.distillation.losses import attention_loss, hidden_state_loss
from tests.tiny_models import tiny_model


def options(hidden=0.0, attention=0.0, layer_map=None):
    return {"hidden_loss_weight": hidden, "attention_loss_weight": attention, "layer_map": layer_map}


def test_layer_map_is_empty_without_intermediate_losses_and_defaults_otherwise():
    student, teacher = tiny_model("bert", num_hidden_layers=2), tiny_model("bert")
    assert resolve_layer_map(options(), student, None, "seq_cls") == {}
    assert resolve_layer_map(options(hidden=1.0), student, teacher, "seq_cls") == default_layer_map(2, 4)
    assert resolve_layer_map(options(hidden=1.0, layer_map={0: 3}), student, teacher, "seq_cls") == {0: 3}
    with pytest.raises(ValueError, match="`layer_map` entry 0: 7 is out of range"):
        resolve_layer_map(options(layer_map={0: 7}), student, teacher, "seq_cls")
    with pytest.raises(ValueError, match="must be 0 with cached teacher outputs"):
        resolve_layer_map(options(attention=1.0), student, None, "seq_cls")
    with pytest.raises(ValueError, match="must be 0 for encoder-decoder students"):
        resolve_layer_map(options(hidden=1.0), student, teacher, "seq2seq_lm")


def test_attention_loss_switches_both_models_to_eager_and_widths_ask_for_a_projection():
    student, teacher = tiny_model("bert", num_hidden_layers=2), tiny_model("bert", hidden_size=32)
    student.set_attn_implementation("sdpa")
    resolve_layer_map(options(attention=1.0), student, teacher, "seq_cls")
    assert student.config._attn_implementation == teacher.config._attn_implementation == "eager"
    assert projection_widths(options(hidden=1.0), student, teacher) == (16, 32)
    assert projection_widths(options(attention=1.0), student, teacher) is None
    assert output_flags(options(hidden=1.0, attention=1.0)) == {
        "output_hidden_states": True,
        "output_attentions": True,
    }


def test_mapped_losses_average_the_mapped_layers():
    g = torch.Generator().manual_seed(0)
    states = type("Out", (), {})
    student, teacher = states(), states()
    student.hidden_states = [torch.randn(1, 3, 4, generator=g) for _ in range(3)]
    teacher.hidden_states = [torch.randn(1, 3, 4, generator=g) for _ in range(5)]
    student.attentions = [torch.softmax(torch.randn(1, 2, 3, 3, generator=g), -1) for _ in range(2)]
    teacher.attentions = [torch.softmax(torch.randn(1, 2, 3, 3, generator=g), -1) for _ in range(4)]
    layer_map, mask = {0: 1, 1: 3}, torch.tensor([[1, 1, 0]])
    hidden = mapped_hidden_loss(student, teacher, layer_map, "cosine", mask)
    expected = [
        hidden_state_loss(student.hidden_states[s + 1], teacher.hidden_states[t + 1], "cosine", mask)
        for s, t in layer_map.items()
    ]
    torch.testing.assert_close(hidden, torch.stack(expected).mean())
    attention = mapped_attention_loss(student, teacher, layer_map, mask)
    expected = [attention_loss(student.attentions[s], teacher.attentions[t], mask) for s, t in layer_map.items()]
    torch.testing.assert_close(attention, torch.stack(expected).mean())
    doubled = mapped_hidden_loss(student, teacher, layer_map, "mse", mask, projection=lambda xs: [2 * x for x in xs])
    assert not torch.allclose(doubled, mapped_hidden_loss(student, teacher, layer_map, "mse", mask))
