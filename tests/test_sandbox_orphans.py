"""A trainer killed with SIGKILL leaves no sandboxed program behind, at every isolation level, and
the next start removes what it could not (issue 23, M1)."""

from __future__ import annotations

import glob
import os
import signal
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from sdpo import sandbox

SRC = str(Path(__file__).resolve().parents[1] / "src")

# The "trainer": runs a program that starts a daemonized grandchild and then sleeps, both for
# minutes; it records the working directory the sandbox made for it.
TRAINER = textwrap.dedent(
    """
    import sys
    from sdpo import sandbox
    marker, record = sys.argv[1], sys.argv[2]
    real = sandbox.tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        path = real(*args, **kwargs)
        with open(record, "a") as f:
            f.write(path + "\\n")
        return path

    sandbox.tempfile.mkdtemp = mkdtemp
    program = f'''
    import os, sys
    sleeper = [sys.executable, "-c", "import time; time.sleep(300)  # {marker}"]
    if os.fork() == 0:
        os.setsid()
        os.execv(sys.executable, sleeper)
    os.execv(sys.executable, sleeper)
    '''
    config = sandbox.SandboxConfig(wall_time_s=600, cpu_time_s=float("inf"))
    sandbox.run_program(program, config=config)
    """
)

LEVELS = {
    "bwrap": {"SDPO_SANDBOX_ISOLATION": "bwrap"},
    "namespaces": {"SDPO_SANDBOX_ISOLATION": "namespaces"},
    "rlimits": {"SDPO_SANDBOX_ISOLATION": "rlimits", "SDPO_SANDBOX_ALLOW_UNSAFE": "1"},
}


def _marked(marker: str) -> list[int]:
    found = []
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            with open(f"/proc/{pid}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if marker.encode() in cmd and state != "Z":
            found.append(int(pid))
    return found


def _env(level: str) -> dict[str, str]:
    return {**os.environ, **LEVELS[level], "PYTHONPATH": SRC, "HF_HUB_OFFLINE": "1"}


def _level_available(level: str) -> None:
    code = "from sdpo import sandbox; print(sandbox.detect_isolation().level)"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(level), capture_output=True, text=True
    )
    want = {"bwrap": "bwrap", "namespaces": "namespaces", "rlimits": "rlimits"}[level]
    if proc.returncode != 0 or proc.stdout.strip() != want:
        pytest.skip(f"level {level} unavailable here: {proc.stderr.strip()[-300:]}")


@pytest.mark.slow  # ~50 s per level on a loaded 2-core machine (detection probes, three launches)
@pytest.mark.parametrize("level", list(LEVELS))
def test_sigkilled_trainer_leaves_no_program_and_the_next_start_cleans_up(tmp_path, level):
    _level_available(level)
    marker, record = f"orphan-{uuid.uuid4().hex}", tmp_path / "workdirs"
    script = tmp_path / "trainer.py"
    script.write_text(TRAINER)
    trainer = subprocess.Popen(
        [sys.executable, str(script), marker, str(record)], env=_env(level), start_new_session=True
    )
    try:
        deadline = time.monotonic() + 60
        while len(_marked(marker)) < 2:  # the program and its daemonized child
            assert trainer.poll() is None, "the trainer ended early"
            assert time.monotonic() < deadline, "the sandboxed program did not start"
            time.sleep(0.05)
        trainer.send_signal(signal.SIGKILL)
        trainer.wait()
        deadline = time.monotonic() + 5
        while _marked(marker) and time.monotonic() < deadline:
            time.sleep(0.05)
        survivors = _marked(marker)
    finally:
        for pid in _marked(marker):  # never leave them running, whatever the result
            os.kill(pid, signal.SIGKILL)
    assert survivors == [], f"{len(survivors)} sandboxed processes outlived the SIGKILLed trainer"

    # The dead trainer could not remove its working directory (or cgroup); the next start does.
    workdir = record.read_text().split()[-1]  # the last: detection probes ran before it
    assert os.path.isdir(workdir)
    code = "from sdpo import sandbox; print(sandbox.run_program('print(1)').stdout, end='')"
    proc = subprocess.run(
        [sys.executable, "-c", code], env=_env(level), capture_output=True, text=True, timeout=60
    )
    assert proc.stdout == "1\n", proc.stderr[-2000:]
    assert not os.path.exists(workdir)
    base = sandbox._detect_cgroups()
    if base is not None:
        for d in base.dirs:
            assert glob.glob(f"{d}/sdpo-sandbox-{trainer.pid}-*") == []


# ----- clear first errors (L items) ----------------------------------------------------------------


def test_an_absurd_memory_limit_is_refused_when_configured():
    with pytest.raises(ValueError, match=r"SandboxConfig.memory_bytes must be at most 2\*\*62"):
        sandbox.SandboxConfig(memory_bytes=2**70)


def test_a_tests_column_that_is_not_json_is_named_with_its_row():
    from sdpo.environments.code import CodeExecutionRewardModel

    reward = CodeExecutionRewardModel()
    with pytest.raises(ValueError, match=r"Row 0: the tests column is a string but not JSON"):
        reward(["p"], ["print(1)"], tests=["not json ["])
