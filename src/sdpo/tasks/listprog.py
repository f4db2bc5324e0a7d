"""List-program synthesis with execution feedback: infer a program from 3 input->output examples.

A tiny list language of twelve primitives, chained with ``|`` (each step gets the previous one's
value)::

    rev  sort  uniq  even  odd  add K  mul K  take N  drop N  sum  max  len

``rev``/``sort``/``uniq`` (drop repeats, keep first), ``even``/``odd`` (keep those), ``add K`` /
``mul K`` (every element), ``take N`` / ``drop N`` (the first N; an error on a list shorter than
N) map lists to lists; ``sum``/``max``/``len`` map a list to a number and may only come last
(``max`` of an empty list is an error). A prompt shows three examples and asks for the program::

    [3,1,2]>[1,2,3]
    [5,0,4,4]>[0,4,4,5]
    [9,8]>[8,9]
    Program:

and a completion is a program such as ``sort``. The reward is 1 when the program passes all of
:data:`NUM_HIDDEN` **hidden** tests (other inputs, never shown), else 0 (:func:`reward_model`;
``shaped=True`` gives the fraction of hidden tests passed instead: the information-matched
control of the study). Feedback (:func:`feedback_for`) describes the attempt's behaviour on the
*shown* examples only -- the parse error, the runtime error and its step, or what it returned on
each shown example it gets wrong -- so it depends on the attempt and the prompt alone and can
never contain a hidden test's input or expected output (``tests/test_listprog.py`` checks this).

Programs are drawn with depth 2-4, each step mattering (removing any step changes the program's
behaviour), and split by a hash of their *behaviour* (outputs on a fixed set of probe inputs):
``eval`` (10%), ``train`` (40%) and ``model`` (50%: the only programs the shipped listprog model
saw while it was trained, ``scripts/train_listprog_model.py``), so two programs that compute
the same function always fall in the same split and the three never overlap.
"""

from __future__ import annotations

import random
import zlib
from collections.abc import Sequence
from typing import Any

from sdpo.config import PRESETS
from sdpo.reward_model import Prompt, RewardModel, RewardOutput, _text
from sdpo.tasks import check_split

NUM_TRAIN = 1_000
NUM_EVAL = 200
NUM_SHOWN = 3
NUM_HIDDEN = 6
MAX_STEPS = 8  # longer attempts are refused at parse time (keeps execution trivially cheap)
DEPTHS = (2, 3, 4)
DEPTH_WEIGHTS = (0.3, 0.4, 0.3)
SPLIT_RANGES = {"eval": (0.0, 0.1), "train": (0.1, 0.5), "model": (0.5, 1.0)}
PROMPT_SUFFIX = "Program:"
NUM_SPLIT_PROBES = 10  # probe inputs whose outputs decide the split (and make tasks distinct)

Value = list[int] | int

# name -> (argument range or None, kind): kind "list" maps list -> list, "number" list -> int.
PRIMITIVES: dict[str, tuple[range | None, str]] = {
    "rev": (None, "list"),
    "sort": (None, "list"),
    "uniq": (None, "list"),
    "even": (None, "list"),
    "odd": (None, "list"),
    "add": (range(1, 4), "list"),
    "mul": (range(2, 4), "list"),
    "take": (range(1, 4), "list"),
    "drop": (range(1, 4), "list"),
    "sum": (None, "number"),
    "max": (None, "number"),
    "len": (None, "number"),
}
ARG_LIMIT = 9  # an attempt may use any argument 0..9 (generated programs use PRIMITIVES' ranges)

Step = tuple[str, int | None]


class ListProgError(Exception):
    """A program that cannot be read (``ParseError``) or fails while running (``RunError``)."""


class ParseError(ListProgError):
    pass


class RunError(ListProgError):
    def __init__(self, step: int, message: str) -> None:
        super().__init__(f"step {step}: {message}")
        self.step = step


# ----- the language ------------------------------------------------------------------------------


