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

import errno
import fcntl
import json
import math
import os
import shutil
from pathlib import Path
from typing import Any

LOCK_FILE = ".lock"
RUN_FILES = ("config.yaml", "metrics.jsonl", "samples.jsonl")


class RunDirectoryError(RuntimeError):
    """The run directory holds another run, or another process is using it."""


class RunDirectory:
    """Owns ``path`` for one run: :meth:`claim` before writing, :meth:`release` at the end."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
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
    from sdpo.checkpoint import ABANDONED_RE, CHECKPOINT_RE, FINAL_LEFTOVER_RE, OLD_RE, TMP_RE

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
