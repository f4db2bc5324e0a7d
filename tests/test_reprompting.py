"""Reprompting: which demonstration and feedback each completion's teacher sees, and how."""

from __future__ import annotations

import dataclasses

import pytest

from sdpo.config import SelfDistillationConfig
from sdpo.demo import build_char_tokenizer
from sdpo.reprompting import (
    TRUNCATION_MARKER,
    Reprompter,
    TeacherContext,
    reprompt_stats,
    strip_thinking,
)

INSTRUCTION = "\n\nCorrectly solve the original question.\n"


def make(**overrides) -> Reprompter:
    return Reprompter(SelfDistillationConfig(**overrides))


def demo_indices(contexts):
    return [None if c is None else c.demonstration_index for c in contexts]


# ----- demonstrations -----------------------------------------------------------------------------


def test_never_self_and_lone_success_gets_none():
    # group 0: successes 0 and 2; group 1: lone success 4.
    rewards = [1.0, 0.0, 1.0, 0.0, 1.0, 0.0]
    groups = [0, 0, 0, 1, 1, 1]
    contexts = make().build(["q0"] * 3 + ["q1"] * 3, list("abcdef"), rewards, groups)
    assert demo_indices(contexts) == [2, 0, 0, 4, None, 4]


def test_self_allowed_when_configured():
    contexts = make(dont_reprompt_on_self_success=False).build(
        ["q"] * 2, ["a", "b"], [1.0, 0.0], [0, 0]
    )
    assert demo_indices(contexts) == [0, 0]


def test_demonstrations_stay_in_their_group_and_threshold_counts():
    rewards = [0.0, 0.7, 0.0, 0.5]
    contexts = make(success_reward_threshold=0.6).build(
        ["q"] * 4, list("abcd"), rewards, [0, 0, 1, 1]
    )
    assert demo_indices(contexts) == [1, None, None, None]


def test_shortest_selection_is_deterministic():
    completions = ["long success", "fail", "ok", "tiny", "x"]
    rewards = [1.0, 0.0, 1.0, 1.0, 0.0]
    contexts = make(demonstration_selection="shortest").build(
        ["q"] * 5, completions, rewards, [0] * 5
    )
    assert demo_indices(contexts) == [2, 2, 3, 2, 2]  # "ok" is shortest; never itself


def test_shortest_measures_the_stripped_demonstration():
    completions = ["<think>" + "x" * 50 + "</think>A", "BB", "fail"]
    contexts = make(demonstration_selection="shortest").build(
        ["q"] * 3, completions, [1, 1, 0], [0] * 3
    )
    assert contexts[2].demonstration_index == 0


def test_random_selection_reproducible_and_only_successes():
    completions = [f"c{i}" for i in range(12)]
    rewards = [1.0 if i % 3 == 0 else 0.0 for i in range(12)]  # successes 0, 3, 6, 9
    args = (["q"] * 12, completions, rewards, [0] * 12)
    first = [
        demo_indices(
            Reprompter(SelfDistillationConfig(demonstration_selection="random"), seed=7).build(
                *args
            )
        )
        for _ in range(2)
    ]
    assert first[0] == first[1]
    picks = []
    reprompter = Reprompter(SelfDistillationConfig(demonstration_selection="random"), seed=7)
    for _ in range(20):
        indices = demo_indices(reprompter.build(*args))
        assert all(j in {0, 3, 6, 9} for j in indices)
        assert all(j != i for i, j in enumerate(indices))
        picks.extend(indices)
    assert len(set(picks)) == 4  # not stuck on the first success


# ----- feedback -----------------------------------------------------------------------------------


def _feedback_case(**overrides):
    # 0: success, 1: failure with feedback (has a demo), 2: failure with empty feedback in a
    # group without success, 3: failure with feedback, no success in group.
    return make(**overrides).build(
        ["q"] * 4,
        ["good", "bad1", "bad2", "bad3"],
        [1.0, 0.0, 0.0, 0.0],
        [0, 0, 1, 1],
        feedback=[None, "err1", "  ", "err3"],
    )


def test_feedback_only_without_solution():
    contexts = _feedback_case()
    assert [c and c.used_feedback for c in contexts] == [None, False, None, True]
    assert "err1" not in contexts[1].prompt
    assert "err3" in contexts[3].prompt and contexts[3].demonstration_index is None


