"""SDPOTrainer: the training loop of SPEC §2, one named call per sub-step.

    step():  rows     = next batch of B prompts
             rollouts = generate(rows)             G completions per prompt
             score(rollouts)                       rewards + per-rollout feedback
             contexts = reprompt(rollouts)         teacher prompts x' (None: not distilled)
             update(rollouts, contexts)            forward -> loss -> backward -> optimizer -> teacher

Loss = pg_loss_weight·L_pg + distillation_weight·L_distill + kl_penalty_weight·L_kl, every term
normalized by whole-step counts, so the gradient does not depend on the micro-batch size.
"""

from __future__ import annotations

import contextlib
import math
import signal
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import TrainerState

from sdpo import checkpoint as ckpt
from sdpo import lora
from sdpo.config import SDPOConfig
from sdpo.data import PromptSource, load_rows
from sdpo.distributed import Runtime
from sdpo.evaluation import evaluate_policy
from sdpo.export import model_card, save_pretrained_dir
from sdpo.generation import GenerationBackend, build_backend
from sdpo.health import HealthMonitor
from sdpo.loss import SDPOLoss
from sdpo.policy_model import PolicyModel, RolloutBatch, completion_id_lists
from sdpo.reprompting import Reprompter, TeacherContext
from sdpo.reward_model import (
    RewardFunctionError,
    as_reward_model,
    call_reward_model,
    cap_feedback,
)
from sdpo.run_dir import RunDirectory
from sdpo.sharded_checkpoint import load_sharded, save_sharded
from sdpo.teacher import Teacher, reference_weights
from sdpo.tracking import ExperimentTracker, check_trackers


class NonFiniteLossError(RuntimeError):
    """Raised after too many steps in a row with a non-finite loss."""


