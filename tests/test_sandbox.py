"""The sandbox against hostile programs: each attack is contained, the host and this process are
unharmed, and nothing is left running. Destructive attacks (fork and memory bombs) run only where
the probe verified the limit that contains them; the fallback levels get the same checks."""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import uuid

import pytest

from sdpo import sandbox
from sdpo.sandbox import (
    ExecutionResult,
    SandboxConfig,
    SandboxUnavailableError,
    detect_isolation,
    run_many,
    run_program,
)

LEVELS = ["best", "no-bwrap", "no-namespaces"]


@pytest.fixture
def fresh_detection(monkeypatch):
    """Forget what was detected, so a test can change what the platform seems to offer."""
    monkeypatch.setattr(sandbox, "_detected", {})


def _at_level(monkeypatch, level: str, **limits) -> SandboxConfig:
    """A config that runs at ``level`` (skips if this machine cannot).

    ``no-bwrap`` hides bubblewrap from detection (as on a machine without it: the namespace
    level); ``no-namespaces`` hides unshare too and allows unsafe execution (the rlimits level).
    """
    monkeypatch.setattr(sandbox, "_detected", {})
    if level != "best":
        real = sandbox._find_tool
        hidden = {"bwrap"} if level == "no-bwrap" else {"bwrap", "unshare"}
        monkeypatch.setattr(
            sandbox, "_find_tool", lambda name: None if name in hidden else real(name)
        )
    config = SandboxConfig(allow_unsafe=level == "no-namespaces", **limits)
    try:
        isolation = detect_isolation(config)
    except SandboxUnavailableError as exc:
        pytest.skip(f"level {level} unavailable here: {exc}")
    if level == "no-bwrap" and isolation.level != "namespaces":
        pytest.skip("unshare is not usable here")
    return config


def _best() -> SandboxConfig:
    try:
        detect_isolation(SandboxConfig())
    except SandboxUnavailableError as exc:
        pytest.skip(str(exc))
    return SandboxConfig()


def _survivors(marker: str, wait_s: float = 2.0) -> list[str]:
    """Command lines of live processes that contain ``marker`` (waits a little for teardown)."""
    deadline = time.monotonic() + wait_s
    while True:
        found = []
        for pid in filter(str.isdigit, os.listdir("/proc")):
            try:
                with open(f"/proc/{pid}/cmdline", "rb") as f:
                    cmd = f.read().replace(b"\0", b" ").decode(errors="replace")
                with open(f"/proc/{pid}/stat") as f:
                    state = f.read().rsplit(")", 1)[1].split()[0]
            except OSError:
                continue
            if marker in cmd and state != "Z":
                found.append(cmd)
        if not found or time.monotonic() > deadline:
            return found
        time.sleep(0.05)


@pytest.fixture
def workdirs(monkeypatch):
    """Every working directory the sandbox creates during the test."""
    made: list[str] = []
    real = tempfile.mkdtemp

    def mkdtemp(*args, **kwargs):
        made.append(real(*args, **kwargs))
        return made[-1]

    monkeypatch.setattr(sandbox.tempfile, "mkdtemp", mkdtemp)
    return made


# ----- ordinary programs -------------------------------------------------------------------------


def test_runs_python_with_stdin_and_reports_isolation():
    result = run_program("print(input()[::-1])", "abc", _best())
    assert isinstance(result, ExecutionResult)
    assert (result.stdout, result.returncode, result.ok) == ("cba\n", 0, True)
    assert result.isolation == str(detect_isolation())
    assert not (result.timed_out or result.output_truncated or result.killed_by_signal)


def test_argv_program_and_exit_status():
    result = run_program(["/bin/sh", "-c", "echo out; echo err >&2; exit 3"], config=_best())
    assert (result.stdout, result.stderr, result.returncode) == ("out\n", "err\n", 3)


def test_uncaught_exception_gives_a_traceback_of_the_program_only():
    result = run_program("def f():\n    raise ValueError('boom')\nf()\n", config=_best())
    assert result.returncode == 1
    assert 'File "main.py", line 2, in f' in result.stderr and "ValueError: boom" in result.stderr
    assert "<string>" not in result.stderr  # the sandbox's own boot frame is hidden


