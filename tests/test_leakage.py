"""Leakage controls (sdpo.leakage): the feedback leak guard and the copy-rate metric."""

from __future__ import annotations

import pytest
from conftest import make_trainer, scored_batch

from sdpo.config import SelfDistillationConfig
from sdpo.leakage import REDACTED, copy_rate, guard_feedback, ngrams
from sdpo.reprompting import Reprompter
from sdpo.reward_model import RewardModel, RewardOutput


def test_guard_redacts_the_reference_as_a_whole_token_and_counts():
    fb = ["the answer is 42.", "your attempt 142 is wrong", None, "close, 42"]
    info = [{"reference_answer": "42"}, {"reference_answer": "42"}, {"reference_answer": "7"}, {}]
    out, n = guard_feedback(fb, info, "redact")
    assert out == [f"the answer is {REDACTED}.", "your attempt 142 is wrong", None, "close, 42"]
    assert n == 1  # row 3 declared nothing: its feedback is not checked
    assert guard_feedback(fb, [{}] * 4, "redact") == (fb, None)  # nothing declared: no metric
    assert guard_feedback(fb, info, "off") == (fb, None)
    with pytest.raises(ValueError, match=r"row 0 .*reference answer '42'.*feedback_leak_guard"):
        guard_feedback(fb, info, "refuse")


class LeakyReward(RewardModel):
    """Every failure's feedback names the answer (the leak a user's environment can have)."""

    name = "leaky"

    def __call__(self, prompts, completions, answer, **columns):
        return [
            RewardOutput(
                float(c.strip() == a), feedback=f"wrong: it is {a}", info={"reference_answer": a}
            )
            for c, a in zip(completions, answer, strict=True)
        ]


def test_trainer_redacts_a_declared_answer_before_the_teacher_sees_it(tmp_path):
    trainer = make_trainer(tmp_path / "run", reward=LeakyReward())
    rollouts, contexts = scored_batch(trainer)
    assert rollouts.reward_metrics["feedback/redacted"] == len(rollouts)
    for row, ctx in zip(rollouts.rows, contexts, strict=True):
        assert ctx is not None and ctx.used_feedback
        assert f"it is {REDACTED}" in ctx.prompt and f"it is {row['answer']}" not in ctx.prompt
    refusing = make_trainer(
        tmp_path / "r2", reward=LeakyReward(), data__feedback_leak_guard="refuse"
    )
    with pytest.raises(ValueError, match="reference answer"):
        scored_batch(refusing)


def test_copy_rate_counts_source_ngrams_not_in_the_question():
    question = "Tom has 3 apples. How many?"
    demo = "Anna has 5 pears, so Anna has 5."
    # completion bigrams: (anna,has) (has,3) (3,apples) (apples,.) -> (anna,has) is in the demo
    # and not in the question; (has,3) and (3,apples) are in the question
    assert copy_rate("Anna has 3 apples.", [demo], question, n=2) == pytest.approx(1 / 4)
    assert copy_rate("Anna has 3 apples.", [], question, n=2) is None
    assert copy_rate("x", [demo], question, n=2) is None
    assert ngrams("A b. c", 2) == {("a", "b"), ("b", "."), (".", "c")}


def test_reprompter_logs_copy_rate_from_demonstrations_and_example_turns():
    chat = [
        {"role": "user", "content": "Worked example: Anna buys 2 pens."},
        {"role": "assistant", "content": "Anna buys 2 pens, so 2."},
        {"role": "user", "content": "Bob buys 4 cups. How many?"},
    ]
    rp = Reprompter(SelfDistillationConfig(copy_rate_ngram=2))
    rp.build([chat, chat], ["Anna buys 4", "4"], [1.0, 0.0], [0, 0])
    # row 0: bigrams (anna,buys) (buys,4): (anna,buys) in the example turns only -> 1/2;
    # row 1: "4" has no bigram -> not counted
    assert rp.last_stats["copy_rate"] == pytest.approx(0.5)
    plain = Reprompter(SelfDistillationConfig())
    plain.build(["q"], ["a"], [1.0], [0])
    assert "copy_rate" not in plain.last_stats
