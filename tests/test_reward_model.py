"""Reward models: answer extraction, equivalence, feedback that never leaks the answer, adapters."""

from __future__ import annotations

import math
import threading

import pytest
from helpers import MATH_CASES

from sdpo.reward_model import (
    CombinedRewardModel,
    FunctionRewardModel,
    MathRewardModel,
    MissingColumnError,
    RewardFunctionError,
    RewardModel,
    RewardOutput,
    RuleBasedCodeRewardModel,
    VerifiableRewardModel,
    as_reward_model,
    extract_boxed,
    extract_code,
    extract_math_answer,
)

# ----- math ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("so \\boxed{42}.", "42"),
        ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
        ("\\boxed{\\frac{\\sqrt{3}}{2}} done", "\\frac{\\sqrt{3}}{2}"),
        ("first \\boxed{1} then \\boxed{2}", "2"),
        ("\\boxed{3} and an unclosed \\boxed{4", "3"),
        ("no box here", None),
    ],
)
def test_extract_boxed_balanced_and_last(text, expected):
    assert extract_boxed(text) == expected


@pytest.mark.parametrize(
    ("text", "answer", "method"),
    [
        ("work \\boxed{7}; the answer is 8", "7", "boxed"),
        ("So the answer is 3.5. Done", "3.5", "answer_is"),
        ("The final answer is $\\frac{1}{2}$.", "$\\frac{1}{2}$", "answer_is"),
        ("steps\n**Answer:** 12\n", "12", "answer_colon"),
        ("I count 3 apples, then 5 pears, 1,000 total", "1,000", "last_number"),
        ("nothing numeric", None, None),
    ],
)
def test_extract_math_answer_order(text, answer, method):
    assert extract_math_answer(text) == (answer, method)


@pytest.mark.parametrize(
    ("completion", "gold", "score"),
    [
        ("\\boxed{\\frac{1}{2}}", "0.5", 1.0),
        ("\\boxed{0.5}", "\\frac{1}{2}", 1.0),
        ("\\boxed{2.0}", "2", 1.0),
        ("\\boxed{1+x}", "x+1", 1.0),
        ("\\boxed{3}", "4", 0.0),
        ("\\boxed{5}", "so the result is \\boxed{5}", 1.0),  # gold given as a full solution
    ],
)
def test_math_equivalence(completion, gold, score):
    out = MathRewardModel()(["q"], [completion], answer=[gold])[0]
    assert out.score == score
    assert out.feedback is None


@pytest.mark.parametrize(("completion", "gold", "default", "lenient"), MATH_CASES)
def test_math_default_is_last_boxed_and_lenient_keeps_the_fallbacks(
    completion, gold, default, lenient
):
    out = MathRewardModel()(["q"], [completion], answer=[gold])[0]
    assert out.score == default
    # no \\boxed{} at all: format feedback; a boxed wrong answer: none (it would leak nothing new)
    assert (out.feedback is not None) == ("boxed" not in completion and "fbox" not in completion)
    assert MathRewardModel(extraction="lenient")(["q"], [completion], answer=[gold])[0].score == (
        lenient
    )


def test_math_rejects_unknown_extraction():
    with pytest.raises(ValueError, match="lenient"):
        MathRewardModel(extraction="last_number")


def test_math_info_carries_extracted_answer_and_uses_solution_column():
    out = MathRewardModel()(["q"], ["x \\boxed{\\frac{3}{4}}"], solution=["\\boxed{0.75}"])[0]
    assert out.score == 1.0
    assert out.info["extracted_answer"] == "\\frac{3}{4}"
    assert out.info["extraction"] == "boxed"


def test_math_works_off_the_main_thread():
    # math_verify's default timeouts use signal.alarm, which raises off the main thread.
    results = []
    thread = threading.Thread(
        target=lambda: results.append(MathRewardModel()(["q"], ["\\boxed{0.5}"], answer=["1/2"]))
    )
    thread.start()
    thread.join()
    assert results and results[0][0].score == 1.0


def test_math_format_feedback_never_contains_the_answer():
    golds = ["7391", "\\frac{17}{29}", "x^{13}", "0.8123", "-4096"]
    completions = [
        "",
        "I do not know.",
        "\\boxed{}",
        "\\boxed{\\frac{1}{}}",
        "the answer is ??",
        "\\boxed{3}",
        "\\boxed{\\frac{1}{2}}",
    ]
    model = MathRewardModel()
    seen_feedback = 0
    for gold in golds:
        outs = model(["q"] * len(completions), completions, answer=[gold] * len(completions))
        for out in outs:
            assert out.score == 0.0
            if out.feedback:
                seen_feedback += 1
                assert gold not in out.feedback
                assert gold.strip("\\") not in out.feedback
    assert seen_feedback >= 2 * len(golds)  # format problems do get feedback


