"""Pure-tensor tests of hf_compress.distillation.losses (no Trainer)."""

import math

import pytest
import torch
import torch.nn.functional as F

from hf_compress.distillation import losses
from hf_compress.distillation.chunked import CPU_BLOCK
from hf_compress.distillation.losses import (
    TopKLogits,
    attention_loss,
    distillation_loss,
    hard_loss,
    hidden_state_loss,
    shift_causal_labels,
    soft_divergence,
    soft_loss,
)


def _logits(*shape, seed=0, scale=3.0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g) * scale


def _grad(fn, x):
    x = x.clone().requires_grad_(True)
    loss = fn(x)
    (grad,) = torch.autograd.grad(loss, x)
    return loss.detach(), grad


@pytest.mark.parametrize("temperature,alpha", [(4.0, 0.5), (2.0, 0.9), (1.0, 0.0), (7.5, 1.0)])
def test_seed_formula_matches_reference(temperature, alpha):
    s, t = _logits(6, 5, seed=1), _logits(6, 5, seed=2)
    labels = torch.tensor([0, 4, 2, 1, 3, 0])

    def reference(x):
        kl = F.kl_div(F.log_softmax(x / temperature, -1), F.softmax(t / temperature, -1), reduction="batchmean")
        return alpha * kl * temperature**2 + (1 - alpha) * F.cross_entropy(x, labels)

    ref_loss, ref_grad = _grad(reference, s)
    loss, grad = _grad(lambda x: distillation_loss(x, t, labels, temperature, alpha), s)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)


def test_labels_none_is_soft_term_only():
    s, t = _logits(4, 7, seed=1), _logits(4, 7, seed=2)
    loss, parts = distillation_loss(s, t, None, temperature=3.0, alpha=0.2, return_components=True)
    expected = F.kl_div(F.log_softmax(s / 3, -1), F.softmax(t / 3, -1), reduction="batchmean") * 9
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    assert parts["hard"].item() == 0.0


def test_token_level_causal_lm_matches_reference():
    s, t = _logits(2, 6, 11, seed=3), _logits(2, 6, 11, seed=4)
    labels = torch.randint(0, 11, (2, 6), generator=torch.Generator().manual_seed(5))
    labels[0, :3] = -100
    temperature, alpha = 2.0, 0.3

    def reference(x):  # shift exactly like the model's own causal-LM loss, then average over valid positions
        xs, ts, ys = x[:, :-1].reshape(-1, 11), t[:, :-1].reshape(-1, 11), labels[:, 1:].reshape(-1)
        keep = ys != -100
        kl = F.kl_div(F.log_softmax(xs[keep] / 2, -1), F.softmax(ts[keep] / 2, -1), reduction="batchmean") * 4
        return alpha * kl + (1 - alpha) * F.cross_entropy(xs, ys, ignore_index=-100)

    ref_loss, ref_grad = _grad(reference, s)
    for chunk_size in (1, 3, 1024):
        kwargs = dict(shift_labels=True, chunk_size=chunk_size)
        loss, grad = _grad(lambda x, kw=kwargs: distillation_loss(x, t, labels, temperature, alpha, **kw), s)
        torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "mse"])
def test_chunked_equals_unchunked(divergence):
    s, t = _logits(3, 10, 13, seed=6), _logits(3, 10, 13, seed=7)
    labels = torch.randint(0, 13, (3, 10), generator=torch.Generator().manual_seed(8))
    labels[1, ::2] = -100
    kwargs = dict(temperature=3.0, alpha=0.6, divergence=divergence, beta=0.3)
    full_loss, full_grad = _grad(lambda x: distillation_loss(x, t, labels, chunk_size=10_000, **kwargs), s)
    for chunk_size in (1, 4, 7):
        loss, grad = _grad(lambda x, c=chunk_size: distillation_loss(x, t, labels, chunk_size=c, **kwargs), s)
        torch.testing.assert_close(loss, full_loss, atol=1e-6, rtol=1e-6)
        torch.testing.assert_close(grad, full_grad, atol=1e-6, rtol=1e-6)


