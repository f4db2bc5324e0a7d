"""The study: what SDPO's feedback buys over GRPO on a task where groups often fail entirely.

Runs, each in its own process (``sdpo train``), on the ``arithmetic_hard`` task with the demo model:

    grpo            distillation off (policy gradient only)
    sdpo            SDPO + PG (the seed defaults: both terms), with the environment's feedback
    sdpo_nofb       the same, teacher contexts from successful siblings only (no feedback)
    pure_sdpo       distillation only (the paper's setting), with feedback
    pure_sdpo_nofb  distillation only, no feedback
    sdpo_routed     pure SDPO + correctness routing + the gated teacher (the variant that holds
                    its peak: docs/method.md); not in the default set

over several seeds, evaluating every ``--eval-every`` steps on the task's eval split; then
``sdpo discover`` (test-time SDPO vs best-of-k vs multi-turn retrying) on the same split. Writes
``study.json``, ``study.md`` (the tables) and PNG figures to ``--out`` (default ``docs/study``).

With ``--task listprog`` (list programs with execution feedback, the ``listprog`` preset and its
model, :mod:`sdpo.tasks.listprog`) the arms are the controlled set of ``LISTPROG_ARMS``:

    grpo            binary reward (all hidden tests pass)
    grpo_shaped     the fraction of hidden tests passed (information-matched control)
    sdpo            SDPO + PG with the execution feedback
    pure_sdpo       distillation only, with the feedback
    sdpo_shuffled   SDPO + PG with another question's feedback (the control that must not gain)
    sdpo_routed     pure SDPO + correctness routing + the gated teacher (the method issue's variant)

``--lrs`` and ``--updates`` give each arm a grid of learning rates and optimizer updates per
generated batch (every combination is a run, named ``arm@lr=..,u=..``); the tables report
generations, optimizer steps and wall-clock per run, and distilling arms log the teacher's own
accuracy (``teacher/probe_accuracy``) at every evaluation.

    python scripts/study.py                         # the full study (docs/study.md gives its cost)
    python scripts/study.py --steps 2 --seeds 0 --eval-every 1 --eval-prompts 8 --discover-questions 2
    python scripts/study.py --task listprog --out docs/listprog_study --runs runs/listprog_study
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path

ARMS: dict[str, list[str]] = {
    "grpo": ["self_distillation.distillation_weight=0"],
    "sdpo": [],
    "sdpo_nofb": ["self_distillation.include_environment_feedback=false"],
    "pure_sdpo": ["policy_gradient.pg_loss_weight=0"],
    "pure_sdpo_nofb": [
        "policy_gradient.pg_loss_weight=0",
        "self_distillation.include_environment_feedback=false",
    ],
    "sdpo_routed": [
        "policy_gradient.pg_loss_weight=0",
        "self_distillation.routing=correctness",
        "self_distillation.teacher=gated",
    ],
}
DEFAULT_ARMS = ["grpo", "sdpo", "sdpo_nofb", "pure_sdpo", "pure_sdpo_nofb"]
LISTPROG_ARMS: dict[str, list[str]] = {
    "grpo": ["self_distillation.distillation_weight=0"],
    "grpo_shaped": ["self_distillation.distillation_weight=0", "data.task=listprog_shaped"],
    "sdpo": [],
    "pure_sdpo": ["policy_gradient.pg_loss_weight=0"],
    "sdpo_shuffled": ["data.task=listprog_shuffled"],
    "sdpo_routed": ARMS["sdpo_routed"],
}
DISTILLING = {"sdpo", "sdpo_nofb", "pure_sdpo", "pure_sdpo_nofb", "sdpo_shuffled", "sdpo_routed"}
EVAL_KEY = "eval/accuracy_sampled"
GREEDY_KEY = "eval/accuracy_greedy"


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("docs/study"), help="Output directory.")
    p.add_argument("--runs", type=Path, default=Path("runs/study"), help="Run directories.")
    p.add_argument("--task", default="arithmetic_hard", help="Built-in task.")
    p.add_argument("--steps", type=int, default=150, help="Training steps per run.")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="Seeds per arm.")
    p.add_argument(
        "--arms", nargs="+", choices=sorted({*ARMS, *LISTPROG_ARMS}), help="Default: the task's."
    )
    p.add_argument(
        "--preset", help="Config preset (default: listprog for listprog, else quickstart)."
    )
    p.add_argument("--lrs", nargs="+", type=float, help="Learning-rate grid (default: preset's).")
    p.add_argument("--updates", nargs="+", type=int, help="Updates-per-batch grid (default: 1).")
    p.add_argument("--eval-every", type=int, default=25, help="Evaluate every N steps.")
    p.add_argument("--eval-prompts", type=int, default=200, help="Eval prompts per evaluation.")
    p.add_argument("--discover-questions", type=int, default=32, help="0 skips sdpo discover.")
    p.add_argument("--discover-budget", type=int, default=32, help="Attempts per question.")
    p.add_argument("--threads", type=int, default=1, help="OMP threads per run.")
    p.add_argument("overrides", nargs="*", help="Extra key=value for every training run.")
    args = p.parse_args()
    listprog = args.task.startswith("listprog")
    args.arm_table = LISTPROG_ARMS if listprog else ARMS
    args.arms = args.arms or (list(args.arm_table) if listprog else DEFAULT_ARMS)
    unknown = [a for a in args.arms if a not in args.arm_table]
    if unknown:
        p.error(f"--arms {unknown} do not apply to --task {args.task}; use {list(args.arm_table)}")
    args.preset = args.preset or ("listprog" if listprog else "quickstart")
    args.model = "demo-listprog" if listprog else "demo"
    return args


def grid(args: argparse.Namespace) -> list[tuple[str, str, list[str], int]]:
    """(run name, arm, overrides, updates per batch) of every arm x lr x updates combination."""
    lrs, updates = args.lrs or [None], args.updates or [1]
    runs = []
    for arm in args.arms:
        for lr in lrs:
            for u in updates:
                tag = ([f"lr={lr:g}"] if len(lrs) > 1 else []) + (
                    [f"u={u}"] if len(updates) > 1 else []
                )
                name = arm + ("@" + ",".join(tag) if tag else "")
                extra = [f"optimization.updates_per_batch={u}"]
                if lr is not None:
                    extra.append(f"optimization.learning_rate={lr:g}")
                if arm in DISTILLING:
                    extra += [f"run.teacher_probe_steps={args.eval_every}"]
                runs.append((name, arm, args.arm_table[arm] + extra, u))
    return runs


def run_training(args: argparse.Namespace, name: str, arm_overrides: list[str], seed: int) -> Path:
    run_dir = args.runs / f"{name}-seed{seed}"
    if (run_dir / "metrics.jsonl").exists() and (run_dir / "done").exists():
        return run_dir  # finished earlier: reuse (delete the directory to rerun)
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    cmd = [
        sys.executable,
        "-m",
        "sdpo.cli",
        "train",
        "--preset",
        args.preset,
        f"data.task={args.task}",
        f"run.max_steps={args.steps}",
        f"run.seed={seed}",
        f"run.eval_steps={args.eval_every}",
        f"run.eval_max_prompts={args.eval_prompts}",
        f"run.save_steps={args.steps}",
        "run.save_total_limit=1",
        "run.progress_bar=false",
        f"run.output_dir={run_dir}",
        *arm_overrides,
        *args.overrides,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"study: {name} seed {seed} failed:\n{proc.stderr[-3000:]}")
    (run_dir / "done").write_text(f"{time.time() - t0:.1f}\n")
    return run_dir


def read_run(run_dir: Path, samples_per_step: int, updates: int = 1) -> dict:
    """Eval curve (step, generations, optimizer steps, accuracy), the teacher's probe accuracy
    curve and the mean completion length of a run."""
    evals, lengths, teacher = [], [], []
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        if "teacher/probe_accuracy" in rec:
            teacher.append((rec["step"], rec["teacher/probe_accuracy"]))
        if EVAL_KEY in rec:
            evals.append(
                {
                    "step": rec["step"],
                    "generations": rec["step"] * samples_per_step,
                    "optimizer_steps": rec["step"] * updates,
                    "sampled": rec[EVAL_KEY],
                    "greedy": rec.get(GREEDY_KEY),
                }
            )
        if "completions/mean_length" in rec:
            lengths.append(rec["completions/mean_length"])
    seconds = float((run_dir / "done").read_text()) if (run_dir / "done").exists() else None
    return {
        "evals": evals,
        "mean_length": statistics.fmean(lengths) if lengths else None,
        "seconds": seconds,
        "teacher_probe": teacher,
    }


def generations_to_reach(evals: list[dict], target: float, key: str = "sampled") -> int | None:
    """Generations at the first evaluation whose accuracy is >= target (None: never)."""
    for e in evals:
        if e[key] is not None and e[key] >= target - 1e-12:
            return e["generations"]
    return None


def reach_ratio(runs: list[dict], target: float, budget: int, key: str) -> float:
    """Generations the seeds' mean curve needs to reach ``target``, ÷ ``budget`` (inf: never)."""
    curve = [{"generations": g, key: a} for g, a in mean_curve(runs, key)]
    g = generations_to_reach(curve, target, key)
    return math.inf if g is None else g / budget


