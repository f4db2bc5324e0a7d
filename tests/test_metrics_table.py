"""The docs' metrics table (docs/metrics.md) documents every key the trainer logs (so it cannot drift)."""

from __future__ import annotations

import json
import re
from pathlib import Path

from conftest import ROWS, make_trainer, one_success_per_group

METRICS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "metrics.md"


def _documented() -> set[str]:
    text = METRICS_PAGE.read_text()
    section = text[text.index("\n## Metrics\n") :]
    section = section[: section.index("\n## ", 1)]
    names = set()
    for line in section.splitlines():
        if line.startswith("| `"):
            names |= set(re.findall(r"`([^`]+)`", line.split(" | ")[0]))
    return names


def test_every_logged_metric_is_in_the_docs_table(tmp_path):
    trainer = make_trainer(
        tmp_path / "run",
        reward=one_success_per_group,
        eval_rows=ROWS[:4],
        optimization__updates_per_batch=2,
    )
    trainer.train()
    lines = (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    logged = set().union(*(json.loads(line) for line in lines))
    assert "eval/pass@1" in logged and "self_distillation/success_sample_fraction" in logged
    documented = _documented()
    generic = {re.sub(r"@\d+$", "@k", k) for k in logged}
    generic = {"health/<name>" if k.startswith("health/") else k for k in generic}
    generic = {re.sub(r"^rewards/.+/(mean|std)$", r"rewards/<name>/\1", k) for k in generic}
    missing = sorted(generic - documented)
    assert not missing, f"metrics logged but not in docs/metrics.md's table: {missing}"
