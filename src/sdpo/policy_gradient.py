"""GRPO-style policy gradient and the k3 reference-KL penalty (SPEC §5).

- Advantage: ``A_i = r_i − mean(r_group)``, optionally ``/ (std(r_group) + ε)``; every token of a
  completion shares it.
- Surrogate: ``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)`` with ``ρ = exp(logπ_θ − logπ_old)``.
- Aggregation: token-mean (DAPO), sequence-mean of token-means (GRPO), or Dr. GRPO's constant
  normalizer — each over whole-step counts so micro-batching does not change the result.
- Reference KL (k3): ``exp(r_ref − r_θ) − (r_ref − r_θ) − 1`` per token.
"""

from __future__ import annotations

import torch
from torch import Tensor

LOSS_AGGREGATIONS = ("token_mean", "sequence_mean", "dr_grpo")


def grpo_advantages(
    rewards: Tensor, group_ids: Tensor, *, scale_rewards: bool = True, eps: float = 1e-6
) -> Tensor:
    """Group-relative advantages: ``A_i = (r_i − mean_g) / (std_g + ε)`` (``/ …`` only with ``scale_rewards``).

    ``std_g`` is the unbiased (Bessel-corrected, ``n − 1``) standard deviation, as ``torch.std``
    and TRL compute it; a group of one has ``std_g = 0``. Groups whose rewards are all equal get
    exactly 0 (no NaN, no rounding residue), so they contribute no policy gradient.

    Args:
        rewards: ``[N]`` one scalar per completion.
        group_ids: ``[N]`` (long) the prompt/group of each completion; any ids, in any order.
        scale_rewards: divide by the group's std + ε.
        eps: keeps the division finite for near-flat groups.

    Returns:
        ``[N]`` advantages (float, at least float32).
    """
    rewards = rewards.to(torch.promote_types(rewards.dtype, torch.float32))
    _, group = torch.unique(group_ids, return_inverse=True)
    num_groups = int(group.max()) + 1 if group.numel() else 0
    counts = torch.bincount(group, minlength=num_groups).to(rewards.dtype)
    sums = rewards.new_zeros(num_groups).index_add_(0, group, rewards)
    centered = rewards - (sums / counts)[group]
    advantages = centered
    if scale_rewards:
        squares = rewards.new_zeros(num_groups).index_add_(0, group, centered.square())
        std = (squares / (counts - 1).clamp(min=1)).sqrt()
        advantages = centered / (std[group] + eps)
    group_max = rewards.new_full((num_groups,), -torch.inf).scatter_reduce(
        0, group, rewards, "amax"
    )
    group_min = rewards.new_full((num_groups,), torch.inf).scatter_reduce(0, group, rewards, "amin")
    flat = (group_max == group_min)[group]
    return advantages.masked_fill(flat, 0.0)


def clipped_surrogate(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    *,
    eps_low: float,
    eps_high: float,
) -> tuple[Tensor, Tensor]:
    """PPO/GRPO clipped surrogate per token: ``−min(ρ·A, clip(ρ, 1−ε_low, 1+ε_high)·A)``.

    ``ρ = exp(logπ_θ − logπ_old)``. A token is *clipped* where the clipped branch is active and
    carries no gradient: ``ρ > 1+ε_high`` with ``A > 0``, or ``ρ < 1−ε_low`` with ``A < 0``.

    Args:
        logprobs: ``[B, T]`` sampled-token log-probs under the current policy (with gradient).
        old_logprobs: ``[B, T]`` the same under the sampling policy (constant).
        advantages: ``[B]`` one per sequence (broadcast over tokens), or ``[B, T]`` per token.
        eps_low: lower clip range ``ε_low``.
        eps_high: upper clip range ``ε_high`` (DAPO: 0.28).

    Returns:
        ``(per_token_loss [B, T], clipped [B, T] bool)``.
    """
    if advantages.dim() == logprobs.dim() - 1:
        advantages = advantages.unsqueeze(-1)
    advantages = advantages.detach()
    ratio = torch.exp(logprobs - old_logprobs.detach())
    clipped_ratio = ratio.clamp(1.0 - eps_low, 1.0 + eps_high)
    per_token_loss = -torch.min(ratio * advantages, clipped_ratio * advantages)
    clipped = ((ratio > 1.0 + eps_high) & (advantages > 0)) | (
        (ratio < 1.0 - eps_low) & (advantages < 0)
    )
    return per_token_loss, clipped


