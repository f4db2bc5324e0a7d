"""Test-time SDPO (``sdpo discover``): solve single hard questions by self-distilling on one's attempts.

For each question, from a fresh copy of the model, in rounds of G attempts:

    attempts = sample G completions of the question            (counted against the budget)
    if any attempt succeeds: the question is discovered after  (attempts so far + its index + 1)
    else: one SDPO update on this question's attempts           teacher = the model shown the
          (steps_per_round optimizer steps)                      feedback of each attempt

Two baselines spend the same attempt budget:

- ``best_of_k``: independent samples of the plain question (the base model never changes);
- ``multi_turn``: G chains; each next attempt sees the question plus the environment's feedback
  on that chain's previous attempt (rendered with the same teacher template), no weight updates.

The figure of merit is ``discovery@k``: the fraction of questions solved within k attempts, for
every k up to the budget, averaged over seeds (with the spread across seeds).
"""

from __future__ import annotations

import copy
import json
import math
import statistics
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from sdpo.config import SDPOConfig

if TYPE_CHECKING:
    import torch

    from sdpo.policy_model import PolicyModel

METHODS = ("sdpo", "best_of_k", "multi_turn")


@dataclass
class Attempt:
    """Outcome of one method on one question with one seed."""

    method: str
    seed: int
    question: int
    solved_at: int | None  # attempts spent up to and including the first success; None = never
    attempts: int  # attempts spent in total (== budget when unsolved)


def discovery_curve(solved_at: Sequence[int | None], budget: int) -> list[float]:
    """``discovery@k`` for k = 1..budget: the fraction of questions with ``solved_at <= k``.

    Args:
        solved_at: one entry per question, the attempt count at the first success or None.
        budget: the largest k.
    Returns:
        ``budget`` fractions, non-decreasing.
    """
    n = max(len(solved_at), 1)
    return [sum(s is not None and s <= k for s in solved_at) / n for k in range(1, budget + 1)]


def attempts_to_reach(curve: Sequence[float], target: float) -> int | None:
    """The smallest k with ``curve[k-1] >= target`` (None if never reached)."""
    for k, value in enumerate(curve, start=1):
        if value >= target - 1e-12:
            return k
    return None


