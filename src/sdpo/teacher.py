"""The self-teachers of SPEC §6 and the reference model.

Every teacher scores the student's own completion under the reprompted context ``x'``:

- ``ema``: weights ``φ``, updated after every optimizer step as ``φ ← (1−β)·φ + β·θ``;
- ``frozen``: the initial model (shares its weights with the reference model when both are needed);
- ``live``: the current student under ``no_grad`` (no extra memory);
- ``trust_region``: logits ``lerp(ref, student, β) = β·z_θ + (1−β)·z_ref``, from two no-grad passes;
- ``gated``: a copy frozen between refreshes, ``φ ← θ`` only when the rolling training reward has
  improved since the last refresh and the completion-length tail has not blown up (CGTR's idea,
  "When Should the Teacher Move?", arXiv 2606.03532; the exact rule is :class:`GateRule`).

Where those weights live is a :class:`Weights`: a frozen copy of the model (full fine-tuning), or,
for a LoRA policy, an adapter state of the one base model (:mod:`sdpo.lora`): the EMA teacher is
a second adapter, the frozen teacher and the reference the initial policy: the base with adapters
off, or a snapshot adapter when the run starts from a trained adapter. The teacher costs one
adapter, not one model.

A teacher hands back hidden states and the LM-head weight to apply to them, so the loss can
compute teacher logits in chunks. For ``trust_region`` the lerp is folded into one matrix product:
``[β·h_θ, (1−β)·h_ref] · [W_θ, W_ref]ᵀ = β·h_θW_θᵀ + (1−β)·h_refW_refᵀ``.
"""

from __future__ import annotations

import contextlib
import copy
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor
from transformers import PreTrainedModel

from sdpo import lora
from sdpo.distributed import lerp_
from sdpo.policy_model import PolicyModel, output_head
from sdpo.train_mode import eval_scope

TEACHER_KINDS = ("ema", "frozen", "live", "trust_region", "gated")
# Kinds that keep weights of their own (a copy, or a second LoRA adapter).
OWN_WEIGHTS = ("ema", "gated")


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A no-grad, eval-mode deep copy of ``model``."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    clone.eval()
    return clone


class Weights:
    """One set of weights the trainer can run: ``with weights.active() as model: model(...)``.

    ``Weights(model)``: the model as it is (the student); ``copy=True``: a frozen copy of its own
    (``module``); for a PEFT model, ``adapter="teacher"``: that adapter active, ``base=True``: the
    base with adapters off.
    """

    def __init__(
        self,
        model: torch.nn.Module,
        *,
        copy: bool = False,
        adapter: str | None = None,
        base: bool = False,
    ) -> None:
        self.module = frozen_copy(model) if copy else None
        self.model, self.adapter, self.base = model, adapter, base

    @contextlib.contextmanager
    def active(self) -> Iterator[torch.nn.Module]:
        if self.module is not None:
            yield self.module
        elif self.base or self.adapter is not None:
            with lora.adapter_scope(self.model, None if self.base else self.adapter) as model:
                yield model
        else:
            yield self.model


def reference_weights(policy: PolicyModel) -> Weights:
    """The initial policy (frozen teacher, reference KL, trust-region anchor), taken before the
    first step: a frozen copy for full fine-tuning; for LoRA the base with adapters off while the
    student adapter adds nothing yet, else a frozen snapshot of it (adapter ``initial``): a user's
    trained starting adapter is part of the initial policy, and the bare base is not it."""
    if not policy.is_lora:
        return Weights(policy.model, copy=True)
    if lora.adapter_adds_nothing(policy.model):
        return Weights(policy.model, base=True)
    lora.add_adapter_copy(policy.model, lora.INITIAL)
    return Weights(policy.model, adapter=lora.INITIAL)


