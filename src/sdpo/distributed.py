"""Runtime: where a run's tensors live, in which precision, and how its processes cooperate.

One place owns every GPU/scale concern, so the trainer and the checkpoint code only call it:

- **precision**: weights, gradients, AdamW state and the EMA teacher are stored in ``param_dtype``
  (float32 by default: "master weights"); forward and backward passes run under
  :meth:`Runtime.autocast` in the compute dtype (``model.dtype``; ``auto``: bfloat16 on CUDA and
  on CPUs with native bf16, see :func:`auto_precision`).
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
import datetime
import math
import os
import random
import warnings
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from sdpo.config import SDPOConfig
from sdpo.train_mode import set_rl_mode

LOST_UPDATE_WARNING = (
    "model.param_dtype={dtype}: weights, gradients, AdamW state and the EMA teacher are stored in "
    "{dtype}. Updates smaller than the weight's rounding step are lost (at lr 1e-6 one bfloat16 "
    "AdamW step changes ~1% of the weights, float32 ~100%), and an EMA teacher barely moves. "
    "Keep model.param_dtype=float32 and set model.dtype={dtype} to compute in {dtype}."
)


def cpu_has_native_bf16() -> bool:
    """True when PyTorch reports bfloat16 matrix units on this CPU (AVX512-BF16 or AMX tiles).

    There a bf16 matmul ran 2.3-2.8x faster than float32 (Llama 4x256 forward+backward under bf16
    autocast: 0.6x the float32 time); on AVX2-only CPUs bf16 is emulated and ran 8-9x slower.
    """
    probes = ("_is_avx512_bf16_supported", "_is_amx_tile_supported")
    return any(bool(getattr(torch.cpu, name, lambda: False)()) for name in probes)


def auto_precision(device: torch.device) -> tuple[torch.dtype, str]:
    """``(compute dtype, reason)`` for ``model.dtype=auto`` on ``device``: bfloat16 on CUDA and on
    CPUs with native bf16 (:func:`cpu_has_native_bf16`), float32 elsewhere."""
    if device.type == "cuda":
        return torch.bfloat16, "CUDA device"
    if device.type == "cpu":
        if cpu_has_native_bf16():
            return torch.bfloat16, "CPU with native bfloat16 (AVX512-BF16/AMX)"
        return (
            torch.float32,
            "CPU without native bfloat16 (no AVX512-BF16/AMX: bf16 is emulated, slower)",
        )
    return torch.float32, f"{device.type} device (bfloat16 speed unknown)"


def compute_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """The autocast dtype: the one given, or for ``auto`` (None) :func:`auto_precision`'s choice."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return auto_precision(device)[0]
    return getattr(torch, dtype)


def precision_note(dtype: str | torch.dtype | None, device: torch.device) -> str:
    """One line saying which compute dtype a run uses and why (printed at start, kept in the run's
    config.yaml as a comment), e.g. ``model.dtype=auto -> float32 (CPU without native ...)``."""
    if dtype in (None, "auto"):
        chosen, reason = auto_precision(device)
        return f"model.dtype=auto -> {str(chosen).removeprefix('torch.')} ({reason})"
    name = str(dtype).removeprefix("torch.")
    if device.type == "cpu" and name == "bfloat16" and not cpu_has_native_bf16():
        return (
            f"model.dtype={name} (set explicitly; no native bfloat16 on this CPU: expect it slower)"
        )
    return f"model.dtype={name} (set explicitly)"


SMALL_MODEL_PARAMS = 50_000_000


def cpu_threads(requested: int, num_params: int) -> int | None:
    """PyTorch CPU threads for a run: ``requested`` when > 0; else 1 for models under
    :data:`SMALL_MODEL_PARAMS` parameters, None (PyTorch's default) for larger ones.

    Why: a tiny model's matrix products are too small to split; threads only add
    synchronization, and on a busy machine a thread waiting for a taken core stalls the others.
    Measured on 2 cores with the 1M-parameter demo model: the quickstart took 52 s with one
    thread and 100 s with two on a quiet machine, 13 min with two on a busy one.
    """
    if requested > 0:
        return requested
    return 1 if num_params < SMALL_MODEL_PARAMS else None


