"""Run untrusted programs (model-written code) so that they cannot hurt the machine or the run.

Every program runs in its own process, started through the best mechanism this platform offers,
chosen once by :func:`detect_isolation` and verified by a probe, not assumed:

- ``bwrap``: bubblewrap. A private root file system (read-only system directories and the Python
  installation without its installed packages; no home, no project, no data), no network, own
  PID/IPC/UTS namespaces.
- ``namespaces``: the same file-system view built by this module with ``unshare`` (a private mount
  namespace: read-only system directories, nothing else of the host), no network, own
  PID/IPC/UTS namespaces. Used when bubblewrap is missing; a WARNING says so.
- ``rlimits``: resource limits, a uid of its own (as root) and process-group killing only; the host
  file system is visible. Only with ``allow_unsafe=True`` (a WARNING says so).

On every level: wall-clock, CPU-time, address-space, file-size, open-file and process-count limits;
``no_new_privs`` (setuid binaries gain nothing); a memory cgroup (``memory.max``/``pids.max``, so
memory held in memfd or tmpfs files counts too) where the platform lets this process create one,
otherwise much lower open-file and file-size limits that bound such memory; an unprivileged user
(as root, a random uid of its own per run); private, size-capped ``/tmp``, ``/var/tmp``,
``/dev/shm`` and working directory (all levels but ``rlimits``); a scrubbed environment; no
inherited file descriptors beyond 0-2; output read with a size cap; a supervisor that resumes a
stopped program and reports a CPU-limit kill as such; everything the program started killed at
the end (PID namespace teardown, cgroup, process group, and, as root, every process of the run's
uid).

If the guarantees of ``bwrap`` or ``namespaces`` (file system, time, memory and process limits;
killing everything) cannot be verified, :func:`run_program` refuses with
:class:`SandboxUnavailableError` unless ``SandboxConfig(allow_unsafe=True)``. The docs page
(docs/sandbox.md) lists what each level guarantees and what it does not.

One file (over ~600 lines) on purpose: detection, the launchers, cgroups and cleanup share one
threat model and its private helpers, and the order of what runs before the uid drop is easiest
to audit in one place; the programs that run inside the sandbox are files in
``sdpo/sandbox_programs/``.

Usage::

    result = run_program("print(input()[::-1])", stdin="abc")  # -> result.stdout == "cba\\n"
    results = run_many(["print(1)", "print(2)"])  # parallel, in order
"""

from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import logging
import math
import os
import re
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


ISOLATION_LEVELS = ("auto", "bwrap", "namespaces", "rlimits")
ENV_ISOLATION = "SDPO_SANDBOX_ISOLATION"  # overrides isolation="auto": bwrap | namespaces | rlimits
ENV_ALLOW_UNSAFE = "SDPO_SANDBOX_ALLOW_UNSAFE"  # "1": as allow_unsafe=True


_MAX_BYTES = 1 << 62


