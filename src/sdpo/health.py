"""Health warnings: a run that is not learning says so early, in words, with what to try.

:class:`HealthMonitor` reads each step's metrics (the names the trainer logs) and reports:

- ``no_success``: no rollout reached the success threshold in the last N steps, and that stops
  something: the policy gradient (every advantage is zero) or the self-teacher (no demonstration
  and no feedback context). Silent in feedback-only distillation with the policy gradient off,
  where the teacher still learns from feedback;
- ``no_reprompt``: no rollout got a teacher context in the last N steps (distillation loss 0);
- ``flat_groups``: every group's rewards were equal in the last N steps (policy gradient 0); only
  with the policy gradient on;
- ``low_teacher_kl``: the distillation divergence (``self_distillation/divergence_mean``, exact over
  the distilled support and never negative) below ``kl_floor`` for N distilled steps: the teacher
  says nothing the student does not already say. Not the sampled-token estimate
  ``teacher_student_kl``, a signed one-sample estimator that can sit near 0 while the
  distributions differ;
- ``zero_grad_norm``: gradient norm below ``grad_norm_floor`` for N steps;
- ``length_collapse``: mean completion length over the last N steps below ``length_collapse_ratio``
  times its best N-step mean while the reward is no better than it was then (shorter answers with
  a rising reward are SDPO's known effect, not a collapse);
- ``length_blowup``: the N-step mean share of completions cut at ``max_new_tokens``
  (``completions/clipped_fraction``) at least ``length_blowup_clipped`` after its lowest N-step
  mean was at most half of that: completions stopped ending (the contrastive teacher on
  ``arithmetic_hard`` before its fix: mean length 3.7 -> 8.0 = the limit, accuracy 0). A run that
  is cut from the start is told by ``completions/clipped_fraction`` itself, not by this warning;
- ``reward_drop``: the N-step mean reward below its best N-step mean by more than the fraction
  ``reward_drop`` of that best *and* by more than ``reward_drop_z`` standard errors of the
  difference (the step-to-step noise, from successive differences, times sqrt(2 / N)): a
  relative drop that the noise of small batches does not explain;
- ``heldout_drop`` (read at each evaluation, :meth:`HealthMonitor.evaluation`): greedy or sampled
  held-out accuracy below its best evaluation so far by more than the fraction ``reward_drop`` of
  that best *and* by more than ``heldout_drop_z`` binomial standard errors of the difference: the
  collapse that a rolling training reward can miss (pure SDPO with a fast EMA teacher on
  ``arithmetic_hard``: docs/study);
- ``copy_rate_rising``: the N-step mean ``self_distillation/copy_rate`` more than ``copy_rate_rise``
  above its lowest N-step mean (privileged-context leakage; docs/method.md);
- ``teacher_stale``: the gated teacher's ``teacher/age`` at least ``teacher_max_age`` steps;
- ``teacher_accuracy_drop``: ``teacher/probe_accuracy`` more than ``teacher_accuracy_drop`` below
  its best.

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
    "length_blowup",
    "reward_drop",
    "heldout_drop",
    "copy_rate_rising",
    "teacher_stale",
    "teacher_accuracy_drop",
)


class HealthMonitor:
    """Watches the stream of per-step metrics; ``update`` returns the warnings to print now.

    Args:
        config: a :class:`~sdpo.config.HealthConfig` (``window`` N, ``warning_interval``,
            ``kl_floor``, ``grad_norm_floor``, ``length_collapse_ratio``, ``reward_drop``,
            ``reward_drop_z``, ``enabled``).
        distillation: whether the run distills (``distillation_weight > 0``); without it the
            reprompt and teacher-KL checks are off.
        policy_gradient: whether the policy-gradient term is on (``pg_loss_weight > 0``);
            without it flat groups cost nothing and ``flat_groups`` is off.
    """

    def __init__(
        self, config: Any, distillation: bool = True, policy_gradient: bool = True
    ) -> None:
        self.config = config
        self.distillation = distillation
        self.policy_gradient = policy_gradient
        self._reward_at_best_length: float | None = None
        self._last_reward: float | None = None
        self._diff_sq, self._diffs = 0.0, 0  # successive reward differences: the step noise
        n = config.window
        self._history: dict[str, deque[float]] = {}
        self._best: dict[str, float] = {}
        self._last_reported: dict[str, int] = {}
        self._n = n
        self.counters = {f"health/{name}": 0 for name in WARNINGS}
        self._eval_best: dict[str, tuple[float, int]] = {}  # key -> (best accuracy, its n)

    def update(self, step: int, metrics: dict[str, Any]) -> list[str]:
        """Feed one step's metrics; return the messages of warnings due at this step."""
        if not self.config.enabled:
            return []
        cfg, n = self.config, self._n
        checks: list[tuple[str, bool, Callable[[], str]]] = []

        success = self._push("accuracy", metrics.get("accuracy"))
        # Pushed here, whatever the run: no_success reads whether feedback contexts distill.
        reprompt = self._push("reprompt", metrics.get("self_distillation/reprompt_sample_fraction"))
        feedback_distills = self.distillation and bool(reprompt) and max(reprompt) > 0.0
        checks.append(
            (
                "no_success",
                self._full(success)
                and max(success) == 0.0
                and (self.policy_gradient or not feedback_distills),
                lambda: self._no_success_message(n, feedback_distills),
            )
        )
        flat = self._push("flat", metrics.get("frac_reward_zero_std"))
        checks.append(
            (
                "flat_groups",
                self.policy_gradient and self._full(flat) and min(flat) >= 1.0,
                lambda: (
                    f"all groups flat in the last {n} steps: every group's rewards are equal, so the "
                    "policy gradient is zero; use more samples per prompt, a graded reward, or prompts "
                    "of mixed difficulty."
                ),
            )
        )
        if self.distillation:
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
            div = metrics.get("self_distillation/divergence_mean") if distilled > 0 else None
            divs = self._push("divergence", div)
            checks.append(
                (
                    "low_teacher_kl",
                    self._full(divs) and max(divs) < cfg.kl_floor,
                    lambda: (
                        f"teacher-student divergence below {cfg.kl_floor:g} for {n} distilled "
                        "steps: the "
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
        rewards = self._push("reward", metrics.get("reward"))
        reward_mean, reward_best = self._rolling("reward", rewards, max)
        lengths = self._push("length", metrics.get("completions/mean_length"))
        length_mean, length_best = self._rolling("length", lengths, max)
        if length_mean is not None and length_mean == length_best:
            self._reward_at_best_length = reward_mean  # None while the reward window fills
        reward_then = self._reward_at_best_length
        checks.append(
            (
                "length_collapse",
                length_mean is not None
                and length_mean < cfg.length_collapse_ratio * length_best
                and (reward_mean is None or reward_then is None or reward_mean <= reward_then),
                lambda: (
                    f"completion length collapsing: {length_mean:.1f} tokens on average over the "
                    f"last {n} steps, down from {length_best:.1f}, and the reward did not rise; "
                    "lower the learning rate or check the reward for a bias toward short answers."
                ),
            )
        )
        clipped = self._push("clipped", metrics.get("completions/clipped_fraction"))
        clipped_mean, clipped_low = self._rolling("clipped", clipped, min)
        checks.append(
            (
                "length_blowup",
                clipped_mean is not None
                and clipped_mean >= cfg.length_blowup_clipped
                and clipped_low <= cfg.length_blowup_clipped / 2,
                lambda: (
                    f"completions stop ending: {clipped_mean:.0%} of them ran to max_new_tokens "
                    f"over the last {n} steps, up from {clipped_low:.0%} (mean length "
                    f"{length_mean:.1f}); the end-of-sequence token is losing probability: lower "
                    "the learning rate, use a slower teacher, or resume from an earlier checkpoint."
                ),
            )
        )
        drop = self._reward_drop(rewards, reward_mean, reward_best)
        checks.append(
            (
                "reward_drop",
                drop is not None,
                lambda: (
                    f"reward falling: {reward_mean:.3f} on average over the last {n} steps, "
                    f"{reward_best - reward_mean:.3f} ({drop:.0%}) below its best "
                    f"({reward_best:.3f}), more than step-to-step noise explains; possible "
                    "collapse: lower the learning rate, use a slower teacher "
                    "(self_distillation.teacher_update_rate), or resume from an earlier checkpoint."
                ),
            )
        )

        checks.extend(self._variant_checks(metrics))
        return self._report(step, checks)

    def evaluation(self, step: int, metrics: dict[str, Any]) -> list[str]:
        """Feed one evaluation's metrics (``eval/accuracy_greedy``, ``eval/accuracy_sampled``,
        ``eval/num_prompts``, ``eval/num_samples``); return the ``heldout_drop`` warning if due.

        For an accuracy ``p`` over ``n`` completions (``n`` = prompts for greedy, prompts x samples
        for sampled) against the best evaluation so far ``(p_b, n_b)``: warn when
        ``p_b - p > reward_drop * p_b`` and ``p_b - p > heldout_drop_z * sqrt(p_b(1 - p_b)/n_b +
        p(1 - p)/n)``, each ``p`` smoothed to ``(p n + 1) / (n + 2)`` so that 1.0 -> 0.0 has a
        nonzero error. The unpaired binomial error is conservative: the same prompts make the two
        evaluations positively correlated.
        """
        if not self.config.enabled:
            return []
        cfg = self.config
        prompts = int(metrics.get("eval/num_prompts", 0) or 0)
        drops = []
        for key, n in (
            ("greedy", prompts),
            ("sampled", prompts * int(metrics.get("eval/num_samples", 0) or 0)),
        ):
            p = metrics.get(f"eval/accuracy_{key}")
            if not isinstance(p, (int, float)) or p != p or n <= 0:
                continue
            best, n_best = self._eval_best.get(key, (p, n))
            if p >= best:
                self._eval_best[key] = (p, n)
                continue
            se = (_binomial_var(best, n_best) + _binomial_var(p, n)) ** 0.5
            gap = best - p
            if gap > cfg.reward_drop * best and gap > cfg.heldout_drop_z * se:
                drops.append(
                    f"{key} {p:.3f}, {gap:.3f} ({gap / best:.0%}, {gap / se:.1f} s.e.) "
                    f"below its best {best:.3f}"
                )

        def message() -> str:
            return (
                f"held-out accuracy falling: {'; '.join(drops)}; possible collapse: lower the "
                "learning rate, use a slower teacher (self_distillation.teacher_update_rate, or "
                "teacher=gated), or resume from an earlier checkpoint."
            )

        return self._report(step, [("heldout_drop", bool(drops), message)])

    def _report(self, step: int, checks: list[tuple[str, bool, Callable[[], str]]]) -> list[str]:
        """The messages of the fired checks not reported within ``warning_interval``; counted."""
        cfg = self.config
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

    def _no_success_message(self, n: int, feedback_distills: bool) -> str:
        stopped = []
        if self.policy_gradient:
            stopped.append("every advantage is zero (no policy gradient)")
        if self.distillation:
            stopped.append(
                "the teacher gets no demonstration and learns from feedback only"
                if feedback_distills
                else "self-distillation is inactive (no demonstration, no feedback context)"
            )
        return (
            f"no successes in the last {n} steps: {'; '.join(stopped)}; lower the threshold "
            "(self_distillation.success_reward_threshold), return feedback from the reward, or use "
            "easier prompts."
        )

    def _reward_drop(self, rewards: deque[float], mean: float | None, best: float) -> float | None:
        """The relative drop of the rolling reward below its best, when it is both larger than
        ``reward_drop`` and ``reward_drop_z`` standard errors; else None.

        The step-to-step noise ``σ²`` is estimated from successive differences over the whole
        run, ``Σ (r_t − r_{t−1})² / (2·(T − 1))``, which a slow trend (learning, a collapse)
        barely inflates; the difference of two N-step means then has ``se = σ·sqrt(2 / N)``.
        With 1 prompt × G = 4 a step's reward moves by ~0.25 and the threshold follows; with
        32 rollouts by ~0.09. ``reward_drop_z`` is well above 2 because the best window is the
        maximum of many (over 300 steps pure noise spreads rolling means by ~5 of their σ).
        """
        if rewards and self._last_reward is not None:
            self._diff_sq += (rewards[-1] - self._last_reward) ** 2
            self._diffs += 1
        self._last_reward = rewards[-1] if rewards else None
        if mean is None or best <= 0 or not self._diffs:
            return None
        n, cfg = len(rewards), self.config
        se = (self._diff_sq / (2 * self._diffs) * 2 / n) ** 0.5
        gap = best - mean
        if gap <= cfg.reward_drop * best or gap <= cfg.reward_drop_z * se:
            return None
        return gap / best

    def _variant_checks(self, metrics: dict[str, Any]) -> list[tuple[str, bool, Callable[[], str]]]:
        """Warnings of the method variants (docs/method.md): leakage (copy rate rising), a gated
        teacher that stopped refreshing, and the teacher's probe accuracy falling."""
        cfg, n = self.config, self._n
        copies = self._push("copy", metrics.get("self_distillation/copy_rate"))
        copy_mean, copy_low = self._rolling("copy", copies, min)
        age = metrics.get("teacher/age")
        acc = metrics.get("teacher/probe_accuracy")
        if isinstance(acc, (int, float)) and acc == acc:
            self._best["probe"] = max(self._best.get("probe", acc), acc)
            self._best["probe_last"] = acc
        acc_best, acc_last = self._best.get("probe"), self._best.get("probe_last")
        return [
            (
                "copy_rate_rising",
                copy_mean is not None and copy_mean - copy_low > cfg.copy_rate_rise,
                lambda: (
                    f"copy rate rising: {copy_mean:.3f} of completion n-grams over the last {n} "
                    f"steps come from the teacher's demonstration or example turns, up from "
                    f"{copy_low:.3f}: privileged-context leakage; try "
                    "self_distillation.routing=correctness or policy_gradient.rlsd_max_weight=2."
                ),
            ),
            (
                "teacher_stale",
                isinstance(age, (int, float)) and age >= cfg.teacher_max_age,
                lambda: (
                    f"the gated teacher has not refreshed for {age:.0f} steps: the training reward "
                    "has not risen above its level at the last refresh (a plateau, or the length "
                    "tail grew); lower self_distillation.gated_min_improvement or the learning rate."
                ),
            ),
            (
                "teacher_accuracy_drop",
                acc_best is not None and acc_best - acc_last > cfg.teacher_accuracy_drop,
                lambda: (
                    f"teacher accuracy falling: {acc_last:.3f} on the probe set, down from "
                    f"{acc_best:.3f}; a teacher that gets worse teaches worse: use "
                    "self_distillation.teacher=gated or frozen, or lower the learning rate."
                ),
            ),
        ]

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


def _binomial_var(p: float, n: int) -> float:
    """Variance of an accuracy over ``n`` completions, ``p`` smoothed as ``(p n + 1) / (n + 2)``."""
    q = (p * n + 1) / (n + 2)
    return q * (1 - q) / n
