"""Memory and time of the distillation loss: full logits vs. chunked + checkpointed LM head.

For N positions with hidden size H and vocabulary V, one forward+backward of the α = 0.5
(Jensen–Shannon) divergence over the full vocabulary, two ways:

- naive:   ``token_divergence(h_s @ Wᵀ, h_t @ Wᵀ)`` — materializes ``[N, V]`` logits and more;
- chunked: ``chunked_token_divergence(h_s, h_t, W, chunk_size=C)`` — ``O(C × V)`` extra memory.

Each case runs in its own fresh subprocess so peak RSS (``ru_maxrss``) is its own; "extra" is the
peak minus the RSS right after the inputs were allocated.

What to expect: ``token_divergence`` itself computes its gradient in place, so the naive path peaks
near three to four ``[N, V]`` float32 buffers (two logits plus scratch copies; the measured peak
differs by about one buffer between otherwise identical runs). The chunked path peaks near two
``[C, V]`` buffers plus a fixed ``2 × [V, H]`` (the LM-head gradient and one chunk's contribution
being added to it), so its ratio to naive falls with C until that fixed part dominates; it costs
one extra LM-head forward (the recomputation) in time. Usage::

    python benchmarks/bench_loss.py                  # N=4096, H=896, V in (32768, 151936)
    python benchmarks/bench_loss.py --chunk 512      # other chunk sizes
    python benchmarks/bench_loss.py --quick          # small smoke sizes
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import torch

from sdpo.self_distillation import chunked_token_divergence, token_divergence

ALPHA = 0.5
THREADS = 2


def rss_mb() -> float:
    """Current resident set size (MB)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def available_mb() -> float:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) / 1024
    return float("inf")


def make_inputs(positions: int, hidden: int, vocab: int) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    student_hidden = torch.randn(positions, hidden, generator=gen).requires_grad_()
    teacher_hidden = student_hidden.detach() + 0.5 * torch.randn(positions, hidden, generator=gen)
    # Scaled so logits are O(1), like a trained LM head.
    weight = (torch.randn(vocab, hidden, generator=gen) / hidden**0.5).requires_grad_()
    return student_hidden, teacher_hidden, weight


def loss_of(impl: str, student_hidden, teacher_hidden, weight, chunk_size: int) -> torch.Tensor:
    if impl == "naive":
        # Written as a trainer would: no names hold the logits beyond the call.
        return token_divergence(
            student_hidden @ weight.T, teacher_hidden @ weight.T, alpha=ALPHA
        ).mean()
    return chunked_token_divergence(
        student_hidden, teacher_hidden, weight, alpha=ALPHA, chunk_size=chunk_size
    ).mean()


def run_case(impl: str, positions: int, hidden: int, vocab: int, chunk_size: int) -> dict:
    """One measurement in this process; returns what the parent prints."""
    torch.set_num_threads(THREADS)
    warm = make_inputs(8, hidden, 64)  # load kernels without touching the peak
    loss_of(impl, *warm, chunk_size=4).backward()
    del warm

    student_hidden, teacher_hidden, weight = make_inputs(positions, hidden, vocab)
    base = rss_mb()
    start = time.perf_counter()
    loss = loss_of(impl, student_hidden, teacher_hidden, weight, chunk_size)
    loss.backward()
    seconds = time.perf_counter() - start
    peak = peak_rss_mb()
    return {
        "impl": impl,
        "vocab": vocab,
        "seconds": seconds,
        "peak_mb": peak,
        "base_mb": base,
        "extra_mb": peak - base,
        "loss": loss.item(),
        "weight_grad_norm": weight.grad.norm().item(),
    }


def estimate_naive_mb(positions: int, vocab: int) -> float:
    """A safe upper bound of the naive peak: six ``[N, V]`` float32 buffers (about three are used)."""
    return 6 * positions * vocab * 4 / 2**20


def measure(impl: str, vocab: int, chunk: int, args: argparse.Namespace) -> dict:
    """Run one case in a fresh subprocess and parse its JSON line."""
    label = {"impl": impl, "vocab": vocab, "chunk": chunk}
    if impl == "naive":
        need, have = estimate_naive_mb(args.positions, vocab), available_mb()
        if need > 0.9 * have:
            return {**label, "skipped": f"needs ~{need:.0f} MB, {have:.0f} MB available"}
    cmd = [
        sys.executable, __file__, "--case", impl, "--vocab", str(vocab),
        "--positions", str(args.positions), "--hidden", str(args.hidden), "--chunk", str(chunk),
    ]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return {**label, "skipped": f"failed: {tail[0]}"}
    return {**json.loads(proc.stdout.strip().splitlines()[-1]), **label}


def print_table(rows: list[dict], args: argparse.Namespace) -> None:
    print(
        f"\nN={args.positions} positions, H={args.hidden}, alpha={ALPHA}, full vocabulary, "
        f"float32, {THREADS} threads; extra = peak RSS - RSS after allocating inputs"
    )
    header = (
        f"{'V':>7} | {'impl':>14} | {'fwd+bwd s':>9} | {'peak MB':>7} | {'extra MB':>8} | "
        f"{'extra/naive':>11} | {'time/naive':>10} | {'|loss diff|':>11}"
    )
    print(header)
    print("-" * len(header))
    naive: dict[int, dict] = {r["vocab"]: r for r in rows if r["impl"] == "naive"}
    for row in rows:
        name = "naive" if row["impl"] == "naive" else f"chunked c={row['chunk']}"
        if "skipped" in row:
            print(f"{row['vocab']:>7} | {name:>14} | skipped: {row['skipped']}")
            continue
        base = naive.get(row["vocab"], {})
        ratio = time_ratio = loss_diff = "-"
        if "extra_mb" in base:
            ratio = f"{row['extra_mb'] / base['extra_mb']:.3f}"
            time_ratio = f"{row['seconds'] / base['seconds']:.2f}x"
            loss_diff = f"{abs(row['loss'] - base['loss']):.1e}"
        print(
            f"{row['vocab']:>7} | {name:>14} | {row['seconds']:>9.1f} | {row['peak_mb']:>7.0f} | "
            f"{row['extra_mb']:>8.0f} | {ratio:>11} | {time_ratio:>10} | {loss_diff:>11}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="Small smoke sizes (seconds).")
    parser.add_argument("--positions", type=int, help="N (default 4096; 256 with --quick).")
    parser.add_argument("--hidden", type=int, help="H (default 896; 64 with --quick).")
    parser.add_argument("--vocab", type=int, nargs="+", help="V values (default 32768 151936).")
    parser.add_argument(
        "--chunk", type=int, nargs="+", help="Chunk sizes of the chunked loss (default 1024 256)."
    )
    parser.add_argument("--case", choices=("naive", "chunked"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    args.positions = args.positions or (256 if args.quick else 4096)
    args.hidden = args.hidden or (64 if args.quick else 896)
    args.vocab = args.vocab or ([1024, 8192] if args.quick else [32768, 151936])
    args.chunk = args.chunk or ([64] if args.quick else [1024, 256])

    if args.case:
        case = run_case(args.case, args.positions, args.hidden, args.vocab[0], args.chunk[0])
        print(json.dumps(case))
        return
    rows = []
    for vocab in args.vocab:  # sequential: never two big cases at once
        cases = [("naive", 0)] + [("chunked", chunk) for chunk in args.chunk]
        for impl, chunk in cases:
            rows.append(measure(impl, vocab, chunk, args))
            print(f"  measured {impl} V={vocab} chunk={chunk}", file=sys.stderr, flush=True)
    print_table(rows, args)


if __name__ == "__main__":
    main()
