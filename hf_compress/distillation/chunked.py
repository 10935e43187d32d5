"""The chunked kernel behind the soft and hard distillation losses of [`~hf_compress.distillation.losses`].

[`ChunkedKD`] walks a `[N, V]` student one block of rows at a time: the soft (teacher) and hard (label) terms are read
from the same block, forward KL, reverse KL, JSD and cross-entropy get their closed-form gradients written straight
into one `[N, V]` buffer, and the logit MSE runs autograd on the block only. So no autograd graph over the full
vocabulary is ever held. The teacher is dense logits or a [`TopKLogits`] sparse row.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100
CPU_BLOCK = 1 << 18  # elements per block of the chunked losses on CPU


class TopKLogits(NamedTuple):
    """A sparse teacher: the `k` largest logits of each row (`values`) and their vocabulary `indices`, `[..., k]`.

    The soft term treats the teacher distribution as the softmax of `values / T` over those `k` entries and zero
    elsewhere (renormalised top-k). With `k` equal to the vocabulary size this is exact; otherwise it drops the
    teacher's tail mass, which is small for peaked LM distributions. Only the `"kl"` divergence accepts `k` smaller
    than the student vocabulary (reverse KL, JSD and MSE need the teacher's full row).
    """

    values: torch.Tensor
    indices: torch.Tensor


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


def _dot_rows(a: torch.Tensor, b: torch.Tensor, scratch: torch.Tensor) -> torch.Tensor:
    """Row-wise dot products of two `[c, V]` blocks through a reused `[c, V]` buffer (on CPU, a batched `bmm` of
    `[1, V] @ [V, 1]` products is many times slower than this multiply-and-sum)."""
    return torch.mul(a, b, out=scratch).sum(-1)


def _mixture_rows(log_ps, ps, teacher, divergence, temperature, beta, need_grad, work):
    """Reverse-KL or JSD row sums times `T**2` and, with `need_grad`, their closed-form gradient in `ps` (unweighted).

    With `g = dL/dp_s`, the gradient with respect to the logits is `p_s * (g - <p_s, g>) / T`:
    reverse KL `L = sum p_s log(p_s / p_t)` has `g = log(p_s / p_t) + 1`; the beta-JSD
    `L = beta KL(p_t || m) + (1 - beta) KL(p_s || m)` with `m = beta p_t + (1 - beta) p_s` has
    `g = (1 - beta) log(p_s / m)`. In both the row's own divergence term is `<p_s, g>` up to the constant, so one
    row sum serves the loss and the gradient. `ps` and `log_ps` are overwritten.
    """
    c, inv = log_ps.shape[0], 1.0 / temperature
    log_pt, pt = _log_probs_(_shifted(teacher.float(), inv, work("zt", c)), work("pt", c))
    if divergence == "reverse_kl":
        ratio = log_pt.neg_().add_(log_ps)  # log(p_s / p_t)
        rows = own = _dot_rows(ps, ratio, work("dot", c))
        scale = temperature
    else:
        log_m = torch.mul(pt, beta, out=work("m", c)).add_(ps, alpha=1 - beta)
        log_m.clamp_(min=torch.finfo(torch.float32).tiny).log_()  # both terms are ~0 where m underflows
        rows_t = _dot_rows(pt, log_pt.sub_(log_m), work("dot", c))
        ratio = log_ps.sub_(log_m)  # log(p_s / m)
        own = _dot_rows(ps, ratio, work("dot", c))
        rows, scale = beta * rows_t + (1 - beta) * own, temperature * (1 - beta)
    if need_grad:
        ps.mul_(ratio.sub_(own.unsqueeze(1))).mul_(scale)
    return rows * temperature**2, ps if need_grad else None


def _chunk_terms(s, t, t_idx, y, keep, opts, need_grad, work, out):
    """Soft and hard row losses of one `[c, V]` chunk and the gradient of `ws * soft + wh * hard` (or `None`).

    `keep` (`[c]` floats or `None`) zeroes the soft term of rows outside the mask. `out` (`[c, V]` float32, e.g. the
    gradient buffer's rows) receives the gradient when the closed forms apply, saving a copy. Only `"mse"`
    uses the per-row function `opts["row_loss"]` (`losses.DIVERGENCES[divergence]`) under autograd.
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
        elif divergence in ("reverse_kl", "jsd"):
            dense = t if t_idx is None else _densify(t, t_idx, s.shape[-1])
            log_ps, ps = _log_probs_(_shifted(s, 1.0 / temperature, work("zs", c), row_max), out)
            soft, grad = _mixture_rows(log_ps, ps, dense, divergence, temperature, opts["beta"], need_grad, work)
            grad = grad.mul_(ws) if need_grad else None
        else:
            dense = t.float() if t_idx is None else _densify(t, t_idx, s.shape[-1])
            row_loss = opts["row_loss"]
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
    """A full-vocabulary teacher row from a top-k one with k == vocabulary (checked by `losses._check_teacher`)."""
    return values.float().new_empty(values.shape[0], width).scatter_(1, indices, values.float())


class ChunkedKD(torch.autograd.Function):
    """`ws * sum(soft rows) + wh * sum(hard rows)` over selected rows of a `[N, V]` student, one chunk at a time.

    Forward KL, reverse KL, JSD and cross-entropy use their closed-form gradients (e.g. `T * (p_s - p_t)` and
    `softmax - onehot`), computed chunk by chunk during the forward pass into a single `[N, V]` buffer; the logit MSE
    uses autograd per chunk.
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