class Runtime:
    """Devices, precision and processes of one run (built by the trainer from its config).

    With ``WORLD_SIZE`` > 1 (set by ``torchrun`` / ``accelerate launch``) it joins the process
    group (gloo on CPU, NCCL on CUDA; collectives time out after ``distributed.timeout_s``) and:

    - ``ddp``: every rank holds the whole model; after the micro-batches, gradients are summed
      across ranks (the loss normalizers are global sums, so the sum is the global gradient);
    - ``fsdp``: FSDP2 (``fully_shard``) shards every transformer block of the student, the EMA
      teacher and the reference copy the same way; the embeddings, final norm and LM head stay
      replicated (the chunked LM head reads its weight directly) and are summed like ``ddp``.
      Ranks run the same sequence of forward passes (prompt sharing off, a teacher pass on every
      micro-batch), because every block's forward is a collective.
    """

    def __init__(self, config: SDPOConfig, device: torch.device) -> None:
        check_dtype(config, device)
        self.config = config
        self.strategy = config.distributed.strategy
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        if self.world_size > 1 and self.strategy == "none":
            raise RuntimeError(
                f"This is rank {self.rank} of {self.world_size} processes (WORLD_SIZE is set by the "
                "launcher) but distributed.strategy=none: every process would train its own copy "
                "on the same prompts and write into the same run directory. Set "
                "distributed.strategy=ddp or distributed.strategy=fsdp, or launch one process."
            )
        if self.world_size == 1 and self.strategy != "none":
            _single_process_warning(self.strategy)
        if self.world_size > 1 and device.type == "cuda":
            device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
            torch.cuda.set_device(device)
        self.device = device
        self._gathered = False
        self.compute_dtype = compute_dtype(config.model.dtype, device)
        self.param_dtype = getattr(torch, config.model.param_dtype)
        if self.distributed:
            per_step = config.optimization.prompts_per_step
            if per_step % self.world_size:
                raise ValueError(
                    f"optimization.prompts_per_step={per_step} does not split over {self.world_size} "
                    "processes (each takes whole groups); make it a multiple of the process count."
                )
            if not dist.is_initialized():
                dist.init_process_group(
                    backend="nccl" if device.type == "cuda" else "gloo",
                    timeout=datetime.timedelta(seconds=config.distributed.timeout_s),
                )

    @property
    def distributed(self) -> bool:
        """True when several processes train together."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """True on the process that writes files and shows the progress bar (rank 0)."""
        return self.rank == 0

    @property
    def lockstep(self) -> bool:
        """True when every forward pass is a collective (fsdp): ranks must run the same passes."""
        return self.distributed and self.strategy == "fsdp"

    # ----- precision ------------------------------------------------------------------------

    def autocast(self) -> contextlib.AbstractContextManager:
        """Forward passes in the compute dtype over ``param_dtype`` weights (no-op when equal)."""
        if self.compute_dtype == self.param_dtype:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    def prepare_policy(self, model: torch.nn.Module) -> None:
        """Weights in ``param_dtype`` (float32 master weights unless asked otherwise) on this
        rank's device, the attention kernel, gradient checkpointing of the backbone, and the
        module modes of the RL passes: train mode with dropout off unless ``model.dropout``
        (:func:`~sdpo.train_mode.set_rl_mode`)."""
        if self.param_dtype != torch.float32:
            warnings.warn(
                LOST_UPDATE_WARNING.format(dtype=self.config.model.param_dtype), stacklevel=3
            )
        model.to(device=self.device, dtype=self.param_dtype)
        if self.device.type == "cpu":
            threads = cpu_threads(
                self.config.run.num_threads, sum(p.numel() for p in model.parameters())
            )
            if threads is not None:
                torch.set_num_threads(threads)
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
        set_rl_mode(model, dropout=self.config.model.dropout)

    def optimizer(self, params: list[Tensor], **kwargs: Any) -> torch.optim.Optimizer:
        """AdamW: fused kernel on CUDA, one multi-tensor kernel per op (foreach) elsewhere.
        Sharded (DTensor) and replicated parameters go in separate groups (one kernel each)."""
        impl = {"fused": True} if self.device.type == "cuda" else {"foreach": True}
        groups = [g for g in _by_kind(params) if g]
        return torch.optim.AdamW([{"params": g} for g in groups], **kwargs, **impl)

    # ----- sharding -------------------------------------------------------------------------

    def shard(self, *models: torch.nn.Module | None) -> None:
        """fsdp: FSDP2-shard each model's transformer blocks (student, EMA teacher, reference
        alike, so a teacher shard lines up with its student shard). Other strategies: nothing."""
        if not self.lockstep:
            return
        from torch.distributed.fsdp import (
            CPUOffloadPolicy,
            MixedPrecisionPolicy,
            OffloadPolicy,
            fully_shard,
        )

        offload = (
            CPUOffloadPolicy() if self.config.distributed.fsdp_cpu_offload else OffloadPolicy()
        )
        mp = MixedPrecisionPolicy(param_dtype=self.compute_dtype, reduce_dtype=torch.float32)
        for model in models:
            if model is None:
                continue
            blocks = _blocks(model)
            for block in blocks:
                fully_shard(block, mp_policy=mp, offload_policy=offload)
                block.set_gradient_divide_factor(1.0)  # sum, like the replicated part
                block.set_force_sum_reduction_for_comms(True)  # gloo has no pre-scaled sum
            # Each block is its own FSDP root, and a root keeps its full weights after a forward
            # (for the backward). A pass without gradients (teachers, old log-probs) frees them.
            model.get_decoder().register_forward_hook(self._free_after_no_grad_pass(blocks))

    def _free_after_no_grad_pass(self, blocks: list[torch.nn.Module]) -> Any:
        def hook(module: torch.nn.Module, args: Any, output: Any) -> None:
            if not torch.is_grad_enabled() and not self._gathered:
                for block in blocks:
                    block.reshard()

        return hook

    @contextlib.contextmanager
    def gathered(self, *models: torch.nn.Module) -> Iterator[None]:
        """fsdp: every block's full weights held for the duration (sampling runs a data-dependent
        number of forwards per rank, which must not be collectives). Elsewhere: nothing."""
        blocks = [b for m in models for b in _blocks(m) if hasattr(b, "unshard")]
        if not self.lockstep or not blocks:
            yield
            return
        for block in blocks:
            block.set_reshard_after_forward(False)
            block.unshard()
        self._gathered = True
        try:
            yield
        finally:
            self._gathered = False
            for block in blocks:
                block.reshard()
                block.set_reshard_after_forward(True)

    # ----- cross-process sums ---------------------------------------------------------------

    def share(self, rows: Sequence[Any]) -> list[Any]:
        """This rank's contiguous share of a step's prompts (whole groups per rank)."""
        n = len(rows) // self.world_size
        return list(rows[self.rank * n : (self.rank + 1) * n])

    def all_reduce(self, values: dict[str, float], op: str = "sum") -> dict[str, float]:
        """``values`` summed (``sum``), max-ed (``max``) or averaged (``mean``) over ranks;
        unchanged with one process. Every rank must pass the same keys."""
        if not self.distributed or not values:
            return dict(values)
        keys = sorted(values)
        t = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64)
        t = t.to(self._comm_device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
        if op == "mean":
            t = t / self.world_size
        return dict(zip(keys, t.cpu().tolist(), strict=True))

    def reduce_sums(self, values: dict[str, float]) -> dict[str, float]:
        """Per-step metric sums over ranks: ``*_max`` keys by max, ``*_min`` by min, others summed."""
        if not self.distributed:
            return dict(values)
        maxes = {k: v for k, v in values.items() if k.endswith("_max")}
        mins = {k: -v for k, v in values.items() if k.endswith("_min")}
        out = self.all_reduce({k: v for k, v in values.items() if k not in maxes and k not in mins})
        out.update(self.all_reduce(maxes, op="max"))
        out.update({k: -v for k, v in self.all_reduce(mins, op="max").items()})
        return out

    def gather_cat(self, *tensors: Tensor) -> tuple[Tensor, ...]:
        """Each tensor concatenated over ranks (rank order) along dim 0, on this rank's device."""
        if not self.distributed:
            return tensors
        parts = self.all_gather([t.detach().cpu() for t in tensors])
        return tuple(torch.cat([p[i] for p in parts]).to(t.device) for i, t in enumerate(tensors))

    def all_gather(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` (picklable), in rank order."""
        if not self.distributed:
            return [obj]
        out: list[Any] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def sync_gradients(self, params: Sequence[Tensor]) -> None:
        """Sum the replicated parameters' gradients over ranks (sharded ones FSDP has summed).

        A rank whose loss did not reach a parameter contributes zeros to its sum."""
        if not self.distributed:
            return
        plain = [p for p in params if p.requires_grad and not _is_sharded(p)]
        for p in plain:
            if p.grad is None:
                p.grad = torch.zeros_like(p)
        for group in _by_dtype([p.grad for p in plain]):
            flat = torch.cat([g.reshape(-1) for g in group])
            dist.all_reduce(flat)
            offset = 0
            for g in group:
                g.copy_(flat[offset : offset + g.numel()].view_as(g))
                offset += g.numel()

    def own_share(self, objects: dict[str, Any], keys: Sequence[str], path: Any) -> dict[str, Any]:
        """``objects`` with each of ``keys`` (a list by rank, from a checkpoint) replaced by this
        rank's entry; a checkpoint of another world size is refused."""
        out = dict(objects)
        for key in keys:
            if key not in out:
                continue
            if not isinstance(out[key], list) or len(out[key]) != self.world_size:
                n = len(out[key]) if isinstance(out[key], list) else 1
                raise ValueError(
                    f"Checkpoint {path} was written by {n} process(es); resume it with the same "
                    f"number (this launch has {self.world_size})."
                )
            out[key] = out[key][self.rank]
        return out

    def full_state_dict(self, model: torch.nn.Module) -> dict[str, Tensor]:
        """``model``'s whole state on CPU (shards gathered: a collective under fsdp)."""
        if not self.lockstep:
            return {k: v.detach().cpu() for k, v in model.state_dict().items()}
        from torch.distributed.checkpoint.state_dict import (
            StateDictOptions,
            get_model_state_dict,
        )

        options = StateDictOptions(
            full_state_dict=True, cpu_offload=True, broadcast_from_rank0=False
        )
        return get_model_state_dict(model, options=options)

    @property
    def _comm_device(self) -> torch.device:
        return self.device if self.device.type == "cuda" else torch.device("cpu")

    # ----- gradients ------------------------------------------------------------------------

    def clip_grad_norm_(self, params: list[Tensor], max_norm: float | None) -> float:
        """Global L2 norm of the gradients; scaled down to ``max_norm`` when larger (None: no clip).

        Sharded gradients contribute their shards' squares summed over ranks; replicated ones
        (equal on every rank after :meth:`sync_gradients`) count once."""
        grads = [p.grad for p in params if p.grad is not None]
        if not self.lockstep:
            if not grads:
                return 0.0
            if max_norm is None:
                return float(torch.nn.utils.get_total_norm(grads))
            return float(torch.nn.utils.clip_grad_norm_(params, max_norm))
        sharded = [g.to_local() for g in grads if _is_sharded(g)]
        plain = [g for g in grads if not _is_sharded(g)]
        sq = torch.zeros((), dtype=torch.float64, device=self._comm_device)
        for g in sharded:
            sq += g.detach().double().pow(2).sum().to(sq.device)
        dist.all_reduce(sq)
        for g in plain:
            sq += g.detach().double().pow(2).sum().to(sq.device)
        norm = float(sq.sqrt())
        if max_norm is not None and grads:
            scale = min(max_norm / (norm + 1e-6), 1.0)
            if scale < 1.0:
                for g in sharded + plain:
                    g.mul_(scale)
        return norm

    # ----- random streams -------------------------------------------------------------------

    def seed(self, seed: int) -> None:
        """Python and torch streams from ``(seed, rank)``; rank 0 uses ``seed`` itself."""
        stream = seed + 1_000_003 * self.rank
        random.seed(stream)
        torch.manual_seed(stream)

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()

    def close(self) -> None:
        """Leave the process group (when this runtime joined it).

        A barrier first: with gloo it also waits for every collective still queued on this rank
        (FSDP2 issues some asynchronously), so no rank tears the group down under another's work.
        """
        if self.distributed and dist.is_initialized():
            dist.barrier()
            dist.destroy_process_group()


def _is_sharded(t: Tensor) -> bool:
    from torch.distributed.tensor import DTensor

    return isinstance(t, DTensor)


def _by_kind(params: Sequence[Tensor]) -> list[list[Tensor]]:
    """``[sharded, replicated]``: foreach/fused kernels take one kind per call."""
    return [[p for p in params if _is_sharded(p)], [p for p in params if not _is_sharded(p)]]


def _by_dtype(tensors: Sequence[Tensor]) -> list[list[Tensor]]:
    groups: dict[torch.dtype, list[Tensor]] = {}
    for t in tensors:
        groups.setdefault(t.dtype, []).append(t)
    return list(groups.values())


def _blocks(model: torch.nn.Module) -> list[torch.nn.Module]:
    """The transformer blocks (``model._no_split_modules`` classes) of a Hugging Face model."""
    names = set(getattr(model, "_no_split_modules", None) or [])
    blocks = [m for m in model.modules() if type(m).__name__ in names]
    blocks = blocks or [m for m in model.modules() if type(m).__name__.startswith("FSDP")]
    if not blocks:
        raise ValueError(
            f"{type(model).__name__} names no transformer blocks (_no_split_modules); "
            "distributed.strategy=fsdp cannot shard it. Use distributed.strategy=ddp."
        )
    return blocks


def lerp_(targets: Sequence[Tensor], sources: Sequence[Tensor], weight: float) -> None:
    """``t ← t + weight·(s − t)`` for each pair, shard by shard (no gather for DTensors)."""
    for kind in (True, False):
        pairs = [(t, s) for t, s in zip(targets, sources, strict=True) if _is_sharded(t) == kind]
        if pairs:
            torch._foreach_lerp_([t for t, _ in pairs], [s.detach() for _, s in pairs], weight)


# ----- optimizer, learning-rate schedule, dtype policy ------------------------------------------


def build_optimizer(
    runtime: Runtime, model: torch.nn.Module, config: SDPOConfig
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over ``model``'s trainable parameters (:meth:`Runtime.optimizer`) and its schedule."""
    opt = config.optimization
    optimizer = runtime.optimizer(
        [p for p in model.parameters() if p.requires_grad],
        lr=opt.learning_rate,
        betas=(opt.adam_beta1, opt.adam_beta2),
        weight_decay=opt.weight_decay,
    )
    return optimizer, build_schedule(optimizer, config)


def build_schedule(
    optimizer: torch.optim.Optimizer, config: SDPOConfig, updates_done: int = 0
) -> torch.optim.lr_scheduler.LambdaLR:
    """The learning-rate schedule of ``config`` positioned after ``updates_done`` optimizer steps:
    ``lr_t = optimization.learning_rate · factor(t)`` (:func:`lr_schedule`). A resumed run
    rebuilds it from its own config, so a changed learning rate or schedule takes effect."""
    opt = config.optimization
    total = config.run.max_steps * opt.updates_per_batch
    factor = lr_schedule(opt.lr_scheduler, opt.warmup_steps, total)
    for group in optimizer.param_groups:
        group["initial_lr"] = opt.learning_rate
    # LambdaLR takes one step when built: start one before, so it lands on `updates_done`.
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor, last_epoch=updates_done - 1)


def lr_schedule(kind: str, warmup: int, total: int) -> Callable[[int], float]:
    """Multiplier of the base learning rate at update ``t``: linear warm-up, then constant/linear/cosine."""

    def factor(t: int) -> float:
        if warmup and t < warmup:
            return (t + 1) / warmup
        progress = min(max(t - warmup, 0) / max(total - warmup, 1), 1.0)
        if kind == "linear":
            return 1.0 - progress
        if kind == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        return 1.0

    return factor


def check_dtype(config: SDPOConfig, device: torch.device) -> None:
    """float16 on CPU (weights or compute) trained into NaN weights in the adversarial trial: refuse it."""
    for key in ("model.dtype", "model.param_dtype"):
        if device.type == "cpu" and config.get(key) == "float16":
            raise ValueError(
                f"{key} = float16 on CPU is not supported (training in it produced NaN weights); "
                f"use {key}=float32 (or bfloat16), or a CUDA device."
            )


def _single_process_warning(strategy: str) -> None:
    """distributed.strategy asks for several processes but this is the only one.

    ``accelerate launch --num_processes 2`` without ``--multi_cpu`` (or a GPU config) runs its
    simple launcher: one process, no ``WORLD_SIZE``, only ``ACCELERATE_*`` and ``MASTER_ADDR``
    set. That run would silently train alone, so it is an error; a plain ``python`` start with
    the strategy set is a warning (it trains, on one process)."""
    launch = "torchrun --nproc_per_node N -m sdpo train ..."
    if any(k.startswith("ACCELERATE_") for k in os.environ):
        raise ValueError(  # a setting that does not fit the launch: one `sdpo: ...` line
            f"distributed.strategy={strategy}, but `accelerate launch` started a single process "
            "(WORLD_SIZE is not set: its simple launcher runs one process, e.g. on CPU without "
            f"--multi_cpu). Launch the processes with `{launch}` (or `accelerate launch "
            "--multi_cpu --num_processes N`), or set distributed.strategy=none for one process."
        )
    warnings.warn(
        f"distributed.strategy={strategy}, but this is a single process (WORLD_SIZE is not set): "
        f"training runs on one process. To use several, launch with `{launch}`.",
        stacklevel=3,
    )