def parse(text: str) -> list[Step]:
    """``"sort | take 2"`` -> ``[("sort", None), ("take", 2)]``; :class:`ParseError` says what is wrong."""
    text = text.strip()
    if not text:
        raise ParseError("the program is empty")
    parts = [p.strip() for p in text.split("|")]
    if len(parts) > MAX_STEPS:
        raise ParseError(f"it has {len(parts)} steps; at most {MAX_STEPS} are allowed")
    steps: list[Step] = []
    for i, part in enumerate(parts, start=1):
        words = part.split()
        if not words:
            raise ParseError(f"step {i} is empty")
        name, args = words[0], words[1:]
        if name not in PRIMITIVES:
            raise ParseError(f"step {i}: {name!r} is not an operation")
        takes_arg = PRIMITIVES[name][0] is not None
        if takes_arg != (len(args) == 1) or len(args) > 1:
            want = "one number" if takes_arg else "no argument"
            raise ParseError(f"step {i}: {name} takes {want}")
        arg = None
        if takes_arg:
            if not (args[0].isdigit() and int(args[0]) <= ARG_LIMIT):
                raise ParseError(f"step {i}: {name} needs a number from 0 to {ARG_LIMIT}")
            arg = int(args[0])
        steps.append((name, arg))
    return steps


def format_program(steps: Sequence[Step]) -> str:
    """The canonical text of ``steps``: ``sort | take 2``."""
    return " | ".join(name if arg is None else f"{name} {arg}" for name, arg in steps)


def format_value(value: Value) -> str:
    """``[1, 2]`` -> ``[1,2]``; a number as itself."""
    return f"[{','.join(map(str, value))}]" if isinstance(value, list) else str(value)


def _apply(name: str, arg: int | None, xs: list[int], step: int) -> Value:
    if name == "rev":
        return xs[::-1]
    if name == "sort":
        return sorted(xs)
    if name == "uniq":
        seen: set[int] = set()
        return [x for x in xs if not (x in seen or seen.add(x))]
    if name == "even":
        return [x for x in xs if x % 2 == 0]
    if name == "odd":
        return [x for x in xs if x % 2 == 1]
    if name == "add":
        return [x + arg for x in xs]
    if name == "mul":
        return [x * arg for x in xs]
    if name in ("take", "drop"):
        if len(xs) < arg:
            raise RunError(step, f"{name} {arg} of a list of length {len(xs)}")
        return xs[:arg] if name == "take" else xs[arg:]
    if name == "sum":
        return sum(xs)
    if name == "max":
        if not xs:
            raise RunError(step, "max of an empty list")
        return max(xs)
    if name == "len":
        return len(xs)
    raise AssertionError(name)  # parse() admits only PRIMITIVES


def run(steps: Sequence[Step], xs: Sequence[int]) -> Value:
    """The program's output on ``xs``; :class:`RunError` names the failing step (1-based)."""
    value: Value = list(xs)
    for i, (name, arg) in enumerate(steps, start=1):
        if not isinstance(value, list):
            raise RunError(i, f"{name} needs a list, but got the number {value}")
        value = _apply(name, arg, value, i)
    return value


def try_run(steps: Sequence[Step], xs: Sequence[int]) -> Value | None:
    """:func:`run`, or None when it fails."""
    try:
        return run(steps, xs)
    except RunError:
        return None


# ----- generation and splits ---------------------------------------------------------------------


def random_input(rng: random.Random) -> list[int]:
    """A list of 3-7 digits."""
    return [rng.randrange(10) for _ in range(rng.randint(3, 7))]


_PROBE_RNG = random.Random("listprog-probe-inputs")
PROBE_INPUTS: list[list[int]] = [[], [4], [2, 2], [7, 1]] + [
    random_input(_PROBE_RNG) for _ in range(20)
]


def behaviour(steps: Sequence[Step], inputs: Sequence[list[int]] = PROBE_INPUTS) -> tuple:
    """The program's outputs on ``inputs`` (None where it fails): its fingerprint."""
    return tuple(
        tuple(v) if isinstance(v, list) else v for v in (try_run(steps, x) for x in inputs)
    )


def split_key(steps: Sequence[Step]) -> tuple:
    """The outputs on the first :data:`NUM_SPLIT_PROBES` probe inputs: a function of the
    program's behaviour (equal behaviours, equal keys), cheaper than :func:`behaviour`."""
    return behaviour(steps, PROBE_INPUTS[:NUM_SPLIT_PROBES])


def split_of(steps: Sequence[Step], key: tuple | None = None) -> str:
    """``eval``, ``train`` or ``model``: a stable hash of :func:`split_key` in :data:`SPLIT_RANGES`.

    The key depends on the behaviour only, so programs computing the same function share a split.
    """
    key = split_key(steps) if key is None else key
    u = zlib.crc32(repr(key).encode()) / 2**32
    return next(name for name, (lo, hi) in SPLIT_RANGES.items() if lo <= u < hi)


