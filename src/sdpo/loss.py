"""The SDPO loss of one step (SPEC §4-§5), as a component: prepare once, then forward micro-batches.

    Loss = Σ_term weight_term · L_term,   terms = policy_loss (PG surrogate), kl (reference KL),
                                                  distillation_loss (student ↔ self-teacher)

every term normalized by whole-step counts, so the gradient does not depend on the micro-batch
size. Three places hold everything a term depends on; a method variant is a small piece in one
of them plus the config key that switches it on:

- :meth:`SDPOLoss.prepare` → :class:`PreparedBatch`: per-sequence quantities of the whole step
  (advantages ``[N]``, which rows are distilled, per-sequence distillation weights ``[N]``,
  normalizing counts, old log-probs). ``BATCH_MODIFIERS`` edit it before the counts are taken
  (advantage clipping, correctness routing, per-question weights).
- :meth:`SDPOLoss.forward` → :class:`MicroBatch`: the passes of one micro-batch (student, teacher,
  and the LM-head terms) and per-token quantities (log-probs, divergence, mismatch weights,
  per-token weights and masks). ``TOKEN_MODIFIERS`` edit it before the terms run (RLSD
  sign×magnitude weights, entropy gating, divergence clipping).
- ``TERMS``: each a :class:`Term` — a coefficient read from the config (0 = off) and a short
  function ``(loss, mb) -> (scalar, metric sums)``. A new term (e.g. a contrastive second teacher
  pass) is one function and one ``Term`` entry.

FSDP's rule — every rank runs the same forward passes and a backward through every block — lives
in :class:`Lockstep`, not inline in the terms.

One file (about 600 lines): the prepared batch, the micro-batch passes and the terms are the one
loss a step computes; method variants live in :mod:`sdpo.variants`.
"""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from sdpo.config import SDPOConfig
from sdpo.distributed import Runtime
from sdpo.generation import mismatch_stats, mismatch_weights
from sdpo.policy_gradient import (
    aggregate_loss,
    clip_fraction,
    clipped_surrogate,
    grpo_advantages,
    k3_kl,
)
from sdpo.policy_model import PolicyModel, RolloutBatch, output_head
from sdpo.reprompting import TeacherContext
from sdpo.self_distillation import importance_weights, policy_terms, self_distillation_loss
from sdpo.teacher import Teacher, Weights
from sdpo.variants import (
    blend_advantages,
    clip_advantages,
    clip_divergence,
    contrastive_head,
    entropy_gate,
    needs_teacher,
    pass_rate_weights,
    rlsd_weights,
    route_by_correctness,
)


@dataclass
class PreparedBatch:
    """Whole-step quantities, computed once before the step's updates (``N`` rollouts, ``L`` tokens).

    Attributes:
        advantages: ``[N]`` per-sequence advantage (GRPO's group-relative by default).
        distilled: ``[N]`` bool, rows that have a teacher context (are distilled).
        teacher_prompts: row index → teacher prompt token ids, for the distilled rows.
        counts: whole-step normalizers, summed over ranks: ``num_tokens``, ``num_sequences``,
            ``num_distilled`` (completion tokens of distilled rows), ``max_completion_length``.
        old_logprobs: ``[N, L]`` float32 log-probs under the weights that sampled (only when a
            batch is reused, ``optimization.updates_per_batch > 1``), else ``None``.
        distill_weights: ``[N]`` per-sequence weight of the distillation term, or ``None`` (= 1).
        contrast_prompts: row index → the teacher prompt without the question (the contrastive
            teacher's second pass, ``self_distillation.contrastive_weight > 0``), else empty.
    """

    advantages: Tensor
    distilled: Tensor
    teacher_prompts: dict[int, list[int]] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)
    old_logprobs: Tensor | None = None
    distill_weights: Tensor | None = None
    contrast_prompts: dict[int, list[int]] = field(default_factory=dict)

    def __getitem__(self, key: str) -> Any:
        """``prepared["counts"]``: the dict-style access of code written before this class."""
        return getattr(self, key)


