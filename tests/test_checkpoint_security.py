"""Checkpoints written by someone else never run their code when loaded (issue 23, H1).

A crafted pickle whose ``__reduce__`` calls ``os.system`` would create a marker file when
unpickled; each test asserts the marker is never created and the error names the file.
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

from sdpo import checkpoint as ckpt
from sdpo.sharded_checkpoint import load_sharded


class Payload:
    """Unpickling it runs ``touch marker``."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _sharded_checkpoint(path: Path) -> tuple[SimpleNamespace, torch.optim.Optimizer]:
    """A genuine one-process DCP checkpoint of a Linear and its AdamW state, plus rng.pt."""
    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    state = {"policy": get_model_state_dict(model)}
    state["optimizer"] = get_optimizer_state_dict(model, opt)
    with warnings.catch_warnings():  # "assuming the intent is to save in a single process"
        warnings.simplefilter("ignore")
        dcp.save(state, checkpoint_id=str(path / "shards"))
    torch.save([ckpt.rng_state()], path / "rng.pt")
    (path / ckpt.STATE_FILE).write_text('{"global_step": 1}')
    fresh = torch.nn.Linear(4, 3)
    return SimpleNamespace(model=fresh), torch.optim.AdamW(fresh.parameters(), lr=1e-3)


def _load(path: Path, policy: SimpleNamespace, opt: torch.optim.Optimizer):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return load_sharded(None, path, policy=policy, modules={}, optimizer=opt)


def test_a_genuine_sharded_checkpoint_loads_weights_and_optimizer_state(tmp_path):
    policy, opt = _sharded_checkpoint(tmp_path)
    torch.manual_seed(0)
    want = torch.nn.Linear(4, 3)
    state, objects = _load(tmp_path, policy, opt)
    assert state == {"global_step": 1} and isinstance(objects["rng"], list)
    # one AdamW step moved the weights away from their initial values
    assert not torch.equal(policy.model.weight, want.weight)
    assert opt.state_dict()["state"][0]["step"] == 1
    assert opt.param_groups[0]["lr"] == 1e-3


def test_a_crafted_rng_pt_in_a_sharded_checkpoint_is_refused_not_run(tmp_path):
    policy, opt = _sharded_checkpoint(tmp_path)
    marker = tmp_path / "marker"
    torch.save({"rng": Payload(marker)}, tmp_path / "rng.pt")
    with pytest.raises(ckpt.CheckpointError, match=r"rng\.pt.*does not execute code"):
        _load(tmp_path, policy, opt)
    assert not marker.exists()


def test_a_crafted_dcp_metadata_is_refused_not_run(tmp_path):
    policy, opt = _sharded_checkpoint(tmp_path)
    marker = tmp_path / "marker"
    (tmp_path / "shards" / ".metadata").write_bytes(pickle.dumps(Payload(marker)))
    with pytest.raises(
        ckpt.CheckpointError, match=r"shards/\.metadata .*posix\.system.*does not execute"
    ):
        _load(tmp_path, policy, opt)
    assert not marker.exists()


WORKER = Path(__file__).with_name("dist_worker.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2"]


def _launch(out: Path, steps: int, mode: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    args = [*TORCHRUN, str(WORKER), str(out), "fsdp", str(steps), mode]
    return subprocess.run(args, env=env, capture_output=True, text=True, timeout=400)


@pytest.mark.slow
def test_resuming_a_crafted_fsdp_checkpoint_under_torchrun_runs_no_code(tmp_path):
    """The attacker rewrites the manifest too (whoever writes the files can): the loader itself
    must refuse, on every rank, before anything is unpickled."""
    first = _launch(tmp_path, 2, "train")
    point = tmp_path / "run" / "checkpoint-000002"
    assert (point / ckpt.MANIFEST).exists(), first.stderr[-3000:]
    rng, metadata = point / "rng.pt", point / "shards" / ".metadata"
    genuine = rng.read_bytes()
    for name, craft in (
        ("rng.pt", lambda m: torch.save({"rng": Payload(m)}, rng)),
        (".metadata", lambda m: metadata.write_bytes(pickle.dumps(Payload(m)))),
    ):
        marker = tmp_path / f"marker-{name}"
        craft(marker)
        ckpt.write_manifest(point)
        assert ckpt.verify(point) is None
        proc = _launch(tmp_path, 4, "resume")
        assert proc.returncode != 0
        assert not marker.exists(), name
        assert f"{name} " in proc.stderr and "does not execute code" in proc.stderr, proc.stderr[
            -3000:
        ]
        rng.write_bytes(genuine)
