"""Built-in tasks: deterministic disjoint splits, correct answers, rewards, helpful errors."""

from __future__ import annotations

import random
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
    prompts, answers = ["Q: 500+500="] * 6, ["1000"] * 6
    out = reward(prompts, ["1000", "999", "1001", "1100", "ten", "10000"], answer=answers)
    assert out[0].feedback is None
    assert out[1].feedback == (
        "Your answer 999 has three digits; the correct answer has four. Its last digit is wrong."
    )
    assert out[2].feedback == "Your answer 1001 is too large. Its last digit is wrong."
    assert out[3].feedback == "Your answer 1100 is too large. Its last digit is right."
    assert "not a whole number" in out[4].feedback
    # An attempt that contains the answer is not named.
    assert out[5].feedback == (
        "Your answer has five digits; the correct answer has four. Its last digit is right."
    )
    assert all("1000" not in (o.feedback or "") for o in out)
    low = reward(["Q: 58+67="], ["115"], answer=["125"])[0]
    assert low.feedback == "Your answer 115 is too small. Its last digit is right."
    assert task_reward_model("arithmetic_hard")(["Q: 58+67="], ["115"], answer=["125"])[0] == low


def test_arithmetic_feedback_never_contains_the_answer():
    rng = random.Random(0)
    cases = [("-12", "12"), ("012", "12"), ("+12", "12"), ("1212", "12"), ("3", "2"), ("21", "1")]
    for _ in range(20_000):
        answer = str(rng.choice([rng.randrange(10), rng.randrange(1000), rng.randrange(10**6)]))
        given = rng.choice(
            [
                str(rng.randrange(10 ** rng.randint(1, 7))),
                str(int(answer) + rng.randint(-12, 12)),
                rng.choice(["", "-", "0", "+", "1"]) + answer + rng.choice(["", "0", "7", "1"]),
                answer[1:] or "0",
                answer[:-1] + str(rng.randrange(10)),
            ]
        )
        cases.append((given, answer))
    for given, answer in cases:
        feedback = arithmetic.feedback_for(given, answer)
        assert (feedback is None) == (given == answer)
        assert feedback is None or answer not in feedback, (given, answer, feedback)


def test_unknown_task_names_the_closest():
    with pytest.raises(
        KeyError,
        match=r"arithmetic.*Available tasks: arithmetic, arithmetic_hard, code, listprog, "
        r"listprog_shaped, listprog_shuffled, reversal",
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
