"""Arithmetic, hard split: 2-digit additions whose units digits carry (``Q: 58+67=`` -> ``125``).

The demo model solves these far less often than other 2-digit sums (measured with 4 samples at
T = 1 on the eval split: 13% sampled accuracy, and every sample of a group of 4 fails on 60% of
the questions, versus 47% and 26% without a units carry), so GRPO has no signal on most of its
prompts and a teacher must learn from the environment's feedback alone. Same reward and feedback
as :mod:`sdpo.tasks.arithmetic` (the attempt, too large / too small or wrong length, whether its
last digit is right; never the answer); train and eval are disjoint (the same hash split as the
plain task).
"""

from __future__ import annotations

import random

from sdpo.reward_model import RewardModel
from sdpo.tasks import arithmetic, draw_rows

NUM_TRAIN = 2_000
NUM_EVAL = 200


def carries(a: int, b: int) -> bool:
    """Whether ``a + b`` carries out of the units column."""
    return a % 10 + b % 10 >= 10


def random_problem(rng: random.Random) -> dict:
    """A 2-digit + 2-digit addition with a units carry."""
    while True:
        a, b = rng.randint(10, 99), rng.randint(10, 99)
        if carries(a, b):
            return arithmetic.make_problem(a, b, "+")


def load(split: str, seed: int = 0, *, n: int | None = None) -> list[dict]:
    """``n`` distinct problems of ``split`` (``train`` 2,000 or ``eval`` 200 by default)."""
    if n is None:
        n = NUM_TRAIN if split == "train" else NUM_EVAL
    return draw_rows(random_problem, split, n, seed, arithmetic.EVAL_FRACTION)


def reward_model() -> RewardModel:
    """The arithmetic reward: exact match, with feedback that never contains the answer."""
    return arithmetic.reward_model()
