"""Checkpoints and run directories under faults: NaN weights, a crash mid re-save, corruption,
pickles, changed settings on resume, two runs in one directory."""

from __future__ import annotations

import json
import math
import os
import pickle
import resource
import shutil
import signal
from pathlib import Path

import pytest
import torch
from conftest import make_tiny_llama
from helpers import checkpoint_trainer

from sdpo import PolicyModel, SDPOConfig
from sdpo import checkpoint as ckpt
from sdpo.cli import build_parser, load_config
from sdpo.run_dir import RunDirectory, RunDirectoryError

make_trainer = checkpoint_trainer


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    """A run directory with checkpoint-000001 and checkpoint-000002 (shared: copy before changing)."""
    run = tmp_path_factory.mktemp("trained") / "run"
    make_trainer(run).train()
    return run


@pytest.fixture
def run_copy(trained_run, tmp_path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    return run


# ----- item 5: non-finite weights ----------------------------------------------------------------


def test_nonfinite_weights_are_never_checkpointed_and_the_good_one_is_kept(run_copy):
    trainer = make_trainer(run_copy, run__resume_from=str(run_copy), run__save_total_limit=1)
    with torch.no_grad():
        next(trainer.policy.model.parameters()).fill_(float("nan"))
    trainer.global_step += 1
    with pytest.raises(ckpt.NonFiniteWeightsError, match="NaN or inf"):
        trainer.save_checkpoint()
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == [
        "checkpoint-000001",
        "checkpoint-000002",
    ]
    assert not list(run_copy.glob(".tmp-*"))


@pytest.mark.parametrize(
    "key",
    ["learning_rate", "weight_decay", "temperature", "distillation_weight", "kl_penalty_weight"],
)
def test_inf_is_rejected_like_nan(key):
    with pytest.raises(ValueError, match=f"{key} is inf; give a finite number"):
        SDPOConfig(**{key: math.inf})


@pytest.mark.parametrize("key", ["model__dtype", "model__param_dtype"])
def test_float16_on_cpu_is_refused(tmp_path, key):
    model, tok = make_tiny_llama()
    policy = PolicyModel(model=model, tokenizer=tok, device="cpu")
    with pytest.raises(ValueError, match="float16 on CPU is not supported"):
        make_trainer(tmp_path / "run", policy=policy, **{key: "float16"})


def test_huge_rewards_make_a_counted_skipped_step_not_a_silent_no_op(tmp_path):
    def huge(prompts, completions, **columns):
        return [1e30 * (i % 2) for i in range(len(completions))]

    trainer = make_trainer(
        tmp_path / "run",
        reward=huge,
        policy_gradient__scale_rewards=False,
        self_distillation__distillation_weight=0.0,
    )
    with pytest.warns(UserWarning, match="non-finite gradient norm"):
        metrics = trainer.step()
    assert metrics["skipped_nonfinite_steps"] == 1


# ----- item 8: re-saving a step ------------------------------------------------------------------


def test_same_step_resave_is_skipped_when_nothing_changed(run_copy):
    trainer = make_trainer(run_copy, run__resume_from=str(run_copy))
    before = (run_copy / "checkpoint-000002").stat().st_ino
    assert trainer.save_checkpoint() == run_copy / "checkpoint-000002"
    assert (run_copy / "checkpoint-000002").stat().st_ino == before


def test_a_crash_between_the_two_renames_of_a_resave_leaves_a_checkpoint(run_copy, monkeypatch):
    trainer = make_trainer(run_copy, run__resume_from=str(run_copy), run__save_total_limit=1)
    trainer.checkpointer.saved_step = None  # force a re-save of step 2
    real_rename = Path.rename

    def crash_on_moving_the_new_one_in(self, target):
        if self.name.startswith(".tmp-checkpoint"):
            raise KeyboardInterrupt  # the second Ctrl-C, or a kill, between the renames
        return real_rename(self, target)

    monkeypatch.setattr(Path, "rename", crash_on_moving_the_new_one_in)
    with pytest.raises(KeyboardInterrupt):
        trainer.save_checkpoint()
    monkeypatch.undo()
    assert not (run_copy / "checkpoint-000002").exists()
    found = ckpt.resolve_checkpoint(run_copy)  # the renamed-away old one still counts
    assert found.name.startswith(".old-checkpoint-000002")
    ckpt.cleanup(run_copy)
    assert ckpt.resolve_checkpoint(run_copy) == run_copy / "checkpoint-000002"
    assert not list(run_copy.glob(".tmp-*")) and not list(run_copy.glob(".old-*"))


def test_leftovers_of_killed_saves_are_cleaned_up_on_resume(run_copy):
    (run_copy / ".tmp-checkpoint-000003-4242").mkdir()
    (run_copy / ".tmp-checkpoint-000003-4242" / "junk.bin").write_bytes(b"x" * 1000)
    shutil.copytree(run_copy / "checkpoint-000001", run_copy / ".old-checkpoint-000001-4243")
    make_trainer(run_copy, run__resume_from=str(run_copy), run__max_steps=3).train()
    assert not list(run_copy.glob(".tmp-*")) and not list(run_copy.glob(".old-*"))
    assert ckpt.resolve_checkpoint(run_copy).name == "checkpoint-000003"


# ----- item 9: config.yaml -------------------------------------------------------------------------


def test_config_yaml_stays_whole_when_the_disk_is_full(tmp_path):
    path = tmp_path / "config.yaml"
    SDPOConfig().to_yaml(path)
    before = path.read_text()
    pid = os.fork()
    if pid == 0:  # the child writes with a file-size limit: a full disk after 300 bytes
        code = 0
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, (300, 300))
            SDPOConfig(learning_rate=0.05).to_yaml(path)
        except OSError:
            code = 3
        except BaseException:
            code = 4
        os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 3  # the write failed with an OSError
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


