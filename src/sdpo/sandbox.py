"""Run untrusted programs (model-written code) so that they cannot hurt the machine or the run.

Every program runs in its own process, started through the best mechanism this platform offers,
chosen once by :func:`detect_isolation` and verified by a probe, not assumed:

- ``bwrap``: bubblewrap. A private root file system (read-only system directories and the Python
  installation without its installed packages; no home, no ``/tmp``; the only writable place is
  the working directory, in memory and size-capped), no network, own PID/IPC/UTS namespaces.
- ``namespaces``: ``unshare``. No network, own PID namespace (with its own ``/proc``); the host
  file system, guarded by file permissions only.
- ``rlimits``: resource limits and process-group killing only.

On every level: wall-clock, CPU-time, address-space, file-size and process-count limits; an
unprivileged user (as root, a random uid of its own per run, so the process limit counts this run
alone and every process of the run can be found and killed); a fresh working directory removed
afterwards; a scrubbed environment; no inherited file descriptors beyond 0-2; output read with a
size cap; everything the program started killed at the end (PID namespace teardown, process group,
and, as root, every process of the run's uid).

If the minimal guarantees (time, memory and process limits; killing everything) cannot be
verified, :func:`run_program` refuses with :class:`SandboxUnavailableError` unless
``SandboxConfig(allow_unsafe=True)``.

Usage::

    result = run_program("print(input()[::-1])", stdin="abc")  # -> result.stdout == "cba\\n"
    results = run_many(["print(1)", "print(2)"])  # parallel, in order
"""

from __future__ import annotations

import dataclasses
import glob
import json
import logging
import os
import secrets
import selectors
import shutil
import signal
import stat
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

logger = logging.getLogger(__name__)

Program = str | Sequence[str]  # Python source, or an argv to execute


class SandboxUnavailableError(RuntimeError):
    """The platform cannot enforce the sandbox's minimal guarantees (and unsafe mode is off)."""


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of one sandboxed run."""

    wall_time_s: float = 10.0  # wall-clock limit of the whole run; the program is killed after it
    cpu_time_s: float = 10.0  # CPU seconds per process (SIGXCPU, then SIGKILL one second later)
    memory_bytes: int = 512 << 20  # address-space limit per process
    file_size_bytes: int = 16 << 20  # largest file a process may write (SIGXFSZ beyond it)
    workdir_bytes: int = 64 << 20  # all files together; bubblewrap only (an in-memory directory)
    max_processes: int = 8  # processes and threads of the run, all together
    max_output_bytes: int = 1 << 20  # per stream; beyond it the program is stopped, output cut
    isolate_network: bool = True  # private network namespace (no interfaces but loopback)
    isolate_filesystem: bool = True  # use bubblewrap when it is installed and works
    python: str | None = None  # interpreter for Python sources; None = this one (or a system one)
    allow_unsafe: bool = False  # run even if the minimal guarantees cannot be met

    def __post_init__(self) -> None:
        for name in (
            "wall_time_s",
            "cpu_time_s",
            "memory_bytes",
            "file_size_bytes",
            "workdir_bytes",
        ):
            if not getattr(self, name) > 0:
                raise ValueError(f"SandboxConfig.{name} must be > 0, got {getattr(self, name)!r}.")
        if self.max_processes < 1 or self.max_output_bytes < 1:
            raise ValueError("SandboxConfig.max_processes and max_output_bytes must be >= 1.")


@dataclass
class ExecutionResult:
    """What one sandboxed run did.

    Attributes:
        stdout, stderr: decoded output (UTF-8, undecodable bytes replaced), each at most
            ``max_output_bytes`` bytes.
        returncode: exit status; ``None`` when the program was killed by a signal.
        timed_out: the wall-clock or CPU-time limit was hit.
        killed_by_signal: name of the signal that ended the program (``"SIGKILL"``), if any.
        output_truncated: a stream exceeded ``max_output_bytes``; the program was stopped.
        duration_s: wall-clock seconds from start to the end of clean-up.
        isolation: the isolation level in force (see :class:`Isolation`).
    """

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    killed_by_signal: str | None
    output_truncated: bool
    duration_s: float
    isolation: str

    @property
    def ok(self) -> bool:
        """Exited with status 0, within all limits."""
        return self.returncode == 0 and not (self.timed_out or self.output_truncated)


@dataclass(frozen=True)
class Isolation:
    """What :func:`detect_isolation` found to be in force, each property verified by a probe.

    ``level`` is ``bwrap``, ``namespaces``, ``rlimits`` or ``unsafe`` (minimal guarantees missing,
    allowed by ``allow_unsafe``). ``contained`` means a kill of "every process I may signal" from
    inside the sandbox reaches the sandbox's own processes only (a PID namespace or a uid of its own).
    """

    level: str
    filesystem: bool
    network: bool
    pid_namespace: bool
    unique_uid: bool
    process_limit: bool
    memory_limit: bool
    python: str
    notes: tuple[str, ...] = ()  # why stronger levels were not used

    @property
    def contained(self) -> bool:
        return self.pid_namespace or self.unique_uid

    def __str__(self) -> str:
        parts = [
            name
            for name, on in (
                ("filesystem", self.filesystem),
                ("network", self.network),
                ("pid-namespace", self.pid_namespace),
                ("own-uid", self.unique_uid),
                ("process-limit", self.process_limit),
                ("memory-limit", self.memory_limit),
            )
            if on
        ]
        return f"{self.level} ({', '.join(parts) or 'nothing verified'})"


# ----- the process started inside the sandbox -----------------------------------------------------

# Runs first in every sandboxed process: limits, then the uid drop, then (as PID 1 of a fresh
# namespace) a minimal init, then the program. Only trusted code runs before the drop.
_BOOT = r"""
import os, resource, sys
cpu, mem, fsize, nproc, uid, init = (int(v) for v in sys.argv[1:7])
R = resource
R.setrlimit(R.RLIMIT_CPU, (cpu, cpu + 1))
R.setrlimit(R.RLIMIT_AS, (mem, mem))
R.setrlimit(R.RLIMIT_FSIZE, (fsize, fsize))
R.setrlimit(R.RLIMIT_NPROC, (nproc, nproc))
R.setrlimit(R.RLIMIT_CORE, (0, 0))
R.setrlimit(R.RLIMIT_NOFILE, (256, 256))
if uid >= 0:
    os.setgroups([]); os.setgid(uid); os.setuid(uid)
    if (os.getuid(), os.geteuid(), os.getgid(), os.getegid()) != (uid,) * 4:
        os._exit(125)
