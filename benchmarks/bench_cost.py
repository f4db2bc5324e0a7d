"""Cost curves: how sdpo's and TRL's SDPO step grow with completion length, group size and vocabulary.

    python benchmarks/bench_cost.py --quick            # the reduced grid (~10 cases), table + PNG
    python benchmarks/bench_cost.py                    # the full grid (hours on one CPU core)
    python benchmarks/bench_cost.py --points 2048,4,151936 --steps 1 --warmup 0   # chosen points

Each point is ``(completion length L, group size G, vocabulary V)``; the sweeps vary one of them
from the base point (L = 32, G = 4, V = 32,768: ``bench_step.py``'s workload) — L over 32 → 2,048,
G over 4 → 16, V over 128 → 151,936 — for sdpo and TRL, each without and with gradient checkpointing
(``--no-checkpointing`` drops the second). Every case is one ``bench_step.py --case`` subprocess
(its own peak RSS), 8 prompts x G samples x exactly L tokens, one micro-batch per step.

Besides step time and peak memory each row shows the estimated FLOPs of the training passes (the
same for both trainers: student forward+backward, teacher forward; generation excluded), the
achieved GFLOP/s over ``step − generation`` time, and that as a fraction of this machine's matmul
rate, measured at start with the model's shapes (``[1024, H] x [H, 4H]`` and ``[1024, H] x [H, V]``).
``--json-out`` keeps every number; ``--png`` (default ``bench_cost.png``) draws the curves.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step as bs  # noqa: E402

BASE = (32, 4, 32768)
FULL = {"L": [32, 128, 512, 2048], "G": [4, 8, 16], "V": [128, 8192, 32768, 151936]}
QUICK = {"L": [32, 128], "G": [4, 8], "V": [128, 32768]}
PROMPT_TOKENS = 11  # "Q: 347+586=" (bench_step's prompts)
TEMPLATE_TOKENS = (
    50  # the reprompt template around the demonstration (~4,000 teacher tokens at base)
)


def grid(sweeps: dict[str, list[int]]) -> list[tuple[int, int, int]]:
    """The base point, then each sweep's other values, in order, without repeats."""
    points = [BASE]
    for axis, values in sweeps.items():
        for v in values:
            p = list(BASE)
            p["LGV".index(axis)] = v
            if tuple(p) not in points:
                points.append(tuple(p))
    return points


def train_flops(length: int, group: int, vocab: int) -> float:
    """Estimated FLOPs of one step's training passes (identical work for both trainers).

    Per token a block costs ``2 · P_block`` (P_block = 4H² + 3·H·F weights) plus causal attention
    ``2 · H · S`` (QKᵀ and AV over half of an S-token context); the LM head ``2 · H · V`` on
    completion positions only. Student: forward + backward (3x) over N = 8·G rows of
    ``S = prompt + L`` tokens; teacher: forward over ``S_t = S + L + template`` (the demonstration
    adds ~L tokens), every row counted as distilled (an upper bound; ~7/8 are at G = 4).
    """
    h, f, layers = bs.HIDDEN, bs.INTERMEDIATE, bs.LAYERS
    p_block = 4 * h * h + 3 * h * f
    rows = bs.PROMPTS_PER_STEP * group

    def forward(seq: int) -> float:
        blocks = layers * rows * seq * (2 * p_block + 2 * h * seq)
        return blocks + 2 * h * vocab * rows * length

    s = PROMPT_TOKENS + length
    return 3 * forward(s) + forward(s + length + TEMPLATE_TOKENS)


