import json

import pytest
import torch
from safetensors.torch import load_file, save_file

import hf_compress
import hf_compress.loading as loading
from hf_compress.models.families import head_counts
from hf_compress.pruning.hidden import prune_hidden
from hf_compress.pruning.surgery import drop_layers, layer_structure, prune_ffn_neurons, prune_heads
from hf_compress.quantization.quantize import Int8Linear, quantize_model
from hf_compress.reporting.cards import load_code
from hf_compress.reporting.measure import model_size_bytes
from tests.tiny_models import DECODERS, FAMILIES, HEADS, tiny_inputs, tiny_model

GQA = DECODERS[:4]
UNIFORM_HEADS = {layer: [0, 1] for layer in range(4)}


def _head(family):
    """A task head with tied weights where the family has them (MLM decoders, GPT-2 LM head)."""
    return "causal_lm" if family in DECODERS else "masked_lm"


def _logits(model):
    return model(**tiny_inputs()).logits


def _plain_load(family, path):
    return HEADS[_head(family)].from_pretrained(path)


def _assert_same(a, b):
    assert type(a) is type(b)
    assert sorted(a.state_dict()) == sorted(b.state_dict())
    torch.testing.assert_close(_logits(a), _logits(b), atol=0, rtol=0)


@pytest.mark.parametrize("surgery", ["ffn", "layers"])
def test_uniform_ffn_and_layer_surgery_reload_with_plain_transformers(family, surgery, tmp_path):
    model = tiny_model(family, _head(family))
    if surgery == "ffn":
        prune_ffn_neurons(model, {layer: list(range(0, 32, 4)) for layer in range(4)})
    else:
        drop_layers(model, [0, 2])
    loading.save_pretrained(model, tmp_path)
    assert "hf_compress" not in json.loads((tmp_path / "config.json").read_text())
    _assert_same(model, _plain_load(family, tmp_path))
    _assert_same(model, loading.from_pretrained(tmp_path))


@pytest.mark.parametrize("family", GQA)
def test_uniform_llama_family_heads_reload_with_plain_transformers(family, tmp_path):
    model = prune_heads(tiny_model(family, "causal_lm"), UNIFORM_HEADS)
    model.save_pretrained(tmp_path)
    reloaded = _plain_load(family, tmp_path)
    assert head_counts(reloaded, 3) == (2, 1)
    _assert_same(model, reloaded)


def test_non_expressible_structure_reloads_with_hf_compress(family, tmp_path):
    model = tiny_model(family, _head(family))
    prune_heads(model, {0: [2, 3], 2: [0, 1]})
    prune_ffn_neurons(model, {1: [0, 1, 2], 3: list(range(10))})
    drop_layers(model, [1])
    loading.save_pretrained(model, tmp_path)
    reloaded = loading.from_pretrained(tmp_path)
    _assert_same(model, reloaded)
    assert reloaded.config.hf_compress["layers"] == model.config.hf_compress["layers"]
    assert not reloaded.training


def test_bert_like_uniform_heads_reload_with_hf_compress(family, tmp_path):
    model = prune_heads(tiny_model(family, _head(family)), UNIFORM_HEADS)
    model.save_pretrained(tmp_path)
    _assert_same(model, loading.from_pretrained(tmp_path))


@pytest.mark.parametrize("task", ["lm", "seq_cls"])
def test_per_layer_heads_with_hidden_channels_removed_reload_with_hf_compress(family, task, tmp_path):
    """Different head counts per layer and 4 of 16 hidden channels gone: no config field can say it (BERT-like head
    width is hidden_size / num_heads; Llama-like head counts are global), so only hf_compress.from_pretrained loads."""
    model = tiny_model(family, _head(family) if task == "lm" else task)
    heads = {0: [0, 1], 2: [2, 3]} if family in GQA else {0: [0], 1: [1, 2], 3: [0, 1, 3]}
    prune_heads(model, heads)
    prune_hidden(model, [1, 5, 9, 13])
    hf_compress.save_pretrained(model, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    assert loading.needs_loader(config) and "hf_compress.from_pretrained" in load_code("me/pruned", config)
    assert [entry["num_heads"] for entry in config["hf_compress"]["layers"]] == (
        [2, 4, 2, 4] if family in GQA else [3, 2, 4, 1]
    )
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        type(model).from_pretrained(tmp_path)
    reloaded = hf_compress.from_pretrained(tmp_path)
    assert reloaded.config.hidden_size == 12 and layer_structure(reloaded) == layer_structure(model)
    _assert_same(model, reloaded)


NON_EXPRESSIBLE = [(f, s) for f in FAMILIES for s in ("one_layer_heads", "one_layer_ffn")]
NON_EXPRESSIBLE += [(f, "uniform_heads") for f in FAMILIES if f not in GQA]  # head width = hidden / heads


@pytest.mark.parametrize(("family", "surgery"), NON_EXPRESSIBLE)
def test_plain_transformers_refuses_non_expressible_folders(family, surgery, tmp_path):
    model = tiny_model(family, _head(family))
    if surgery == "uniform_heads":
        prune_heads(model, UNIFORM_HEADS)
    elif surgery == "one_layer_heads":
        prune_heads(model, {2: [2, 3]})
    else:
        prune_ffn_neurons(model, {0: [4]})
    model.save_pretrained(tmp_path)
    with pytest.raises(RuntimeError, match="ignore_mismatched_sizes"):
        _plain_load(family, tmp_path)


def test_unstructured_pruning_delegates_to_transformers(tmp_path):
    model = tiny_model("llama", "causal_lm")
    with torch.no_grad():
        model.model.layers[0].mlp.up_proj.weight[:, ::2] = 0.0  # masks only: shapes unchanged
    model.save_pretrained(tmp_path)
    assert "hf_compress" not in json.loads((tmp_path / "config.json").read_text())
    _assert_same(model, loading.from_pretrained(tmp_path))


def test_sharded_checkpoint_loads(tmp_path):
    model = prune_heads(tiny_model("bert", "seq_cls"), {1: [3]})
    model.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    _assert_same(model, loading.from_pretrained(tmp_path))


def test_missing_tensor_is_an_error_not_a_random_init(tmp_path):
    model = prune_heads(tiny_model("gpt2"), {1: [0]})
    model.save_pretrained(tmp_path)
    state = load_file(tmp_path / "model.safetensors")
    del state["h.3.mlp.c_fc.bias"]
    save_file(state, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"missing \['h.3.mlp.c_fc.bias'\]"):
        loading.from_pretrained(tmp_path)


def test_hand_edited_structure_is_an_error(tmp_path):
    model = prune_heads(tiny_model("bert"), {1: [3]})
    model.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["hf_compress"]["layers"][0]["ffn"] = 64
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="cannot be cut from"):
        loading.from_pretrained(tmp_path)


