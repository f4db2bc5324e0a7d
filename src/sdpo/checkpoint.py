"""Checkpoints that never replace a good one with a bad one, and never run code when loaded.

A checkpoint is a directory ``checkpoint-{step:06d}``:

- ``policy/``: safetensors weights plus model config and tokenizer (loads with ``from_pretrained``);
- ``{name}.safetensors``: the teacher and reference copies;
- ``{name}.pt``: optimizer, scheduler and RNG states: tensors and plain containers only, read with
  ``torch.load(weights_only=True)``, so loading a checkpoint from someone else never runs its code;
- ``trainer_state.json``, ``config.yaml``;
- ``manifest.json``, written last: the sha256 and size of every other file. A directory without it
  is not a checkpoint; a file that does not match it makes the checkpoint broken.

Writing (:func:`save_checkpoint`): non-finite weights are refused; files go to a temporary sibling
``.tmp-checkpoint-N-PID``, are fsynced, and the directory is renamed into place. Re-saving a step
that exists renames the old one to ``.old-checkpoint-N-PID`` first; a crash between the two renames
leaves that complete ``.old-`` directory, which :func:`list_checkpoints` still finds and
:func:`cleanup` renames back, so there is never a moment without a good checkpoint on disk.

Reading (:func:`resolve_checkpoint`, then :func:`load_checkpoint`): every file is checked against
the manifest; when the newest checkpoint of a run directory is broken, the previous complete one is
used with a warning naming the broken file.

The functions take a directory and plain state, so a sharded (FSDP) writer can produce the same
layout: write shards into the temporary directory, then :func:`write_manifest` and :func:`commit`.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import pickle
import random
import shutil
import warnings
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_model, save_model

# The run directory's names, the recovery of interrupted saves and the timeline rule live with the
# run directory (sdpo.run_dir, which holds the lock they need); re-exported here.
from sdpo.run_dir import (  # noqa: F401
    ABANDONED_RE,
    CHECKPOINT_RE,
    FINAL_LEFTOVER_RE,
    LOG_FILES,
    MANIFEST,
    OLD_RE,
    TMP_RE,
    cleanup,
    fsync_dir,
    set_aside_newer,
    write_text_atomic,
)

STATE_FILE = "trainer_state.json"


class CheckpointError(RuntimeError):
    """A checkpoint is broken (a file missing, truncated or altered) or cannot be loaded safely."""


class NonFiniteWeightsError(CheckpointError):
    """The weights hold NaN or inf; such a checkpoint is never written."""


def rng_state() -> dict[str, Any]:
    """Every random stream a step draws from."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    if isinstance(state, list):  # one per rank: written by a ddp/fsdp run
        raise CheckpointError(
            f"This checkpoint holds the random streams of {len(state)} processes (a "
            "distributed.strategy=ddp or fsdp run); resume it the same way, under torchrun with "
            f"--nproc_per_node {len(state)}."
        )
    random.setstate(_as_tuples(state["python"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _as_tuples(value: Any) -> Any:
    """``random.setstate`` wants tuples all the way down."""
    return tuple(_as_tuples(v) for v in value) if isinstance(value, (list, tuple)) else value


# ----- writing -----------------------------------------------------------------------------------


def save_checkpoint(
    run_dir: Path,
    step: int,
    *,
    policy: Any,
    modules: dict[str, torch.nn.Module],
    objects: dict[str, Any],
    trainer_state: dict[str, Any],
    config: Any,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` atomically and keep only the newest ``keep`` checkpoints.

    ``policy`` is the :class:`~sdpo.policy_model.PolicyModel`; ``modules`` extra networks saved as
    ``{name}.safetensors``; ``objects`` states of tensors and plain containers saved as
    ``{name}.pt``. Raises :class:`NonFiniteWeightsError` (and writes nothing) when any weight is
    NaN or inf.
    """
    check_finite({"policy": policy.model, **modules})
    run_dir.mkdir(parents=True, exist_ok=True)
    tmp = run_dir / f".tmp-checkpoint-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        _write_files(tmp, policy, modules, objects, trainer_state, config)
    except (OSError, SafetensorError) as exc:  # a full disk, a file-size limit, a lost mount
        shutil.rmtree(tmp, ignore_errors=True)
        reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
        where = f" ({exc.filename})" if isinstance(exc, OSError) and exc.filename else ""
        raise CheckpointError(
            f"Writing checkpoint {step} in {run_dir} failed: {reason}{where}. Nothing was "
            "replaced; the earlier checkpoints are kept. Free disk space (or raise the limit) "
            "and resume."
        ) from None
    final = commit(tmp, run_dir / f"checkpoint-{step:06d}")
    prune(run_dir, keep)
    return final


def _write_files(
    tmp: Path,
    policy: Any,
    modules: dict[str, torch.nn.Module],
    objects: dict[str, Any],
    trainer_state: dict[str, Any],
    config: Any,
) -> None:
    # The policy directory loads with `from_pretrained` as well as into a running trainer.
    policy.save_weights(tmp)
    for name, module in modules.items():
        save_model(module, str(tmp / f"{name}.safetensors"))
    for name, obj in objects.items():
        save_state(obj, tmp / f"{name}.pt")
    config.to_yaml(tmp / "config.yaml")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    write_manifest(tmp)


def save_state(obj: Any, file: Path) -> None:
    """``torch.save`` through memory, then one plain write: a full disk is an ``OSError`` with
    its errno ("No space left on device"), not torch's "basic_ios::clear: iostream error"."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    try:
        with open(file, "wb") as fh:
            fh.write(buffer.getbuffer())
    except OSError as exc:  # a failed write() carries no file name
        raise OSError(exc.errno, exc.strerror, str(file)) from None


def check_finite(modules: dict[str, torch.nn.Module]) -> None:
    """Raise :class:`NonFiniteWeightsError` naming the first tensors that hold NaN or inf."""
    bad = [
        f"{name}.{key}"
        for name, module in modules.items()
        for key, t in module.state_dict().items()
        if t.is_floating_point() and not bool(torch.isfinite(t).all())
    ]
    if bad:
        raise NonFiniteWeightsError(
            f"The weights hold NaN or inf ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}); "
            "no checkpoint written, the earlier ones are kept. Lower optimization.learning_rate "
            "or check the rewards' scale."
        )


def write_manifest(directory: Path) -> None:
    """fsync every file of ``directory``, then write ``manifest.json`` (sha256 + size of each) last."""
    files = {}
    for file in sorted(p for p in directory.rglob("*") if p.is_file() and p.name != MANIFEST):
        with open(file, "rb") as fh:
            os.fsync(fh.fileno())
        files[file.relative_to(directory).as_posix()] = {
            "sha256": _sha256(file),
            "size": file.stat().st_size,
        }
    write_text_atomic(directory / MANIFEST, json.dumps({"files": files}, indent=1))
    fsync_dir(directory)


def commit(tmp: Path, final: Path) -> Path:
    """Rename the complete ``tmp`` to ``final``; an existing ``final`` stays findable throughout."""
    if final.exists():  # the same step saved again: keep the old one findable until the new is in
        old = final.parent / f".old-{final.name}-{os.getpid()}"
        shutil.rmtree(old, ignore_errors=True)
        final.rename(old)
        tmp.rename(final)
        fsync_dir(final.parent)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
        fsync_dir(final.parent)
    return final


def prune(run_dir: Path, keep: int) -> None:
    """Delete all but the newest ``keep`` complete checkpoints (every kept one passed the finite check)."""
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)


# ----- reading -----------------------------------------------------------------------------------


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run directory (manifest written), oldest first.

    An ``.old-checkpoint-N-*`` left by a crash during a re-save counts as step N when no complete
    ``checkpoint-N`` exists.
    """
    if not run_dir.is_dir():
        return []
    found: dict[int, Path] = {}
    for p in run_dir.iterdir():
        m = CHECKPOINT_RE.match(p.name) or OLD_RE.match(p.name)
        if m and (p / MANIFEST).exists():
            step = int(m.group(1))
            if step not in found or CHECKPOINT_RE.match(p.name):
                found[step] = p
    return [found[s] for s in sorted(found)]


def is_checkpoint(path: Path) -> bool:
    """Whether ``path`` is a checkpoint directory (complete or not) rather than a run directory."""
    return bool(CHECKPOINT_RE.match(path.name) or OLD_RE.match(path.name)) or (
        (path / MANIFEST).exists()
    )


def verify(path: Path) -> str | None:
    """None when every file of checkpoint ``path`` matches its manifest, else what is wrong."""
    manifest = path / MANIFEST
    if not manifest.exists():
        return f"{manifest} is missing (the checkpoint was not completely written)"
    try:
        files = json.loads(manifest.read_text())["files"]
    except (ValueError, KeyError, TypeError):
        return f"{manifest} is not a valid manifest"
    for name, expected in files.items():
        file = path / name
        if not file.is_file():
            return f"{file} is missing"
        size = file.stat().st_size
        if size != expected["size"]:
            return f"{file} has {size} bytes, the manifest says {expected['size']} (truncated?)"
        if _sha256(file) != expected["sha256"]:
            return f"{file} does not match its sha256 in the manifest (corrupted)"
    return None


def resolve_checkpoint(path: str | Path) -> Path:
    """A verified checkpoint: ``path`` itself, or the newest intact checkpoint of run directory ``path``.

    A broken newest checkpoint is skipped with a warning naming the broken file; a broken
    checkpoint given explicitly raises :class:`CheckpointError`.
    """
    path = Path(path)
    if is_checkpoint(path):
        problem = verify(path)
        if problem:
            raise CheckpointError(f"Checkpoint {path} is broken: {problem}.")
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"No complete checkpoint in {path} (expected {path}/checkpoint-NNNNNN/{MANIFEST})."
        )
    problems = []
    for candidate in reversed(found):
        problem = verify(candidate)
        if problem is None:
            for p in problems:
                warnings.warn(
                    f"Skipping a broken checkpoint: {p}; using {candidate}.", stacklevel=2
                )
            return candidate
        problems.append(problem)
    raise CheckpointError(f"Every checkpoint in {path} is broken: {'; '.join(problems)}.")


def load_checkpoint(
    path: Path, *, policy: Any, modules: dict[str, torch.nn.Module]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``policy`` and ``modules`` in place; return (trainer_state, objects).

    ``path`` should come from :func:`resolve_checkpoint` (which checks the files).
    """
    if (path / "shards").is_dir():
        raise CheckpointError(
            f"{path} was written by a distributed.strategy=fsdp run (its weights are in shards/); "
            "resume it under torchrun with distributed.strategy=fsdp and the same number of "
            "processes."
        )
    policy.load_weights(path)
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.exists():
            raise CheckpointError(
                f"Checkpoint {path} has no {file.name}; was it written with another teacher setting?"
            )
        load_model(module, str(file), device=str(policy.device))
    objects = {f.stem: load_state(f) for f in sorted(path.glob("*.pt"))}
    return json.loads((path / STATE_FILE).read_text()), objects


def load_state(file: Path) -> Any:
    """A ``.pt`` state of tensors and plain containers; anything else is refused, never executed."""
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CheckpointError(
            f"{file} holds more than tensors and plain containers; sdpo does not execute code from "
            f"checkpoints ({first})."
        ) from None


# ----- helpers -----------------------------------------------------------------------------------


def _sha256(file: Path) -> str:
    h = hashlib.sha256()
    with open(file, "rb") as fh:
        while chunk := fh.read(1 << 20):
            h.update(chunk)
    return h.hexdigest()
