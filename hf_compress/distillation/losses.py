"""Knowledge-distillation losses as pure tensor functions (no Trainer, no models).

The soft term compares temperature-softened distributions of student and teacher logits, the hard term is the usual
cross-entropy against labels, and the seed formula of Hinton et al. mixes them:

    alpha * KL(softmax(t / T) || softmax(s / T)) * T**2 + (1 - alpha) * CE(s, labels)

Token-level logits (``[batch, seq, vocab]``) are reduced over the positions whose label is not ``-100`` and are
processed in chunks of positions, so that a large vocabulary never costs more than one ``[chunk, vocab]`` block at a
time on top of the logits (and their gradient) themselves; that kernel lives in [`~hf_compress.distillation.chunked`].
Sums can be divided by an external ``num_items_in_batch`` so that gradient accumulation gives exactly the loss of the
large batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F

from hf_compress.checks import check_finite
from hf_compress.distillation.chunked import IGNORE_INDEX, ChunkedKD, TopKLogits

Divergence = Literal["kl", "reverse_kl", "jsd", "mse"]
HiddenLoss = Literal["mse", "cosine"]


def _forward_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1) * temperature**2


def _reverse_kl(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(log_t, log_s, reduction="none", log_target=True).sum(-1) * temperature**2


def _jsd(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    log_s = F.log_softmax(student / temperature, dim=-1)
    log_t = F.log_softmax(teacher / temperature, dim=-1)
    log_m = torch.logsumexp(torch.stack([log_t + math.log(beta), log_s + math.log(1 - beta)]), dim=0)
    kl_t = F.kl_div(log_m, log_t, reduction="none", log_target=True).sum(-1)
    kl_s = F.kl_div(log_m, log_s, reduction="none", log_target=True).sum(-1)
    return (beta * kl_t + (1 - beta) * kl_s) * temperature**2


def _logit_mse(student: torch.Tensor, teacher: torch.Tensor, temperature: float, beta: float) -> torch.Tensor:
    # (s/T - t/T)**2 * T**2 == (s - t)**2: the temperature cancels, as in Kim et al. (2021).
    return (student - teacher).pow(2).mean(-1)


DIVERGENCES: dict[str, Callable[[torch.Tensor, torch.Tensor, float, float], torch.Tensor]] = {
    "kl": _forward_kl,
    "reverse_kl": _reverse_kl,
    "jsd": _jsd,
    "mse": _logit_mse,
}


def soft_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    divergence: Divergence = "kl",
    temperature: float = 1.0,
    beta: float = 0.5,
) -> torch.Tensor:
    """
    Per-row divergence between student and teacher distributions over the last dimension, scaled by `temperature**2`.

    Args:
        student_logits (`torch.Tensor`): Logits of shape `[..., classes]`.
        teacher_logits (`torch.Tensor`): Logits of the same shape.
        divergence (`str`, *optional*, defaults to `"kl"`):
            `"kl"` = KL(teacher || student), `"reverse_kl"` = KL(student || teacher), `"jsd"` = generalised
            Jensen-Shannon with mixture `beta * teacher + (1 - beta) * student`, `"mse"` = MSE of logits.
        temperature (`float`, *optional*, defaults to `1.0`): Softmax temperature (`"mse"` is temperature-free).
        beta (`float`, *optional*, defaults to `0.5`): Teacher weight of the `"jsd"` mixture, in (0, 1).

    Returns:
        `torch.Tensor` of shape `[...]` in float32.

    >>> s, t = torch.randn(2, 5), torch.randn(2, 5)
    >>> soft_divergence(s, t, "jsd").shape
    torch.Size([2])
    """
    _check_divergence(divergence, temperature, beta)
    return DIVERGENCES[divergence](student_logits.float(), teacher_logits.float(), temperature, beta)


def _check_divergence(divergence: str, temperature: float, beta: float) -> None:
    if divergence not in DIVERGENCES:
        raise ValueError(f"`divergence` must be one of {list(DIVERGENCES)}, got {divergence!r}.")
    check_finite("temperature", temperature)
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"`beta` must be in (0, 1) for the `jsd` divergence, got {beta}.")


Teacher = torch.Tensor | TopKLogits


def _as_rows(logits: torch.Tensor) -> torch.Tensor:
    return logits.reshape(-1, logits.shape[-1])


def shift_causal_labels(labels: torch.Tensor) -> torch.Tensor:
    """Align causal-LM labels with the logits that predict them: `out[..., i] = labels[..., i + 1]`, last = -100."""
    return F.pad(labels[..., 1:], (0, 1), value=IGNORE_INDEX)


def _check_teacher(student_logits: torch.Tensor, teacher: Teacher, divergence: str) -> None:
    values = teacher.values if isinstance(teacher, TopKLogits) else teacher
    if values.shape[:-1] != student_logits.shape[:-1]:
        raise ValueError(
            f"`teacher_logits` must have the leading shape of `student_logits` {tuple(student_logits.shape[:-1])}, "
            f"got {tuple(values.shape[:-1])}."
        )
    if isinstance(teacher, TopKLogits):
        if teacher.indices.shape != values.shape:
            raise ValueError(
                f"`teacher_logits.indices` must have the shape of its values {tuple(values.shape)}, got "
                f"{tuple(teacher.indices.shape)}."
            )
        if divergence != "kl" and values.shape[-1] < student_logits.shape[-1]:
            raise ValueError(
                f"`divergence` must be 'kl' for a top-k teacher with k={values.shape[-1]} < vocabulary "
                f"{student_logits.shape[-1]}, got {divergence!r}; cache the full vocabulary for other divergences."
            )
    elif values.shape[-1] < student_logits.shape[-1]:
        raise ValueError(
            f"`teacher_logits` must have at least the student's {student_logits.shape[-1]} classes, got "
            f"{values.shape[-1]}; use a teacher with the same vocabulary."
        )


def _divide(total: torch.Tensor | float, normalizer: torch.Tensor | int) -> torch.Tensor | float:
    if torch.is_tensor(normalizer):
        return total / normalizer.clamp(min=1)
    return total / max(normalizer, 1)


def _kd_terms(student, teacher, labels, mask, alpha, normalizer, options):
    """`(alpha * soft + (1 - alpha) * hard, soft, hard)`: both terms from one chunked pass over the student rows."""
    if options["chunk_size"] < 1:
        raise ValueError(f"`chunk_size` must be >= 1, got {options['chunk_size']}.")
    s_rows = _as_rows(student)
    t_vals = t_idx = None
    if teacher is not None:
        _check_teacher(student, teacher, options["divergence"])
        _check_divergence(options["divergence"], options["temperature"], options["beta"])
        if isinstance(teacher, TopKLogits):
            t_vals, t_idx = _as_rows(teacher.values.detach()), _as_rows(teacher.indices).long()
        else:
            t_vals = _as_rows(teacher.detach())
    y = None if labels is None else labels.reshape(-1).to(student.device)
    rows = keep = None
    soft_norm = s_rows.shape[0]
    if mask is not None:
        # Mostly-kept rows (causal LM: all but the last position and padding) are read in place and the others
        # zero-weighted; sparse masks (masked LM: ~15 % of positions) gather the kept rows instead.
        mask = mask.reshape(-1).to(student.device)
        soft_norm = mask.sum()
        if 2 * soft_norm.item() >= mask.numel():
            keep = mask.to(torch.float32)
        else:
            rows = mask.nonzero().squeeze(-1)
    soft_norm = normalizer if normalizer is not None else soft_norm
    hard_norm = normalizer if normalizer is not None or y is None else (y != IGNORE_INDEX).sum()
    soft_weight = 0.0 if teacher is None else alpha if y is not None else 1.0
    hard_weight = (1 - alpha) if teacher is not None else 1.0
    opts = {**options, "row_loss": DIVERGENCES.get(options["divergence"]), "wh": 0.0}
    opts["ws"] = _divide(soft_weight, soft_norm) if soft_weight else 0.0
    if y is not None and hard_weight:
        opts["wh"] = _divide(hard_weight, hard_norm)
    total, soft_sum, hard_sum = ChunkedKD.apply(s_rows, t_vals, t_idx, y, rows, keep, opts)
    hard = _divide(hard_sum, hard_norm) if y is not None else torch.zeros_like(soft_sum)
    return total, _divide(soft_sum, soft_norm), hard


def soft_loss(
    student_logits: torch.Tensor,
    teacher_logits: Teacher,
    mask: torch.Tensor | None = None,
    divergence: Divergence = "kl",
    temperature: float = 4.0,
    beta: float = 0.5,
    normalizer: torch.Tensor | int | None = None,
    chunk_size: int = 1024,
) -> torch.Tensor:
    """
    Sum of [`soft_divergence`] over the rows selected by `mask`, divided by `normalizer` (default: number of rows).

    The teacher is a constant (no gradient flows to it). Extra teacher columns beyond the student's last dimension
    (padding rows of a padded embedding matrix) are ignored.

    Args:
        student_logits (`torch.Tensor`): `[..., classes]` logits.
        teacher_logits (`torch.Tensor` or [`TopKLogits`]):
            `[..., classes_t]` logits with `classes_t >= classes`, or the teacher's top-k logits and indices.
        mask (`torch.Tensor`, *optional*): Boolean `[...]` mask of the rows to use; all rows when `None`.
        divergence, temperature, beta: See [`soft_divergence`].
        normalizer (`int` or `torch.Tensor`, *optional*): Divisor of the sum (e.g. `num_items_in_batch`).
        chunk_size (`int`, *optional*, defaults to 1024): Rows processed at once.
    """
    options = dict(divergence=divergence, temperature=temperature, beta=beta, chunk_size=chunk_size,
                   label_smoothing=0.0)  # fmt: skip
    return _kd_terms(student_logits, teacher_logits, None, mask, 1.0, normalizer, options)[0]


def hard_loss(
    student_logits: torch.Tensor,
    labels: torch.Tensor,
    normalizer: torch.Tensor | int | None = None,
    chunk_size: int = 1024,
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy summed over labels != -100 and divided by `normalizer` (default: their count), chunked."""
    options = dict(divergence="kl", temperature=1.0, beta=0.5, chunk_size=chunk_size, label_smoothing=label_smoothing)
    return _kd_terms(student_logits, None, labels, labels != IGNORE_INDEX, 0.0, normalizer, options)[0]