class Discoverer:
    """Runs the three methods of this module on questions, each from a fresh copy of ``policy``.

    Args:
        policy: the base model (never modified; every question gets a deep copy for ``sdpo``).
        reward_model: anything :func:`sdpo.reward_model.as_reward_model` accepts.
        config: the SDPO config of the updates and sampling (``num_samples_per_prompt`` = G,
            ``generation.*``, ``self_distillation.*``, ``optimization.learning_rate`` ...).
        budget: attempts per question and method (a multiple of G).
        steps_per_round: optimizer steps on each round's attempts (``sdpo`` only).
    """

    def __init__(
        self,
        policy: PolicyModel,
        reward_model: Any,
        config: SDPOConfig,
        budget: int = 32,
        steps_per_round: int = 1,
    ) -> None:
        from sdpo.reward_model import as_reward_model

        g = config.num_samples_per_prompt
        if budget < g or budget % g:
            raise ValueError(
                f"budget={budget} must be a positive multiple of num_samples_per_prompt={g} "
                "(attempts come in rounds of G)."
            )
        if steps_per_round < 1:
            raise ValueError(f"steps_per_round must be >= 1, got {steps_per_round}.")
        self.policy = policy
        self.reward_model = as_reward_model(reward_model)
        self.config = config
        self.budget = budget
        self.steps_per_round = steps_per_round
        self.threshold = config.self_distillation.success_reward_threshold

    # ----- one question ---------------------------------------------------------------------

    def _trainer(self, policy: PolicyModel, row: dict[str, Any], seed: int, out: str) -> Any:
        from sdpo.trainer import SDPOTrainer

        cfg = copy.deepcopy(self.config)
        cfg.optimization.prompts_per_step = 1
        cfg.run.seed = seed
        cfg.run.max_steps = max(self.budget // cfg.num_samples_per_prompt, 1)
        cfg.run.output_dir = out
        cfg.run.progress_bar = False
        return SDPOTrainer(cfg, policy, self.reward_model, train_dataloader=[row])

    def _first_success(self, rewards: torch.Tensor) -> int | None:
        hits = (rewards >= self.threshold).nonzero().flatten()
        return int(hits[0]) if len(hits) else None

    def _rounds(
        self, policy: PolicyModel, row: dict[str, Any], seed: int, adapt: bool
    ) -> int | None:
        """Rounds of G attempts at ``row`` until the first success (attempts spent up to and
        including it) or the budget; with ``adapt``, an SDPO update after every failed round."""
        with tempfile.TemporaryDirectory(prefix="sdpo-discover-") as out:
            trainer = self._trainer(policy, row, seed, out)
            spent = 0
            while spent < self.budget:
                rollouts = trainer.generate([row])
                trainer.score(rollouts)
                hit = self._first_success(rollouts.rewards)
                if hit is not None:
                    return spent + hit + 1
                spent += len(rollouts)
                if adapt:
                    contexts = trainer.reprompt(rollouts)
                    for _ in range(self.steps_per_round):
                        trainer.update(rollouts, contexts)
        return None

    def run_sdpo(self, row: dict[str, Any], seed: int) -> int | None:
        """Attempts until the first success with an SDPO update after every failed round."""
        from sdpo.policy_model import PolicyModel

        student = PolicyModel(
            model=copy.deepcopy(self.policy.model),
            tokenizer=self.policy.tokenizer,
            device=self.policy.device,
        )
        self.last_student = student  # the adapted model of the latest question (for inspection)
        return self._rounds(student, row, seed, adapt=True)

    def run_best_of_k(self, row: dict[str, Any], seed: int) -> int | None:
        """Independent samples of the plain question, G at a time, until the first success."""
        return self._rounds(self.policy, row, seed, adapt=False)

    def run_multi_turn(self, row: dict[str, Any], seed: int) -> int | None:
        """G chains; each next attempt sees the question plus its chain's last feedback."""
        from sdpo.reprompting import Reprompter

        g = self.config.num_samples_per_prompt
        reprompter = Reprompter(self.config.self_distillation, tokenizer=self.policy.tokenizer)
        with tempfile.TemporaryDirectory(prefix="sdpo-discover-") as out:
            trainer = self._trainer(self.policy, row, seed, out)
            prompts = [row["prompt"]] * g
            spent = 0
            while spent < self.budget:
                rows = [{**row, "prompt": p} for p in prompts]
                rollouts = trainer.generate(rows, num_samples=1)
                # Score against the original question (a reward may read the prompt).
                rollouts.prompts = [row["prompt"]] * len(rollouts)
                rollouts.rows = [row] * len(rollouts)
                trainer.score(rollouts)
                hit = self._first_success(rollouts.rewards)
                if hit is not None:
                    return spent + hit + 1
                spent += len(rollouts)
                contexts = reprompter.build(
                    [row["prompt"]] * len(rollouts),
                    rollouts.completions,
                    [0.0] * len(rollouts),
                    list(range(len(rollouts))),
                    feedback=rollouts.feedback,
                )
                # A chain without usable feedback retries the plain question.
                prompts = [row["prompt"] if c is None else c.prompt for c in contexts]
        return None

    # ----- many questions -------------------------------------------------------------------

    def run(
        self,
        rows: Sequence[dict[str, Any]],
        seeds: Sequence[int] = (0,),
        methods: Sequence[str] = METHODS,
        on_result: Callable[[Attempt], None] | None = None,
    ) -> list[Attempt]:
        """Every method on every question for every seed; ``on_result`` sees each outcome."""
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"Unknown method(s) {unknown}; choose from {', '.join(METHODS)}.")
        if not rows:
            raise ValueError("No questions to discover: give at least one row with a 'prompt'.")
        run_one = {
            "sdpo": self.run_sdpo,
            "best_of_k": self.run_best_of_k,
            "multi_turn": self.run_multi_turn,
        }
        results = []
        for seed in seeds:
            for q, row in enumerate(rows):
                for method in methods:
                    solved_at = run_one[method](row, seed=1_000_003 * seed + q)
                    attempt = Attempt(method, seed, q, solved_at, solved_at or self.budget)
                    results.append(attempt)
                    if on_result is not None:
                        on_result(attempt)
        return results


