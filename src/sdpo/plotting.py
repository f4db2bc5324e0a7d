"""Training curves of one or more run directories as one PNG (``sdpo plot``).

Nine panels from ``metrics.jsonl``: reward, eval accuracy, distillation loss, teacher–student KL,
success-group fraction, reprompt fraction, entropy, completion length, gradient norm. The x axis is
the training step (with the number of generated samples, step × prompts_per_step × G, on a second
axis when every run generates as many per step) or the generated samples (``x="samples"``).
Per-step curves are drawn raw (faint) and as a rolling mean over ``smooth`` steps. With
``group=True``, runs whose configs differ only in the seed (and output directory) are one curve:
the mean over seeds, with a band from the lowest to the highest seed.
"""

from __future__ import annotations

import json
import math
import warnings
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

PANELS: list[tuple[str, list[str], str]] = [
    ("Reward (training batch)", ["reward"], "mean reward"),
    ("Eval accuracy", ["eval/accuracy_sampled", "eval/accuracy_greedy"], "accuracy"),
    ("Distillation loss", ["self_distillation/distillation_loss"], "loss"),
    ("Teacher–student KL", ["self_distillation/teacher_student_kl"], "KL (nats/token)"),
    ("Success-group fraction", ["self_distillation/success_group_fraction"], "fraction of groups"),
    ("Reprompt fraction", ["self_distillation/reprompt_sample_fraction"], "fraction of samples"),
    ("Entropy", ["entropy"], "nats/token"),
    ("Completion length", ["completions/mean_length"], "tokens"),
    ("Gradient norm", ["grad_norm"], "L2 norm (before clipping)"),
]
FIGSIZE = (16.0, 12.0)
DPI = 100
_IGNORED_FOR_GROUPING = ("run.seed", "run.output_dir", "run.resume_from")


@dataclass
class RunCurves:
    """One run's metric series: ``series[key] = (steps, values)``, and what one step generates."""

    name: str
    config: dict[str, Any]
    samples_per_step: int | None
    series: dict[str, tuple[list[int], list[float]]] = field(default_factory=dict)


