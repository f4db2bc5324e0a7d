"""Policy-gradient math by hand: GRPO advantages, clipped surrogate, aggregation, k3."""

from __future__ import annotations

import math

import pytest
import torch

from sdpo.policy_gradient import (
    aggregate_loss,
    clip_fraction,
    clipped_surrogate,
    grpo_advantages,
    k3_kl,
)

# ----- advantages --------------------------------------------------------------------------------


def test_grpo_advantages_by_hand_with_unbiased_std():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 4.0])
    groups = torch.tensor([0, 0, 0, 0, 1, 1])
    # group 0: mean 0.5, unbiased std sqrt(4 * 0.25 / 3); group 1: mean 3, std sqrt(2 / 1)
    std0, std1 = math.sqrt(1.0 / 3.0), math.sqrt(2.0)
    want = torch.tensor([0.5 / std0, -0.5 / std0, -0.5 / std0, 0.5 / std0, -1.0 / std1, 1.0 / std1])
    got = grpo_advantages(rewards, groups, eps=0.0)
    torch.testing.assert_close(got, want)
    unscaled = grpo_advantages(rewards, groups, scale_rewards=False)
    torch.testing.assert_close(unscaled, torch.tensor([0.5, -0.5, -0.5, 0.5, -1.0, 1.0]))
    # eps sits in the denominator: A = (r - mean) / (std + eps)
    torch.testing.assert_close(
        grpo_advantages(rewards, groups, eps=0.5)[4], torch.tensor(-1.0 / (std1 + 0.5))
    )


def test_flat_and_singleton_groups_get_zero_advantage():
    rewards = torch.tensor([0.1, 0.1, 0.1, 1.0, 1.0, 0.3])
    groups = torch.tensor([0, 0, 0, 1, 1, 2])
    for scale in (True, False):
        got = grpo_advantages(rewards, groups, scale_rewards=scale)
        assert torch.isfinite(got).all()
        assert (got == 0).all()  # exactly 0, no rounding residue from the mean


def test_non_contiguous_group_ids():
    rewards = torch.tensor([1.0, 5.0, 3.0, 7.0, 2.0])
    groups = torch.tensor([42, 7, 42, 7, -3])
    got = grpo_advantages(rewards, groups, scale_rewards=False)
    torch.testing.assert_close(got, torch.tensor([-1.0, -1.0, 1.0, 1.0, 0.0]))
    perm = torch.tensor([3, 0, 4, 1, 2])
    torch.testing.assert_close(
        grpo_advantages(rewards[perm], groups[perm]), grpo_advantages(rewards, groups)[perm]
    )


def test_integer_rewards_and_empty_batch():
    got = grpo_advantages(torch.tensor([1, 0]), torch.tensor([0, 0]), scale_rewards=False)
    torch.testing.assert_close(got, torch.tensor([0.5, -0.5]))
    assert grpo_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).shape == (0,)


# ----- clipped surrogate -------------------------------------------------------------------------


def _surrogate(ratio: float, advantage: float, eps_low=0.2, eps_high=0.28):
    logprobs = torch.tensor([[math.log(ratio)]], dtype=torch.float64, requires_grad=True)
    old = torch.zeros(1, 1, dtype=torch.float64)
    loss, clipped = clipped_surrogate(
        logprobs,
        old,
        torch.tensor([advantage], dtype=torch.float64),
        eps_low=eps_low,
        eps_high=eps_high,
    )
    loss.sum().backward()
    return loss.item(), bool(clipped.item()), logprobs.grad.item()


@pytest.mark.parametrize(
    "ratio,advantage,loss,clipped",
    [
        (1.1, 2.0, -1.1 * 2.0, False),  # inside: -rho*A
        (1.5, 2.0, -1.28 * 2.0, True),  # A > 0 above 1+eps_high: capped
        (0.5, 2.0, -0.5 * 2.0, False),  # A > 0 below 1-eps_low: min keeps rho*A (still pushes up)
        (0.9, -1.0, 0.9, False),  # inside, negative advantage
        (0.5, -1.0, 0.8, True),  # A < 0 below 1-eps_low: capped at (1-eps_low)*A
        (1.5, -1.0, 1.5, False),  # A < 0 above 1+eps_high: min keeps rho*A (pushes down)
    ],
)
def test_clipped_surrogate_by_hand(ratio, advantage, loss, clipped):
    got_loss, got_clipped, grad = _surrogate(ratio, advantage)
    assert got_loss == pytest.approx(loss)
    assert got_clipped == clipped
    # d(-rho*A)/dlogpi = -rho*A when unclipped; zero gradient when the clipped branch is active.
    assert grad == pytest.approx(0.0 if clipped else -ratio * advantage)


def test_clipped_surrogate_broadcasts_and_accepts_per_token_advantages():
    logprobs = torch.log(torch.tensor([[1.0, 1.5], [0.5, 1.0]]))
    old = torch.zeros(2, 2)
    loss, clipped = clipped_surrogate(
        logprobs, old, torch.tensor([1.0, -1.0]), eps_low=0.2, eps_high=0.2
    )
    torch.testing.assert_close(loss, torch.tensor([[-1.0, -1.2], [0.8, 1.0]]))
    assert clipped.tolist() == [[False, True], [True, False]]
    per_token, _ = clipped_surrogate(
        logprobs, old, torch.tensor([[1.0, 1.0], [-1.0, -1.0]]), eps_low=0.2, eps_high=0.2
    )
    torch.testing.assert_close(per_token, loss)