def summarize(results: Sequence[Attempt], budget: int) -> dict[str, Any]:
    """Per method: discovery@k per seed, its mean and spread over seeds, and summary figures.

    ``attempts_to_match_best_of_k`` is the smallest k at which the method's mean curve reaches
    best-of-k's discovery rate at the full budget (the "fewer attempts" figure).
    """
    methods = sorted({r.method for r in results}, key=lambda m: METHODS.index(m))
    seeds = sorted({r.seed for r in results})
    out: dict[str, Any] = {"budget": budget, "seeds": seeds, "methods": {}}
    for m in methods:
        curves = [
            discovery_curve([r.solved_at for r in results if r.method == m and r.seed == s], budget)
            for s in seeds
        ]
        mean = [statistics.fmean(c[k] for c in curves) for k in range(budget)]
        std = [
            statistics.stdev(c[k] for c in curves) if len(curves) > 1 else 0.0
            for k in range(budget)
        ]
        spent = [r.attempts for r in results if r.method == m]
        out["methods"][m] = {
            "discovery_at_k": mean,
            "discovery_at_k_std": std,
            "per_seed": curves,
            "solved_fraction": mean[-1],
            "mean_attempts": statistics.fmean(spent) if spent else math.nan,
        }
    if "best_of_k" in out["methods"]:
        target = out["methods"]["best_of_k"]["solved_fraction"]
        for entry in out["methods"].values():
            entry["attempts_to_match_best_of_k"] = (
                attempts_to_reach(entry["discovery_at_k"], target) if target > 0 else None
            )
    return out


def plot_discovery(summary: dict[str, Any], path: str | Path, title: str = "") -> Path:
    """A PNG of discovery@k (mean over seeds, band = ± one standard deviation) per method."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    labels = {
        "sdpo": "test-time SDPO",
        "best_of_k": "best-of-k",
        "multi_turn": "multi-turn retry",
    }
    fig, ax = plt.subplots(figsize=(6.4, 4.2), dpi=120)
    ks = list(range(1, summary["budget"] + 1))
    for m, entry in summary["methods"].items():
        mean, std = entry["discovery_at_k"], entry["discovery_at_k_std"]
        ax.plot(ks, mean, label=labels.get(m, m), linewidth=2)
        ax.fill_between(
            ks,
            [a - b for a, b in zip(mean, std, strict=True)],
            [a + b for a, b in zip(mean, std, strict=True)],
            alpha=0.2,
        )
    ax.set_xlabel("attempts k")
    ax.set_ylabel("discovery@k (fraction of questions solved)")
    ax.set_ylim(0, 1)
    ax.set_xlim(1, summary["budget"])
    ax.grid(alpha=0.3)
    n_seeds = len(summary["seeds"])
    ax.set_title(title or f"Discovery within k attempts ({n_seeds} seed{'s' * (n_seeds > 1)})")
    ax.legend(loc="lower right")
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def write_results(results: Sequence[Attempt], summary: dict[str, Any], out_dir: Path) -> Path:
    """``discover.json``: the summary plus every (method, seed, question) outcome."""
    out_dir.mkdir(parents=True, exist_ok=True)
    record = {**summary, "results": [vars(r) for r in results]}
    path = out_dir / "discover.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    return path


# ----- command line ------------------------------------------------------------------------------

# Test-time defaults on top of the quickstart preset: a single question per update, the PG term
# off (a group of failures has no PG signal anyway), no reference model. The learning rate was
# chosen on 32 arithmetic_hard *train* questions (demo model, budget 32, 3 seeds; attempts to
# reach best-of-k's discovery@32): 1e-5: 24, 3e-5: 20, 5e-5: 17, 1e-4 and 3e-4: never (best-of-k
# 28); higher rates collapse the student onto a wrong answer after a few rounds.
DISCOVER_DEFAULTS = {
    "num_samples_per_prompt": 4,
    "policy_gradient.pg_loss_weight": 0.0,
    "policy_gradient.kl_penalty_weight": 0.0,
    "optimization.learning_rate": 5e-5,
    "self_distillation.teacher": "live",
}


def add_parser(sub: Any) -> None:
    """Register ``sdpo discover`` on the CLI's subparsers."""
    p = sub.add_parser(
        "discover",
        help="Test-time SDPO on hard questions, against best-of-k and multi-turn retrying.",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--task", default="arithmetic_hard", help="Built-in task (eval split).")
    p.add_argument("--file", help="JSONL file of questions (a 'prompt' plus the reward's columns).")
    p.add_argument("--reward", help="Reward for --file: math, code, exact, or module:function.")
    p.add_argument("--num-questions", type=int, default=16, help="Questions (the first N).")
    p.add_argument("--budget", type=int, default=32, help="Attempts per question and method.")
    p.add_argument("--steps-per-round", type=int, default=1, help="SDPO updates per round.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0], help="Seeds (curves get a band).")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--model", default="demo", help="Model path, hub id in the cache, or demo.")
    p.add_argument(
        "--preset", default="quickstart", help="Config preset under the test-time defaults."
    )
    p.add_argument("--out", type=Path, default=Path("runs/discover"), help="Output directory.")
    p.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="SDPO config overrides (quickstart preset + test-time defaults), e.g. "
        "optimization.learning_rate=1e-3 self_distillation.teacher=ema",
    )


