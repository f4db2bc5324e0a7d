"""Exact resume: a run killed with SIGKILL after a checkpoint and resumed ends bitwise identical."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from safetensors.torch import load_file

SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    sys.path.insert(0, {tests!r})
    import torch
    torch.set_num_threads(1)
    from conftest import make_tiny_llama
    from sdpo import PolicyModel, SDPOConfig, SDPOTrainer

    run_dir, resume, delay = sys.argv[1], sys.argv[2] == "resume", float(sys.argv[3])
    rows = [{{"prompt": f"Q: {{a}}+{{b}}=", "answer": str(a + b)}} for a in range(10, 16) for b in range(20, 23)]

    def reward(prompts, completions, **columns):
        return [float(sum(map(ord, c)) % 2 == 0) for c in completions]

    class Slow:
        def on_step_end(self, trainer, metrics):
            time.sleep(delay)

    model, tok = make_tiny_llama(seed=0)
    config = SDPOConfig(num_samples_per_prompt=4, generation__max_new_tokens=6, optimization__prompts_per_step=2,
                        optimization__learning_rate=1e-3, optimization__warmup_steps=2, optimization__lr_scheduler="cosine",
                        self_distillation__demonstration_selection="random", run__max_steps=6, run__save_steps=2,
                        run__save_total_limit=5, run__output_dir=run_dir, run__progress_bar=False,
                        run__resume_from=run_dir if resume else None, run__seed=3)
    trainer = SDPOTrainer(config=config, policy_model=PolicyModel(model=model, tokenizer=tok), reward_model=reward,
                          train_dataloader=rows, callbacks=[Slow()])
    trainer.train()
    """
)


def _run(script: Path, run_dir: Path, mode: str, delay: float = 0.0) -> subprocess.Popen:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONHASHSEED": "0"}
    return subprocess.Popen(
        [sys.executable, str(script), str(run_dir), mode, str(delay)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _final_weights(run_dir: Path) -> dict:
    return load_file(str(run_dir / "checkpoint-000006" / "policy" / "model.safetensors"))


def test_sigkill_then_resume_is_bitwise_identical(tmp_path):
    script = tmp_path / "run.py"
    script.write_text(SCRIPT.format(tests=str(Path(__file__).parent)))

    straight = tmp_path / "straight"
    proc = _run(script, straight, "fresh")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out

    killed = tmp_path / "killed"
    proc = _run(script, killed, "fresh", delay=1.0)
    deadline = time.time() + 240
    while not (killed / "checkpoint-000002" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[0]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (killed / "checkpoint-000006").exists(), "the run finished before it was killed"

    proc = _run(script, killed, "resume")
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
    proc = _run(script, interrupted, "fresh", delay=1.0)
    while not (interrupted / "checkpoint-000002" / "trainer_state.json").exists():
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, _ = proc.communicate(timeout=120)
    assert proc.returncode == 0, out
    assert "Resume with: sdpo train --resume" in out
    stopped_at = int(sorted(interrupted.glob("checkpoint-*"))[-1].name.split("-")[1])
    assert 2 <= stopped_at < 6
    proc = _run(script, interrupted, "resume")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    c = _final_weights(interrupted)
    assert all((a[k] == c[k]).all() for k in a), "weights differ after a Ctrl-C and resume"


def test_resume_from_a_directory_without_checkpoint_says_so(tmp_path):
    from sdpo.checkpoint import resolve_checkpoint

    (tmp_path / ".tmp-checkpoint-000004-1").mkdir()  # a half-written one is never picked
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        resolve_checkpoint(tmp_path)
