"""Self-distillation math against closed forms, slow references and autograd."""

from __future__ import annotations

import math

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdpo import self_distillation
from sdpo.self_distillation import (
    chunked_token_divergence,
    chunked_token_logprobs,
    importance_weights,
    policy_terms,
    self_distillation_loss,
    token_divergence,
    token_level_divergence,
)

ALPHAS = [0.0, 0.3, 0.5, 1.0]
SUPPORTS = [(None, True), (3, True), (3, False)]  # (topk, add_tail)


def kl(p: list[float], q: list[float]) -> float:
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True) if pi > 0)


def by_hand(p: list[float], q: list[float], alpha: float) -> float:
    """The SPEC §4 divergence from explicit probabilities (p student, q teacher)."""
    if alpha == 0.0:
        return kl(q, p)
    if alpha == 1.0:
        return kl(p, q)
    m = [(1 - alpha) * pi + alpha * qi for pi, qi in zip(p, q, strict=True)]
    return (1 - alpha) * kl(p, m) + alpha * kl(q, m)


def logits_of(probs: list[float]) -> torch.Tensor:
    # Any shift works; +1.7 checks that the functions normalize.
    return torch.tensor(probs, dtype=torch.float64).log() + 1.7


def reference_divergence(student_logits, teacher_logits, alpha):
    """Plain-autograd transcription of the formula (full vocabulary), for comparisons."""
    s = student_logits.log_softmax(-1)
    t = teacher_logits.detach().log_softmax(-1)
    if alpha == 0.0:
        return (t.exp() * (t - s)).sum(-1)
    if alpha == 1.0:
        return (s.exp() * (s - t)).sum(-1)
    m = torch.logsumexp(torch.stack([s + math.log(1 - alpha), t + math.log(alpha)]), dim=0)
    return (1 - alpha) * (s.exp() * (s - m)).sum(-1) + alpha * (t.exp() * (t - m)).sum(-1)


# ----- closed forms ------------------------------------------------------------------------------

P_STUDENT = [0.7, 0.2, 0.1]
Q_TEACHER = [0.2, 0.5, 0.3]


@pytest.mark.parametrize("alpha", [0.0, 0.25, 0.5, 0.8, 1.0])
def test_full_vocab_matches_hand_computed_divergence(alpha):
    got = token_divergence(logits_of(P_STUDENT), logits_of(Q_TEACHER), alpha=alpha)
    assert got.item() == pytest.approx(by_hand(P_STUDENT, Q_TEACHER, alpha), rel=1e-12)


def test_forward_and_reverse_kl_are_the_named_directions():
    # KL(q||p) = .2 ln(.2/.7) + .5 ln(.5/.2) + .3 ln(.3/.1); KL(p||q) = .7 ln(.7/.2) + ...
    forward = 0.2 * math.log(0.2 / 0.7) + 0.5 * math.log(0.5 / 0.2) + 0.3 * math.log(0.3 / 0.1)
    reverse = 0.7 * math.log(0.7 / 0.2) + 0.2 * math.log(0.2 / 0.5) + 0.1 * math.log(0.1 / 0.3)
    s, t = logits_of(P_STUDENT), logits_of(Q_TEACHER)
    assert token_divergence(s, t, alpha=0.0).item() == pytest.approx(forward, rel=1e-12)
    assert token_divergence(s, t, alpha=1.0).item() == pytest.approx(reverse, rel=1e-12)


def test_topk_with_tail_by_hand():
    # Student's top-2 are ids 0, 1 (the teacher's top-2 would be 1, 3: support is the student's).
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.1, 0.4, 0.2, 0.3]
    s, t = logits_of(p), logits_of(q)
    p3, q3 = [0.5, 0.3, 0.2], [0.1, 0.4, 0.5]
    for alpha in ALPHAS:
        got = token_divergence(s, t, alpha=alpha, topk=2, add_tail=True)
        assert got.item() == pytest.approx(by_hand(p3, q3, alpha), rel=1e-10), alpha