def random_step(rng: random.Random, last: bool) -> Step:
    names = [n for n, (_, kind) in PRIMITIVES.items() if last or kind == "list"]
    name = rng.choice(names)
    args = PRIMITIVES[name][0]
    return name, (None if args is None else rng.choice(args))


def random_steps(rng: random.Random) -> list[Step]:
    """Any program of depth 2-4 (a number-valued step only last)."""
    depth = rng.choices(DEPTHS, DEPTH_WEIGHTS)[0]
    return [random_step(rng, last=i == depth - 1) for i in range(depth)]


def acceptable(steps: Sequence[Step], fingerprint: tuple) -> bool:
    """Runs on at least half the probe inputs, is not (nearly) constant, and every step matters
    (dropping any one changes the behaviour)."""
    if sum(v is not None for v in fingerprint) < len(PROBE_INPUTS) // 2:
        return False
    if len({v for v in fingerprint if v is not None}) < 4:
        return False
    return all(
        behaviour(list(steps[:i]) + list(steps[i + 1 :])) != fingerprint for i in range(len(steps))
    )


def random_program(rng: random.Random) -> list[Step]:
    """A program of depth 2-4 that :func:`acceptable` admits."""
    while True:
        steps = random_steps(rng)
        if acceptable(steps, behaviour(steps)):
            return steps


def make_task(steps: Sequence[Step], rng: random.Random) -> dict | None:
    """A row: prompt with :data:`NUM_SHOWN` examples, :data:`NUM_HIDDEN` hidden tests, the program.

    Inputs are distinct and the program runs on all of them; the shown examples must not all map
    a list to itself. None when no such inputs are found quickly.
    """
    cases: list[tuple[list[int], Value]] = []
    seen: set[tuple[int, ...]] = set()
    for _ in range(200):
        xs = random_input(rng)
        out = try_run(steps, xs)
        if out is None or tuple(xs) in seen:
            continue
        seen.add(tuple(xs))
        cases.append((xs, out))
        if len(cases) == NUM_SHOWN + NUM_HIDDEN:
            break
    else:
        return None
    shown, hidden = cases[:NUM_SHOWN], cases[NUM_SHOWN:]
    if all(out == xs for xs, out in shown) or len({format_value(o) for _, o in shown}) == 1:
        return None
    return {
        "prompt": make_prompt(shown),
        "shown": [[xs, out] for xs, out in shown],
        "tests": [[xs, out] for xs, out in hidden],
        "program": format_program(steps),
    }


def make_prompt(shown: Sequence[Sequence[Any]]) -> str:
    """The examples, one ``input>output`` per line, then ``Program:``."""
    lines = [f"{format_value(xs)}>{format_value(out)}" for xs, out in shown]
    return "\n".join(lines) + "\n" + PROMPT_SUFFIX


def draw_tasks(split: str, n: int, seed: int = 0) -> list[dict]:
    """``n`` tasks with distinct behaviours (:func:`split_key`) whose programs lie in ``split``
    (``train``, ``eval`` or ``model``), drawn deterministically from ``seed``."""
    if split not in SPLIT_RANGES:
        raise ValueError(f"Unknown split {split!r}; expected one of {', '.join(SPLIT_RANGES)}.")
    rng = random.Random(f"listprog:{split}:{seed}")
    rows: list[dict] = []
    behaviours: set[tuple] = set()
    for _ in range(200 * n + 1000):
        if len(rows) == n:
            break
        steps = random_steps(rng)
        key = split_key(steps)
        # Cheapest tests first: the split is a hash, the step-removal check runs the program often.
        if split_of(steps, key) != split or key in behaviours:
            continue
        if not acceptable(steps, behaviour(steps)):
            continue
        row = make_task(steps, rng)
        if row is not None:
            behaviours.add(key)
            rows.append(row)
    return rows


def load(split: str, seed: int = 0, *, n: int | None = None) -> list[dict]:
    """``n`` tasks of ``split`` (``train`` 1,000 or ``eval`` 200 by default), one behaviour each."""
    check_split(split)
    if n is None:
        n = NUM_TRAIN if split == "train" else NUM_EVAL
    return draw_tasks(split, n, seed)


