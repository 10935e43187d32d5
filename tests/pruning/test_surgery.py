import pytest
import torch
import transformers

from hf_compress.models.families import block_module, get_layers, head_counts, head_slices, neuron_slices
from hf_compress.pruning.surgery import drop_layers, layer_structure, prune_ffn_neurons, prune_heads
from tests.conftest import value_slices, zero_slices
from tests.tiny_models import DECODERS, tiny_inputs, tiny_model

HEADS = {1: [0, 1], 3: [2, 3]}  # whole GQA groups in the Llama family
NEURONS = {0: [1, 2, 3], 2: list(range(0, 32, 3))}
GQA = DECODERS[:4]


def _hidden(model):
    return model(**tiny_inputs()).last_hidden_state


def _removed(slices):
    """Number of parameter entries a list of slices covers."""
    return sum(len(index) * getattr(m, name).numel() // getattr(m, name).shape[dim] for m, name, dim, index in slices)


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def test_prune_heads_equals_zeroed_value_rows(family):
    model, reference = tiny_model(family), tiny_model(family)
    expected_drop = sum(_removed(head_slices(model, layer, heads)) for layer, heads in HEADS.items())
    before = _num_params(model)
    for layer, heads in HEADS.items():
        zero_slices(value_slices(reference, layer, heads))
    assert prune_heads(model, HEADS) is model
    torch.testing.assert_close(_hidden(model), _hidden(reference), atol=1e-5, rtol=1e-5)
    assert before - _num_params(model) == expected_drop > 0
    assert head_counts(model, 1) == ((2, 1) if family in GQA else (2, 2))
    assert head_counts(model, 0) == ((4, 2) if family in GQA else (4, 4))
    assert model.config.hf_compress["layers"][3]["num_heads"] == 2


@pytest.mark.parametrize("family", ["llama", "gpt2", "bert"])
def test_prune_heads_with_eager_attention(family):
    model = tiny_model(family, _attn_implementation="eager")
    reference = tiny_model(family, _attn_implementation="eager")
    for layer, heads in HEADS.items():
        zero_slices(value_slices(reference, layer, heads))
    prune_heads(model, HEADS)
    assert model.config._attn_implementation == "eager"
    torch.testing.assert_close(_hidden(model), _hidden(reference), atol=1e-5, rtol=1e-5)


def test_prune_ffn_neurons_equals_zeroed_down_columns(family):
    model, reference = tiny_model(family), tiny_model(family)
    expected_drop = sum(_removed(neuron_slices(model, layer, neurons)) for layer, neurons in NEURONS.items())
    before = _num_params(model)
    for layer, neurons in NEURONS.items():
        down = block_module(reference, layer, "down")
        zero_slices([s for s in neuron_slices(reference, layer, neurons) if s[0] is down])
    prune_ffn_neurons(model, NEURONS)
    torch.testing.assert_close(_hidden(model), _hidden(reference), atol=1e-5, rtol=1e-5)
    assert before - _num_params(model) == expected_drop > 0
    assert [entry["ffn"] for entry in layer_structure(model)] == [29, 32, 21, 32]


def test_heads_and_ffn_on_wrapped_task_model(family):
    head = "causal_lm" if family in DECODERS else "seq_cls"
    model, reference = tiny_model(family, head), tiny_model(family, head)
    for layer, heads in HEADS.items():
        zero_slices(value_slices(reference, layer, heads))
    prune_heads(model, HEADS)
    x = tiny_inputs()
    torch.testing.assert_close(model(**x).logits, reference(**x).logits, atol=1e-5, rtol=1e-5)
    loss = model(**x, labels=x["input_ids"] if family in DECODERS else torch.tensor([0, 2])).loss
    loss.backward()  # the sliced parameters are trainable leaves
    assert block_module(model, 1, "o").weight.grad.shape == block_module(model, 1, "o").weight.shape


def test_uniform_pruning_updates_expressible_config_fields(family):
    model = tiny_model(family)
    prune_heads(model, {layer: [0, 1] for layer in range(4)})
    prune_ffn_neurons(model, {layer: [0, 5] for layer in range(4)})
    config = model.config
    ffn_field = {"distilbert": "hidden_dim", "gpt2": "n_inner"}.get(family, "intermediate_size")
    assert getattr(config, ffn_field) == 30
    if family in GQA:  # fully expressed by the config: nothing to record
        assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim) == (2, 1, 4)
        assert not hasattr(config, "hf_compress")
    else:  # head width is hidden_size / num_heads: not expressible, so the config keeps the original count
        assert config.num_attention_heads == 4
        assert config.hf_compress["layers"] == [{"num_heads": 2, "num_kv_heads": 2, "head_dim": 4, "ffn": 30}] * 4


