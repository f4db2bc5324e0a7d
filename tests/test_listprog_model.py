"""The shipped list-program model and the script that trains it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sdpo.demo import LISTPROG_MODEL_DIR

ROOT = Path(__file__).resolve().parents[1]


def test_shipped_model_loads_and_is_small():
    from sdpo.policy_model import PolicyModel, check_model_source

    check_model_source("demo-listprog")
    weights = LISTPROG_MODEL_DIR / "model.safetensors"
    assert weights.stat().st_size <= 10 * 2**20
    policy = PolicyModel("demo-listprog")
    assert policy.tokenizer.decode(policy.encode_prompt("sort | take 2")) == "sort | take 2"


def _train(out: Path, *extra: str) -> bytes:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    small = (
        "--steps 4 --dev-size 4 --own-start 1 --own-every 2 --own-batch 4 --hidden 32 "
        "--layers 1 --warmup-steps 2"
    ).split()
    small += extra
    proc = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "train_listprog_model.py"), "--out", str(out),
         *small],
        capture_output=True, text=True, env=env, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "train split (never seen)" in proc.stdout
    return (out / "model.safetensors").read_bytes()


@pytest.mark.slow
def test_training_script_is_deterministic(tmp_path):
    """Two runs with the same seed write byte-identical weights (one thread), and evaluating
    more often does not change them (evaluation samples from its own random stream, while the
    training mixture samples the model's own attempts from the global one)."""
    a = _train(tmp_path / "a", "--eval-every", "4")
    assert a == _train(tmp_path / "b", "--eval-every", "4")
    assert a == _train(tmp_path / "c", "--eval-every", "1")
