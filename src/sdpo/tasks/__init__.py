"""Built-in tasks: procedurally generated (or shipped) prompt/answer data and their reward models.

Every task module provides ``load(split, seed=0) -> list[dict]`` (rows with a ``prompt`` column and
the columns its reward needs; ``train`` and ``eval`` are disjoint and deterministic) and
``reward_model() -> RewardModel``. Modules are imported only when a task is asked for.
"""

from __future__ import annotations

import difflib
import importlib
import random
import zlib
from collections.abc import Callable
from types import ModuleType

from sdpo.reward_model import RewardModel

TASKS: dict[str, str] = {
    "arithmetic": "sdpo.tasks.arithmetic",
    "arithmetic_hard": "sdpo.tasks.arithmetic_hard",
    "reversal": "sdpo.tasks.reversal",
    "code": "sdpo.tasks.code",
    "listprog": "sdpo.tasks.listprog",
    "listprog_shaped": "sdpo.tasks.listprog_shaped",
    "listprog_shuffled": "sdpo.tasks.listprog_shuffled",
}
SPLITS = ("train", "eval")


def get_task(name: str) -> ModuleType:
    """The module of task ``name``; an unknown name raises ``KeyError`` naming the closest task."""
    if name not in TASKS:
        close = difflib.get_close_matches(name, TASKS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise KeyError(f"Unknown task {name!r}.{hint} Available tasks: {', '.join(sorted(TASKS))}.")
    return importlib.import_module(TASKS[name])


def load_task(name: str, split: str, seed: int = 0) -> list[dict]:
    """Rows of task ``name`` for ``split`` (``train`` or ``eval``), drawn with ``seed``."""
    check_split(split)
    return get_task(name).load(split, seed=seed)


def task_reward_model(name: str) -> RewardModel:
    """The reward model that scores completions of task ``name``."""
    return get_task(name).reward_model()


def check_split(split: str) -> None:
    """Raise ``ValueError`` unless ``split`` is one of :data:`SPLITS`."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")


def in_split(prompt: str, split: str, eval_fraction: float) -> bool:
    """Whether ``prompt`` belongs to ``split``: a stable hash puts ``eval_fraction`` of all prompts
    in ``eval`` and the rest in ``train``, whatever the seed, so the splits never overlap."""
    in_eval = zlib.crc32(prompt.encode()) / 2**32 < eval_fraction
    return in_eval == (split == "eval")


def draw_rows(
    generate: Callable[[random.Random], dict], split: str, n: int, seed: int, eval_fraction: float
) -> list[dict]:
    """Up to ``n`` rows with distinct prompts from ``split``, drawn by ``generate(rng)`` with ``seed``.

    Fewer than ``n`` come back only when the task has fewer distinct problems in that split.
    """
    check_split(split)
    rng = random.Random(f"{split}:{seed}")
    rows: list[dict] = []
    seen: set[str] = set()
    for _ in range(20 * n + 1000):
        if len(rows) == n:
            break
        row = generate(rng)
        if row["prompt"] not in seen and in_split(row["prompt"], split, eval_fraction):
            seen.add(row["prompt"])
            rows.append(row)
    return rows
