"""The list-program task: generation, splits, the interpreter against an independent reference,
feedback that never leaks a hidden test, and the reward path through the real trainer."""

from __future__ import annotations

import itertools
import json
import random

import pytest

from sdpo.tasks import listprog as lp
from sdpo.tasks import load_task, task_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def train_rows():
    return lp.load("train", n=300)


@pytest.fixture(scope="module")
def eval_rows():
    return lp.load("eval", n=100)


def test_generation_is_deterministic_and_seeded(train_rows):
    assert lp.load("train", n=300) == train_rows
    assert lp.load("train", seed=1, n=50) != train_rows[:50]


def test_splits_are_disjoint_by_behaviour(train_rows, eval_rows):
    model_rows = lp.draw_tasks("model", 300)
    keys = {
        name: {lp.split_key(lp.parse(r["program"])) for r in rows}
        for name, rows in (("train", train_rows), ("eval", eval_rows), ("model", model_rows))
    }
    for a, b in itertools.combinations(keys, 2):
        assert not keys[a] & keys[b], (a, b)
    # every task's behaviour is distinct within its split, and equal functions share a split
    assert len(keys["train"]) == len(train_rows)
    assert lp.split_of(lp.parse("sort | rev | take 2")) == lp.split_of(
        lp.parse("rev | sort | rev | take 2")
    )
    with pytest.raises(ValueError, match="Unknown split"):
        lp.load("test")


def test_rows_are_consistent(train_rows):
    for row in train_rows:
        steps = lp.parse(row["program"])
        assert 2 <= len(steps) <= 4
        assert len(row["shown"]) == lp.NUM_SHOWN and len(row["tests"]) >= 5
        assert row["prompt"] == lp.make_prompt(row["shown"])
        assert all(lp.passes(row["program"], row["shown"] + row["tests"]))
        inputs = [tuple(xs) for xs, _ in row["shown"] + row["tests"]]
        assert len(set(inputs)) == len(inputs)
    assert load_task("listprog", "eval")[:3] == lp.load("eval")[:3]


# ----- the interpreter against a reference written independently (no shared code) --------------


def reference(name: str, arg, xs):
    """Each primitive with Python builtins/itertools; ``"error"`` where the language errors."""
    if not isinstance(xs, list):
        return "error"
    if name == "rev":
        return list(reversed(xs))
    if name == "sort":
        return sorted(xs)
    if name == "uniq":
        return list(dict.fromkeys(xs))
    if name == "even":
        return list(filter(lambda x: not x & 1, xs))
    if name == "odd":
        return list(filter(lambda x: x & 1, xs))
    if name == "add":
        return list(map(arg.__add__, xs))
    if name == "mul":
        return list(map(arg.__mul__, xs))
    if name == "take":
        return list(itertools.islice(xs, arg)) if arg <= len(xs) else "error"
    if name == "drop":
        return list(itertools.islice(xs, arg, None)) if arg <= len(xs) else "error"
    if name == "sum":
        return sum(xs)
    if name == "max":
        return max(xs) if xs else "error"
    if name == "len":
        return len(xs)
    raise AssertionError(name)


def test_interpreter_matches_reference_per_primitive():
    rng = random.Random(0)
    for _ in range(3000):
        name = rng.choice(list(lp.PRIMITIVES))
        arg = rng.randint(0, 9) if lp.PRIMITIVES[name][0] is not None else None
        xs = [rng.randrange(10) for _ in range(rng.randint(0, 8))]
        want = reference(name, arg, xs)
        steps = [(name, arg)]
        if want == "error":
            with pytest.raises(lp.RunError, match="step 1"):
                lp.run(steps, xs)
        else:
            assert lp.run(steps, xs) == want, (name, arg, xs)


