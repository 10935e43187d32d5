"""sentence-transformers: PruningCallback in SentenceTransformerTrainer, students, vocabulary, int8, save/load, pair
evaluation. Tiny BERT + word-level tokenizer built locally, no Hub."""

import pytest
import torch

pytest.importorskip("sentence_transformers")

from datasets import Dataset  # noqa: E402
from sentence_transformers import (  # noqa: E402
    SentenceTransformer,
    SentenceTransformerTrainer,
    SentenceTransformerTrainingArguments,
)
from sentence_transformers.sentence_transformer.losses import CosineSimilarityLoss  # noqa: E402
from sentence_transformers.sentence_transformer.modules import Pooling  # noqa: E402

from hf_compress import PruningCallback, PruningConfig  # noqa: E402
from hf_compress.integrations.sentence_transformers import (  # noqa: E402
    evaluate_mrpc,
    evaluate_pairs,
    load_sentence_transformer,
    make_sentence_student,
    prune_sentence_vocabulary,
    quantize_sentence_transformer,
    read_mrpc,
    save_sentence_transformer,
)
from hf_compress.models.families import ffn_size, get_layers, head_counts  # noqa: E402
from tests.conftest import train_args  # noqa: E402
from tests.tiny_models import VOCAB, tiny_sentence_transformer

TEXTS = [" ".join(f"w{(7 * i + 3 * j) % (VOCAB - 8) + 3}" for j in range(3 + i % 4)) for i in range(24)]


def _embed(model, texts=TEXTS):
    return model.encode(texts, convert_to_tensor=True, batch_size=8)


def _args(tmp_path, max_steps=4, **kwargs):
    return train_args(
        tmp_path / "run", max_steps, SentenceTransformerTrainingArguments, **{"learning_rate": 1e-2, **kwargs}
    )


def _pairs():
    return Dataset.from_dict({"s1": TEXTS[:16], "s2": TEXTS[4:20], "label": [float(i % 2) for i in range(16)]})


def _train_pruned(tmp_path, model, config):
    callback = PruningCallback(config)
    loss = CosineSimilarityLoss(model)
    trainer = SentenceTransformerTrainer(
        model=model, args=_args(tmp_path), train_dataset=_pairs(), loss=loss, callbacks=[callback]
    )
    trainer.train()
    return trainer, callback