# ----- item 10: integrity ----------------------------------------------------------------------------


def _flip_a_byte(file: Path, offset: int = -100) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


@pytest.mark.parametrize(
    ("broken", "damage"),
    [
        ("policy/model.safetensors", _flip_a_byte),
        ("optimizer.pt", lambda f: f.write_bytes(f.read_bytes()[:100])),
        ("optimizer.pt", Path.unlink),
        ("teacher.safetensors", _flip_a_byte),
    ],
)
def test_a_broken_newest_checkpoint_falls_back_to_the_previous_one(run_copy, broken, damage):
    damage(run_copy / "checkpoint-000002" / broken)
    with pytest.warns(UserWarning, match=f"checkpoint-000002/{broken}"):
        assert ckpt.resolve_checkpoint(run_copy) == run_copy / "checkpoint-000001"
    with pytest.raises(ckpt.CheckpointError, match=broken):
        ckpt.resolve_checkpoint(run_copy / "checkpoint-000002")
    with pytest.warns(UserWarning, match=broken):
        trainer = make_trainer(run_copy, run__resume_from=str(run_copy))
    assert trainer.global_step == 1


def test_a_half_written_checkpoint_is_never_picked(tmp_path):
    (tmp_path / ".tmp-checkpoint-000004-1").mkdir()
    (tmp_path / "checkpoint-000005").mkdir()  # no manifest: not complete
    with pytest.raises(FileNotFoundError, match="No complete checkpoint"):
        ckpt.resolve_checkpoint(tmp_path)


# ----- item 11: no pickle execution ------------------------------------------------------------------


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_resume_never_executes_a_pickle_from_the_checkpoint(run_copy, tmp_path):
    marker = tmp_path / "pwned"
    last = run_copy / "checkpoint-000002"
    state = torch.load(last / "optimizer.pt", weights_only=True)
    state["payload"] = _Exploit(marker)
    with open(last / "optimizer.pt", "wb") as fh:
        pickle.dump(state, fh)  # a plain pickle, as a forged checkpoint would be
    ckpt.write_manifest(last)  # the forger rewrites the manifest too
    with pytest.raises(ckpt.CheckpointError, match="does not execute code"):
        make_trainer(run_copy, run__resume_from=str(last))
    assert not marker.exists()


# ----- item 12: settings on resume ------------------------------------------------------------------


def test_resume_applies_a_new_learning_rate_and_max_steps(run_copy):
    trainer = make_trainer(
        run_copy,
        run__resume_from=str(run_copy),
        optimization__learning_rate=5e-2,
        run__max_steps=3,
    )
    assert trainer.optimizer.param_groups[0]["lr"] == 5e-2
    trainer.train()
    assert trainer.global_step == 3
    saved = SDPOConfig.from_yaml(run_copy / "checkpoint-000003" / "config.yaml")
    assert saved.optimization.learning_rate == 5e-2


