"""The run directory: one run per directory, held under an exclusive lock while the run is alive.

``runs/NAME/`` holds ``config.yaml``, ``metrics.jsonl``, ``samples.jsonl``, ``checkpoint-N/`` and a
``.lock`` file. A run starts only in an empty directory, in the directory of the checkpoint it
resumes, or with ``overwrite`` (which deletes the earlier run's files first); a second process on
the same directory is refused while the first holds the lock. Files are written atomically
(``config.yaml``) or as strict JSON lines (``metrics.jsonl``: NaN and inf are written as ``null``).

sdpo never writes through a symbolic link in a run directory: ``.lock`` and the logs are opened
with ``O_NOFOLLOW``, temporary files with ``O_EXCL | O_NOFOLLOW``, and a run directory whose
write targets (:func:`is_run_file`) are symlinks is refused (``overwrite`` removes the links,
never what they point to).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import math
import os
import re
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl")
LOG_FILES = ("metrics.jsonl", "samples.jsonl")
# The checkpoints' names (sdpo.checkpoint writes them): complete, being re-saved, being written.
CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
OLD_RE = re.compile(r"^\.old-checkpoint-(\d+)-\d+$")
TMP_RE = re.compile(r"^\.tmp-checkpoint-\d+-\d+$")
FINAL_LEFTOVER_RE = re.compile(r"^\.(tmp|old)-final-\d+$")  # an interrupted save of final/
ABANDONED_RE = re.compile(r"^abandoned-\d{8}-\d{6}(-\d+)?$")  # set aside by a resume
MANIFEST = "manifest.json"  # written last: a checkpoint directory without it is incomplete


class RunDirectoryError(RuntimeError):
    """The run directory holds another run, or another process is using it."""


class RunDirectory:
    """Owns ``path`` for one run: :meth:`claim` before writing, :meth:`release` at the end."""

    def __init__(self, path: str | Path, *, main: bool = True, overwrite: bool = False) -> None:
        self.path = Path(path)
        self.main = main  # the process that writes the run's files (rank 0)
        self.overwrite = overwrite  # run.overwrite_output_dir: an earlier run's files may go
        self.owned = False  # the files in it are this run's (it claimed it, or resumes in it)
        self.resumed_step: int | None = None  # resuming in it from this step: a new timeline
        self._lock: int | None = None

    @property
    def claimed(self) -> bool:
        return self._lock is not None

    def claim(self, *, own: bool = False, overwrite: bool = False) -> None:
        """Lock the directory for this process; refuse it when it holds another run.

        ``own``: the directory is the one of the checkpoint being resumed (its files are this
        run's). ``overwrite``: delete an earlier run's files (checkpoints, logs, config) first.
        """
        if self._lock is not None:
            return
        if self.path.exists() and not self.path.is_dir():
            raise RunDirectoryError(f"Run directory {self.path} exists and is not a directory.")
        self.path.mkdir(parents=True, exist_ok=True)
        fd = _open_nofollow(self.path / LOCK_FILE, os.O_RDWR | os.O_CREAT)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise RunDirectoryError(
                f"Run directory {self.path} is in use by another sdpo run (pid {holder}); "
                "wait for it to finish or choose another run.output_dir."
            ) from None
        try:
            links = sorted(
                p.name for p in self.path.iterdir() if p.is_symlink() and is_run_file(p.name)
            )
            if links and not overwrite:
                shown = ", ".join(f"{n} -> {os.readlink(self.path / n)}" for n in links[:4])
                raise RunDirectoryError(
                    f"Run directory {self.path} holds symbolic links where sdpo writes ({shown}); "
                    "sdpo never writes through a link. Remove them, choose another "
                    "run.output_dir, or pass --overwrite (removes the links, not their targets)."
                )
            others = sorted(p.name for p in self.path.iterdir() if p.name != LOCK_FILE)
            if others and not own:
                if not overwrite:
                    shown = ", ".join(others[:4]) + (", ..." if len(others) > 4 else "")
                    raise RunDirectoryError(
                        f"Run directory {self.path} is not empty ({shown}). Resume that run with "
                        f"`sdpo train --resume {self.path}`, choose another run.output_dir, or "
                        "pass --overwrite (run.overwrite_output_dir=true) to replace it."
                    )
                self._remove_run_files()
            os.ftruncate(fd, 0)
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        except BaseException:
            os.close(fd)
            raise
        self._lock = fd

    @contextlib.contextmanager
    def held(self) -> Iterator[None]:
        """Hold the lock for a block, re-entrant; on the main process only (others yield at once).

        The first claim checks the directory as :meth:`claim` does (with ``owned`` and
        ``overwrite``) and, resuming in it, sets the earlier timeline's later state aside
        (:func:`set_aside_newer`); every claim recovers what an interrupted save left
        (:func:`cleanup`).
        """
        if self.claimed or not self.main:
            yield
            return
        self.claim(own=self.owned, overwrite=self.overwrite)
        try:
            cleanup(self.path)
            if self.owned and self.resumed_step is not None:
                moved = set_aside_newer(self.path, self.resumed_step)  # a branch
                if moved:
                    print(moved, file=sys.stderr)
                self.resumed_step = None
            self.owned = True
            yield
        finally:
            self.release()

    def release(self) -> None:
        """Unlock (closing the descriptor drops the flock)."""
        if self._lock is not None:
            os.close(self._lock)
            self._lock = None

    def _remove_run_files(self) -> None:
        for p in self.path.iterdir():
            if not is_run_file(p.name) or p.name == LOCK_FILE:
                continue
            if p.is_dir() and not p.is_symlink():
                shutil.rmtree(p)
            else:  # a file, or a link: the link goes, never what it points to
                p.unlink()

    def append_jsonl(self, name: str, record: dict[str, Any]) -> None:
        """Append one strict-JSON line (NaN/inf become null); never through a symlink."""
        line = json.dumps(strict_json(record), allow_nan=False) + "\n"
        fd = _open_nofollow(self.path / name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        with os.fdopen(fd, "w") as fh:
            fh.write(line)


def is_run_file(name: str) -> bool:
    """Whether sdpo writes (or removes) ``name`` in a run directory."""
    patterns = (CHECKPOINT_RE, OLD_RE, TMP_RE, ABANDONED_RE, FINAL_LEFTOVER_RE)
    return name in (LOCK_FILE, "final", *RUN_FILES) or any(r.match(name) for r in patterns)


def _open_nofollow(path: Path, flags: int, mode: int = 0o644) -> int:
    """``os.open`` that refuses a symlink at ``path`` with a :class:`RunDirectoryError`."""
    try:
        return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC, mode)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise RunDirectoryError(
                f"{path} is a symbolic link (to {os.readlink(path)}); sdpo never writes through a "
                "link in a run directory. Remove it or choose another run.output_dir."
            ) from None
        raise


def strict_json(value: Any) -> Any:
    """``value`` with non-finite floats replaced by None and tensors by lists (strict JSON)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {str(k): strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    if hasattr(value, "tolist"):  # tensors, numpy arrays and scalars
        return strict_json(value.tolist())
    if value is None or isinstance(value, (str, int, bool)):
        return value
    return str(value)


def write_text_atomic(path: str | Path, text: str) -> None:
    """Replace ``path`` by ``text``: readers see the old file or the new one, never a part of it."""
    path = Path(path)
    tmp = path.parent / f".{path.name}.tmp-{os.getpid()}"
    tmp.unlink(missing_ok=True)  # a leftover (or a planted link): removed, never written through
    try:
        fd = os.open(
            tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o644
        )
        with os.fdopen(fd, "w") as fh:
            fh.write(text)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def fsync_dir(directory: Path) -> None:
    """Make renames inside ``directory`` durable."""
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def cleanup(run_dir: Path) -> None:
    """Recover or remove what an interrupted save left behind (call while holding the run's lock).

    A complete ``.old-checkpoint-N-*`` whose ``checkpoint-N`` is missing or incomplete is renamed
    back; other ``.old-`` and every ``.tmp-checkpoint-`` directory is removed.
    """
    if not run_dir.is_dir():
        return
    for entry in sorted(run_dir.iterdir()):
        old = OLD_RE.match(entry.name)
        if old:
            final = run_dir / f"checkpoint-{old.group(1)}"
            if (entry / MANIFEST).exists() and not (final / MANIFEST).exists():
                shutil.rmtree(final, ignore_errors=True)
                entry.rename(final)
            else:
                shutil.rmtree(entry, ignore_errors=True)
        elif TMP_RE.match(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
        elif FINAL_LEFTOVER_RE.match(entry.name):
            final = run_dir / "final"
            if entry.name.startswith(".old-") and not final.exists():
                entry.rename(final)  # the crash came between the two renames of a re-save
            else:
                shutil.rmtree(entry, ignore_errors=True)


def set_aside_newer(run_dir: Path, step: int) -> str | None:
    """Make a resume from step ``step`` in its own run directory a new timeline.

    Moved into ``run_dir/abandoned-{UTC time}/`` (kept, never deleted): every checkpoint newer
    than ``step`` (complete or not), ``final/`` (the earlier timeline's end; the resumed run writes
    its own), and the lines of ``metrics.jsonl`` / ``samples.jsonl`` whose ``step`` is greater.
    Afterwards the run directory holds one timeline: its newest checkpoint is the one resumed,
    ``--resume RUN`` continues the branch, and pruning never removes the branch's checkpoints.
    Returns the one line to print, or None when there was nothing to move. Call it while holding
    the run directory's lock.
    """
    newer = sorted(
        p
        for p in run_dir.iterdir()
        if (m := CHECKPOINT_RE.match(p.name) or OLD_RE.match(p.name)) and int(m.group(1)) > step
    )
    final = run_dir / "final"
    has_final = final.exists() or final.is_symlink()
    later = {name: _split_log(run_dir / name, step) for name in LOG_FILES}
    if not newer and not has_final and not any(late for _, late in later.values()):
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    aside, n = run_dir / f"abandoned-{stamp}", 1
    while aside.exists():
        aside, n = run_dir / f"abandoned-{stamp}-{n}", n + 1
    aside.mkdir()
    moved = [p.name for p in newer] + (["final"] if has_final else [])
    for p in [*newer, *([final] if has_final else [])]:
        p.rename(aside / p.name)
    for name, (keep, late) in later.items():
        if late:
            write_text_atomic(aside / name, "".join(late))
            write_text_atomic(run_dir / name, "".join(keep))
            moved.append(f"{len(late)} {name} lines of steps > {step}")
    fsync_dir(run_dir)
    return (
        f"sdpo: resuming step {step} starts a new timeline; the earlier one's later state "
        f"({', '.join(moved)}) moved to {aside}/"
    )


def _split_log(file: Path, step: int) -> tuple[list[str], list[str]]:
    """(lines to keep, lines of steps > ``step``) of a JSON-lines log; unreadable lines are kept."""
    if not file.is_file():
        return [], []
    keep, late = [], []
    for line in file.read_text().splitlines(keepends=True):
        try:
            record_step = json.loads(line)["step"]
        except (ValueError, KeyError, TypeError):
            record_step = None
        target = late if isinstance(record_step, int) and record_step > step else keep
        target.append(line if line.endswith("\n") else line + "\n")
    return keep, late
