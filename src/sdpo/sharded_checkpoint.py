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

Loading never runs code from the checkpoint: ``*.pt`` files are read tensors-only
(:func:`sdpo.checkpoint.load_state`); DCP's own ``shards/.metadata`` is a pickle, read here by an
unpickler that admits only DCP's metadata classes, torch dtypes/sizes/layouts and plain containers
(:class:`MetadataUnpickler`), and DCP's non-tensor items are read with ``weights_only=True``
(:class:`TensorsOnlyLoadPlanner`). A checkpoint holding anything else is refused with a
:class:`~sdpo.checkpoint.CheckpointError` naming the file.
"""

from __future__ import annotations

import io
import json
import pickle
import shutil
from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
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
            ckpt.save_state(obj, tmp / f"{name}.pt")
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
    # Checked here first, on every rank: a clear error naming the file, not DCP's wrapped one.
    read_dcp_metadata(path / "shards" / ".metadata")
    state = {name: get_model_state_dict(m) for name, m in modules.items()}
    state["policy"] = get_model_state_dict(policy.model)
    state["optimizer"] = get_optimizer_state_dict(policy.model, optimizer)
    dcp.load(
        state,
        storage_reader=SafeFileSystemReader(path / "shards"),
        planner=TensorsOnlyLoadPlanner(),
    )
    set_model_state_dict(policy.model, state["policy"], options=StateDictOptions(strict=True))
    for name, m in modules.items():
        set_model_state_dict(m, state[name], options=StateDictOptions(strict=True))
    set_optimizer_state_dict(policy.model, optimizer, state["optimizer"])
    objects = {f.stem: ckpt.load_state(f) for f in sorted(path.glob("*.pt"))}
    return json.loads((path / ckpt.STATE_FILE).read_text()), objects


# ----- reading DCP's files without running code ------------------------------------------------

# Everything torch 2.x's FileSystemWriter pickles into ``.metadata``; nothing here runs code when
# constructed (dataclasses, an enum, torch.Size, a dtype, a path, the layout-by-name lookup).
_DCP = "torch.distributed.checkpoint"
ALLOWED_METADATA_GLOBALS = frozenset(
    {
        (f"{_DCP}.metadata", name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "StorageMeta",
            "ChunkStorageMetadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "TensorProperties",
            "_MEM_FORMAT_ENCODING",
        )
    }
    | {
        (f"{_DCP}.filesystem", "_StorageInfo"),
        ("torch", "Size"),
        ("torch.serialization", "_get_layout"),
        ("pathlib", "PosixPath"),
        ("pathlib", "PurePosixPath"),
        ("collections", "OrderedDict"),
    }
)


class MetadataUnpickler(pickle.Unpickler):
    """Unpickles DCP metadata; any global outside :data:`ALLOWED_METADATA_GLOBALS` is refused."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in ALLOWED_METADATA_GLOBALS or (
            module == "torch" and isinstance(getattr(torch, name, None), torch.dtype)
        ):
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"{module}.{name} is not one of DCP's metadata classes")


def read_dcp_metadata(file: Path) -> Metadata:
    """DCP's ``.metadata`` pickle, read with :class:`MetadataUnpickler`; anything else refused."""
    try:
        with open(file, "rb") as fh:
            metadata = MetadataUnpickler(fh).load()
    except (pickle.UnpicklingError, EOFError, AttributeError, TypeError, ValueError) as exc:
        raise ckpt.CheckpointError(
            f"{file} is not plain torch.distributed.checkpoint metadata ({exc}); sdpo does not "
            "execute code from checkpoints."
        ) from None
    if not isinstance(metadata, Metadata):
        raise ckpt.CheckpointError(
            f"{file} holds a {type(metadata).__name__}, not torch.distributed.checkpoint metadata."
        )
    return metadata


class SafeFileSystemReader(dcp.FileSystemReader):
    """DCP's file reader with ``.metadata`` read by :func:`read_dcp_metadata` (not ``pickle.load``)."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        metadata = read_dcp_metadata(Path(self._get_metadata_path(kwargs.get("rank"))))
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class TensorsOnlyLoadPlanner(DefaultLoadPlanner):
    """DCP's default planner, but its non-tensor items (optimizer hyper-parameters, step
    counters) are read with ``torch.load(weights_only=True)`` instead of a full unpickle."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        try:
            obj = torch.load(value, map_location="cpu", weights_only=True)
        except pickle.UnpicklingError as exc:
            raise ckpt.CheckpointError(
                f"shards/ item {read_item.dest_index.fqn} holds more than tensors and plain "
                f"containers; sdpo does not execute code from checkpoints ({exc})."
            ) from None
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj
