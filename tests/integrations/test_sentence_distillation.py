"""EmbeddingDistillationLoss in SentenceTransformerTrainer: online teacher with a projection, precomputed targets after
vocabulary pruning, and the pure loss math."""

import pytest
import torch

pytest.importorskip("sentence_transformers")

from datasets import Dataset  # noqa: E402
from sentence_transformers import SentenceTransformerTrainer  # noqa: E402

from hf_compress.integrations.sentence_distillation import (  # noqa: E402
    EmbeddingDistillationLoss,
    add_teacher_embeddings,
    embedding_distillation_loss,
)
from hf_compress.integrations.sentence_transformers import prune_sentence_vocabulary  # noqa: E402
from tests.integrations.test_sentence_transformers import TEXTS, _args, _embed  # noqa: E402
from tests.tiny_models import tiny_sentence_transformer  # noqa: E402


def test_embedding_distillation_loss_math():
    s, t = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 2.0]])
    assert embedding_distillation_loss(s, t, "mse").item() == pytest.approx(2.5)
    assert embedding_distillation_loss(s, t, "cosine").item() == pytest.approx(1.0)
    assert embedding_distillation_loss(t, 3 * t, "cosine").item() == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="`kind`"):
        embedding_distillation_loss(s, t, "kl")


def _distill(tmp_path, student, loss, dataset, steps=12):
    features = [student.preprocess(TEXTS)]
    labels = torch.tensor(dataset["label"]) if "label" in dataset.column_names else None

    def evaluate():
        with torch.no_grad():
            return loss(features, labels).item()

    start = evaluate()
    SentenceTransformerTrainer(
        model=student, args=_args(tmp_path, max_steps=steps, learning_rate=5e-3), train_dataset=dataset, loss=loss
    ).train()
    student.eval()
    return start, evaluate()


@pytest.mark.parametrize("kind", ["mse", "cosine"])
def test_embedding_distillation_with_projection_decreases(tmp_path, kind):
    teacher = tiny_sentence_transformer(tmp_path / "teacher", seed=1)
    student = tiny_sentence_transformer(tmp_path / "student", seed=2, hidden_size=8, intermediate_size=16)
    loss = EmbeddingDistillationLoss(student, teacher, kind=kind)
    assert loss.projection is not None and loss.projection.weight.shape == (16, 8)
    teacher_weight = teacher[0].auto_model.embeddings.word_embeddings.weight.clone()
    start, end = _distill(tmp_path, student, loss, Dataset.from_dict({"text": TEXTS}))
    assert end < 0.8 * start
    torch.testing.assert_close(teacher[0].auto_model.embeddings.word_embeddings.weight, teacher_weight)
    assert not teacher.training


def test_embedding_distillation_precomputed_after_vocabulary_pruning(tmp_path):
    teacher = tiny_sentence_transformer(tmp_path / "teacher", seed=1)
    student, _ = prune_sentence_vocabulary(tiny_sentence_transformer(tmp_path / "student", seed=2), TEXTS)
    loss = EmbeddingDistillationLoss(student, teacher, kind="mse")
    assert loss.projection is None and not loss.same_tokenizer
    with pytest.raises(ValueError, match="add_teacher_embeddings"):
        loss([student.preprocess(TEXTS[:2])], None)
    dataset = add_teacher_embeddings(Dataset.from_dict({"text": TEXTS}), teacher, "text")
    torch.testing.assert_close(torch.tensor(dataset["label"]), _embed(teacher), atol=1e-5, rtol=1e-5)
    start, end = _distill(tmp_path, student, loss, dataset)
    assert end < 0.8 * start
