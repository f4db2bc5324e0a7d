"""String reversal: ``Q: reverse kdqzm=`` -> ``mzqdk``, generated from a seed, offline.

Lowercase words of ``MIN_LENGTH`` to ``MAX_LENGTH`` letters; the reward is an exact match on the
``answer`` column.
"""

from __future__ import annotations

import random
import string

from sdpo.reward_model import RewardModel, VerifiableRewardModel
from sdpo.tasks import draw_rows

MIN_LENGTH = 4  # letters in the shortest word
MAX_LENGTH = 8  # letters in the longest word
ALPHABET = string.ascii_lowercase
NUM_TRAIN = 10_000  # rows in the train split
NUM_EVAL = 500  # rows in the eval split
EVAL_FRACTION = 0.1  # share of all problems reserved for eval (by a hash of the prompt)


def make_problem(word: str) -> dict:
    """The row for ``word``: ``{"prompt": "Q: reverse word=", "answer": word[::-1]}``."""
    return {"prompt": f"Q: reverse {word}=", "answer": word[::-1]}


def random_problem(
    rng: random.Random, min_length: int = MIN_LENGTH, max_length: int = MAX_LENGTH
) -> dict:
    """One problem whose word has between ``min_length`` and ``max_length`` letters."""
    length = rng.randint(min_length, max_length)
    return make_problem("".join(rng.choice(ALPHABET) for _ in range(length)))


def load(split: str, seed: int = 0, *, n: int | None = None) -> list[dict]:
    """``n`` distinct problems of ``split`` (default: ``NUM_TRAIN`` / ``NUM_EVAL``)."""
    if n is None:
        n = NUM_TRAIN if split == "train" else NUM_EVAL
    return draw_rows(
        lambda rng: random_problem(rng, MIN_LENGTH, MAX_LENGTH), split, n, seed, EVAL_FRACTION
    )


def reward_model() -> RewardModel:
    """Exact match on ``answer``."""
    return VerifiableRewardModel(mode="exact", answer_column="answer")