class Teacher:
    """The teacher of one run. ``reference`` holds the initial model's weights when they are needed."""

    def __init__(
        self,
        kind: str,
        policy: PolicyModel,
        rate: float,
        reference: Weights | None,
        gate: GateRule | None = None,
    ) -> None:
        if kind not in TEACHER_KINDS:
            raise ValueError(f"Unknown teacher {kind!r}; choose one of {TEACHER_KINDS}.")
        if kind in ("frozen", "trust_region") and reference is None:
            raise ValueError(f"The {kind} teacher needs the initial model's weights (reference).")
        self.kind = kind
        self.rate = rate
        self.policy = policy
        self.reference = reference
        self.live = Weights(policy.model)
        self.ema: Weights | None = None
        self._ema_pairs: tuple[list[Tensor], list[Tensor]] = ([], [])
        self.gate = (gate or GateRule()) if kind == "gated" else None
        if kind in OWN_WEIGHTS and policy.is_lora:
            phi = lora.add_adapter_copy(policy.model, lora.TEACHER)
            theta = lora.adapter_parameters(policy.model, lora.student_adapter(policy.model))
            self.ema = Weights(policy.model, adapter=lora.TEACHER)
            self._ema_pairs = (list(phi.values()), [theta[k] for k in phi])
        elif kind in OWN_WEIGHTS:
            self.ema = Weights(policy.model, copy=True)
            self._ema_pairs = (list(self.ema.module.parameters()), list(policy.model.parameters()))

    @property
    def copy(self) -> PreTrainedModel | None:
        """The EMA or gated teacher's own copy of the model (full fine-tuning only)."""
        return None if self.ema is None else self.ema.module

    @property
    def weights(self) -> Weights:
        """The weights whose forward gives the teacher's hidden states (student for live/trust_region)."""
        if self.kind in OWN_WEIGHTS:
            return self.ema
        if self.kind == "frozen":
            return self.reference
        return self.live

    @torch.no_grad()
    def hidden(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Teacher hidden states ``[n, L, H']`` at completion positions, LM-head weight ``[V, H']`` and bias."""
        args = (prompt_ids, prompt_mask, completion_ids, completion_mask)
        with eval_scope(self.policy.model):  # live/trust_region teachers score without dropout
            with self.weights.active() as model:
                h = self.policy.completion_hidden(*args, model=model)
                head = output_head(model)
            if self.kind != "trust_region":
                return h, head.weight, head.bias
            beta = self.rate
            with self.reference.active() as reference:
                h_ref = self.policy.completion_hidden(*args, model=reference)
                ref_head = output_head(reference)
            weight = torch.cat([head.weight, ref_head.weight], dim=1)
            bias = None
            if head.bias is not None:
                bias = torch.lerp(ref_head.bias, head.bias, beta)
            return torch.cat([beta * h, (1 - beta) * h_ref], dim=-1), weight, bias

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ``φ ← (1−β)·φ + β·θ`` (EMA only; for LoRA over the adapter
        tensors only, in float32)."""
        if self.kind != "ema" or self.rate == 0.0:
            return
        teacher, student = self._ema_pairs
        if self.policy.is_lora:
            lora.ema_update(teacher, student, self.rate)
        else:  # the copy's own parameters: FSDP may have replaced them with shards since
            lerp_(list(self.copy.parameters()), list(self.policy.model.parameters()), self.rate)

    def checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        """The networks a checkpoint must hold to restore this teacher: the EMA copy and the
        reference copy (full fine-tuning; LoRA adapters are saved with the policy's)."""
        modules = {}
        if self.copy is not None:
            modules["teacher"] = self.copy
        if self.reference is not None and self.reference.module is not None:
            modules["reference"] = self.reference.module
        return modules

    def observe(self, rewards: Tensor, lengths: Tensor) -> dict[str, float]:
        """After a step: the step's rewards ``[N]`` and completion lengths ``[N]`` (the global
        batch's). The gated teacher refreshes when :class:`GateRule` says so; returns its metrics
        ``teacher/refreshes`` and ``teacher/age`` (nothing for the other kinds)."""
        if self.gate is None:
            return {}
        if self.gate.observe(rewards, lengths):
            self.refresh()
        return self.gate.metrics()

    @torch.no_grad()
    def refresh(self) -> None:
        """``φ ← θ`` exactly (a copy, not a lerp with rate 1, which can round)."""
        teacher, student = self._ema_pairs
        if not self.policy.is_lora:  # the copy's own parameters: FSDP may have sharded them
            teacher, student = list(self.copy.parameters()), list(self.policy.model.parameters())
        for t, s in zip(teacher, student, strict=True):
            t.copy_(s.detach())


@dataclass
class GateRule:
    """When the ``gated`` teacher refreshes (``φ ← θ``): CGTR's idea (consolidation-gated teacher
    refresh, arXiv 2606.03532) in this exact form.

    After every step ``t`` the trainer reports the step's rewards and completion lengths. With
    ``W = window``::

        R_t = mean over the last W steps of the step's mean reward
        Λ_t = mean over the last W steps of the step's 90th-percentile completion length

    The reference ``(R*, Λ*)`` is taken when the window first fills (step ``W``, no refresh then)
    and at every refresh. The teacher refreshes at step ``t`` iff

    - at least ``W`` steps have passed since the last refresh (or the start): the teacher is
      isolated — frozen — for at least a window, the property CGTR finds stabilizing;
    - ``R_t > R* + min_improvement``: the rolling training reward improved since the last refresh;
    - ``Λ_t ≤ length_ratio · Λ*``: the completion-length tail has not blown up (CGTR's collapse
      signature is length explosion with the reward still rising);

    and then ``R* ← R_t``, ``Λ* ← Λ_t``. Config keys: ``self_distillation.gated_window``,
    ``gated_min_improvement``, ``gated_length_ratio``.
    """

    window: int = 10
    min_improvement: float = 0.0
    length_ratio: float = 1.5
    steps: int = 0
    last_refresh: int = 0
    refreshes: int = 0
    rewards: list[float] = field(default_factory=list)
    lengths: list[float] = field(default_factory=list)
    reference: list[float] | None = None

    def observe(self, rewards: Tensor, lengths: Tensor) -> bool:
        """Record one step; True when the teacher must refresh now."""
        self.steps += 1
        self.rewards = [*self.rewards, float(rewards.float().mean())][-self.window :]
        tail = float(torch.quantile(lengths.float(), 0.9)) if lengths.numel() else 0.0
        self.lengths = [*self.lengths, tail][-self.window :]
        if len(self.rewards) < self.window:
            return False
        r_now, len_now = (
            math.fsum(self.rewards) / self.window,
            math.fsum(self.lengths) / self.window,
        )
        if self.reference is None:
            self.reference = [r_now, len_now]
            return False
        r_ref, len_ref = self.reference
        if (
            self.steps - self.last_refresh >= self.window
            and r_now > r_ref + self.min_improvement
            and len_now <= self.length_ratio * len_ref
        ):
            self.reference = [r_now, len_now]
            self.last_refresh = self.steps
            self.refreshes += 1
            return True
        return False

    def metrics(self) -> dict[str, float]:
        """``teacher/refreshes`` (so far) and ``teacher/age`` (steps since the last refresh)."""
        return {
            "teacher/refreshes": float(self.refreshes),
            "teacher/age": float(self.steps - self.last_refresh),
        }

    def state_dict(self) -> dict[str, Any]:
        """The rule's running state (plain Python values: a checkpoint keeps it exactly)."""
        keys = ("steps", "last_refresh", "refreshes", "rewards", "lengths", "reference")
        return {k: copy.deepcopy(getattr(self, k)) for k in keys}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        for k, v in state.items():
            setattr(self, k, copy.deepcopy(v))