def test_interpreter_matches_reference_on_random_programs():
    rng = random.Random(1)
    for _ in range(2000):
        steps = [
            (n, rng.randint(0, 9) if lp.PRIMITIVES[n][0] is not None else None)
            for n in rng.choices(list(lp.PRIMITIVES), k=rng.randint(1, 5))
        ]
        xs = [rng.randrange(10) for _ in range(rng.randint(0, 8))]
        value, failed_at = xs, None
        for i, (name, arg) in enumerate(steps, start=1):
            value = reference(name, arg, value)
            if value == "error":
                failed_at = i
                break
        if failed_at is None:
            assert lp.run(steps, xs) == value
            assert lp.parse(lp.format_program(steps)) == steps
        else:
            with pytest.raises(lp.RunError) as info:
                lp.run(steps, xs)
            assert info.value.step == failed_at


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "empty"),
        ("sort |", "step 2 is empty"),
        ("sort | tke 2", "'tke' is not an operation"),
        ("take", "take takes one number"),
        ("rev 2", "rev takes no argument"),
        ("take x", "needs a number from 0 to 9"),
        ("take 12", "needs a number from 0 to 9"),
        (" | ".join(["rev"] * 9), "at most 8"),
    ],
)
def test_parse_errors_say_what_is_wrong(text, message):
    with pytest.raises(lp.ParseError, match=message):
        lp.parse(text)


def test_runtime_errors_name_the_step():
    with pytest.raises(lp.RunError, match="step 3: take 5 of a list of length 3"):
        lp.run(lp.parse("rev | sort | take 5"), [3, 1, 2])
    with pytest.raises(lp.RunError, match="step 2: rev needs a list, but got the number 6"):
        lp.run(lp.parse("sum | rev"), [3, 1, 2])


# ----- reward and feedback ----------------------------------------------------------------------


def score(reward, row, completions):
    n = len(completions)
    return reward(
        [row["prompt"]] * n, completions, shown=[row["shown"]] * n, tests=[row["tests"]] * n
    )


def test_reward_binary_and_shaped(eval_rows):
    row = eval_rows[0]
    binary, shaped = task_reward_model("listprog"), task_reward_model("listprog_shaped")
    right = row["program"]
    equivalent = "rev | rev | " + right  # another text, the same function
    out = score(binary, row, [right, f" {right}\n", equivalent, "rev", "nonsense"])
    assert [o.score for o in out] == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert out[0].feedback is None and "cannot be read" in out[4].feedback
    shaped_out = score(shaped, row, [right, "nonsense"])
    assert shaped_out[0].score == 1.0 and shaped_out[1].score == 0.0
    # a program right on some hidden tests only gets that fraction
    rng = random.Random(0)
    seen_partial = False
    for row in eval_rows:
        for _ in range(30):
            attempt = lp.format_program(lp.random_program(rng))
            ok = lp.passes(attempt, row["tests"])
            (o,) = score(shaped, row, [attempt])
            assert o.score == pytest.approx(sum(ok) / len(ok))
            seen_partial |= 0 < o.score < 1
    assert seen_partial


def test_feedback_describes_the_attempt_on_shown_examples():
    shown = [[[3, 1, 2], [1, 2, 3]], [[9, 8], [8, 9]], [[5, 5, 0], [0, 5, 5]]]
    text = lp.feedback_for("sort | take 2", shown)
    assert text == (
        "Your program sort | take 2:\non [3,1,2] it returned [1,2]\non [5,5,0] it returned [0,5]"
    )
    assert "failed at step 2: take 3 of a list of length 2" in lp.feedback_for(
        "sort | take 3", shown
    )
    assert "right on the shown examples" in lp.feedback_for("sort", shown)


def random_attempt(rng: random.Random, row: dict) -> str:
    """Garbage, random programs, the right program edited, and overfit programs."""
    kind = rng.random()
    if kind < 0.1:
        return "".join(rng.choice("abc |12x[]") for _ in range(rng.randint(0, 12)))
    if kind < 0.5:
        steps = [
            (n, rng.randint(0, 9) if lp.PRIMITIVES[n][0] is not None else None)
            for n in rng.choices(list(lp.PRIMITIVES), k=rng.randint(1, 5))
        ]
        return lp.format_program(steps)
    steps = lp.parse(row["program"])
    i = rng.randrange(len(steps))
    return lp.format_program(
        steps[:i] + [lp.random_step(rng, i == len(steps) - 1)] + steps[i + 1 :]
    )


