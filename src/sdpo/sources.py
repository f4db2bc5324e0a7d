"""Where a run's prompts and reward come from: a built-in task, or a JSONL file and a reward spec.

One function, :func:`rows_and_reward`, serves ``sdpo train``, ``sdpo eval``, ``sdpo discover``
and the scripts, so "task or file" means the same everywhere.
"""

from __future__ import annotations

import importlib
import os
import sys
from typing import Any

REWARD_NAMES = ("math", "math_lenient", "code", "exact")


def load_reward(spec: str) -> Any:
    """A reward model by name (math, math_lenient, code, exact) or a ``module:function`` callable
    (imported from the working directory too)."""
    from sdpo import reward_model as rm

    named = {
        "math": rm.MathRewardModel,
        "math_lenient": lambda: rm.MathRewardModel(extraction="lenient"),
        "exact": lambda: rm.VerifiableRewardModel(mode="exact"),
    }
    if spec == "code":
        from sdpo.environments import CodeExecutionRewardModel

        return CodeExecutionRewardModel()
    if spec in named:
        return named[spec]()
    if ":" not in spec:
        raise SystemExit(
            f"sdpo: data.reward={spec!r}: use math, math_lenient, code, exact, or module:function."
        )
    module, name = spec.split(":", 1)
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), name)


def rows_and_reward(
    task_or_file: str, split: str = "eval", *, reward: str | None = None, seed: int = 0
) -> tuple[list[dict[str, Any]], Any]:
    """``(rows, reward model)`` of a built-in task's ``split`` (drawn with ``seed``; the task's own
    reward), or of a JSONL file scored by ``reward`` (:func:`load_reward`; required for a file)."""
    from sdpo.tasks import TASKS, load_task, task_reward_model

    if task_or_file in TASKS:
        return load_task(task_or_file, split, seed=seed), task_reward_model(task_or_file)
    if not reward:
        raise SystemExit(
            f"sdpo: {task_or_file} is not a built-in task ({', '.join(sorted(TASKS))}); a data "
            f"file needs a reward: {', '.join(REWARD_NAMES)}, or module:function."
        )
    from sdpo.data import load_rows

    return load_rows(task_or_file), load_reward(reward)