def distillation_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    labels: torch.Tensor | None = None,
    temperature: float = 4.0,
    alpha: float = 0.5,
    divergence: Divergence = "kl",
    beta: float = 0.5,
    shift_labels: bool = False,
    num_items_in_batch: torch.Tensor | int | None = None,
    chunk_size: int = 1024,
    label_smoothing: float = 0.0,
    return_components: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """
    Soft (teacher) term plus hard (label) term: `alpha * soft + (1 - alpha) * CE`.

    For `[batch, classes]` logits the soft term is averaged over the batch (`reduction="batchmean"`); for
    `[batch, seq, vocab]` logits it is averaged over the positions whose label is not `-100` (all positions when
    `labels` is `None`), and the cross-entropy likewise.

    Args:
        student_logits (`torch.Tensor`): `[batch, classes]` or `[batch, seq, vocab]` logits of the student.
        teacher_logits (`torch.Tensor`): Teacher logits of the same shape (extra trailing vocabulary is ignored).
        labels (`torch.Tensor`, *optional*): `[batch]` or `[batch, seq]` targets; `None` gives the soft term only.
        temperature (`float`, *optional*, defaults to 4.0): Softmax temperature `T` of the soft term.
        alpha (`float`, *optional*, defaults to 0.5): Weight of the soft term, in [0, 1].
        divergence (`str`, *optional*, defaults to `"kl"`): One of `"kl"`, `"reverse_kl"`, `"jsd"`, `"mse"`.
        beta (`float`, *optional*, defaults to 0.5): Teacher weight of the `"jsd"` mixture.
        shift_labels (`bool`, *optional*, defaults to `False`):
            Causal LM: position `i` predicts `labels[:, i + 1]`, exactly like the model's own loss.
        num_items_in_batch (`int` or `torch.Tensor`, *optional*):
            Divisor of both summed terms (the label count over all accumulated micro-batches), making gradient
            accumulation exact. Defaults to the local count.
        chunk_size (`int`, *optional*, defaults to 1024): Positions processed at once for token-level logits.
        label_smoothing (`float`, *optional*, defaults to 0.0): Label smoothing of the cross-entropy.
        return_components (`bool`, *optional*, defaults to `False`): Also return `{"soft": ..., "hard": ...}`.

    >>> s, t, y = torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0, 2, 1, 0])
    >>> distillation_loss(s, t, y, temperature=2.0, alpha=0.7).shape
    torch.Size([])
    """
    if not 0 <= alpha <= 1:
        raise ValueError(f"`alpha` must be in [0, 1], got {alpha}.")
    if student_logits.dim() not in (2, 3):
        raise ValueError(f"`student_logits` must be 2-D or 3-D, got shape {tuple(student_logits.shape)}.")
    if labels is not None and shift_labels:
        labels = shift_causal_labels(labels)
    token_level = student_logits.dim() == 3
    mask = labels != IGNORE_INDEX if (token_level and labels is not None) else None
    options = dict(divergence=divergence, temperature=temperature, beta=beta, chunk_size=chunk_size,
                   label_smoothing=label_smoothing)  # fmt: skip
    loss, soft, hard = _kd_terms(student_logits, teacher_logits, labels, mask, alpha, num_items_in_batch, options)
    return (loss, {"soft": soft, "hard": hard}) if return_components else loss


