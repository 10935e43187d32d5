import pytest
import torch
import transformers

from hf_compress.pruning.architectures import (
    block_module,
    ffn_size,
    get_family,
    get_layers,
    head_counts,
    head_dim,
    head_slices,
    kv_heads_for,
    neuron_slices,
)
from tests.conftest import DECODERS, tiny_inputs, tiny_model


def _zero(slices):
    with torch.no_grad():
        for module, name, dim, index in slices:
            getattr(module, name).index_fill_(dim, index, 0.0)


def _value_slices(model, layer, heads):
    """Only the value rows (and bias) of the KV heads serving ``heads``: the issue's definition of a pruned head."""
    family = get_family(model)
    dim = head_dim(model, layer)
    kv = kv_heads_for(model, layer, heads)
    index = torch.cat([torch.arange(h * dim, (h + 1) * dim) for h in kv])
    if family.qkv is not None:
        num_q, _ = head_counts(model, layer)
        module, index = block_module(model, layer, "qkv"), index + 2 * num_q * dim
        return [(module, "weight", 1, index), (module, "bias", 0, index)]
    module = block_module(model, layer, "v")
    out = [(module, "weight", 1 if family.conv1d else 0, index)]
    return out + ([(module, "bias", 0, index)] if module.bias is not None else [])


def test_layers_heads_and_ffn_are_found(family):
    model = tiny_model(family)
    assert len(get_layers(model)) == 4
    q, kv = head_counts(model, 0)
    assert q == 4 and kv == (2 if family in DECODERS[:4] else 4)
    assert ffn_size(model, 0) == 32


def test_zeroing_head_slices_equals_zeroing_value_rows(family):
    heads = [0, 1]  # one whole GQA group in the Llama family
    a, b = tiny_model(family), tiny_model(family)
    _zero(head_slices(a, 1, heads))
    _zero(_value_slices(b, 1, heads))
    x = tiny_inputs()
    torch.testing.assert_close(a(**x).last_hidden_state, b(**x).last_hidden_state, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(a(**x).last_hidden_state, tiny_model(family)(**x).last_hidden_state)


def test_zeroing_neuron_slices_equals_zeroing_down_columns(family):
    a, b = tiny_model(family), tiny_model(family)
    _zero(neuron_slices(a, 2, [3, 5, 7]))
    _zero([s for s in neuron_slices(b, 2, [3, 5, 7]) if s[0] is block_module(b, 2, "down")])
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
    with pytest.raises(ValueError, match="supported families: bert"):
        get_family(transformers.AutoModel.from_config(config))
