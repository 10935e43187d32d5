"""Tests of hf_compress.distillation.logit_terms: a head's targets and its soft + hard logit terms (no Trainer)."""

import pytest
import torch

from hf_compress.distillation.logit_terms import logit_terms, model_output, pop_targets
from hf_compress.distillation.losses import distillation_loss, soft_loss

OPTIONS = {"temperature": 2.0, "distillation_loss": "kl", "jsd_beta": 0.5, "loss_chunk_size": 4}


def test_qa_averages_start_and_end_and_ignores_out_of_span_positions():
    g = torch.Generator().manual_seed(0)
    student = {k: torch.randn(2, 5, generator=g) for k in ("start_logits", "end_logits")}
    teacher = {k: torch.randn(2, 5, generator=g) for k in ("start_logits", "end_logits")}
    inputs = {
        "input_ids": torch.zeros(2, 5),
        "start_positions": torch.tensor([1, 9]),
        "end_positions": torch.tensor([3, 4]),
    }
    targets = pop_targets("qa", inputs)
    assert set(targets) == {"start_positions", "end_positions"} and set(inputs) == {"input_ids"}
    loss, parts = logit_terms("qa", student, teacher, inputs, targets, OPTIONS, alpha=0.5)
    common = dict(alpha=0.5, temperature=2.0, divergence="kl", beta=0.5, chunk_size=4)
    start = distillation_loss(student["start_logits"], teacher["start_logits"], torch.tensor([1, -100]), **common)
    end = distillation_loss(student["end_logits"], teacher["end_logits"], torch.tensor([3, 4]), **common)
    torch.testing.assert_close(loss, (start + end) / 2)
    torch.testing.assert_close(loss, 0.5 * parts["loss_soft"] + 0.5 * parts["loss_hard"])


def test_token_logits_without_labels_get_the_soft_term_over_the_attention_mask():
    g = torch.Generator().manual_seed(1)
    student, teacher = torch.randn(2, 4, 7, generator=g), torch.randn(2, 4, 7, generator=g)
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0]])
    loss, parts = logit_terms(
        "masked_lm", {"logits": student}, {"logits": teacher}, {"attention_mask": mask}, {}, OPTIONS, 0.9
    )
    expected = soft_loss(student, teacher, mask.bool(), temperature=2.0, divergence="kl", beta=0.5, chunk_size=4)
    torch.testing.assert_close(loss, expected)
    assert parts["loss_hard"].item() == 0.0


def test_missing_logits_name_the_model_and_its_outputs():
    with pytest.raises(ValueError, match=r"The teacher model must return `logits`.*\['loss'\]"):
        model_output({"loss": torch.tensor(0.0)}, "logits", "teacher")
