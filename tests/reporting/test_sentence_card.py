"""Cards of SentenceTransformer results: sentence-transformers metadata, loading code that runs, pair metrics in the
table; from a saved folder (`write_card`) and from a `SentenceTransformerTrainer` run (`write_trainer_card`)."""

import re

import pytest
import torch

pytest.importorskip("sentence_transformers")

from datasets import Dataset  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.evaluation import BinaryClassificationEvaluator  # noqa: E402
from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss  # noqa: E402

import hf_compress  # noqa: E402
from hf_compress import PruningCallback, PruningConfig  # noqa: E402
from hf_compress.reporting.card_callback import model_card_callback, write_trainer_card  # noqa: E402
from hf_compress.reporting.cards import render_card, write_card  # noqa: E402
from hf_compress.reporting.measure import model_report  # noqa: E402
from hf_compress.reporting.sentence_card import sentence_load_code, sentence_metrics  # noqa: E402
from tests.conftest import train_args  # noqa: E402
from tests.tiny_models import VOCAB, tiny_sentence_transformer

TEXTS = [" ".join(f"w{(7 * i + 3 * j) % (VOCAB - 8) + 3}" for j in range(3 + i % 4)) for i in range(24)]
PAIR_METRICS = {"cosine_accuracy": 0.75, "cosine_ap": 0.8, "cosine_f1": 0.7}


def _python_block(card) -> str:
    return re.search(r"## How to load\n\n```python\n(.*?)```", str(card), re.S).group(1)


def _st_report(model, folder):
    return {**model_report(model[0].auto_model, folder, batch_sizes=()), "metrics": dict(PAIR_METRICS)}


def _assert_sentence_metadata(card):
    assert card.data.library_name == "sentence-transformers"
    assert card.data.pipeline_tag == "sentence-similarity"
    assert {"sentence-transformers", "feature-extraction", "hf-compress"} <= set(card.data.tags)


def test_sentence_metrics_keep_pair_quality_and_loss_only():
    logged = {
        "eval_pairs_cosine_accuracy": 0.7,
        "eval_pairs_cosine_accuracy_threshold": 0.9,
        "eval_pairs_cosine_f1": 0.6,
        "eval_pairs_cosine_f1_threshold": 0.8,
        "eval_pairs_cosine_precision": 0.5,
        "eval_pairs_cosine_recall": 0.8,
        "eval_pairs_cosine_ap": 0.65,
        "eval_pairs_cosine_mcc": 0.2,
        "eval_loss": 0.3,
    }
    assert sentence_metrics(logged) == {
        "pairs_cosine_accuracy": 0.7,
        "pairs_cosine_f1": 0.6,
        "pairs_cosine_ap": 0.65,
        "loss": 0.3,
    }
    assert sentence_metrics(PAIR_METRICS) == PAIR_METRICS and sentence_metrics(None) == {}


def test_sentence_load_code_plain_hf_compress_and_onnx():
    plain = sentence_load_code("me/st", plain=True)
    assert 'SentenceTransformer("me/st")' in plain and "hf_compress" not in plain
    compressed = sentence_load_code("me/st", plain=False)
    assert 'hf_compress.from_pretrained("me/st")' in compressed and "SentenceTransformer(" not in compressed
    onnx = sentence_load_code("me/st", plain=False, onnx=True)
    assert onnx.startswith(compressed)
    assert (
        'SentenceTransformer("me/st", backend="onnx", model_kwargs={"file_name": "onnx/model_quantized.onnx"})' in onnx
    )