@dataclass(frozen=True)
class SandboxConfig:
    """Limits and isolation of one sandboxed run."""

    wall_time_s: float = 10.0  # wall-clock limit of the whole run; the program is killed after it
    cpu_time_s: float = 10.0  # CPU seconds per process (SIGXCPU, then SIGKILL); inf: no CPU limit
    memory_bytes: int = 512 << 20  # address space per process; and, where a memory cgroup is
    # available, all memory of the run together (memfd and tmpfs files included), plus 32 MiB
    file_size_bytes: int = 16 << 20  # largest file a process may write (SIGXFSZ beyond it)
    workdir_bytes: int = 64 << 20  # the writable places (working dir, /tmp, /var/tmp, /dev/shm)
    max_processes: int = 8  # processes and threads of the run, all together
    max_output_bytes: int = 1 << 20  # per stream; beyond it the program is stopped, output cut
    isolate_network: bool = True  # private network namespace (no interfaces but loopback)
    isolate_filesystem: bool = True  # False: skip bubblewrap (the namespace level still isolates)
    python: str | None = None  # interpreter for Python sources; None = this one (or a system one)
    allow_unsafe: bool = False  # allow the rlimits level (host file system visible) or none at all
    isolation: str = "auto"  # auto (bwrap, else namespaces) | bwrap | namespaces | rlimits

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
        for name in ("wall_time_s", "memory_bytes", "file_size_bytes", "workdir_bytes"):
            if getattr(self, name) == float("inf"):
                raise ValueError(
                    f"SandboxConfig.{name} must be finite (only cpu_time_s may be inf, "
                    "meaning no CPU-time limit; the wall clock still applies)."
                )
        for name in ("memory_bytes", "file_size_bytes", "workdir_bytes"):
            if getattr(self, name) > _MAX_BYTES:  # beyond what setrlimit and tmpfs accept
                raise ValueError(
                    f"SandboxConfig.{name} must be at most 2**62 bytes, got {getattr(self, name)!r}."
                )
        if self.max_processes < 1 or self.max_output_bytes < 1:
            raise ValueError("SandboxConfig.max_processes and max_output_bytes must be >= 1.")
        if self.isolation not in ISOLATION_LEVELS:
            raise ValueError(
                f"SandboxConfig.isolation must be one of {', '.join(ISOLATION_LEVELS)}; "
                f"got {self.isolation!r}."
            )


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
        memory_exceeded: the run's memory cgroup hit its limit and the kernel killed a process
            (then ``killed_by_signal`` is ``"SIGKILL"``).
    """

    stdout: str
    stderr: str
    returncode: int | None
    timed_out: bool
    killed_by_signal: str | None
    output_truncated: bool
    duration_s: float
    isolation: str
    memory_exceeded: bool = False

    @property
    def ok(self) -> bool:
        """Exited with status 0, within all limits."""
        return self.returncode == 0 and not (self.timed_out or self.output_truncated)


@dataclass(frozen=True)
class Isolation:
    """What :func:`detect_isolation` found to be in force, each property verified by a probe.

    ``level`` is ``bwrap``, ``namespaces``, ``rlimits`` (host file system visible; only with
    ``allow_unsafe``) or ``unsafe`` (minimal guarantees missing, allowed by ``allow_unsafe``). ``contained`` means a kill of "every process I may signal" from
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
    no_new_privs: bool = False  # setuid binaries run without their privileges
    memory_cgroup: bool = False  # a cgroup per run limits the memory of all its processes

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
                ("memory-cgroup", self.memory_cgroup),
                ("no-new-privs", self.no_new_privs),
            )
            if on
        ]
        return f"{self.level} ({', '.join(parts) or 'nothing verified'})"


def sandbox_program(name: str) -> str:
    """The source of a program that runs inside the sandbox: ``sandbox_programs/<name>`` next to
    this file, shipped as package data (no ``__init__``: never imported, only run with
    ``python -c``). Found from ``__file__``, so this module also works copied with that folder."""
    return (Path(__file__).parent / "sandbox_programs" / name).read_text(encoding="utf-8")


# ----- the process started inside the sandbox -----------------------------------------------------

# Runs first in every sandboxed process, as the launcher's (possibly namespaced) root: the private
# file system (namespaces level), limits, the uid drop (or, in a user namespace, dropping every
# capability), no_new_privs, then a supervisor (PID 1 of a fresh namespace: also the reaper) that
# forks the program. Only trusted code runs before the drop. Argument 1 is a JSON spec.
_BOOT = sandbox_program("boot.py")

# Run by detect_isolation under a candidate launcher with small limits; prints what it could do.
_PROBE = sandbox_program("probe.py")  # HOST_FILES: replaced by the paths to look for
_PROBE_CONFIG = SandboxConfig(
    wall_time_s=10.0, cpu_time_s=5.0, memory_bytes=256 << 20, max_processes=4
)

