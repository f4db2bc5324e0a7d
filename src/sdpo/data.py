"""Prompt sources: a list of dicts, a Hugging Face ``Dataset``, a JSONL path or a torch ``DataLoader``.

Rows have a ``prompt`` (a string or chat messages) and any other columns; the other columns reach
the reward model. A source remembers its position (epoch, index) so a resumed run sees exactly the
batches an uninterrupted run would have seen.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import DataLoader


def load_rows(source: Any) -> list[dict[str, Any]]:
    """Rows of a list / ``Dataset`` / JSONL path as a list of dicts, each checked for ``prompt``."""
    if isinstance(source, (str, Path)):
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"Data file {path} does not exist.")
        rows, where = [], []
        for lineno, raw in enumerate(path.read_bytes().splitlines(), 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise ValueError(
                    f"{path}:{lineno} is not valid UTF-8 (byte {exc.start} of the line); save the file as UTF-8."
                ) from None
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno} is not valid JSON: {exc}") from None
                where.append(f"{path}:{lineno}")
        if not rows:
            raise ValueError(f"The dataset {path} is empty.")
        for i, row in enumerate(rows):
            check_row(row, i, where[i])
        check_columns(rows, where)
        return rows
    elif isinstance(source, Iterable) and not isinstance(source, (dict, str, bytes)):
        rows = [dict(row) if isinstance(row, Mapping) else row for row in source]
    else:
        raise TypeError(
            f"Training data must be a list of dicts, a datasets.Dataset, a JSONL path or a DataLoader; got {type(source).__name__}."
        )
    if not rows:
        raise ValueError("The dataset is empty.")
    for i, row in enumerate(rows):
        check_row(row, i)
    check_columns(rows)
    return rows


def check_row(row: Any, index: int, where: str | None = None) -> None:
    """Raise a clear error when a row is not a dict with a non-empty ``prompt``."""
    name = f"Row {index}" + (f" ({where})" if where else "")
    if not isinstance(row, dict):
        raise TypeError(f"{name} is a {type(row).__name__}, expected a dict with a 'prompt' key.")
    if "prompt" not in row:
        raise KeyError(
            f"{name} has no 'prompt' column; it has columns {sorted(row)}. Rename the prompt column to 'prompt'."
        )
    prompt = row["prompt"]
    ok = isinstance(prompt, str) or (
        isinstance(prompt, list)
        and all(isinstance(m, dict) and "role" in m and "content" in m for m in prompt)
    )
    if not ok:
        raise TypeError(
            f"{name}: 'prompt' must be a string or a list of {{'role', 'content'}} messages, got {prompt!r:.80}."
        )
    if not prompt or (isinstance(prompt, str) and not prompt.strip()):
        raise ValueError(f"{name}: 'prompt' is empty; every row needs a question.")


def check_columns(rows: list[dict[str, Any]], where: list[str] | None = None) -> None:
    """Every row has the same columns (a missing answer would reach the reward as None): each
    column's first row is compared with every row, so row 0 lacking a later row's column is
    named too."""
    first: dict[str, int] = {}
    for i, row in enumerate(rows):
        for column in row:
            first.setdefault(column, i)
    for i, row in enumerate(rows):
        missing = [c for c in first if c not in row]
        if missing:
            place = f" ({where[i]})" if where else ""
            raise ValueError(
                f"Row {i}{place} has no {missing[0]!r} column, which row {first[missing[0]]} has; "
                "every row needs the same columns."
            )


def _unbatch(batch: Any) -> list[dict[str, Any]]:
    """A DataLoader batch (list of dicts, or the default collate's dict of lists) as a list of rows."""
    if isinstance(batch, dict):
        n = len(batch["prompt"]) if "prompt" in batch else len(next(iter(batch.values())))
        return [
            {
                k: (v[i] if isinstance(v, (list, tuple, torch.Tensor)) else v)
                for k, v in batch.items()
            }
            for i in range(n)
        ]
    return [dict(r) for r in batch]


class PromptSource:
    """Endless, seeded batches of rows: a fresh permutation each epoch; position kept for resume."""

    def __init__(self, source: Any, batch_size: int, seed: int) -> None:
        self.loader = source if isinstance(source, DataLoader) else None
        self.rows = None if self.loader is not None else load_rows(source)
        self.batch_size = batch_size
        self.seed = seed
        self.epoch = 0
        self.index = 0  # rows consumed this epoch (batches for a DataLoader)
        self._iter: Iterator | None = None

    def _order(self) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + self.epoch)
        return torch.randperm(len(self.rows), generator=g).tolist()

    def next_batch(self) -> list[dict[str, Any]]:
        """The next ``batch_size`` rows (a DataLoader's own batch for a DataLoader)."""
        if self.loader is not None:
            return self._next_from_loader()
        order = self._order()
        batch = []
        while len(batch) < self.batch_size:
            if self.index >= len(order):
                self.epoch, self.index = self.epoch + 1, 0
                order = self._order()
            batch.append(self.rows[order[self.index]])
            self.index += 1
        return batch

    def _next_from_loader(self) -> list[dict[str, Any]]:
        if self._iter is None:
            self._iter = iter(self.loader)
            for _ in range(
                self.index
            ):  # resume: skip what was consumed (exact for seeded samplers)
                next(self._iter)
        try:
            batch = next(self._iter)
        except StopIteration:
            self.epoch, self.index = self.epoch + 1, 0
            self._iter = iter(self.loader)
            batch = next(self._iter, None)
            if batch is None:
                raise ValueError(
                    "The training DataLoader yielded no batch (is its dataset empty?)."
                ) from None
        self.index += 1
        rows = _unbatch(batch)
        if not rows:
            raise ValueError(
                f"The training DataLoader yielded an empty batch (batch {self.index})."
            )
        for i, row in enumerate(rows):
            check_row(row, i)
        check_columns(rows)
        return rows

    @property
    def progress(self) -> float:
        """Epochs consumed so far, fractional (TRL's ``trainer_state.epoch``)."""
        size = len(self.rows) if self.rows is not None else len(self.loader)
        return self.epoch + self.index / max(size, 1)

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.index = int(state["epoch"]), int(state["index"])
        self._iter = None
