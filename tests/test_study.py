"""The study script end to end at a tiny size (CI runs it with the slow checks)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_study_with_two_steps_writes_tables_and_figures(tmp_path):
    pytest.importorskip("matplotlib")
    out, runs = tmp_path / "docs", tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "study.py"),
            "--steps", "2",
            "--seeds", "0",
            "--arms", "grpo", "pure_sdpo",
            "--eval-every", "1",
            "--eval-prompts", "4",
            "--discover-questions", "2",
            "--discover-budget", "8",
            "--out", str(out),
            "--runs", str(runs),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "study.json").read_text())
    assert set(record["training"]) >= {"grpo", "pure_sdpo"}
    # Three evaluations per run (steps 0, 1, 2), at 0, 64 and 128 generations (8 prompts x G = 8).
    curve = record["training"]["grpo"]["curves"][0]
    assert [e["generations"] for e in curve] == [0, 64, 128]
    assert set(record["discover"]["methods"]) == {"sdpo", "best_of_k", "multi_turn"}
    for name in ("study.png", "discovery.png"):
        assert (out / name).read_bytes()[:4] == b"\x89PNG"
    assert "| grpo |" in (out / "study.md").read_text()


@pytest.mark.slow
def test_listprog_study_with_two_steps(tmp_path):
    """Every listprog arm (binary and shaped GRPO, SDPO+PG, pure SDPO, shuffled feedback) and
    discovery run 2 steps with the shipped list-program model; the tables report optimizer steps
    and the distilling arms the teacher's probe accuracy."""
    pytest.importorskip("matplotlib")
    out, runs = tmp_path / "docs", tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            str(ROOT / "scripts" / "study.py"),
            "--task", "listprog",
            "--steps", "2",
            "--seeds", "0",
            "--eval-every", "1",
            "--eval-prompts", "4",
            "--discover-questions", "1",
            "--discover-budget", "8",
            "--out", str(out),
            "--runs", str(runs),
            "optimization.prompts_per_step=2",
            "run.teacher_probe_prompts=4",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "study.json").read_text())
    arms = {"grpo", "grpo_shaped", "sdpo", "pure_sdpo", "sdpo_shuffled"}
    assert set(record["training"]) >= arms
    curve = record["training"]["grpo"]["curves"][0]
    assert [e["generations"] for e in curve] == [0, 16, 32]  # 2 prompts x G = 8 per step
    assert [e["optimizer_steps"] for e in curve] == [0, 1, 2]
    for arm in ("sdpo", "pure_sdpo", "sdpo_shuffled"):
        (probe,) = record["training"][arm]["teacher_probe"]
        assert [step for step, _ in probe] == [1, 2]
    assert record["training"]["grpo"]["teacher_probe"] == [[]]
    assert set(record["discover"]["methods"]) == {"sdpo", "best_of_k", "multi_turn"}
    table = (out / "study.md").read_text()
    assert "| grpo_shaped |" in table and "| sdpo_shuffled |" in table