def test_math_wrong_answer_gets_no_feedback_and_missing_answer_does():
    model = MathRewardModel()
    wrong, missing = model(["q", "q"], ["\\boxed{3}", "no idea"], answer=["4", "4"])
    assert wrong.feedback is None
    assert "boxed" in missing.feedback


def test_missing_column_names_it_and_lists_given():
    with pytest.raises(KeyError) as err:
        MathRewardModel()(["q"], ["\\boxed{1}"], tests=["t"])
    assert isinstance(err.value, MissingColumnError)
    assert "'answer'" in str(err.value) and "'solution'" in str(err.value)
    assert "tests" in str(err.value)


# ----- code ---------------------------------------------------------------------------------------


def test_extract_code_longest_block():
    text = "```python\nx = 1\n```\nthen\n```\ndef f():\n    return 2\n```\n```bash\nls -la /very/long/path\n```"
    assert extract_code(text) == "def f():\n    return 2\n"
    assert extract_code("no code") is None


def test_code_syntax_error_names_line():
    completion = "```python\ndef f(x):\n    y = x +\n    return y\n```"
    out = RuleBasedCodeRewardModel()(["q"], [completion])[0]
    assert out.score == 0.0
    assert "line 2" in out.feedback and "SyntaxError" in out.feedback
    assert out.info["error_line"] == 2


def test_code_no_block_is_format_feedback():
    out = RuleBasedCodeRewardModel()(["q"], ["def f(): pass"])[0]
    assert out.score == 0.0 and "code block" in out.feedback


def test_code_function_requirement_from_column_and_argument():
    good = "```python\ndef add(a, b):\n    return a + b\n```"
    other = "```python\ndef sub(a, b):\n    return a - b\n```"
    outs = RuleBasedCodeRewardModel()(["q", "q"], [good, other], function_name=["add", "add"])
    assert [o.score for o in outs] == [1.0, 0.0]
    assert "add" in outs[1].feedback
    fixed = RuleBasedCodeRewardModel(require_function="sub")
    assert [o.score for o in fixed(["q", "q"], [good, other])] == [0.0, 1.0]
    assert RuleBasedCodeRewardModel()(["q"], [other])[0].score == 1.0  # no requirement


# ----- verifiable ---------------------------------------------------------------------------------


def test_verifiable_exact_normalized():
    model = VerifiableRewardModel()
    outs = model(
        ["q"] * 4, ["933", "  The  Cat. ", "934", "9330"], answer=["933", "the cat", "933", "933"]
    )
    assert [o.score for o in outs] == [1.0, 1.0, 0.0, 0.0]
    strict = VerifiableRewardModel(normalize=False)
    assert strict(["q"], ["The cat"], answer=["the cat"])[0].score == 0.0


def test_verifiable_contains_regex_and_extract():
    contains = VerifiableRewardModel(mode="contains")
    assert [
        o.score for o in contains(["q", "q"], ["it is Paris.", "Rome"], answer=["paris", "paris"])
    ] == [1.0, 0.0]
    regex = VerifiableRewardModel(mode="regex")
    assert [o.score for o in regex(["q", "q"], ["B", "B or C"], answer=["[AB]", "[AB]"])] == [
        1.0,
        0.0,
    ]
    tagged = VerifiableRewardModel(extract=r"<answer>(.*?)</answer>")
    outs = tagged(
        ["q"] * 3,
        ["<answer>x</answer> <answer>C</answer>", "<answer>\nC\n</answer>", "C"],
        answer=["c"] * 3,
    )
    assert [o.score for o in outs] == [1.0, 1.0, 0.0]
    assert outs[0].info["extracted_answer"] == "C"
    assert "expected format" in outs[2].feedback
    with pytest.raises(ValueError, match="mode"):
        VerifiableRewardModel(mode="fuzzy")


def test_verifiable_feedback_only_for_format_and_never_the_answer():
    model = VerifiableRewardModel(extract=r"ANSWER=(\w+)")
    outs = model(["q"] * 3, ["", "I think zebra", "ANSWER=horse"], answer=["giraffe"] * 3)
    assert [o.score for o in outs] == [0.0, 0.0, 0.0]
    assert outs[0].feedback and outs[1].feedback and outs[2].feedback is None
    assert all("giraffe" not in (o.feedback or "") for o in outs)


def test_verifiable_accepts_list_of_answers():
    outs = VerifiableRewardModel()(["q", "q"], ["yes", "no"], answer=[["yes", "y"], ["yes", "y"]])
    assert [o.score for o in outs] == [1.0, 0.0]


# ----- function adapter ---------------------------------------------------------------------------


def test_function_return_kinds():
    def mixed(prompts, completions, **kwargs):
        return [
            1,
            None,
            (0.5, "too long"),
            {"score": 0.25, "feedback": "fb", "info": {"k": 1}},
            RewardOutput(2.0),
        ]

    outs = FunctionRewardModel(mixed)(["p"] * 5, ["c"] * 5)
    assert [o.score for o in outs] == [1.0, 0.0, 0.5, 0.25, 2.0]
    assert outs[1].info == {"skipped": True}
    assert outs[2].feedback == "too long"
    assert outs[3].feedback == "fb" and outs[3].info == {"k": 1}
    assert FunctionRewardModel(mixed).name == "mixed"


