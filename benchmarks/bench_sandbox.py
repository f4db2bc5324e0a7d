"""Sandbox cost: per-run overhead and throughput, with and without network isolation.

Rows, for each isolation level available here (``bwrap``, ``namespaces``):
- trivial program (``pass``): latency of one sandboxed run, its overhead over a bare
  ``python -I -S -c pass`` subprocess, and programs per second through the pool;
- a batch of 64 programs x 5 tests through :class:`CodeExecutionRewardModel` (one sandbox and one
  harness per program, one forked child per test): latency of one program with its 5 tests, and
  programs per second through the pool.

Usage: ``python benchmarks/bench_sandbox.py [--runs 30] [--batch 64]``
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import subprocess
import sys
import time

from sdpo.environments import CodeExecutionRewardModel
from sdpo.sandbox import (
    SandboxConfig,
    SandboxUnavailableError,
    detect_isolation,
    run_many,
    run_program,
)

SOLUTION = "```python\ndef solve(a, b):\n    return a + b\n```"
TESTS = [
    {"call": f"solve({i}, {i * i})", "expected": str(i + i * i), "hidden": i > 1} for i in range(5)
]


def _latency_ms(fn, runs: int) -> float:
    fn()  # warm-up (and detection)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30, help="sequential runs per latency figure")
    parser.add_argument("--batch", type=int, default=64, help="programs per throughput batch")
    args = parser.parse_args()

    python = detect_isolation(SandboxConfig()).python
    bare = _latency_ms(
        lambda: subprocess.run([python, "-I", "-S", "-c", "pass"], check=True), args.runs
    )
    print(
        f"CPUs: {os.cpu_count()}   python: {sys.version.split()[0]}   bare `python -I -S -c pass`: {bare:.1f} ms\n"
    )
    header = (
        "| workload | network isolation | isolation level | per-run latency (ms) "
        "| overhead vs bare (ms) | programs/s (pool) |"
    )
    print(header)
    print("| --- | --- | --- | ---: | ---: | ---: |")
    for level, isolate_network in itertools.product(("bwrap", "namespaces"), (True, False)):
        config = SandboxConfig(isolate_network=isolate_network, isolation=level)
        try:
            detect_isolation(config)
        except SandboxUnavailableError as exc:
            print(f"| (level {level} unavailable here: {str(exc)[:80]}...) |")
            continue
        latency = _latency_ms(lambda c=config: run_program("pass", config=c), args.runs)
        start = time.perf_counter()
        results = run_many(["pass"] * args.batch, config=config)
        rate = args.batch / (time.perf_counter() - start)
        assert all(r.ok for r in results)
        print(
            f"| trivial program | {'on' if isolate_network else 'off'} | {level} | {latency:.1f} "
            f"| {latency - bare:.1f} | {rate:.1f} |"
        )
        judge = CodeExecutionRewardModel(
            sandbox_config=SandboxConfig(
                wall_time_s=4.0,
                cpu_time_s=4.0,
                max_output_bytes=64 << 10,
                isolate_network=isolate_network,
                isolation=level,
            )
        )
        one = _latency_ms(
            lambda j=judge: j([""], [SOLUTION], tests=[TESTS]), max(3, args.runs // 3)
        )
        start = time.perf_counter()
        outs = judge([""] * args.batch, [SOLUTION] * args.batch, tests=[TESTS] * args.batch)
        rate = args.batch / (time.perf_counter() - start)
        assert all(o.score == 1.0 for o in outs)
        print(
            f"| {args.batch} programs x {len(TESTS)} tests | {'on' if isolate_network else 'off'} "
            f"| {level} | {one:.1f} | - | {rate:.1f} |"
        )


if __name__ == "__main__":
    main()