def test_feedback_never_leaks_a_hidden_test(train_rows):
    """Feedback is a function of the attempt and the shown examples: replacing every hidden test
    changes no feedback, and a hidden expected output appears in feedback only where the attempt
    itself produced that value on a shown example."""
    reward = task_reward_model("listprog")
    rng = random.Random(0)
    checked = 0
    for row in train_rows:
        attempts = [random_attempt(rng, row) for _ in range(12)]
        n = len(attempts)
        out = reward(
            [row["prompt"]] * n, attempts, shown=[row["shown"]] * n, tests=[row["tests"]] * n
        )
        other = lp.load("eval", n=1)[0]["tests"]
        swapped = reward([row["prompt"]] * n, attempts, shown=[row["shown"]] * n, tests=[other] * n)
        for attempt, o, s in zip(attempts, out, swapped, strict=True):
            if o.feedback is None or s.feedback is None:
                continue
            assert o.feedback == s.feedback
            produced = set()
            try:
                steps = lp.parse(attempt)
                produced = {
                    lp.format_value(v)
                    for xs, _ in row["shown"]
                    if (v := lp.try_run(steps, xs)) is not None
                }
            except lp.ParseError:
                pass
            for value in (v for case in row["tests"] for v in case):  # inputs and outputs
                hidden = lp.format_value(value)
                distinctive = isinstance(value, list) and len(value) >= 2
                if distinctive and hidden not in produced and hidden not in row["prompt"]:
                    assert hidden not in o.feedback, (attempt, hidden)
                    checked += 1
    assert checked > 1000


def test_shuffled_feedback_comes_from_another_question(eval_rows):
    reward = task_reward_model("listprog_shuffled")
    real = task_reward_model("listprog")
    rows = [r for r in eval_rows[:4] for _ in range(3)]
    attempts = ["rev", "sort | take 3", rows[0]["program"]] * 4
    kwargs = {"shown": [r["shown"] for r in rows], "tests": [r["tests"] for r in rows]}
    prompts = [r["prompt"] for r in rows]
    got, want = reward(prompts, attempts, **kwargs), real(prompts, attempts, **kwargs)
    assert [o.score for o in got] == [o.score for o in want]
    own = {p: set() for p in prompts}
    for p, o in zip(prompts, want, strict=True):
        own[p].add(o.feedback)
    pool = {o.feedback for o in want if o.feedback is not None}
    for p, g, w in zip(prompts, got, want, strict=True):
        if w.feedback is None:
            assert g.feedback is None
        else:
            assert g.feedback in pool and g.feedback not in own[p]


# ----- through the real trainer ------------------------------------------------------------------


def test_listprog_trains_two_steps_through_the_cli(tmp_path, tiny_llama):
    """`sdpo train --preset listprog` with a tiny model: the reward and feedback reach the
    teacher contexts and samples.jsonl, and evaluation scores held-out tasks."""
    from sdpo.cli import main

    model, tokenizer = tiny_llama
    model.save_pretrained(tmp_path / "model")
    tokenizer.save_pretrained(tmp_path / "model")
    run_dir = tmp_path / "run"
    argv = [
        "train",
        "--preset",
        "listprog",
        f"model_name={tmp_path / 'model'}",
        "run.max_steps=2",
        "optimization.prompts_per_step=2",
        "num_samples_per_prompt=4",
        "generation.max_new_tokens=12",
        "run.eval_steps=2",
        "run.eval_max_prompts=4",
        "run.save_steps=2",
        "run.sample_log_steps=1",
        "run.progress_bar=false",
        f"run.output_dir={run_dir}",
    ]
    assert main(argv) == 0
    samples = [json.loads(line) for line in (run_dir / "samples.jsonl").read_text().splitlines()]
    feedback = [s["feedback"] for s in samples if s.get("feedback")]
    assert feedback and all(f.startswith("Your program") for f in feedback)
    metrics = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert any("eval/accuracy_greedy" in m for m in metrics)
    assert any(m.get("self_distillation/feedback_used_fraction", 0) > 0 for m in metrics), metrics[
        0
    ].keys()