def hidden_state_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    kind: HiddenLoss = "mse",
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    Distance between `[batch, seq, hidden]` states averaged over the positions of `mask` (`[batch, seq]`, e.g. the
    attention mask): `"mse"` is the mean squared error per feature (TinyBERT), `"cosine"` is `1 - cos` per position
    (DistilBERT). Project the student first when the widths differ.

    >>> hidden_state_loss(torch.ones(1, 2, 4), torch.ones(1, 2, 4), "cosine").item()
    0.0
    """
    if student_hidden.shape != teacher_hidden.shape:
        raise ValueError(
            f"`student_hidden` shape {tuple(student_hidden.shape)} must equal `teacher_hidden` shape "
            f"{tuple(teacher_hidden.shape)}; project the student states to the teacher width first."
        )
    s, t = student_hidden.float(), teacher_hidden.detach().float()
    if kind == "mse":
        per_position = (s - t).pow(2).mean(-1)
    elif kind == "cosine":
        per_position = 1 - F.cosine_similarity(s, t, dim=-1)
    else:
        raise ValueError(f"`kind` must be one of ['mse', 'cosine'], got {kind!r}.")
    return _masked_mean(per_position, mask)


def attention_loss(
    student_attentions: torch.Tensor,
    teacher_attentions: torch.Tensor,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """
    TinyBERT attention transfer: MSE between `[batch, heads, seq, seq]` attention maps, averaged over the query
    positions of `mask` (`[batch, seq]`). Both models need the same number of heads.

    >>> a = torch.softmax(torch.randn(1, 2, 3, 3), -1)
    >>> attention_loss(a, a).item()
    0.0
    """
    if student_attentions.shape != teacher_attentions.shape:
        raise ValueError(
            f"`student_attentions` shape {tuple(student_attentions.shape)} must equal `teacher_attentions` shape "
            f"{tuple(teacher_attentions.shape)}; map layers of models with the same number of heads."
        )
    diff = (student_attentions.float() - teacher_attentions.detach().float()).pow(2).mean(dim=(1, 3))
    return _masked_mean(diff, mask)


def _masked_mean(values: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype)
    return (values * weights).sum() / weights.sum().clamp(min=1)
