"""Built-in code task: small function-writing and stdin/stdout problems, judged by running them.

The problems (``data/code_tasks.json``, written for this project) each have two visible test cases,
shown as examples in the prompt, and three hidden ones. Rows carry ``prompt``, ``tests`` (see
:mod:`sdpo.environments.code`), ``id`` and ``kind`` (``function`` or ``stdio``). The split is fixed
by each problem's id (about a quarter are ``eval``); ``seed`` only shuffles the order.
"""

from __future__ import annotations

import functools
import json
import random
import zlib
from pathlib import Path
from typing import Any

from sdpo.environments.code import CodeExecutionRewardModel
from sdpo.reward_model import RewardModel

DATA_FILE = Path(__file__).parent / "data" / "code_tasks.json"
SPLITS = ("train", "eval")


@functools.cache
def problems() -> tuple[dict[str, Any], ...]:
    """Every problem as stored, including its reference ``solution`` (not part of the rows)."""
    return tuple(json.loads(DATA_FILE.read_text()))


def _in_eval(problem_id: str) -> bool:
    return zlib.crc32(problem_id.encode()) % 4 == 0


def load(split: str, seed: int = 0) -> list[dict]:
    """Rows of ``split`` (``train`` or ``eval``) in an order shuffled by ``seed``."""
    if split not in SPLITS:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLITS)}.")
    rows = [
        {"prompt": p["prompt"], "tests": p["tests"], "id": p["id"], "kind": p["kind"]}
        for p in problems()
        if _in_eval(p["id"]) == (split == "eval")
    ]
    random.Random(f"code:{split}:{seed}").shuffle(rows)
    return rows


def reward_model() -> RewardModel:
    """Runs the code against the row's tests in the sandbox: binary score, judge-style feedback."""
    return CodeExecutionRewardModel()