def reach_interval(
    runs: list[dict], grpo: list[dict], key: str, draws: int = 2000, seed: int = 0
) -> tuple[float, float, int]:
    """A 95% bootstrap interval of :func:`reach_ratio` and how many single seeds reach.

    Each draw resamples the arm's seeds and GRPO's seeds with replacement: the target is the
    resampled GRPO seeds' mean final accuracy, the ratio that of the resampled arm's mean curve
    (inf when it never reaches; an interval with an inf end means some resamples never do). The
    count is of the arm's seeds whose *own* curve reaches GRPO's mean final accuracy within half
    of GRPO's generations (the issue's "≤ 0.5× in ≥ 4 of 5 seeds").
    """
    rng = random.Random(seed)
    budget = grpo[0]["evals"][-1]["generations"]
    ratios = []
    for _ in range(draws):
        arm = [rng.choice(runs) for _ in runs]
        target = statistics.fmean(rng.choice(grpo)["evals"][-1][key] for _ in grpo)
        ratios.append(reach_ratio(arm, target, budget, key) if target > 0 else math.nan)
    ratios = sorted(r for r in ratios if r == r)
    if not ratios:
        return math.nan, math.nan, 0
    low, high = ratios[int(0.025 * (len(ratios) - 1))], ratios[int(0.975 * (len(ratios) - 1))]
    target = statistics.fmean(r["evals"][-1][key] for r in grpo)
    within = sum(reach_ratio([r], target, budget, key) <= 0.5 for r in runs)
    return low, high, within


