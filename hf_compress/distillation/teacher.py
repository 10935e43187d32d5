"""The teacher of [`DistillationTrainer`]: head detection, loading and placement, and the checks against the student.

Plain functions, so that the trainer keeps only the Trainer glue: [`distilled_head`] names the head of a student or
teacher (from the one head table, [`hf_compress.models.heads`]), [`build_teacher`] loads a path with the student's
Auto class (or takes a model), freezes it and places it on the device in the training dtype; [`check_compatible`]
rejects a teacher whose head, label set or vocabulary cannot teach the student (extra teacher vocabulary rows are
accepted as padding, and sliced off by the losses).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn
from transformers import PreTrainedModel
from transformers.trainer_utils import unwrap_peft_model
from transformers.utils import logging

from hf_compress.checks import check_model_path, readable_weights
from hf_compress.models.heads import HEADS, LM_HEADS, detect_head

logger = logging.get_logger(__name__)

# The heads that can be distilled: the keys of `hf_compress.models.heads.HEADS` (image classification: DeiT-style).
DISTILLED_HEADS = ("seq2seq_lm", "causal_lm", "masked_lm", "qa", "token_cls", "seq_cls", "image_cls")


def distilled_head(model: nn.Module) -> str | None:
    """The head of `model` (PEFT-unwrapped), one of `DISTILLED_HEADS`, or `None` when it cannot be distilled.

    >>> from transformers import BertConfig, BertForMaskedLM
    >>> distilled_head(BertForMaskedLM(BertConfig(vocab_size=10, hidden_size=8, num_hidden_layers=1,
    ...                                           num_attention_heads=2, intermediate_size=8)))
    'masked_lm'
    """
    head = detect_head(type(unwrap_peft_model(model)).__name__)
    return head if head in DISTILLED_HEADS else None


def build_teacher(
    teacher: PreTrainedModel | nn.Module | str | None,
    head: str,
    init_kwargs: dict[str, Any],
    eager_attention: bool,
    device: torch.device | None,
    dtype: torch.dtype | None,
) -> nn.Module:
    """
    The frozen teacher in eval mode on `device` (cast to `dtype` when given): a model as is, or a path loaded with
    the Auto class of `head`.

    Args:
        teacher (`PreTrainedModel`, `nn.Module` or `str`): The teacher or a checkpoint path / Hub id.
        head (`str`): The student's head type, one of `DISTILLED_HEADS`.
        init_kwargs (`dict`): `from_pretrained` keyword arguments for a path (`trust_remote_code` defaults to False).
        eager_attention (`bool`): Load with `attn_implementation="eager"` (attention maps) unless set otherwise.
        device (`torch.device`, *optional*): Where the teacher runs; `None` leaves it where it is (a teacher to shard).
        dtype (`torch.dtype`, *optional*): The mixed-precision dtype of training, or `None` to keep the teacher's.
    """
    if isinstance(teacher, str):
        init_kwargs = {"trust_remote_code": False, **init_kwargs}
        if eager_attention:
            init_kwargs.setdefault("attn_implementation", "eager")
        check_model_path("teacher_model", teacher)
        with readable_weights("teacher_model", teacher):
            teacher = HEADS[head].auto().from_pretrained(teacher, **init_kwargs)
        saved = (getattr(teacher.config, "architectures", None) or [None])[0]
        if saved is not None and detect_head(saved) not in (None, head):
            raise ValueError(
                f"`teacher_model` checkpoint is a {saved} ({detect_head(saved)}) but the student is a "
                f"{head} model; pass a teacher trained for the same task."
            )
    elif not isinstance(teacher, nn.Module):
        raise ValueError(
            f"`teacher_model` must be a model or a path, got {type(teacher).__name__}; pass the teacher to distil."
        )
    teacher = teacher.to(device=device, dtype=dtype)
    teacher.requires_grad_(False)
    return teacher.eval()


def check_compatible(student: nn.Module, teacher: nn.Module, head: str, processing_class: Any = None) -> None:
    """
    Raise a `ValueError` when `teacher` cannot teach `student` (a `head` model): another head type, another label
    set, a regression / multi-label student, or an LM vocabulary that differs beyond padding rows (checked against
    `len(processing_class)` when it has a length, else only warned about).
    """
    teacher_head = detect_head(type(unwrap_peft_model(teacher)).__name__)
    if teacher_head != head:
        raise ValueError(
            f"`teacher_model` is a {type(teacher).__name__} ({teacher_head}) but the student is a {head} "
            "model; load the teacher with the student's head type."
        )
    if head in ("seq_cls", "token_cls") and teacher.config.num_labels != student.config.num_labels:
        raise ValueError(
            f"`teacher_model` has num_labels={teacher.config.num_labels} but the student has "
            f"{student.config.num_labels}; give both the same label set."
        )
    if head == "seq_cls" and getattr(student.config, "problem_type", None) in (
        "regression",
        "multi_label_classification",
    ):
        raise ValueError(
            f"`problem_type` must be single-label classification to distil, got {student.config.problem_type!r}."
        )
    if head in LM_HEADS:
        student_vocab, teacher_vocab = _vocab_size(student), _vocab_size(teacher)
        tokens = len(processing_class) if hasattr(processing_class, "__len__") else None
        if teacher_vocab < student_vocab or (teacher_vocab > student_vocab and tokens and tokens > student_vocab):
            raise ValueError(
                f"`teacher_model` vocabulary ({teacher_vocab}) differs from the student's ({student_vocab}) "
                "beyond padding rows; use a teacher and student that share the tokenizer."
            )
        if teacher_vocab > student_vocab and tokens is None:
            logger.warning(
                f"Teacher vocabulary {teacher_vocab} > student vocabulary {student_vocab}: treating the extra "
                "rows as padding and slicing them off (pass `processing_class` to have this checked)."
            )


def _vocab_size(model: nn.Module) -> int:
    model = unwrap_peft_model(model)
    embeddings = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if embeddings is not None and getattr(embeddings, "weight", None) is not None:
        return embeddings.weight.shape[0]
    return model.config.vocab_size


def teacher_forward(teacher: nn.Module, inputs: dict[str, Any], flags: dict[str, bool], head: str) -> Any:
    """
    The teacher's outputs on `inputs` without autograd: under `torch.inference_mode()`, or `torch.no_grad()` when
    `flags` asks for hidden states / attention maps (the intermediate losses may save them for backward). LM heads
    run without a KV cache.
    """
    teacher_flags = {**flags, "use_cache": False} if head in ("causal_lm", "seq2seq_lm") else flags
    # inference_mode skips autograd bookkeeping entirely; its tensors cannot be saved for backward: the logit
    # losses only read teacher rows into fresh buffers, but the hidden-state / attention losses might save them.
    context = torch.no_grad() if flags else torch.inference_mode()
    with context:
        return teacher(**inputs, **teacher_flags)


def check_student_trains(student: nn.Module, teacher: nn.Module | None) -> None:
    """
    Raise a `ValueError` when no parameter of `student` would train (all frozen, e.g. the teacher itself or a model
    built in place from it, whose tensors the frozen teacher shares); warn when only some tensors are shared.
    """
    params = list(student.parameters())
    teacher_ids = set() if teacher is None else {id(p) for p in teacher.parameters()}
    shared = sum(id(p) in teacher_ids for p in params)
    if not any(p.requires_grad for p in params):
        reason = f"it shares {shared} of its {len(params)} tensors with the frozen teacher" if shared else "all frozen"
        raise ValueError(
            f"`model` (the student) has no parameter with requires_grad=True ({reason}), so training would not change "
            "it; pass a copy of the teacher to shrink (`copy.deepcopy(teacher)`) or unfreeze it "
            "(`model.requires_grad_(True)`)."
        )
    if shared:
        logger.warning(
            f"`model` (the student) shares {shared} of its {len(params)} parameter tensors with `teacher_model`, "
            "which is frozen: those tensors will not train. Pass a copy (`copy.deepcopy(teacher)`) to train them."
        )
