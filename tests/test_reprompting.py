"""Reprompting: which demonstration and feedback each completion's teacher sees, and how."""

from __future__ import annotations

import dataclasses
import random
from pathlib import Path

import pytest
import torch

from sdpo.config import SDPOConfig, SelfDistillationConfig
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


CHAT = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Tom has 3 apples and gets 2. How many?"},
    {"role": "assistant", "content": "Tom has 5."},
    {"role": "system", "content": "Answer in one line."},
    {"role": "user", "content": "What is 2+2?"},
]


def test_chat_teacher_is_system_messages_and_one_user_turn():
    # The official construction (SPEC section 3): the earlier user/assistant turns (a worked
    # example) are not turns of the teacher's context, or "the original question" points at them.
    original = [dict(m) for m in CHAT]
    contexts = make().build([CHAT, CHAT], ["4", "5"], [1.0, 0.0], [0, 0])
    assert CHAT == original  # not mutated
    assert contexts[1].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": "What is 2+2?\nCorrect solution:\n\n4\n\n" + INSTRUCTION},
    ]


def test_chat_earlier_turns_folded_into_the_question_on_request():
    contexts = make(chat_earlier_turns="fold").build([CHAT, CHAT], ["4", "5"], [1.0, 0.0], [0, 0])
    question = (
        "user: Tom has 3 apples and gets 2. How many?\n\nassistant: Tom has 5.\n\n"
        "user: What is 2+2?"
    )
    assert contexts[1].prompt == [
        {"role": "system", "content": "Be brief."},
        {"role": "system", "content": "Answer in one line."},
        {"role": "user", "content": question + "\nCorrect solution:\n\n4\n\n" + INSTRUCTION},
    ]
    # A single-turn chat has nothing to fold: both settings give the same context.
    single = [CHAT[0], CHAT[-1]]
    args = ([single] * 2, ["4", "5"], [1.0, 0.0], [0, 0])
    assert make(chat_earlier_turns="fold").build(*args)[1] == make().build(*args)[1]


def test_chat_without_user_message_and_unknown_setting_raise():
    with pytest.raises(ValueError, match="needs a user message"):
        make().build([[CHAT[0]]] * 2, ["4", "5"], [1.0, 0.0], [0, 0])
    with pytest.raises(ValueError, match="chat_earlier_turns"):
        SDPOConfig.from_dict({"self_distillation": {"chat_earlier_turns": "keep"}})


def _teacher_last_logits(model, tokenizer, prompt):
    from sdpo.policy_model import PolicyModel

    policy = PolicyModel(model=model, tokenizer=tokenizer, device="cpu")
    ids = torch.tensor([policy.encode_prompt(prompt)])
    with torch.no_grad():
        return model(input_ids=ids).logits[0, -1]


def test_teacher_logits_do_not_depend_on_earlier_turns(tiny_llama):
    # Model level: two prompts that differ only in their worked example give the same teacher
    # distribution (the worked example is not in the teacher's context), and the student's
    # distributions differ (it is in the student's).
    model, tokenizer = tiny_llama
    tokenizer.chat_template = (
        "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<assistant>{% endif %}"
    )
    other = [dict(m) for m in CHAT]
    other[1]["content"], other[2]["content"] = "Mia has 9 pens, loses 4. How many?", "Mia has 5."
    teachers = []
    for prompt in (CHAT, other):
        context = make().build([prompt] * 2, ["4", "5"], [1.0, 0.0], [0, 0])[1].prompt
        teachers.append(_teacher_last_logits(model, tokenizer, context))
    torch.testing.assert_close(teachers[0], teachers[1], rtol=0, atol=0)
    students = [_teacher_last_logits(model, tokenizer, p) for p in (CHAT, other)]
    assert (students[0] - students[1]).abs().max() > 1e-4


SMOLLM2 = Path(__file__).resolve().parent.parent / "models" / "smollm2-135m-instruct"


@pytest.mark.slow
@pytest.mark.skipif(
    not (SMOLLM2 / "config.json").exists(), reason="SmolLM2 not fetched (scripts/fetch_smollm2.py)"
)
def test_smollm2_teacher_prefers_the_questions_name_not_the_worked_examples():
    # The regression the audit measured: with the worked example as an earlier turn, the
    # feedback-only teacher preferred the example's name "Tom" as its first token (log-odds
    # -0.52) while the student preferred the question's own name (+8.35). With the official
    # construction the teacher's log-odds stay within 1 nat of the student's on average
    # (measured: student 8.35, teacher 7.90; before the fix -0.52).
    import importlib.util

    from sdpo.policy_model import PolicyModel

    spec = importlib.util.spec_from_file_location(
        "fetch_smollm2", SMOLLM2.parent.parent / "scripts" / "fetch_smollm2.py"
    )
    fetch = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fetch)
    policy = PolicyModel(str(SMOLLM2), device="cpu", dtype="float32")
    tok = policy.tokenizer
    rng = random.Random(0)
    feedback = "No final answer found. Write the final answer as \\boxed{...}."
    student, teacher = [], []
    while len(student) < 10:
        question, _ = fetch.word_problem(rng)
        name = question.split()[0]
        if name == "Tom":
            continue
        ids = [tok(n, add_special_tokens=False)["input_ids"][0] for n in (name, "Tom")]
        prompt = fetch.chat_prompt(question)
        context = make().build([prompt], ["x"], [0.0], [0], feedback=[feedback])[0].prompt
        for out, p in ((student, prompt), (teacher, context)):
            with torch.no_grad():
                logits = policy.model(input_ids=torch.tensor([policy.encode_prompt(p)])).logits
            logp = torch.log_softmax(logits[0, -1].double() / 0.7, -1)  # the example's T
            out.append(float(logp[ids[0]] - logp[ids[1]]))
    s, t = sum(student) / 10, sum(teacher) / 10
    assert s > 5.0, student  # the student's own preference (measured 8.35)
    assert abs(t - s) < 1.0, (s, t, teacher)


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
        "from_memory",
        "contrast_prompt",
    ]


def test_tensor_rewards_and_group_ids():
    import torch

    contexts = make().build(
        ["q"] * 4, list("abcd"), torch.tensor([1.0, 0.0, 1.0, 0.0]), torch.tensor([0, 0, 1, 1])
    )
    assert demo_indices(contexts) == [None, 0, None, 2]