def test_topk_without_tail_renormalizes_both_sides():
    p = [0.5, 0.3, 0.15, 0.05]
    q = [0.1, 0.4, 0.2, 0.3]
    p2, q2 = [0.5 / 0.8, 0.3 / 0.8], [0.1 / 0.5, 0.4 / 0.5]
    for alpha in ALPHAS:
        got = token_divergence(logits_of(p), logits_of(q), alpha=alpha, topk=2, add_tail=False)
        assert got.item() == pytest.approx(by_hand(p2, q2, alpha), rel=1e-10), alpha


@pytest.mark.parametrize("block_elements", [None, 40])  # 40: blocks of 2 rows, the last one short
@pytest.mark.parametrize("alpha", ALPHAS)
def test_matches_plain_autograd_reference_values_and_gradients(alpha, block_elements, monkeypatch):
    if block_elements is not None:
        monkeypatch.setattr(self_distillation, "_BLOCK_ELEMENTS", block_elements)
    torch.manual_seed(0)
    student = (3 * torch.randn(5, 3, 17, dtype=torch.float64)).requires_grad_()
    teacher = 3 * torch.randn(5, 3, 17, dtype=torch.float64)
    weights = torch.rand(5, 3, dtype=torch.float64)
    got = token_divergence(student, teacher, alpha=alpha)
    (grad,) = torch.autograd.grad((got * weights).sum(), student)
    want = reference_divergence(student, teacher, alpha)
    (want_grad,) = torch.autograd.grad((want * weights).sum(), student)
    assert got.shape == (5, 3)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(grad, want_grad)


def test_non_contiguous_logits(monkeypatch):
    monkeypatch.setattr(self_distillation, "_BLOCK_ELEMENTS", 20)
    student = torch.randn(9, 6, dtype=torch.float64).T.requires_grad_()  # [6, 9], transposed
    teacher = torch.randn(9, 6, dtype=torch.float64).T
    got = token_divergence(student, teacher, alpha=0.5)
    want = reference_divergence(student, teacher, 0.5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(*(torch.autograd.grad(x.sum(), student)[0] for x in (got, want)))


def test_jsd_is_symmetric_and_bounded_by_log2():
    torch.manual_seed(1)
    a, b = 4 * torch.randn(64, 11), 4 * torch.randn(64, 11)
    ab = token_divergence(a, b, alpha=0.5)
    ba = token_divergence(b, a, alpha=0.5)
    torch.testing.assert_close(ab, ba)
    assert (ab >= -1e-6).all() and (ab <= math.log(2) + 1e-6).all()
    # Disjoint supports reach the bound.
    disjoint = token_divergence(torch.tensor([50.0, -50.0]), torch.tensor([-50.0, 50.0]), alpha=0.5)
    assert disjoint.item() == pytest.approx(math.log(2), abs=1e-5)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk,add_tail", SUPPORTS)
def test_zero_when_student_equals_teacher(alpha, topk, add_tail):
    z = torch.randn(6, 9, dtype=torch.float64)
    got = token_divergence(z, z.clone(), alpha=alpha, topk=topk, add_tail=add_tail)
    torch.testing.assert_close(got, torch.zeros(6, dtype=torch.float64), atol=1e-12, rtol=0)


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("add_tail", [True, False])
def test_topk_covering_the_vocabulary_equals_full(alpha, add_tail):
    torch.manual_seed(2)
    student, teacher = 2 * torch.randn(8, 13), 2 * torch.randn(8, 13)
    full = token_divergence(student, teacher, alpha=alpha)
    for k in (13, 50):
        got = token_divergence(student, teacher, alpha=alpha, topk=k, add_tail=add_tail)
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, full, atol=2e-6, rtol=1e-5)