def test_run_many_returns_results_in_order():
    programs = [f"import time\ntime.sleep({0.2 * (i % 3)})\nprint({i})" for i in range(6)]
    results = run_many(programs, config=_best())
    assert [r.stdout.strip() for r in results] == [str(i) for i in range(6)]
    with pytest.raises(ValueError, match="stdins"):
        run_many(["print(1)"], stdins=[], config=_best())


def test_fresh_working_directory_removed_afterwards(workdirs):
    config = _best()
    first = run_program(
        "open('left.txt', 'w').write('x')\nimport os\nprint(os.listdir('.'))", config=config
    )
    second = run_program("import os\nprint(os.listdir('.'))", config=config)
    assert "left.txt" in first.stdout and "left.txt" not in second.stdout
    assert len(workdirs) == 2 and not any(os.path.exists(d) for d in workdirs)


def test_only_standard_descriptors_are_inherited():
    fd = os.open(os.devnull, os.O_RDONLY)
    os.set_inheritable(fd, True)
    try:
        result = run_program(
            "import os\nprint(sorted(int(x) for x in os.listdir('/proc/self/fd')))", config=_best()
        )
    finally:
        os.close(fd)
    fds = eval(result.stdout)  # noqa: S307 (our own program's output)
    assert fds[:3] == [0, 1, 2] and len(fds) <= 4  # 4th: the directory listdir itself opened


# ----- hostile programs --------------------------------------------------------------------------


def test_infinite_loop_is_stopped_by_the_wall_clock():
    result = run_program("while True:\n    pass", config=SandboxConfig(wall_time_s=1.0))
    assert result.timed_out and not result.ok and result.duration_s < 5


def test_cpu_time_limit():
    config = SandboxConfig(wall_time_s=20.0, cpu_time_s=1.0)
    result = run_program("while True:\n    pass", config=config)
    assert result.timed_out and result.killed_by_signal == "SIGXCPU"


@pytest.mark.parametrize("level", LEVELS)
def test_fork_bomb_is_contained_and_leaves_nothing(monkeypatch, level):
    config = _at_level(monkeypatch, level)
    isolation = detect_isolation(config)
    if not (isolation.process_limit and isolation.contained):
        pytest.skip("the process limit is not verified here; not running a fork bomb")
    marker = f"forkbomb-{uuid.uuid4().hex}"
    bomb = f"# {marker}\nimport os\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        pass\n"
    config = dataclasses.replace(config, wall_time_s=1.5, max_processes=8)
    result = run_program([isolation.python, "-c", bomb], config=config)
    assert result.timed_out and not result.ok
    assert _survivors(marker) == []
    assert run_program("print('alive')", config=config).stdout == "alive\n"


def test_memory_bomb_hits_the_address_space_limit():
    config = SandboxConfig(memory_bytes=256 << 20)
    if not detect_isolation(_best()).memory_limit:
        pytest.skip("the memory limit is not verified here; not running a memory bomb")
    result = run_program(
        "chunks = []\nwhile True:\n    chunks.append(bytearray(16 << 20))", config=config
    )
    assert not result.ok and "MemoryError" in result.stderr


def test_multi_gigabyte_file_is_cut_at_the_file_size_limit(workdirs):
    program = (
        "block = b'0' * (1 << 20)\n"
        "with open('big.bin', 'wb') as f:\n"
        "    for _ in range(4096):\n"
        "        f.write(block)\n"
    )
    result = run_program(program, config=SandboxConfig(file_size_bytes=8 << 20))
    assert not result.ok
    assert result.killed_by_signal == "SIGXFSZ" or "File too large" in result.stderr
    assert workdirs and not any(os.path.exists(d) for d in workdirs)


def test_many_files_cannot_fill_the_disk():
    config = SandboxConfig(file_size_bytes=4 << 20, workdir_bytes=16 << 20)
    if not detect_isolation(config).filesystem:
        pytest.skip("no in-memory working directory without bubblewrap")
    program = (
        "block = b'0' * (4 << 20)\n"
        "for i in range(1000):\n"
        "    with open(f'f{i}', 'wb') as f:\n"
        "        f.write(block)\n"
    )
    result = run_program(program, config=config)
    assert not result.ok and "No space left on device" in result.stderr