@dataclass
class MicroBatch:
    """One micro-batch's passes; terms read it, token modifiers edit it (``b`` rows, ``L`` tokens,
    ``n = mask.sum()`` completion tokens; ``[n]`` tensors are the ``[b, L]`` ones at ``mask``).

    Attributes:
        idx: ``[b]`` the rows of the step's batch.
        prompt_ids, prompt_mask: ``[b, P]`` left-padded prompts.
        completion_ids, completion_mask: ``[b, L]`` completions (mask 0/1).
        mask: ``[b, L]`` bool completion tokens.
        hidden: ``[b, L, H]`` student hidden states (with gradient).
        head: ``{logprobs, entropy[, divergence, teacher_logprobs]}`` ``[n]`` from
            :func:`~sdpo.self_distillation.policy_terms`.
        logprobs: ``[b, L]`` sampled-token log-probs (with gradient, 0 outside ``mask``).
        old_logprobs: ``[b, L]`` the log-probs of the sampling weights (detached ``logprobs``
            when the batch is used once).
        advantages: ``[b]``.
        distill_mask: ``[n]`` bool, tokens of distilled rows (all False without a teacher pass).
        distilled: whether this micro-batch ran a teacher pass whose divergence is in ``head``.
        reused: whether ``old_logprobs`` come from the sampling weights (a reused batch): the
            distillation term's importance weights apply.
        mismatch: ``[b, L]`` train/inference mismatch weights, or ``None`` (no sampler log-probs).
        pg_weights: ``[b, L]`` per-token weights of the PG surrogate, or ``None`` (= 1).
        distill_weights: ``[n]`` per-token weights of the divergence, or ``None`` (= 1).
        counts: :attr:`PreparedBatch.counts`.
    """

    idx: Tensor
    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    mask: Tensor
    hidden: Tensor
    head: dict[str, Tensor]
    logprobs: Tensor
    old_logprobs: Tensor
    advantages: Tensor
    distill_mask: Tensor
    distilled: bool
    reused: bool
    counts: dict[str, float]
    mismatch: Tensor | None = None
    pg_weights: Tensor | None = None
    distill_weights: Tensor | None = None


TermFn = Callable[["SDPOLoss", MicroBatch], "tuple[Tensor, dict[str, float]] | None"]


@dataclass(frozen=True)
class Term:
    """One term of the loss: ``weight(config) · fn(loss, mb)``; ``fn`` returns ``(scalar, sums)``
    (sums of metrics over the micro-batch, combined over micro-batches by :func:`combine_sums`;
    ``sums[name]`` is the term's value) or ``None`` when the micro-batch gives it no signal.
    The step's metrics report the value as ``metric`` (default: ``name``)."""

    name: str
    weight: Callable[[SDPOConfig], float]
    fn: TermFn
    metric: str | None = None


class Lockstep:
    """FSDP's rule (``distributed.strategy=fsdp``): every block's forward and backward is a
    collective, so every rank must run the same passes in the same order. Off, both are no-ops."""

    def __init__(self, active: bool) -> None:
        self.active = active

    def unused_pass(self, run: Callable[[], Any]) -> None:
        """Run a pass this rank does not need (another rank may): its result is dropped."""
        if self.active:
            run()

    def touch(self, loss: Tensor, hidden: Tensor) -> Tensor:
        """``loss + 0·Σ hidden``: the backward reaches every block even when no term used them."""
        return loss + 0.0 * hidden.sum() if self.active else loss