def test_on_policy_surrogate_gradient_is_minus_advantage():
    logprobs = torch.randn(3, 4, requires_grad=True)
    advantages = torch.tensor([1.0, -2.0, 0.5])
    loss, clipped = clipped_surrogate(
        logprobs, logprobs.detach(), advantages, eps_low=0.2, eps_high=0.28
    )
    loss.sum().backward()
    torch.testing.assert_close(logprobs.grad, -advantages[:, None].expand(3, 4))
    assert not clipped.any()


# ----- aggregation -------------------------------------------------------------------------------

PER_TOKEN = torch.tensor([[1.0, 2.0, 3.0, 4.0], [5.0, 6.0, 0.0, 0.0], [7.0, 0.0, 0.0, 0.0]])
MASK = torch.tensor([[1, 1, 1, 0], [1, 1, 0, 0], [1, 0, 0, 0]], dtype=torch.bool)


def test_aggregation_modes_by_hand():
    # masked sum = 1+2+3 + 5+6 + 7 = 24 over 6 tokens; sequence means 2, 5.5, 7
    assert aggregate_loss(PER_TOKEN, MASK, "token_mean").item() == pytest.approx(24 / 6)
    assert aggregate_loss(PER_TOKEN, MASK, "sequence_mean").item() == pytest.approx(
        (2 + 5.5 + 7) / 3
    )
    assert aggregate_loss(PER_TOKEN, MASK, "dr_grpo").item() == pytest.approx(24 / (3 * 4))
    got = aggregate_loss(PER_TOKEN, MASK, "dr_grpo", max_completion_length=8)
    assert got.item() == pytest.approx(24 / (3 * 8))


def test_padding_values_never_leak():
    poisoned = PER_TOKEN.masked_fill(~MASK, float("nan"))
    for mode in ("token_mean", "sequence_mean", "dr_grpo"):
        torch.testing.assert_close(
            aggregate_loss(poisoned, MASK, mode), aggregate_loss(PER_TOKEN, MASK, mode)
        )


@pytest.mark.parametrize("mode", ["token_mean", "sequence_mean", "dr_grpo"])
def test_micro_batches_with_global_counts_sum_to_the_whole(mode):
    torch.manual_seed(0)
    per_token = torch.randn(6, 5, requires_grad=True)
    mask = torch.rand(6, 5) > 0.3
    mask[2] = False  # an empty completion
    whole = aggregate_loss(per_token, mask, mode)
    (whole_grad,) = torch.autograd.grad(whole, per_token)
    counts = dict(num_tokens=float(mask.sum()), num_sequences=6.0, max_completion_length=5)
    for split in ([4, 2], [1, 5], [3, 3]):
        parts = [
            aggregate_loss(pt, m, mode, **counts)
            for pt, m in zip(per_token.split(split), mask.split(split), strict=True)
        ]
        total = sum(parts)
        torch.testing.assert_close(total, whole)
        torch.testing.assert_close(torch.autograd.grad(total, per_token)[0], whole_grad)
    # Without global counts the split result differs (here): the counts are what make it invariant.
    naive = sum(
        aggregate_loss(pt, m, mode)
        for pt, m in zip(per_token.split([4, 2]), mask.split([4, 2]), strict=True)
    )
    assert not torch.allclose(naive, whole)


def test_unknown_aggregation_names_the_choices():
    with pytest.raises(ValueError, match="token_mean"):
        aggregate_loss(PER_TOKEN, MASK, "mean")


def test_empty_mask_is_zero_not_nan():
    for mode in ("token_mean", "sequence_mean", "dr_grpo"):
        assert aggregate_loss(PER_TOKEN, torch.zeros_like(MASK), mode).item() == 0.0
        zero_counts = dict(num_tokens=0.0, num_sequences=0.0, max_completion_length=0)
        assert aggregate_loss(PER_TOKEN[:0], MASK[:0], mode, **zero_counts).item() == 0.0


# ----- k3 and clip fraction ----------------------------------------------------------------------


def test_k3_by_hand():
    logprobs = torch.tensor([-1.0, -2.0, -0.5], requires_grad=True)
    ref = torch.tensor([-1.0, -1.0, -1.5])
    # r = ref - logprobs = [0, 1, -1] -> e^r - r - 1 = [0, e - 2, 1/e]
    got = k3_kl(logprobs, ref)
    torch.testing.assert_close(got, torch.tensor([0.0, math.e - 2.0, math.exp(-1.0)]))
    got.sum().backward()
    # d/dlogpi (e^r - r - 1) = 1 - e^r
    torch.testing.assert_close(
        logprobs.grad, torch.tensor([0.0, 1.0 - math.e, 1.0 - math.exp(-1.0)])
    )
    torch.manual_seed(0)
    assert (k3_kl(torch.randn(100), torch.randn(100)) >= 0).all()


def test_k3_is_unbiased_for_kl():
    torch.manual_seed(1)
    logits, ref_logits = torch.randn(6, dtype=torch.float64), torch.randn(6, dtype=torch.float64)
    logp, logq = logits.log_softmax(-1), ref_logits.log_softmax(-1)
    expected_k3 = (logp.exp() * k3_kl(logp, logq)).sum()  # exact expectation over tokens ~ pi_theta
    torch.testing.assert_close(expected_k3, (logp.exp() * (logp - logq)).sum())


def test_clip_fraction():
    clipped = torch.tensor([[True, False, True], [True, False, False]])
    mask = torch.tensor([[1, 1, 0], [1, 1, 1]])
    assert clip_fraction(clipped, mask) == pytest.approx(2 / 5)
    assert clip_fraction(clipped, torch.zeros_like(mask)) == 0.0
