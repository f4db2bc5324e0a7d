"""`sdpo plot`: a PNG of the expected size from real runs; seeds grouped by config; clear errors."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from sdpo.cli import main
from sdpo.config import SDPOConfig
from sdpo.plotting import DPI, FIGSIZE, group_runs, load_run, rolling_mean

pytest.importorskip("matplotlib", reason="the dev extra installs matplotlib")

DOCS = Path(__file__).resolve().parents[1] / "docs" / "quickstart"


def png_size(path: Path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    return struct.unpack(">II", data[16:24])


def test_sdpo_plot_two_real_runs_writes_a_png_of_the_expected_size(tmp_path, capsys):
    out = tmp_path / "curves.png"
    assert main(["plot", str(DOCS / "sdpo"), str(DOCS / "grpo"), "-o", str(out)]) == 0
    assert png_size(out) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))
    assert out.stat().st_size > 50_000  # nine panels of curves, not an empty canvas
    assert f"Wrote {out}" in capsys.readouterr().out
    samples = tmp_path / "samples.png"
    assert main(["plot", str(DOCS / "sdpo"), "--x", "samples", "-o", str(samples)]) == 0
    assert png_size(samples) == png_size(out)


def _fake_run(root: Path, name: str, seed: int, weight: float, offset: float) -> Path:
    run = root / name
    run.mkdir(parents=True)
    config = SDPOConfig(run__seed=seed, self_distillation__distillation_weight=weight)
    config.run.output_dir = str(run)
    config.to_yaml(run / "config.yaml")
    lines = [{"step": s, "reward": offset + s / 10, "grad_norm": 1.0} for s in range(1, 11)]
    lines.append({"step": 10, "eval/accuracy_sampled": offset})
    (run / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
    return run


def test_group_averages_seeds_of_the_same_config(tmp_path):
    runs = [
        _fake_run(tmp_path, "sdpo-s0", 0, 1.0, 0.0),
        _fake_run(tmp_path, "sdpo-s1", 1, 1.0, 0.2),
        _fake_run(tmp_path, "grpo-s0", 0, 0.0, 0.5),
    ]
    groups = group_runs([load_run(r) for r in runs])
    assert [(label, [m.name for m in members]) for label, members in groups] == [
        ("distillation_weight=1.0 (2 seeds)", ["sdpo-s0", "sdpo-s1"]),
        ("distillation_weight=0.0 (1 seed)", ["grpo-s0"]),
    ]
    run = load_run(runs[0])
    assert run.samples_per_step == 8 * 4  # prompts_per_step x G of the default config
    assert run.series["reward"][0] == list(range(1, 11))
    out = tmp_path / "grouped.png"
    assert main(["plot", *map(str, runs), "--group", "-o", str(out)]) == 0
    assert png_size(out) == (int(FIGSIZE[0] * DPI), int(FIGSIZE[1] * DPI))


def test_rolling_mean_and_errors(tmp_path, capsys):
    assert rolling_mean([1.0, 3.0, 5.0, 7.0], 2) == [1.0, 2.0, 4.0, 6.0]
    assert rolling_mean([2.0, 4.0], 10) == [2.0, 3.0]
    assert main(["plot", str(tmp_path), "-o", str(tmp_path / "x.png")]) == 2
    assert "has no metrics.jsonl" in capsys.readouterr().err
    (tmp_path / "metrics.jsonl").write_text('{"step": 1, "reward": 0.5}\n')
    assert main(["plot", str(tmp_path), "--x", "samples", "-o", str(tmp_path / "x.png")]) == 2
    assert "needs each run's config.yaml" in capsys.readouterr().err
