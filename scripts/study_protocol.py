"""The study under one protocol for every arm, so that arms are compared like with like.

1. Tune: each arm trains on seed 0 over a grid of learning rates x updates per batch
   (``scripts/study.py --seeds 0 --lrs ... --updates ...``).
2. Pick: each arm's setting is the one with the highest mean *training* reward over the last
   50 steps of that seed-0 run. Held-out accuracy is never looked at to pick.
3. Final: each arm runs the remaining seeds at its pick (seed 0 again, under its final name).
4. One table and figure over all arms (``study.analyse`` / ``study.plot``): final accuracy,
   generations to GRPO's final accuracy with a seed-bootstrap interval, accuracy at equal
   generations. Generations count sampled completions, so arms with more updates per batch
   spend no extra generations.

    python scripts/study_protocol.py --task arithmetic_hard --arms grpo sdpo sdpo_routed \\
        --out docs/study_protocol model.dtype=float32

Runs are reused when finished (as in ``study.py``); seed 0's final run is the tuning run
(same configuration, and the runs are deterministic). The three arms above: 18 tuning runs and
12 final runs of 0.4-1.5 min each, ~35 min on one core.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import statistics
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
REWARD_WINDOW = 50


def _study():
    spec = importlib.util.spec_from_file_location("study", HERE / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def pick(
    tune_runs: Path, arm: str, lrs: list[float], updates: list[int], seed: int = 0
) -> tuple[float, int, dict[str, float]]:
    """``(lr, updates, scores)``: the ``arm@lr=..,u=..-seed{seed}`` run of ``tune_runs`` with the
    highest mean training reward over its last :data:`REWARD_WINDOW` steps. A grid axis with one
    value is not in the run's name (``study.grid``): its value is that one."""
    scores: dict[str, float] = {}
    for run in sorted(tune_runs.glob(f"{arm}@*-seed{seed}")):
        if not (run / "done").exists():
            continue
        rewards = [json.loads(line).get("reward") for line in (run / "metrics.jsonl").open()]
        rewards = [r for r in rewards if r is not None][-REWARD_WINDOW:]
        if rewards:
            scores[run.name] = statistics.fmean(rewards)
    if not scores:
        raise SystemExit(f"study_protocol: no finished tuning run of {arm!r} in {tune_runs}")
    best = max(scores, key=scores.get)
    tag = dict(kv.split("=") for kv in best.split("@", 1)[1].rsplit("-seed", 1)[0].split(","))
    return float(tag.get("lr", lrs[0])), int(tag.get("u", updates[0])), scores


def best_name(arm: str, lr: float, u: int, args: argparse.Namespace) -> str:
    """The tuning run's directory name (``study.grid``'s naming, seed 0)."""
    tag = ([f"lr={lr:g}"] if len(args.lrs) > 1 else []) + (
        [f"u={u}"] if len(args.updates) > 1 else []
    )
    return arm + ("@" + ",".join(tag) if tag else "") + "-seed0"


def _study_cmd(args: argparse.Namespace, arm: str, seeds, lrs, updates, runs: Path, out: Path):
    return [
        sys.executable, str(HERE / "study.py"), "--task", args.task, "--steps", str(args.steps),
        "--arms", arm, "--seeds", *map(str, seeds), "--lrs", *map(str, lrs),
        "--updates", *map(str, updates), "--discover-questions", "0", "--runs", str(runs),
        "--out", str(out), "--threads", str(args.threads), *args.overrides,
    ]  # fmt: skip


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--task", default="arithmetic_hard")
    p.add_argument("--arms", nargs="+", default=["grpo", "sdpo", "sdpo_routed"])
    p.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 3e-4])
    p.add_argument("--updates", nargs="+", type=int, default=[1, 2, 4])
    p.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2, 3, 4])
    p.add_argument("--steps", type=int, default=150)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--runs", type=Path, default=Path("runs/study_protocol"))
    p.add_argument("--out", type=Path, default=Path("docs/study_protocol"))
    p.add_argument("overrides", nargs="*", help="Extra key=value for every training run.")
    args = p.parse_args()
    study = _study()
    picked = {}
    for arm in args.arms:
        cmd = _study_cmd(
            args, arm, [0], args.lrs, args.updates, args.runs / "tune", args.out / arm / "tune"
        )
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        lr, u, scores = pick(args.runs / "tune", arm, args.lrs, args.updates)
        picked[arm] = {"lr": lr, "updates": u, "last_rewards": scores}
        print(f"study_protocol: {arm}: lr {lr:g}, {u} updates per batch", flush=True)
        tuned, final = args.runs / "tune" / best_name(arm, lr, u, args), args.runs / "final"
        if 0 in args.seeds and not (final / f"{arm}-seed0" / "done").exists():
            shutil.copytree(tuned, final / f"{arm}-seed0", dirs_exist_ok=True)  # same config
        cmd = _study_cmd(args, arm, args.seeds, [lr], [u], args.runs / "final", args.out / arm)
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    from sdpo.config import SDPOConfig

    config = SDPOConfig.preset("listprog" if args.task.startswith("listprog") else "quickstart")
    config.apply_overrides(list(args.overrides))
    per_step = config.optimization.prompts_per_step * config.num_samples_per_prompt
    results = {}
    for arm, choice in picked.items():
        name = arm if arm == "grpo" else f"{arm} (lr {choice['lr']:g}, u={choice['updates']})"
        results[name] = [
            study.read_run(args.runs / "final" / f"{arm}-seed{s}", per_step, choice["updates"])
            for s in args.seeds
        ]
    summary, table = study.analyse(results)
    study.plot(results, args.out / "study.png", f"{args.task}: tuned lr / updates per arm")
    record = {"args": {k: str(v) for k, v in vars(args).items()}, "picked": picked}
    (args.out / "study.json").write_text(json.dumps({**record, "training": summary}, indent=1))
    (args.out / "study.md").write_text(table + "\n")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