def test_feedback_always():
    contexts = _feedback_case(environment_feedback_only_without_solution=False)
    assert (
        contexts[1].used_feedback and "err1" in contexts[1].prompt and "good" in contexts[1].prompt
    )
    assert contexts[2] is None  # whitespace-only feedback is no feedback


def test_feedback_disabled():
    contexts = _feedback_case(
        include_environment_feedback=False, environment_feedback_only_without_solution=False
    )
    assert [c is not None for c in contexts] == [False, True, False, False]
    assert not contexts[1].used_feedback


# ----- text ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("<think>hmm</think>\nThe answer is 4.", "The answer is 4."),
        ("a<think>x</think>b<think>y</think>c", "abc"),
        ("reasoning without opener</think> 7", "7"),
        ("<think>never closed", "<think>never closed"),  # kept, as the official regex does
        ("plain", "plain"),
        ("<think>plan</think>\n\n    return x\n", "    return x"),  # indentation kept
        ("    if a:\n        b()\n\n", "    if a:\n        b()"),
    ],
)
def test_strip_thinking(text, expected):
    assert strip_thinking(text) == expected


def test_thinking_stripped_from_demonstration_only_when_enabled():
    args = (["Q?"] * 2, ["<think>secret</think>42", "0"], [1.0, 0.0], [0, 0])
    assert "secret" not in make().build(*args)[1].prompt
    assert (
        "<think>secret</think>42"
        in make(remove_thinking_from_demonstration=False).build(*args)[1].prompt
    )


def test_exact_default_template_text():
    contexts = make(environment_feedback_only_without_solution=False).build(
        ["What is 2+2?", "What is 2+2?"],
        ["4", "5"],
        [1.0, 0.0],
        [0, 0],
        feedback=[None, "off by one"],
    )
    assert contexts[1].prompt == (
        "What is 2+2?"
        "\nCorrect solution:\n\n4\n\n"
        "\nThe following is feedback from your unsuccessful earlier attempt:\n\noff by one\n\n"
        "\n\nCorrectly solve the original question.\n"
    )
    only_feedback = make().build(["Q"], ["x"], [0.0], [0], feedback=["bad"])[0]
    assert only_feedback.prompt == (
        "Q\nThe following is feedback from your unsuccessful earlier attempt:\n\nbad\n\n"
        "\n\nCorrectly solve the original question.\n"
    )


def test_custom_templates():
    reprompter = make(
        reprompt_template="[{prompt}|{solution}|{feedback}]",
        solution_template="S={successful_previous_attempt}",
        feedback_template="F={feedback_raw}",
    )
    assert reprompter.build(["Q", "Q"], ["a", "b"], [1, 0], [0, 0])[1].prompt == "[Q|S=a|]"


def test_chat_prompt_keeps_system_and_replaces_last_user():
    prompt = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "What is 2+2?"},
    ]
    original = [dict(m) for m in prompt]
    contexts = make().build([prompt, prompt], ["4", "5"], [1.0, 0.0], [0, 0])
    messages = contexts[1].prompt
    assert prompt == original  # not mutated
    assert messages[:3] == original[:3]
    assert messages[3]["role"] == "user"
    assert messages[3]["content"] == "What is 2+2?\nCorrect solution:\n\n4\n\n" + INSTRUCTION


# ----- length limit -------------------------------------------------------------------------------


def test_length_limit_shortens_demonstration_not_question_or_instruction():
    tokenizer = build_char_tokenizer()
    question = "Q: 347+586="
    demo = "933 because " + "carry the one " * 20
    full = make().build([question] * 2, [demo, "0"], [1, 0], [0, 0])[1].prompt
    limit = len(tokenizer(full)["input_ids"]) - 100
    reprompter = Reprompter(SelfDistillationConfig(max_reprompt_len=limit), tokenizer=tokenizer)
    context = reprompter.build([question] * 2, [demo, "0"], [1.0, 0.0], [0, 0])[1]
    text = context.prompt
    assert len(tokenizer(text)["input_ids"]) <= limit
    assert len(tokenizer(text)["input_ids"]) > limit - 20  # the search keeps as much as fits
    assert text.startswith(question + "\nCorrect solution:\n\n933 because")
    assert text.endswith(TRUNCATION_MARKER + "\n\n" + INSTRUCTION)
    assert reprompter.last_stats["truncated"] == 1.0
    assert reprompter.last_stats["dropped_too_long"] == 0.0