def test_pruning_callback_heads_in_sentence_transformer_trainer(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    config = PruningConfig(targets={"heads": 0.5}, schedule="one_shot", start_step=2, scope="local")
    trainer, callback = _train_pruned(tmp_path, model, config)
    assert [head_counts(model, i)[0] for i in range(4)] == [2, 2, 2, 2]
    assert all(len(v) == 2 for v in callback.removed["heads"].values())
    assert isinstance(model[1], Pooling)
    model.eval()
    expected = _embed(model)
    trainer.save_model(str(tmp_path / "pruned"))
    with pytest.raises(RuntimeError, match="mismatch"):  # BERT's config cannot express 2 of 4 heads
        SentenceTransformer(str(tmp_path / "pruned"), device="cpu")
    reloaded = load_sentence_transformer(tmp_path / "pruned", device="cpu")
    assert [head_counts(reloaded, i)[0] for i in range(4)] == [2, 2, 2, 2]
    torch.testing.assert_close(_embed(reloaded), expected)
    assert save_sentence_transformer(reloaded, tmp_path / "again") is False


def test_uniform_pruning_reloads_with_plain_sentence_transformer(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    config = PruningConfig(
        targets={"ffn_neurons": 0.5, "layers": 0.25}, schedule="one_shot", start_step=2, scope="local"
    )
    _train_pruned(tmp_path, model, config)
    assert len(get_layers(model)) == 3
    assert {ffn_size(model, i) for i in range(3)} == {16}
    model.eval()
    assert save_sentence_transformer(model, tmp_path / "pruned") is True
    plain = SentenceTransformer(str(tmp_path / "pruned"), device="cpu")
    torch.testing.assert_close(_embed(plain), _embed(model))
    torch.testing.assert_close(_embed(load_sentence_transformer(tmp_path / "pruned", device="cpu")), _embed(model))


def test_make_sentence_student_keeps_pooling_and_teacher(tmp_path):
    teacher = tiny_sentence_transformer(tmp_path / "base")
    before = _embed(teacher)
    student = make_sentence_student(teacher, num_layers=2)
    assert len(get_layers(student)) == 2 and len(get_layers(teacher)) == 4
    assert student[0].auto_model.config.hf_compress["teacher_layers"] == [0, 3]
    assert isinstance(student[1], Pooling) and student[1] is not teacher[1]
    assert student[0].auto_model is not teacher[0].auto_model
    torch.testing.assert_close(_embed(teacher), before)
    student.save(str(tmp_path / "student"))
    torch.testing.assert_close(_embed(SentenceTransformer(str(tmp_path / "student"), device="cpu")), _embed(student))


def test_prune_sentence_vocabulary_keeps_embeddings_and_reloads(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    before = _embed(model)
    model, report = prune_sentence_vocabulary(model, TEXTS)
    assert report.kept_vocab_size < VOCAB
    assert model[0].auto_model.get_input_embeddings().num_embeddings == report.kept_vocab_size
    assert len(model.tokenizer.get_vocab()) == report.kept_vocab_size
    torch.testing.assert_close(_embed(model), before)
    model.save(str(tmp_path / "small"))
    torch.testing.assert_close(_embed(SentenceTransformer(str(tmp_path / "small"), device="cpu")), before)


def test_quantize_sentence_transformer_round_trip(tmp_path, caplog):
    model = tiny_sentence_transformer(tmp_path / "base")
    before = _embed(model)
    quantize_sentence_transformer(model)
    after = _embed(model)
    assert torch.nn.functional.cosine_similarity(after, before).min() > 0.98
    with caplog.at_level("WARNING", logger="hf_compress.integrations.sentence_transformers"):
        assert save_sentence_transformer(model, tmp_path / "int8") is False
    (warning,) = [r.getMessage() for r in caplog.records if "config cannot express" in r.getMessage()]
    # the top-level call, with the folder: what the user types next
    assert f"load it with `hf_compress.from_pretrained({str(tmp_path / 'int8')!r})` (a SentenceTransformer)" in warning
    assert "load_sentence_transformer" not in warning
    reloaded = load_sentence_transformer(tmp_path / "int8", device="cpu")
    assert type(reloaded[0].auto_model.encoder.layer[0].attention.self.query).__name__ == "Int8Linear"
    torch.testing.assert_close(_embed(reloaded), after)


def test_evaluate_pairs_and_mrpc(tmp_path):
    model = tiny_sentence_transformer(tmp_path / "base")
    metrics = evaluate_pairs(model, TEXTS[:6], TEXTS[:3] + TEXTS[10:13], [1, 1, 1, 0, 0, 0])
    assert metrics["cosine_accuracy"] == pytest.approx(1.0)  # identical pairs have cosine 1
    assert metrics["cosine_ap"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="same non-zero length"):
        evaluate_pairs(model, TEXTS[:2], TEXTS[:1], [0, 1])
    first, second, labels = read_mrpc("test")
    assert len(first) == len(second) == 1725 and sum(labels) == 1147
    assert read_mrpc("train", limit=5)[2] == [1, 0, 1, 0, 1]
    mrpc = evaluate_mrpc(model, limit=16)
    assert 0.0 < mrpc["cosine_ap"] <= 1.0 and (mrpc["cosine_accuracy"] * 16) == pytest.approx(
        round(mrpc["cosine_accuracy"] * 16)
    )


def test_sparsity_reaches_tensorboard_from_sentence_transformer_trainer(tmp_path, monkeypatch):
    accumulator = pytest.importorskip("tensorboard.backend.event_processing.event_accumulator")
    monkeypatch.setenv("TENSORBOARD_LOGGING_DIR", str(tmp_path / "tb"))
    model = tiny_sentence_transformer(tmp_path / "base")
    callback = PruningCallback(PruningConfig(targets={"heads": 0.5}, schedule="one_shot", start_step=2))
    trainer = SentenceTransformerTrainer(
        model=model,
        args=_args(tmp_path, report_to=["tensorboard"]),
        train_dataset=_pairs(),
        loss=CosineSimilarityLoss(model),
        callbacks=[callback],
    )
    trainer.train()
    events = accumulator.EventAccumulator(str(tmp_path / "tb"))
    events.Reload()
    assert [e.value for e in events.Scalars("train/sparsity/heads")][:4] == [0.0, 0.5, 0.5, 0.5]
