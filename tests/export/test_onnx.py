"""ONNX export of per-layer and vocabulary-pruned folders: files, graph I/O, ONNX Runtime vs PyTorch, refusals."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

pytest.importorskip("onnxruntime", reason='needs the ONNX extra: pip install "hf-compress[onnx]"')
pytest.importorskip("onnx", reason='needs the ONNX extra: pip install "hf-compress[onnx]"')

from hf_compress.export import export_onnx, float_source, onnx_session, run_onnx  # noqa: E402
from hf_compress.export.runtime import require  # noqa: E402
from hf_compress.loading import from_pretrained  # noqa: E402
from hf_compress.quantization.quantize import quantize_int8  # noqa: E402
from hf_compress.vocabulary.prune import prune_vocabulary  # noqa: E402
from tests.export.conftest import SENTENCES, save_folder, tiny_classifier  # noqa: E402
from tests.tiny_models import FAMILIES, VOCAB, tiny_model, tiny_tokenizer  # noqa: E402


def random_rows(batch: int = 32, seq: int = 12, vocab: int = VOCAB, seed: int = 3) -> dict[str, torch.Tensor]:
    """Random ids (no specials) with a ragged attention mask: every row keeps a different number of tokens."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    mask = (torch.arange(seq)[None] < torch.randint(2, seq + 1, (batch, 1), generator=g)).long()
    return {"input_ids": ids, "attention_mask": mask, "token_type_ids": torch.zeros_like(ids)}