def test_function_gets_only_the_columns_it_names():
    def needs_answer(completions, answer):
        return [float(c == a) for c, a in zip(completions, answer, strict=True)]

    model = FunctionRewardModel(needs_answer)
    assert [o.score for o in model(["p", "p"], ["1", "2"], answer=["1", "1"], other=[0, 0])] == [
        1.0,
        0.0,
    ]
    with pytest.raises(MissingColumnError, match="answer"):
        model(["p"], ["1"], other=[0])


def test_function_wrong_length_names_function():
    def short(prompts, completions, **kwargs):
        return [1.0]

    with pytest.raises(RewardFunctionError, match="short.*1 items for 2"):
        FunctionRewardModel(short)(["p", "p"], ["a", "b"])


def _breaks_on_bad(prompts, completions, **kwargs):
    return [1.0 / (c != "bad") for c in completions]


def test_function_raise_policy_names_function_index_and_exception():
    with pytest.raises(RewardFunctionError) as err:
        FunctionRewardModel(_breaks_on_bad)(["p"] * 3, ["ok", "ok", "bad"])
    message = str(err.value)
    assert "_breaks_on_bad" in message and "Sample 2" in message and "ZeroDivisionError" in message
    assert isinstance(err.value.__cause__, ZeroDivisionError)


def test_function_zero_policy_zeros_only_failing_samples():
    outs = FunctionRewardModel(_breaks_on_bad, on_error="zero")(["p"] * 3, ["ok", "bad", "ok"])
    assert [o.score for o in outs] == [1.0, 0.0, 1.0]
    assert outs[1].info["reward_error"] is True
    assert "ZeroDivisionError" in outs[1].feedback
    assert not outs[0].info.get("reward_error")


def test_function_zero_policy_batch_only_failure_zeros_all():
    def batch_only(prompts, completions, **kwargs):
        if len(completions) > 1:
            raise RuntimeError("batch too big")
        return [1.0]

    outs = FunctionRewardModel(batch_only, on_error="zero")(["p"] * 2, ["a", "b"])
    assert [o.score for o in outs] == [0.0, 0.0]
    assert all(o.info["reward_error"] and "batch too big" in o.feedback for o in outs)


@pytest.mark.parametrize("on_error", ["raise", "zero"])
@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_function_non_finite_score_raises(on_error, bad):
    def nan_second(prompts, completions, **kwargs):
        return [1.0, bad]

    with pytest.raises(RewardFunctionError, match="nan_second.*sample 1"):
        FunctionRewardModel(nan_second, on_error=on_error)(["p", "p"], ["a", "b"])


# ----- combination --------------------------------------------------------------------------------


def test_combined_weights_feedback_and_info():
    def length_penalty(prompts, completions, **kwargs):
        return [(-0.1, "too long") if len(c) > 3 else 0.0 for c in completions]

    model = CombinedRewardModel([VerifiableRewardModel(), length_penalty], weights=[1.0, 2.0])
    outs = model(["p", "p", "p"], ["933", "933 ", "   "], answer=["933"] * 3)
    assert [o.score for o in outs] == pytest.approx([1.0, 1.0 - 0.2, -0.0])
    assert outs[1].feedback == "too long"  # only one model gave feedback: no prefix
    assert outs[2].feedback == "The response is empty."
    assert outs[1].info["verifiable"]["score"] == 1.0
    assert outs[1].info["length_penalty"]["score"] == -0.1

    def always(prompts, completions, **kwargs):
        return [(0.0, "note")] * len(completions)

    both = CombinedRewardModel([always, VerifiableRewardModel()])(["p"], [""], answer=["1"])[0]
    assert both.feedback == "always: note\n\nverifiable: The response is empty."


def test_combined_rejects_wrong_weight_count():
    with pytest.raises(ValueError, match="2 weights for 1 models"):
        CombinedRewardModel([VerifiableRewardModel()], weights=[1.0, 2.0])


def test_as_reward_model():
    model = VerifiableRewardModel()
    assert as_reward_model(model) is model
    wrapped = as_reward_model(
        lambda prompts, completions, **kw: [1.0] * len(completions), on_error="zero"
    )
    assert isinstance(wrapped, FunctionRewardModel) and wrapped.on_error == "zero"
    combined = as_reward_model([model, MathRewardModel()])
    assert isinstance(combined, CombinedRewardModel) and isinstance(combined, RewardModel)
    assert as_reward_model([model]) is model
    with pytest.raises(TypeError, match="RewardModel"):
        as_reward_model(3)


def test_function_without_completions_argument_is_rejected_early():
    def wrong(p, c):
        return [1.0] * len(c)

    with pytest.raises(TypeError, match="wrong.*completions"):
        FunctionRewardModel(wrong)