@pytest.mark.parametrize("level", LEVELS)
def test_canary_outside_the_working_directory_survives(monkeypatch, tmp_path, level):
    config = _at_level(monkeypatch, level)
    os.chmod(tmp_path, 0o755)  # visible, like most of the host file system, but not writable
    canary = tmp_path / "canary.txt"
    canary.write_text("precious")
    program = f"""
import os, shutil
path = {str(canary)!r}
for attack in (lambda: os.remove(path), lambda: open(path, 'w').write('pwned'),
               lambda: os.chmod(path, 0o777), lambda: shutil.rmtree(os.path.dirname(path)),
               lambda: os.rename(path, path + '.x')):
    try:
        attack()
        print('succeeded')
    except OSError as e:
        print('blocked', type(e).__name__)
"""
    result = run_program(program, config=config)
    assert "succeeded" not in result.stdout and result.stdout.count("blocked") == 5
    assert canary.read_text() == "precious" and oct(canary.stat().st_mode)[-3:] == "644"


@pytest.mark.parametrize("level", LEVELS)
def test_parent_environment_secrets_are_invisible(monkeypatch, level):
    config = _at_level(monkeypatch, level)
    secret = f"secret-{uuid.uuid4().hex}"
    monkeypatch.setenv("SDPO_TEST_SECRET", secret)
    program = """
import os
print(dict(os.environ))
for pid in os.listdir('/proc'):  # other processes' environments too
    try:
        print(open(f'/proc/{pid}/environ', 'rb').read())
    except OSError:
        pass
"""
    result = run_program(program, config=config)
    assert result.returncode == 0 and "SDPO_TEST_SECRET" not in result.stdout
    assert secret not in result.stdout + result.stderr


def test_tcp_connection_to_a_local_listener_fails():
    config = _best()
    if not detect_isolation(config).network:
        pytest.skip("no private network namespace on this platform")
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        server.settimeout(0.5)
        port = server.getsockname()[1]
        program = f"""
import socket
s = socket.create_connection(('127.0.0.1', {port}), timeout=2)
s.sendall(b'exfiltrated')
print('connected')
"""
        result = run_program(program, config=config)
        with pytest.raises(socket.timeout):
            server.accept()
    assert "connected" not in result.stdout and result.returncode != 0
    assert "Error" in result.stderr  # ConnectionRefusedError / OSError: network unreachable


@pytest.mark.parametrize("level", LEVELS)
def test_killing_the_parent_process_leaves_this_process_alive(monkeypatch, level):
    config = _at_level(monkeypatch, level)
    if not detect_isolation(config).contained:
        pytest.skip("not contained; not letting a program signal processes here")
    program = f"""
import os, signal
for pid in (os.getppid(), {os.getpid()}, 1):
    try:
        os.kill(pid, signal.SIGKILL)
        print('sent', pid)
    except OSError as e:
        print('refused', pid, type(e).__name__)
"""
    result = run_program(program, config=config)
    assert f"sent {os.getpid()}" not in result.stdout
    assert run_program("print('still here')", config=config).stdout == "still here\n"


@pytest.mark.parametrize("level", LEVELS)
def test_daemonized_child_does_not_outlive_the_run(monkeypatch, level):
    config = _at_level(monkeypatch, level)
    marker = f"daemon-{uuid.uuid4().hex}"
    program = f"""
import os, sys
if os.fork() == 0:
    os.setsid()
    if os.fork() == 0:
        os.execv(sys.executable, [sys.executable, '-c', 'import time; time.sleep(60)  # {marker}'])
    os._exit(0)
print('parent done')
"""
    result = run_program(program, config=config)
    assert result.stdout == "parent done\n"
    assert _survivors(marker) == []


def test_hundred_megabytes_of_output_are_capped():
    config = SandboxConfig(max_output_bytes=1 << 20)
    result = run_program("import sys\nsys.stdout.write('x' * 10**8)", config=config)
    assert result.output_truncated and not result.ok
    assert len(result.stdout) == 1 << 20 and result.duration_s < 10