def test_chunked_soft_loss_never_saves_more_than_one_chunk_block():
    n, vocab, chunk = 64, 50, 8
    s, t = _logits(n, vocab, seed=1).requires_grad_(True), _logits(n, vocab, seed=2)
    saved = []

    def pack(x):
        saved.append(x.numel())
        return x

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):
        loss = soft_loss(s, t, chunk_size=chunk)
    big = [numel for numel in saved if numel > chunk * vocab]
    assert big == [n * vocab], big  # only the gradient buffer of the logits, no full-vocabulary activations
    loss.backward()
    assert s.grad is not None and s.grad.abs().sum() > 0

    saved.clear()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda x: x):  # the naive formula keeps several [n, vocab]
        F.kl_div(F.log_softmax(s / 4, -1), F.softmax(t / 4, -1), reduction="batchmean")
    assert len([numel for numel in saved if numel >= n * vocab]) >= 2


def test_num_items_in_batch_makes_split_batches_exact():
    s, t = _logits(4, 5, 9, seed=9), _logits(4, 5, 9, seed=10)
    labels = torch.randint(0, 9, (4, 5), generator=torch.Generator().manual_seed(11))
    labels[:2, :4] = -100  # the two halves have very different label counts
    kwargs = dict(temperature=2.0, alpha=0.5, shift_labels=True)
    full_loss, full_grad = _grad(lambda x: distillation_loss(x, t, labels, **kwargs), s)
    n = (labels[:, 1:] != -100).sum()
    half_losses, half_grads = zip(
        *[
            _grad(lambda x, sl=sl: distillation_loss(x, t[sl], labels[sl], num_items_in_batch=n, **kwargs), s[sl])
            for sl in (slice(0, 2), slice(2, 4))
        ]
    )
    torch.testing.assert_close(sum(half_losses), full_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(torch.cat(half_grads), full_grad, atol=1e-6, rtol=1e-6)
    # A plain mean of the two half-batch means is not the large-batch loss here.
    naive = sum(distillation_loss(s[sl], t[sl], labels[sl], **kwargs) for sl in (slice(0, 2), slice(2, 4))) / 2
    assert not torch.allclose(naive, full_loss, atol=1e-3)


def test_masked_lm_uses_only_labelled_positions():
    s, t = _logits(2, 4, 6, seed=12), _logits(2, 4, 6, seed=13)
    labels = torch.full((2, 4), -100)
    labels[0, 1], labels[1, 3] = 2, 5
    loss = distillation_loss(s, t, labels, temperature=1.0, alpha=1.0)
    rows_s, rows_t = torch.stack([s[0, 1], s[1, 3]]), torch.stack([t[0, 1], t[1, 3]])
    expected = F.kl_div(F.log_softmax(rows_s, -1), F.softmax(rows_t, -1), reduction="batchmean")
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)