if init and os.getpid() == 1:
    child = os.fork()
    if child:
        # PID 1 of the namespace: reap everything; leave (taking the namespace down) with the program
        while True:
            pid, status = os.wait()
            if pid == child:
                os._exit(status >> 8 if os.WIFEXITED(status) else 128 + os.WTERMSIG(status))
if sys.argv[7] == "exec":
    try:
        os.execvp(sys.argv[8], sys.argv[8:])
    except OSError as e:
        sys.stderr.write(f"sandbox: cannot execute {sys.argv[8]!r}: {e}\n")
        os._exit(127)
import builtins
with open("main.py", "rb") as f:
    code = compile(f.read(), "main.py", "exec")
del os, resource, R, cpu, mem, fsize, nproc, uid, init, f
sys.argv = ["main.py"]
g = {"__name__": "__main__", "__file__": "main.py", "__builtins__": builtins}
try:
    exec(code, g)
except SystemExit:
    raise
except BaseException as e:
    e.__traceback__ = e.__traceback__.tb_next  # hide this boot frame
    sys.excepthook(type(e), e, e.__traceback__)
    sys.exit(1)
"""

# Run by detect_isolation under a candidate launcher with small limits; prints what it could do.
_PROBE = r"""
import json, os, socket, time
forks = []
for _ in range(12):
    try:
        pid = os.fork()
    except OSError:
        break
    if pid == 0:
        time.sleep(10)
        os._exit(0)
    forks.append(pid)
for pid in forks:
    os.kill(pid, 9)
try:
    blob = bytearray(512 << 20)
    memory_limited = False
except MemoryError:
    memory_limited = True
try:
    interfaces = sorted(name for _, name in socket.if_nameindex())
except OSError:
    interfaces = None
print(json.dumps({"forks": len(forks), "memory_limited": memory_limited, "interfaces": interfaces,
                  "uid": os.getuid(), "host_file_visible": os.path.exists(HOST_FILE)}))
