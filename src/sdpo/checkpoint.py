"""Checkpoints that never replace a good one with a half-written one.

A checkpoint is a directory ``checkpoint-{step:06d}`` holding the policy (``policy/``, safetensors
plus config and tokenizer), the teacher and reference copies (safetensors), ``optimizer.pt``,
``scheduler.pt``, ``rng.pt``, ``trainer_state.json`` and ``config.yaml``. It is written to a
temporary sibling directory and renamed into place only when complete; ``trainer_state.json`` is
written last, so a directory without it is never taken for a checkpoint.
"""

from __future__ import annotations

import json
import os
import random
import re
import shutil
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model

from sdpo import lora

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"


def rng_state() -> dict[str, Any]:
    """Every random stream a step draws from."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


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
    ``{name}.safetensors``; ``objects`` picklable states saved as ``{name}.pt``.
    """
    run_dir.mkdir(parents=True, exist_ok=True)
    final = run_dir / f"checkpoint-{step:06d}"
    tmp = run_dir / f".tmp-checkpoint-{step:06d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    # The policy directory loads with `from_pretrained` as well as into a running trainer.
    if getattr(policy, "is_lora", False):  # adapters in PEFT's format: policy/ and teacher/
        lora.save_checkpoint_adapters(policy, tmp)
    else:
        (tmp / "policy").mkdir()
        save_model(
            policy.model, str(tmp / "policy" / "model.safetensors"), metadata={"format": "pt"}
        )
        policy.model.config.save_pretrained(tmp / "policy")
        policy.tokenizer.save_pretrained(tmp / "policy")
    for name, module in modules.items():
        save_model(module, str(tmp / f"{name}.safetensors"))
    for name, obj in objects.items():
        torch.save(obj, tmp / f"{name}.pt")
    config.to_yaml(tmp / "config.yaml")
    (tmp / STATE_FILE).write_text(json.dumps(trainer_state, indent=2))
    _fsync_tree(tmp)
    if final.exists():  # the same step saved twice (e.g. a final save right after a periodic one)
        old = run_dir / f".old-{final.name}-{os.getpid()}"
        final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(final)
    for stale in list_checkpoints(run_dir)[:-keep]:
        shutil.rmtree(stale, ignore_errors=True)
    return final


def load_checkpoint(
    path: Path, *, policy: Any, modules: dict[str, torch.nn.Module]
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Load weights into ``policy`` and ``modules`` in place; return (trainer_state, objects)."""
    if not (path / STATE_FILE).exists():
        raise FileNotFoundError(f"{path} is not a complete checkpoint (no {STATE_FILE}).")
    if getattr(policy, "is_lora", False):
        lora.load_checkpoint_adapters(policy, path)
    elif not (path / "policy" / "model.safetensors").exists():
        raise FileNotFoundError(
            f"{path}/policy holds no full model weights (a LoRA checkpoint?); resume it with the "
            "same model.lora settings."
        )
    else:
        load_model(
            policy.model, str(path / "policy" / "model.safetensors"), device=str(policy.device)
        )
    for name, module in modules.items():
        file = path / f"{name}.safetensors"
        if not file.exists():
            raise FileNotFoundError(
                f"Checkpoint {path} has no {file.name}; was it written with another teacher setting?"
            )
        load_model(module, str(file), device=str(policy.device))
    objects = {f.stem: torch.load(f, weights_only=False) for f in path.glob("*.pt")}
    return json.loads((path / STATE_FILE).read_text()), objects


def list_checkpoints(run_dir: Path) -> list[Path]:
    """Complete checkpoints of a run directory, oldest first."""
    if not run_dir.is_dir():
        return []
    found = [
        p for p in run_dir.iterdir() if CHECKPOINT_RE.match(p.name) and (p / STATE_FILE).exists()
    ]
    return sorted(found, key=lambda p: int(CHECKPOINT_RE.match(p.name).group(1)))


def resolve_checkpoint(path: str | Path) -> Path:
    """A checkpoint directory, or the newest complete checkpoint of a run directory."""
    path = Path(path)
    if (path / STATE_FILE).exists():
        return path
    found = list_checkpoints(path)
    if not found:
        raise FileNotFoundError(
            f"No complete checkpoint in {path} (expected {path}/checkpoint-NNNNNN/{STATE_FILE})."
        )
    return found[-1]


def _fsync_tree(root: Path) -> None:
    for file in root.rglob("*"):
        if file.is_file():
            with open(file, "rb") as fh:
                os.fsync(fh.fileno())
