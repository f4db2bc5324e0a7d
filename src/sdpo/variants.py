"""Method variants of SDPO (docs/method.md): per-sequence and per-token modifiers of the loss.

Each function is one entry of :data:`sdpo.loss.BATCH_MODIFIERS` (``(loss, rollouts, batch)``,
edits the :class:`~sdpo.loss.PreparedBatch` before the step's counts are taken) or
:data:`sdpo.loss.TOKEN_MODIFIERS` (``(loss, mb)``, edits a :class:`~sdpo.loss.MicroBatch` before
the terms run), and returns at once when its config key is at the neutral setting, so a config that
does not name it keeps plain SDPO's loss bit for bit. Notation: ``A_i`` the sequence's advantage,
``π_t = π_θ(y_t | x, y_<t)`` the student's and ``q_t = π(y_t | x', y_<t)`` the teacher's
probability of the sampled token, ``p̂_g`` the success rate of question ``g``'s group.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from sdpo.config import SDPOConfig
from sdpo.policy_model import RolloutBatch

# sdpo.loss imports this module, so its classes are not imported here (no import cycle):
SDPOLoss = Any  # sdpo.loss.SDPOLoss: .config
PreparedBatch = Any  # sdpo.loss.PreparedBatch: advantages, distilled, distill_weights
MicroBatch = Any  # sdpo.loss.MicroBatch: head, mask, advantages, distill_mask, pg_weights, ...


def needs_teacher(config: SDPOConfig) -> bool:
    """Whether a run computes teacher contexts and runs the teacher pass: it distills, or a
    variant reads the teacher's log-probs (RLSD, the Eq. 3 advantage blend)."""
    pg = config.policy_gradient
    return (
        config.self_distillation.distillation_weight > 0
        or pg.rlsd_max_weight is not None
        or pg.advantage_blend is not None
    )


# ----- per sequence (BATCH_MODIFIERS) ------------------------------------------------------------


def _successes(rollouts: RolloutBatch, threshold: float, device: torch.device) -> Tensor:
    """``[N]`` bool: the rows the run counts as successes (``success_scores`` — the success rule
    of several reward functions — when the trainer set them, else the rewards) ``≥ threshold``."""
    scores = getattr(rollouts, "success_scores", None)
    if scores is None or len(scores) == 0:
        scores = rollouts.rewards
    return torch.as_tensor(scores, dtype=torch.float32).to(device) >= threshold


def clip_advantages(loss: SDPOLoss, rollouts: RolloutBatch, batch: PreparedBatch) -> None:
    """Advantage clipping ``A_i ← clamp(A_i, −c, c)``, ``c = policy_gradient.advantage_clip``
    (the paper's test-time runs clip at 5.0, arXiv 2601.20802 Table 12; async SDPO clips at 3×
    a running mean). ``[N]`` → ``[N]``."""
    c = loss.config.policy_gradient.advantage_clip
    if c is not None:
        batch.advantages = batch.advantages.clamp(-c, c)


def route_by_correctness(loss: SDPOLoss, rollouts: RolloutBatch, batch: PreparedBatch) -> None:
    """SRPO's routing (arXiv 2604.02288): only failed rollouts (``r_i < τ``,
    ``τ = success_reward_threshold``) are distilled; the others — the successes, and failures
    without a teacher context — get the routed PG term (:func:`sdpo.loss.routed_pg_term`).

        L = w_d · [ Σ_{i∉D} PG_i / norm_pg  +  Σ_{i∈D} Σ_t div_it / N_D ],
        D = {i : r_i < τ and row i has a teacher context}

    Distilling a correct answer toward a teacher that saw a demonstration is ambiguous (SRPO's
    first cause of collapse); a PG step on it is not."""
    sd = loss.config.self_distillation
    if sd.routing != "correctness":
        return
    failed = ~_successes(rollouts, sd.success_reward_threshold, batch.distilled.device)
    batch.distilled = batch.distilled & failed


def pass_rate_weights(loss: SDPOLoss, rollouts: RolloutBatch, batch: PreparedBatch) -> None:
    """SC-SDPO's per-question weight (arXiv 2605.27765): the distillation term of every row of
    question ``g`` is multiplied by ``w_g = √(p̂_g (1 − p̂_g))``, ``p̂_g`` = the share of the group's
    rollouts with ``r ≥ success_reward_threshold``. GRPO's std normalization focuses on
    medium-difficulty questions implicitly; this gives SDPO the same focus. All-fail and
    all-success groups get weight 0 (on a task where most groups fail, this removes most of the
    signal: see docs/method.md). ``[N]`` weights, multiplied into ``batch.distill_weights``."""
    sd = loss.config.self_distillation
    if not sd.pass_rate_weighting:
        return
    groups = rollouts.group_ids.to(batch.distilled.device)
    success = _successes(rollouts, sd.success_reward_threshold, groups.device).double()
    n = int(groups.max()) + 1
    hits = torch.zeros(n, dtype=torch.float64, device=groups.device).index_add_(0, groups, success)
    size = torch.zeros_like(hits).index_add_(0, groups, torch.ones_like(success))
    p = hits / size.clamp(min=1.0)
    w = (p * (1.0 - p)).sqrt()[groups].float()
    batch.distill_weights = w if batch.distill_weights is None else batch.distill_weights * w