def mean_sd(values: list[float]) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{statistics.fmean(values):.3f} ± {statistics.stdev(values):.3f}"


def mean_curve(runs: list[dict], key: str = "sampled") -> list[tuple[int, float]]:
    """(generations, accuracy averaged over seeds) at every evaluation all seeds share."""
    n = min(len(r["evals"]) for r in runs)
    return [
        (runs[0]["evals"][i]["generations"], statistics.fmean(r["evals"][i][key] for r in runs))
        for i in range(n)
    ]


def analyse(results: dict[str, list[dict]]) -> tuple[dict, str]:
    """Tables: final accuracy; generations each arm needs to reach GRPO's final accuracy (on the
    mean curve over seeds) as a fraction of the generations GRPO spent; accuracy at equal
    generations; completion length."""
    summary: dict = {}
    targets: dict[str, float] = {}
    budget = None
    if "grpo" in results:
        for key in ("sampled", "greedy"):
            targets[key] = statistics.fmean(r["evals"][-1][key] for r in results["grpo"])
        budget = results["grpo"][0]["evals"][-1]["generations"]
        summary["grpo_final"] = {**targets, "generations": budget}
    lines = [
        "| arm | final sampled acc | final greedy acc | generations to GRPO's final sampled acc "
        "(÷ GRPO's; 95% bootstrap CI over seeds; seeds reaching it within 0.5×) | generations to "
        "GRPO's final greedy acc (same) | mean completion "
        "length | optimizer steps | minutes per run | teacher probe acc (first -> last) |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for arm, runs in results.items():
        finals = [r["evals"][-1]["sampled"] for r in runs]
        greedy = [r["evals"][-1]["greedy"] for r in runs]
        reach: dict[str, int | None] = {}
        cells = []
        for key, target in targets.items():
            curve = [{"generations": g, key: a} for g, a in mean_curve(runs, key)]
            # GRPO's final accuracy 0: every arm "reaches" it at 0 generations, which means nothing
            reach[key] = generations_to_reach(curve, target, key) if target > 0 else None
            g = reach[key]
            if target <= 0:
                cells.append("- (GRPO's is 0)")
                continue
            low, high, within = reach_interval(runs, results["grpo"], key)
            ci = f"CI [{low:.2f}, {high:.2f}]".replace("inf", "never")
            seeds = f"{within}/{len(runs)} seeds ≤ 0.5"
            cells.append(
                f"never ({ci}; {seeds})" if g is None else f"{g} ({g / budget:.2f}; {ci}; {seeds})"
            )
            summary.setdefault("reach_intervals", {}).setdefault(arm, {})[key] = [
                None if math.isinf(low) else low, None if math.isinf(high) else high,
                within, len(runs),
            ]  # fmt: skip
        summary[arm] = {
            "final_sampled": finals,
            "final_greedy": greedy,
            "generations_to_grpo_final": reach,
            "mean_length": [r["mean_length"] for r in runs],
            "curves": [r["evals"] for r in runs],
        }
        minutes = [r["seconds"] / 60 for r in runs if r["seconds"] is not None]
        probes = [r.get("teacher_probe") or [] for r in runs]
        probe = (
            f"{mean_sd([p[0][1] for p in probes])} -> {mean_sd([p[-1][1] for p in probes])}"
            if all(probes)
            else "-"
        )
        summary[arm]["teacher_probe"] = probes
        lines.append(
            f"| {arm} | {mean_sd(finals)} | {mean_sd(greedy)} | "
            + " | ".join(cells or ["-", "-"])
            + f" | {mean_sd([r['mean_length'] for r in runs])}"
            + f" | {runs[0]['evals'][-1].get('optimizer_steps', '-')} | {mean_sd(minutes)} | {probe} |"
        )
    for key in ("sampled", "greedy"):
        lines += [
            "",
            f"{key.capitalize()} accuracy at equal generations (mean over seeds):",
            "",
            "| generations | " + " | ".join(results) + " |",
            "|---" * (len(results) + 1) + "|",
        ]
        curves = {arm: mean_curve(runs, key) for arm, runs in results.items()}
        for i, (g, _) in enumerate(next(iter(curves.values()))):
            row = [f"{c[i][1]:.3f}" if i < len(c) else "-" for c in curves.values()]
            lines.append(f"| {g} | " + " | ".join(row) + " |")
    return summary, "\n".join(lines)


def plot(
    results: dict[str, list[dict]], path: Path, title: str = "arithmetic_hard, demo model"
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2), dpi=120)
    for ax, key, title in (
        (axes[0], "sampled", "Sampled accuracy (T = 1) on held-out problems"),
        (axes[1], "greedy", "Greedy accuracy on held-out problems"),
    ):
        for arm, runs in results.items():
            n = min(len(r["evals"]) for r in runs)
            xs = [runs[0]["evals"][i]["generations"] for i in range(n)]
            vals = [[r["evals"][i][key] for r in runs] for i in range(n)]
            mean = [statistics.fmean(v) for v in vals]
            sd = [statistics.stdev(v) if len(v) > 1 else 0.0 for v in vals]
            ax.plot(xs, mean, label=arm, linewidth=2)
            ax.fill_between(
                xs,
                [m - s for m, s in zip(mean, sd, strict=True)],
                [m + s for m, s in zip(mean, sd, strict=True)],
                alpha=0.15,
            )
        ax.set_xlabel("generated completions")
        ax.set_ylabel("accuracy")
        ax.set_title(title, fontsize=10)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8, loc="lower right")
    n_seeds = len(next(iter(results.values())))
    fig.suptitle(f"{title}, mean ± sd over {n_seeds} seed(s)", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def main() -> int:
    args = parse_args()
    from sdpo.config import SDPOConfig

    quick = SDPOConfig.preset(args.preset)
    quick.apply_overrides(list(args.overrides))
    samples_per_step = quick.optimization.prompts_per_step * quick.num_samples_per_prompt
    t0 = time.time()
    results: dict[str, list[dict]] = {}
    for name, _, overrides, updates in grid(args):
        for seed in args.seeds:
            run_dir = run_training(args, name, overrides, seed)
            results.setdefault(name, []).append(read_run(run_dir, samples_per_step, updates))
            print(f"study: {name} seed {seed} done ({time.time() - t0:.0f} s)", flush=True)
    summary, table = analyse(results)
    args.out.mkdir(parents=True, exist_ok=True)
    plot(results, args.out / "study.png", f"{args.task}, model {args.model}")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "training": summary}
    text = ["## Training: SDPO vs GRPO", "", table]
    if args.discover_questions:
        disc_dir = args.runs / "discover"
        cmd = [
            sys.executable,
            "-m",
            "sdpo.cli",
            "discover",
            "--task",
            args.task,
            "--num-questions",
            str(args.discover_questions),
            "--budget",
            str(args.discover_budget),
            "--seeds",
            *map(str, args.seeds),
            "--out",
            str(disc_dir),
            "--preset",
            args.preset,
            "--model",
            args.model,
        ]
        env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "HF_HUB_OFFLINE": "1"}
        if not (disc_dir / "discover.json").exists():  # finished earlier: reuse
            proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
            if proc.returncode != 0:
                raise SystemExit(f"study: sdpo discover failed:\n{proc.stderr[-3000:]}")
        from sdpo.discover import format_table, plot_discovery

        disc = json.loads((disc_dir / "discover.json").read_text())
        plot_discovery(disc, args.out / "discovery.png")
        record["discover"] = {k: v for k, v in disc.items() if k != "results"}
        text += ["", "## Test-time SDPO: discovery@k", "", format_table(disc)]
    record["seconds"] = time.time() - t0
    (args.out / "study.json").write_text(json.dumps(record, indent=1) + "\n")
    text += [
        "",
        f"Time of this invocation: {record['seconds'] / 60:.1f} min (finished runs are reused).",
    ]
    (args.out / "study.md").write_text("\n".join(text) + "\n")
    print("\n".join(text))
    print(
        f"Wrote {args.out}/study.json, study.md, study.png"
        + (", discovery.png" * bool(args.discover_questions))
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
