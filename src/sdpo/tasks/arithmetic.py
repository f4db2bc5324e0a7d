"""Arithmetic: ``Q: 347+586=`` -> ``933``, generated from a seed, offline.

With its defaults (two 2-digit operands, addition) this is the quickstart task the demo model is
trained for. Change the module-level defaults (or pass ``digits=``/``operations=`` to :func:`load`)
for other variants; subtraction keeps the larger operand first, so answers are never negative.

The reward is an exact match on the ``answer`` column; a wrong answer gets feedback that helps
without giving the answer away (:func:`feedback_for`: the attempt, too large / too small or its
length versus the right length, and whether its last digit is right).
"""

from __future__ import annotations

import operator
import random

from sdpo.reward_model import Prompt, RewardModel, RewardOutput, VerifiableRewardModel, _text
from sdpo.tasks import draw_rows

DIGITS = 2  # digits of each operand (the demo model is mid-way through learning 2-digit sums)
OPERATIONS = ("+",)  # any of "+", "-", "*"
NUM_TRAIN = 10_000  # rows in the train split
NUM_EVAL = 500  # rows in the eval split
EVAL_FRACTION = 0.1  # share of all problems reserved for eval (by a hash of the prompt)

_APPLY = {"+": operator.add, "-": operator.sub, "*": operator.mul}


def make_problem(a: int, b: int, op: str = "+") -> dict:
    """The row for ``a op b``: ``{"prompt": "Q: a op b=", "answer": str(result)}``."""
    if op not in _APPLY:
        raise ValueError(f"Unknown operation {op!r}; expected one of {', '.join(_APPLY)}.")
    return {"prompt": f"Q: {a}{op}{b}=", "answer": str(_APPLY[op](a, b))}


def random_problem(
    rng: random.Random, digits: int = DIGITS, operations: tuple[str, ...] = OPERATIONS
) -> dict:
    """One problem with two ``digits``-digit operands and an operation drawn from ``operations``."""
    low, high = (0 if digits == 1 else 10 ** (digits - 1)), 10**digits - 1
    a, b = rng.randint(low, high), rng.randint(low, high)
    op = rng.choice(operations)
    if op == "-" and a < b:
        a, b = b, a
    return make_problem(a, b, op)


def load(
    split: str,
    seed: int = 0,
    *,
    n: int | None = None,
    digits: int | None = None,
    operations: tuple[str, ...] | None = None,
) -> list[dict]:
    """``n`` distinct problems of ``split`` (defaults: the module-level constants)."""
    digits = DIGITS if digits is None else digits
    operations = OPERATIONS if operations is None else tuple(operations)
    if n is None:
        n = NUM_TRAIN if split == "train" else NUM_EVAL
    return draw_rows(
        lambda rng: random_problem(rng, digits, operations), split, n, seed, EVAL_FRACTION
    )


_COUNTS = "zero one two three four five six seven eight nine ten eleven twelve".split()


def _count(n: int) -> str:
    """``n`` in words (no digits, so a count can never spell the answer); "many" past twelve."""
    return _COUNTS[n] if n < len(_COUNTS) else "many"


def feedback_for(completion: str, answer: str) -> str | None:
    """Feedback on a wrong ``completion`` that never contains ``answer``; None when it is right.

    A whole-number attempt is named (unless it contains the answer, e.g. ``1250`` for ``125``),
    then compared: too large / too small when the lengths agree, else both lengths (in words), and
    whether its last digit is right. The only digits in the text are the named attempt's, which
    differs from the answer and does not contain it, so the answer never appears::

        Your answer 122 is too small. Its last digit is wrong.
        Your answer 25 has two digits; the correct answer has three. Its last digit is right.
    """
    given = completion.strip()
    if given == answer:
        return None
    try:
        value = int(given)
    except ValueError:
        return "Your answer is not a whole number."
    named = f"Your answer {given}" if answer not in given else "Your answer"
    digits, right_digits = given.lstrip("+-"), answer.lstrip("+-")
    if len(digits) != len(right_digits):
        text = f"{named} has {_count(len(digits))} digits; the correct answer has {_count(len(right_digits))}."
    else:
        text = f"{named} is too {'large' if value > int(answer) else 'small'}."
    last = "right" if digits[-1:] == right_digits[-1:] else "wrong"
    return f"{text} Its last digit is {last}."


class ArithmeticRewardModel(RewardModel):
    """Exact match on ``answer`` (:class:`VerifiableRewardModel`), plus :func:`feedback_for` on misses."""

    name = "arithmetic"

    def __init__(self) -> None:
        self.exact = VerifiableRewardModel(mode="exact", answer_column="answer")

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list
    ) -> list[RewardOutput]:
        outputs = self.exact(prompts, completions, **columns)
        for output, completion, answer in zip(outputs, completions, columns["answer"], strict=True):
            if output.score < 1.0 and output.feedback is None:
                output.feedback = feedback_for(_text(completion), str(answer))
        return outputs


def reward_model() -> RewardModel:
    """Exact match on ``answer``, with :func:`feedback_for`'s feedback (never the answer)."""
    return ArithmeticRewardModel()