def pytorch_logits(folder: Path, inputs: dict[str, torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return from_pretrained(folder)(**inputs).logits.numpy()


def test_per_layer_pruned_round_trip(pruned_folder):
    result = export_onnx(pruned_folder)

    onnx_dir = pruned_folder / "onnx"
    assert sorted(p.name for p in onnx_dir.iterdir()) == ["model.onnx", "model_quantized.onnx"]
    assert {"config.json", "tokenizer.json", "tokenizer_config.json"} <= {p.name for p in pruned_folder.iterdir()}
    assert result.model == str(onnx_dir / "model.onnx") and result.inputs == [
        "input_ids",
        "attention_mask",
        "token_type_ids",
    ]
    assert result.max_abs_diff < 1e-4

    session = onnx_session(result.model)
    assert [i.name for i in session.get_inputs()] == result.inputs
    assert [o.name for o in session.get_outputs()] == ["logits"]
    assert all(isinstance(dim, str) for i in session.get_inputs() for dim in i.shape)  # dynamic batch and sequence
    inputs = random_rows()  # 32 rows of 12 tokens: not the traced shape
    reference = pytorch_logits(pruned_folder, inputs)
    np.testing.assert_allclose(run_onnx(session, inputs), reference, atol=1e-4, rtol=1e-3)

    quantized = run_onnx(onnx_session(result.quantized), inputs)
    assert Path(result.quantized).stat().st_size < 0.6 * Path(result.model).stat().st_size
    assert (quantized.argmax(-1) == reference.argmax(-1)).mean() >= 0.8
    assert np.abs(quantized - reference).max() < 0.1


def test_pruned_structure_is_exported_not_the_config_sizes(pruned_folder):
    config = json.loads((pruned_folder / "config.json").read_text())
    assert [layer["num_heads"] for layer in config["hf_compress"]["layers"]] == [3, 2, 4, 1]
    dense = tiny_classifier()
    save_folder(dense, tiny_tokenizer(), pruned_folder.parent / "dense")
    pruned = export_onnx(pruned_folder, quantize=False)
    full = export_onnx(pruned_folder.parent / "dense", quantize=False)
    assert pruned.quantized is None
    assert pruned.model_bytes < full.model_bytes  # 6 of 16 heads' q/k/v/o weights are gone from the graph


def test_vocabulary_pruned_round_trip(tmp_path, tokenizer):
    model, small_tokenizer, report = prune_vocabulary(tiny_classifier(seed=1), tokenizer, list(SENTENCES))
    assert report.kept_vocab_size < VOCAB
    folder = save_folder(model, small_tokenizer, tmp_path / "vocab")

    result = export_onnx(folder, tmp_path / "repo", check_texts=(*SENTENCES, "worse framework"))

    repo = tmp_path / "repo"
    assert json.loads((repo / "config.json").read_text())["vocab_size"] == report.kept_vocab_size
    assert (repo / "tokenizer.json").is_file() and not (repo / "model.safetensors").exists()
    inputs = {k: torch.as_tensor(v) for k, v in small_tokenizer(list(SENTENCES), padding=True).items()}
    np.testing.assert_allclose(
        run_onnx(onnx_session(result.model), inputs), pytorch_logits(folder, inputs), atol=1e-4, rtol=1e-3
    )
    assert result.quantized_argmax_agreement is not None and result.quantized_max_abs_diff < 0.1


def test_causal_lm_logits(tmp_path):
    model = tiny_model("llama", "causal_lm")
    folder = tmp_path / "llama"
    save_folder(model, tiny_tokenizer(), folder)

    result = export_onnx(folder, quantize=False, check_texts=("w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10"))

    assert result.inputs == ["input_ids", "attention_mask"] and result.output_name == "logits"
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    logits = run_onnx(onnx_session(result.model), {"input_ids": ids, "attention_mask": torch.ones_like(ids)})
    assert logits.shape == (1, 5, VOCAB)
    with torch.no_grad():
        np.testing.assert_allclose(logits, model(input_ids=ids).logits.numpy(), atol=1e-4, rtol=1e-3)


def test_int8_folder_is_refused_and_points_to_its_float_stage(tmp_path, tokenizer):
    run = tmp_path / "run"
    stages = [{"name": "teacher", "type": "finetune_teacher"}, {"name": "pruned", "type": "prune"}]
    stages += [{"name": "int8", "type": "quantize"}, {"name": "card", "type": "card"}]
    run.mkdir()
    (run / "recipe.yaml").write_text(yaml.safe_dump({"name": "x", "stages": stages}))
    quantize_int8(tiny_classifier()).save_pretrained(run / "int8")

    with pytest.raises(ValueError, match=r"hf_compress int8 folder .*hf_compress_quantization.*pruned"):
        export_onnx(run / "int8")
    assert float_source(run / "int8") == str(run / "pruned")
    assert not (run / "int8" / "onnx").exists()

    tiny_classifier().save_pretrained(tmp_path / "gptq")
    config = json.loads((tmp_path / "gptq" / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (tmp_path / "gptq" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="holds a 'gptq'-quantised model"):
        export_onnx(tmp_path / "gptq")

    quantize_int8(tiny_classifier()).save_pretrained(tmp_path / "alone")
    with pytest.raises(ValueError, match="export the float folder it was quantised from"):
        export_onnx(tmp_path / "alone")


def test_check_names_the_max_difference(pruned_folder, monkeypatch):
    def off_by_one(session, inputs):
        return run_onnx(session, inputs) + 1.0

    monkeypatch.setattr("hf_compress.export.onnx.run_onnx", off_by_one)
    with pytest.raises(ValueError, match=r"differs from PyTorch by up to 1 \(`atol`=0.0001, `rtol`=0.001\)"):
        export_onnx(pruned_folder, quantize=False)


def test_bad_folder_is_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"^`folder` must be a model folder with a config.json, got '.*nope'"):
        export_onnx(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="`folder` must be a model folder"):
        export_onnx(tmp_path / "empty")


def test_folder_without_tokenizer_and_bad_check_texts(tmp_path, pruned_folder):
    tiny_classifier().save_pretrained(tmp_path / "no-tokenizer")
    with pytest.raises(ValueError, match="has no loadable tokenizer"):
        export_onnx(tmp_path / "no-tokenizer")
    with pytest.raises(ValueError, match="`check_texts` must hold at least two"):
        export_onnx(pruned_folder, check_texts=("only one",))


def test_missing_optional_dependency_names_the_extra():
    with pytest.raises(ImportError, match=r'`not_a_module_hf_compress`.*pip install "hf-compress\[onnx\]"'):
        require("not_a_module_hf_compress")


WORDS = ("w1 w2 w3", "w4 w5", "w6 w7 w8 w9 w10 w11")
# AutoTokenizer loads a Qwen2/3 folder's tokenizer.json as byte-level BPE, which drops the word-level test vocabulary
WORD_LEVEL_FAMILIES = [f for f in FAMILIES if not f.startswith("qwen")]


@pytest.mark.parametrize("family", WORD_LEVEL_FAMILIES)
def test_every_family_exports_within_tolerance(tmp_path, family):
    model = tiny_model(family, "seq_cls")
    folder = save_folder(model, tiny_tokenizer(), tmp_path / family)

    result = export_onnx(folder, quantize=False, check_texts=WORDS)

    assert result.max_abs_diff < 1e-4  # padded rows of another shape than the traced one
    segments = getattr(model.config, "type_vocab_size", 1) > 1
    assert ("token_type_ids" in result.inputs) == (segments and family != "distilbert")


def test_tokenizer_without_tokens_for_the_check_texts(tmp_path):
    folder = save_folder(tiny_model("qwen2", "seq_cls"), tiny_tokenizer(), tmp_path / "qwen2")
    with pytest.raises(ValueError, match="gives no tokens for `check_texts`"):
        export_onnx(folder, quantize=False, check_texts=WORDS)
