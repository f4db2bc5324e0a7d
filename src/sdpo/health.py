"""Health warnings: a run that is not learning says so early, in words, with what to try.

:class:`HealthMonitor` reads each step's metrics (the names the trainer logs) and reports:

- ``no_success``: no rollout reached the success threshold in the last N steps (the self-teacher
  has no demonstration, GRPO groups are flat);
- ``no_reprompt``: no rollout got a teacher context in the last N steps (distillation loss 0);
- ``flat_groups``: every group's rewards were equal in the last N steps (policy gradient 0);
- ``low_teacher_kl``: teacher–student KL below ``kl_floor`` for N distilled steps (the teacher
  says nothing the student does not already say);
- ``zero_grad_norm``: gradient norm below ``grad_norm_floor`` for N steps;
- ``length_collapse``: mean completion length over the last N steps below ``length_collapse_ratio``
  times its best N-step mean;
- ``reward_drop``: mean reward over the last N steps more than ``reward_drop`` below its best
  N-step mean (a possible collapse).

Each warning is reported at most once per ``warning_interval`` steps while its condition holds, and
counted: :attr:`HealthMonitor.counters` (``health/<name>``) go into the logged metrics.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

WARNINGS = (
    "no_success",
    "no_reprompt",
    "flat_groups",
    "low_teacher_kl",
    "zero_grad_norm",
    "length_collapse",
    "reward_drop",
)


class HealthMonitor:
    """Watches the stream of per-step metrics; ``update`` returns the warnings to print now.

    Args:
        config: a :class:`~sdpo.config.HealthConfig` (``window`` N, ``warning_interval``,
            ``kl_floor``, ``grad_norm_floor``, ``length_collapse_ratio``, ``reward_drop``, ``enabled``).
        distillation: whether the run distills (``distillation_weight > 0``); without it the
            reprompt and teacher-KL checks are off.
    """

    def __init__(self, config: Any, distillation: bool = True) -> None:
        self.config = config
        self.distillation = distillation
        n = config.window
        self._history: dict[str, deque[float]] = {}
        self._best: dict[str, float] = {}
        self._last_reported: dict[str, int] = {}
        self._n = n
        self.counters = {f"health/{name}": 0 for name in WARNINGS}

    def update(self, step: int, metrics: dict[str, Any]) -> list[str]:
        """Feed one step's metrics; return the messages of warnings due at this step."""
        if not self.config.enabled:
            return []
        cfg, n = self.config, self._n
        checks: list[tuple[str, bool, Callable[[], str]]] = []

        success = self._push("accuracy", metrics.get("accuracy"))
        checks.append(
            (
                "no_success",
                self._full(success) and max(success) == 0.0,
                lambda: (
                    f"self-distillation is inactive: no successes in the last {n} steps; lower the "
                    "threshold (self_distillation.success_reward_threshold), add feedback, or use "
                    "easier prompts."
                    if self.distillation
                    else f"no successful rollout in the last {n} steps: every advantage is zero; "
                    "lower the success threshold or use easier prompts."
                ),
            )
        )
        flat = self._push("flat", metrics.get("frac_reward_zero_std"))
        checks.append(
            (
                "flat_groups",
                self._full(flat) and min(flat) >= 1.0,
                lambda: (
                    f"all groups flat in the last {n} steps: every group's rewards are equal, so the "
                    "policy gradient is zero; use more samples per prompt, a graded reward, or prompts "
                    "of mixed difficulty."
                ),
            )
        )
        if self.distillation:
            reprompt = self._push(
                "reprompt", metrics.get("self_distillation/reprompt_sample_fraction")
            )
            checks.append(
                (
                    "no_reprompt",
                    self._full(reprompt) and max(reprompt) == 0.0,
                    lambda: (
                        f"reprompt fraction 0 for {n} steps: no rollout got a teacher context, so the "
                        "distillation loss is zero; lower the success threshold or return feedback from "
                        "the reward (self_distillation.include_environment_feedback)."
                    ),
                )
            )
            distilled = metrics.get("self_distillation/distilled_token_fraction", 0.0) or 0.0
            kl = metrics.get("self_distillation/teacher_student_kl") if distilled > 0 else None
            kls = self._push("kl", kl)
            checks.append(
                (
                    "low_teacher_kl",
                    self._full(kls) and max(kls) < cfg.kl_floor,
                    lambda: (
                        f"teacher-student KL below {cfg.kl_floor:g} for {n} distilled steps: the "
                        "teacher says nothing new; give it more informative context (feedback, a "
                        "demonstration) or a faster teacher (self_distillation.teacher_update_rate)."
                    ),
                )
            )
        grads = self._push("grad", metrics.get("grad_norm"))
        checks.append(
            (
                "zero_grad_norm",
                self._full(grads) and max(grads) < cfg.grad_norm_floor,
                lambda: (
                    f"gradient norm below {cfg.grad_norm_floor:g} for {n} steps: the model is not "
                    "learning; check that groups are not flat and that a loss term is on."
                ),
            )
        )
        lengths = self._push("length", metrics.get("completions/mean_length"))
        length_mean, length_best = self._rolling("length", lengths, max)
        checks.append(
            (
                "length_collapse",
                length_mean is not None and length_mean < cfg.length_collapse_ratio * length_best,
                lambda: (
                    f"completion length collapsing: {length_mean:.1f} tokens on average over the "
                    f"last {n} steps, down from {length_best:.1f}; lower the learning rate or check the "
                    "reward for a bias toward short answers."
                ),
            )
        )
        rewards = self._push("reward", metrics.get("reward"))
        reward_mean, reward_best = self._rolling("reward", rewards, max)
        checks.append(
            (
                "reward_drop",
                reward_mean is not None and reward_best - reward_mean > cfg.reward_drop,
                lambda: (
                    f"reward falling: {reward_mean:.3f} on average over the last {n} steps, "
                    f"{reward_best - reward_mean:.3f} below its best ({reward_best:.3f}); possible "
                    "collapse: lower the learning rate, or resume from an earlier checkpoint."
                ),
            )
        )

        messages = []
        for name, fired, message in checks:
            if not fired:
                continue
            last = self._last_reported.get(name)
            if last is None or step - last >= cfg.warning_interval:
                self._last_reported[name] = step
                self.counters[f"health/{name}"] += 1
                messages.append(f"[{name}] {message()}")
        return messages

    def _push(self, key: str, value: Any) -> deque[float]:
        history = self._history.setdefault(key, deque(maxlen=self._n))
        if isinstance(value, (int, float)) and value == value:  # skip missing and NaN
            history.append(float(value))
        return history

    def _full(self, history: deque[float]) -> bool:
        return len(history) == self._n

    def _rolling(
        self, key: str, history: deque[float], better: Callable[[float, float], float]
    ) -> tuple[float | None, float]:
        """The mean of the last N values and the best such mean so far (None before N values)."""
        if not self._full(history):
            return None, float("nan")
        mean = sum(history) / len(history)
        self._best[key] = better(self._best.get(key, mean), mean)
        return mean, self._best[key]
