"""Run directories under attack and misuse (issue 23): branches (H2), symlinks (H3), leftovers."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest
from helpers import checkpoint_trainer as make_trainer
from safetensors.torch import load_file

from sdpo import checkpoint as ckpt
from sdpo.reward_model import as_reward_model
from sdpo.run_dir import RunDirectory, RunDirectoryError, write_text_atomic

# ----- H2: a resume from an older checkpoint is a new timeline ----------------------------------


def _train_steps(run: Path) -> list[int]:
    """Steps of the training records of metrics.jsonl (evaluation records hold only eval/ keys)."""
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [r["step"] for r in records if not any(k.startswith("eval/") for k in r)]


def _policy(path: Path) -> dict:
    """The weights; a tied head is stored as lm_head by a checkpoint, as embed_tokens by final/."""
    weights = load_file(str(path / "model.safetensors"))
    if "model.embed_tokens.weight" not in weights:
        weights["model.embed_tokens.weight"] = weights.pop("lm_head.weight")
    return weights


class StopAt:
    """SIGTERM (a scheduler's preemption) at ``step``: the trainer saves and stops."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, trainer, metrics):
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGTERM)


def test_resuming_an_older_checkpoint_moves_the_abandoned_timeline_aside(tmp_path, capsys):
    run = tmp_path / "run"
    make_trainer(run, run__max_steps=4, run__save_total_limit=10, run__sample_log_steps=1).train()
    abandoned4 = _policy(run / "checkpoint-000004" / "policy")
    capsys.readouterr()

    # The branch: resume step 2, preempted after step 3.
    branch = make_trainer(
        run,
        run__max_steps=4,
        run__save_total_limit=10,
        run__sample_log_steps=1,
        run__resume_from=str(run / "checkpoint-000002"),
    )
    branch.callbacks.append(StopAt(3))
    branch.train()
    err = capsys.readouterr().err
    (aside,) = run.glob("abandoned-*")
    assert f"moved to {aside}/" in err and "checkpoint-000003, checkpoint-000004, final" in err
    assert sorted(p.name for p in aside.iterdir()) == [
        "checkpoint-000003",
        "checkpoint-000004",
        "final",
        "metrics.jsonl",
        "samples.jsonl",
    ]
    assert torch_equal(_policy(aside / "checkpoint-000004" / "policy"), abandoned4)
    # The run directory holds one timeline: 1, 2, then the branch's 3; no final/ (not finished).
    assert [p.name for p in ckpt.list_checkpoints(run)] == [
        f"checkpoint-00000{i}" for i in (1, 2, 3)
    ]
    assert not (run / "final").exists()
    assert _train_steps(run) == [1, 2, 3]
    samples = [json.loads(x)["step"] for x in (run / "samples.jsonl").read_text().splitlines()]
    assert max(samples) == 3 and samples.count(3) == len(samples) // 3
    assert (
        max(json.loads(x)["step"] for x in (aside / "metrics.jsonl").read_text().splitlines()) == 4
    )

    # The command printed on Ctrl-C / SIGTERM continues the branch, not the abandoned timeline.
    assert ckpt.resolve_checkpoint(run).name == "checkpoint-000003"
    make_trainer(run, run__max_steps=4, run__save_total_limit=10, run__resume_from=str(run)).train()
    assert _train_steps(run) == [1, 2, 3, 4]
    newest = ckpt.list_checkpoints(run)[-1]
    assert newest.name == "checkpoint-000004"
    assert torch_equal(_policy(run / "final"), _policy(newest / "policy"))
    assert len(list(run.glob("abandoned-*"))) == 1  # a plain resume of the newest moves nothing new


def torch_equal(a: dict, b: dict) -> bool:
    return a.keys() == b.keys() and all(bool((a[k] == b[k]).all()) for k in a)


def test_a_branch_with_save_total_limit_1_keeps_its_own_checkpoint(tmp_path):
    run = tmp_path / "run"
    make_trainer(run, run__max_steps=3, run__save_total_limit=2).train()  # keeps 2 and 3
    make_trainer(
        run,
        run__max_steps=4,
        run__save_total_limit=1,
        run__resume_from=str(run / "checkpoint-000002"),
    ).train()
    assert [p.name for p in ckpt.list_checkpoints(run)] == ["checkpoint-000004"]
    assert _train_steps(run) == [1, 2, 3, 4]
    assert torch_equal(_policy(run / "final"), _policy(run / "checkpoint-000004" / "policy"))


def test_interrupted_final_saves_are_recovered_or_removed(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".tmp-final-123").mkdir()  # killed while writing final/
    (run / ".old-final-456").mkdir()  # killed between the two renames: final/ is missing
    (run / ".old-final-456" / "config.json").write_text("{}")
    ckpt.cleanup(run)
    assert sorted(p.name for p in run.iterdir()) == ["final"]
    assert (run / "final" / "config.json").exists()


# ----- H3: never write through a symlink ----------------------------------------------------------


@pytest.fixture
def victim(tmp_path) -> Path:
    file = tmp_path / "victim.txt"
    file.write_text("precious\n")
    return file


def test_a_lock_symlink_is_refused_and_its_target_kept(tmp_path, victim):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".lock").symlink_to(victim)
    with pytest.raises(
        RunDirectoryError, match=r"\.lock is a symbolic link .*never writes through"
    ):
        RunDirectory(run).claim()
    assert victim.read_text() == "precious\n"


