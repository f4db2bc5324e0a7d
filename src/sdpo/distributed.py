"""Runtime: where a run's tensors live, in which precision, and how its processes cooperate.

One place owns every GPU/scale concern, so the trainer and the checkpoint code only call it:

- **precision**: weights, gradients, AdamW state and the EMA teacher are stored in ``param_dtype``
  (float32 by default: "master weights"); forward and backward passes run under
  :meth:`Runtime.autocast` in the compute dtype (``model.dtype``: bfloat16 on CUDA when ``auto``).
  The LM-head terms are computed in float32 from the compute-dtype hidden states
  (:func:`sdpo.self_distillation.policy_terms` leaves autocast for the head).
- **memory levers**: gradient checkpointing of the student's backbone, the attention kernel,
  fused (CUDA) / foreach (CPU) AdamW.
- **processes** (``distributed.strategy``): the process group (``torchrun`` / ``accelerate
  launch`` set ``WORLD_SIZE``/``RANK``), each rank's share of the prompts, sums across ranks,
  rank-0-only writing, and per-(seed, rank) random streams.
"""

from __future__ import annotations

import contextlib
import os
import random
import warnings
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor

from sdpo.config import SDPOConfig

LOST_UPDATE_WARNING = (
    "model.param_dtype={dtype}: weights, gradients, AdamW state and the EMA teacher are stored in "
    "{dtype}. Updates smaller than the weight's rounding step are lost (at lr 1e-6 one bfloat16 "
    "AdamW step changes ~1% of the weights, float32 ~100%), and an EMA teacher barely moves. "
    "Keep model.param_dtype=float32 and set model.dtype={dtype} to compute in {dtype}."
)


def compute_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The autocast dtype: ``auto`` = bfloat16 on CUDA, float32 elsewhere (bf16 on CPU measured
    8-9x slower than float32)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, dtype)


class Runtime:
    """Devices, precision and processes of one run (built by the trainer from its config)."""

    def __init__(self, config: SDPOConfig, device: torch.device) -> None:
        self.device = device
        self.config = config
        self.compute_dtype = compute_dtype(config.model.dtype, device)
        self.param_dtype = getattr(torch, config.model.param_dtype)
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows the progress bar (rank 0)."""
        return self.rank == 0

    # ----- precision ------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes in the compute dtype over ``param_dtype`` weights (no-op when equal)."""
        if self.compute_dtype == self.param_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def prepare_policy(self, model: torch.nn.Module) -> None:
        """Weights in ``param_dtype`` (float32 master weights unless asked otherwise), the
        attention kernel, and gradient checkpointing of the backbone."""
        if self.param_dtype != torch.float32:
            warnings.warn(
                LOST_UPDATE_WARNING.format(dtype=self.config.model.param_dtype), stacklevel=3
            )
        model.to(dtype=self.param_dtype)
        impl = self.config.model.attn_implementation
        if getattr(model.config, "_attn_implementation", None) != impl:
            if impl == "flash_attention_2" and self.device.type != "cuda":
                raise ValueError(
                    "model.attn_implementation=flash_attention_2 needs a CUDA device; use sdpa."
                )
            model.set_attn_implementation(impl)
        if self.config.model.gradient_checkpointing:
            kwargs = {"use_reentrant": False}
            if hasattr(model, "activation_checkpointing_enable"):  # the transformers 5 name
                model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
            else:
                model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def optimizer(self, params: list[Tensor], **kwargs: Any) -> torch.optim.Optimizer:
        """AdamW: fused kernel on CUDA, one multi-tensor kernel per op (foreach) elsewhere."""
        impl = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        return torch.optim.AdamW(params, **kwargs, **impl)

    # ----- gradients ------------------------------------------------------------------------

    def clip_grad_norm_(self, params: list[Tensor], max_norm: float | None) -> float:
        """Global L2 norm of the gradients; scaled down to ``max_norm`` when larger (None: no clip)."""
        grads = [p.grad for p in params if p.grad is not None]
        if not grads:
            return 0.0
        if max_norm is None:
            return float(torch.nn.utils.get_total_norm(grads))
        return float(torch.nn.utils.clip_grad_norm_(params, max_norm))

    # ----- random streams -------------------------------------------------------------------

    def seed(self, seed: int) -> None:
        """Python and torch streams from ``(seed, rank)``; rank 0 uses ``seed`` itself."""
        stream = seed + 1_000_003 * self.rank
        random.seed(stream)
        torch.manual_seed(stream)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Placeholder for ordering file writes across ranks (one process: nothing to order)."""
        yield