# ----- per token (TOKEN_MODIFIERS) ---------------------------------------------------------------


def clip_divergence(loss: SDPOLoss, mb: MicroBatch) -> None:
    """Per-token divergence clipping ``div_t ← min(div_t, c)``, ``c =
    self_distillation.divergence_clip`` (OPSD's pointwise clip, siyan-zhao/OPSD#24): a token whose
    divergence is above ``c`` adds ``c`` to the loss and nothing to the gradient, so one token with
    a huge divergence (a teacher that saw the answer) cannot dominate the step. ``[n]`` → ``[n]``."""
    c = loss.config.self_distillation.divergence_clip
    if c is not None and mb.distilled:
        mb.head["divergence"] = mb.head["divergence"].clamp(max=c)


def entropy_gate(loss: SDPOLoss, mb: MicroBatch) -> None:
    """Entropy gating: no distillation at the student's forks,

        w_t ← w_t · 1[H_t ≤ h],     H_t = −Σ_v π(v|x, y_<t) log π(v|x, y_<t),  h = self_distillation.entropy_gate

    (gated tokens still count in ``N_D``). At a fork (high student entropy) a teacher that saw the
    demonstration or the answer is confident for reasons only its context explains, and
    distilling there removes the student's exploration: Kaur et al. (arXiv 2607.05184) trace
    self-distillation's losses to lower fork rates at high-entropy positions, Kim et al.
    (2603.24472) to suppressed epistemic tokens; SRPO (2604.02288) and Anti-SD (2605.11609) gate on
    entropy / over-confidence. ``[n]`` weights into ``mb.distill_weights``."""
    h = loss.config.self_distillation.entropy_gate
    if h is None or not mb.distilled:
        return
    keep = (mb.head["entropy"] <= h).to(mb.head["divergence"].dtype)
    mb.distill_weights = keep if mb.distill_weights is None else mb.distill_weights * keep


def _token_advantages(mb: MicroBatch) -> Tensor:
    """``[n]``: each completion token's sequence advantage (or its own, if already per token)."""
    a = mb.advantages
    return (a.unsqueeze(-1).expand_as(mb.mask) if a.dim() == 1 else a)[mb.mask]


def _log_ratio(mb: MicroBatch) -> Tensor:
    """``[n]``: ``log q_t − log π_t`` at distilled tokens (detached), 0 elsewhere."""
    gap = mb.head["teacher_logprobs"] - mb.head["logprobs"].detach()
    return torch.where(mb.distill_mask, gap, torch.zeros_like(gap))


def rlsd_weights(loss: SDPOLoss, mb: MicroBatch) -> None:
    """RLSD (arXiv 2604.03128): the reward decides the direction, the teacher only the size of
    each token's step. The PG term's per-token surrogate is multiplied by

        m_t = min(exp(sign(A_i) · (log q_t − log π_t)), c),    c = policy_gradient.rlsd_max_weight

    at tokens with a teacher (``m_t = 1`` elsewhere). ``m_t ≥ 0``, so the step on ``y_t`` always
    has ``A_i``'s sign: a token copied from the teacher's context into a failed answer is pushed
    down, never up. In a success, tokens the teacher prefers more than the student get a larger
    push up; in a failure, tokens the teacher prefers less get a larger push down. (We write the
    exponent with ``sign(A_i)`` so that both directions move the student toward the teacher.)
    ``[b, L]`` weights into ``mb.pg_weights``."""
    c = loss.config.policy_gradient.rlsd_max_weight
    if c is None or not mb.distilled:
        return
    sign = torch.sign(_token_advantages(mb)).to(mb.head["logprobs"].dtype)
    m = torch.exp(sign * _log_ratio(mb)).clamp(max=c)
    m = torch.where(mb.distill_mask, m, torch.ones_like(m))
    w = m.new_zeros(mb.mask.shape).masked_scatter(mb.mask, m)
    mb.pg_weights = w if mb.pg_weights is None else mb.pg_weights * w


