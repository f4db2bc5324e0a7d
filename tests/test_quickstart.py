"""The quickstart as a newcomer runs it: `sdpo train` with no arguments must raise eval accuracy."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest


@pytest.mark.slow
def test_sdpo_train_quickstart_improves_accuracy(tmp_path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    start = time.time()
    out = subprocess.run(
        [sys.executable, "-m", "sdpo.cli", "train", "run.progress_bar=false"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    elapsed = time.time() - start
    assert out.returncode == 0, out.stdout + out.stderr
    assert "Run directory:" in out.stdout
    run_dirs = list((tmp_path / "runs").iterdir())
    assert len(run_dirs) == 1
    records = [
        json.loads(line) for line in (run_dirs[0] / "metrics.jsonl").read_text().splitlines()
    ]
    evals = [r for r in records if "eval/accuracy_greedy" in r]
    first, last = evals[0], evals[-1]
    print(
        f"quickstart: {elapsed:.0f}s, greedy {first['eval/accuracy_greedy']:.3f} -> {last['eval/accuracy_greedy']:.3f}, "
        f"sampled {first['eval/accuracy_sampled']:.3f} -> {last['eval/accuracy_sampled']:.3f}"
    )
    assert last["eval/accuracy_sampled"] > first["eval/accuracy_sampled"]
    assert last["eval/accuracy_greedy"] > first["eval/accuracy_greedy"]
    steps = [r for r in records if "reward" in r]
    fired = {k: v for k, v in steps[-1].items() if k.startswith("health/") and v}
    assert len(steps) == 300 and fired == {}, fired  # no health warning in the quickstart
    assert "sdpo: warning" not in out.stderr
