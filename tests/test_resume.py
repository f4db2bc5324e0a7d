"""Exact resume: a run killed with SIGKILL after a checkpoint and resumed ends bitwise identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = Path(__file__).parent / "scripts" / "resume_run.py"


def _run(run_dir: Path, mode: str, delay: float = 0.0, variant: str = "full") -> subprocess.Popen:
    """``tests/scripts/resume_run.py`` as its own process (``variant``: full or lora)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, str(SCRIPT), str(run_dir), mode, str(delay), variant],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoint-000006" / "policy" / "model.safetensors"))


@pytest.mark.slow
def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    straight = tmp_path / "straight"
    proc = _run(straight, "fresh")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    killed = tmp_path / "killed"
    proc = _run(killed, "fresh", delay=1.0)
    deadline = time.time() + 240
    while not (killed / "checkpoint-000002" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoint-000006").exists(), "the run finished before it was killed"

    proc = _run(killed, "resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    a, b = _final_weights(straight), _final_weights(killed)
    assert a.keys() == b.keys()
    different = [k for k in a if not (a[k] == b[k]).all()]
    assert not different, f"weights differ after resume: {different[:5]}"
    ta = load_file(str(straight / "checkpoint-000006" / "teacher.safetensors"))
    tb = load_file(str(killed / "checkpoint-000006" / "teacher.safetensors"))
    assert all((ta[k] == tb[k]).all() for k in ta)

    # Ctrl-C: the current step finishes, a checkpoint is written, the resume command is printed.
    interrupted = tmp_path / "interrupted"
    proc = _run(interrupted, "fresh", delay=1.0)
    while not (interrupted / "checkpoint-000002" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Resume with: sdpo train --resume" in out
    stopped_at = int(sorted(interrupted.glob("checkpoint-*"))[-1].name.split("-")[1])
    assert 2 <= stopped_at < 6
    proc = _run(interrupted, "resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    c = _final_weights(interrupted)
    assert all((a[k] == c[k]).all() for k in a), "weights differ after a Ctrl-C and resume"


def test_resume_from_a_directory_without_checkpoint_says_so(tmp_path):
    from sdpo.checkpoint import resolve_checkpoint

    (tmp_path / ".tmp-checkpoint-000004-1").mkdir()  # a half-written one is never picked
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        resolve_checkpoint(tmp_path)


def _resume_settings(run_dir: Path, **overrides) -> dict:
    return dict(
        run__save_steps=2,
        run__save_total_limit=5,
        run__max_steps=4,
        run__seed=3,
        optimization__warmup_steps=2,
        optimization__lr_scheduler="cosine",
        optimization__updates_per_batch=2,
        policy_gradient__kl_penalty_weight=0.1,
        self_distillation__demonstration_selection="random",
        **overrides,
    )


def _optimizer_state(trainer) -> list:
    return [
        (name, key, value)
        for name, p in trainer.policy.model.named_parameters()
        for key, value in sorted(trainer.optimizer.state[p].items())
    ]


def test_in_process_resume_is_bitwise_identical(tmp_path):
    """4 steps in one trainer == 2 steps, checkpoint, a new trainer resumed from it, 2 more:
    weights, EMA teacher, reference, AdamW state, learning rate and step all equal, bitwise."""
    import shutil

    import torch
    from conftest import make_trainer

    straight = make_trainer(tmp_path / "straight", **_resume_settings(tmp_path))
    straight.train()
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "straight" / "checkpoint-000002", resumed_dir / "checkpoint-000002")
    resumed = make_trainer(
        resumed_dir, **_resume_settings(tmp_path), run__resume_from=str(resumed_dir)
    )
    assert resumed.global_step == 2
    resumed.train()

    assert resumed.global_step == straight.global_step == 4
    assert resumed.scheduler.get_last_lr() == straight.scheduler.get_last_lr()
    assert resumed.scheduler.last_epoch == straight.scheduler.last_epoch == 8
    for name in ("policy", "teacher", "reference"):
        a = (
            straight.policy.model
            if name == "policy"
            else straight.teacher.checkpoint_modules()[name]
        )
        b = resumed.policy.model if name == "policy" else resumed.teacher.checkpoint_modules()[name]
        sa, sb = a.state_dict(), b.state_dict()
        assert sa.keys() == sb.keys()
        different = [k for k in sa if not torch.equal(sa[k], sb[k])]
        assert not different, f"{name} differs after resume: {different[:4]}"
    opt_a, opt_b = _optimizer_state(straight), _optimizer_state(resumed)
    assert len(opt_a) == len(opt_b) > 0
    for (name, key, va), (_, _, vb) in zip(opt_a, opt_b, strict=True):
        assert torch.equal(torch.as_tensor(va), torch.as_tensor(vb)), (name, key)
    changed = dict(straight.teacher.copy.named_parameters())
    initial = dict(straight.teacher.reference.module.named_parameters())
    assert any(not torch.equal(changed[k], initial[k]) for k in changed)  # training happened