def matmul_rate(
    dtype_name: str, vocab: int, device: str, clock: str, seconds: float = 0.3
) -> float:
    """This machine's GFLOP/s for the model's two matmul shapes (the better of the two): the
    block's ``[1024, H] x [H, 4H]`` and the head's ``[1024, H] x [H, V]``."""
    import torch

    dtype = getattr(torch, dtype_name)
    best = 0.0
    for n_out in (4 * bs.HIDDEN, vocab):
        a = torch.randn(1024, bs.HIDDEN, dtype=dtype, device=device)
        b = torch.randn(bs.HIDDEN, n_out, dtype=dtype, device=device)
        a @ b  # warm-up
        timer = time.process_time if clock == "cpu" else time.perf_counter
        reps, t0 = 0, timer()
        while timer() - t0 < seconds:
            a @ b
            reps += 1
        if device == "cuda":
            torch.cuda.synchronize()
        rate = 2 * 1024 * bs.HIDDEN * n_out * reps / (timer() - t0) / 1e9
        best = max(best, rate)
    return best


def case_args(args, length: int, group: int, ckpt: bool) -> list[str]:
    rows = bs.PROMPTS_PER_STEP * group
    out = ["--warmup", str(args.warmup), "--steps", str(args.steps)]
    out += ["--micro-batch", str(rows), "--model-cache", args.model_cache]
    out += ["--threads", str(args.threads), "--new-tokens", str(length), "--samples", str(group)]
    out += ["--dtype", args.dtype, "--device", args.device, "--clock", args.clock]
    if ckpt:
        out += ["--sdpo-gradient-checkpointing", "--trl-gradient-checkpointing"]
    return out