# ----- gradients ---------------------------------------------------------------------------------


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk,add_tail", SUPPORTS)
def test_gradcheck(alpha, topk, add_tail):
    torch.manual_seed(3)
    student = torch.randn(4, 7, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(4, 7, dtype=torch.float64)
    assert torch.autograd.gradcheck(
        lambda z: token_divergence(z, teacher, alpha=alpha, topk=topk, add_tail=add_tail),
        (student,),
    )


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk,add_tail", SUPPORTS)
def test_teacher_gets_no_gradient(alpha, topk, add_tail):
    student = torch.randn(3, 8, requires_grad=True)
    teacher = torch.randn(3, 8, requires_grad=True)
    token_divergence(student, teacher, alpha=alpha, topk=topk, add_tail=add_tail).sum().backward()
    assert teacher.grad is None
    assert student.grad is not None and student.grad.abs().sum() > 0


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk,add_tail", SUPPORTS)
def test_gradient_step_lowers_divergence(alpha, topk, add_tail):
    torch.manual_seed(4)
    student = torch.randn(16, 10, requires_grad=True)
    teacher = torch.randn(16, 10)
    before = token_divergence(student, teacher, alpha=alpha, topk=topk, add_tail=add_tail)
    before.sum().backward()
    with torch.no_grad():
        stepped = student - 0.05 * student.grad
    after = token_divergence(stepped, teacher, alpha=alpha, topk=topk, add_tail=add_tail)
    assert after.sum() < before.sum()


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk,add_tail", [*SUPPORTS, (12, True), (12, False)])
def test_extreme_logits_stay_finite(alpha, topk, add_tail):
    torch.manual_seed(5)
    student = (1e4 * torch.randn(8, 12).sign()).requires_grad_()
    teacher = 1e4 * torch.randn(8, 12).sign()
    got = token_divergence(student, teacher, alpha=alpha, topk=topk, add_tail=add_tail)
    got.sum().backward()
    assert torch.isfinite(got).all()
    assert torch.isfinite(student.grad).all()


@pytest.mark.parametrize("alpha", ALPHAS)
@pytest.mark.parametrize("topk,add_tail", [*SUPPORTS, (12, True)])
def test_policy_terms_with_extreme_logits_stay_finite(alpha, topk, add_tail):
    """Near-deterministic distributions (logits +-1e4) through the fused LM-head pass."""
    torch.manual_seed(5)
    hidden = torch.randn(8, 12).sign().requires_grad_()
    weight = (1e4 * torch.eye(12)).requires_grad_()
    teacher_hidden = torch.randn(8, 12).sign()
    ids = torch.randint(0, 12, (8,))
    terms = policy_terms(
        hidden, weight, ids, teacher_hidden=teacher_hidden, alpha=alpha, topk=topk,
        add_tail=add_tail, distill_mask=torch.arange(8) % 4 > 0,
    )  # fmt: skip
    (terms["logprobs"].sum() + terms["divergence"].sum()).backward()
    for name in ("logprobs", "entropy", "divergence", "teacher_logprobs"):
        assert torch.isfinite(terms[name]).all(), name
    assert torch.isfinite(hidden.grad).all() and torch.isfinite(weight.grad).all()


def test_half_precision_logits_are_computed_in_float32():
    torch.manual_seed(6)
    student, teacher = torch.randn(4, 32), torch.randn(4, 32)
    got = token_divergence(student.bfloat16(), teacher.bfloat16(), alpha=0.5)
    assert got.dtype == torch.float32
    want = token_divergence(student.bfloat16().float(), teacher.bfloat16().float(), alpha=0.5)
    torch.testing.assert_close(got, want)


def test_rejects_bad_arguments():
    z = torch.randn(2, 5)
    with pytest.raises(ValueError, match="alpha"):
        token_divergence(z, z, alpha=1.5)
    with pytest.raises(ValueError, match="topk"):
        token_divergence(z, z, alpha=0.5, topk=0)


# ----- token-level variant and importance weights --------------------------------------------------


def test_token_level_value_and_gradient_by_hand():
    s_y = torch.tensor([-0.5, -2.0, -1.0], requires_grad=True)
    t_y = torch.tensor([-1.5, -1.0, -1.0], requires_grad=True)
    loss = token_level_divergence(s_y, t_y)
    torch.testing.assert_close(loss, torch.tensor([1.0 * -0.5, -1.0 * -2.0, 0.0]))
    loss.sum().backward()
    # d/ds_y [sg(s_y - t_y) s_y] = s_y - t_y: descent lowers s_y where the student is above the
    # teacher (-0.5 > -1.5) and raises it where it is below; the teacher gets nothing.
    torch.testing.assert_close(s_y.grad, torch.tensor([1.0, -1.0, 0.0]))
    assert t_y.grad is None


def test_token_level_gradient_is_reverse_kl_gradient_in_expectation():
    torch.manual_seed(7)
    student = torch.randn(9, dtype=torch.float64, requires_grad=True)
    teacher = torch.randn(9, dtype=torch.float64)
    s, t = student.log_softmax(-1), teacher.log_softmax(-1)
    # E_{y~p}[grad of the sampled-token loss], summed exactly over y.
    expected = sum(
        s[y].exp().detach()
        * torch.autograd.grad(token_level_divergence(s[y], t[y]), student, retain_graph=True)[0]
        for y in range(9)
    )
    (reverse_kl_grad,) = torch.autograd.grad(token_divergence(student, teacher, alpha=1.0), student)
    torch.testing.assert_close(expected, reverse_kl_grad)


def test_importance_weights_clip_and_detach():
    logprobs = torch.tensor([0.0, math.log(1.5), math.log(3.0), 100.0], requires_grad=True)
    old = torch.zeros(4)
    clipped = importance_weights(logprobs, old, is_clip=2.0)
    torch.testing.assert_close(clipped, torch.tensor([1.0, 1.5, 2.0, 2.0]))
    assert not clipped.requires_grad
    # None = no correction (official SDPO code and TRL), not unclipped weights (up to e^20 here).
    off = importance_weights(logprobs, old, is_clip=None)
    torch.testing.assert_close(off, torch.ones(4))
    assert not off.requires_grad
    tiny = importance_weights(torch.tensor([-100.0]), torch.tensor([0.0]), is_clip=2.0)
    torch.testing.assert_close(tiny, torch.tensor([math.exp(-20.0)]))


# ----- chunked LM head ---------------------------------------------------------------------------


def _head(n=10, hidden=6, vocab=23, bias=False, dtype=torch.float32, seed=8):
    gen = torch.Generator().manual_seed(seed)
    h_s = torch.randn(n, hidden, generator=gen, dtype=dtype).requires_grad_()
    h_t = torch.randn(n, hidden, generator=gen, dtype=dtype)
    weight = torch.randn(vocab, hidden, generator=gen, dtype=dtype).requires_grad_()
    b = torch.randn(vocab, generator=gen, dtype=dtype).requires_grad_() if bias else None
    return h_s, h_t, weight, b


def _grads(out, inputs, weights):
    return torch.autograd.grad((out * weights).sum(), [x for x in inputs if x is not None])


@pytest.mark.parametrize(
    "alpha,topk,add_tail", [(0.5, None, True), (1.0, 5, True), (0.0, 5, False)]
)
@pytest.mark.parametrize("bias", [False, True])
def test_chunked_equals_unchunked(alpha, topk, add_tail, bias):
    h_s, h_t, weight, b = _head(bias=bias, dtype=torch.float64)  # float32 tails differ in rounding
    temperature = 0.7
    out_weights = torch.rand(10, dtype=torch.float64)
    logits_s = h_s @ weight.T + (0 if b is None else b)
    logits_t = h_t @ weight.T + (0 if b is None else b)
    want = token_divergence(
        logits_s / temperature, logits_t / temperature, alpha=alpha, topk=topk, add_tail=add_tail
    )
    want_grads = _grads(want, (h_s, weight, b), out_weights)
    for chunk_size in (1, 3, 4, 7, 10, 64):
        got = chunked_token_divergence(
            h_s, h_t, weight, alpha=alpha, topk=topk, add_tail=add_tail,
            temperature=temperature, chunk_size=chunk_size, lm_head_bias=b,
        )  # fmt: skip
        torch.testing.assert_close(got, want)
        for g, w in zip(_grads(got, (h_s, weight, b), out_weights), want_grads, strict=True):
            torch.testing.assert_close(g, w)


@pytest.mark.parametrize(
    "alpha,topk,add_tail", [(0.5, None, True), (1.0, 3, True), (0.0, 3, False)]
)
def test_chunked_gradcheck(alpha, topk, add_tail):
    h_s, h_t, weight, b = _head(n=5, hidden=3, vocab=6, bias=True, dtype=torch.float64)
    # A separate (constant) teacher head: with a shared one, finite differences would also move
    # the teacher's logits, which the analytical gradient rightly ignores.
    teacher_weight, teacher_bias = weight.detach().clone(), b.detach().clone()

    def fn(h, w, bias):
        return chunked_token_divergence(
            h, h_t, w, alpha=alpha, topk=topk, add_tail=add_tail, temperature=1.3, chunk_size=2,
            lm_head_bias=bias, teacher_weight=teacher_weight, teacher_bias=teacher_bias,
        )  # fmt: skip

    assert torch.autograd.gradcheck(fn, (h_s, weight, b))


def test_chunked_with_frozen_head_and_bfloat16():
    h_s, h_t, weight, b = _head(bias=True)
    weight.requires_grad_(False)
    b.requires_grad_(False)
    got = chunked_token_divergence(h_s, h_t, weight, alpha=0.5, chunk_size=3, lm_head_bias=b)
    want = token_divergence(h_s @ weight.T + b, h_t @ weight.T + b, alpha=0.5)
    torch.testing.assert_close(got, want)
    torch.testing.assert_close(*(torch.autograd.grad(x.sum(), h_s)[0] for x in (got, want)))

    half = [t.detach().bfloat16().requires_grad_(t.requires_grad) for t in (h_s, h_t, weight)]
    got = chunked_token_divergence(*half, alpha=0.5, chunk_size=4)
    assert got.dtype == torch.float32
    want = token_divergence(
        half[0].float() @ half[2].float().T, half[1].float() @ half[2].float().T, alpha=0.5
    )
    torch.testing.assert_close(got, want.detach(), atol=1e-2, rtol=1e-2)
    got.sum().backward()
    assert half[0].grad.dtype == torch.bfloat16 and torch.isfinite(half[0].grad.float()).all()


def test_chunked_teacher_side_is_constant_and_may_have_its_own_head():
    h_s, h_t, weight, _ = _head()
    h_t.requires_grad_()
    teacher_weight = torch.randn(23, 4, requires_grad=True)
    teacher_bias = torch.randn(23, requires_grad=True)
    h_t4 = torch.randn(10, 4, requires_grad=True)
    got = chunked_token_divergence(
        h_s, h_t4, weight, alpha=0.5, chunk_size=3,
        teacher_weight=teacher_weight, teacher_bias=teacher_bias,
    )  # fmt: skip
    want = token_divergence(h_s @ weight.T, h_t4 @ teacher_weight.T + teacher_bias, alpha=0.5)
    torch.testing.assert_close(got, want)
    got.sum().backward()
    assert h_t4.grad is None and teacher_weight.grad is None and teacher_bias.grad is None
    assert h_s.grad is not None and weight.grad is not None

    chunked_token_divergence(h_s, h_t, weight, alpha=1.0, chunk_size=4).sum().backward()
    assert h_t.grad is None


def test_chunked_keeps_leading_dims_and_handles_no_positions():
    h_s, h_t, weight, _ = _head(n=12)
    got = chunked_token_divergence(
        h_s.view(3, 4, 6), h_t.view(3, 4, 6), weight, alpha=0.5, chunk_size=5
    )
    assert got.shape == (3, 4)
    torch.testing.assert_close(
        got.reshape(-1), token_divergence(h_s @ weight.T, h_t @ weight.T, alpha=0.5)
    )
    empty = chunked_token_divergence(h_s[:0], h_t[:0], weight, alpha=0.5, topk=4)
    assert empty.shape == (0,)
    empty.sum().backward()


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize("topk", [None, 4])
def test_chunked_never_materializes_all_logits(topk):
    n, hidden, vocab, chunk = 64, 4, 50, 8  # n·V = 3200 > chunk·V = 400 > V·H, n·H
    h_s, h_t, weight, b = _head(n=n, hidden=hidden, vocab=vocab, bias=True)
    with _LargestTensor() as probe:
        out = chunked_token_divergence(
            h_s, h_t, weight, alpha=0.5, topk=topk, chunk_size=chunk, lm_head_bias=b
        )
        out.sum().backward()
        logprobs = chunked_token_logprobs(
            h_s, weight, torch.zeros(n, dtype=torch.long), chunk_size=chunk
        )
        logprobs.sum().backward()
        mask = torch.arange(n) % 3 > 0
        terms = policy_terms(h_s, weight, torch.zeros(n, dtype=torch.long), teacher_hidden=h_t,
                             distill_mask=mask, topk=topk, chunk_size=chunk, lm_head_bias=b)  # fmt: skip
        (terms["logprobs"].sum() + terms["divergence"].sum()).backward()
    assert probe.largest == chunk * vocab
    with _LargestTensor() as probe:  # the probe does see a full-size product
        (h_s @ weight.T).sum().backward()
    assert probe.largest == n * vocab


@pytest.mark.parametrize("bias", [False, True])
def test_chunked_token_logprobs_matches_log_softmax(bias):
    h, _, weight, b = _head(n=11, bias=bias)
    ids = torch.randint(0, 23, (11,), generator=torch.Generator().manual_seed(0))
    logits = (h @ weight.T + (0 if b is None else b)) / 0.8
    log_p = logits.log_softmax(-1)
    want = log_p.gather(-1, ids[:, None]).squeeze(-1)
    want_entropy = -(log_p.exp() * log_p).sum(-1)
    out_weights = torch.rand(11)
    want_grads = _grads(want, (h, weight, b), out_weights)
    for chunk_size in (1, 4, 11, 100):
        got, entropy = chunked_token_logprobs(
            h,
            weight,
            ids,
            temperature=0.8,
            chunk_size=chunk_size,
            lm_head_bias=b,
            with_entropy=True,
        )
        torch.testing.assert_close(got, want)
        torch.testing.assert_close(entropy, want_entropy.detach())
        assert not entropy.requires_grad
        for g, w in zip(_grads(got, (h, weight, b), out_weights), want_grads, strict=True):
            torch.testing.assert_close(g, w)
    only = chunked_token_logprobs(
        h.view(1, 11, 6), weight, ids.view(1, 11), chunk_size=3, lm_head_bias=b
    )
    assert only.shape == (1, 11)


def test_chunked_without_grad_needs_no_checkpoint():
    h_s, h_t, weight, _ = _head()
    with torch.no_grad():
        got = chunked_token_divergence(h_s, h_t, weight, alpha=0.5, chunk_size=3)
        logprobs = chunked_token_logprobs(
            h_s, weight, torch.zeros(10, dtype=torch.long), chunk_size=3
        )
    assert not got.requires_grad and not logprobs.requires_grad
    with pytest.raises(ValueError, match="chunk_size"):
        chunked_token_divergence(h_s, h_t, weight, alpha=0.5, chunk_size=0)


@pytest.mark.parametrize(
    "level,alpha,topk,add_tail",
    [
        ("logit", 0.5, None, True),
        ("logit", 0.0, None, True),
        ("logit", 1.0, 4, True),
        ("logit", 0.5, 4, True),
        ("logit", 0.0, 4, False),
        ("logit", 0.3, 1, True),
        ("logit", 0.5, 23, True),  # k = V: the tail is empty (clamped), no gradient through it
        ("token", 1.0, None, True),
    ],
)
@pytest.mark.parametrize("all_distilled", [False, True])
def test_policy_terms_is_one_pass_of_the_separate_functions(
    level, alpha, topk, add_tail, all_distilled
):
    """policy_terms' hand-written backward equals autograd through the separate functions."""
    h_s, h_t, weight, b = _head(n=9, bias=True, dtype=torch.float64)
    teacher_weight = torch.randn(23, 6, dtype=torch.float64)
    ids = torch.randint(0, 23, (9,), generator=torch.Generator().manual_seed(1))
    distill_mask = torch.tensor([1, 1, 0, 1, 0, 0, 1, 1, 1], dtype=torch.bool) | all_distilled
    kwargs = dict(temperature=0.9, lm_head_bias=b)
    terms = policy_terms(
        h_s, weight, ids, teacher_hidden=h_t, teacher_weight=teacher_weight, distill_mask=distill_mask,
        alpha=alpha, topk=topk, add_tail=add_tail, level=level, chunk_size=4, **kwargs,
    )  # fmt: skip
    logprobs, entropy = chunked_token_logprobs(h_s, weight, ids, with_entropy=True, **kwargs)
    teacher_logprobs = chunked_token_logprobs(h_t, teacher_weight, ids, temperature=0.9)
    if level == "logit":
        divergence = chunked_token_divergence(
            h_s, h_t, weight, alpha=alpha, topk=topk, add_tail=add_tail,
            teacher_weight=teacher_weight, **kwargs,
        )  # fmt: skip
    else:
        divergence = token_level_divergence(logprobs, teacher_logprobs)
    divergence = divergence * distill_mask
    torch.testing.assert_close(terms["logprobs"], logprobs)
    torch.testing.assert_close(terms["entropy"], entropy)
    torch.testing.assert_close(terms["divergence"], divergence)
    torch.testing.assert_close(terms["teacher_logprobs"], teacher_logprobs * distill_mask)
    assert not terms["entropy"].requires_grad and not terms["teacher_logprobs"].requires_grad
    w1, w2 = torch.rand(9, dtype=torch.float64), torch.rand(9, dtype=torch.float64)
    got = _grads(terms["logprobs"] * w1 + terms["divergence"] * w2, (h_s, weight, b), 1.0)
    want = _grads(logprobs * w1 + divergence * w2, (h_s, weight, b), 1.0)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)


