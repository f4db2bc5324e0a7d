"""The run log and the run directory's claim decide "rank 0 only" themselves."""

from __future__ import annotations

import json

from sdpo import SDPOConfig
from sdpo.run_dir import RunDirectory
from sdpo.run_log import RunLog


def test_only_the_main_process_writes_logs_and_claims(tmp_path):
    config = SDPOConfig(run__output_dir=str(tmp_path / "run"))
    for main in (False, True):
        run = RunDirectory(tmp_path / "run", main=main)
        log = RunLog(config, run)
        with run.held():
            assert run.claimed == main
            log.config_file()
            log.start()
            log.metrics(1, {"loss": 0.5, "kl": float("nan")})
            log.write_jsonl("samples.jsonl", {"step": 1})
            log.finish()
        assert not run.claimed
        written = sorted(p.name for p in (tmp_path / "run").glob("*")) if main else []
        if not main:
            assert not (tmp_path / "run").exists()
    assert written == [".lock", "config.yaml", "metrics.jsonl", "samples.jsonl"]
    record = json.loads((tmp_path / "run" / "metrics.jsonl").read_text())
    assert record == {"step": 1, "loss": 0.5, "kl": None}


def test_held_is_reentrant_and_recovers_an_interrupted_save(tmp_path):
    run_dir = tmp_path / "run"
    (run_dir / ".tmp-checkpoint-000003-42").mkdir(parents=True)
    run = RunDirectory(run_dir, overwrite=True)
    with run.held():
        assert not (run_dir / ".tmp-checkpoint-000003-42").exists()
        with run.held():  # the checkpointer's save inside train()
            assert run.claimed
        assert run.claimed
    assert not run.claimed and run.owned
