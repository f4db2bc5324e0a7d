"""Trackers: a real run reports to TensorBoard event files and an offline W&B run, read back with
their own readers; unknown or missing trackers fail with a clear message before any work."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import conftest
import pytest

from sdpo import SDPOConfig
from sdpo.tracking import MissingTrackerError, check_trackers

pytest.importorskip("tensorboard", reason="the dev extra installs tensorboard")
pytest.importorskip("wandb", reason="the dev extra installs wandb")

ROWS = [{"prompt": f"Q: {i}+1=", "answer": str(i + 1)} for i in range(8)]


def odd_length(prompts, completions, **columns):
    return [(float(len(c) % 2), "odd lengths win") for c in completions]


DEFAULTS = dict(
    num_samples_per_prompt=2,
    generation__max_new_tokens=3,
    optimization__prompts_per_step=2,
    run__max_steps=3,
    run__progress_bar=False,
    run__sample_log_steps=1,
)


def make_trainer(tmp_path, report_to, **overrides):
    return conftest.make_trainer(
        tmp_path / "run",
        reward=odd_length,
        rows=ROWS,
        eval_rows=ROWS[:2],
        defaults=DEFAULTS,
        run__report_to=report_to,
        **overrides,
    )


def wandb_records(path: Path):
    """The protobuf records of a ``.wandb`` file (LevelDB log format behind a 7-byte W&B header)."""
    from wandb.proto import wandb_internal_pb2

    data = path.read_bytes()
    assert data[:4] == b":W&B"
    pos, block, buf = 7, 32768, b""
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        if length == 0 and kind == 0:  # block padding
            pos += left
            continue
        chunk = data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        buf = chunk if kind in (1, 2) else buf + chunk
        if kind in (1, 4):  # FULL or LAST
            record = wandb_internal_pb2.Record()
            record.ParseFromString(buf)
            yield record


def _key(item) -> str:
    return item.key or "/".join(item.nested_key)


def test_tensorboard_and_wandb_offline_receive_metrics_config_and_samples(tmp_path, monkeypatch):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    trainer = make_trainer(tmp_path, ["jsonl", "tensorboard", "wandb"])
    trainer.train()
    run = tmp_path / "run"
    records = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    evals = [r for r in records if "eval/accuracy_greedy" in r]
    assert [r["step"] for r in steps] == [1, 2, 3] and [r["step"] for r in evals] == [0, 3]

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    for key in ("reward", "grad_norm", "self_distillation/distillation_loss", "health/no_success"):
        logged = [(e.step, e.value) for e in events.Scalars(key)]
        assert logged == [(r["step"], pytest.approx(r[key], rel=1e-6)) for r in steps], key
    assert [e.step for e in events.Scalars("eval/accuracy_greedy")] == [0, 3]
    text = "".join(
        t.tensor_proto.string_val[0].decode() for t in events.Tensors("samples/text_summary")
    )
    assert "| prompt | completion | reward | feedback | teacher_prompt |" in text
    assert "odd lengths win" in text or "Correct solution" in text

    (offline,) = (run / "wandb").glob("offline-run-*")
    (datafile,) = offline.glob("run-*.wandb")
    history, config = [], {}
    for record in wandb_records(datafile):
        kind = record.WhichOneof("record_type")
        if kind == "history":
            history.append({_key(i): json.loads(i.value_json) for i in record.history.item})
        elif kind == "config":
            config.update({_key(i): json.loads(i.value_json) for i in record.config.update})
    logged = {h["_step"]: h for h in history if "reward" in h}
    for r in steps:
        assert logged[r["step"]]["reward"] == pytest.approx(r["reward"])
        assert logged[r["step"]]["grad_norm"] == pytest.approx(r["grad_norm"])
    assert any("eval/accuracy_sampled" in h for h in history)
    assert config["self_distillation.alpha"] == 0.5 and config["run.report_to"] == str(
        ["jsonl", "tensorboard", "wandb"]
    )
    tables = sorted((offline / "files" / "media" / "table").glob("samples_*.table.json"))
    assert len(tables) == 3
    table = json.loads(tables[0].read_text())
    assert table["columns"] == [
        "step",
        "prompt",
        "completion",
        "reward",
        "feedback",
        "teacher_prompt",
    ]
    assert len(table["data"]) == 4  # 2 prompts x 2 samples


def test_unknown_or_missing_tracker_is_a_clear_error_before_any_work(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="unknown tracker 'tensorbord'; choose from jsonl"):
        SDPOConfig(run__report_to=["tensorbord"])
    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "mlflow" else real(name, *a)
    )
    with pytest.raises(MissingTrackerError, match=r"pip install 'sdpo\[mlflow\]'"):
        make_trainer(tmp_path, ["jsonl", "mlflow"])
    assert not (tmp_path / "run").exists()
    assert check_trackers(["jsonl", "tensorboard", "tensorboard"]) == ["tensorboard"]