def test_policy_terms_without_teacher_and_with_nothing_distilled():
    h_s, h_t, weight, _ = _head(n=7)
    ids = torch.zeros(7, dtype=torch.long)
    terms = policy_terms(h_s, weight, ids, chunk_size=3)
    assert set(terms) == {"logprobs", "entropy"}
    terms = policy_terms(
        h_s,
        weight,
        ids,
        teacher_hidden=h_t,
        distill_mask=torch.zeros(7, dtype=torch.bool),
        chunk_size=3,
    )
    assert (terms["divergence"] == 0).all() and (terms["teacher_logprobs"] == 0).all()
    (terms["logprobs"].sum() + terms["divergence"].sum()).backward()
    assert torch.isfinite(h_s.grad).all()
    with pytest.raises(ValueError, match="level"):
        policy_terms(h_s, weight, ids, teacher_hidden=h_t, level="sequence")


# ----- aggregation -------------------------------------------------------------------------------


def test_loss_averages_over_distilled_tokens_only():
    divergence = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 6.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 0], [0, 0, 0]])
    loss, metrics = self_distillation_loss(divergence, mask)
    assert loss.item() == pytest.approx(1.5)
    assert metrics == {"divergence_mean": 1.5, "distilled_tokens": 2.0, "is_ratio_mean": 1.0}
    loss.backward()
    torch.testing.assert_close(divergence.grad, torch.tensor([[0.5, 0.5, 0.0], [0.0, 0.0, 0.0]]))