_UID_BASE, _UID_SPAN = 1_600_000_000, 400_000_000  # unlikely to belong to anyone else
_SANDBOX_DIR = "/sandbox"  # the working directory as seen inside the sandbox (bwrap, namespaces)
_PACKAGE_DIRS = (
    "{prefix}/lib/python3*/site-packages",
    "{prefix}/lib/python3*/dist-packages",
    "/usr/lib/python3*/site-packages",
    "/usr/lib/python3*/dist-packages",
    "/usr/local/lib/python3*/site-packages",
    "/usr/local/lib/python3*/dist-packages",
)
_ETC_FILES = ("ld.so.cache", "ld.so.conf", "ld.so.conf.d", "localtime", "nsswitch.conf")
_SYSTEM_DIRS = ("/usr", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
_CGROUP_HEADROOM = 32 << 20  # the launcher's and the supervisor's own memory, on top of the limit
_NOFILE = 256  # open files per process, where a memory cgroup bounds what they can hold
_NOFILE_WITHOUT_CGROUP = 32  # otherwise: memfd/tmpfs memory <= processes x this x file size


@dataclass(frozen=True)
class _Launch:
    """How runs are started: a launcher and the interpreter for Python sources."""

    launcher: str  # bwrap | unshare | plain
    python: str
    drop_uid: bool  # root: switch to a random uid of the run's own inside the sandbox
    network: bool  # request a private network namespace


# ----- the file system a program sees ------------------------------------------------------------


@dataclass(frozen=True)
class _View:
    """The host paths visible (read-only) inside ``bwrap`` and ``namespaces``; the rest is absent.

    Installed packages stay out of sight (sources run with ``-S`` do not need them), and with them
    any data shipped inside a package, e.g. a task's hidden tests.
    """

    symlinks: tuple[tuple[str, str], ...]  # (target, link): /bin -> usr/bin on merged-/usr systems
    dirs: tuple[str, ...]  # created (mode 0755) so that binds below them stay reachable
    binds: tuple[str, ...]  # read-only
    hide: tuple[str, ...]  # covered by an empty read-only directory


def _view(python: str) -> _View:
    symlinks, dirs, binds = [], [], []
    for d in _SYSTEM_DIRS:
        if os.path.islink(d):
            symlinks.append((os.readlink(d), d))
        elif os.path.isdir(d):
            binds.append(d)
    binds += [f"/etc/{name}" for name in _ETC_FILES if os.path.exists(f"/etc/{name}")]
    prefix = str(Path(python).parent.parent)  # the interpreter's installation
    if not prefix.startswith("/usr/") and prefix not in ("/", "/usr"):
        dirs += [str(p) for p in list(Path(prefix).parents)[::-1][1:]]  # "/" excluded
        binds.append(prefix)
    hide = [
        path
        for pattern in _PACKAGE_DIRS
        for path in sorted(glob.glob(pattern.format(prefix=prefix)))
    ]
    return _View(tuple(symlinks), tuple(dirs), tuple(binds), tuple(dict.fromkeys(hide)))


# ----- memory cgroups ----------------------------------------------------------------------------


@dataclass(frozen=True)
class _CgroupBase:
    """Where per-run cgroups are created: cgroup v2 (one directory) or v1 (memory, pids)."""

    version: int
    dirs: tuple[str, ...]


_cgroup_base: list[_CgroupBase | None] = []  # detected once


def _mounts() -> list[tuple[str, str, str, set[str]]]:
    """(root, mount point, fs type, super options) of every mount of this process."""
    out = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            fields, rest = left.split(), right.split()
            if len(fields) >= 5 and len(rest) >= 3:
                out.append((fields[3], fields[4], rest[0], set(rest[2].split(","))))
    return out


def _cgroup_candidates() -> list[_CgroupBase]:
    """Writable places for per-run cgroups with memory and pids controllers, best first."""
    with open("/proc/self/cgroup") as f:
        own = [line.rstrip("\n").split(":", 2) for line in f]
    mounts = _mounts()

    def host_dir(fstype: str, controller: str | None, path: str) -> str | None:
        for root, point, kind, opts in mounts:
            if kind == fstype and (controller is None or controller in opts):
                if path == root or path.startswith(root.rstrip("/") + "/"):
                    return point.rstrip("/") + "/" + path[len(root) :].lstrip("/")
        return None

    found = []
    v2 = next((p for h, c, p in own if h == "0" and c == ""), None)
    mine = host_dir("cgroup2", None, v2) if v2 is not None else None
    if mine:
        # Processes may not live in an inner cgroup that has controllers for children ("no
        # internal processes"): next to this process's own cgroup, or below the root.
        parent = mine if v2 == "/" else os.path.dirname(mine.rstrip("/"))
        try:
            with open(f"{parent}/cgroup.subtree_control") as f:
                enabled = set(f.read().split())
            if v2 == "/" and not {"memory", "pids"} <= enabled:
                with open(f"{parent}/cgroup.subtree_control", "w") as f:
                    f.write("+memory +pids")
                enabled = {"memory", "pids"}
            if {"memory", "pids"} <= enabled:
                found.append(_CgroupBase(2, (parent,)))
        except OSError:
            pass
    v1 = {}
    for _, controllers, path in own:
        for controller in ("memory", "pids"):
            if controller in controllers.split(","):
                v1[controller] = host_dir("cgroup", controller, path)
    if v1.get("memory") and v1.get("pids"):
        found.append(_CgroupBase(1, (v1["memory"].rstrip("/"), v1["pids"].rstrip("/"))))
    return found


def _detect_cgroups() -> _CgroupBase | None:
    """A cgroup location where this process verifiably can create, join and remove run cgroups."""
    if _cgroup_base:
        return _cgroup_base[0]
    chosen = None
    try:
        candidates = _cgroup_candidates()
    except OSError:
        candidates = []
    for base in candidates:
        try:
            group = _RunCgroup(base, 64 << 20, 8)
        except OSError:
            continue
        try:
            out = subprocess.run(
                [*group.join_argv(), "/bin/cat", "/proc/self/cgroup"],
                capture_output=True,
                text=True,
                timeout=10,
                check=False,
            ).stdout
            if all(d.rsplit("/", 1)[1] in out for d in group.dirs):
                chosen = base
        except (OSError, subprocess.SubprocessError):
            pass
        finally:
            group.remove()
        if chosen:
            break
    _cgroup_base.append(chosen)
    return chosen


class _RunCgroup:
    """One run's cgroup(s): a memory limit for all its processes together, and a process limit."""

    def __init__(self, base: _CgroupBase, memory: int, pids: int) -> None:
        name = f"sdpo-sandbox-{os.getpid()}-{secrets.token_hex(6)}"
        self.version = base.version
        self.dirs = [f"{d}/{name}" for d in base.dirs]
        try:
            for d in self.dirs:
                os.mkdir(d)
            if self.version == 2:
                self._write("memory.max", memory)
                self._write("memory.swap.max", 0, optional=True)
                self._write("pids.max", pids)
            else:
                self._write("memory.limit_in_bytes", memory)
                self._write("memory.memsw.limit_in_bytes", memory, optional=True)
                self._write("pids.max", pids)
        except OSError:
            self.remove()
            raise

    def _write(self, name: str, value: int, optional: bool = False) -> None:
        for d in self.dirs:
            if os.path.exists(f"{d}/{name}"):
                with open(f"{d}/{name}", "w") as f:
                    f.write(str(value))
                return
        if not optional:
            raise OSError(f"cgroup file {name} not found in {self.dirs}")

    def join_argv(self) -> list[str]:
        """A prefix that moves the command into the cgroup(s) before it starts (125 if it cannot)."""
        script = (
            'while [ "$1" != -- ]; do echo $$ > "$1" || exit 125; shift; done; shift; exec "$@"'
        )
        return [
            "/bin/sh",
            "-c",
            script,
            "sdpo-cgroup",
            *(f"{d}/cgroup.procs" for d in self.dirs),
            "--",
        ]

    def oom_killed(self) -> bool:
        """Whether the memory limit made the kernel kill a process of the run."""
        for name in ("memory.events", "memory.oom_control"):
            path = f"{self.dirs[0]}/{name}"
            try:
                with open(path) as f:
                    for line in f:
                        key, _, value = line.partition(" ")
                        if key == "oom_kill" and int(value) > 0:
                            return True
            except (OSError, ValueError):
                continue
        return False

    def kill(self) -> None:
        """SIGKILL every process in the cgroup, until none is left."""
        for _ in range(1000):
            pids = set()
            for d in self.dirs:
                try:
                    with open(f"{d}/cgroup.procs") as f:
                        pids.update(int(p) for p in f.read().split())
                except OSError:
                    pass
            if not pids:
                return
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            time.sleep(0.002)

    def remove(self) -> None:
        for d in self.dirs:
            for _ in range(500):
                try:
                    os.rmdir(d)
                    break
                except FileNotFoundError:
                    break
                except OSError:  # its last processes are still exiting
                    time.sleep(0.004)
            else:
                logger.error("Sandbox: could not remove the cgroup %s", d)


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


def _wanted_level(config: SandboxConfig) -> str:
    level = config.isolation
    if level == "auto":
        level = os.environ.get(ENV_ISOLATION, "auto") or "auto"
        if level not in ISOLATION_LEVELS:
            raise ValueError(
                f"{ENV_ISOLATION}={level!r}: expected one of {', '.join(ISOLATION_LEVELS)}."
            )
    return level


def _unsafe_allowed(config: SandboxConfig) -> bool:
    return config.allow_unsafe or os.environ.get(ENV_ALLOW_UNSAFE, "") not in ("", "0")


def _candidates(config: SandboxConfig) -> list[_Launch]:
    root = os.geteuid() == 0
    level = _wanted_level(config)
    out: list[_Launch] = []
    if level in ("auto", "bwrap") and config.isolate_filesystem and _find_tool("bwrap"):
        for py in _python_candidates(config, needs_world_access=False):
            out.append(_Launch("bwrap", py, drop_uid=root, network=config.isolate_network))
    if level in ("auto", "namespaces") and _find_tool("unshare"):
        for py in _python_candidates(config, needs_world_access=root):
            out.append(_Launch("unshare", py, drop_uid=root, network=config.isolate_network))
    if level == "rlimits" or (level == "auto" and _unsafe_allowed(config)):
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
        with contextlib.ExitStack() as stack:  # host files in the shared temporary directories
            paths = []
            for where in (None, "/var/tmp", "/dev/shm"):
                if where is None or os.path.isdir(where):
                    host_file = stack.enter_context(
                        tempfile.NamedTemporaryFile(prefix="sdpo-probe-", dir=where)
                    )
                    os.chmod(host_file.name, 0o644)
                    paths.append(host_file.name)
            probe = _PROBE.replace("HOST_FILES", repr(paths))
            result = _run(probe, b"", _PROBE_CONFIG, launch, provisional)
        report = json.loads(result.stdout.strip().splitlines()[-1])
    except (OSError, ValueError, IndexError) as exc:
        return None, f"{launch.launcher}: the probe did not run ({exc})"
    if result.returncode != 0:
        return None, f"{launch.launcher}: the probe failed: {result.stderr.strip()[-300:]}"
    process_limit = report["forks"] < 12
    isolation = Isolation(
        level={"bwrap": "bwrap", "unshare": "namespaces", "plain": "rlimits"}[launch.launcher],
        filesystem=launch.launcher != "plain" and not report["host_file_visible"],
        network=report["interfaces"] == ["lo"],
        pid_namespace=launch.launcher != "plain",
        unique_uid=launch.drop_uid and report["uid"] != 0,
        process_limit=process_limit,
        memory_limit=report["memory_limited"],
        python=launch.python,
        no_new_privs=report["no_new_privs"],
        memory_cgroup=_detect_cgroups() is not None,
    )
    required = [
        ("process limit", process_limit),
        ("memory limit", isolation.memory_limit),
        ("containment of all processes (PID namespace or own uid)", isolation.contained),
        ("no_new_privs", isolation.no_new_privs),
    ]
    if launch.launcher != "plain":
        required.append(("private file system", isolation.filesystem))
    missing = [name for name, ok in required if not ok]
    if missing:
        return None, f"{launch.launcher}: not in force: {', '.join(missing)}"
    return isolation, ""


def detect_isolation(config: SandboxConfig | None = None) -> Isolation:
    """The best isolation this platform verifiably offers for ``config`` (probed once, then cached).

    Raises:
        SandboxUnavailableError: no launcher meets the guarantees of ``bwrap`` or ``namespaces``
            (or the level asked for) and unsafe execution is not allowed.
    """
    return _resolve(config or SandboxConfig())[0]


def _resolve(config: SandboxConfig) -> tuple[Isolation, _Launch]:
    level = _wanted_level(config)
    unsafe = _unsafe_allowed(config)
    key = (config.isolate_network, config.isolate_filesystem, config.python, unsafe, level)
    with _detect_lock:
        if key in _detected:
            return _detected[key]
        if level == "rlimits" and not unsafe:
            raise SandboxUnavailableError(
                "Sandbox isolation 'rlimits' leaves the host file system visible to untrusted "
                "code; it needs SandboxConfig(allow_unsafe=True) (or "
                f"{ENV_ALLOW_UNSAFE}=1). Prefer bubblewrap: apt-get install bubblewrap."
            )
        failures: list[str] = []
        if level in ("auto", "bwrap") and not (config.isolate_filesystem and _find_tool("bwrap")):
            failures.append("bwrap: bubblewrap is not installed (apt-get install bubblewrap)")
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
            if not unsafe:
                raise SandboxUnavailableError(
                    "The sandbox cannot guarantee a private file system, time, memory and process "
                    f"limits and the killing of every process on this platform ({reasons}). "
                    "Install bubblewrap (apt-get install bubblewrap) or allow user namespaces; "
                    "or, knowing that untrusted code then runs on the host file system, pass "
                    f"SandboxConfig(allow_unsafe=True) (or set {ENV_ALLOW_UNSAFE}=1)."
                )
            py = (_python_candidates(config, False) or [sys.executable])[0]
            launch = _Launch("plain", py, drop_uid=False, network=False)
            isolation = Isolation("unsafe", False, False, False, False, False, False, py,
                                  tuple(failures))  # fmt: skip
            chosen = (isolation, launch)
            logger.warning("Sandbox: UNSAFE mode, untrusted code runs unconfined (%s).", reasons)
        else:
            isolation = chosen[0]
            logger.info("Sandbox isolation: %s, python %s", isolation, chosen[1].python)
            if isolation.level != "bwrap":
                logger.warning(
                    "Sandbox: isolation is weaker than bubblewrap: level %s (%s). %s "
                    "Install bubblewrap for the strongest isolation: apt-get install bubblewrap.",
                    isolation.level,
                    "; ".join(failures) or "bubblewrap not used",
                    "Untrusted code can READ the host file system (no private mount namespace)."
                    if isolation.level == "rlimits"
                    else "The private file system is built by sdpo with unshare.",
                )
            if not isolation.memory_cgroup:
                logger.warning(
                    "Sandbox: no memory cgroup can be created here; memory held in memfd/tmpfs "
                    "files is bounded only by lower open-file and file-size limits."
                )
            if config.isolate_network and not isolation.network:
                logger.warning(
                    "Sandbox: no private network namespace here; programs can reach the network."
                )
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
    _remove_stale()
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
    _remove_stale()
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
    uid = _UID_BASE + secrets.randbelow(_UID_SPAN) if launch.drop_uid else -1
    # Owner pid and uid in the name: a later start removes it (and that uid's processes) if the
    # owner died without cleaning up (_remove_stale).
    workdir = tempfile.mkdtemp(prefix=f"sdpo-sandbox-{os.getpid()}-{uid}-")
    proc: subprocess.Popen | None = None
    cgroup: _RunCgroup | None = None
    death_r = death_w = -1
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
        nproc = config.max_processes + 1  # the supervisor
        base = _detect_cgroups()
        if base is not None:
            cgroup = _RunCgroup(base, config.memory_bytes + _CGROUP_HEADROOM, nproc + 3)
            nofile, fsize = _NOFILE, config.file_size_bytes
        else:  # bound what memfd/tmpfs files can hold: processes x open files x file size
            nofile = _NOFILE_WITHOUT_CGROUP
            fsize = min(
                config.file_size_bytes, max(1 << 20, config.memory_bytes // (nproc * nofile))
            )
        fs = None
        if launch.launcher == "unshare":
            view = _view(launch.python)
            fs = {
                "workdir": workdir,
                "size": config.workdir_bytes,
                "symlinks": view.symlinks,
                "dirs": view.dirs,
                "binds": view.binds,
                "hide": view.hide,
            }
        death_r, death_w = os.pipe()  # the supervisor sees end of file when this process is gone
        spec = {
            "death_fd": death_r,
            "cpu": math.ceil(config.cpu_time_s) if math.isfinite(config.cpu_time_s) else 0,
            "mem": config.memory_bytes,
            "fsize": fsize,
            "nproc": nproc,
            "nofile": nofile,
            "uid": uid,
            "drop_caps": launch.launcher == "unshare" and os.geteuid() != 0,  # bwrap drops them
            "fs": fs,
            "tail": tail,
        }
        boot = [launch.python, "-I", "-S", "-c", _BOOT, repr(spec)]
        inside = workdir if launch.launcher == "plain" else _SANDBOX_DIR
        env = {
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "HOME": inside,
            "TMPDIR": inside,
            "LANG": "C.UTF-8",
            "LC_ALL": "C.UTF-8",
        }
        argv = _launcher_argv(launch, workdir, config) + boot
        if cgroup is not None:
            argv = cgroup.join_argv() + argv
        argv = _die_with_parent_argv() + argv
        with tempfile.TemporaryFile() as stdin_file:
            stdin_file.write(stdin)
            stdin_file.seek(0)
            proc = subprocess.Popen(
                argv,
                stdin=stdin_file,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                cwd=workdir,
                env=env,
                close_fds=True,
                pass_fds=(death_r,),
                start_new_session=True,  # its own process group, killed as a whole at the end
            )
        os.close(death_r)
        death_r = -1
        deadline = start + config.wall_time_s
        out, err, timed_out, truncated = _collect(proc, deadline, config.max_output_bytes)
    finally:
        if proc is not None:
            # A launcher that exited by itself took its PID namespace down with it.
            ended = proc.poll() is not None and launch.launcher != "plain"
            _kill_everything(proc, -1 if ended else uid, cgroup)
        for fd in (death_r, death_w):
            if fd >= 0:
                os.close(fd)
        memory_exceeded = cgroup is not None and cgroup.oom_killed()
        if cgroup is not None:
            cgroup.remove()
        shutil.rmtree(workdir, onerror=_force_remove)
    returncode, sig = _exit_status(proc.returncode)
    if memory_exceeded and sig is None and returncode != 0:
        returncode, sig = None, "SIGKILL"  # the launcher itself, or PID 1, was the one killed
    timed_out = timed_out or sig == "SIGXCPU"  # the CPU-time limit (the supervisor reports it)
    return ExecutionResult(
        stdout=out.decode("utf-8", "replace"),
        stderr=err.decode("utf-8", "replace"),
        returncode=returncode,
        timed_out=timed_out,
        killed_by_signal=sig,
        output_truncated=truncated,
        duration_s=time.monotonic() - start,
        isolation=str(isolation),
        memory_exceeded=memory_exceeded,
    )


# Sets SIGKILL as the parent-death signal, checks the parent is still this process, then runs
# the rest (a fallback for setpriv: the signal survives the exec into the launcher).
_DIE_WITH_PARENT = (
    "import ctypes, os, sys\n"
    "if ctypes.CDLL(None).prctl(1, 9, 0, 0, 0) != 0 or os.getppid() != int(sys.argv[1]):\n"
    "    os._exit(125)\n"
    "os.execvp(sys.argv[2], sys.argv[2:])\n"
)


def _die_with_parent_argv() -> list[str]:
    """A prefix that makes the launcher die (SIGKILL) when this process dies, even by SIGKILL;
    the launcher then takes the run down (bwrap --die-with-parent, unshare --kill-child, and the
    boot script's own parent-death signal)."""
    setpriv = _find_tool("setpriv")
    if setpriv:
        return [setpriv, "--pdeathsig", "KILL", "--"]
    return [sys.executable, "-I", "-S", "-c", _DIE_WITH_PARENT, str(os.getpid())]


_STALE_WORKDIR = re.compile(r"^sdpo-sandbox-(\d+)-(-?\d+)-[a-z0-9_]{8}$")
_STALE_CGROUP = re.compile(r"^sdpo-sandbox-(\d+)-[0-9a-f]{12}$")
_stale_removed: list[bool] = []


def _owner_dead(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False


def _remove_stale() -> None:
    """Once per process: remove the working directories and cgroups of runs whose owner died
    (SIGKILL leaves no time to clean up), killing what still runs in them first."""
    if _stale_removed:
        return
    _stale_removed.append(True)
    top = tempfile.gettempdir()
    try:
        entries = os.listdir(top)
    except OSError:
        return
    for name in entries:
        m = _STALE_WORKDIR.match(name)
        if not m or not _owner_dead(int(m.group(1))):
            continue
        uid = int(m.group(2))
        if uid >= _UID_BASE and os.geteuid() == 0:  # a uid of its own: kill what it still runs
            for pid in _pids_of_uid(uid):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(os.path.join(top, name), onerror=_force_remove)
        logger.info("Sandbox: removed %s (its owner, pid %s, is gone)", name, m.group(1))
    base = _detect_cgroups()
    for parent in base.dirs if base is not None else ():
        for d in glob.glob(f"{parent}/sdpo-sandbox-*"):
            m = _STALE_CGROUP.match(os.path.basename(d))
            if m and _owner_dead(int(m.group(1))):
                stale = _RunCgroup.__new__(_RunCgroup)
                stale.version, stale.dirs = base.version, [d]
                stale.kill()
                stale.remove()


def _launcher_argv(launch: _Launch, workdir: str, config: SandboxConfig) -> list[str]:
    if launch.launcher == "unshare":  # the boot script builds the private file system inside
        user = [] if os.geteuid() == 0 else ["--user", "--map-root-user"]
        net = ["--net"] if launch.network else []
        return [
            _find_tool("unshare") or "unshare", *user, *net, "--mount", "--ipc", "--uts", "--pid", "--fork",
            "--kill-child", "--mount-proc", "--",
        ]  # fmt: skip
    if launch.launcher != "bwrap":
        return []
    view = _view(launch.python)
    argv = [_find_tool("bwrap") or "bwrap"]
    for target, link in view.symlinks:
        argv += ["--symlink", target, link]
    for d in view.dirs:  # bwrap would create them mode 0700: unreachable after the uid drop
        argv += ["--perms", "0755", "--dir", d]
    for path in view.binds:
        argv += ["--ro-bind", path, path]
    for path in view.hide:
        argv += ["--perms", "0555", "--size", "4096", "--tmpfs", path]
    argv += ["--dev", "/dev", "--proc", "/proc"]
    # The writable places live in memory, size-capped: no number of files can fill the disk.
    for path in (_SANDBOX_DIR, "/tmp", "/var/tmp", "/dev/shm"):
        argv += ["--perms", "01777", "--size", str(config.workdir_bytes), "--tmpfs", path]
    if os.path.exists(f"{workdir}/main.py"):
        argv += ["--ro-bind", f"{workdir}/main.py", f"{_SANDBOX_DIR}/main.py"]
    argv += ["--chdir", _SANDBOX_DIR]
    argv += ["--unshare-pid", "--unshare-ipc", "--unshare-uts", "--unshare-cgroup-try"]
    if launch.network:
        argv.append("--unshare-net")
    if os.geteuid() != 0:
        argv += ["--unshare-user", "--disable-userns"]
    argv += ["--as-pid-1", "--die-with-parent", "--new-session", "--"]
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


def _kill_everything(proc: subprocess.Popen, uid: int, cgroup: _RunCgroup | None = None) -> None:
    """Kill the run's process group (taking a PID namespace down with its launcher), its cgroup
    and, when the run had a uid of its own, every process with that uid, until none is left."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()
    if cgroup is not None:
        cgroup.kill()
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


def _exit_status(code: int | None) -> tuple[int | None, str | None]:
    """(returncode, signal name): the supervisor (and bwrap) report a signal as 128 + number."""
    if code is None:
        return None, None
    if code < 0:
        return None, signal.Signals(-code).name
    if 128 < code < 128 + 65:
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