def aggregate_loss(
    per_token: Tensor,
    mask: Tensor,
    mode: str,
    *,
    num_tokens: float | None = None,
    num_sequences: float | None = None,
    max_completion_length: int | None = None,
) -> Tensor:
    """Reduce a per-token loss to a scalar.

    - ``token_mean`` (DAPO): ``Σ_{b,t} ℓ·mask / num_tokens``;
    - ``sequence_mean`` (GRPO): ``Σ_b (Σ_t ℓ·mask / Σ_t mask) / num_sequences``;
    - ``dr_grpo`` (Dr. GRPO): ``Σ_{b,t} ℓ·mask / (num_sequences · max_completion_length)``.

    The counts default to this batch's own (``mask.sum()``, ``B`` rows, ``T``); every denominator is
    at least 1. A trainer that splits a step into micro-batches passes the whole step's counts and
    sums the results, which then equal the loss of the unsplit step.

    Args:
        per_token: ``[B, T]`` per-token loss.
        mask: ``[B, T]`` bool or 0/1, True at completion tokens.
        mode: one of ``token_mean``, ``sequence_mean``, ``dr_grpo``.
        num_tokens: denominator of ``token_mean``.
        num_sequences: number of sequences for ``sequence_mean`` and ``dr_grpo``.
        max_completion_length: the constant length of ``dr_grpo``.

    Returns:
        Scalar loss.
    """
    if mode not in LOSS_AGGREGATIONS:
        raise ValueError(f"Unknown loss aggregation {mode!r}; choose one of {LOSS_AGGREGATIONS}.")
    mask = mask.bool()
    # where, not multiply: padded positions may hold inf/nan (inf·0 = nan).
    masked = torch.where(mask, per_token, torch.zeros_like(per_token))
    # Denominators are at least 1, so a step with no completion tokens gives 0, not nan.
    if num_sequences is None:
        num_sequences = per_token.shape[0]
    num_sequences = max(float(num_sequences), 1.0)
    if mode == "token_mean":
        num_tokens = float(mask.sum()) if num_tokens is None else float(num_tokens)
        return masked.sum() / max(num_tokens, 1.0)
    if mode == "sequence_mean":
        sequence_means = masked.sum(-1) / mask.sum(-1).clamp(min=1)
        return sequence_means.sum() / num_sequences
    if max_completion_length is None:
        max_completion_length = per_token.shape[-1]
    return masked.sum() / max(num_sequences * max_completion_length, 1.0)


def k3_kl(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 estimator of ``KL(π_θ ‖ π_ref)`` per token: ``exp(r) − r − 1`` with ``r = logπ_ref − logπ_θ``.

    Unbiased for tokens sampled from ``π_θ`` and ``≥ 0`` everywhere.

    Args:
        logprobs: ``[...]`` sampled-token log-probs under the policy (with gradient).
        ref_logprobs: ``[...]`` the same under the reference model (constant).

    Returns:
        ``[...]`` per-token penalty.
    """
    log_ratio = ref_logprobs.detach() - logprobs
    return torch.exp(log_ratio) - log_ratio - 1.0


def clip_fraction(clipped: Tensor, mask: Tensor) -> float:
    """Fraction of completion tokens whose ratio was clipped (``clip_ratio`` metric); 0.0 if none."""
    mask = mask.bool()
    num_tokens = int(mask.sum())
    if num_tokens == 0:
        return 0.0
    return float((clipped.bool() & mask).sum()) / num_tokens
