"""scripts/gpu_check.py (``make gpu-check``) on the CPU: what it can run runs, the rest is listed as
skipped or as not verified on CUDA, and the JSON and table say so."""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.py"
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU report")


def _run(tmp_path: Path, *args: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        # The limits are sized for a GPU machine; a loaded CPU runner gets 10x.
        [sys.executable, str(SCRIPT), "--out", str(tmp_path), "--time-scale", "10", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    return proc, report, (tmp_path / "gpu_check.md").read_text()


def test_gpu_check_on_cpu_runs_what_it_can_and_lists_what_it_skipped(tmp_path):
    only = ["env", "vllm", "bench_step"]
    proc, report, table = _run(tmp_path, "--smoke", "--only", *only)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = report["checks"]
    assert list(checks) == only and report["device"] == "cpu" and report["smoke"]
    assert checks["env"]["ok"] and checks["env"]["auto_dtype"] in ("float32", "bfloat16")
    assert checks["env"]["detail"].startswith("model.dtype=auto -> ")
    if importlib.util.find_spec("vllm") is None:
        assert "vLLM is not installed" in checks["vllm"]["skipped"]
    assert "smoke mode" in checks["bench_step"]["skipped"]
    # Nothing ran on CUDA, and each CUDA-only item says why.
    assert report["ran_on_cuda"] == []
    assert set(report["not_run_on_cuda"]) == {"vllm", "bench_step"}
    assert "no benchmarks" in report["not_run_on_cuda"]["bench_step"]
    assert "| env | ok | cpu |" in table and "| vllm | skipped |" in table
    assert "Not verified on CUDA by this run:" in table


@pytest.mark.slow
def test_gpu_check_smoke_runs_fsdp_and_the_precision_tests_on_cpu(tmp_path):
    proc, report, table = _run(tmp_path, "--smoke", "--only", "precision", "fsdp_1proc")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    checks = report["checks"]
    assert checks["precision"]["ok"] and "passed" in checks["precision"]["detail"]
    # FSDP2 really sharded the blocks in one process and trained two steps.
    assert checks["fsdp_1proc"]["ok"], checks["fsdp_1proc"]
    assert "DTensor parameters" in checks["fsdp_1proc"]["detail"]
    assert "ran on cpu, not CUDA" in report["not_run_on_cuda"]["fsdp_1proc"]
    assert "| fsdp_1proc | ok | cpu |" in table


def test_a_failed_check_fails_the_run_and_shows_in_the_table():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    gpu_check = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_check)
    text = gpu_check.table(
        {"env": {"ok": True, "detail": "x"}, "vllm": {"ok": False, "detail": "exit 1: boom"}},
        "cpu",
    )
    assert "| vllm | FAILED | cpu | - | exit 1: boom |" in text