def test_forward_and_reverse_kl():
    s, t = _logits(5, 8, seed=14), _logits(5, 8, seed=15)
    temp = 2.0
    ls, lt = F.log_softmax(s / temp, -1), F.log_softmax(t / temp, -1)
    forward = (lt.exp() * (lt - ls)).sum(-1) * temp**2
    reverse = (ls.exp() * (ls - lt)).sum(-1) * temp**2
    torch.testing.assert_close(soft_divergence(s, t, "kl", temp), forward, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(soft_divergence(s, t, "reverse_kl", temp), reverse, atol=1e-6, rtol=1e-6)
    assert not torch.allclose(forward, reverse)


def test_jsd():
    s, t = _logits(5, 8, seed=16), _logits(5, 8, seed=17)
    beta = 0.3
    ps, pt = F.softmax(s, -1), F.softmax(t, -1)
    m = beta * pt + (1 - beta) * ps
    expected = beta * (pt * (pt / m).log()).sum(-1) + (1 - beta) * (ps * (ps / m).log()).sum(-1)
    torch.testing.assert_close(soft_divergence(s, t, "jsd", 1.0, beta), expected, atol=1e-6, rtol=1e-6)
    half = soft_divergence(s, t, "jsd", 1.0, 0.5)
    torch.testing.assert_close(half, soft_divergence(t, s, "jsd", 1.0, 0.5), atol=1e-6, rtol=1e-6)  # symmetric
    assert (half >= 0).all() and (half <= math.log(2) + 1e-6).all()
    assert soft_divergence(s, s, "jsd").abs().max() < 1e-6


def test_mse_on_logits_ignores_temperature():
    s, t = _logits(5, 8, seed=18), _logits(5, 8, seed=19)
    expected = F.mse_loss(s, t)
    torch.testing.assert_close(soft_loss(s, t, divergence="mse", temperature=1.0), expected, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(soft_loss(s, t, divergence="mse", temperature=5.0), expected, atol=1e-6, rtol=1e-6)


def test_extra_teacher_vocabulary_is_sliced_off_and_smaller_is_rejected():
    s, t = _logits(2, 3, 10, seed=20), _logits(2, 3, 10, seed=21)
    padded = torch.cat([t, torch.full((2, 3, 6), 50.0)], dim=-1)  # huge padding logits must not leak in
    torch.testing.assert_close(distillation_loss(s, padded), distillation_loss(s, t), atol=0, rtol=0)
    with pytest.raises(ValueError, match="`teacher_logits` must have at least"):
        distillation_loss(s, t[..., :8])


def test_hard_loss_matches_cross_entropy():
    s = _logits(7, 4, seed=22)
    labels = torch.tensor([0, 1, -100, 3, 2, -100, 1])
    expected = F.cross_entropy(s, labels, ignore_index=-100)
    torch.testing.assert_close(hard_loss(s, labels, chunk_size=2), expected, atol=1e-6, rtol=1e-6)


def test_shift_causal_labels():
    labels = torch.tensor([[1, 2, 3, -100]])
    assert shift_causal_labels(labels).tolist() == [[2, 3, -100, -100]]


def test_hidden_state_loss():
    s, t = _logits(2, 3, 4, seed=23), _logits(2, 3, 4, seed=24)
    torch.testing.assert_close(hidden_state_loss(s, t, "mse"), F.mse_loss(s, t), atol=1e-6, rtol=1e-6)
    cos = 1 - F.cosine_similarity(s, t, dim=-1)
    torch.testing.assert_close(hidden_state_loss(s, t, "cosine"), cos.mean(), atol=1e-6, rtol=1e-6)
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    torch.testing.assert_close(hidden_state_loss(s, t, "cosine", mask), cos[mask.bool()].mean(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="project the student"):
        hidden_state_loss(s, t[..., :2])
    with pytest.raises(ValueError, match="`kind` must be one of"):
        hidden_state_loss(s, t, "l1")


def test_attention_loss():
    a, b = torch.softmax(_logits(2, 4, 3, 3, seed=25), -1), torch.softmax(_logits(2, 4, 3, 3, seed=26), -1)
    torch.testing.assert_close(attention_loss(a, b), F.mse_loss(a, b), atol=1e-6, rtol=1e-6)
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    per_query = (a - b).pow(2).mean(dim=(1, 3))
    torch.testing.assert_close(attention_loss(a, b, mask), per_query[mask.bool()].mean(), atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="same number of heads"):
        attention_loss(a, b[:, :2])


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"temperature": 0.0}, "`temperature` must be > 0, got 0.0"),
        ({"alpha": 1.5}, r"`alpha` must be in \[0, 1\], got 1.5"),
        ({"divergence": "tvd"}, "`divergence` must be one of"),
        ({"divergence": "jsd", "beta": 1.0}, r"`beta` must be in \(0, 1\)"),
        ({"chunk_size": 0}, "`chunk_size` must be >= 1"),
    ],
)
def test_invalid_arguments(kwargs, match):
    s, t = _logits(2, 3, 5), _logits(2, 3, 5, seed=1)
    with pytest.raises(ValueError, match=match):
        distillation_loss(s, t, **kwargs)


@pytest.mark.parametrize("temperature,smoothing", [(1.0, 0.0), (1.0, 0.1), (3.0, 0.2)])
def test_closed_form_gradients_match_autograd(temperature, smoothing):
    s, t = _logits(3, 6, 17, seed=30), _logits(3, 6, 17, seed=31)
    labels = torch.randint(0, 17, (3, 6), generator=torch.Generator().manual_seed(32))
    labels[0, :4] = -100

    def reference(x):
        keep = labels != -100
        kl = F.kl_div(F.log_softmax(x[keep] / temperature, -1), F.log_softmax(t[keep] / temperature, -1),
                      log_target=True, reduction="batchmean") * temperature**2  # fmt: skip
        ce = F.cross_entropy(x.reshape(-1, 17), labels.reshape(-1), label_smoothing=smoothing)
        return 0.3 * kl + 0.7 * ce

    ref_loss, ref_grad = _grad(reference, s)
    fn = lambda x: distillation_loss(x, t, labels, temperature, 0.3, label_smoothing=smoothing)  # noqa: E731
    loss, grad = _grad(fn, s)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("divergence,beta", [("reverse_kl", 0.5), ("jsd", 0.5), ("jsd", 0.1), ("jsd", 0.9)])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_closed_form_reverse_kl_and_jsd_match_autograd(divergence, beta, temperature):
    s, t = _logits(3, 6, 17, seed=40), _logits(3, 6, 17, seed=41)
    s[0, 0, :5] += 60.0  # rows whose probabilities underflow to 0 (the JSD mixture must stay finite)
    t[0, 0, 5:9] -= 120.0
    labels = torch.randint(0, 17, (3, 6), generator=torch.Generator().manual_seed(42))
    labels[1, 2:] = -100
    row = losses.DIVERGENCES[divergence]

    def reference(x):
        keep = labels != -100
        soft = row(x[keep], t[keep], temperature, beta).mean()  # autograd through the log-space reference
        return 0.4 * soft + 0.6 * F.cross_entropy(x.reshape(-1, 17), labels.reshape(-1))

    ref_loss, ref_grad = _grad(reference, s)
    loss, grad = _grad(lambda x: distillation_loss(x, t, labels, temperature, 0.4, divergence=divergence, beta=beta,
                                                   chunk_size=4), s)  # fmt: skip
    assert torch.isfinite(grad).all()
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-5)


