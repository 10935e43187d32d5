"""Knowledge-distillation losses as pure tensor functions (no Trainer, no models).

The soft term compares temperature-softened distributions of student and teacher logits, the hard term is the usual
cross-entropy against labels, and the seed formula of Hinton et al. mixes them:

    alpha * KL(softmax(t / T) || softmax(s / T)) * T**2 + (1 - alpha) * CE(s, labels)

Token-level logits (``[batch, seq, vocab]``) are reduced over the positions whose label is not ``-100`` and are
processed in chunks of positions, so that a large vocabulary never costs more than one ``[chunk, vocab]`` block at a
time on top of the logits (and their gradient) themselves. Sums can be divided by an external ``num_items_in_batch``
so that gradient accumulation gives exactly the loss of the large batch.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal, NamedTuple

import torch
import torch.nn.functional as F

Divergence = Literal["kl", "reverse_kl", "jsd", "mse"]
HiddenLoss = Literal["mse", "cosine"]

IGNORE_INDEX = -100
CPU_BLOCK = 1 << 18  # elements per block of the chunked losses on CPU


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
    if temperature <= 0:
        raise ValueError(f"`temperature` must be > 0, got {temperature}.")
    if divergence == "jsd" and not 0 < beta < 1:
        raise ValueError(f"`beta` must be in (0, 1) for the `jsd` divergence, got {beta}.")


class TopKLogits(NamedTuple):
    """A sparse teacher: the `k` largest logits of each row (`values`) and their vocabulary `indices`, `[..., k]`.

    The soft term treats the teacher distribution as the softmax of `values / T` over those `k` entries and zero
    elsewhere (renormalised top-k). With `k` equal to the vocabulary size this is exact; otherwise it drops the
    teacher's tail mass, which is small for peaked LM distributions. Only the `"kl"` divergence accepts `k` smaller
    than the student vocabulary (reverse KL, JSD and MSE need the teacher's full row).
    """

    values: torch.Tensor
    indices: torch.Tensor


Teacher = torch.Tensor | TopKLogits


class _Workspace:
    """`[rows, width]` float32 buffers reused by every chunk: allocating them per chunk costs page faults on CPU."""

    def __init__(self, rows: int, width: int, device: torch.device):
        self.shape, self.device, self.buffers = (rows, width), device, {}

    def __call__(self, name: str, rows: int) -> torch.Tensor:
        if name not in self.buffers:
            self.buffers[name] = torch.empty(self.shape, dtype=torch.float32, device=self.device)
        return self.buffers[name][:rows]


def _log_probs_(z: torch.Tensor, p: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """In place: shifted logits `z` become `log_softmax(z)` and `p` receives `softmax(z)`, with one `exp`."""
    torch.exp(z, out=p)
    total = p.sum(-1, keepdim=True)
    p.mul_(total.reciprocal())
    return z.sub_(total.log_()), p


def _shifted(x: torch.Tensor, inv_temperature: float, out: torch.Tensor, row_max: torch.Tensor | None = None):
    """`(x - max(x)) / T` written into `out`."""
    torch.sub(x, x.amax(-1, keepdim=True) if row_max is None else row_max, out=out)
    return out.mul_(inv_temperature) if inv_temperature != 1 else out


def _kl_rows(log_ps, ps, teacher, teacher_idx, temperature, need_grad, work):
    """Forward-KL row sums times `T**2`; with `need_grad`, `ps` becomes `p_s - p_t` (the gradient divided by T)."""
    inv, c = 1.0 / temperature, log_ps.shape[0]
    if teacher_idx is None:
        log_pt, pt = _log_probs_(_shifted(teacher, inv, work("zt", c)), work("pt", c))
        rows = log_pt.sub_(log_ps).mul_(pt).sum(-1)
        if need_grad:
            ps.sub_(pt)
    else:
        log_pt = F.log_softmax(teacher.float() * inv, dim=-1)  # [c, k]: small
        pt = log_pt.exp()
        rows = (log_pt - log_ps.gather(1, teacher_idx)).mul_(pt).sum(-1)
        if need_grad:
            ps.scatter_add_(1, teacher_idx, pt.neg_())
    return rows * temperature**2


def _chunk_terms(s, t, t_idx, y, keep, opts, need_grad, work, out):
    """Soft and hard row losses of one `[c, V]` chunk and the gradient of `ws * soft + wh * hard` (or `None`).

    `keep` (`[c]` floats or `None`) zeroes the soft term of rows outside the mask. `out` (`[c, V]` float32, e.g. the
    gradient buffer's rows) receives the gradient when the closed forms apply, saving a copy.
    """
    divergence, temperature, ws, wh = opts["divergence"], opts["temperature"], opts["ws"], opts["wh"]
    c = s.shape[0]
    if keep is not None:
        ws = ws * keep.unsqueeze(1)
    row_max = s.amax(-1, keepdim=True)
    soft = hard = grad = None
    shared = None  # at T == 1 the label term reuses log_softmax(s) and a copy of softmax(s)
    if t is not None:
        if divergence == "kl":
            log_ps, ps = _log_probs_(_shifted(s, 1.0 / temperature, work("zs", c), row_max), out)
            if y is not None and temperature == 1:
                shared = (log_ps, work("q", c).copy_(ps) if need_grad else None)
            soft = _kl_rows(log_ps, ps, t, t_idx, temperature, need_grad, work)
            grad = ps.mul_(ws * temperature) if need_grad else None
        else:
            dense = t.float() if t_idx is None else _densify(t, t_idx, s.shape[-1])
            row_loss = DIVERGENCES[divergence]
            if need_grad:
                with torch.enable_grad():
                    leaf = s.detach().requires_grad_(True)
                    soft = row_loss(leaf, dense, temperature, opts["beta"])
                    (grad,) = torch.autograd.grad(soft.sum(), leaf)
                soft, grad = soft.detach(), grad.mul_(ws)
            else:
                soft = row_loss(s, dense, temperature, opts["beta"])
        if keep is not None:
            soft = soft * keep
    if y is not None:
        valid = y != IGNORE_INDEX
        target = y.masked_fill(~valid, 0).unsqueeze(1)
        if shared is not None:
            log_q, q = shared
        else:
            q_out = out if grad is None else work("q", c)
            log_q, q = _log_probs_(_shifted(s, 1.0, work("zq", c), row_max), q_out)
        smoothing = opts["label_smoothing"]
        hard = -log_q.gather(1, target).squeeze(1)
        if smoothing:
            hard = (1 - smoothing) * hard - smoothing * log_q.mean(-1)
        hard = hard * valid
        if need_grad:
            weight = valid.unsqueeze(1) * wh  # d(CE)/ds = softmax - (1 - eps) * onehot - eps / V, per valid row
            q.mul_(weight).scatter_add_(1, target, (-(1 - smoothing) * weight).expand_as(target).to(q.dtype))
            if smoothing:
                q.sub_(weight * (smoothing / s.shape[-1]))
            grad = q if grad is None else grad.add_(q)
    return soft, hard, grad


def _densify(values: torch.Tensor, indices: torch.Tensor, width: int) -> torch.Tensor:
    """A full-vocabulary teacher row from a top-k one with k == vocabulary (checked by `_check_teacher`)."""
    return values.float().new_empty(values.shape[0], width).scatter_(1, indices, values.float())


class _ChunkedKD(torch.autograd.Function):
    """`ws * sum(soft rows) + wh * sum(hard rows)` over selected rows of a `[N, V]` student, one chunk at a time.

    Forward KL and cross-entropy use their closed-form gradients (`T * (p_s - p_t)` and `softmax - onehot`), computed
    chunk by chunk during the forward pass into a single `[N, V]` buffer; other divergences use autograd per chunk.
    So no autograd graph over the full vocabulary is ever held and each chunk is read once for both terms. Also
    returns the unweighted soft and hard sums (not differentiable) for logging.
    """

    @staticmethod
    def forward(ctx, student, teacher, teacher_idx, labels, rows, keep, opts):
        need_grad = ctx.needs_input_grad[0]
        width, n = student.shape[-1], student.shape[0]
        contiguous = rows is None
        count = n if contiguous else rows.numel()
        soft_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        hard_sum = torch.zeros((), dtype=torch.float32, device=student.device)
        grad = None
        if need_grad:
            grad = torch.empty_like(student) if contiguous else torch.zeros_like(student)
        # On CPU, blocks of ~2**18 elements stay in cache: several times faster than large blocks at a 50k vocabulary.
        block = opts["chunk_size"] if student.is_cuda else max(1, min(opts["chunk_size"], CPU_BLOCK // width))
        work = _Workspace(min(block, count), width, student.device)
        direct = need_grad and contiguous and student.dtype == torch.float32
        for start in range(0, count, block):
            if contiguous:
                idx, end = None, min(start + block, count)
                take = lambda x, a=start, b=end: None if x is None else x[a:b]  # noqa: E731
            else:
                idx = rows[start : start + block]
                take = lambda x, i=idx: None if x is None else x.index_select(0, i)  # noqa: E731
            s = take(student)
            s = s if s.dtype == torch.float32 else work("s", s.shape[0]).copy_(s)
            t, t_idx, y, k = take(teacher), take(teacher_idx), take(labels), take(keep)
            if t is not None and t_idx is None and t.shape[-1] != width:
                t = t[:, :width]
            out = grad[start:end] if direct else work("out", s.shape[0])
            soft, hard, chunk_grad = _chunk_terms(s, t, t_idx, y, k, opts, need_grad, work, out)
            if soft is not None:
                soft_sum += soft.sum()
            if hard is not None:
                hard_sum += hard.sum()
            if need_grad:
                if contiguous:
                    if not (direct and chunk_grad.data_ptr() == out.data_ptr()):
                        grad[start:end].copy_(chunk_grad)
                else:
                    grad.index_copy_(0, idx, chunk_grad.to(grad.dtype))
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(soft_sum, hard_sum)
        total = opts["ws"] * soft_sum + opts["wh"] * hard_sum
        return total, soft_sum, hard_sum

    @staticmethod
    def backward(ctx, grad_output, _soft, _hard):
        (grad,) = ctx.saved_tensors
        return grad.mul_(grad_output.to(grad.dtype)), None, None, None, None, None, None


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
    opts = {**options, "ws": _divide(soft_weight, soft_norm) if soft_weight else 0.0, "wh": 0.0}
    if y is not None and hard_weight:
        opts["wh"] = _divide(hard_weight, hard_norm)
    total, soft_sum, hard_sum = _ChunkedKD.apply(s_rows, t_vals, t_idx, y, rows, keep, opts)
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
