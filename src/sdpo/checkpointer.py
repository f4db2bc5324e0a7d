"""The checkpointer: what a checkpoint of a training run holds, in which format, and the resume rules.

The format is chosen once, from the runtime (the final ``from_pretrained`` directory too:
:meth:`Checkpointer.save_final`): ``distributed.strategy=fsdp`` writes every rank's
shards (:mod:`sdpo.sharded_checkpoint`, a collective), anything else one set of files written by
rank 0 (:mod:`sdpo.checkpoint`). Either way a checkpoint holds the policy, the teacher's state
(:meth:`sdpo.teacher.Teacher.checkpoint_modules`), the optimizer, the step counter and data
position, and every random stream; the learning-rate schedule is not restored but rebuilt from
the resumed run's config at the saved update count, so a new learning rate takes effect.

Resume rules: only :meth:`~sdpo.config.SDPOConfig.resumable_keys` may differ from the
checkpoint's config, and the teacher kind must match.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from sdpo import checkpoint as ckpt
from sdpo.config import SDPOConfig
from sdpo.data import PromptSource
from sdpo.distributed import Runtime, build_schedule
from sdpo.export import save_pretrained_dir
from sdpo.policy_model import PolicyModel
from sdpo.reprompting import Reprompter
from sdpo.run_dir import RunDirectory
from sdpo.sharded_checkpoint import load_sharded, save_sharded
from sdpo.teacher import Teacher

RNG_KEYS = ("rng", "reprompter_rng")  # per-rank objects: a list by rank in a distributed run


class Checkpointer:
    """Saves and restores everything a training step depends on (SPEC §2's state between steps).

    The trainer's own counters travel as ``state`` (a JSON-able dict with ``global_step``);
    the rest is read from and written into the components given here, in place.
    """

    def __init__(
        self,
        config: SDPOConfig,
        runtime: Runtime,
        run_dir: RunDirectory,
        *,
        policy: PolicyModel,
        teacher: Teacher,
        optimizer: torch.optim.Optimizer,
        reprompter: Reprompter,
        data: PromptSource,
    ) -> None:
        self.config, self.runtime, self.run_dir = config, runtime, run_dir
        self.policy, self.teacher, self.optimizer = policy, teacher, optimizer
        self.reprompter, self.data = reprompter, data
        self.sharded = runtime.lockstep  # every rank holds a shard: every rank writes
        self.saved_step: int | None = None

    def save(self, state: dict[str, Any], scheduler: Any) -> Path:
        """Write ``checkpoint-{step}`` atomically under the run directory (every rank calls it).

        Nothing is written when this step is saved already; weights with NaN or inf are refused
        (:class:`~sdpo.checkpoint.NonFiniteWeightsError`).
        """
        step = int(state["global_step"])
        path = self.run_dir.path / f"checkpoint-{step:06d}"
        if self.saved_step == step and path.is_dir():
            return path
        state = {**state, "data": self.data.state_dict(), "teacher": self.teacher.kind}
        objects = {"scheduler": scheduler.state_dict(), **self._rng_states()}
        args = dict(
            policy=self.policy,
            modules=self.teacher.checkpoint_modules(),
            objects=objects,
            trainer_state=state,
            config=self.config,
            keep=self.config.run.save_total_limit,
        )
        if self.sharded:
            path = save_sharded(
                self.runtime, self.run_dir.path, step, optimizer=self.optimizer, **args
            )
        elif self.runtime.is_main:  # one process, or ddp (equal replicas): rank 0 writes
            objects["optimizer"] = self.optimizer.state_dict()
            with self.run_dir.held():
                path = ckpt.save_checkpoint(self.run_dir.path, step, **args)
        self.runtime.barrier()
        self.saved_step = step
        return path

    def save_final(self, out: Path, card: str) -> Path:
        """The policy as a ``from_pretrained`` directory with ``card`` as its README (every rank
        calls it: under fsdp the shards are gathered, a collective; rank 0 writes)."""
        full = self.runtime.full_state_dict(self.policy.model) if self.sharded else None
        if self.runtime.is_main:
            save_pretrained_dir(self.policy, out, self.config.generation, card, full)
        return out

    def load(self, path: str | Path) -> tuple[dict[str, Any], torch.optim.lr_scheduler.LambdaLR]:
        """Restore weights, teacher, optimizer, data position and random streams from a checkpoint
        (or a run directory's newest intact one); return the trainer's state and the rebuilt
        learning-rate schedule."""
        path = ckpt.resolve_checkpoint(path)
        self._check_resumable(path)
        modules = self.teacher.checkpoint_modules()
        if self.sharded:
            state, objects = load_sharded(
                self.runtime, path, policy=self.policy, modules=modules, optimizer=self.optimizer
            )
        else:
            state, objects = ckpt.load_checkpoint(path, policy=self.policy, modules=modules)
            self.optimizer.load_state_dict(objects["optimizer"])
        if self.runtime.distributed:
            objects = self.runtime.own_share(objects, RNG_KEYS, path)
        distills = self.config.self_distillation.distillation_weight > 0
        if distills and state.get("teacher", self.teacher.kind) != self.teacher.kind:
            raise ValueError(
                f"Checkpoint {path} was written with teacher {state['teacher']!r}, this run uses "
                f"{self.teacher.kind!r}."
            )
        for name in ("scheduler", "rng"):
            if name not in objects:
                raise ckpt.CheckpointError(f"Checkpoint {path} has no {name}.pt.")
        scheduler = build_schedule(
            self.optimizer, self.config, updates_done=int(objects["scheduler"]["last_epoch"])
        )
        ckpt.set_rng_state(objects["rng"])
        if "reprompter_rng" in objects and hasattr(self.reprompter, "rng"):
            self.reprompter.rng.setstate(ckpt._as_tuples(objects["reprompter_rng"]))
        self.data.load_state_dict(state["data"])
        self.saved_step = int(state["global_step"])
        if path.parent.resolve() == self.run_dir.path.resolve():
            # Resuming in the checkpoint's own run directory: its files are this run's, and
            # what the earlier timeline wrote after this step is set aside at the claim.
            self.run_dir.owned = True
            self.run_dir.resumed_step = self.saved_step
        return state, scheduler

    def _rng_states(self) -> dict[str, Any]:
        """Every random stream a step draws from; in a distributed run every rank's, by rank."""
        rng = {"rng": ckpt.rng_state()}
        if hasattr(self.reprompter, "rng"):
            rng["reprompter_rng"] = self.reprompter.rng.getstate()
        if self.runtime.distributed:
            ranks = self.runtime.all_gather(rng)
            rng = {k: [r[k] for r in ranks] for k in rng}
        return rng

    def _check_resumable(self, path: Path) -> None:
        """Refuse a resume whose config changes a key that is fixed for a run."""
        saved = SDPOConfig.from_yaml(path / "config.yaml")
        allowed = set(SDPOConfig.resumable_keys())
        fixed = {k: v for k, v in saved.diff(self.config).items() if k not in allowed}
        if fixed:
            changes = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in fixed.items())
            raise ckpt.CheckpointError(
                f"Cannot resume {path} with changed settings: {changes}. A resumed run may change "
                f"only {', '.join(sorted(allowed))}; start a new run (another run.output_dir) "
                "to change the others."
            )
