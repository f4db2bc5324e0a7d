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


@pytest.mark.slow
def test_training_script_is_deterministic(tmp_path):
    """Two runs with the same seed write byte-identical weights (one thread)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    small = ["--steps", "3", "--pool", "40", "--dev-size", "4", "--eval-every", "3"]
    for name in ("a", "b"):
        proc = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / "train_listprog_model.py"), "--out",
             str(tmp_path / name), *small],
            capture_output=True, text=True, env=env, timeout=600,
        )  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-2000:]
    a = (tmp_path / "a" / "model.safetensors").read_bytes()
    assert a == (tmp_path / "b" / "model.safetensors").read_bytes()