class SDPOLoss:
    """The loss of SPEC §4-§5 for one run's config, policy, teacher and reference weights.

    ``prepare(rollouts, contexts)`` once per step, then ``backward(rollouts, prepared)`` per update
    (it runs :meth:`forward` on each micro-batch and backpropagates), and
    ``metrics(sums, prepared.counts)`` for the step's logged loss values.
    """

    def __init__(
        self,
        config: SDPOConfig,
        policy: PolicyModel,
        teacher: Teacher,
        reference: Weights | None,
        runtime: Runtime,
    ) -> None:
        self.config = config
        self.policy = policy
        self.teacher = teacher
        self.reference = reference
        self.runtime = runtime
        self.lockstep = Lockstep(runtime.lockstep)
        self.distills = needs_teacher(config)  # a teacher pass runs (the term may be off: RLSD)
        self.terms = [t for t in TERMS if t.weight(config) > 0]

    @property
    def temperature(self) -> float:
        """The LM head's temperature (the sampling one, for models trained at it)."""
        return self.policy.head_temperature(self.config.generation.temperature)

    # ----- once per step ----------------------------------------------------------------------

    def prepare(
        self, rollouts: RolloutBatch, contexts: list[TeacherContext | None]
    ) -> PreparedBatch:
        """Advantages, distilled rows and their teacher prompts, global counts, old log-probs."""
        device = self.policy.device
        pg = self.config.policy_gradient
        batch = PreparedBatch(
            advantages=grpo_advantages(
                rollouts.rewards, rollouts.group_ids, scale_rewards=pg.scale_rewards
            ).to(device),
            distilled=torch.tensor([c is not None for c in contexts], device=device),
        )
        for modify in BATCH_MODIFIERS:
            modify(self, rollouts, batch)
        batch.teacher_prompts = {
            i: self.policy.encode_prompt(c.prompt)
            for i, c in enumerate(contexts)
            if c is not None and bool(batch.distilled[i])
        }
        if self.config.self_distillation.contrastive_weight > 0:
            batch.contrast_prompts = {  # rows with a demonstration (TeacherContext.contrast_prompt)
                i: self.policy.encode_prompt(contexts[i].contrast_prompt)
                for i in batch.teacher_prompts
                if contexts[i].contrast_prompt is not None
            }
        mask = rollouts.completion_mask
        batch.counts = self.runtime.all_reduce(  # over every rank: the global batch's counts
            {
                "num_tokens": float(mask.sum()),
                "num_sequences": float(len(rollouts)),
                "num_distilled": float(mask[batch.distilled].sum()),
            }
        )
        # Dr. GRPO's constant: the generation budget, not this batch's longest completion.
        batch.counts["max_completion_length"] = self.config.generation.max_new_tokens
        if self.config.optimization.updates_per_batch > 1:
            batch.old_logprobs = self.old_logprobs(rollouts)
        return batch

    @torch.no_grad()
    def old_logprobs(self, rollouts: RolloutBatch) -> Tensor:
        """Log-probs of the sampled tokens under the weights that generated them: ``[N, L]``.

        Kept in float32, not the compute dtype: the LM-head terms are computed in float32 from
        compute-dtype hidden states, and the new log-probs they are compared with are float32,
        so a bfloat16 copy (8 significant bits) would put ~1% error into ``ρ = exp(new − old)``
        and make ρ ≠ 1 at the first reuse. The cost is 4 bytes per completion token.
        """
        out = torch.zeros_like(rollouts.completion_mask, dtype=torch.float32)
        weight, bias = self.head_params(self.policy.lm_head.weight, self.policy.lm_head.bias)
        for idx in self._micro_batches(rollouts):
            c_ids, c_mask = rollouts.completion_ids[idx], rollouts.completion_mask[idx]
            mask = c_mask.bool()
            with self.runtime.autocast():
                h = self.policy.completion_hidden(
                    rollouts.prompt_ids[idx], rollouts.prompt_mask[idx], c_ids, c_mask
                )
            lp = policy_terms(
                h[mask],
                weight,
                c_ids[mask],
                lm_head_bias=bias,
                temperature=self.temperature,
                chunk_size=self.config.self_distillation.loss_chunk_size,
            )["logprobs"]
            out[idx] = unflatten(lp, mask).float()
        return out

    # ----- per update -------------------------------------------------------------------------

    def backward(self, rollouts: RolloutBatch, batch: PreparedBatch) -> dict[str, float] | None:
        """Backward of the step's loss, micro-batch by micro-batch; the metric sums, or None if
        the loss was non-finite (under lockstep every micro-batch still runs, to stay in step)."""
        sums: dict[str, float] = {}
        finite = True
        for idx in self._micro_batches(rollouts):
            with self.runtime.autocast():
                loss, parts = self.forward(rollouts, idx, batch)
            if not torch.isfinite(loss):
                if not self.lockstep.active:
                    return None
                finite = False  # fsdp: keep the passes in step; the update is skipped after
            if loss.requires_grad:  # no term had a signal (e.g. pure SDPO, no teacher context)
                loss.backward()
            combine_sums(sums, parts)
        return sums if finite else None

    def forward(
        self, rollouts: RolloutBatch, idx: Tensor, batch: PreparedBatch
    ) -> tuple[Tensor, dict[str, float]]:
        """Loss of rows ``idx`` (``[b]``) scaled by whole-step counts, and metric sums."""
        mb = self.passes(rollouts, idx, batch)
        for modify in TOKEN_MODIFIERS:
            modify(self, mb)
        loss = self.lockstep.touch(mb.logprobs.new_zeros(()), mb.hidden)
        parts: dict[str, float] = {"entropy_sum": float(mb.head["entropy"].sum())}
        if mb.mismatch is not None:
            stats = mismatch_stats(
                mb.old_logprobs, rollouts.sampler_logprobs[idx], mb.mismatch, mb.completion_mask
            )
            parts.update({f"sampling/{k}": v for k, v in stats.items()})
        for term in self.terms:
            out = term.fn(self, mb)
            if out is not None:
                value, term_parts = out
                loss = loss + term.weight(self.config) * value
                parts.update(term_parts)
        return loss, parts

    def passes(self, rollouts: RolloutBatch, idx: Tensor, batch: PreparedBatch) -> MicroBatch:
        """Student pass, teacher pass (distilled rows), the LM-head terms, mismatch weights."""
        sd = self.config.self_distillation
        p_ids, p_mask = rollouts.prompt_ids[idx], rollouts.prompt_mask[idx]
        c_ids, c_mask = rollouts.completion_ids[idx], rollouts.completion_mask[idx]
        mask = c_mask.bool()
        hidden = self.policy.completion_hidden(p_ids, p_mask, c_ids, c_mask)
        teacher_hidden, teacher_weight, teacher_bias, distill_mask = self.teacher_pass(
            rollouts, idx, batch, mask
        )
        if teacher_hidden is not None and batch.contrast_prompts:
            teacher_hidden, teacher_weight, teacher_bias = self.contrast(
                rollouts, idx, batch, hidden, teacher_hidden, teacher_weight, teacher_bias
            )
        weight, bias = self.head_params(self.policy.lm_head.weight, self.policy.lm_head.bias)
        teacher_weight, teacher_bias = self.head_params(teacher_weight, teacher_bias)
        terms = policy_terms(
            hidden[mask],
            weight,
            c_ids[mask],
            lm_head_bias=bias,
            teacher_hidden=None if teacher_hidden is None else teacher_hidden[mask],
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
            distill_mask=distill_mask[mask],
            alpha=sd.alpha,
            topk=sd.distillation_topk,
            add_tail=sd.distillation_add_tail,
            level=sd.distillation_level,
            temperature=self.temperature,
            chunk_size=sd.loss_chunk_size,
        )
        logprobs = unflatten(terms["logprobs"], mask)
        old = logprobs.detach() if batch.old_logprobs is None else batch.old_logprobs[idx]
        mismatch = None
        if rollouts.sampler_logprobs is not None:  # the sampler's log-probs vs the trainer's
            gen = self.config.generation
            mismatch = mismatch_weights(
                old, rollouts.sampler_logprobs[idx], c_mask,
                level=gen.vllm_is_correction, cap=gen.vllm_is_cap,
            )  # fmt: skip
        distill_weights = None
        if batch.distill_weights is not None:
            distill_weights = batch.distill_weights[idx].unsqueeze(-1).expand_as(mask)[mask]
        return MicroBatch(
            idx=idx,
            prompt_ids=p_ids,
            prompt_mask=p_mask,
            completion_ids=c_ids,
            completion_mask=c_mask,
            mask=mask,
            hidden=hidden,
            head=terms,
            logprobs=logprobs,
            old_logprobs=old,
            advantages=batch.advantages[idx],
            distill_mask=distill_mask[mask],
            distilled=teacher_hidden is not None,
            reused=batch.old_logprobs is not None,
            counts=batch.counts,
            mismatch=mismatch,
            distill_weights=distill_weights,
        )

    def teacher_pass(
        self, rollouts: RolloutBatch, idx: Tensor, batch: PreparedBatch, mask: Tensor
    ) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor]:
        """The teacher's hidden states ``[b, L, H']`` (zeros on rows without a teacher), LM-head
        weight ``[V, H']`` and bias, and the ``[b, L]`` distilled-token mask; ``None``s and an
        all-False mask when no row of ``idx`` is distilled."""
        distill_mask = torch.zeros_like(mask)
        rows = [j for j, i in enumerate(idx.tolist()) if i in batch.teacher_prompts]
        if not self.distills:
            return None, None, None, distill_mask
        if not rows:
            one = idx[:1]
            self.lockstep.unused_pass(
                lambda: self.teacher.hidden(
                    rollouts.prompt_ids[one],
                    rollouts.prompt_mask[one],
                    rollouts.completion_ids[one],
                    rollouts.completion_mask[one],
                )
            )
            return None, None, None, distill_mask
        sub = torch.tensor(rows, device=mask.device)
        t_ids, t_mask = self.policy.pad_left([batch.teacher_prompts[int(idx[j])] for j in rows])
        c_ids, c_mask = rollouts.completion_ids[idx], rollouts.completion_mask[idx]
        t_hidden, weight, bias = self.teacher.hidden(t_ids, t_mask, c_ids[sub], c_mask[sub])
        teacher_hidden = torch.zeros(
            *mask.shape, t_hidden.shape[-1], dtype=t_hidden.dtype, device=t_hidden.device
        )
        teacher_hidden[sub] = t_hidden
        distill_mask[sub] = mask[sub]
        return teacher_hidden, weight, bias, distill_mask

    @torch.no_grad()
    def contrast(
        self,
        rollouts: RolloutBatch,
        idx: Tensor,
        batch: PreparedBatch,
        hidden: Tensor,
        teacher_hidden: Tensor,
        teacher_weight: Tensor,
        teacher_bias: Tensor | None,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """The contrastive teacher (:func:`sdpo.variants.contrastive_head`): a second teacher pass
        on the demonstration alone, folded with the student's own (detached) logits into one LM
        head, so the divergence kernel sees ``z̃ = z_q(x') + γ (z_π(x) − z_q(c))`` on rows with a
        demonstration and the plain teacher ``z_q(x')`` on the others."""
        rows = [j for j, i in enumerate(idx.tolist()) if i in batch.contrast_prompts]
        if not rows:  # no demonstration in this micro-batch: the plain teacher
            return teacher_hidden, teacher_weight, teacher_bias
        sub = torch.tensor(rows, device=hidden.device)
        c_ids, c_mask = self.policy.pad_left([batch.contrast_prompts[int(idx[j])] for j in rows])
        comp_ids, comp_mask = rollouts.completion_ids[idx], rollouts.completion_mask[idx]
        c_hidden, _, _ = self.teacher.hidden(c_ids, c_mask, comp_ids[sub], comp_mask[sub])
        contrast_hidden = torch.zeros(
            *teacher_hidden.shape[:-1], c_hidden.shape[-1], dtype=c_hidden.dtype,
            device=c_hidden.device,
        )  # fmt: skip
        contrast_hidden[sub] = c_hidden
        active = torch.zeros(teacher_hidden.shape[0], dtype=torch.bool, device=hidden.device)
        active[sub] = True
        head = self.policy.lm_head
        return contrastive_head(
            teacher_hidden, teacher_weight, teacher_bias, contrast_hidden, hidden.detach(),
            head.weight.detach(), None if head.bias is None else head.bias.detach(),
            self.config.self_distillation.contrastive_weight, active[:, None],
        )  # fmt: skip

    def head_params(
        self, weight: Tensor | None, bias: Tensor | None
    ) -> tuple[Tensor | None, Tensor | None]:
        """The LM head's ``(weight [V, H], bias [V])`` as the training passes use them: as stored
        (float32 master weights: float32 logits), or cast to the compute dtype when
        ``model.lm_head_dtype=compute`` (the cast is differentiable: gradients reach the float32
        weights). ``None`` passes through (a teacher without its own head)."""
        dtype = self.runtime.compute_dtype
        if self.config.model.lm_head_dtype != "compute" or weight is None or weight.dtype == dtype:
            return weight, bias
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    @torch.no_grad()
    def reference_logprobs(self, mb: MicroBatch) -> Tensor:
        """Sampled-token log-probs ``[b, L]`` under the reference (initial) weights."""
        with self.reference.active() as reference:
            ref_hidden = self.policy.completion_hidden(
                mb.prompt_ids, mb.prompt_mask, mb.completion_ids, mb.completion_mask,
                model=reference,
            )  # fmt: skip
            ref_head = output_head(reference)
            ref_weight, ref_bias = self.head_params(ref_head.weight, ref_head.bias)
            lp = policy_terms(
                ref_hidden[mb.mask],
                ref_weight,
                mb.completion_ids[mb.mask],
                lm_head_bias=ref_bias,
                temperature=self.temperature,
                chunk_size=self.config.self_distillation.loss_chunk_size,
            )["logprobs"]
        return unflatten(lp, mb.mask)

    # ----- metrics ----------------------------------------------------------------------------

    def metrics(self, sums: dict[str, float], counts: dict[str, float]) -> dict[str, float]:
        """The step's logged loss values from the summed micro-batch metrics (over ranks)."""
        n_tok, n_d = max(counts["num_tokens"], 1.0), max(counts["num_distilled"], 1.0)
        m = {"entropy": sums.get("entropy_sum", 0.0) / n_tok}
        if "policy_loss" in sums:
            m["policy_loss"] = sums["policy_loss"]
            m["clip_ratio"] = sums["clipped_tokens"] / n_tok
        if "kl" in sums:
            m["kl"] = sums["kl"]
        m["self_distillation/distillation_loss"] = sums.get("distillation_loss", 0.0)
        m["self_distillation/divergence_mean"] = sums.get("divergence_sum", 0.0) / n_d
        m["self_distillation/teacher_student_kl"] = sums.get("teacher_student_kl_sum", 0.0) / n_d
        m["self_distillation/is_ratio_mean"] = sums.get("is_ratio_sum", n_d) / n_d
        m["self_distillation/distilled_token_fraction"] = counts["num_distilled"] / n_tok
        if "sampling/tokens" in sums:
            n_s = max(sums["sampling/tokens"], 1.0)
            m["sampling/logprob_diff_mean"] = sums["sampling/logprob_diff_sum"] / n_s
            m["sampling/logprob_diff_max"] = sums["sampling/logprob_diff_max"]
            m["sampling/is_weight_mean"] = sums["sampling/is_weight_sum"] / n_s
            m["sampling/is_weight_min"] = sums["sampling/is_weight_min"]
        total = 0.0
        for term in self.terms:
            if term.name in sums:
                m.setdefault(term.metric or term.name, sums[term.name])
                total += term.weight(self.config) * sums[term.name]
        m["loss"] = total
        return m

    def _micro_batches(self, rollouts: RolloutBatch) -> tuple[Tensor, ...]:
        return torch.arange(len(rollouts)).split(self.config.optimization.micro_batch_size)


# ----- terms -------------------------------------------------------------------------------------


def pg_term(
    loss: SDPOLoss, mb: MicroBatch, rows: Tensor | None = None
) -> tuple[Tensor, dict[str, float]]:
    """Clipped PG surrogate ``−min(ρA, clip(ρ, 1−ε_low, 1+ε_high)A)`` per token ``[b, L]``, times
    the mismatch and per-token PG weights (and the ``[b, L]`` 0/1 ``rows`` mask, if given),
    aggregated by ``policy_gradient.loss_aggregation`` with the whole step's counts."""
    pg = loss.config.policy_gradient
    per_token, clipped = clipped_surrogate(
        mb.logprobs, mb.old_logprobs, mb.advantages, eps_low=pg.clip_eps_low, eps_high=pg.clip_eps_high
    )  # fmt: skip
    for w in (mb.mismatch, mb.pg_weights, rows):
        if w is not None:
            per_token = per_token * w
    value = aggregate_loss(per_token, mb.completion_mask, pg.loss_aggregation, **_agg(mb.counts))
    c_mask = mb.completion_mask
    return value, {
        "policy_loss": float(value.detach()),
        "clipped_tokens": clip_fraction(clipped, c_mask) * float(c_mask.sum()),
    }


def routed_pg_term(loss: SDPOLoss, mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
    """SRPO routing's PG half (:func:`sdpo.variants.route_by_correctness`): the PG surrogate on
    the rows that are not distilled, normalized like the PG term, at ``distillation_weight``."""
    distilled = unflatten(mb.distill_mask.to(mb.logprobs.dtype), mb.mask)
    value, _ = pg_term(loss, mb, rows=mb.completion_mask * (1.0 - distilled))
    return value, {"routed_policy_loss": float(value.detach())}


def kl_term(loss: SDPOLoss, mb: MicroBatch) -> tuple[Tensor, dict[str, float]]:
    """k3 estimate of ``KL(π_θ ‖ π_ref)`` per token ``[b, L]`` (reference pass under no_grad),
    aggregated as the PG term is."""
    ref = loss.reference_logprobs(mb)
    agg = loss.config.policy_gradient.loss_aggregation
    value = aggregate_loss(k3_kl(mb.logprobs, ref), mb.completion_mask, agg, **_agg(mb.counts))
    return value, {"kl": float(value.detach())}


def distillation_term(loss: SDPOLoss, mb: MicroBatch) -> tuple[Tensor, dict[str, float]] | None:
    """``Σ_t div_t · w_t / num_distilled`` over the distilled tokens ``[n]``, with
    ``w = IS(ρ, is_clip) · mismatch · distill_weights`` (each factor only when present);
    ``None`` when no row of the micro-batch has a teacher context."""
    if not mb.distilled:
        return None
    sd = loss.config.self_distillation
    dmask, lp = mb.distill_mask, mb.head["logprobs"]
    weights = None
    if mb.reused:
        weights = importance_weights(lp, mb.old_logprobs[mb.mask], sd.is_clip)
    for w in (None if mb.mismatch is None else mb.mismatch[mb.mask], mb.distill_weights):
        if w is not None:
            weights = w if weights is None else weights * w
    value, d = self_distillation_loss(
        mb.head["divergence"].unsqueeze(0),
        dmask.unsqueeze(0),
        is_weights=None if weights is None else weights.unsqueeze(0),
        normalizer=max(mb.counts["num_distilled"], 1.0),
    )
    n_d = float(dmask.sum())
    return value, {
        "distillation_loss": float(value.detach()),
        "divergence_sum": d["divergence_mean"] * n_d,
        "is_ratio_sum": d["is_ratio_mean"] * n_d,
        "teacher_student_kl_sum": float((lp.detach() - mb.head["teacher_logprobs"])[dmask].sum()),
    }


# Registered in the order they are added to the loss (the sum's rounding depends on it).
TERMS: list[Term] = [
    Term("policy_loss", lambda c: c.policy_gradient.pg_loss_weight, pg_term),
    Term("kl", lambda c: c.policy_gradient.kl_penalty_weight, kl_term),
    Term(
        "distillation_loss",
        lambda c: c.self_distillation.distillation_weight,
        distillation_term,
        metric="self_distillation/distillation_loss",
    ),
    Term(
        "routed_policy_loss",
        lambda c: (
            c.self_distillation.distillation_weight
            if c.self_distillation.routing == "correctness"
            else 0.0
        ),
        routed_pg_term,
        metric="routing/policy_loss",
    ),
]
# (loss, rollouts, batch) -> None: edit advantages / distilled / distill_weights before the counts.
BATCH_MODIFIERS: list[Callable[[SDPOLoss, RolloutBatch, PreparedBatch], None]] = [
    clip_advantages,
    route_by_correctness,
    pass_rate_weights,
]
# (loss, mb) -> None: edit pg_weights / distill_weights / distill_mask of a micro-batch.
TOKEN_MODIFIERS: list[Callable[[SDPOLoss, MicroBatch], None]] = [
    clip_divergence,
    entropy_gate,
    rlsd_weights,
    blend_advantages,
]


# ----- helpers -----------------------------------------------------------------------------------


def combine_sums(sums: dict[str, float], parts: dict[str, float]) -> None:
    """Fold one micro-batch's metric sums into ``sums``: ``*_max`` by max, ``*_min`` by min, else +."""
    for k, v in parts.items():
        combine = max if k.endswith("_max") else min if k.endswith("_min") else operator.add
        sums[k] = combine(sums[k], v) if k in sums else v


def unflatten(values: Tensor, mask: Tensor) -> Tensor:
    """Scatter per-token values ``[n]`` back to ``[b, L]`` at ``mask`` (zeros elsewhere)."""
    return values.new_zeros(mask.shape).masked_scatter(mask, values)


def _agg(counts: dict[str, float]) -> dict[str, float]:
    return {k: counts[k] for k in ("num_tokens", "num_sequences", "max_completion_length")}
