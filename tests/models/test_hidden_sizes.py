"""The hidden sizes each family's config can save (hf_compress.models.hidden_sizes), checked against transformers."""

import copy

import pytest
import torch
import transformers
from huggingface_hub.errors import StrictDataclassError

from hf_compress.loading import from_pretrained, save_pretrained
from hf_compress.models.hidden_sizes import hidden_multiple, nearest_hidden_sizes
from hf_compress.pruning import prune_heads, prune_hidden
from hf_compress.pruning.hidden import first_output
from tests.tiny_models import EVERY_DECODER, EVERY_ENCODER, family_inputs, lm_head, tiny_model

# every family prune_hidden slices (OLMo-2 is refused: `hidden_refused` in hf_compress/models/table.py)
HIDDEN_FAMILIES = [f for f in EVERY_ENCODER + EVERY_DECODER if f != "olmo2"]
VALIDATING = {"llama", "gemma2", "gemma3_text"}  # configs whose validation checks hidden_size % num_attention_heads


@pytest.mark.parametrize("family", HIDDEN_FAMILIES)
def test_the_rule_matches_what_each_family_saves_and_reloads(family, tmp_path):
    model = tiny_model(family, lm_head(family))
    multiple = hidden_multiple(model)
    assert multiple == (4 if family in VALIDATING else 1)
    odd = copy.deepcopy(model.config)
    odd.hidden_size = 13
    if multiple == 1:
        odd.validate()  # transformers accepts 13 channels of 4 heads
        channels = [1, 5, 9]
    else:
        with pytest.raises(StrictDataclassError, match="not a multiple of the number of attention heads"):
            odd.validate()
        with pytest.raises(ValueError, match="keeping 13, which .* refuses to save .*keeping 12"):
            prune_hidden(model, [1, 5, 9])
        assert model.config.hidden_size == 16 and model.get_input_embeddings().weight.shape[1] == 16  # untouched
        channels = [1, 5, 9, 13]
    prune_hidden(model, channels)
    inputs = family_inputs(family)
    expected = first_output(model, inputs)
    save_pretrained(model, tmp_path)
    reloaded = from_pretrained(tmp_path)
    assert reloaded.config.hidden_size == 16 - len(channels)
    torch.testing.assert_close(first_output(reloaded, inputs), expected, rtol=0, atol=1e-6)


def test_the_rule_follows_the_head_count_uniform_head_pruning_writes(tmp_path):
    model = tiny_model("llama", "causal_lm")
    assert hidden_multiple(model.config, num_heads=2) == 2
    prune_heads(model, {layer: [0, 1] for layer in range(4)})  # one KV group of two query heads in every layer
    assert model.config.num_attention_heads == 2 and hidden_multiple(model) == 2
    prune_hidden(model, [3, 8])  # 14 = 7 x 2 heads: refused before the head pruning, fine after it
    expected = first_output(model, family_inputs("llama"))
    model.save_pretrained(tmp_path)
    reloaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path).eval()
    assert reloaded.config.hidden_size == 14
    torch.testing.assert_close(first_output(reloaded, family_inputs("llama")), expected, rtol=0, atol=1e-6)


def test_refusal_names_parameter_value_kept_size_and_nearest_valid_sizes():
    model = tiny_model("llama")
    with pytest.raises(ValueError) as error:
        prune_hidden(model, [0, 1, 2, 3, 4, 5])
    assert str(error.value) == (
        "`channels` removes 6 of 16 hidden channels, keeping 10, which LlamaConfig refuses to save (hidden_size must "
        "be a multiple of num_attention_heads = 4); remove 8 or 4 channels instead (keeping 8 or 12)."
    )
    with pytest.raises(ValueError, match=r"keeping 2, .*remove 12 channels instead \(keeping 4\)\.$"):
        prune_hidden(model, list(range(14)))
    assert model.config.hidden_size == 16
    assert nearest_hidden_sizes(15, 4, 16) == [12] and nearest_hidden_sizes(12, 4, 16) == [12]