def test_masked_rows_do_not_change_the_loss():
    torch.manual_seed(9)
    divergence = torch.rand(3, 5)
    mask = torch.rand(3, 5) > 0.3
    weights = 2 * torch.rand(3, 5)
    base, _ = self_distillation_loss(divergence, mask, is_weights=weights)
    # Rows without a teacher context, holding anything (even inf/nan), do not dilute or poison.
    extra = torch.tensor([[7.0, float("inf"), float("nan"), 1.0, 2.0]] * 2)
    padded, metrics = self_distillation_loss(
        torch.cat([divergence, extra]),
        torch.cat([mask, torch.zeros(2, 5, dtype=torch.bool)]),
        is_weights=torch.cat([weights, torch.ones(2, 5)]),
    )
    torch.testing.assert_close(padded, base)
    assert metrics["distilled_tokens"] == float(mask.sum())


def test_weights_and_metrics_by_hand():
    divergence = torch.tensor([[1.0, 3.0, 5.0]], requires_grad=True)
    mask = torch.tensor([[True, True, False]])
    weights = torch.tensor([[0.5, 2.0, 9.0]], requires_grad=True)
    loss, metrics = self_distillation_loss(divergence, mask, is_weights=weights)
    assert loss.item() == pytest.approx((0.5 * 1 + 2.0 * 3) / 2)
    assert metrics["divergence_mean"] == pytest.approx(2.0)
    assert metrics["is_ratio_mean"] == pytest.approx(1.25)
    loss.backward()
    assert weights.grad is None
    torch.testing.assert_close(divergence.grad, torch.tensor([[0.25, 1.0, 0.0]]))


