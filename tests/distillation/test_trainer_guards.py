"""What `DistillationTrainer` refuses before any step runs: vocabularies, heads, labels, temperatures, layer maps."""

import pytest
import torch

from hf_compress.distillation.trainer import DistillationTrainer
from tests.distillation.test_trainer import config, losses, make_data, seq2seq_model
from tests.tiny_models import VOCAB, tiny_model, tiny_tokenizer


def build(tmp_path, student, teacher, **kwargs):
    return DistillationTrainer(model=student, teacher_model=teacher, args=config(tmp_path), **kwargs)


def test_guard_vocab(tmp_path):
    with pytest.raises(ValueError, match=r"`teacher_model` vocabulary \(48\) differs from the student's \(64\)"):
        build(tmp_path, tiny_model("llama", "causal_lm"), tiny_model("llama", "causal_lm", vocab_size=48))
    student_48 = tiny_model("llama", "causal_lm", vocab_size=48)
    with pytest.raises(ValueError, match=r"vocabulary \(64\) differs from the student's \(48\)"):
        build(tmp_path, student_48, tiny_model("llama", "causal_lm"), processing_class=tiny_tokenizer())


def test_padded_teacher_vocab_is_sliced(tmp_path):
    teacher = tiny_model("llama", "causal_lm", seed=1, vocab_size=VOCAB + 16)
    trainer = DistillationTrainer(
        model=tiny_model("llama", "causal_lm"),
        teacher_model=teacher,
        args=config(tmp_path, max_steps=2),
        train_dataset=make_data("causal_lm"),
        processing_class=tiny_tokenizer(),
    )
    trainer.train()
    assert all(torch.isfinite(torch.tensor(losses(trainer, "loss_soft"))))


@pytest.mark.parametrize(
    "student,teacher,match",
    [
        (("bert", "seq_cls"), ("bert", "seq_cls", {"num_labels": 5}), "`teacher_model` has num_labels=5"),
        (("bert", "seq_cls"), ("bert", "token_cls", {}), r"\(token_cls\) but the student is a seq_cls model"),
        (("bert", "base"), ("bert", "base", {}), "`model` of class BertModel is not a supported head"),
        (("bert", "seq_cls", {"problem_type": "regression"}), ("bert", "seq_cls", {}), "`problem_type` must be"),
    ],
)
def test_guard_models(tmp_path, student, teacher, match):
    def make(spec):
        return tiny_model(spec[0], spec[1], **(spec[2] if len(spec) > 2 else {}))

    with pytest.raises(ValueError, match=match):
        build(tmp_path, make(student), make(teacher))


@pytest.mark.parametrize(
    "field,value,match",
    [("temperature", 0.0, "`temperature` must be > 0, got 0.0."), ("alpha", 1.5, r"`alpha` must be in \[0, 1\]")],
)
def test_guard_temperature_and_alpha(tmp_path, field, value, match):
    args = config(tmp_path)
    setattr(args, field, value)  # bypasses the config's own validation: the trainer re-checks
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(
            model=tiny_model("bert", "seq_cls"), teacher_model=tiny_model("bert", "seq_cls"), args=args
        )


@pytest.mark.parametrize(
    "kwargs,teacher_overrides,match",
    [
        ({"hidden_loss_weight": 1.0, "layer_map": {"0": 7}}, {}, "`layer_map` entry 0: 7 is out of range"),
        ({"attention_loss_weight": 1.0}, {"num_attention_heads": 2}, "needs equal head counts, got student 4"),
    ],
)
def test_guard_intermediate_losses(tmp_path, kwargs, teacher_overrides, match):
    with pytest.raises(ValueError, match=match):
        DistillationTrainer(
            model=tiny_model("bert", "seq_cls"),
            args=config(tmp_path, **kwargs),
            teacher_model=tiny_model("bert", "seq_cls", **teacher_overrides),
        )


def test_guard_misc(tmp_path):
    with pytest.raises(ValueError, match="`hidden_loss_weight` and `attention_loss_weight` must be 0 for encoder"):
        DistillationTrainer(
            model=seq2seq_model("t5"),
            teacher_model=seq2seq_model("t5", 1),
            args=config(tmp_path, hidden_loss_weight=1.0),
        )
    with pytest.raises(ValueError, match="`teacher_model` must be a model or a path, got int"):
        build(tmp_path, tiny_model("bert", "seq_cls"), 3)
    with pytest.raises(ValueError, match="`compute_loss_func` is not supported"):
        build(tmp_path, tiny_model("bert", "seq_cls"), tiny_model("bert", "seq_cls"), compute_loss_func=len)


def test_a_student_that_cannot_train_is_refused(tmp_path):
    teacher = tiny_model("llama", "causal_lm")
    with pytest.raises(ValueError, match=r"no parameter with requires_grad=True \(it shares \d+ of its \d+ tensors"):
        build(tmp_path, teacher, teacher)  # the teacher passed as its own student: frozen by the trainer
    frozen = tiny_model("llama", "causal_lm", seed=1).requires_grad_(False)
    with pytest.raises(ValueError, match=r"requires_grad=True \(all frozen\).*model.requires_grad_\(True\)"):
        build(tmp_path, frozen, tiny_model("llama", "causal_lm"))


def test_a_student_sharing_some_tensors_with_the_teacher_is_warned_about(tmp_path, caplog):
    teacher = tiny_model("llama", "causal_lm")
    student = tiny_model("llama", "causal_lm", seed=1)
    student.model.embed_tokens = teacher.model.embed_tokens  # one shared tensor (tied to the LM head)
    student.lm_head.weight = teacher.model.embed_tokens.weight
    caplog.set_level("WARNING")
    build(tmp_path, student, teacher)
    assert "shares 1 of its" in caplog.text and "will not train" in caplog.text
    assert not teacher.model.embed_tokens.weight.requires_grad and student.model.norm.weight.requires_grad
