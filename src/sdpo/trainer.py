"""SDPOTrainer: the training loop of SPEC §2, one named call per sub-step.

    step():  rows     = next batch of B prompts
             rollouts = generate(rows)             G completions per prompt
             score(rollouts)                       rewards + per-rollout feedback
             contexts = reprompt(rollouts)         teacher prompts x' (None: not distilled)
             update(rollouts, contexts)            forward -> loss -> backward -> optimizer -> teacher

Loss = pg_loss_weight·L_pg + distillation_weight·L_distill + kl_penalty_weight·L_kl, every term
normalized by whole-step counts, so the gradient does not depend on the micro-batch size
(:mod:`sdpo.loss`). Bookkeeping has its own owners: :mod:`sdpo.checkpointer` (checkpoints and
resume), :mod:`sdpo.run_log` (metrics, samples, trackers), :class:`sdpo.run_dir.RunDirectory`
(the directory's lock), :mod:`sdpo.distributed` (devices, dtypes, processes, the optimizer).
"""

from __future__ import annotations

import math
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from transformers import TrainerState

from sdpo import lora
from sdpo.callbacks import CallbackHandler
from sdpo.checkpoint import is_checkpoint
from sdpo.checkpointer import Checkpointer
from sdpo.config import SDPOConfig
from sdpo.data import PromptSource, load_rows
from sdpo.distributed import Runtime, build_optimizer, precision_note
from sdpo.evaluation import evaluate_policy
from sdpo.export import model_card
from sdpo.generation import GenerationBackend, build_backend
from sdpo.health import HealthMonitor
from sdpo.leakage import guard_feedback
from sdpo.loss import SDPOLoss
from sdpo.policy_model import PolicyModel, RolloutBatch, completion_id_lists
from sdpo.reprompting import Reprompter, TeacherContext
from sdpo.reward_model import (
    as_reward_model,
    call_reward_model,
    cap_feedback,
    checked_scores,
    reward_metrics,
    success_scores,
)
from sdpo.run_dir import RunDirectory
from sdpo.run_log import RunLog
from sdpo.stop import StopRequest
from sdpo.teacher import GateRule, Teacher, reference_weights
from sdpo.trl_compat import resolve_trainer_args
from sdpo.variants import needs_teacher


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
        callbacks: transformers ``TrainerCallback`` objects, or objects with any of
            ``on_step_end(trainer, metrics)``, ``on_evaluate(trainer, metrics)``,
            ``on_train_end(trainer)`` (:mod:`sdpo.callbacks`).
        generation_backend: a :class:`~sdpo.generation.GenerationBackend` to sample with instead
            of the one ``generation.backend`` names (e.g. an engine shared by several runs).

    TRL's call shape works too (:mod:`sdpo.trl_compat`): ``SDPOTrainer(model=str | PreTrainedModel
    | PeftModel, reward_funcs=fn | [fn, ...], args=SDPOConfig, train_dataset=..., eval_dataset=...,
    processing_class=tokenizer, peft_config=peft.LoraConfig, callbacks=[...])``.
    """

    def __init__(
        self,
        config: SDPOConfig | None = None,
        policy_model: PolicyModel | None = None,
        reward_model: Any = None,
        train_dataloader: Any = None,
        eval_dataloader: Any = None,
        callbacks: list[Any] | None = None,
        generation_backend: GenerationBackend | None = None,
        **trl_args: Any,
    ) -> None:
        a = resolve_trainer_args(
            config, policy_model, reward_model, train_dataloader, eval_dataloader, trl_args
        )
        config, policy_model, reward_model = a.config, a.policy_model, a.reward_model
        train_dataloader, eval_dataloader = a.train_dataloader, a.eval_dataloader
        self.config = config.validate()
        self.policy = policy_model
        self.reward_model = as_reward_model(
            reward_model,
            weights=config.data.reward_weights,
            success=config.self_distillation.success_reward,
        )
        run = config.run
        self.runtime = Runtime(self.config, policy_model.device)  # devices, dtypes, processes
        self.runtime.seed(run.seed)
        self.train_data = PromptSource(
            train_dataloader, config.optimization.prompts_per_step, run.seed
        )
        self.eval_rows = load_rows(eval_dataloader) if eval_dataloader is not None else None
        if self.eval_rows is not None and run.eval_max_prompts:
            self.eval_rows = self.eval_rows[: run.eval_max_prompts]
        self.callbacks = CallbackHandler(callbacks)

        sd, pg = config.self_distillation, config.policy_gradient
        self.distills = needs_teacher(config)  # False: GRPO, no teacher is ever run
        needs_reference = pg.kl_penalty_weight > 0 or (
            self.distills and sd.teacher in ("frozen", "trust_region")
        )
        self.runtime.prepare_policy(policy_model.model)
        lora.attach(policy_model, config.model.lora)
        self.reference = reference_weights(policy_model) if needs_reference else None
        # A run that does not distill (GRPO) has no use for a teacher: no EMA copy, no updates.
        teacher_kind = sd.teacher if self.distills else "live"
        gate = GateRule(sd.gated_window, sd.gated_min_improvement, sd.gated_length_ratio)
        self.teacher = Teacher(
            teacher_kind, policy_model, sd.teacher_update_rate, self.reference, gate=gate
        )
        self.reprompter = Reprompter(sd, tokenizer=policy_model.tokenizer, seed=run.seed)
        self.runtime.shard(policy_model.model, *self.teacher.checkpoint_modules().values())
        self.loss = SDPOLoss(self.config, policy_model, self.teacher, self.reference, self.runtime)
        policy_model.device = self.runtime.device
        policy_model.share_prompts = not self.runtime.lockstep
        self.optimizer, self.scheduler = build_optimizer(self.runtime, policy_model.model, config)
        self.generator = generation_backend or build_backend(
            config.generation,
            policy_model,
            seed=run.seed,
            max_prompt_length=config.model.max_prompt_length,
            dtype=self.runtime.compute_dtype,
        )
        self.health = HealthMonitor(
            config.health,
            distillation=self.distills,
            policy_gradient=config.policy_gradient.pg_loss_weight > 0,
        )

        run.output_dir = self.runtime.all_gather(run.output_dir)[0]  # rank 0's (a timestamp)
        self.run_dir = Path(run.output_dir)
        if any(is_checkpoint(p) for p in (self.run_dir, *self.run_dir.resolve().parents)):
            raise ValueError(
                f"run.output_dir = {run.output_dir} is inside a checkpoint; a resumed run continues "
                "in the checkpoint's run directory (its parent) or in a new directory you name."
            )
        self._run = RunDirectory(
            self.run_dir, main=self.runtime.is_main, overwrite=run.overwrite_output_dir
        )
        self.log = RunLog(self.config, self._run)
        self.checkpointer = Checkpointer(
            self.config,
            self.runtime,
            self._run,
            policy=policy_model,
            teacher=self.teacher,
            optimizer=self.optimizer,
            reprompter=self.reprompter,
            data=self.train_data,
        )
        self.global_step = 0
        self.counters = {"skipped_long_prompts": 0, "skipped_nonfinite_steps": 0}
        self._nonfinite_in_row = 0
        self._stop = StopRequest()
        self._samples_written = False
        # The last step's rollouts and teacher contexts (None before the first step, or after a
        # step whose every prompt was too long): what samples.jsonl and callbacks read.
        self.last_rollouts: RolloutBatch | None = None
        self.last_contexts: list[TeacherContext | None] = []
        # The step-0 evaluation's metrics (a resumed run: the first run's) and the latest one's.
        self.first_eval: dict[str, float] = {}
        self.last_eval: dict[str, float] = {}
        self._t_start = time.time()
        if run.teacher_probe_steps:  # the teacher's own accuracy on a fixed set (sdpo.probe)
            from sdpo.probe import TeacherProbe

            self.callbacks.append(
                TeacherProbe(self, run.teacher_probe_steps, run.teacher_probe_prompts)
            )
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
        lengths = rollouts.completion_mask.sum(-1).float()  # the gated teacher's refresh rule
        metrics.update(self.teacher.observe(*self.runtime.gather_cat(rollouts.rewards, lengths)))
        metrics.update(rollouts.reward_metrics)
        stats = self.runtime.all_reduce(self.reprompter.last_stats, op="mean")
        metrics.update({f"self_distillation/{k}": v for k, v in stats.items()})
        metrics["step_time"] = time.perf_counter() - t0
        metrics["generation_time"] = t_gen - t0
        metrics["lr"] = self.scheduler.get_last_lr()[0]
        metrics.update(self.counters)
        self.last_rollouts, self.last_contexts = rollouts, contexts
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
        rollouts.rewards = checked_scores(outputs, rollouts.prompts, self.reward_model.name)
        rollouts.feedback = [cap_feedback(o.feedback, data.max_feedback_chars) for o in outputs]
        rollouts.reward_info = [o.info for o in outputs]
        rollouts.success_scores = success_scores(self.reward_model, outputs)
        rollouts.reward_metrics = {
            **log.metric_means(),
            **reward_metrics(self.reward_model, outputs),
        }
        rollouts.feedback, redacted = guard_feedback(  # a declared reference answer never leaks
            rollouts.feedback, rollouts.reward_info, data.feedback_leak_guard
        )
        if redacted is not None:
            rollouts.reward_metrics["feedback/redacted"] = float(redacted)
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
            rollouts.success_scores,
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
        r, success, lengths, unfinished = self.runtime.gather_cat(  # the global batch's rollouts
            rollouts.rewards,
            torch.tensor(rollouts.success_scores, device=rollouts.rewards.device),
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
                (success >= self.config.self_distillation.success_reward_threshold).float().mean()
            ),
        }

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
                sampler=self.generator,  # as training samples (vLLM included)
                progress=self.log.progress(  # greedy (one per prompt) + sampled completions
                    len(self.eval_rows) * (1 + cfg.run.eval_num_samples), "eval", unit="completions"
                ),
                reward_timeout_s=cfg.data.reward_timeout_s,
            )
        metrics = {f"eval/{k}": v for k, v in result.metrics.items()}
        for message in self.health.evaluation(self.global_step, metrics):  # sdpo.health
            self.log.say(f"sdpo: warning at step {self.global_step}: {message}")
        self._log(self.global_step, metrics)
        self.callbacks.fire("on_evaluate", self, metrics)
        return metrics

    @property
    def stop_signal(self) -> int | None:
        """The signal (SIGINT, SIGTERM) that stopped :meth:`train`, if one did."""
        return self._stop.signal

    def _log(self, step: int, metrics: dict[str, Any]) -> None:
        self.log.metrics(step, metrics)
        self.callbacks.fire("on_log", self, metrics)

    # ----- the loop ---------------------------------------------------------------------------

    def train(self, resume_from_checkpoint: str | Path | bool | None = None) -> dict[str, float]:
        """Run until ``run.max_steps``; evaluate, log, checkpoint; Ctrl-C or SIGTERM stops after the
        current step and saves a checkpoint.

        The run directory is locked while this runs and must be empty, this run's own (resume), or
        overwritten (``run.overwrite_output_dir``). Returns the last evaluation's metrics (empty
        without an eval set). ``resume_from_checkpoint`` (TRL's argument): a checkpoint or run
        directory to continue from, or True for this run directory's newest intact checkpoint;
        the same as ``run.resume_from``.
        """
        if resume_from_checkpoint:
            where = self.run_dir if resume_from_checkpoint is True else resume_from_checkpoint
            self.config.run.resume_from = str(where)
            self.load_checkpoint(where)
        with self._run.held():
            note = "precision: " + precision_note(self.config.model.dtype, self.runtime.device)
            self.log.say(f"sdpo: {note}")
            self.log.config_file(comment=note)
            self.log.start()
            self.callbacks.fire("on_train_begin", self)
            with self._stop.listening():  # the step-0 evaluation too: it may take long
                self.last_eval = self.evaluate() if self.global_step == 0 else {}
                if self.global_step == 0:  # a resumed run has the first run's, from its checkpoint
                    self.first_eval = dict(self.last_eval)
                self._loop()
            if self._stop.requested:
                path = self.save_checkpoint()
                self.log.say(
                    f"\nStopped at step {self.global_step}; checkpoint {path}.\n"
                    f"Resume with: sdpo train --resume {self.run_dir}"
                )
                self.log.finish()
                return self.last_eval
            self.last_eval = self.evaluate()
            final = self.save_model()
            self.log.say(
                f"Final model: {final.resolve()} (from_pretrained-loadable, with a model card)",
                sys.stdout,
            )
            self.log.finish()
        self.callbacks.fire("on_train_end", self)
        return self.last_eval

    def _loop(self) -> None:
        run = self.config.run
        with self.log.step_bar(initial=self.global_step) as bar:
            while (
                self.global_step < run.max_steps
                and not self._stop.requested
                and not self.callbacks.should_stop
            ):
                metrics = self.step()
                step = self.global_step
                for message in self.health.update(step, metrics):  # sdpo.health
                    self.log.say(f"sdpo: warning at step {step}: {message}")
                metrics.update(self.health.counters)
                if step % run.logging_steps == 0:
                    self._log(step, metrics)
                # samples.jsonl from this process's first step on, then every sample_log_steps
                first = not self._samples_written
                if (first or step % run.sample_log_steps == 0) and self.last_rollouts is not None:
                    self._samples_written = True
                    self.log.samples(self.global_step, self.last_rollouts, self.last_contexts)
                if run.eval_steps and step % run.eval_steps == 0 and step < run.max_steps:
                    self.last_eval = self.evaluate()
                if step % run.save_steps == 0 or step == run.max_steps:
                    self.save_checkpoint()
                self.callbacks.fire("on_step_end", self, metrics)
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(
                        reward=f"{metrics.get('reward', float('nan')):.3f}",
                        distill=f"{metrics.get('self_distillation/distillation_loss', 0.0):.4f}",
                    )

    # ----- saving -----------------------------------------------------------------------------

    def save_model(self, output_dir: str | Path | None = None) -> Path:
        """Write the policy as a Hugging Face directory (default ``{run_dir}/final``): weights,
        config, tokenizer, generation config and a model card with the config and evals.

        Under ``distributed.strategy=fsdp`` every rank must call it (the shards are gathered, a
        collective); rank 0 writes."""
        out = Path(output_dir) if output_dir is not None else self.run_dir / "final"
        first, last = getattr(self, "first_eval", {}), getattr(self, "last_eval", {})
        return self.checkpointer.save_final(
            out, model_card(self.config, self.global_step, first, last)
        )

    def save_checkpoint(self) -> Path:
        """Write ``checkpoint-{step}`` atomically under the run directory (:mod:`sdpo.checkpointer`).

        Nothing is written when this step is saved already (nothing changed since); weights with
        NaN or inf are refused (:class:`~sdpo.checkpoint.NonFiniteWeightsError`).
        """
        state = {
            "global_step": self.global_step,
            "counters": self.counters,
            "nonfinite_in_row": self._nonfinite_in_row,
            "first_eval": self.first_eval,  # the "before" of a resumed run
        }
        if self.teacher.gate is not None:
            state["teacher_gate"] = self.teacher.gate.state_dict()
        if self.config.self_distillation.success_memory_steps:
            state["success_memory"] = self.reprompter.state_dict()
        path = self.checkpointer.save(state, self.scheduler)
        self.callbacks.fire("on_save", self)
        return path

    def load_checkpoint(self, path: str | Path) -> None:
        """Restore everything a step depends on from a checkpoint (or a run directory's newest intact one).

        Only :meth:`~sdpo.config.SDPOConfig.resumable_keys` may differ from the checkpoint's
        config; they take effect (a new learning rate included), any other change is refused.
        """
        state, self.scheduler = self.checkpointer.load(path)
        self.global_step = int(state["global_step"])
        self.counters.update(state.get("counters", {}))
        self._nonfinite_in_row = int(state.get("nonfinite_in_row", 0))
        self.first_eval = dict(state.get("first_eval", {}))
        if self.teacher.gate is not None and "teacher_gate" in state:
            self.teacher.gate.load_state_dict(state["teacher_gate"])
        if "success_memory" in state:
            self.reprompter.load_state_dict(state["success_memory"])
        self.generator.sync_weights()
        self.log.say(
            f"sdpo: resumed from checkpoint-{self.global_step:06d} at step {self.global_step}"
        )