# ----- teacher contexts (the ``listprog`` preset's templates) ------------------------------------

_PRESET = PRESETS["listprog"]


def feedback_context(prompt: str, feedback: str) -> str:
    """The teacher context the trainer builds with the ``listprog`` preset from feedback alone."""
    block = _PRESET["self_distillation.feedback_template"].format(feedback_raw=feedback)
    return _PRESET["self_distillation.reprompt_template"].format(
        prompt=prompt, solution="", feedback=block
    )


def demonstration_context(prompt: str, program: str) -> str:
    """The teacher context with a successful sibling ``program`` (``listprog`` preset)."""
    block = _PRESET["self_distillation.solution_template"].format(
        successful_previous_attempt=program
    )
    return _PRESET["self_distillation.reprompt_template"].format(
        prompt=prompt, solution=block, feedback=""
    )


# ----- reward and feedback -----------------------------------------------------------------------


def passes(program: str, cases: Sequence[Sequence[Any]]) -> list[bool]:
    """Whether ``program`` returns the expected output on each ``[input, output]`` case."""
    try:
        steps = parse(program)
    except ParseError:
        return [False] * len(cases)
    return [try_run(steps, xs) == out for xs, out in cases]


def feedback_for(program: str, shown: Sequence[Sequence[Any]]) -> str:
    """What the attempt ``program`` does on the ``shown`` examples (a function of these two only).

    The first line names the attempt; then the parse error, or per shown example it gets wrong,
    its runtime error or what it returned::

        Your program sort | take 2:
        on [3,1,2] it returned [1,2]
        on [9,8] it failed at step 2: take 2 of a list of length 1

    A program right on every shown example is told so (it fails hidden tests, which stay secret).
    """
    text = " ".join(program.split())[:80]
    try:
        steps = parse(program)
    except ParseError as exc:
        return f"Your program {text} cannot be read: {exc}."
    lines = [f"Your program {format_program(steps)}:"]
    for xs, out in shown:
        try:
            got = run(steps, xs)
        except RunError as exc:
            lines.append(f"on {format_value(xs)} it failed at {exc}")
            continue
        if got != out:
            lines.append(f"on {format_value(xs)} it returned {format_value(got)}")
    if len(lines) == 1:
        lines.append("right on the shown examples, wrong on hidden tests")
    return "\n".join(lines)


class ListProgRewardModel(RewardModel):
    """1 when the completion passes every hidden test (``shaped``: the fraction it passes), with
    :func:`feedback_for` on the shown examples for every completion below 1."""

    def __init__(self, shaped: bool = False) -> None:
        self.shaped = shaped
        self.name = "listprog_shaped" if shaped else "listprog"

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list
    ) -> list[RewardOutput]:
        outputs = []
        for completion, shown, tests in zip(
            completions, columns["shown"], columns["tests"], strict=True
        ):
            program = _text(completion)
            ok = passes(program, tests)
            score = sum(ok) / len(ok) if self.shaped else float(all(ok))
            feedback = None if all(ok) else feedback_for(program, shown)
            outputs.append(RewardOutput(score, feedback, {"hidden_passed": sum(ok)}))
        return outputs


class ShuffledFeedback(RewardModel):
    """``inner``'s scores with another question's feedback: the study's control that must not gain.

    Completion ``i`` with feedback gets the feedback of a completion drawn (with a fixed seed)
    among those of the batch with feedback and a different prompt; completions without feedback
    keep None (and one whose batch has no other question's feedback gets None: no context).
    """

    def __init__(self, inner: RewardModel) -> None:
        self.inner = inner
        self.name = f"{inner.name}_shuffled_feedback"

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list
    ) -> list[RewardOutput]:
        outputs = self.inner(prompts, completions, **columns)
        original = [o.feedback for o in outputs]
        rng = random.Random(len(outputs))
        for i, out in enumerate(outputs):
            if original[i] is None:
                continue
            donors = [
                f
                for f, p in zip(original, prompts, strict=True)
                if f is not None and p != prompts[i]
            ]
            out.feedback = rng.choice(donors) if donors else None
        return outputs


def reward_model(shaped: bool = False) -> RewardModel:
    """All hidden tests pass (or, ``shaped``, the fraction passed); feedback on the shown examples."""
    return ListProgRewardModel(shaped=shaped)
