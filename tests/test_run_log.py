"""The run log and the run directory's claim decide "rank 0 only" themselves."""

from __future__ import annotations

import json
import sys

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


def test_console_messages_and_progress_only_on_the_main_process(tmp_path, capsys):
    config = SDPOConfig(run__output_dir=str(tmp_path / "run"), run__max_steps=3)
    for main in (False, True):
        log = RunLog(config, RunDirectory(tmp_path / "run", main=main))
        with log.step_bar(initial=1) as bar:
            assert (bar is not None) == main
            assert log.bar is bar
            log.say("sdpo: warning at step 2: something")
            if bar is not None:
                bar.update(1)
        assert log.bar is None  # closed on the way out: messages go straight to stderr again
        log.say("done", sys.stdout)
        assert (log.progress(10, "eval", unit="completions") is None) == (not main)
        out, err = capsys.readouterr()
        if not main:
            assert out == err == ""
        else:
            assert out == "done\n"
            assert "sdpo: warning at step 2: something" in err
            assert "sdpo: 2/3 steps" in err  # the plain-line display's closing line (not a TTY)


def test_no_progress_display_when_progress_bar_is_off(tmp_path, capsys):
    config = SDPOConfig(run__output_dir=str(tmp_path / "run"), run__progress_bar=False)
    log = RunLog(config, RunDirectory(tmp_path / "run"))
    with log.step_bar(initial=0) as bar:
        assert bar is None
        log.say("hello")
    assert capsys.readouterr().err == "hello\n"