def _fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 3, figsize=(14, 8))
    for col, (axis, label) in enumerate(
        (("L", "completion length"), ("G", "group size G"), ("V", "vocabulary"))
    ):
        i = "LGV".index(axis)
        for trainer, color in (("sdpo", "tab:blue"), ("trl", "tab:orange")):
            for ckpt, style in ((False, "-"), (True, "--")):
                sel = [
                    r
                    for r in rows
                    if r["trainer"] == trainer
                    and r["ckpt"] == ckpt
                    and r.get("available")
                    and all(r["point"][j] == BASE[j] for j in range(3) if j != i)
                ]
                sel.sort(key=lambda r: r["point"][i])
                if not sel:
                    continue
                xs = [r["point"][i] for r in sel]
                name = f"{trainer}{' ckpt' if ckpt else ''}"
                axes[0, col].plot(xs, [r["step_s"] for r in sel], style, color=color, marker="o",
                                  label=name)  # fmt: skip
                axes[1, col].plot(xs, [r["peak_mb"] for r in sel], style, color=color, marker="o",
                                  label=name)  # fmt: skip
        for row, ylabel in ((0, "step time s"), (1, "peak memory MB")):
            ax = axes[row, col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel(label)
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=8)
    fig.suptitle(f"SDPO step cost, sdpo vs TRL (base L={BASE[0]}, G={BASE[1]}, V={BASE[2]})")
    fig.tight_layout()
    fig.savefig(path, dpi=90)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="reduced grid, 1 warm-up + 1 step")
    parser.add_argument("--points", nargs="+", help="L,G,V triples instead of the grid")
    parser.add_argument("--trainers", nargs="+", default=["sdpo", "trl"], choices=["sdpo", "trl"])
    parser.add_argument("--no-checkpointing", action="store_true", help="skip the ckpt cases")
    parser.add_argument("--ckpt-base-only", action="store_true",
                        help="gradient checkpointing only at the base point")  # fmt: skip
    parser.add_argument("--warmup", type=int, default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                        help="step timer: wall, or CPU time (steadier on a busy machine)")  # fmt: skip
    parser.add_argument("--model-cache", default=str(bs.DEFAULT_MODEL_CACHE))
    parser.add_argument("--case-timeout", type=float, default=3600)
    parser.add_argument("--jobs", type=int, default=1, help="cases run side by side")
    parser.add_argument("--json-out", default=None)
    parser.add_argument("--png", default="bench_cost.png")
    args = parser.parse_args(argv)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 1)
    args.steps = args.steps if args.steps is not None else (1 if args.quick else 2)
    if args.quick:
        args.ckpt_base_only = True
    points = (
        [tuple(int(x) for x in p.split(",")) for p in args.points]
        if args.points
        else grid(QUICK if args.quick else FULL)
    )

    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    rates = {
        v: matmul_rate(args.dtype, v, args.device, args.clock)
        for v in sorted({p[2] for p in points})
    }
    print(f"matmul {args.dtype} GFLOP/s by vocabulary (best of block/head shapes): "
          + ", ".join(f"V={v}: {r:.0f}" for v, r in rates.items()), flush=True)  # fmt: skip

    cases = []
    for length, group, vocab in points:
        bs.ensure_model(Path(args.model_cache), vocab)
        ckpts = [False] if args.no_checkpointing else [False, True]
        if args.ckpt_base_only and (length, group, vocab) != BASE:
            ckpts = [False]
        # trainers adjacent: drifting load hits both alike
        cases += [((length, group, vocab), ckpt, t) for ckpt in ckpts for t in args.trainers]

    def run(case) -> dict:
        (length, group, vocab), ckpt, trainer = case
        res = bs._run_one(args, trainer, vocab, case_args(args, length, group, ckpt))
        row = {"point": [length, group, vocab], "trainer": trainer, "ckpt": ckpt}
        row["available"] = bool(res.get("available"))
        row["error"] = res.get("error")
        if row["available"]:
            step, gen = res["median_step_s"], res.get("gen_median_s") or 0.0
            flops = train_flops(length, group, vocab)
            gflops = flops / max(step - gen, 1e-9) / 1e9
            row |= {
                "step_s": step,
                "gen_s": gen,
                "peak_mb": res.get("cuda_peak_mb") or res["peak_rss_mb"],
                "delta_mb": res["delta_mb"],
                "train_gflop": flops / 1e9,
                "gflops": gflops,
                "of_matmul": gflops / rates[vocab],
                "load_1m": res.get("loadavg_1m"),
            }
        return row

    # --jobs > 1 runs cases side by side (each its own process): use it with --clock cpu on a
    # machine with spare cores; wall times of parallel cases are not comparable.
    with ThreadPoolExecutor(max_workers=max(args.jobs, 1)) as pool:
        rows = list(pool.map(run, cases))
    if args.json_out:
        meta = {"matmul_gflops": rates, "dtype": args.dtype, "device": args.device}
        meta |= {"clock": args.clock, "jobs": args.jobs}
        Path(args.json_out).write_text(json.dumps({**meta, "rows": rows}, indent=1))

    print(f"\nSDPO step cost, {args.dtype} {args.device}, {args.threads} thread(s), "
          f"{args.clock} time, {args.warmup} warm-up + median of {args.steps} step(s); "
          f"load {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")  # fmt: skip
    print("| L | G | V | trainer | ckpt | step s | gen s | peak MB | train GFLOP | GFLOP/s | "
          "of matmul | sdpo/trl time | sdpo/trl peak |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    index = {(tuple(r["point"]), r["trainer"], r["ckpt"]): r for r in rows}
    for r in rows:
        length, group, vocab = r["point"]
        head = f"| {length} | {group} | {vocab} | {r['trainer']} | {'on' if r['ckpt'] else 'off'} |"
        if not r["available"]:
            print(f"{head} not available: {str(r['error'])[:100]} |||||||")
            continue
        other = index.get((tuple(r["point"]), "trl", r["ckpt"]), {})
        t_ratio = m_ratio = None
        if r["trainer"] == "sdpo" and other.get("available"):
            t_ratio = r["step_s"] / other["step_s"]
            m_ratio = r["peak_mb"] / other["peak_mb"]
        print(f"{head} {r['step_s']:.2f} | {r['gen_s']:.2f} | {r['peak_mb']:.0f} | "
              f"{r['train_gflop']:.1f} | {r['gflops']:.1f} | {r['of_matmul']:.2f} | "
              f"{_fmt(t_ratio)} | {_fmt(m_ratio)} |")  # fmt: skip
    if args.png and any(r["available"] for r in rows):
        plot(rows, args.png)
        print(f"\nwrote {args.png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