def test_length_limit_shortens_feedback_too():
    tokenizer = build_char_tokenizer()
    feedback = "Traceback: " + "line " * 100
    reprompter = Reprompter(SelfDistillationConfig(max_reprompt_len=200), tokenizer=tokenizer)
    context = reprompter.build(["Q"], ["x"], [0.0], [0], feedback=[feedback])[0]
    assert context.used_feedback and len(tokenizer(context.prompt)["input_ids"]) <= 200
    assert "Traceback:" in context.prompt and TRUNCATION_MARKER in context.prompt
    assert context.prompt.endswith(INSTRUCTION)


def test_too_small_limit_drops_and_counts():
    tokenizer = build_char_tokenizer()
    reprompter = Reprompter(SelfDistillationConfig(max_reprompt_len=30), tokenizer=tokenizer)
    contexts = reprompter.build(["Q"] * 3, ["a", "b", "c"], [1.0, 0.0, 0.0], [0, 0, 0])
    assert contexts == [None, None, None]
    assert reprompter.last_stats["dropped_too_long"] == 2.0
    assert reprompter.last_stats["reprompt_sample_fraction"] == 0.0


def test_length_of_chat_prompt_uses_chat_template():
    tokenizer = build_char_tokenizer()
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    prompt = [{"role": "system", "content": "S"}, {"role": "user", "content": "Q"}]
    demo = "d" * 300
    plain = (
        Reprompter(SelfDistillationConfig())
        .build([prompt] * 2, [demo, "x"], [1, 0], [0, 0])[1]
        .prompt
    )
    rendered_len = len(
        tokenizer.apply_chat_template(plain, add_generation_prompt=True, tokenize=True)["input_ids"]
    )
    limit = rendered_len - 50
    reprompter = Reprompter(SelfDistillationConfig(max_reprompt_len=limit), tokenizer=tokenizer)
    messages = reprompter.build([prompt] * 2, [demo, "x"], [1, 0], [0, 0])[1].prompt
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)[
        "input_ids"
    ]
    assert limit - 20 < len(ids) <= limit
    assert messages[0] == {"role": "system", "content": "S"}
    assert messages[1]["content"].startswith("Q\nCorrect solution:") and messages[1][
        "content"
    ].endswith(INSTRUCTION)


# ----- statistics ---------------------------------------------------------------------------------


def test_stats_by_hand():
    rewards = [1.0, 0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 0.0]
    groups = [0, 0, 1, 1, 2, 2, 3, 3]
    feedback = [None, None, "e", None, None, None, None, None]
    reprompter = make()
    contexts = reprompter.build(["q"] * 8, list("abcdefgh"), rewards, groups, feedback=feedback)
    # contexts: 1 (demo 0), 2 (feedback), 4 (demo 5), 7 (demo 6)
    assert [c is not None for c in contexts] == [False, True, True, False, True, False, False, True]
    assert reprompter.last_stats == {
        "success_group_fraction": 3 / 4,
        "success_sample_fraction": 3 / 8,  # samples given a demonstration (1, 4, 7)
        "reprompt_sample_fraction": 4 / 8,
        "feedback_used_fraction": 1 / 8,
        "dropped_too_long": 0.0,
        "truncated": 0.0,
    }


def test_reprompt_stats_pure_function():
    contexts = [None, TeacherContext("p", 0, True), TeacherContext("p", None, True)]
    stats = reprompt_stats(contexts, [1.0, 0.5, 0.0], [0, 0, 1], threshold=0.5)
    assert stats == {
        "success_group_fraction": 0.5,
        # the official meaning: samples given a demonstration (successes / N = 2/3 is accuracy)
        "success_sample_fraction": 1 / 3,
        "reprompt_sample_fraction": 2 / 3,
        "feedback_used_fraction": 2 / 3,
    }
    assert all(v == 0.0 for v in reprompt_stats([], [], [], 1.0).values())


def test_mismatched_lengths_raise():
    with pytest.raises(ValueError, match="rewards has 1 entries for 2"):
        make().build(["q", "q"], ["a", "b"], [1.0], [0, 0])


def test_teacher_context_fields():
    assert [f.name for f in dataclasses.fields(TeacherContext)] == [
        "prompt",
        "demonstration_index",
        "used_feedback",
    ]


def test_tensor_rewards_and_group_ids():
    import torch

    contexts = make().build(
        ["q"] * 4, list("abcd"), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1])
    )
    assert demo_indices(contexts) == [None, 0, None, 2]
