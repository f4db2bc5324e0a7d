"""The self-teachers of SPEC §6 and the reference model.

Every teacher scores the student's own completion under the reprompted context ``x'``:

- ``ema``: a separate copy ``φ``, updated after every optimizer step as ``φ ← (1−β)·φ + β·θ``;
- ``frozen``: the initial model (shares its copy with the reference model when both are needed);
- ``live``: the current student under ``no_grad`` (no extra memory);
- ``trust_region``: logits ``lerp(ref, student, β) = β·z_θ + (1−β)·z_ref``, from two no-grad passes.

A teacher hands back hidden states and the LM-head weight to apply to them, so the loss can
compute teacher logits in chunks. For ``trust_region`` the lerp is folded into one matrix product:
``[β·h_θ, (1−β)·h_ref] · [W_θ, W_ref]ᵀ = β·h_θW_θᵀ + (1−β)·h_refW_refᵀ``.
"""

from __future__ import annotations

import copy

import torch
from torch import Tensor
from transformers import PreTrainedModel

from sdpo.policy_model import PolicyModel

TEACHER_KINDS = ("ema", "frozen", "live", "trust_region")


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A no-grad, eval-mode deep copy of ``model``."""
    clone = copy.deepcopy(model)
    clone.requires_grad_(False)
    clone.eval()
    return clone


class Teacher:
    """The teacher of one run. ``reference`` is the initial-model copy when one exists (shared)."""

    def __init__(
        self, kind: str, policy: PolicyModel, rate: float, reference: PreTrainedModel | None
    ) -> None:
        if kind not in TEACHER_KINDS:
            raise ValueError(f"Unknown teacher {kind!r}; choose one of {TEACHER_KINDS}.")
        if kind in ("frozen", "trust_region") and reference is None:
            raise ValueError(f"The {kind} teacher needs the initial-model copy (reference).")
        self.kind = kind
        self.rate = rate
        self.policy = policy
        self.reference = reference
        self.copy = frozen_copy(policy.model) if kind == "ema" else None

    @property
    def model(self) -> PreTrainedModel:
        """The network whose forward gives the teacher's hidden states (student for live/trust_region)."""
        if self.kind == "ema":
            return self.copy
        if self.kind == "frozen":
            return self.reference
        return self.policy.model

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
        was_training = self.policy.model.training
        self.policy.model.eval()  # live/trust_region teachers score without dropout
        try:
            h = self.policy.completion_hidden(*args, model=self.model)
            head = self.model.get_output_embeddings()
            if self.kind != "trust_region":
                return h, head.weight, head.bias
            beta = self.rate
            h_ref = self.policy.completion_hidden(*args, model=self.reference)
            ref_head = self.reference.get_output_embeddings()
            weight = torch.cat([head.weight, ref_head.weight], dim=1)
            bias = None
            if head.bias is not None:
                bias = torch.lerp(ref_head.bias, head.bias, beta)
            return torch.cat([beta * h, (1 - beta) * h_ref], dim=-1), weight, bias
        finally:
            self.policy.model.train(was_training)

    @torch.no_grad()
    def update(self) -> None:
        """After an optimizer step: ``φ ← (1−β)·φ + β·θ`` (EMA only)."""
        if self.kind != "ema" or self.rate == 0.0:
            return
        teacher = list(self.copy.parameters())
        student = [p.detach() for p in self.policy.model.parameters()]
        torch._foreach_lerp_(teacher, student, self.rate)

    def state_dict(self) -> dict[str, Tensor]:
        """What a checkpoint must hold to restore this teacher (the EMA weights)."""
        return self.copy.state_dict() if self.kind == "ema" else {}

    def load_state_dict(self, state: dict[str, Tensor]) -> None:
        if self.kind == "ema":
            self.copy.load_state_dict(state)
