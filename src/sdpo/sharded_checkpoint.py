"""Checkpoints of a sharded (``distributed.strategy=fsdp``) run, through ``torch.distributed.checkpoint``.

Layout of ``checkpoint-{step:06d}`` (same name, same atomic rename as :mod:`sdpo.checkpoint`):

- ``shards/``: every rank's shards of the policy, the EMA teacher, the reference copy and the
  AdamW state (DCP format; resume needs the same world size);
- ``policy/``: the policy gathered into one ``save_pretrained`` directory (``from_pretrained``
  loads it), with its config and tokenizer;
- ``rng.pt`` (every rank's random streams, a list by rank), ``scheduler.pt``, ``config.yaml`` and, written last,
  ``trainer_state.json``.

All ranks write their shards into ``.tmp-checkpoint-{step}``; rank 0 then writes the rest, syncs
the files to disk and renames the directory into place, so a half-written checkpoint is never
taken for one.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from sdpo import checkpoint as ckpt


def save_sharded(
    runtime: Any,
    run_dir: Path,
    step: int,
    *,
    policy: Any,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
    objects: dict[str, Any],
    trainer_state: dict[str, Any],
    config: Any,
    keep: int,
) -> Path:
    """Write checkpoint ``step`` (a collective: every rank calls it)."""
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-checkpoint-{step:06d}"
    if runtime.is_main:
        shutil.rmtree(tmp, ignore_errors=True)
        (tmp / "policy").mkdir(parents=True)
    runtime.barrier()
    state = {name: get_model_state_dict(m) for name, m in modules.items()}
    state["policy"] = get_model_state_dict(policy.model)
    state["optimizer"] = get_optimizer_state_dict(policy.model, optimizer)
    dcp.save(state, checkpoint_id=str(tmp / "shards"))
    full = runtime.full_state_dict(policy.model)
    if runtime.is_main:
        policy.model.save_pretrained(tmp / "policy", state_dict=full)
        policy.tokenizer.save_pretrained(tmp / "policy")
        for name, obj in objects.items():
            torch.save(obj, tmp / f"{name}.pt")
        config.to_yaml(tmp / "config.yaml")
        (tmp / ckpt.STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
        ckpt.write_manifest(tmp)  # fsync + checksums, as sdpo.checkpoint does
        ckpt.commit(tmp, final)
        ckpt.prune(run_dir, keep)
    runtime.barrier()
    return final


def load_sharded(
    runtime: Any,
    path: Path,
    *,
    policy: Any,
    modules: dict[str, torch.nn.Module],
    optimizer: torch.optim.Optimizer,
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load this rank's shards in place; return (trainer_state, objects) with this rank's RNG."""
    if not (path / "shards").is_dir():
        raise FileNotFoundError(
            f"{path} has no shards/: it was not written by a distributed.strategy=fsdp run."
        )
    state = {name: get_model_state_dict(m) for name, m in modules.items()}
    state["policy"] = get_model_state_dict(policy.model)
    state["optimizer"] = get_optimizer_state_dict(policy.model, optimizer)
    dcp.load(state, checkpoint_id=str(path / "shards"))
    set_model_state_dict(policy.model, state["policy"], options=StateDictOptions(strict=True))
    for name, m in modules.items():
        set_model_state_dict(m, state[name], options=StateDictOptions(strict=True))
    set_optimizer_state_dict(policy.model, optimizer, state["optimizer"])
    objects = {f.stem: torch.load(f, weights_only=False) for f in path.glob("*.pt")}
    return json.loads((path / ckpt.STATE_FILE).read_text()), objects
