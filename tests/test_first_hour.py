"""What a new user sees: exit codes and output of interrupted runs, resume messages and the
carried "before" numbers, samples.jsonl from the first step, one TensorBoard run per run
directory, progress lines for evaluation, and the launcher check."""

from __future__ import annotations

import io
import json
import os
import signal
from pathlib import Path

import pytest
from conftest import make_tiny_llama

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer
from sdpo.cli import main

QUICK = [
    "run.eval_max_prompts=4",
    "run.progress_bar=false",
    "optimization.prompts_per_step=2",
    "num_samples_per_prompt=2",
    "run.save_steps=1",
]


def _signal_after_first_step(monkeypatch, signum: int) -> None:
    """Deliver a real signal to this process right after the first training step."""
    original = SDPOTrainer.step

    def step(self):
        metrics = original(self)
        if self.global_step == 1:
            os.kill(os.getpid(), signum)
        return metrics

    monkeypatch.setattr(SDPOTrainer, "step", step)


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_interrupted_run_exits_non_zero_and_prints_only_what_happened(
    tmp_path, monkeypatch, capsys, signum, code
):
    """Before: exit status 0 and `eval/accuracy_greedy: 0.250 -> 0.250` (no final evaluation
    ran: the "after" was the step-0 number)."""
    _signal_after_first_step(monkeypatch, signum)
    rc = main(["train", *QUICK, "run.max_steps=50", f"run.output_dir={tmp_path / 'run'}"])
    out, err = capsys.readouterr()
    assert rc == code
    assert "Stopped at step 1" in err and "Resume with" in err
    assert "->" not in out and "eval/accuracy_greedy" not in out
    assert (tmp_path / "run" / "checkpoint-000001").is_dir()
    assert not (tmp_path / "run" / "final").exists()


def test_resume_says_where_it_resumed_and_keeps_the_first_runs_before_numbers(
    tmp_path, monkeypatch, capsys
):
    """Before: no line said where the run resumed, and the resumed run's summary and model card
    had no "before" numbers (they lived only in the first process)."""
    run = tmp_path / "run"
    _signal_after_first_step(monkeypatch, signal.SIGTERM)
    assert main(["train", *QUICK, "run.max_steps=50", f"run.output_dir={run}"]) == 143
    monkeypatch.undo()
    capsys.readouterr()
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first["step"] == 0 and "eval/accuracy_greedy" in first

    assert main(["train", "--resume", str(run), "run.max_steps=2"]) == 0
    out, err = capsys.readouterr()
    assert "sdpo: resumed from checkpoint-000001 at step 1" in err
    before = f"eval/accuracy_greedy: {first['eval/accuracy_greedy']:.3f} -> "
    assert before in out, out
    card = (run / "final" / "README.md").read_text()
    assert (
        f"{first['eval/accuracy_greedy']:.3f}" in card or str(first["eval/accuracy_greedy"]) in card
    )


def _tiny_trainer(tmp_path, **overrides) -> SDPOTrainer:
    model, tok = make_tiny_llama()
    args = {
        "num_samples_per_prompt": 2,
        "generation__max_new_tokens": 4,
        "optimization__prompts_per_step": 2,
        "run__max_steps": 2,
        "run__output_dir": str(tmp_path / "run"),
        "run__progress_bar": False,
        "policy_gradient__kl_penalty_weight": 0.0,
    }
    return SDPOTrainer(
        config=SDPOConfig(**{**args, **overrides}),
        policy_model=PolicyModel(model=model, tokenizer=tok),
        reward_model=lambda prompts, completions, **kw: [float(len(c) % 2) for c in completions],
        train_dataloader=[{"prompt": f"{i}+1="} for i in range(4)],
        eval_dataloader=[{"prompt": f"{i}+2="} for i in range(2)],
    )


