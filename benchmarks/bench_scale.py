"""One process vs DDP x2 vs FSDP x2 on the same global batch: step time and peak memory per process.

    python benchmarks/bench_scale.py                 # CPU table (gloo, torchrun), demo model
    python benchmarks/bench_scale.py --steps 5

With CUDA present it adds a GPU section: a ~0.5B-parameter Llama built from a config (no
download), bf16 autocast + gradient checkpointing, one process: tokens/s and peak GPU memory.
Peak memory on CPU is the process's max RSS (interpreter and torch included).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve()


def reward(prompts, completions, **columns):
    return [float(i % 3 == 0) for i in range(len(completions))]


def worker(args: argparse.Namespace) -> None:
    from sdpo import PolicyModel, SDPOConfig, SDPOTrainer
    from sdpo.tasks import load_task

    overrides = dict(
        num_samples_per_prompt=8,
        generation__max_new_tokens=16,
        generation__min_new_tokens=16,
        optimization__prompts_per_step=8,
        optimization__micro_batch_size=16,
        distributed__strategy=args.strategy,
        run__output_dir=f"/tmp/bench_scale_{os.getpid()}",
        run__progress_bar=False,
    )
    if args.gpu:
        from transformers import LlamaConfig, LlamaForCausalLM

        from sdpo.demo import build_char_tokenizer

        tok = build_char_tokenizer()
        cfg = LlamaConfig(
            vocab_size=32768,
            hidden_size=1024,
            intermediate_size=4096,
            num_hidden_layers=24,
            num_attention_heads=16,
            num_key_value_heads=4,
            tie_word_embeddings=False,
        )
        model = LlamaForCausalLM(cfg)
        overrides.update(
            model__dtype="bfloat16",
            model__gradient_checkpointing=True,
            generation__max_new_tokens=256,
            generation__min_new_tokens=256,
            optimization__micro_batch_size=16,
        )
        policy = PolicyModel(model=model, tokenizer=tok, device="cuda")
    else:
        policy = PolicyModel("demo")
    config = SDPOConfig(**overrides)
    trainer = SDPOTrainer(config, policy, reward, load_task("arithmetic", "train", seed=0))
    trainer.step()  # warm-up
    if args.gpu:
        torch.cuda.reset_peak_memory_stats()
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    tokens = 0
    for _ in range(args.steps):
        trainer.step()
        tokens += int(trainer.last_rollouts.completion_mask.sum())
    if args.gpu:
        torch.cuda.synchronize()
    dt = (time.perf_counter() - t0) / args.steps
    out = {
        "rank": trainer.runtime.rank,
        "step_s": dt,
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "params_m": sum(p.numel() for p in policy.model.parameters()) / 1e6,
    }
    if args.gpu:
        out["tokens_per_s"] = tokens / (dt * args.steps)
        out["peak_gpu_gb"] = torch.cuda.max_memory_allocated() / 2**30
    print("BENCH " + json.dumps(out), flush=True)
    trainer.runtime.close()


def launch(strategy: str, procs: int, steps: int, gpu: bool = False) -> list[dict]:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    cmd = [str(HERE), "--worker", "--strategy", strategy, "--steps", str(steps)]
    if gpu:
        cmd.append("--gpu")
    if procs > 1:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(procs), *cmd]
    else:
        cmd = [sys.executable, *cmd]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{strategy} x{procs} failed:\n{proc.stderr[-3000:]}")
    rows = [json.loads(line[6:]) for line in proc.stdout.splitlines() if line.startswith("BENCH ")]
    return sorted(rows, key=lambda r: r["rank"])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--gpu", action="store_true")
    parser.add_argument("--strategy", default="none")
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    if args.worker:
        worker(args)
        return
    print("CPU, demo model, 8 prompts x 8 samples x 16 tokens per step (global batch)")
    print("| setup | step time (s) | peak RSS per process (MB) |")
    print("|---|---|---|")
    for strategy, procs in (("none", 1), ("ddp", 2), ("fsdp", 2)):
        rows = launch(strategy, procs, args.steps)
        step = max(r["step_s"] for r in rows)
        rss = ", ".join(f"{r['peak_rss_mb']:.0f}" for r in rows)
        print(f"| {strategy} x{procs} | {step:.2f} | {rss} |")
    if torch.cuda.is_available():
        (row,) = launch("none", 1, args.steps, gpu=True)
        print(
            f"\nGPU, {row['params_m']:.0f}M-parameter Llama, bf16 autocast + checkpointing, 1 process"
        )
        print("| step time (s) | tokens/s | peak GPU memory (GB) |")
        print("|---|---|---|")
        print(f"| {row['step_s']:.2f} | {row['tokens_per_s']:.0f} | {row['peak_gpu_gb']:.1f} |")


if __name__ == "__main__":
    main()