def test_global_normalizer_makes_micro_batches_add_up():
    torch.manual_seed(10)
    divergence, mask = torch.rand(6, 4), torch.rand(6, 4) > 0.4
    mask[0] = False  # a row with no teacher context
    whole, _ = self_distillation_loss(divergence, mask)
    total = float(mask.sum())
    parts = [
        self_distillation_loss(divergence[i : i + 2], mask[i : i + 2], normalizer=total)[0]
        for i in (0, 2, 4)
    ]
    torch.testing.assert_close(sum(parts), whole)


def test_empty_mask_gives_connected_zero_loss():
    divergence = torch.rand(2, 3, requires_grad=True)
    loss, metrics = self_distillation_loss(divergence, torch.zeros(2, 3, dtype=torch.bool))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    torch.testing.assert_close(divergence.grad, torch.zeros(2, 3))
    assert metrics == {"divergence_mean": 0.0, "distilled_tokens": 0.0, "is_ratio_mean": 1.0}


@pytest.mark.parametrize("topk", [None, 3])
def test_policy_terms_entropy_with_masked_vocabulary_matches_float64(topk):
    """A ``−inf`` logit (masked entry) has ``p = 0`` and adds ``0·log 0 = 0`` to the entropy."""
    torch.manual_seed(0)
    n, h, v = 6, 8, 12
    hidden, weight = torch.randn(n, h), torch.randn(v, h)
    bias = torch.zeros(v)
    bias[[2, 7, 11]] = float("-inf")
    ids = torch.tensor([0, 1, 3, 4, 5, 6])
    out = policy_terms(
        hidden,
        weight,
        ids,
        lm_head_bias=bias,
        teacher_hidden=torch.randn(n, h),
        teacher_weight=weight,
        teacher_bias=bias,
        distill_mask=torch.ones(n, dtype=torch.bool),
        topk=topk,
        chunk_size=4,
    )
    z = hidden.double() @ weight.double().T
    keep = torch.isfinite(bias)
    logp = torch.log_softmax(z[:, keep], dim=-1)
    want = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(out["entropy"].double(), want, rtol=1e-5, atol=1e-6)