@pytest.mark.parametrize("name", ["metrics.jsonl", "samples.jsonl", "config.yaml", "final"])
def test_a_run_directory_with_symlinked_write_targets_is_refused_on_resume(tmp_path, victim, name):
    run = tmp_path / "run"
    run.mkdir()
    (run / name).symlink_to(victim)
    with pytest.raises(RunDirectoryError, match=rf"symbolic links where sdpo writes \({name} -> "):
        RunDirectory(run).claim(own=True)
    assert victim.read_text() == "precious\n"


def test_a_log_symlinked_after_the_claim_is_never_appended_through(tmp_path, victim):
    directory = RunDirectory(tmp_path / "run")
    directory.claim()
    (tmp_path / "run" / "metrics.jsonl").symlink_to(victim)
    with pytest.raises(RunDirectoryError, match="metrics.jsonl is a symbolic link"):
        directory.append_jsonl("metrics.jsonl", {"step": 1})
    assert victim.read_text() == "precious\n"


def test_a_planted_temporary_file_link_is_not_written_through(tmp_path, victim):
    (tmp_path / f".config.yaml.tmp-{os.getpid()}").symlink_to(victim)
    write_text_atomic(tmp_path / "config.yaml", "a: 1\n")
    assert victim.read_text() == "precious\n"
    assert (tmp_path / "config.yaml").read_text() == "a: 1\n"


def test_overwrite_removes_symlinked_run_files_not_their_targets(tmp_path, victim):
    run, elsewhere = tmp_path / "run", tmp_path / "elsewhere"
    elsewhere.mkdir()
    (elsewhere / "keep.txt").write_text("mine")
    run.mkdir()
    (run / "checkpoint-000001").symlink_to(elsewhere)
    (run / "metrics.jsonl").symlink_to(victim)
    RunDirectory(run).claim(overwrite=True)
    assert sorted(p.name for p in run.iterdir()) == [".lock"]
    assert (elsewhere / "keep.txt").read_text() == "mine" and victim.read_text() == "precious\n"


# ----- clear first errors (L items) ----------------------------------------------------------------


FULL_DISK = """
import resource, signal, sys
sys.path.insert(0, sys.argv[2])
import torch
from conftest import make_tiny_llama
from sdpo import PolicyModel, SDPOConfig
from sdpo import checkpoint as ckpt
from sdpo.reward_model import as_reward_model

model, tok = make_tiny_llama()
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 20, 1 << 20))  # 1 MB files: a full disk
ckpt.save_checkpoint(
    __import__("pathlib").Path(sys.argv[1]), 1, policy=PolicyModel(model=model, tokenizer=tok),
    modules={}, objects={"big": torch.zeros(1 << 20)}, trainer_state={}, config=SDPOConfig(),
    keep=2,
)
"""


def test_a_full_disk_during_a_checkpoint_says_so_and_names_the_file(tmp_path):
    """The policy fits under the limit, the 4 MB state does not."""
    import subprocess
    import sys

    run = tmp_path / "run"
    tests = str(Path(__file__).parent)
    proc = subprocess.run(
        [sys.executable, "-c", FULL_DISK, str(run), tests],
        capture_output=True,
        text=True,
        timeout=120,
    )
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("sdpo.checkpoint.CheckpointError: Writing checkpoint 1 in "), last
    assert "File too large" in last and "big.pt" in last and "iostream" not in last
    assert list(run.iterdir()) == []  # the partial checkpoint was removed


def test_an_fsdp_checkpoint_loaded_by_one_process_says_how_to_resume_it(tmp_path):
    (tmp_path / "shards").mkdir()
    with pytest.raises(
        ckpt.CheckpointError, match="distributed.strategy=fsdp run .*under torchrun"
    ):
        ckpt.load_checkpoint(tmp_path, policy=object(), modules={})


def test_a_ddp_checkpoint_resumed_by_one_process_says_how_to_resume_it():
    with pytest.raises(ckpt.CheckpointError, match="random streams of 2 processes.*torchrun"):
        ckpt.set_rng_state([ckpt.rng_state(), ckpt.rng_state()])


def test_sigterm_during_the_step_0_evaluation_stops_and_saves(tmp_path, capsys):
    from conftest import parity_reward
    from helpers import CHECKPOINT_ROWS as ROWS

    sent = []

    def preempted_while_scoring(prompts, completions, **columns):
        if not sent:  # one preemption, during the evaluation's first scoring
            sent.append(True)
            os.kill(os.getpid(), signal.SIGTERM)
        return parity_reward(prompts, completions)

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("outer handler"))
    try:
        trainer = make_trainer(tmp_path / "run", run__max_steps=3, run__save_steps=10)
        trainer.eval_rows = ROWS[:1]
        trainer.reward_model = as_reward_model(preempted_while_scoring)
        trainer.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert seen == [] and trainer.global_step == 0
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "checkpoint-000000"
    assert "SIGTERM: finishing the current step" in capsys.readouterr().err


def test_resume_with_an_empty_config_says_so(tmp_path):
    from sdpo.cli import main

    (tmp_path / "config.yaml").write_text("")
    with pytest.raises(SystemExit, match=r"config.yaml is empty .*--config FILE"):
        main(["train", "--resume", str(tmp_path)])