"""
_PROBE_CONFIG = SandboxConfig(
    wall_time_s=10.0, cpu_time_s=5.0, memory_bytes=256 << 20, max_processes=4
)

_UID_BASE, _UID_SPAN = 1_600_000_000, 400_000_000  # unlikely to belong to anyone else
_SANDBOX_DIR = "/sandbox"  # the working directory as seen inside bwrap
_PACKAGE_DIRS = (
    "{prefix}/lib/python3*/site-packages",
    "{prefix}/lib/python3*/dist-packages",
    "/usr/lib/python3*/site-packages",
    "/usr/lib/python3*/dist-packages",
    "/usr/local/lib/python3*/site-packages",
    "/usr/local/lib/python3*/dist-packages",
)
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf")


@dataclass(frozen=True)
class _Launch:
    """How runs are started: a launcher and the interpreter for Python sources."""

    launcher: str  # bwrap | unshare | plain
    python: str
    drop_uid: bool  # root: switch to a random uid of the run's own inside the sandbox
    network: bool  # request a private network namespace


# ----- isolation detection -----------------------------------------------------------------------

_detected: dict[tuple, tuple[Isolation, _Launch]] = {}
_detect_lock = threading.Lock()


def _find_tool(name: str) -> str | None:
    """Path of a helper binary (``bwrap``, ``unshare``); tests patch this to force fallbacks."""
    return shutil.which(name)


def _world_accessible(path: str) -> bool:
    """Whether every directory above ``path`` is searchable, and ``path`` executable, by anyone."""
    p = Path(path)
    try:
        if not p.stat().st_mode & stat.S_IXOTH:
            return False
        return all(d.stat().st_mode & stat.S_IXOTH for d in p.parents)
    except OSError:
        return False


def _python_candidates(config: SandboxConfig, needs_world_access: bool) -> list[str]:
    """Interpreters to try for Python sources, best first (all resolved to real paths)."""
    wanted = [config.python] if config.python else [sys.executable, "/usr/bin/python3"]
    out: list[str] = []
    for exe in wanted:
        found = shutil.which(exe) if exe and os.sep not in exe else exe
        if not found or not os.path.exists(found):
            continue
        real = os.path.realpath(found)
        # as root the program runs under another uid, which must be able to reach the interpreter
        if needs_world_access and not _world_accessible(real):
            continue
        if real not in out:
            out.append(real)
    return out


def _candidates(config: SandboxConfig) -> list[_Launch]:
    root = os.geteuid() == 0
    out: list[_Launch] = []
    if config.isolate_filesystem and _find_tool("bwrap"):
        for py in _python_candidates(config, needs_world_access=False):
            out.append(_Launch("bwrap", py, drop_uid=root, network=config.isolate_network))
    if _find_tool("unshare"):
        for py in _python_candidates(config, needs_world_access=root):
            out.append(_Launch("unshare", py, drop_uid=root, network=config.isolate_network))
    for py in _python_candidates(config, needs_world_access=root):
        out.append(_Launch("plain", py, drop_uid=root, network=False))
    return out


def _probe(launch: _Launch) -> tuple[Isolation | None, str]:
    """Run the probe under ``launch``; the verified isolation, or None and why it failed."""
    provisional = Isolation(
        "probe", False, False, launch.launcher != "plain", launch.drop_uid, False, False,
        launch.python,
    )  # fmt: skip
    try:
        with tempfile.NamedTemporaryFile(prefix="sdpo-probe-") as host_file:  # hidden by bwrap?
            os.chmod(host_file.name, 0o644)
            probe = _PROBE.replace("HOST_FILE", repr(host_file.name))
            result = _run(probe, b"", _PROBE_CONFIG, launch, provisional)
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as exc:
        return None, f"{launch.launcher}: the probe did not run ({exc})"
    if result.returncode != 0:
        return None, f"{launch.launcher}: the probe failed: {result.stderr.strip()[-300:]}"
    process_limit = report["forks"] < 12
    isolation = Isolation(
        level={"bwrap": "bwrap", "unshare": "namespaces", "plain": "rlimits"}[launch.launcher],
        filesystem=launch.launcher == "bwrap" and not report["host_file_visible"],
        network=report["interfaces"] == ["lo"],
        pid_namespace=launch.launcher != "plain",
        unique_uid=launch.drop_uid and report["uid"] != 0,
        process_limit=process_limit,
        memory_limit=report["memory_limited"],
        python=launch.python,
    )
    missing = [
        name
        for name, ok in (
            ("process limit", process_limit),
            ("memory limit", isolation.memory_limit),
            ("containment of all processes (PID namespace or own uid)", isolation.contained),
        )
        if not ok
    ]
    if missing:
        return None, f"{launch.launcher}: not in force: {', '.join(missing)}"
    return isolation, ""


def detect_isolation(config: SandboxConfig | None = None) -> Isolation:
    """The best isolation this platform verifiably offers for ``config`` (probed once, then cached).

    Raises:
        SandboxUnavailableError: no launcher meets the minimal guarantees and ``allow_unsafe`` is off.
    """
    return _resolve(config or SandboxConfig())[0]


def _resolve(config: SandboxConfig) -> tuple[Isolation, _Launch]:
    key = (config.isolate_network, config.isolate_filesystem, config.python, config.allow_unsafe)
    with _detect_lock:
        if key in _detected:
            return _detected[key]
        failures: list[str] = []
        chosen: tuple[Isolation, _Launch] | None = None
        for launch in _candidates(config):
            isolation, why = _probe(launch)
            if isolation is not None:
                chosen = (dataclasses.replace(isolation, notes=tuple(failures)), launch)
                break
            failures.append(why)
        if chosen is None:
            reasons = "; ".join(failures) or (
                "no Python interpreter that the sandbox's unprivileged user can run "
                "(set SandboxConfig.python to one outside a private home directory)"
            )
            if not config.allow_unsafe:
                raise SandboxUnavailableError(
                    "The sandbox cannot guarantee time, memory and process limits and the killing "
                    f"of every process on this platform ({reasons}). Install bubblewrap "
                    "(apt-get install bubblewrap) or allow user namespaces; or, knowing that "
                    "untrusted code then runs unconfined, pass SandboxConfig(allow_unsafe=True)."
                )
            py = (_python_candidates(config, False) or [sys.executable])[0]
            launch = _Launch("plain", py, drop_uid=False, network=False)
            isolation = Isolation("unsafe", False, False, False, False, False, False, py,
                                  tuple(failures))  # fmt: skip
            chosen = (isolation, launch)
            logger.warning("Sandbox: UNSAFE mode, untrusted code runs unconfined (%s).", reasons)
        else:
            logger.info("Sandbox isolation: %s, python %s", chosen[0], chosen[1].python)
            if config.isolate_network and not chosen[0].network:
                logger.warning(
                    "Sandbox: no private network namespace here; programs can reach the network."
                )
            if failures:
                logger.info("Sandbox: stronger levels unavailable: %s", "; ".join(failures))
        _detected[key] = chosen
        return chosen


# ----- running ----------------------------------------------------------------------------------


def run_program(
    program: Program, stdin: str | bytes = b"", config: SandboxConfig | None = None
) -> ExecutionResult:
    """Run ``program`` (Python source, or an argv list) in the sandbox and collect what it did.

    Args:
        program: Python source code (run as ``__main__`` from ``main.py`` in the working directory),
            or an argv to execute (the binary must be visible inside the sandbox).
        stdin: the program's standard input.
        config: limits and isolation; defaults to :class:`SandboxConfig`.

    Raises:
        SandboxUnavailableError: see :func:`detect_isolation`.
    """
    config = config or SandboxConfig()
    isolation, launch = _resolve(config)
    data = stdin.encode() if isinstance(stdin, str) else bytes(stdin)
    return _run(program, data, config, launch, isolation)


def run_many(
    programs: Sequence[Program],
    stdins: Sequence[str | bytes] | None = None,
    config: SandboxConfig | None = None,
    *,
    max_workers: int | None = None,
) -> list[ExecutionResult]:
    """Run many programs in parallel (at most ``max_workers``, default the CPU count); results in order."""
    programs = list(programs)
    stdins = [b""] * len(programs) if stdins is None else list(stdins)
    if len(stdins) != len(programs):
        raise ValueError(f"run_many: {len(programs)} programs but {len(stdins)} stdins.")
    config = config or SandboxConfig()
    _resolve(config)  # detect (or refuse) once, before any thread starts
    workers = max(1, min(max_workers or len(os.sched_getaffinity(0)), len(programs)))
    if workers == 1:
        return [run_program(p, s, config) for p, s in zip(programs, stdins, strict=True)]
    with ThreadPoolExecutor(workers, thread_name_prefix="sandbox") as pool:
        return list(
            pool.map(
                lambda ps: run_program(ps[0], ps[1], config), zip(programs, stdins, strict=True)
            )
        )


def _run(
    program: Program, stdin: bytes, config: SandboxConfig, launch: _Launch, isolation: Isolation
) -> ExecutionResult:
    start = time.monotonic()
    workdir = tempfile.mkdtemp(prefix="sdpo-sandbox-")
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if launch.drop_uid else -1
    proc: subprocess.Popen | None = None
    try:
        if uid >= 0:
            os.chown(workdir, uid, uid)
        if isinstance(program, str):
            main = Path(workdir, "main.py")
            main.write_text(program, encoding="utf-8")
            main.chmod(0o644)  # readable after the uid drop, whatever the umask
            tail = ["code"]
        else:
            tail = ["exec", *program]
        init = launch.launcher == "unshare"  # bwrap brings its own init
        nproc = config.max_processes + (1 if init else 0)
        boot = [
            launch.python, "-I", "-S", "-c", _BOOT,
            str(max(1, round(config.cpu_time_s))), str(config.memory_bytes),
            str(config.file_size_bytes), str(nproc), str(uid), str(int(init)), *tail,
        ]  # fmt: skip
        inside = _SANDBOX_DIR if launch.launcher == "bwrap" else workdir
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": inside,
            "TMPDIR": inside,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin)
            stdin_file.seek(0)
            proc = subprocess.Popen(
                _launcher_argv(launch, workdir, config) + boot,
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=env,
                close_fds=True,
                start_new_session=True,  # its own process group, killed as a whole at the end
            )
        deadline = start + config.wall_time_s
        out, err, timed_out, truncated = _collect(proc, deadline, config.max_output_bytes)
    finally:
        if proc is not None:
            # A launcher that exited by itself took its PID namespace down with it.
            ended = proc.poll() is not None and launch.launcher != "plain"
            _kill_everything(proc, -1 if ended else uid)
        shutil.rmtree(workdir, onerror=_force_remove)
    returncode, sig = _exit_status(proc.returncode, launch)
    timed_out = timed_out or sig == "SIGXCPU"  # the CPU-time limit
    return ExecutionResult(
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        returncode=returncode,
        timed_out=timed_out,
        killed_by_signal=sig,
        output_truncated=truncated,
        duration_s=time.monotonic() - start,
        isolation=str(isolation),
    )


def _launcher_argv(launch: _Launch, workdir: str, config: SandboxConfig) -> list[str]:
    if launch.launcher == "unshare":
        net = ["--net"] if launch.network else []
        user = [] if os.geteuid() == 0 else ["--user"]
        return ["unshare", *user, *net, "--pid", "--fork", "--kill-child", "--mount-proc", "--"]
    if launch.launcher != "bwrap":
        return []
    argv = ["bwrap"]
    for d in ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
        if os.path.islink(d):
            argv += ["--symlink", os.readlink(d), d]
        elif os.path.isdir(d):
            argv += ["--ro-bind", d, d]
    for name in _ETC_FILES:
        if os.path.exists(f"/etc/{name}"):
            argv += ["--ro-bind", f"/etc/{name}", f"/etc/{name}"]
    prefix = str(Path(launch.python).parent.parent)  # the interpreter's installation
    if not prefix.startswith("/usr/") and prefix not in ("/", "/usr"):
        parents = list(Path(prefix).parents)[::-1][1:]  # "/" excluded
        for parent in parents:  # bwrap would create them mode 0700: unreachable after the uid drop
            argv += ["--perms", "0755", "--dir", str(parent)]
        argv += ["--ro-bind", prefix, prefix]
    # Installed packages stay out of sight (sources run with -S do not need them), and with them
    # any data shipped inside a package, e.g. a task's hidden tests.
    for pattern in _PACKAGE_DIRS:
        for path in sorted(glob.glob(pattern.format(prefix=prefix))):
            argv += ["--perms", "0555", "--size", "4096", "--tmpfs", path]
    # The working directory lives in memory, size-capped: no number of files can fill the disk.
    argv += ["--perms", "01777", "--size", str(config.workdir_bytes), "--tmpfs", _SANDBOX_DIR]
    if os.path.exists(f"{workdir}/main.py"):
        argv += ["--ro-bind", f"{workdir}/main.py", f"{_SANDBOX_DIR}/main.py"]
    argv += ["--chdir", _SANDBOX_DIR]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if launch.network:
        argv.append("--unshare-net")
    if os.geteuid() != 0:
        argv += ["--unshare-user", "--disable-userns"]
    argv += ["--die-with-parent", "--new-session", "--"]
    return argv


def _collect(proc: subprocess.Popen, deadline: float, cap: int) -> tuple[bytes, bytes, bool, bool]:
    """Read stdout/stderr until both close, the deadline passes, or a stream exceeds ``cap``.

    Returns (stdout, stderr, timed_out, truncated).
    """
    out_fd, err_fd = proc.stdout.fileno(), proc.stderr.fileno()
    bufs = {out_fd: bytearray(), err_fd: bytearray()}
    timed_out = truncated = False
    exited_at: float | None = None
    with selectors.DefaultSelector() as sel:
        for fd in bufs:
            os.set_blocking(fd, False)
            sel.register(fd, selectors.EVENT_READ)
        while sel.get_map() and not truncated:
            now = time.monotonic()
            if now >= deadline:
                timed_out = True
                break
            if exited_at is None and proc.poll() is not None:
                exited_at = now
            if exited_at is not None and now - exited_at > 0.1:
                break  # a process it left behind holds the pipes open; it is killed next
            for key, _ in sel.select(timeout=min(deadline - now, 0.05)):
                try:
                    chunk = os.read(key.fd, 1 << 16)
                except BlockingIOError:
                    continue
                if not chunk:
                    sel.unregister(key.fd)
                    continue
                buf = bufs[key.fd]
                room = cap - len(buf)
                buf += chunk[:room]
                truncated = truncated or len(chunk) > room
    if not (timed_out or truncated):
        try:
            proc.wait(timeout=max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            timed_out = True
    proc.stdout.close()
    proc.stderr.close()
    return bytes(bufs[out_fd]), bytes(bufs[err_fd]), timed_out, truncated


def _kill_everything(proc: subprocess.Popen, uid: int) -> None:
    """Kill the run's process group (taking a PID namespace down with its launcher) and, when the
    run had a uid of its own, every process with that uid, until none is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if uid < 0:
        return
    for _ in range(1000):
        alive = _pids_of_uid(uid)
        if not alive:
            return
        for pid in alive:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        time.sleep(0.002)
    logger.error("Sandbox: processes of uid %d survived clean-up: %s", uid, alive)


def _pids_of_uid(uid: int) -> list[int]:
    """Live (non-zombie) processes whose real uid is ``uid``."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/status", "rb") as f:
                status = f.read(2048)
        except OSError:
            continue
        at = status.find(b"\nUid:\t") + 6
        if (
            at > 5
            and int(status[at : status.index(b"\t", at)]) == uid
            and b"State:\tZ" not in status
        ):
            pids.append(int(entry))
    return pids


def _exit_status(code: int | None, launch: _Launch) -> tuple[int | None, str | None]:
    """(returncode, signal name): launchers with a PID namespace report a signal as 128 + number."""
    if code is None:
        return None, None
    if code < 0:
        return None, signal.Signals(-code).name
    if launch.launcher in ("bwrap", "unshare") and 128 < code < 128 + 65:
        try:
            return None, signal.Signals(code - 128).name
        except ValueError:
            return code, None
    return code, None


def _force_remove(func, path, exc_info) -> None:  # noqa: ANN001 (shutil's callback signature)
    """rmtree helper: a program may leave directories without permissions; restore and retry."""
    try:
        os.chmod(os.path.dirname(path), 0o700)
        os.chmod(path, 0o700)
        func(path)
    except OSError:
        pass