def test_unknown_kwargs_and_dtype(tmp_path):
    model = prune_heads(tiny_model("bert"), {1: [3]})
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="device_map"):
        loading.from_pretrained(tmp_path, device_map="cpu")
    half = loading.from_pretrained(tmp_path, dtype=torch.bfloat16)
    assert half.encoder.layer[1].attention.self.query.weight.dtype == torch.bfloat16
    assert half.encoder.layer[1].attention.self.query.weight.shape == (12, 16)


def test_unknown_architecture_is_an_error(tmp_path):
    prune_heads(tiny_model("bert"), {1: [3]}).save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["MyBertModel"]
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="'MyBertModel'.*trust_remote_code=True"):
        loading.from_pretrained(tmp_path)


def _quantized_folder(tmp_path, pruned: bool = False):
    model = tiny_model("bert", "seq_cls")
    if pruned:
        prune_heads(model, {0: [1, 2]})
    model = quantize_model(model, embedding_bits=4)
    loading.save_pretrained(model, tmp_path)
    return model


@pytest.mark.parametrize("pruned", [False, True])
def test_from_pretrained_rebuilds_quantised_and_pruned_quantised_folders(tmp_path, pruned):
    model = _quantized_folder(tmp_path, pruned)
    reloaded = loading.from_pretrained(tmp_path)
    assert isinstance(reloaded.bert.encoder.layer[0].attention.self.query, Int8Linear) and not reloaded.training
    assert head_counts(reloaded, 0) == head_counts(model, 0) == ((2, 2) if pruned else (4, 4))
    torch.testing.assert_close(_logits(reloaded), _logits(model), atol=0, rtol=0)
    assert model_size_bytes(reloaded) == model_size_bytes(model)


def test_load_quantized_is_a_deprecated_alias_that_downloads_hub_repo_ids(tmp_path, monkeypatch):
    model = _quantized_folder(tmp_path)
    calls = []

    def fake_snapshot_download(repo_id, **kwargs):
        calls.append((repo_id, kwargs))
        return str(tmp_path)

    monkeypatch.setattr(loading, "snapshot_download", fake_snapshot_download)
    with pytest.warns(DeprecationWarning, match="use `hf_compress.from_pretrained`"):
        reloaded = loading.load_quantized("me/tiny-int8", revision="v1", compute="weight_only")
    assert calls == [("me/tiny-int8", {"revision": "v1"})]
    assert reloaded.bert.encoder.layer[0].output.dense.compute == "weight_only"
    with pytest.warns(DeprecationWarning):
        filled = loading.load_quantized(tmp_path, model=tiny_model("bert", "seq_cls", seed=3))
    torch.testing.assert_close(_logits(filled), _logits(model), atol=0, rtol=0)
    assert loading.local_folder(tmp_path) == str(tmp_path) and calls == [("me/tiny-int8", {"revision": "v1"})]


def test_load_quantized_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="must be an existing model folder"):
        loading.load_quantized(tmp_path / "missing")
    with pytest.raises(FileNotFoundError, match="has no config.json"):
        loading.load_quantized(tmp_path)
    tiny_model("bert").save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="holds no `hf_compress_quantization` record"):
        loading.load_quantized(tmp_path)
    with pytest.raises(ValueError, match="holds no `hf_compress_quantization` record"):
        loading.load_quantized_weights(tiny_model("bert"), tmp_path)