class SDPOTrainer:
    """Trains ``policy_model`` with SDPO.

    Args:
        config: the run's :class:`~sdpo.config.SDPOConfig`.
        policy_model: the :class:`~sdpo.policy_model.PolicyModel` to train (in place).
        reward_model: a :class:`~sdpo.reward_model.RewardModel`, a TRL-style callable
            ``fn(prompts, completions, **columns)``, or a list of them.
        train_dataloader: list of dicts, ``datasets.Dataset``, JSONL path or torch ``DataLoader``;
            rows have a ``prompt`` and any other columns (they reach the reward model).
        eval_dataloader: the same kinds, for evaluation (greedy and sampled accuracy).
        callbacks: objects with any of ``on_step_end(trainer, metrics)``,
            ``on_evaluate(trainer, metrics)``, ``on_train_end(trainer)``.
        generation_backend: a :class:`~sdpo.generation.GenerationBackend` to sample with instead
            of the one ``generation.backend`` names (e.g. an engine shared by several runs).
    """

    def __init__(
        self,
        config: SDPOConfig,
        policy_model: PolicyModel,
        reward_model: Any,
        train_dataloader: Any,
        eval_dataloader: Any = None,
        callbacks: list[Any] | None = None,
        generation_backend: GenerationBackend | None = None,
    ) -> None:
        self.config = config.validate()
        self.policy = policy_model
        _check_dtype(config, policy_model.device)
        self.reward_model = as_reward_model(reward_model)
        run = config.run
        self.runtime = Runtime(self.config, policy_model.device)
        self.runtime.seed(run.seed)
        self.train_data = PromptSource(
            train_dataloader, config.optimization.prompts_per_step, run.seed
        )
        self.eval_rows = load_rows(eval_dataloader) if eval_dataloader is not None else None
        if self.eval_rows is not None and run.eval_max_prompts:
            self.eval_rows = self.eval_rows[: run.eval_max_prompts]
        self.callbacks = list(callbacks or [])

        sd, pg = config.self_distillation, config.policy_gradient
        self.distills = sd.distillation_weight > 0  # False: GRPO, no teacher is ever run
        needs_reference = pg.kl_penalty_weight > 0 or (
            self.distills and sd.teacher in ("frozen", "trust_region")
        )
        self.runtime.prepare_policy(policy_model.model)
        lora.attach(policy_model, config.model.lora)
        self.reference = reference_weights(policy_model) if needs_reference else None
        # A run that does not distill (GRPO) has no use for a teacher: no EMA copy, no updates.
        teacher_kind = sd.teacher if self.distills else "live"
        self.teacher = Teacher(teacher_kind, policy_model, sd.teacher_update_rate, self.reference)
        self.reprompter = Reprompter(sd, tokenizer=policy_model.tokenizer, seed=run.seed)
        self.runtime.shard(policy_model.model, self.teacher.copy, _module(self.reference))
        self.loss = SDPOLoss(self.config, policy_model, self.teacher, self.reference, self.runtime)
        policy_model.device = self.runtime.device
        policy_model.share_prompts = not self.runtime.lockstep
        self.optimizer, self.scheduler = self._build_optimizer()
        self.generator = generation_backend or build_backend(
            config.generation,
            policy_model,
            seed=run.seed,
            max_prompt_length=config.model.max_prompt_length,
            dtype=self.runtime.compute_dtype,
        )
        self.health = HealthMonitor(config.health, distillation=self.distills)
        check_trackers(run.report_to)  # a missing tracker package fails here, not after loading
        self.tracker: ExperimentTracker | None = None

        run.output_dir = self.runtime.all_gather(run.output_dir)[0]  # rank 0's (a timestamp)
        self.run_dir = Path(run.output_dir)
        if any(ckpt.is_checkpoint(p) for p in (self.run_dir, *self.run_dir.resolve().parents)):
            raise ValueError(
                f"run.output_dir = {run.output_dir} is inside a checkpoint; a resumed run continues "
                "in the checkpoint's run directory (its parent) or in a new directory you name."
            )
        self._run = RunDirectory(self.run_dir)
        self._owns_run_dir = False  # this trainer's files are in run_dir already
        self._resumed_from: Path | None = None
        self._saved_step: int | None = None
        self.global_step = 0
        self.counters = {"skipped_long_prompts": 0, "skipped_nonfinite_steps": 0}
        self._nonfinite_in_row = 0
        self._stop_requested = False
        self._t_start = time.time()
        if run.resume_from:
            self.load_checkpoint(run.resume_from)

    # ----- the step ---------------------------------------------------------------------------

    def step(self) -> dict[str, float]:
        """One SDPO step (SPEC §2); returns its metrics."""
        t0 = time.perf_counter()
        rows = self.runtime.share(self.train_data.next_batch())
        rollouts = self.generate(rows)
        if rollouts is None:
            self.global_step += 1
            return {"skipped_long_prompts": self.counters["skipped_long_prompts"]}
        t_gen = time.perf_counter()
        self.score(rollouts)
        contexts = self.reprompt(rollouts)
        metrics = self.update(rollouts, contexts)
        self.global_step += 1
        metrics.update(self._rollout_metrics(rollouts))
        metrics.update(rollouts.reward_metrics)
        stats = self.runtime.all_reduce(self.reprompter.last_stats, op="mean")
        metrics.update({f"self_distillation/{k}": v for k, v in stats.items()})
        metrics["step_time"] = time.perf_counter() - t0
        metrics["generation_time"] = t_gen - t0
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics.update(self.counters)
        self._last_rollouts, self._last_contexts = rollouts, contexts
        return metrics

    def generate(
        self, rows: list[dict[str, Any]], num_samples: int | None = None, greedy: bool = False
    ) -> RolloutBatch | None:
        """Sample G completions per prompt; prompts over ``max_prompt_length`` are skipped and counted."""
        g = num_samples or self.config.num_samples_per_prompt
        encoded, kept = [], []
        for row in rows:
            ids = self.policy.encode_prompt(row["prompt"])
            if len(ids) > self.config.model.max_prompt_length:
                self.counters["skipped_long_prompts"] += 1
                continue
            encoded.append(ids)
            kept.append(row)
        if len(kept) < len(rows) and self.runtime.lockstep:
            raise ValueError(
                "A prompt is longer than model.max_prompt_length; under distributed.strategy=fsdp "
                "it cannot be skipped (ranks run in step). Filter the data or raise the limit."
            )
        if not kept:
            warnings.warn(
                "Every prompt of this batch is longer than model.max_prompt_length; step skipped.",
                stacklevel=2,
            )
            return None
        with self.runtime.autocast(), self.runtime.gathered(self.policy.model):
            out = self.generator.generate(encoded, g, greedy=greedy)
        expanded = [row for row in kept for _ in range(g)]
        return RolloutBatch(
            prompts=[row["prompt"] for row in expanded],
            prompt_ids=out.prompt_ids,
            prompt_mask=out.prompt_mask,
            completion_ids=out.completion_ids,
            completion_mask=out.completion_mask,
            completions=self.policy.decode(out.completion_ids, out.completion_mask),
            group_ids=torch.arange(len(kept)).repeat_interleave(g),
            rows=expanded,
            sampler_logprobs=out.sampler_logprobs,
        )

    def score(self, rollouts: RolloutBatch) -> None:
        """Rewards and per-rollout feedback; the reward model is called as TRL calls reward
        functions (chat completions as assistant messages, ``completion_ids``, ``trainer_state``,
        ``log_metric``, ``log_extra``: :func:`sdpo.reward_model.call_reward_model`)."""
        data = self.config.data
        try:
            outputs, log = call_reward_model(
                self.reward_model,
                rollouts.rows,
                rollouts.completions,
                completion_id_lists(rollouts.completion_ids, rollouts.completion_mask),
                trainer_state=self.trainer_state(),
                timeout_s=data.reward_timeout_s,
            )
        except Exception as exc:
            if not self.runtime.distributed:
                raise
            raise RuntimeError(  # the other ranks only see this one exit: say who and where
                f"Reward model {self.reward_model.name!r} raised on rank {self.runtime.rank} at step "
                f"{self.global_step + 1} scoring {len(rollouts)} completions (first prompt "
                f"{rollouts.prompts[0]!r:.80}, completion {rollouts.completions[0]!r:.80}): {exc!r}"
            ) from exc
        rollouts.rewards = self._checked_rewards(outputs, rollouts)
        rollouts.feedback = [cap_feedback(o.feedback, data.max_feedback_chars) for o in outputs]
        rollouts.reward_info = [o.info for o in outputs]
        rollouts.reward_metrics = log.metric_means()
        n = len(rollouts)  # a column logged by several functions keeps the last one's values
        rollouts.reward_extra = {k: v[-n:] for k, v in log.extra.items() if len(v) % n == 0 and v}

    def trainer_state(self) -> TrainerState:
        """Progress as TRL's reward functions see it (``global_step`` = steps completed)."""
        return TrainerState(
            global_step=self.global_step,
            max_steps=self.config.run.max_steps,
            epoch=self.train_data.progress,
        )

    def reprompt(self, rollouts: RolloutBatch) -> list[TeacherContext | None]:
        """Teacher contexts (SPEC §3): a successful sibling and/or this rollout's feedback."""
        if not self.distills:
            self.reprompter.last_stats = {}
            return [None] * len(rollouts)
        return self.reprompter.build(
            rollouts.prompts,
            rollouts.completions,
            rollouts.rewards.tolist(),
            rollouts.group_ids.tolist(),
            feedback=rollouts.feedback,
        )

    def update(
        self, rollouts: RolloutBatch, contexts: list[TeacherContext | None]
    ) -> dict[str, float]:
        """Forward -> loss -> backward over micro-batches, then optimizer and teacher updates."""
        prepared = self.loss.prepare(rollouts, contexts)
        metrics: dict[str, float] = {}
        for _ in range(self.config.optimization.updates_per_batch):
            self.optimizer.zero_grad(set_to_none=True)
            sums = self.loss.backward(rollouts, prepared)
            if self.runtime.all_reduce({"bad": float(sums is None)})["bad"]:
                self._skip_nonfinite_step("loss")
                return {"loss": float("nan")}
            self.runtime.sync_gradients(list(self.policy.model.parameters()))
            sums = self.runtime.reduce_sums(sums)
            grad_norm = self._clip_gradients()
            if not math.isfinite(grad_norm):  # a finite loss can still have a NaN/inf gradient
                self._skip_nonfinite_step("gradient norm")
                return {"loss": float("nan"), "grad_norm": grad_norm}
            self._nonfinite_in_row = 0
            self.optimizer.step()
            self.scheduler.step()
            self.teacher.update()
            self.generator.sync_weights()
            metrics = self.loss.metrics(sums, prepared.counts)
            metrics["grad_norm"] = grad_norm
        return metrics

    def _clip_gradients(self) -> float:
        params = [p for p in self.policy.model.parameters() if p.grad is not None]
        return self.runtime.clip_grad_norm_(params, self.config.optimization.max_grad_norm)

    def _skip_nonfinite_step(self, what: str) -> None:
        """No optimizer step and no teacher update; counted, and bounded by
        ``run.max_consecutive_nonfinite`` steps in a row."""
        self.optimizer.zero_grad(set_to_none=True)
        self._nonfinite_in_row += 1
        self.counters["skipped_nonfinite_steps"] += 1
        limit = self.config.run.max_consecutive_nonfinite
        warnings.warn(
            f"Step {self.global_step + 1}: non-finite {what}; step skipped ({self._nonfinite_in_row} in a row).",
            stacklevel=3,
        )
        if self._nonfinite_in_row >= limit:
            raise NonFiniteLossError(
                f"{limit} steps in a row had a non-finite loss or gradient; stopping. Lower optimization.learning_rate, "
                "check the reward model for NaN/inf, or raise run.max_consecutive_nonfinite."
            )

    def _rollout_metrics(self, rollouts: RolloutBatch) -> dict[str, float]:
        r, lengths, unfinished = self.runtime.gather_cat(  # the global batch's rollouts
            rollouts.rewards,
            rollouts.completion_mask.sum(-1).float(),
            ~(rollouts.completion_ids == self.policy.eos_token_id).any(-1),
        )
        groups = r.view(-1, self.config.num_samples_per_prompt)
        return {
            "reward": float(r.mean()),
            "reward_std": float(r.std()) if len(r) > 1 else 0.0,
            "frac_reward_zero_std": float((groups.std(-1) == 0).float().mean())
            if groups.shape[1] > 1
            else 1.0,
            "completions/mean_length": float(lengths.mean()),
            "completions/clipped_fraction": float(unfinished.float().mean()),
            "accuracy": float(
                (r >= self.config.self_distillation.success_reward_threshold).float().mean()
            ),
        }

    def _build_optimizer(self) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
        opt = self.config.optimization
        optimizer = self.runtime.optimizer(
            [p for p in self.policy.model.parameters() if p.requires_grad],
            lr=opt.learning_rate,
            betas=(opt.adam_beta1, opt.adam_beta2),
            weight_decay=opt.weight_decay,
        )
        total = self.config.run.max_steps * opt.updates_per_batch
        scheduler = torch.optim.lr_scheduler.LambdaLR(
            optimizer, lr_schedule(opt.lr_scheduler, opt.warmup_steps, total)
        )
        return optimizer, scheduler

    # ----- evaluation -------------------------------------------------------------------------

    def evaluate(self) -> dict[str, float]:
        """Greedy and sampled accuracy, pass@k and maj@k on the eval set (``eval/`` + the names of
        :func:`sdpo.evaluation.summarize`; the same code as ``sdpo eval``).

        Runs on its own random stream, so evaluating does not change what training samples next.
        """
        if not self.eval_rows:
            return {}
        cfg = self.config
        # Every rank evaluates the whole set on the same seeded stream (equal results); rank 0 writes.
        with self.runtime.autocast(), self.runtime.gathered(self.policy.model):
            result = evaluate_policy(
                self.policy,
                self.reward_model,
                self.eval_rows,
                generation=cfg.generation,
                num_samples=cfg.run.eval_num_samples,
                success_threshold=cfg.self_distillation.success_reward_threshold,
                seed=cfg.run.seed + 7919,
                batch_size=max(cfg.optimization.prompts_per_step * cfg.num_samples_per_prompt, 1),
                max_prompt_length=cfg.model.max_prompt_length,
                trainer_state=self.trainer_state(),
            )
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        self._log_metrics(self.global_step, metrics)
        for cb in self.callbacks:
            if hasattr(cb, "on_evaluate"):
                cb.on_evaluate(self, metrics)
        return metrics

    # ----- the loop ---------------------------------------------------------------------------

    def train(self) -> dict[str, float]:
        """Run until ``run.max_steps``; evaluate, log, checkpoint; Ctrl-C or SIGTERM stops after the
        current step and saves a checkpoint.

        The run directory is locked while this runs and must be empty, this run's own (resume), or
        overwritten (``run.overwrite_output_dir``). Returns the last evaluation's metrics (empty
        without an eval set).
        """
        with self._holding_run_dir():
            if self.runtime.is_main:  # the one that claimed (and created) the run directory
                self.config.to_yaml(self.run_dir / "config.yaml")
            self._start_tracking()
            self.last_eval = self.evaluate() if self.global_step == 0 else {}
            self.first_eval = dict(self.last_eval)
            with self._stop_signals():
                self._loop()
            if self._stop_requested:
                path = self.save_checkpoint()
                print(
                    f"\nStopped at step {self.global_step}; checkpoint {path}.\nResume with: sdpo train --resume {self.run_dir}",
                    file=sys.stderr,
                )
                self._finish_tracking()
                return self.last_eval
            self.last_eval = self.evaluate()
            final = self.save_model()
            if self.runtime.is_main:
                print(
                    f"Final model: {final.resolve()} (from_pretrained-loadable, with a model card)"
                )
            self._finish_tracking()
        for cb in self.callbacks:
            if hasattr(cb, "on_train_end"):
                cb.on_train_end(self)
        return self.last_eval

    def _loop(self) -> None:
        run = self.config.run
        bar = _progress(run, self.global_step) if self.runtime.is_main else None
        try:
            while self.global_step < run.max_steps and not self._stop_requested:
                metrics = self.step()
                step = self.global_step
                self._check_health(step, metrics, bar)
                if step % run.logging_steps == 0:
                    self._log_metrics(step, metrics)
                if step % run.sample_log_steps == 0 and hasattr(self, "_last_rollouts"):
                    self._write_samples(self._last_rollouts, self._last_contexts)
                if run.eval_steps and step % run.eval_steps == 0 and step < run.max_steps:
                    self.last_eval = self.evaluate()
                if step % run.save_steps == 0 or step == run.max_steps:
                    self.save_checkpoint()
                for cb in self.callbacks:
                    if hasattr(cb, "on_step_end"):
                        cb.on_step_end(self, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{metrics.get('reward', float('nan')):.3f}",
                        distill=f"{metrics.get('self_distillation/distillation_loss', 0.0):.4f}",
                    )
        finally:
            if bar is not None:
                bar.close()

    @contextlib.contextmanager
    def _stop_signals(self) -> Iterator[None]:
        """Ctrl-C (SIGINT) and a scheduler's preemption (SIGTERM) stop after the current step."""
        if not _main_thread():
            yield
            return
        previous = {sig: signal.signal(sig, self._request_stop) for sig in STOP_SIGNALS}
        try:
            yield
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _check_health(self, step: int, metrics: dict[str, float], bar: Any) -> None:
        """Print the health warnings due at this step (sdpo.health); log their counters."""
        for message in self.health.update(step, metrics):
            text = f"sdpo: warning at step {step}: {message}"
            if bar is not None:
                bar.write(text, file=sys.stderr)
            else:
                print(text, file=sys.stderr)
        metrics.update(self.health.counters)

    def _request_stop(self, signum: int, frame: Any) -> None:
        name = "Ctrl-C" if signum == signal.SIGINT else signal.Signals(signum).name
        if self._stop_requested:  # a second signal: stop now
            raise KeyboardInterrupt
        self._stop_requested = True
        print(
            f"\n{name}: finishing the current step, then saving a checkpoint ({name} again to abort).",
            file=sys.stderr,
        )

    @contextlib.contextmanager
    def _holding_run_dir(self) -> Iterator[None]:
        """Hold the run directory's lock (claiming it on first use); re-entrant. Only the main
        process (rank 0) claims it: it is the one that writes the run's files."""
        if self._run.claimed or not self.runtime.is_main:
            yield
            return
        own = self._owns_run_dir or (
            self._resumed_from is not None
            and self._resumed_from.parent.resolve() == self.run_dir.resolve()
        )
        self._run.claim(own=own, overwrite=self.config.run.overwrite_output_dir)
        try:
            ckpt.cleanup(self.run_dir)
            if own and not self._owns_run_dir and self._resumed_from is not None:
                moved = ckpt.set_aside_newer(self.run_dir, self.global_step)  # a branch
                if moved:
                    print(moved, file=sys.stderr)
            self._owns_run_dir = True
            yield
        finally:
            self._run.release()

    # ----- logging & checkpoints --------------------------------------------------------------

    def _start_tracking(self) -> None:
        """The external trackers of ``run.report_to`` (sdpo.tracking), on the main process."""
        run = self.config.run
        if self.tracker is None and self.runtime.is_main:
            self.tracker = ExperimentTracker(
                run.report_to,
                self.run_dir,
                project=run.tracker_project,
                run_name=self.run_dir.name,
                config=self.config.to_dict(),
            )

    def _finish_tracking(self) -> None:
        if self.tracker is not None:
            self.tracker.finish()
            self.tracker = None

    def _log_metrics(self, step: int, metrics: dict[str, Any]) -> None:
        """One record of ``metrics.jsonl``, and the same scalars to the trackers."""
        self._write_jsonl("metrics.jsonl", {"step": step, **metrics})
        if self.tracker is not None:
            self.tracker.log(metrics, step)

    def _write_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append a strict-JSON line (NaN and inf are written as null)."""
        if not self.runtime.is_main:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self._run.append_jsonl(name, record)

    def _write_samples(self, rollouts: RolloutBatch, contexts: list[TeacherContext | None]) -> None:
        records = []
        for i in range(len(rollouts)):
            ctx = contexts[i]
            record = {
                "step": self.global_step,
                "group": int(rollouts.group_ids[i]),
                "prompt": rollouts.prompts[i],
                "completion": rollouts.completions[i],
                "reward": float(rollouts.rewards[i]),
                "feedback": rollouts.feedback[i],
                "teacher_prompt": None if ctx is None else ctx.prompt,
                "demonstration_index": None if ctx is None else ctx.demonstration_index,
                **(
                    {"extra": {k: v[i] for k, v in rollouts.reward_extra.items()}}
                    if rollouts.reward_extra
                    else {}
                ),
            }
            self._write_jsonl("samples.jsonl", record)
            records.append(record)
        if self.tracker is not None:
            self.tracker.log_samples(records, self.global_step)

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the policy as a Hugging Face directory (default ``{run_dir}/final``): weights,
        config, tokenizer, generation config and a model card with the config and evals.

        Under ``distributed.strategy=fsdp`` every rank must call it (the shards are gathered, a
        collective); rank 0 writes."""
        out = Path(output_dir) if output_dir is not None else self.run_dir / "final"
        full = self.runtime.full_state_dict(self.policy.model) if self.runtime.lockstep else None
        if self.runtime.is_main:
            card = model_card(
                self.config,
                self.global_step,
                getattr(self, "first_eval", {}),
                getattr(self, "last_eval", {}),
            )
            save_pretrained_dir(self.policy, out, self.config.generation, card, full)
        return out

    def _checkpoint_modules(self) -> dict[str, torch.nn.Module]:
        modules = {}
        if self.teacher.copy is not None:
            modules["teacher"] = self.teacher.copy
        if self.reference is not None and self.reference.module is not None:
            modules["reference"] = self.reference.module
        return modules

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-{step}`` atomically under the run directory.

        Nothing is written when this step is saved already (nothing changed since); weights with
        NaN or inf are refused (:class:`~sdpo.checkpoint.NonFiniteWeightsError`).
        """
        existing = self.run_dir / f"checkpoint-{self.global_step:06d}"
        if self._saved_step == self.global_step and existing.is_dir():
            return existing
        state = {
            "global_step": self.global_step,
            "data": self.train_data.state_dict(),
            "counters": self.counters,
            "nonfinite_in_row": self._nonfinite_in_row,
            "teacher": self.teacher.kind,
        }
        rng = {"rng": ckpt.rng_state()}
        if hasattr(self.reprompter, "rng"):
            rng["reprompter_rng"] = self.reprompter.rng.getstate()
        if self.runtime.distributed:  # every rank's streams, as a list by rank
            ranks = self.runtime.all_gather(rng)
            rng = {k: [r[k] for r in ranks] for k in rng}
        objects = {"scheduler": self.scheduler.state_dict(), **rng}
        args = dict(
            policy=self.policy,
            modules=self._checkpoint_modules(),
            objects=objects,
            trainer_state=state,
            config=self.config,
            keep=self.config.run.save_total_limit,
        )
        path = self.run_dir / f"checkpoint-{self.global_step:06d}"
        if self.runtime.lockstep:
            path = save_sharded(
                self.runtime, self.run_dir, self.global_step, optimizer=self.optimizer, **args
            )
        elif self.runtime.is_main:  # one process, or ddp (equal replicas): rank 0 writes
            objects["optimizer"] = self.optimizer.state_dict()
            with self._holding_run_dir():
                path = ckpt.save_checkpoint(self.run_dir, self.global_step, **args)
        self.runtime.barrier()
        self._saved_step = self.global_step
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything a step depends on from a checkpoint (or a run directory's newest intact one).

        Only :meth:`~sdpo.config.SDPOConfig.resumable_keys` may differ from the checkpoint's
        config; they take effect (a new learning rate included), any other change is refused.
        """
        path = ckpt.resolve_checkpoint(path)
        self._check_resumable(path)
        if self.runtime.lockstep:
            state, objects = load_sharded(
                self.runtime,
                path,
                policy=self.policy,
                modules=self._checkpoint_modules(),
                optimizer=self.optimizer,
            )
        else:
            state, objects = ckpt.load_checkpoint(
                path, policy=self.policy, modules=self._checkpoint_modules()
            )
            self.optimizer.load_state_dict(objects["optimizer"])
        if self.runtime.distributed:
            objects = self.runtime.own_share(objects, ("rng", "reprompter_rng"), path)
        if self.distills and state.get("teacher", self.teacher.kind) != self.teacher.kind:
            raise ValueError(
                f"Checkpoint {path} was written with teacher {state['teacher']!r}, this run uses {self.teacher.kind!r}."
            )
        for name in ("scheduler", "rng"):
            if name not in objects:
                raise ckpt.CheckpointError(f"Checkpoint {path} has no {name}.pt.")
        self.scheduler.load_state_dict(objects["scheduler"])
        self._apply_learning_rate()
        ckpt.set_rng_state(objects["rng"])
        if "reprompter_rng" in objects and hasattr(self.reprompter, "rng"):
            self.reprompter.rng.setstate(ckpt._as_tuples(objects["reprompter_rng"]))
        self.train_data.load_state_dict(state["data"])
        self.global_step = int(state["global_step"])
        self.counters.update(state.get("counters", {}))
        self._nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.generator.sync_weights()
        self._resumed_from = path
        self._saved_step = self.global_step

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

    def _apply_learning_rate(self) -> None:
        """After loading the scheduler: the (possibly new) base learning rate and schedule apply."""
        lr = self.config.optimization.learning_rate
        self.scheduler.base_lrs = [lr] * len(self.optimizer.param_groups)
        for group, factor in zip(
            self.optimizer.param_groups, self.scheduler.lr_lambdas, strict=True
        ):
            group["initial_lr"] = lr
            group["lr"] = lr * factor(self.scheduler.last_epoch)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]

    def _checked_rewards(self, outputs: list[Any], rollouts: RolloutBatch) -> Tensor:
        """Scores as float32, each checked to be a finite number there; errors name model and row."""
        name = self.reward_model.name
        scores = []
        for i, out in enumerate(outputs):
            try:
                scores.append(float(out.score))
            except (TypeError, ValueError, AttributeError):
                raise RewardFunctionError(
                    f"Reward model {name!r} returned {getattr(out, 'score', out)!r} as the score of "
                    f"row {i} (prompt {rollouts.prompts[i]!r:.60}); a score must be a finite number."
                ) from None
        rewards = torch.tensor(scores, dtype=torch.float32)
        bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
        if bad:
            i = bad[0]
            raise RewardFunctionError(
                f"Reward model {name!r} gave row {i} (prompt {rollouts.prompts[i]!r:.60}) the score "
                f"{scores[i]!r}, which is not a finite float32 (|score| < 3.4e38); "
                f"{len(bad)} of {len(scores)} rows are affected."
            )
        return rewards


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


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


def _module(weights: Any) -> torch.nn.Module | None:
    """The model a :class:`~sdpo.teacher.Weights` owns (a frozen copy), if any."""
    return getattr(weights, "module", None)


def _progress(run: Any, start: int) -> Any:
    if not run.progress_bar:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=run.max_steps, initial=start, desc="sdpo", dynamic_ncols=True)


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _check_dtype(config: SDPOConfig, device: torch.device) -> None:
    """float16 on CPU (weights or compute) trained into NaN weights in the adversarial trial: refuse it."""
    for key in ("model.dtype", "model.param_dtype"):
        if device.type == "cpu" and config.get(key) == "float16":
            raise ValueError(
                f"{key} = float16 on CPU is not supported (training in it produced NaN weights); "
                f"use {key}=float32 (or bfloat16), or a CUDA device."
            )