def test_samples_jsonl_is_written_from_the_first_step(tmp_path):
    """Before: with run.sample_log_steps=10 (the default) a 2-step run wrote no samples.jsonl,
    though the end-of-run line names it."""
    trainer = _tiny_trainer(tmp_path)
    assert trainer.config.run.sample_log_steps == 10
    trainer.train()
    samples = [json.loads(x) for x in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert {s["step"] for s in samples} == {1} and len(samples) == 4


def test_tensorboard_keeps_one_run_per_run_directory(tmp_path):
    """Before: add_hparams wrote a second event file in a timestamped sub-directory (an extra
    TensorBoard run per start)."""
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = _tiny_trainer(tmp_path, run__report_to=["jsonl", "tensorboard"])
    trainer.train()
    board = tmp_path / "run" / "tensorboard"
    assert [p.name for p in board.iterdir() if p.is_dir()] == []
    events = EventAccumulator(str(board))
    events.Reload()
    assert "_hparams_/experiment" in events.PluginTagToContent("hparams")  # config, same file
    assert events.Scalars("reward")


def test_progress_is_plain_lines_off_a_terminal_and_tqdm_on_one():
    from sdpo.progress import Progress

    log = io.StringIO()
    p = Progress(10, "eval", unit="completions", stream=log, every_s=0.0)
    for _ in range(5):
        p.update(2)
    p.close()
    lines = log.getvalue().splitlines()
    assert lines[0].startswith("eval: 2/10 completions (20%)") and "left" in lines[0]
    assert lines[-1].startswith("eval: 10/10 completions (100%)")
    assert "\r" not in log.getvalue()

    class Terminal(io.StringIO):
        def isatty(self):
            return True

    tty = Terminal()
    bar = Progress(3, "sdpo", stream=tty)
    assert bar.bar is not None
    bar.update(3)
    bar.close()
    assert "3/3" in tty.getvalue()


def test_sdpo_eval_and_training_evaluation_report_progress(tmp_path, capsys):
    """Before: the step-0 evaluation and `sdpo eval` printed nothing until they finished."""
    rc = main(
        ["eval", "demo", "--samples", "2", "--max-prompts", "3", "-o", str(tmp_path / "e.json")]
    )
    assert rc == 0
    assert "eval demo: 9/9 completions (100%)" in capsys.readouterr().err
    trainer = _tiny_trainer(tmp_path, run__progress_bar=True)
    trainer.evaluate()
    assert "eval: 4/4 completions (100%)" in capsys.readouterr().err


def test_a_launcher_that_starts_one_process_for_ddp_is_an_error_naming_torchrun(
    tmp_path, monkeypatch, capsys
):
    """`accelerate launch --num_processes 2` on CPU without --multi_cpu runs one process (no
    WORLD_SIZE; ACCELERATE_* and MASTER_ADDR set). Before: it trained alone, silently."""
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    monkeypatch.setenv("ACCELERATE_USE_CPU", "False")
    monkeypatch.setenv("ACCELERATE_MIXED_PRECISION", "no")
    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with pytest.raises(ValueError, match="single process.*torchrun --nproc_per_node"):
        _tiny_trainer(tmp_path, distributed__strategy="ddp")
    argv = ["train", "distributed.strategy=ddp", f"run.output_dir={tmp_path / 'cli'}"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and "sdpo: distributed.strategy=ddp" in err and "torchrun" in err
    for name in ("ACCELERATE_USE_CPU", "ACCELERATE_MIXED_PRECISION"):
        monkeypatch.delenv(name)
    with pytest.warns(UserWarning, match="single process.*torchrun"):
        _tiny_trainer(tmp_path / "b", distributed__strategy="fsdp")


def test_the_end_of_run_message_names_files_that_exist(tmp_path, capsys):
    rc = main(["train", *QUICK, "run.max_steps=2", f"run.output_dir={tmp_path / 'run'}"])
    out = capsys.readouterr().out
    assert rc == 0 and "metrics.jsonl, samples.jsonl" in out
    for name in ("metrics.jsonl", "samples.jsonl", "config.yaml"):
        assert (Path(tmp_path / "run") / name).exists(), name