def _study_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("study", ROOT / "scripts" / "study.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _run(accuracies: list[float], step: int = 100) -> dict:
    return {"evals": [{"generations": k * step, "sampled": a} for k, a in enumerate(accuracies)]}


def test_generations_to_grpo_final_has_a_seed_bootstrap_interval_and_a_seed_count():
    study = _study_module()
    grpo = [_run([0.1, 0.3, 0.5, 0.6, 0.7]), _run([0.1, 0.4, 0.5, 0.6, 0.7])]  # target 0.7 at 400
    fast = [_run([0.1, 0.7, 0.7, 0.7, 0.7]), _run([0.1, 0.5, 0.8, 0.8, 0.8])]
    never = [_run([0.1, 0.2, 0.2, 0.2, 0.2]), _run([0.1, 0.3, 0.3, 0.3, 0.3])]
    low, high, within = study.reach_interval(fast, grpo, "sampled", draws=500)
    # Resamples: both "fast" seeds (mean curve reaches 0.7 at 100 or 200 generations), seed 0
    # twice (100) or seed 1 twice (200): ratios 0.25 and 0.5 only.
    assert (low, high) == (0.25, 0.5) and within == 2
    low, high, within = study.reach_interval(never, grpo, "sampled", draws=200)
    assert math.isinf(low) and math.isinf(high) and within == 0
    mixed = [fast[0], never[0]]  # the mean curve peaks at 0.45: never; seed 0 alone: 0.25
    low, high, within = study.reach_interval(mixed, grpo, "sampled", draws=500)
    assert low == 0.25 and math.isinf(high) and within == 1


def _protocol_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sp", ROOT / "scripts" / "study_protocol.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_protocol_picks_by_the_last_50_training_rewards_of_finished_runs(tmp_path):
    """The pick reads training reward only (never eval accuracy), over the last 50 steps, and
    skips unfinished runs; an axis with one value is not in the run name."""
    sp = _protocol_module()

    def run(name: str, rewards: list[float], eval_acc: float, done: bool = True) -> None:
        d = tmp_path / name
        d.mkdir()
        lines = [{"step": i, "reward": r} for i, r in enumerate(rewards)]
        lines.append({"step": len(rewards), "eval/accuracy_sampled": eval_acc})
        (d / "metrics.jsonl").write_text("\n".join(json.dumps(x) for x in lines) + "\n")
        if done:
            (d / "done").write_text("1.0\n")

    # early-high, late-low: best over all steps, worst over the last 50, and the best eval.
    run("sdpo@lr=0.0001,u=1-seed0", [0.9] * 100 + [0.2] * 50, eval_acc=0.99)
    run("sdpo@lr=0.0001,u=2-seed0", [0.1] * 100 + [0.6] * 50, eval_acc=0.10)
    run("sdpo@lr=0.0003,u=2-seed0", [0.5] * 150, eval_acc=0.50)
    run("sdpo@lr=0.0003,u=4-seed0", [1.0] * 150, eval_acc=1.00, done=False)  # not finished
    run("grpo@lr=0.0003,u=4-seed0", [1.0] * 150, eval_acc=1.00)  # another arm
    lr, u, scores = sp.pick(tmp_path, "sdpo", [1e-4, 3e-4], [1, 2, 4])
    assert (lr, u) == (1e-4, 2) and len(scores) == 3
    assert scores["sdpo@lr=0.0001,u=1-seed0"] == pytest.approx(0.2)
    only_u = tmp_path / "one_lr"
    only_u.mkdir()
    (tmp_path / "sdpo@lr=0.0001,u=2-seed0").rename(only_u / "sdpo@u=2-seed0")
    assert sp.pick(only_u, "sdpo", [5e-5], [1, 2])[:2] == (5e-5, 2)
    with pytest.raises(SystemExit, match="no finished tuning run"):
        sp.pick(tmp_path, "pure_sdpo", [1e-4], [1])


@pytest.mark.slow
def test_protocol_with_two_steps_tunes_picks_and_tabulates(tmp_path):
    pytest.importorskip("matplotlib")
    out, runs = tmp_path / "docs", tmp_path / "runs"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable, str(ROOT / "scripts" / "study_protocol.py"),
            "--arms", "grpo", "sdpo", "--lrs", "1e-4", "3e-4", "--updates", "1",
            "--seeds", "0", "1", "--steps", "2", "--out", str(out), "--runs", str(runs),
            "run.eval_max_prompts=4", "model.dtype=float32",
        ],
        capture_output=True, text=True, env=env, timeout=1200,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    record = json.loads((out / "study.json").read_text())
    assert set(record["picked"]) == {"grpo", "sdpo"}
    assert {p["updates"] for p in record["picked"].values()} == {1}
    assert len(record["training"]["grpo"]["final_sampled"]) == 2
    assert (runs / "final" / "sdpo-seed0" / "done").exists()  # the tuning run, reused
    assert (out / "study.png").read_bytes()[:4] == b"\x89PNG"
    assert "| grpo |" in (out / "study.md").read_text()