def test_bfloat16_student_gets_a_bfloat16_gradient():
    s, t = _logits(2, 5, 11, seed=33), _logits(2, 5, 11, seed=34)
    labels = torch.randint(0, 11, (2, 5), generator=torch.Generator().manual_seed(35))
    ref_loss, ref_grad = _grad(lambda x: distillation_loss(x, t, labels), s.bfloat16().float())
    loss, grad = _grad(lambda x: distillation_loss(x, t.bfloat16(), labels), s.bfloat16())
    assert grad.dtype == torch.bfloat16
    torch.testing.assert_close(loss, ref_loss, atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(grad.float(), ref_grad, atol=1e-3, rtol=1e-2)


@pytest.mark.parametrize("divergence", ["kl", "reverse_kl", "jsd", "mse"])
def test_top_k_teacher_with_full_vocabulary_is_exact(divergence):
    s, t = _logits(2, 4, 9, seed=36), _logits(2, 4, 9, seed=37)
    labels = torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(38))
    values, indices = t.topk(9, dim=-1)
    kwargs = dict(temperature=2.0, alpha=0.6, divergence=divergence)
    dense_loss, dense_grad = _grad(lambda x: distillation_loss(x, t, labels, **kwargs), s)
    sparse_loss, sparse_grad = _grad(lambda x: distillation_loss(x, TopKLogits(values, indices), labels, **kwargs), s)
    torch.testing.assert_close(sparse_loss, dense_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(sparse_grad, dense_grad, atol=1e-6, rtol=1e-6)


def test_top_k_teacher_is_renormalised_and_needs_kl():
    s, t = _logits(5, 12, seed=39), _logits(5, 12, seed=40)
    values, indices = t.topk(4, dim=-1)

    def reference(x):
        p = F.softmax(values / 2, -1)
        return (p * (p.log() - F.log_softmax(x / 2, -1).gather(1, indices))).sum(-1).mean() * 4

    ref_loss, ref_grad = _grad(reference, s)
    loss, grad = _grad(lambda x: soft_loss(x, TopKLogits(values, indices), temperature=2.0, chunk_size=2), s)
    torch.testing.assert_close(loss, ref_loss, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(grad, ref_grad, atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match="`divergence` must be 'kl' for a top-k teacher with k=4"):
        soft_loss(s, TopKLogits(values, indices), divergence="jsd")
    with pytest.raises(ValueError, match="`teacher_logits.indices` must have the shape"):
        soft_loss(s, TopKLogits(values, indices[:, :2]))


def test_large_vocabulary_uses_cache_sized_blocks_with_the_same_result():
    vocab = CPU_BLOCK // 2 + 1  # one row per block on CPU, whatever `chunk_size` says
    s, t = _logits(1, 3, vocab, seed=41, scale=1.0), _logits(1, 3, vocab, seed=42, scale=1.0)
    labels = torch.tensor([[-100, 5, 7]])
    loss, grad = _grad(lambda x: distillation_loss(x, t, labels, chunk_size=1024), s)
    keep = labels[0] != -100
    kl = F.kl_div(F.log_softmax(s[0, keep] / 4, -1), F.log_softmax(t[0, keep] / 4, -1), log_target=True,
                  reduction="batchmean") * 16  # fmt: skip
    expected = 0.5 * kl + 0.5 * F.cross_entropy(s[0], labels[0])
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)
    assert grad[0, 0].abs().max() == 0  # the ignored row gets no gradient