def blend_advantages(loss: SDPOLoss, mb: MicroBatch) -> None:
    """The paper's Eq. 3 (arXiv 2601.20802, §4): the PG term's per-token advantage

        A_it = λ · A_i^GRPO + (1 − λ) · (log q_t − log π_t),     λ = policy_gradient.advantage_blend

    with the SDPO advantage ``log q_t − log π_t`` (Prop. 2.1: the reverse KL's gradient is a PG
    step with this advantage) at tokens with a teacher and 0 elsewhere. On policy, with
    ``loss_aggregation=token_mean`` and ``pg_loss_weight = 1``, its gradient equals the loss blend
    ``λ·L_pg + w_d·L_sd`` with ``distillation_level=token``, ``alpha=1`` and ``w_d = (1 − λ) ·
    N_distilled / N_tokens`` (``1 − λ`` when every row is distilled): see docs/method.md and
    ``tests/test_variants.py``. ``[b]`` → ``[b, L]`` advantages."""
    lam = loss.config.policy_gradient.advantage_blend
    if lam is None:
        return
    a = mb.advantages if mb.advantages.dim() == 2 else mb.advantages.unsqueeze(-1)
    sdpo = torch.zeros(mb.mask.shape, dtype=mb.head["logprobs"].dtype, device=a.device)
    if mb.distilled:
        sdpo = sdpo.masked_scatter(mb.mask, _log_ratio(mb))
    mb.advantages = lam * a + (1.0 - lam) * sdpo


# ----- the contrastive teacher (a teacher head, not a modifier) -----------------------------------


def contrastive_head(
    teacher_hidden: Tensor,
    teacher_weight: Tensor,
    teacher_bias: Tensor | None,
    contrast_hidden: Tensor,
    student_hidden: Tensor,
    student_weight: Tensor,
    student_bias: Tensor | None,
    gamma: float,
    active: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor | None]:
    """The contrastive teacher's target as one LM head (``[..., H_t]``, ``[V, H_t]`` → ``[...,
    2H_t + H (+1)]``, ``[V, 2H_t + H (+1)]``): where ``active`` (``[...]`` bool, broadcast over
    the hidden size; None = everywhere) its logits are

        z̃ = z_q(· | x') + γ · (z_π(· | x) − z_q(· | c)),     γ = self_distillation.contrastive_weight

    and elsewhere exactly the plain teacher's ``z_q(· | x')``. ``x'`` is the teacher context,
    ``c`` the demonstration alone (no question, no feedback) and ``x`` the student's prompt; after
    the softmax, ``q̃ ∝ q(·|x') · (π(·|x) / q(·|c))^γ``. At ``γ = 1`` this is Purified OPSD's
    target (arXiv 2607.02234; RLCSD, arXiv 2606.11709, contrasts with a wrong context instead):
    what the teacher takes from the demonstration *whatever the question* — the worked example's
    names and surface — is divided out (``q(·|c)``) and the student's own distribution takes its
    place, so only the question-specific gain ``q(·|x') / q(·|c)`` is distilled.

    Only rows with a demonstration are contrasted (``active``). Feedback is not a reference: what
    it says is the information SDPO exists to distil, and dividing out what a feedback-only context
    explains removed exactly that — on ``arithmetic_hard`` the feedback "the correct answer has
    three digits" makes ``q(EOS | c)`` high, the division took the end-of-sequence token's
    probability away, and completions ran to the length limit in 3/3 seeds (docs/method.md).

    The fold is the trust-region teacher's: ``[h_t, −γ a h_c, γ a h_s] · [W_t, W_t, W_s]ᵀ`` with
    ``a`` the row's 0/1 activity; with LM-head biases one more column ``(1 − a)`` with weight
    ``γ (b_t − b_s)`` restores the plain teacher's bias on inactive rows.
    """
    dtype = teacher_hidden.dtype
    a = (
        torch.ones(teacher_hidden.shape[:-1], dtype=dtype, device=teacher_hidden.device)
        if active is None
        else active.to(dtype).expand(teacher_hidden.shape[:-1])
    ).unsqueeze(-1)
    parts = [teacher_hidden, -gamma * a * contrast_hidden, gamma * a * student_hidden.to(dtype)]
    weights = [teacher_weight, teacher_weight, student_weight.to(teacher_weight.dtype)]
    bias = None
    if teacher_bias is not None or student_bias is not None:
        zero = teacher_weight.new_zeros(teacher_weight.shape[0])
        tb = zero if teacher_bias is None else teacher_bias.to(teacher_weight.dtype)
        sb = zero if student_bias is None else student_bias.to(teacher_weight.dtype)
        bias = (1.0 - gamma) * tb + gamma * sb
        if active is not None:  # inactive rows: back to the plain teacher's bias t_b
            parts.append(1.0 - a)
            weights.append((gamma * (tb - sb)).unsqueeze(-1))
    return torch.cat(parts, dim=-1), torch.cat(weights, 1), bias
