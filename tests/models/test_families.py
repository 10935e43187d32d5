import pytest
import torch
import transformers

from hf_compress.models.families import (
    block_module,
    ffn_size,
    get_family,
    get_layers,
    head_counts,
    head_slices,
    neuron_slices,
)
from tests.conftest import value_slices, zero_slices
from tests.tiny_models import DECODERS, tiny_inputs, tiny_model


def test_layers_heads_and_ffn_are_found(family):
    model = tiny_model(family)
    assert len(get_layers(model)) == 4
    q, kv = head_counts(model, 0)
    assert q == 4 and kv == (2 if family in DECODERS[:4] else 4)
    assert ffn_size(model, 0) == 32


def test_zeroing_head_slices_equals_zeroing_value_rows(family):
    heads = [0, 1]  # one whole GQA group in the Llama family
    a, b = tiny_model(family), tiny_model(family)
    zero_slices(head_slices(a, 1, heads))
    zero_slices(value_slices(b, 1, heads))
    x = tiny_inputs()
    torch.testing.assert_close(a(**x).last_hidden_state, b(**x).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a(**x).last_hidden_state, tiny_model(family)(**x).last_hidden_state)


def test_zeroing_neuron_slices_equals_zeroing_down_columns(family):
    a, b = tiny_model(family), tiny_model(family)
    zero_slices(neuron_slices(a, 2, [3, 5, 7]))
    zero_slices([s for s in neuron_slices(b, 2, [3, 5, 7]) if s[0] is block_module(b, 2, "down")])
    x = tiny_inputs()
    torch.testing.assert_close(a(**x).last_hidden_state, b(**x).last_hidden_state, atol=1e-5, rtol=1e-5)


def test_partial_gqa_group_is_refused():
    with pytest.raises(ValueError, match="splits the query group"):
        head_slices(tiny_model("llama"), 0, [0])


def test_out_of_range_indices_are_refused():
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=r"outside \[0, 4\)"):
        head_slices(model, 0, [4])
    with pytest.raises(ValueError, match=r"outside \[0, 32\)"):
        neuron_slices(model, 0, [32])


def test_unsupported_family_error():
    config = transformers.T5Config(d_model=8, num_layers=1, num_heads=2, d_ff=8, d_kv=4, vocab_size=32)
    with pytest.raises(ValueError, match=r"cannot prune or slice: it is not among the supported families \(bart,"):
        get_family(transformers.AutoModel.from_config(config))
