"""One check of everything in sdpo that has never run on CUDA: ``make gpu-check``.

    python scripts/gpu_check.py                    # on a CUDA machine: all checks, < 8 minutes
    python scripts/gpu_check.py --smoke            # reduced: no benchmarks, tiny sizes (CPU test)
    python scripts/gpu_check.py --only precision fsdp_1proc --out gpu-check

Checks (each in its own subprocess with a time limit, so a crash or hang is one failed row):

- ``env``: torch / CUDA versions, the device, native bf16, and what ``model.dtype=auto`` picks.
- ``precision``: ``tests/test_precision.py`` on the default device (cuda when present: PolicyModel's
  default): bf16 autocast over float32 master weights, small updates kept, bf16 loss within 5% of
  float32, gradient checkpointing leaves loss and gradients unchanged, eager == sdpa attention.
- ``fsdp_1proc``: FSDP2 (``fully_shard`` on every block, bf16 mixed precision on CUDA) in one
  process (a 1-rank nccl/gloo group): two training steps with the EMA teacher and a sharded
  checkpoint; the loss is finite, the blocks are DTensors, and the teacher moved.
- ``vllm``: the colocated vLLM engine, ``tests/test_vllm.py -m vllm`` (sampling distribution vs
  the hf sampler, weight sync after an optimizer step, the mismatch metrics in a training run; on
  CUDA with sleep mode, the default). Skipped when vLLM is not installed.
- ``bench_generation``: ``benchmarks/bench_generation.py``, hf vs transformers (vs vllm).
- ``bench_step``: ``benchmarks/bench_step.py --quick``, sdpo vs TRL at V = 128 and 32,768, in
  bf16 on CUDA (in ``model.dtype=auto``'s choice on CPU).

Without CUDA every check runs on the CPU where it can and says so; what needs CUDA or vLLM is
reported as skipped with the reason. Writes ``OUT/gpu_check.json`` and ``OUT/gpu_check.md`` (a
table) and prints the table. Exit status 1 when a check that ran failed.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CHECKS = ("env", "precision", "fsdp_1proc", "vllm", "bench_generation", "bench_step")
TIME_LIMIT_S = {"env": 60, "precision": 120, "fsdp_1proc": 120, "vllm": 240}
TIME_LIMIT_S |= {"bench_generation": 150, "bench_step": 240}
# What each check proves only on a GPU: a CPU run of it is not a CUDA run.
NEEDS_CUDA_FOR = {
    "precision": "CUDA bf16 autocast",
    "fsdp_1proc": "FSDP2 on CUDA (nccl, bf16 mixed precision)",
    "vllm": "the colocated vLLM engine on CUDA with sleep mode",
    "bench_generation": "GPU tokens/s (vLLM >= 5x the hf sampler)",
    "bench_step": "sdpo/TRL step time in bf16 on a GPU",
}


def _device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def _vllm_installed() -> bool:
    import importlib.util

    return importlib.util.find_spec("vllm") is not None


def _env_for_children() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), *filter(None, [env.get("PYTHONPATH")])])
    env.setdefault("HF_HUB_OFFLINE", "1")
    return env


def _pytest(args: list[str], timeout: float) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *args]
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=_env_for_children()
    )
    out = proc.stdout + proc.stderr
    summary = next(
        (ln for ln in reversed(out.splitlines()) if re.search(r"\d+ (passed|failed|error)", ln)),
        out.strip().splitlines()[-1] if out.strip() else "no output",
    )
    return {
        "ok": proc.returncode == 0,
        "detail": summary.strip("= "),
        "failures": [ln for ln in out.splitlines() if ln.startswith(("FAILED", "ERROR"))][:10],
    }


# ----- the checks (each returns {"ok": bool, "detail": str, ...} or {"skipped": reason}) -------


def check_env(smoke: bool) -> dict:
    import torch

    from sdpo.distributed import auto_precision, cpu_has_native_bf16, precision_note

    device = torch.device(_device())
    info = {
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "device": str(device),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "auto_dtype": str(auto_precision(device)[0]).removeprefix("torch."),
        "vllm_installed": _vllm_installed(),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(0)
        info["gpu_bf16"] = torch.cuda.is_bf16_supported()
        info["gpu_memory_gb"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    return {"ok": True, "detail": precision_note("auto", device), **info}


def check_precision(smoke: bool) -> dict:
    tests = "tests/test_precision.py"
    if smoke:  # the auto-choice tests and the gradient-checkpointing equality
        return _pytest([tests, "-k", "auto_dtype or gradient_checkpointing"], 110)
    return _pytest([tests], 110)


def check_fsdp_1proc(smoke: bool) -> dict:
    """Two FSDP2 steps in one process. The Runtime shards only when several processes train
    (``lockstep``); here it is told to, over a 1-rank group, so that every FSDP code path (sharding,
    mixed precision, gathered generation, shard-wise EMA, sharded checkpoint) runs on the device."""
    import torch
    import torch.distributed as dist
    from torch.distributed.tensor import DTensor

    from sdpo import PolicyModel, SDPOConfig, SDPOTrainer
    from sdpo.demo import build_char_tokenizer, tiny_llama_config
    from sdpo.distributed import Runtime

    device = _device()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    dist.init_process_group("nccl" if device == "cuda" else "gloo", rank=0, world_size=1)
    Runtime.lockstep = property(lambda self: self.strategy == "fsdp")  # 1 rank, still sharded
    try:
        tok = build_char_tokenizer()
        torch.manual_seed(0)
        from transformers import LlamaForCausalLM

        model = LlamaForCausalLM(tiny_llama_config(len(tok), hidden=64, layers=2, heads=2))
        rows = [{"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in range(10, 14)
                for b in range(20, 22)]  # fmt: skip
        with tempfile.TemporaryDirectory() as out:
            config = SDPOConfig(
                num_samples_per_prompt=4,
                generation__max_new_tokens=4 if smoke else 8,
                generation__min_new_tokens=4 if smoke else 8,
                optimization__prompts_per_step=2,
                optimization__micro_batch_size=8,
                distributed__strategy="fsdp",
                run__output_dir=out,
                run__progress_bar=False,
                run__max_steps=2,
            )

            def reward(prompts, completions, **kw):
                return [float(i % 4 == 0) for i in range(len(completions))]

            policy = PolicyModel(model=model, tokenizer=tok, device=device)
            trainer = SDPOTrainer(
                config=config, policy_model=policy, reward_model=reward, train_dataloader=rows
            )
            sharded = sum(isinstance(p, DTensor) for p in trainer.policy.model.parameters())
            before = [p.detach().full_tensor().clone() for p in trainer.teacher.copy.parameters()
                      if isinstance(p, DTensor)]  # fmt: skip
            losses = [trainer.step().get("loss") for _ in range(2)]
            after = [p.detach().full_tensor() for p in trainer.teacher.copy.parameters()
                     if isinstance(p, DTensor)]  # fmt: skip
            moved = any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
            ckpt = trainer.save_checkpoint()
            ok = sharded > 0 and moved and all(x is not None and x == x for x in losses)
            return {
                "ok": ok,
                "detail": f"{sharded} DTensor parameters, losses {losses}, teacher moved {moved}, "
                f"checkpoint {Path(ckpt).name}, compute {trainer.runtime.compute_dtype}",
            }
    finally:
        dist.destroy_process_group()


def check_vllm(smoke: bool) -> dict:
    if not _vllm_installed():
        return {"skipped": "vLLM is not installed (pip install 'sdpo[vllm]'; CPU: make test-vllm)"}
    return _pytest(["-m", "vllm", "tests/test_vllm.py", "-x"], 230)


def _bench(cmd: list[str], timeout: float, json_path: Path) -> dict:
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, *cmd], cwd=ROOT, capture_output=True, text=True, timeout=timeout,
        env=_env_for_children(),
    )  # fmt: skip
    table = [ln for ln in proc.stdout.splitlines() if ln.startswith("|") or " | " in ln]
    result = {
        "ok": proc.returncode == 0,
        "detail": f"{time.perf_counter() - t0:.0f} s"
        + ("" if proc.returncode == 0 else f"; {proc.stderr[-400:]}"),  # fmt: skip
        "table": table,
    }
    if json_path.exists():
        result["results"] = json.loads(json_path.read_text())
    return result


def check_bench_generation(smoke: bool, out: Path) -> dict:
    if smoke:
        return {"skipped": "smoke mode (--smoke): no benchmarks"}
    backends = ["hf", "transformers"] + (["vllm"] if _vllm_installed() else [])
    json_path = out / "bench_generation.json"
    cmd = ["benchmarks/bench_generation.py", "--backends", *backends, "--prompts", "32"]
    cmd += ["--samples", "8", "--new-tokens", "64", "--repeats", "2", "--json-out", str(json_path)]
    result = _bench(cmd, 145, json_path)
    rows = {r["backend"]: r["tokens_per_s"] for r in result.get("results", {}).get("rows", [])}
    if "vllm" in rows and rows.get("hf"):
        result["vllm_over_hf_tokens_per_s"] = rows["vllm"] / rows["hf"]
    if not _vllm_installed():
        result["detail"] += "; vllm not installed: hf and transformers only"
    return result


def check_bench_step(smoke: bool, out: Path) -> dict:
    if smoke:
        return {"skipped": "smoke mode (--smoke): no benchmarks"}
    import torch

    from sdpo.distributed import auto_precision

    device = _device()
    dtype = str(auto_precision(torch.device(device))[0]).removeprefix("torch.")
    json_path = out / "bench_step.json"
    cmd = ["benchmarks/bench_step.py", "--quick", "--trainers", "sdpo", "trl"]
    cmd += ["--vocabs", "128", "32768", "--dtype", dtype, "--device", device]
    cmd += ["--threads", "0" if device == "cuda" else "1", "--json-out", str(json_path)]
    result = _bench(cmd, 235, json_path)
    result["dtype"] = dtype
    return result


# ----- the driver -------------------------------------------------------------------------------


def run_one(name: str, smoke: bool, out: Path) -> dict:
    fn = globals()[f"check_{name}"]
    return fn(smoke, out) if name.startswith("bench") else fn(smoke)


def _child(name: str, smoke: bool, out: Path, time_scale: float = 1.0) -> dict:
    cmd = [sys.executable, __file__, "--child", name, "--out", str(out)] + (["--smoke"] * smoke)
    limit = TIME_LIMIT_S[name] * time_scale
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(
            cmd, capture_output=True, text=True, timeout=limit, env=_env_for_children()
        )
    except subprocess.TimeoutExpired:
        return {"ok": False, "detail": f"timed out after {limit:.0f} s"}
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"ok": False, "detail": f"exit {proc.returncode}: {' / '.join(tail)[-500:]}"}
    result = json.loads(lines[-1])
    result["seconds"] = round(time.perf_counter() - t0, 1)
    return result


def table(results: dict[str, dict], device: str) -> str:
    out = ["| check | status | device | seconds | detail |", "|---|---|---|---|---|"]
    for name, r in results.items():
        status = "skipped" if "skipped" in r else "ok" if r.get("ok") else "FAILED"
        detail = r.get("skipped") or r.get("detail", "")
        out.append(
            f"| {name} | {status} | {device if 'skipped' not in r else '-'} | "
            f"{r.get('seconds', '-')} | {str(detail).replace('|', '/')[:200]} |"
        )
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="no benchmarks, tiny sizes")
    parser.add_argument("--only", nargs="+", choices=CHECKS, help="run these checks only")
    parser.add_argument("--out", default="gpu-check", help="directory for the JSON and table")
    parser.add_argument(
        "--time-scale", type=float, default=1.0, help="multiply every check's time limit (busy CPU)"
    )
    parser.add_argument("--child", choices=CHECKS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.child:  # one check, in this process; one JSON line
        print(json.dumps(run_one(args.child, args.smoke, out), default=str), flush=True)
        return 0

    device = _device()
    t0 = time.perf_counter()
    results: dict[str, dict] = {}
    for name in args.only or CHECKS:
        print(f"[gpu_check] {name} ...", file=sys.stderr, flush=True)
        results[name] = _child(name, args.smoke, out, args.time_scale)
    ran_on_cuda = [n for n, r in results.items() if device == "cuda" and "skipped" not in r]
    not_on_cuda = {
        n: (results[n].get("skipped") or f"ran on {device}, not CUDA")
        for n in NEEDS_CUDA_FOR
        if n in results and n not in ran_on_cuda
    }
    report = {
        "device": device,
        "smoke": args.smoke,
        "seconds": round(time.perf_counter() - t0, 1),
        "checks": results,
        "ran_on_cuda": ran_on_cuda,
        "not_run_on_cuda": {n: f"{NEEDS_CUDA_FOR[n]}: {why}" for n, why in not_on_cuda.items()},
    }
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = table(results, device)
    if not_on_cuda:
        text += "\n\nNot verified on CUDA by this run:\n" + "\n".join(
            f"- {n}: {NEEDS_CUDA_FOR[n]} ({why})" for n, why in not_on_cuda.items()
        )
    (out / "gpu_check.md").write_text(text + "\n")
    print(text)
    print(f"\n{report['seconds']:.0f} s; wrote {out / 'gpu_check.json'} and {out / 'gpu_check.md'}")
    failed = [n for n, r in results.items() if "skipped" not in r and not r.get("ok")]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
