"""Built-in tasks: deterministic disjoint splits, correct answers, rewards, helpful errors."""

from __future__ import annotations

import re

import pytest

from sdpo.tasks import TASKS, arithmetic, load_task, reversal, task_reward_model

GENERATED = ["arithmetic", "reversal"]


@pytest.mark.parametrize("name", GENERATED)
def test_splits_are_deterministic_and_disjoint(name):
    train, again = load_task(name, "train"), load_task(name, "train")
    evaluation = load_task(name, "eval")
    assert train == again
    assert len(train) == len({r["prompt"] for r in train}) > len(evaluation) >= 500
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    assert load_task(name, "train", seed=1) != train
    assert not {r["prompt"] for r in load_task(name, "train", seed=1)} & {
        r["prompt"] for r in evaluation
    }


def test_arithmetic_answers_are_correct():
    for row in load_task("arithmetic", "eval"):
        a, op, b = re.fullmatch(r"Q: (\d+)([-+*])(\d+)=", row["prompt"]).groups()
        assert len(a) == len(b) == arithmetic.DIGITS
        assert int(row["answer"]) == eval(f"{a}{op}{b}")  # noqa: S307 - digits and one operator


@pytest.mark.parametrize("op", ["+", "-", "*"])
def test_arithmetic_options(op):
    rows = arithmetic.load("train", seed=3, n=50, digits=2, operations=(op,))
    assert len(rows) == 50
    for row in rows:
        a, b = re.fullmatch(rf"Q: (\d\d){re.escape(op)}(\d\d)=", row["prompt"]).groups()
        assert int(row["answer"]) == eval(f"{a}{op}{b}") >= 0  # noqa: S307


def test_small_problem_space_returns_every_problem_once():
    rows = arithmetic.load("train", n=1000, digits=1)
    assert len(rows) == len({r["prompt"] for r in rows}) < 100


def test_reversal_answers_are_correct():
    for row in load_task("reversal", "eval"):
        word = re.fullmatch(r"Q: reverse ([a-z]+)=", row["prompt"]).group(1)
        assert reversal.MIN_LENGTH <= len(word) <= reversal.MAX_LENGTH
        assert row["answer"] == word[::-1]


@pytest.mark.parametrize("name", GENERATED)
def test_reward_is_one_for_the_answer_and_zero_otherwise(name):
    rows = load_task(name, "eval")[:4]
    prompts, answers = [r["prompt"] for r in rows], [r["answer"] for r in rows]
    reward = task_reward_model(name)
    right = reward(prompts, [a + "\n" for a in answers], answer=answers)
    wrong = reward(prompts, [a + "0" for a in answers], answer=answers)
    assert [o.score for o in right] == [1.0] * 4
    assert [o.score for o in wrong] == [0.0] * 4


def test_arithmetic_feedback_helps_without_giving_the_answer():
    reward = task_reward_model("arithmetic")
    prompts, answers = ["Q: 500+500="] * 5, ["1000"] * 5
    out = reward(prompts, ["1000", "999", "1001", "1100", "ten"], answer=answers)
    assert out[0].feedback is None
    assert out[1].feedback == "Your answer has 3 digits; the correct answer has 4."
    assert out[2].feedback == "Your answer is too large."
    assert "not a whole number" in out[4].feedback
    assert all("1000" not in (o.feedback or "") for o in out)
    low = reward(["Q: 347+586="], ["930"], answer=["933"])[0]
    assert low.feedback == "Your answer is too small." and "933" not in low.feedback


def test_unknown_task_names_the_closest():
    with pytest.raises(
        KeyError, match=r"arithmetic.*Available tasks: arithmetic, arithmetic_hard, code, reversal"
    ):
        load_task("arithmetc", "train")
    with pytest.raises(ValueError, match="split"):
        load_task("arithmetic", "test")
    assert set(GENERATED) <= set(TASKS)


def test_arithmetic_hard_is_units_carry_additions_with_disjoint_splits():
    train, evaluation = load_task("arithmetic_hard", "train"), load_task("arithmetic_hard", "eval")
    assert len(evaluation) == 200 and len(train) == 2000
    assert not {r["prompt"] for r in train} & {r["prompt"] for r in evaluation}
    for row in train[:200] + evaluation:
        a, b = map(int, row["prompt"][3:-1].split("+"))
        assert 10 <= a <= 99 and 10 <= b <= 99 and a % 10 + b % 10 >= 10
        assert row["answer"] == str(a + b)
