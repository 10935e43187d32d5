"""Model types missing from the family table: discovered from common layouts, verified, or refused by name."""

import pytest
import torch
import transformers
from torch import nn

from hf_compress.loading import from_pretrained, save_pretrained
from hf_compress.models.discovery import DISCOVERED
from hf_compress.models.families import block_module, get_family, head_counts, head_dim
from hf_compress.pruning.surgery import drop_layers, prune_ffn_neurons, prune_heads
from tests.conftest import zero_slices
from tests.tiny_models import VOCAB, tiny_inputs

COMMON = dict(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=3, num_attention_heads=4, pad_token_id=0)
UNLISTED = {
    "opt": lambda: transformers.OPTConfig(**COMMON, ffn_dim=32, word_embed_proj_dim=16, dropout=0.0),
    "stablelm": lambda: transformers.StableLmConfig(**COMMON, num_key_value_heads=2, intermediate_size=32),
    "starcoder2": lambda: transformers.Starcoder2Config(**COMMON, num_key_value_heads=2, intermediate_size=32),
}


def _model(name):
    torch.manual_seed(0)
    return transformers.AutoModelForCausalLM.from_config(UNLISTED[name]()).eval()


def _logits(model):
    with torch.no_grad():
        return model(**tiny_inputs()).logits


@pytest.mark.parametrize("name", list(UNLISTED))
def test_unlisted_layouts_are_discovered_and_pruned_exactly(name, tmp_path):
    model, reference = _model(name), _model(name)
    family = get_family(model)
    assert name in DISCOVERED and family.o is not None and family.down is not None
    dim = head_dim(model, 1)
    zero_slices([(block_module(reference, 1, "o"), "weight", 1, torch.arange(2 * dim))])  # heads 0, 1
    zero_slices([(block_module(reference, 2, "down"), "weight", 1, torch.arange(5))])
    prune_heads(model, {1: [0, 1]})
    prune_ffn_neurons(model, {2: list(range(5))})
    torch.testing.assert_close(_logits(model), _logits(reference), atol=1e-5, rtol=1e-5)
    assert head_counts(model, 1)[0] == 2
    drop_layers(model, [0])
    save_pretrained(model, tmp_path)
    torch.testing.assert_close(_logits(from_pretrained(tmp_path)), _logits(model), atol=0, rtol=0)


def test_unknown_layout_error_names_what_was_not_found():
    config = transformers.GPTNeoXConfig(**COMMON, intermediate_size=32)  # fused query_key_value, per-head interleaved
    with pytest.raises(ValueError, match=r"not among the supported families \(bart, bert.*no attention module"):
        get_family(transformers.AutoModelForCausalLM.from_config(config))


class _Block(nn.Module):
    """A block whose attention reads its head count from elsewhere: removing a head must fail verification."""

    def __init__(self):
        super().__init__()
        self.attn = nn.Module()
        self.attn.head_dim = 4
        for name in ("q_proj", "k_proj", "v_proj", "o_proj"):
            setattr(self.attn, name, nn.Linear(16, 16))
        self.mlp = nn.Module()
        self.mlp.up_proj, self.mlp.down_proj = nn.Linear(16, 32), nn.Linear(32, 16)

    def forward(self, x):
        a = self.attn
        q, k, v = (p(x).view(*x.shape[:2], 4, -1).transpose(1, 2) for p in (a.q_proj, a.k_proj, a.v_proj))
        out = nn.functional.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(*x.shape[:2], 16)
        x = x + a.o_proj(out)
        return x + self.mlp.down_proj(torch.relu(self.mlp.up_proj(x)))


class _Tiny(transformers.PreTrainedModel):
    config_class = transformers.PretrainedConfig
    base_model_prefix = "backbone"

    def __init__(self, config):
        super().__init__(config)
        self.embed = nn.Embedding(VOCAB, 16)
        self.layers = nn.ModuleList([_Block(), _Block()])

    def forward(self, input_ids):
        x = self.embed(input_ids)
        for block in self.layers:
            x = block(x)
        return (x,)


def test_a_layout_that_fails_verification_is_refused():
    config = transformers.PretrainedConfig(vocab_size=VOCAB, intermediate_size=32)
    config.model_type = "made_up_with_fixed_heads"
    with pytest.raises(ValueError, match="whose head removal does not equal zeroing the head"):
        get_family(_Tiny(config))