@pytest.mark.parametrize("limit", [None, 10**7])
def test_deep_recursion_fails_only_the_program(limit):
    raise_limit = f"import sys\nsys.setrecursionlimit({limit})\n" if limit else ""
    program = raise_limit + "def f(n):\n    return f(n + 1) + 1\nf(0)"
    result = run_program(program, config=SandboxConfig(wall_time_s=3.0))
    assert not result.ok
    if limit is None:
        assert "RecursionError" in result.stderr
    else:  # a stack overflow, the memory limit, or (3.11+ frames live on the heap) the time limit
        assert result.killed_by_signal or result.timed_out or "Error" in result.stderr
    assert run_program("print('fine')").stdout == "fine\n"


# ----- detection, refusal, unsafe mode -----------------------------------------------------------


def test_detection_is_logged_once(fresh_detection, caplog):
    with caplog.at_level(logging.INFO, logger="sdpo.sandbox"):
        first = detect_isolation()
        second = detect_isolation()
        run_program("pass")
    assert first is second
    assert sum("Sandbox isolation" in r.message for r in caplog.records) == 1


def test_refuses_when_no_guarantee_can_be_verified(fresh_detection, monkeypatch):
    monkeypatch.setattr(sandbox, "_probe", lambda launch: (None, f"{launch.launcher}: broken"))
    with pytest.raises(SandboxUnavailableError, match="allow_unsafe"):
        run_program("print(1)")
    result = run_program("print(1)", config=SandboxConfig(allow_unsafe=True))
    assert result.stdout == "1\n" and result.isolation.startswith("unsafe")


def test_config_validation():
    with pytest.raises(ValueError, match="wall_time_s"):
        SandboxConfig(wall_time_s=0)
    with pytest.raises(ValueError, match="max_processes"):
        SandboxConfig(max_processes=0)


# ----- issue 8: the sandbox without bubblewrap, memory held in files, privileges, limits ---------

SAFE_LEVELS = ["best", "no-bwrap"]  # the levels that run by default (no allow_unsafe)


@pytest.fixture
def host_dir():
    """A directory on the host that every user can reach (like most of the file system)."""
    path = tempfile.mkdtemp(prefix="sdpo-host-", dir="/tmp")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize("level", SAFE_LEVELS)
def test_host_files_are_out_of_reach_and_temporary_directories_private(
    monkeypatch, host_dir, level
):
    config = _at_level(monkeypatch, level)
    writable = os.path.join(host_dir, "world-writable.txt")  # file permissions alone do not help
    readable = os.path.join(host_dir, "world-readable.txt")
    for path, mode in ((writable, 0o666), (readable, 0o644)):
        with open(path, "w") as f:
            f.write("precious")
        os.chmod(path, mode)
    marker = f"sdpo-left-{uuid.uuid4().hex}"
    program = f"""
import os
for attack in (lambda: open({writable!r}, 'a').write('pwned'),
               lambda: print('read', open({readable!r}).read())):
    try:
        attack()
        print('succeeded')
    except OSError as e:
        print('blocked', type(e).__name__)
for d in ('/tmp', '/var/tmp', '/dev/shm', '.'):
    try:
        open(os.path.join(d, {marker!r}), 'w').write('left behind')
        print('wrote', d, sorted(os.listdir(d)))
    except OSError as e:
        print('cannot write', d, type(e).__name__)
"""
    result = run_program(program, config=config)
    assert result.returncode == 0, result.stderr
    assert "succeeded" not in result.stdout and "precious" not in result.stdout
    assert result.stdout.count("blocked") == 2
    for d in ("/tmp", "/var/tmp", "/dev/shm"):  # writable inside, private, and empty at start
        assert f"wrote {d} [{marker!r}]" in result.stdout, result.stdout
        assert not os.path.exists(os.path.join(d, marker))
    assert open(writable).read() == "precious"


def _setuid_id(host_dir: str) -> str:
    """A setuid-root copy of ``id`` (as a setuid binary, it would print euid 0)."""
    path = os.path.join(host_dir, "id-setuid")
    shutil.copy("/usr/bin/id", path)
    os.chown(path, 0, 0)
    os.chmod(path, 0o4755)
    return path


@pytest.mark.parametrize("level", [*SAFE_LEVELS, "no-namespaces"])
def test_no_new_privs_at_every_level(monkeypatch, host_dir, level):
    config = _at_level(monkeypatch, level)
    result = run_program("print(open('/proc/self/status').read())", config=config)
    assert "NoNewPrivs:\t1" in result.stdout
    if os.geteuid() == 0 and os.path.exists("/usr/bin/id"):
        # where the host file system is visible, a setuid-root binary must not give root back
        setuid = _setuid_id(host_dir)
        program = f"import subprocess\nprint(subprocess.run([{setuid!r}, '-u'], capture_output=True, text=True).stdout)"
        result = run_program(program, config=config)
        assert result.stdout.strip() != "0", result