def load_run(run_dir: str | Path, name: str | None = None) -> RunCurves:
    """Read ``metrics.jsonl`` (and ``config.yaml``, when there) of a run directory."""
    run_dir = Path(run_dir)
    metrics = run_dir / "metrics.jsonl"
    if not metrics.exists():
        raise FileNotFoundError(
            f"{run_dir} has no metrics.jsonl; give the run directory of an `sdpo train`."
        )
    config: dict[str, Any] = {}
    if (run_dir / "config.yaml").exists():
        config = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    samples = None
    try:
        samples = int(config["optimization"]["prompts_per_step"]) * int(
            config["num_samples_per_prompt"]
        )
    except (KeyError, TypeError, ValueError):
        pass
    run = RunCurves(name or run_dir.name, config, samples)
    for number, line in enumerate(metrics.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
            step = int(record["step"])
        except (ValueError, KeyError, TypeError) as exc:  # e.g. the torn last line of a killed run
            warnings.warn(
                f"{metrics}:{number}: not a metrics record ({exc}); skipped.", stacklevel=2
            )
            continue
        for key, value in record.items():
            if key == "step" or not isinstance(value, (int, float)) or isinstance(value, bool):
                continue
            if not math.isfinite(value):
                continue
            xs, ys = run.series.setdefault(key, ([], []))
            xs.append(int(step))
            ys.append(float(value))
    return run


def rolling_mean(values: list[float], window: int) -> list[float]:
    """Mean of the last ``min(window, i+1)`` values at each position ``i``."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(window, i + 1))
    return out


def group_runs(runs: list[RunCurves]) -> list[tuple[str, list[RunCurves]]]:
    """Runs with the same config except the seed and output directory, labelled by what differs."""
    groups: dict[str, list[RunCurves]] = defaultdict(list)
    flat = {id(r): _flatten(r.config) for r in runs}
    for r in runs:
        key = json.dumps(
            {k: v for k, v in flat[id(r)].items() if k not in _IGNORED_FOR_GROUPING},
            sort_keys=True,
            default=str,
        )
        groups[key].append(r)
    configs = [flat[id(members[0])] for members in groups.values()]
    differing = sorted(
        k
        for k in set().union(*configs)
        if k not in _IGNORED_FOR_GROUPING
        and len({json.dumps(c.get(k), default=str) for c in configs}) > 1
    )
    labelled = []
    for members in groups.values():
        cfg = flat[id(members[0])]
        label = ", ".join(f"{k.split('.')[-1]}={cfg.get(k)}" for k in differing[:3])
        label = label or members[0].name
        labelled.append(
            (f"{label} ({len(members)} seed{'s' if len(members) > 1 else ''})", members)
        )
    return labelled


def plot_runs(
    run_dirs: list[str | Path],
    output: str | Path,
    *,
    group: bool = False,
    x: str = "steps",
    smooth: int = 10,
) -> Path:
    """Write the nine-panel PNG of ``run_dirs`` to ``output``; return its path."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as exc:
        raise ImportError(
            "sdpo plot needs matplotlib: pip install 'sdpo[plot]' (or pip install matplotlib)."
        ) from exc
    if x not in ("steps", "samples"):
        raise ValueError(f"x must be 'steps' or 'samples', got {x!r}.")
    if Path(output).is_dir():
        raise ValueError(f"-o {output} is a directory; give a file, e.g. {output}/curves.png.")
    runs = [load_run(d, name) for d, name in zip(run_dirs, _names(run_dirs), strict=True)]
    empty = [str(d) for d, r in zip(run_dirs, runs, strict=True) if not r.series]
    if empty:
        raise ValueError(
            f"No numeric metrics to plot in {', '.join(empty)} (metrics.jsonl has no records yet?)."
        )
    if x == "samples" and any(r.samples_per_step is None for r in runs):
        raise ValueError("x='samples' needs each run's config.yaml (prompts_per_step, G).")
    curves = group_runs(runs) if group else [(r.name, [r]) for r in runs]

    fig, axes = plt.subplots(3, 3, figsize=FIGSIZE, dpi=DPI)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (ax, (title, keys, ylabel)) in enumerate(zip(axes.flat, PANELS, strict=True)):
        drawn = False
        for c, (label, members) in enumerate(curves):
            color = colors[c % len(colors)]
            for k, key in enumerate(keys):
                drawn |= _draw(ax, key, members, color, label, x, smooth, dashed=k > 0)
        ax.set_title(title, fontsize=12, fontweight="bold")
        ax.set_xlabel("generated samples" if x == "samples" else "training step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if not drawn:
            ax.text(0.5, 0.5, "not logged", ha="center", va="center", transform=ax.transAxes)
        if len(keys) > 1 and drawn:
            from matplotlib.lines import Line2D

            ax.legend(
                [Line2D([], [], color="gray"), Line2D([], [], color="gray", linestyle="--")],
                ["sampled (mean@n)", "greedy"],
                fontsize=9,
                loc="lower right",
            )
        per_step = {r.samples_per_step for _, members in curves for r in members}
        if x == "steps" and len(per_step) == 1 and None not in per_step:
            (n,) = per_step
            top = ax.secondary_xaxis("top", functions=(lambda s, n=n: s * n, lambda v, n=n: v / n))
            top.tick_params(labelsize=8, colors="dimgray")
            if i < 3:
                top.set_xlabel("generated samples", fontsize=9, color="dimgray")
    handles = [
        plt.Line2D([], [], color=colors[c % len(colors)], linewidth=2.5, label=label)
        for c, (label, _) in enumerate(curves)
    ]
    subtitle = f"solid: rolling mean over {smooth} steps, faint: per step" + (
        "; band: min–max over seeds" if group else ""
    )
    fig.legend(
        handles=handles, loc="upper center", ncol=min(len(handles), 4), fontsize=12, frameon=False
    )
    fig.text(0.5, 0.935, subtitle, ha="center", fontsize=10, color="dimgray")
    fig.tight_layout(rect=(0, 0, 1, 0.93))
    output = Path(output)
    output.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(output, dpi=DPI)
    plt.close(fig)
    return output


def _draw(
    ax: Any,
    key: str,
    members: list[RunCurves],
    color: str,
    label: str,
    x: str,
    smooth: int,
    dashed: bool,
) -> bool:
    """One curve (the mean over ``members`` at their common steps, with a min–max band)."""
    present = [r for r in members if key in r.series]
    if not present:
        return False
    common = sorted(set.intersection(*(set(r.series[key][0]) for r in present)))
    if not common:
        return False
    values = []
    for r in present:
        by_step = dict(zip(*r.series[key], strict=True))
        values.append([by_step[s] for s in common])
    mean = [sum(col) / len(col) for col in zip(*values, strict=True)]
    xs = [s * present[0].samples_per_step for s in common] if x == "samples" else common
    style = "--" if dashed else "-"
    sparse = key.startswith("eval/")
    if sparse:  # a few evaluations: points joined by lines
        ax.plot(xs, mean, style, color=color, marker="o", markersize=5, linewidth=2, label=label)
    else:
        ax.plot(xs, mean, style, color=color, alpha=0.2, linewidth=0.8)
        ax.plot(xs, rolling_mean(mean, smooth), style, color=color, linewidth=2, label=label)
    if len(present) > 1:
        lo = [min(col) for col in zip(*values, strict=True)]
        hi = [max(col) for col in zip(*values, strict=True)]
        if not sparse:
            lo, hi = rolling_mean(lo, smooth), rolling_mean(hi, smooth)
        ax.fill_between(xs, lo, hi, color=color, alpha=0.15, linewidth=0)
    return True


def _names(run_dirs: list[str | Path]) -> list[str]:
    """Directory names, with the parent prepended where two runs share a name."""
    paths = [Path(d).resolve() for d in run_dirs]
    names = [p.name for p in paths]
    return [f"{p.parent.name}/{p.name}" if names.count(p.name) > 1 else p.name for p in paths]


def _flatten(config: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = value
    return flat