def test_structure_is_recorded_only_while_the_config_cannot_express_it():
    model = tiny_model("llama")
    prune_ffn_neurons(model, {0: [1, 2]})
    assert [entry["ffn"] for entry in model.config.hf_compress["layers"]] == [30, 32, 32, 32]
    assert model.config.intermediate_size == 32  # kept at the larger size, so plain loading cannot mis-load
    prune_ffn_neurons(model, {layer: [1, 2] for layer in (1, 2, 3)})
    assert model.config.intermediate_size == 30 and not hasattr(model.config, "hf_compress")


def test_drop_layers_matches_a_fresh_model_of_the_smaller_config(family):
    original = tiny_model(family)
    model = drop_layers(tiny_model(family), [1, 2])
    assert len(get_layers(model)) == 2 and model.config.num_hidden_layers == 2
    fresh = type(model)(model.config).eval()
    fresh.load_state_dict(model.state_dict(), strict=True)
    torch.testing.assert_close(_hidden(model), _hidden(fresh))
    for new, old in ((0, 0), (1, 3)):
        torch.testing.assert_close(block_module(model, new, "up").weight, block_module(original, old, "up").weight)
        for module in get_layers(model)[new].modules():
            if hasattr(module, "layer_idx"):
                assert module.layer_idx == new


def test_drop_layers_updates_layer_types():
    model = tiny_model("qwen2", layer_types=["full_attention", "sliding_attention"] * 2, sliding_window=4)
    drop_layers(model, [0])
    assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]
    assert [layer.self_attn.layer_idx for layer in get_layers(model)] == [0, 1, 2]


@pytest.mark.parametrize("family", ["llama", "qwen3", "gpt2"])
def test_generate_with_cache_after_drop_layers(family):
    model = drop_layers(tiny_model(family, "causal_lm"), [0, 2])
    prompt = tiny_inputs(batch=1, seq=5)
    kw = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    cached = model.generate(**prompt, use_cache=True, **kw)
    uncached = model.generate(**prompt, use_cache=False, **kw)
    assert cached.shape == (1, 13)
    assert torch.equal(cached, uncached)


def test_removing_every_head_of_a_layer_is_refused():
    model = tiny_model("bert")
    before = _hidden(model)
    with pytest.raises(ValueError, match=r"removes all 4 heads of layer 2.*drop_layers\(model, \[2\]\)"):
        prune_heads(model, {0: [1], 2: [0, 1, 2, 3]})
    assert head_counts(model, 0) == (4, 4)  # validated before anything changed
    torch.testing.assert_close(_hidden(model), before)


def test_removing_every_ffn_neuron_is_refused_like_every_head():
    model = tiny_model("bert")
    before = _hidden(model)
    with pytest.raises(ValueError, match=r"`neurons\[1\]` removes all 32 FFN neurons.*drop_layers\(model, \[1\]\)"):
        prune_ffn_neurons(model, {0: [1], 1: list(range(32))})
    assert block_module(model, 0, "down").weight.shape[1] == 32  # validated before anything changed
    torch.testing.assert_close(_hidden(model), before)


def test_partial_gqa_group_is_refused_without_changes():
    model = tiny_model("llama")
    with pytest.raises(ValueError, match="splits the query group"):
        prune_heads(model, {0: [0, 1], 1: [2]})
    assert head_counts(model, 0) == (4, 2)


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda m: prune_heads(m, {4: [0]}), r"`heads` has layer index 4 outside \[0, 4\)"),
        (lambda m: prune_heads(m, [0]), "`heads` must be a dict"),
        (lambda m: prune_heads(m, {0: [7]}), r"outside \[0, 4\)"),
        (lambda m: prune_ffn_neurons(m, {0: [32]}), r"outside \[0, 32\)"),
        (lambda m: drop_layers(m, [0, 1, 2, 3]), "removes all 4 layers"),
        (lambda m: drop_layers(m, [1, 1]), "must not repeat"),
        (lambda m: drop_layers(m, [4]), r"outside \[0, 4\)"),
        (lambda m: drop_layers(m, 1), "must be a list"),
    ],
)
def test_argument_errors(call, match):
    with pytest.raises((ValueError, TypeError), match=match):
        call(tiny_model("bert"))


def test_gpt2_inverse_layer_scaling_refuses_drop():
    with pytest.raises(ValueError, match="scale_attn_by_inverse_layer_idx"):
        drop_layers(tiny_model("gpt2", scale_attn_by_inverse_layer_idx=True), [1])


def test_unsupported_family_error():
    config = transformers.T5Config(d_model=8, num_layers=1, num_heads=2, d_ff=8, d_kv=4, vocab_size=32)
    with pytest.raises(ValueError, match="supported families"):
        prune_heads(transformers.AutoModel.from_config(config), {0: [0]})