@pytest.mark.parametrize("level", ["bwrap", "no-bwrap"])
def test_non_root_user_cannot_touch_its_own_files(level):
    """A non-root trainer: the program runs as that user's uid, yet its files stay out of reach."""
    python = "/usr/bin/python3"
    if os.geteuid() != 0 or not shutil.which("setpriv") or not os.path.exists(python):
        pytest.skip("needs root (to become nobody with setpriv) and /usr/bin/python3")
    if level == "bwrap" and not sandbox._find_tool("bwrap"):
        pytest.skip("bubblewrap is not installed")
    home = tempfile.mkdtemp(prefix="sdpo-nobody-", dir="/tmp")
    try:
        os.chmod(home, 0o755)
        shutil.copy(sandbox.__file__, os.path.join(home, "sandbox_under_test.py"))
        programs = os.path.join(os.path.dirname(sandbox.__file__), "sandbox_programs")
        shutil.copytree(programs, os.path.join(home, "sandbox_programs"))
        own = os.path.join(home, "checkpoint.txt")
        with open(own, "w") as f:
            f.write("precious")
        os.chmod(own, 0o600)
        for path in (home, own):
            os.chown(path, 65534, 65534)
        marker = f"sdpo-left-{uuid.uuid4().hex}"
        script = f"""
import importlib.util, json, shutil, sys
spec = importlib.util.spec_from_file_location("sandbox_under_test", "sandbox_under_test.py")
sandbox = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = sandbox
spec.loader.exec_module(sandbox)
if {level!r} == "no-bwrap":  # bubblewrap hidden from detection
    sandbox._find_tool = lambda name: None if name == "bwrap" else shutil.which(name)
try:
    level = sandbox.detect_isolation(sandbox.SandboxConfig()).level
except sandbox.SandboxUnavailableError as exc:
    print(json.dumps({{"refused": str(exc)}}))
    raise SystemExit
program = '''
import os
try:
    open({own!r}, 'a').write('pwned')
    print('appended')
except OSError as e:
    print('blocked', type(e).__name__)
open('/tmp/{marker}', 'w').write('x')
print(open('/proc/self/status').read())
'''
result = sandbox.run_program(program)
print(json.dumps({{"level": level, "stdout": result.stdout, "stderr": result.stderr}}))
"""
        proc = subprocess.run(
            [
                "setpriv",
                "--reuid=65534",
                "--regid=65534",
                "--clear-groups",
                python,
                "-I",
                "-c",
                script,
            ],
            cwd=home,
            capture_output=True,
            text=True,
            timeout=120,
            env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LANG": "C.UTF-8"},
        )
        assert proc.returncode == 0, proc.stderr
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if "refused" in report:  # no user namespaces for nobody: refusing is the safe outcome
            assert "apt-get install bubblewrap" in report["refused"]
            return
        assert report["level"] == ("bwrap" if level == "bwrap" else "namespaces"), report
        if level == "no-bwrap":
            assert "weaker than bubblewrap" in proc.stderr  # the WARNING reaches stderr
        assert "appended" not in report["stdout"] and "blocked" in report["stdout"], report
        assert "NoNewPrivs:\t1" in report["stdout"]
        assert open(own).read() == "precious"
        assert not os.path.exists(f"/tmp/{marker}")
    finally:
        shutil.rmtree(home, ignore_errors=True)


MEMFD_HOG = """
import os
held, fds = 0, []
try:
    while held < {target}:
        fd = os.memfd_create('hog')
        os.write(fd, b'x' * {chunk})
        fds.append(fd)
        held += {chunk}
except OSError as e:
    print('stopped', type(e).__name__)
print('held', held >> 20, 'MiB')
"""