def test_resume_refuses_changes_to_fixed_settings_naming_them(run_copy):
    with pytest.raises(
        ckpt.CheckpointError, match=r"num_samples_per_prompt \(2 -> 4\).*run\.seed \(0 -> 7\)"
    ):
        make_trainer(
            run_copy, run__resume_from=str(run_copy), run__seed=7, num_samples_per_prompt=4
        )


# ----- items 6 and 7: run directories ---------------------------------------------------------------


def test_a_fresh_run_refuses_a_directory_holding_another_run(run_copy):
    with pytest.raises(RunDirectoryError, match="is not empty.*--resume.*--overwrite"):
        make_trainer(run_copy).train()
    assert json.loads((run_copy / "checkpoint-000002" / "trainer_state.json").read_text())


def test_overwrite_replaces_the_earlier_run(run_copy):
    make_trainer(run_copy, run__max_steps=1, run__overwrite_output_dir=True).train()
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == ["checkpoint-000001"]
    records = (run_copy / "metrics.jsonl").read_text().splitlines()
    assert max(json.loads(r)["step"] for r in records) == 1


def test_two_live_runs_never_share_a_directory(tmp_path):
    first = RunDirectory(tmp_path / "run")
    first.claim()
    with pytest.raises(RunDirectoryError, match=f"in use by another sdpo run \\(pid {os.getpid()}"):
        RunDirectory(tmp_path / "run").claim(own=True)
    first.release()
    RunDirectory(tmp_path / "run").claim(own=True)


def test_default_run_directories_do_not_collide():
    names = {load_config(build_parser().parse_args(["train"])).run.output_dir for _ in range(20)}
    assert len(names) == 20


def test_resume_from_a_checkpoint_continues_in_its_run_directory(run_copy, tmp_path):
    args = build_parser().parse_args(["train", "--resume", str(run_copy / "checkpoint-000001")])
    config = load_config(args)
    assert config.run.output_dir == str(run_copy)
    assert config.run.resume_from == str(run_copy / "checkpoint-000001")
    with pytest.raises(ValueError, match="inside a checkpoint"):
        make_trainer(run_copy / "checkpoint-000001", run__resume_from=str(run_copy))
    trainer = make_trainer(run_copy, run__resume_from=config.run.resume_from, run__max_steps=3)
    trainer.train()
    assert [p.name for p in ckpt.list_checkpoints(run_copy)] == [
        "checkpoint-000001",
        "checkpoint-000002",
        "checkpoint-000003",
    ]
    assert not list((run_copy / "checkpoint-000001").glob("checkpoint-*"))


def test_docs_list_the_keys_a_resume_may_change():
    text = (Path(__file__).resolve().parents[1] / "docs" / "cli.md").read_text()
    section = text.split("What may change on resume")[1].split("- **Checkpoints**")[0]
    for key in SDPOConfig.resumable_keys():
        assert f"`{key}`" in section, key


def test_sigterm_saves_a_checkpoint_like_ctrl_c(tmp_path, capsys):
    class Preempt:
        def on_step_end(self, trainer, metrics):
            if trainer.global_step == 1:
                os.kill(os.getpid(), signal.SIGTERM)  # a scheduler's preemption

    seen = []
    previous = signal.signal(signal.SIGTERM, lambda *a: seen.append("outer handler"))
    try:
        trainer = make_trainer(tmp_path / "run", run__max_steps=3, run__save_steps=10)
        trainer.callbacks.append(Preempt())
        trainer.train()
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert trainer.global_step == 1 and not seen
    assert ckpt.resolve_checkpoint(tmp_path / "run").name == "checkpoint-000001"
    assert "SIGTERM: finishing the current step" in capsys.readouterr().err


def test_metrics_jsonl_is_strict_json(tmp_path):
    trainer = make_trainer(tmp_path / "run")
    trainer.log.write_jsonl("metrics.jsonl", {"step": 1, "loss": math.nan, "kl": math.inf})
    line = (tmp_path / "run" / "metrics.jsonl").read_text()
    record = json.loads(line, parse_constant=lambda c: pytest.fail(f"bare {c} in {line}"))
    assert record == {"step": 1, "loss": None, "kl": None}