def test_card_of_a_plain_sentence_transformer_folder_loads_with_sentence_transformers(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    folder = tmp_path / "st"
    hf_compress.save_pretrained(model, folder)
    card = write_card(
        folder,
        base_model="sentence-transformers/all-MiniLM-L6-v2",
        datasets=["mrpc"],
        report=_st_report(model, folder),
        repo_id=str(folder),
    )
    _assert_sentence_metadata(card)
    assert "SentenceTransformer` around a `BertModel`" in card.text
    # the table and the model-index carry the pair metrics, as classification cards carry accuracy
    header = next(line for line in card.text.splitlines() if line.startswith("| model |"))
    assert all(f"| {name} |" in header or f"| {name}" in header for name in PAIR_METRICS)
    results = card.data.eval_results
    assert {r.metric_type for r in results} == set(PAIR_METRICS)
    assert {r.task_type for r in results} == {"sentence-similarity"}
    # the card's code runs and gives the saved model's embeddings
    code = _python_block(card)
    assert f'SentenceTransformer("{folder}")' in code and "hf_compress" not in code
    scope = {}
    exec(code, scope)
    assert isinstance(scope["model"], SentenceTransformer) and scope["similarities"].shape == (2, 2)
    torch.testing.assert_close(
        torch.as_tensor(scope["model"].encode(TEXTS[:4])), torch.as_tensor(model.encode(TEXTS[:4]))
    )
    assert (folder / "README.md").read_text() == str(card)


def test_card_of_an_int8_sentence_transformer_folder_uses_hf_compress_from_pretrained(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    hf_compress.quantize_model(model)
    folder = tmp_path / "int8"
    hf_compress.save_pretrained(model, folder)
    (folder / "onnx").mkdir()
    (folder / "onnx" / "model.onnx").write_bytes(b"")  # the layout of an `hf-compress export` folder
    card = write_card(folder, report=_st_report(model, folder), repo_id=str(folder))
    _assert_sentence_metadata(card)
    assert "quantization" in card.data.tags
    code = _python_block(card)
    assert f'hf_compress.from_pretrained("{folder}")' in code
    assert 'backend="onnx"' in code  # the ONNX snippet of an exported folder
    plain_part = code.split("\n\n# ONNX Runtime")[0]
    scope = {}
    exec(plain_part, scope)
    loaded = scope["model"]
    assert isinstance(loaded, SentenceTransformer)
    assert type(loaded[0].auto_model.encoder.layer[0].attention.self.query).__name__ == "Int8Linear"
    torch.testing.assert_close(torch.as_tensor(loaded.encode(TEXTS[:4])), torch.as_tensor(model.encode(TEXTS[:4])))


def test_transformers_cards_keep_transformers_metadata(tmp_path):
    card = render_card("plain", config={"architectures": ["BertForSequenceClassification"]})
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-classification"
    assert "sentence-transformers" not in card.data.tags and "SentenceTransformer" not in card.text


def test_sentence_transformer_trainer_card_has_pair_metrics(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    pairs = Dataset.from_dict({"s1": TEXTS[:16], "s2": TEXTS[4:20], "label": [float(i % 2) for i in range(16)]})
    evaluator = BinaryClassificationEvaluator(
        TEXTS[:8], TEXTS[:4] + TEXTS[12:16], [1, 1, 1, 1, 0, 0, 0, 0], name="pairs", similarity_fn_names=["cosine"]
    )
    args = train_args(tmp_path / "run", 4, SentenceTransformerTrainingArguments, eval_strategy="steps", eval_steps=4)
    pruning = PruningCallback(PruningConfig(targets={"heads": 0.5}, schedule="one_shot", start_step=2, scope="local"))
    trainer = SentenceTransformerTrainer(
        model=model,
        args=args,
        train_dataset=pairs,
        eval_dataset=pairs,
        loss=CosineSimilarityLoss(model),
        evaluator=evaluator,
        callbacks=[pruning],
    )
    model_card_callback(trainer, datasets=["pairs"])
    trainer.train()
    trainer.save_model(str(tmp_path / "final"))
    card = write_trainer_card(trainer, tmp_path / "final")
    _assert_sentence_metadata(card)
    assert "pruning" in card.data.tags
    header = next(line for line in card.text.splitlines() if line.startswith("| model |"))
    for name in ("pairs_cosine_accuracy", "pairs_cosine_ap", "pairs_cosine_f1"):
        assert f"| {name} |" in header
    assert "threshold" not in header and "mcc" not in header
    # 2 of 4 heads per layer: BERT's config cannot say so, the card points to hf_compress's loader, which works
    code = _python_block(card)
    assert 'hf_compress.from_pretrained("run")' in code  # the run's name (output_dir), as for every trainer card
    reloaded = hf_compress.from_pretrained(tmp_path / "final", device="cpu")
    assert isinstance(reloaded, SentenceTransformer)
    # measured: the transformer inside the SentenceTransformer, before (reference row) and after the run
    assert "(before this run)" in card.text