@pytest.mark.parametrize("level", [*SAFE_LEVELS, "no-namespaces"])
def test_memory_held_in_memfd_files_beyond_the_limit_is_killed(monkeypatch, level):
    config = _at_level(monkeypatch, level, memory_bytes=96 << 20, wall_time_s=20.0)
    if not detect_isolation(config).memory_cgroup:
        pytest.skip("no memory cgroup can be created here (see the next test for the rlimit bound)")
    # 1 MiB at a time, in files the address-space limit does not count
    result = run_program(MEMFD_HOG.format(target=384 << 20, chunk=1 << 20), config=config)
    assert "held 384 MiB" not in result.stdout
    assert result.killed_by_signal == "SIGKILL" and not result.ok, result
    assert result.memory_exceeded


@pytest.mark.parametrize("level", SAFE_LEVELS)
def test_without_a_cgroup_file_limits_bound_memfd_memory(monkeypatch, level):
    config = _at_level(monkeypatch, level, memory_bytes=64 << 20, wall_time_s=20.0)
    monkeypatch.setattr(sandbox, "_cgroup_base", [None], raising=False)  # as without cgroups
    # a program that keeps at most 3x the limit (so that the test itself stays small)
    result = run_program(MEMFD_HOG.format(target=192 << 20, chunk=1 << 20), config=config)
    held = int(result.stdout.split("held ")[1].split()[0]) if "held " in result.stdout else 0
    assert held <= 64 + 8, result  # processes x open files x file size <= memory_bytes


def test_sigxcpu_ignored_is_still_a_timeout():
    _best()
    config = SandboxConfig(wall_time_s=60.0, cpu_time_s=1.0)
    program = "import signal\nsignal.signal(signal.SIGXCPU, signal.SIG_IGN)\nwhile True:\n    pass"
    result = run_program(program, config=config)
    assert result.timed_out and not result.ok, result


def test_infinite_cpu_time_means_no_cpu_limit():
    result = run_program("print(sum(range(10**6)))", config=SandboxConfig(cpu_time_s=float("inf")))
    assert result.ok and result.stdout == f"{sum(range(10**6))}\n"
    for name in ("wall_time_s", "memory_bytes"):
        with pytest.raises(ValueError, match=name):
            SandboxConfig(**{name: float("inf")})


@pytest.mark.parametrize("level", SAFE_LEVELS)
def test_a_program_that_stops_its_supervisor_is_resumed(monkeypatch, level):
    config = _at_level(monkeypatch, level, wall_time_s=30.0)
    program = "import os, signal, time\nos.kill(os.getppid(), signal.SIGSTOP)\nos.kill(os.getpid(), signal.SIGSTOP)\nprint('resumed')"
    result = run_program(program, config=config)
    assert result.stdout == "resumed\n" and not result.timed_out, result


def test_weaker_isolation_is_a_warning_on_stderr():
    """What `sdpo train` prints (it configures no logging): the WARNING, without bubblewrap."""
    script = (
        "import importlib.util, sys\n"
        f"spec = importlib.util.spec_from_file_location('sb', {sandbox.__file__!r})\n"
        "sb = importlib.util.module_from_spec(spec); sys.modules['sb'] = sb\n"
        "spec.loader.exec_module(sb)\n"
        "print(sb.run_program('print(1)').stdout, end='')\n"
    )
    env = {**os.environ, "SDPO_SANDBOX_ISOLATION": "namespaces"}
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120
    )
    if "SandboxUnavailableError" in proc.stderr:
        pytest.skip("no namespace level here")
    assert proc.stdout == "1\n", proc.stderr
    assert "weaker than bubblewrap" in proc.stderr and "apt-get install bubblewrap" in proc.stderr


def test_without_any_namespaces_it_refuses_unless_unsafe_is_allowed(monkeypatch, caplog):
    monkeypatch.setattr(sandbox, "_detected", {})
    monkeypatch.setattr(sandbox, "_find_tool", lambda name: None)
    monkeypatch.delenv("SDPO_SANDBOX_ALLOW_UNSAFE", raising=False)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        run_program("print(1)")
    with caplog.at_level(logging.WARNING, logger="sdpo.sandbox"):
        result = run_program("print(1)", config=SandboxConfig(allow_unsafe=True))
    assert result.stdout == "1\n" and result.isolation.startswith(("rlimits", "unsafe"))
    assert any(
        "weaker than bubblewrap" in r.message or "UNSAFE" in r.message for r in caplog.records
    )