def main(args: Any) -> int:
    """``sdpo discover``: run, write ``discover.json`` and ``discovery.png``, print a table."""
    from sdpo.policy_model import PolicyModel
    from sdpo.sources import rows_and_reward

    config = SDPOConfig.preset(getattr(args, "preset", "quickstart"))
    config.apply_overrides([f"{k}={v}" for k, v in DISCOVER_DEFAULTS.items()])
    config.model_name = args.model
    config.apply_overrides(args.overrides)
    if args.file and not args.reward:
        raise SystemExit("sdpo discover: --file needs --reward (math, code, exact, module:fn).")
    rows, reward = rows_and_reward(args.file or args.task, "eval", reward=args.reward)
    rows = rows[: args.num_questions]
    policy = PolicyModel(config.model_name, device=config.model.device, dtype=config.model.dtype)
    discoverer = Discoverer(
        policy, reward, config, budget=args.budget, steps_per_round=args.steps_per_round
    )
    print(
        f"sdpo discover: {len(rows)} questions x {len(args.seeds)} seed(s), budget {args.budget} "
        f"attempts, G = {config.num_samples_per_prompt}; methods {', '.join(args.methods)}"
    )
    results = discoverer.run(rows, args.seeds, args.methods)
    summary = summarize(results, args.budget)
    path = write_results(results, summary, args.out)
    png = plot_discovery(summary, args.out / "discovery.png")
    print(format_table(summary))
    print(f"Wrote {path} and {png}")
    return 0


def format_table(summary: dict[str, Any]) -> str:
    """discovery@k at k = G-multiples (powers of two up to the budget) per method."""
    budget = summary["budget"]
    ks = [k for k in (1, 2, 4, 8, 16, 32, 64, 128, 256) if k <= budget]
    if budget not in ks:
        ks.append(budget)
    head = "| method | " + " | ".join(f"d@{k}" for k in ks) + " | k to match best-of-k |"
    lines = [head, "|---" * (len(ks) + 2) + "|"]
    for m, e in summary["methods"].items():
        cells = [
            f"{e['discovery_at_k'][k - 1]:.3f}±{e['discovery_at_k_std'][k - 1]:.3f}" for k in ks
        ]
        match = e.get("attempts_to_match_best_of_k")
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {match if match else '-'} |")
    return "\n".join(lines)
