"""Rewards with feedback: every reward model returns a score and, optionally, text the teacher sees.

Built-in models (each a :class:`RewardModel`):

- :class:`MathRewardModel`: the last ``\\boxed{...}`` answer, checked with ``math_verify``.
- :class:`RuleBasedCodeRewardModel`: the longest fenced code block must parse (and define a function).
- :class:`VerifiableRewardModel`: exact / contains / regex match against an answer column.
- :class:`FunctionRewardModel`: adapter for plain functions in TRL's ``fn(prompts, completions, **columns)``.
- :class:`CombinedRewardModel`: a weighted sum of several models.

:func:`as_reward_model` turns any of these, a callable, or a list of them into one model.

Feedback is for format problems only (no answer found, a syntax error): it never contains the
expected answer, which would leak the label into the teacher's context (SPEC section 9).

The trainer calls reward models the way TRL's ``GRPOTrainer`` calls reward functions: for a chat
prompt (a list of messages) each completion is ``[{"role": "assistant", "content": text}]``
(:func:`as_trl_completions`), for a plain prompt it is the text; besides the dataset's columns
it passes the keyword arguments of :data:`TRAINER_KWARGS`.
"""

from __future__ import annotations

import ast
import contextlib
import copy
import functools
import inspect
import math
import re
import signal
import statistics
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

Prompt = str | list[dict[str, str]]
Completion = str | list[dict[str, str]]

TRAINER_KWARGS = ("completion_ids", "trainer_state", "log_metric", "log_extra")
"""Keyword arguments the trainer passes to reward models besides the dataset's columns (TRL's names):

- ``completion_ids``: ``list[list[int]]``, each completion's token ids up to and including EOS;
- ``trainer_state``: a ``transformers.TrainerState`` with ``global_step``, ``max_steps``, ``epoch``;
- ``log_metric(name, value)``: a scalar, averaged over the training step and written with its
  metrics to ``metrics.jsonl`` (evaluation ignores it);
- ``log_extra(column, values)``: one value per completion, written to that step's
  ``samples.jsonl`` records under ``"extra"``.
"""
_NOT_PER_SAMPLE = ("trainer_state", "log_metric", "log_extra")  # one object for the whole batch


class RewardLog:
    """What reward functions log through TRL's hooks during one scoring call.

    ``log_metric(name, value)`` appends to ``metrics[name]``; ``log_extra(column, values)`` extends
    ``extra[column]`` (one value per completion).
    """

    def __init__(self) -> None:
        self.metrics: dict[str, list[float]] = {}
        self.extra: dict[str, list[Any]] = {}

    def log_metric(self, name: str, value: float) -> None:
        self.metrics.setdefault(name, []).append(float(value))

    def log_extra(self, column: str, values: Sequence[Any]) -> None:
        self.extra.setdefault(column, []).extend(values)

    def metric_means(self) -> dict[str, float]:
        """Each logged metric averaged over the calls (TRL averages over the logging step)."""
        return {name: sum(v) / len(v) for name, v in self.metrics.items() if v}


def as_trl_completions(prompts: Sequence[Prompt], completions: Sequence[str]) -> list[Completion]:
    """Completions in TRL's form: ``[{"role": "assistant", "content": text}]`` where the prompt is
    chat messages, the text itself where it is a string."""
    return [
        [{"role": "assistant", "content": text}] if isinstance(prompt, list) else text
        for prompt, text in zip(prompts, completions, strict=True)
    ]


@dataclass
class RewardOutput:
    """The environment's verdict on one completion.

    Attributes:
        score: scalar reward (finite).
        feedback: text for the self-teacher (an error, a failing case); never the expected answer.
        info: anything else worth logging (per-case results, parse details).
    """

    score: float
    feedback: str | None = None
    info: dict[str, Any] = field(default_factory=dict)


class RewardModel(ABC):
    """Scores completions: ``reward_model(prompts, completions, **columns) -> list[RewardOutput]``.

    ``prompts`` and ``completions`` have one entry per completion (a completion is text, or
    ``[{"role": "assistant", "content": text}]`` for a chat prompt: :func:`as_trl_completions`);
    each of ``columns`` (the dataset's other fields, e.g. ``answer`` or ``tests``) has one value per
    completion too. From the trainer, ``columns`` also holds :data:`TRAINER_KWARGS`.
    """

    name: str = "reward"

    @abstractmethod
    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        """Score each completion."""


class MissingColumnError(KeyError):
    """A reward model needs a dataset column the batch does not have."""

    def __str__(self) -> str:  # KeyError would print the message with quotes around it
        return str(self.args[0])


class RewardFunctionError(RuntimeError):
    """A user reward function raised, returned the wrong number of items, or a non-finite score."""


def _column(owner: str, columns: dict[str, Any], names: Sequence[str], n: int) -> list[Any]:
    """The first of ``names`` present in ``columns``, checked to hold one value per completion."""
    for name in names:
        if name in columns:
            values = list(columns[name])
            if len(values) != n:
                raise ValueError(
                    f"{owner}: column {name!r} has {len(values)} values for {n} completions."
                )
            return values
    wanted = repr(names[0]) + "".join(f" (or {nm!r})" for nm in names[1:])
    raise MissingColumnError(
        f"{owner} needs the column {wanted}, but the batch only has the columns {_data_columns(columns)}."
    )


def _data_columns(columns: dict[str, Any]) -> list[str]:
    """The dataset's column names among ``columns`` (without the trainer's keyword arguments)."""
    return sorted(k for k in columns if k not in TRAINER_KWARGS)


def _text(completion: Any) -> str:
    """Completion text; a chat-style completion (list of messages) gives its last message's content."""
    if isinstance(completion, list):
        return str(completion[-1]["content"]) if completion else ""
    return "" if completion is None else str(completion)


def call_reward_model(
    reward_model: RewardModel,
    rows: Sequence[dict[str, Any]],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    trainer_state: Any = None,
    timeout_s: float | None = None,
) -> tuple[list[RewardOutput], RewardLog]:
    """Score the completions of ``rows`` as TRL's GRPOTrainer calls reward functions.

    Guarded: the reward gets copies of the prompts and completions, ``sys.exit`` inside it is a
    :class:`RewardFunctionError`, and a call longer than ``timeout_s`` raises
    :class:`RewardTimeoutError`.

    ``reward_model(prompts, completions, completion_ids=, trainer_state=, log_metric=, log_extra=,
    **columns)`` with completions in TRL's form (:func:`as_trl_completions`) and ``columns`` the
    rows' other fields. ``trainer_state`` defaults to a fresh ``transformers.TrainerState``.
    Returns one :class:`RewardOutput` per completion and what the hooks logged.
    """
    from transformers import TrainerState

    prompts = [row["prompt"] for row in rows]
    skip = ("prompt", "completion", *TRAINER_KWARGS)
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k not in skip}
    log = RewardLog()
    try:
        with _time_limit(timeout_s, f"Reward model {reward_model.name!r}"):
            outputs = reward_model(
                copy.deepcopy(prompts),  # a reward that mutates its inputs changes nothing here
                as_trl_completions(prompts, completions),
                completion_ids=[list(ids) for ids in completion_ids],
                trainer_state=TrainerState() if trainer_state is None else trainer_state,
                log_metric=log.log_metric,
                log_extra=log.log_extra,
                **columns,
            )
    except SystemExit as exc:
        raise RewardFunctionError(
            f"Reward model {reward_model.name!r} called sys.exit({exc.code!r}); a reward "
            "function must return its scores."
        ) from None
    if len(outputs) != len(rows):
        raise ValueError(
            f"Reward model {reward_model.name!r} returned {len(outputs)} results for {len(rows)} completions."
        )
    context = columns.get("privileged_context")
    if (
        context is not None
    ):  # TRL's column of environment feedback, used where the reward gives none
        outputs = [
            o if o.feedback or not c else RewardOutput(o.score, str(c), o.info)
            for o, c in zip(outputs, context, strict=True)
        ]
    return outputs, log


def checked_scores(outputs: Sequence[Any], prompts: Sequence[Any], name: str) -> Any:
    """The outputs' scores as a ``[N]`` float32 tensor, each checked to be a finite number there;
    a bad one raises :class:`RewardFunctionError` naming the reward model ``name`` and the row."""
    import torch  # here: defining rewards needs no torch

    scores = []
    for i, out in enumerate(outputs):
        try:
            if isinstance(out.score, (str, bytes)):  # float("0.5") would pass a typo'd return
                raise TypeError
            scores.append(float(out.score))
        except (TypeError, ValueError, AttributeError):
            raise RewardFunctionError(
                f"Reward model {name!r} returned {getattr(out, 'score', out)!r} as the score of "
                f"row {i} (prompt {prompts[i]!r:.60}); a score must be a finite number."
            ) from None
    rewards = torch.tensor(scores, dtype=torch.float32)
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise RewardFunctionError(
            f"Reward model {name!r} gave row {i} (prompt {prompts[i]!r:.60}) the score "
            f"{scores[i]!r}, which is not a finite float32 (|score| < 3.4e38); "
            f"{len(bad)} of {len(scores)} rows are affected."
        )
    return rewards


# ----- math ---------------------------------------------------------------------------------------


def extract_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) whose braces balance; None if none."""
    for match in reversed(list(re.finditer(r"\\(?:boxed|fbox)\s*\{", text))):
        depth, start = 1, match.end()
        for pos in range(start, len(text)):
            depth += {"{": 1, "}": -1}.get(text[pos], 0)
            if depth == 0:
                return text[start:pos].strip()
    return None


_ANSWER_IS = re.compile(r"answer\s+is\s*:?\s*(.+?)\s*(?:\.\s|\.?$)", re.IGNORECASE | re.MULTILINE)
_ANSWER_COLON = re.compile(
    r"^[\s*#]*(?:final\s+)?answer\s*\**\s*:\s*\**\s*(.+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE
)
_NUMBER = re.compile(r"-?\d+(?:,\d{3})*(?:\.\d+)?(?:/\d+)?")


def extract_math_answer(text: str) -> tuple[str | None, str | None]:
    """The final answer of a math completion and how it was found.

    Tried in this order, the first that matches wins:
    1. ``boxed``: the last ``\\boxed{...}`` (balanced braces, so nesting works);
    2. ``answer_is``: the last "the answer is X" (up to the end of the sentence or line);
    3. ``answer_colon``: the last line "Answer: X" (also "Final answer:", markdown bold);
    4. ``last_number``: the last number in the text, as a last resort.

    Returns ``(answer, method)``, or ``(None, None)`` when nothing was found.
    """
    boxed = extract_boxed(text)
    if boxed is not None:
        return boxed, "boxed"
    for method, pattern in (
        ("answer_is", _ANSWER_IS),
        ("answer_colon", _ANSWER_COLON),
        ("last_number", _NUMBER),
    ):
        matches = list(pattern.finditer(text))
        if matches:
            answer = (matches[-1].group(1) if pattern.groups else matches[-1].group(0)).strip()
            if answer:
                return answer, method
    return None, None


def _norm_math(text: str) -> str:
    return re.sub(r"\s+", "", text.strip().strip("$").rstrip("."))


class MathRewardModel(RewardModel):
    """1.0 when the completion's final answer is mathematically equivalent to the row's answer.

    ``extraction="boxed"`` (default): the answer is the content of the last ``\\boxed{...}`` (or
    ``\\fbox{...}``) and nothing else; a completion without one scores 0 with format feedback,
    so a prompt's "put the answer in \\boxed{}" is enforced. ``extraction="lenient"`` adds the
    old fallbacks of :func:`extract_math_answer` ("the answer is X", "Answer: X", the last number),
    which also reward unformatted answers (and lucky last numbers).

    Equivalence is checked with ``math_verify`` (``"\\frac{1}{2}"`` equals ``"0.5"``, ``"2"``
    equals ``"2.0"``) after a cheap whitespace-insensitive string comparison. A gold answer that is
    a whole solution (e.g. MATH's ``solution`` column) contributes its last ``\\boxed{...}``.

    ``math_verify`` guards parsing with ``signal.alarm``, which only works on the main thread; off
    the main thread (a data-loader or reward worker thread) the timeouts are switched off instead.

    Feedback (format problems only): no final answer found, or an answer that cannot be parsed.
    ``info`` holds ``extracted_answer`` and ``extraction`` (the method, see
    :func:`extract_math_answer`).
    """

    name = "math"
    EXTRACTIONS = ("boxed", "lenient")

    def __init__(
        self,
        answer_column: str = "answer",
        fallback_column: str | None = "solution",
        timeout_seconds: int | None = 5,
        extraction: str = "boxed",
    ) -> None:
        if extraction not in self.EXTRACTIONS:
            raise ValueError(
                f"MathRewardModel extraction {extraction!r} is not one of {list(self.EXTRACTIONS)}."
            )
        self.answer_column = answer_column
        self.fallback_column = fallback_column
        self.timeout_seconds = timeout_seconds
        self.extraction = extraction

    def __call__(
        self, prompts: list[Prompt], completions: list[Completion], **columns: list[Any]
    ) -> list[RewardOutput]:
        names = [self.answer_column] + ([self.fallback_column] if self.fallback_column else [])
        golds = _column(type(self).__name__, columns, names, len(completions))
        return [self.score_one(_text(c), str(g)) for c, g in zip(completions, golds, strict=True)]

    def extract(self, completion: str) -> tuple[str | None, str | None]:
        """``(answer, method)`` by this model's extraction; ``(None, None)`` when there is none."""
        if self.extraction == "lenient":
            return extract_math_answer(completion)
        boxed = extract_boxed(completion)
        return (boxed, "boxed") if boxed is not None else (None, None)

    def score_one(self, completion: str, gold: str) -> RewardOutput:
        """Score one completion against one gold answer."""
        answer, method = self.extract(completion)
        info: dict[str, Any] = {"extracted_answer": answer, "extraction": method}
        if answer is None:
            return RewardOutput(
                0.0, "No final answer found. Write the final answer as \\boxed{...}.", info
            )
        gold = extract_boxed(gold) or gold
        if _norm_math(answer) == _norm_math(gold):
            return RewardOutput(1.0, None, info)
        predicted = self._parse(answer)
        if not predicted:
            feedback = "The final answer could not be parsed as a mathematical expression. Write it in LaTeX inside \\boxed{...}."
            return RewardOutput(0.0, feedback, info)
        expected = self._parse(gold)
        if not expected:
            # A gold answer math_verify cannot read: the string comparison above decided.
            info["gold_unparsed"] = True
            return RewardOutput(0.0, None, info)
        from math_verify import verify

        ok = verify(expected, predicted, timeout_seconds=self._timeout())
        return RewardOutput(1.0 if ok else 0.0, None, info)

    def _timeout(self) -> int | None:
        return (
            self.timeout_seconds if threading.current_thread() is threading.main_thread() else None
        )

    def _parse(self, text: str) -> list[Any]:
        from math_verify import parse

        # math_verify reads bare LaTeX ("x+1", "\frac12") only inside math delimiters.
        return parse(text if "$" in text else f"${text}$", parsing_timeout=self._timeout())


# ----- code ---------------------------------------------------------------------------------------

_FENCE = re.compile(r"```[ \t]*(python3?|py)?[ \t]*\n(.*?)(?:```|\Z)", re.DOTALL | re.IGNORECASE)


def extract_code(text: str) -> str | None:
    """The longest fenced code block tagged ``python``/``py`` or untagged; an unclosed last block counts."""
    blocks = [m.group(2) for m in _FENCE.finditer(text)]
    return max(blocks, key=len) if blocks else None


class RuleBasedCodeRewardModel(RewardModel):
    """1.0 when the completion holds a fenced Python block that parses and defines the required function.

    Checks, in order (the first failure gives score 0 and its feedback):
    1. a fenced code block exists (:func:`extract_code`);
    2. ``ast.parse`` accepts it (feedback names the line number and the error);
    3. a ``def`` with the required name exists (anywhere in the module), where the name is
       ``require_function`` if given, else the row's ``function_name_column`` value if the column
       is present (no requirement otherwise).
    """

    name = "code"

    def __init__(
        self, function_name_column: str = "function_name", require_function: str | None = None
    ) -> None:
        self.function_name_column = function_name_column
        self.require_function = require_function

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        n = len(completions)
        if self.require_function is not None:
            required: list[Any] = [self.require_function] * n
        elif self.function_name_column in columns:
            required = _column(type(self).__name__, columns, [self.function_name_column], n)
        else:
            required = [None] * n
        return [self.score_one(_text(c), r) for c, r in zip(completions, required, strict=True)]

    def score_one(self, completion: str, function_name: str | None = None) -> RewardOutput:
        """Score one completion; ``function_name`` (if given) must be defined."""
        code = extract_code(completion)
        if code is None:
            return RewardOutput(
                0.0,
                "No code block found. Put the solution in a ```python ... ``` block.",
                {"code_found": False},
            )
        info: dict[str, Any] = {"code_found": True}
        try:
            tree = ast.parse(code)
        except SyntaxError as exc:
            line = (exc.text or "").rstrip()
            where = f"line {exc.lineno}" if exc.lineno else "an unknown line"
            feedback = f"SyntaxError on {where} of the code block: {exc.msg}" + (
                f"\n    {line.strip()}" if line.strip() else ""
            )
            return RewardOutput(
                0.0, feedback, {**info, "syntax_ok": False, "error_line": exc.lineno}
            )
        except ValueError as exc:  # e.g. null bytes in the source
            return RewardOutput(
                0.0, f"The code block cannot be parsed: {exc}", {**info, "syntax_ok": False}
            )
        info["syntax_ok"] = True
        if function_name:
            defined = {
                node.name
                for node in ast.walk(tree)
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            }
            info["function_found"] = function_name in defined
            if not info["function_found"]:
                return RewardOutput(
                    0.0, f"The code does not define a function named `{function_name}`.", info
                )
        return RewardOutput(1.0, None, info)


# ----- exact / contains / regex -------------------------------------------------------------------


def normalize_answer(text: str) -> str:
    """Strip, collapse whitespace, casefold, and drop trailing periods: ``" The  Cat. "`` -> ``"the cat"``."""
    return re.sub(r"\s+", " ", text).strip().casefold().rstrip(".").rstrip()


class VerifiableRewardModel(RewardModel):
    """1.0 when the completion matches the row's answer; the answer column may hold one string or a list of accepted ones.

    Args:
        mode: ``exact`` (equal), ``contains`` (the answer occurs in the completion) or ``regex``
            (the answer is a pattern that must match the whole completion; ignoring case when
            ``normalize``).
        answer_column: the dataset column with the expected answer.
        normalize: compare after :func:`normalize_answer` (both sides; in regex mode the completion only).
        extract: optional regex applied to the completion first (``re.DOTALL``); its last match is
            used, group 1 if the pattern has a group, else the whole match. E.g. ``<answer>(.*?)</answer>``.

    Feedback (format problems only): an empty completion, or ``extract`` finding nothing.
    """

    name = "verifiable"
    MODES = ("exact", "contains", "regex")

    def __init__(
        self,
        mode: str = "exact",
        answer_column: str = "answer",
        normalize: bool = True,
        extract: str | re.Pattern[str] | None = None,
    ) -> None:
        if mode not in self.MODES:
            raise ValueError(
                f"VerifiableRewardModel mode {mode!r} is not one of {list(self.MODES)}."
            )
        self.mode = mode
        self.answer_column = answer_column
        self.normalize = normalize
        self.extract = re.compile(extract, re.DOTALL) if isinstance(extract, str) else extract

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        answers = _column(type(self).__name__, columns, [self.answer_column], len(completions))
        return [self.score_one(_text(c), a) for c, a in zip(completions, answers, strict=True)]

    def score_one(self, completion: str, answer: Any) -> RewardOutput:
        """Score one completion against one answer (or a list of accepted answers)."""
        if not completion.strip():
            return RewardOutput(0.0, "The response is empty.", {"extracted_answer": None})
        predicted = completion
        if self.extract is not None:
            matches = list(self.extract.finditer(completion))
            if not matches:
                feedback = f"No answer in the expected format was found (expected a match of the pattern `{self.extract.pattern}`)."
                return RewardOutput(0.0, feedback, {"extracted_answer": None})
            last = matches[-1]
            predicted = last.group(1) if self.extract.groups else last.group(0)
        info: dict[str, Any] = {"extracted_answer": predicted}
        accepted = answer if isinstance(answer, (list, tuple)) else [answer]
        ok = any(self._match(predicted, str(a)) for a in accepted)
        return RewardOutput(1.0 if ok else 0.0, None, info)

    def _match(self, predicted: str, answer: str) -> bool:
        if self.normalize:
            predicted = normalize_answer(predicted)
        if self.mode == "regex":
            return (
                re.fullmatch(
                    answer, predicted, flags=re.DOTALL | (re.IGNORECASE if self.normalize else 0)
                )
                is not None
            )
        if self.normalize:
            answer = normalize_answer(answer)
        return predicted == answer if self.mode == "exact" else answer in predicted


# ----- plain functions (TRL convention) -----------------------------------------------------------


def _function_name(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


class FunctionRewardModel(RewardModel):
    """Adapter for a plain function ``fn(prompts, completions, **columns) -> list`` (TRL's convention).

    Each returned item may be:
    - a number: the score;
    - ``None`` (TRL: "not applicable"): scored 0.0, with ``info["skipped"] = True``;
    - ``(score, feedback)``;
    - ``{"score": ..., "feedback": ..., "info": {...}}`` (feedback and info optional);
    - a :class:`RewardOutput`.

    ``fn`` receives only the columns it can take: all of them if it has ``**kwargs``, else those it
    names (a named column missing from the batch raises :class:`MissingColumnError`). Called by the
    trainer, it gets TRL's arguments: ``prompts``, ``completions`` (message lists for chat
    prompts), ``completion_ids``, ``trainer_state``, ``log_metric``, ``log_extra`` and the columns,
    so TRL's reward functions (``trl.rewards.accuracy_reward``, ...) run unchanged.

    Errors: a wrong number of items, an item of another kind, or a non-finite score raise
    :class:`RewardFunctionError` naming the function (and the sample). If ``fn`` itself raises, it
    is re-run on one sample at a time to find the samples that break it; then
    ``on_error="raise"`` raises :class:`RewardFunctionError` naming the function, the first such
    sample and the original exception (chained), while ``on_error="zero"`` scores those samples 0
    (all samples if none fails alone) with the error as feedback and ``info["reward_error"] = True``.
    """

    def __init__(
        self, fn: Callable[..., Sequence[Any]], name: str | None = None, on_error: str = "raise"
    ) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionRewardModel needs a callable, got {type(fn).__name__}.")
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}.")
        self.fn = fn
        self.name = name or _function_name(fn)
        self.on_error = on_error
        self._params = self._signature(fn)
        if self._params is not None and "completions" not in self._params[0]:
            raise TypeError(
                f"Reward function {self.name!r} must take a `completions` argument "
                "(convention: fn(prompts, completions, **columns))."
            )

    @staticmethod
    def _signature(fn: Callable[..., Any]) -> tuple[set[str], set[str]] | None:
        """(accepted names, required names) of ``fn``; None when it takes ``**kwargs`` or is opaque."""
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
        return {p.name for p in named}, {p.name for p in named if p.default is p.empty}

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        n = len(completions)
        for key, values in columns.items():
            if key in _NOT_PER_SAMPLE:
                continue
            if len(values) != n:
                raise ValueError(
                    f"Reward function {self.name!r}: column {key!r} has {len(values)} values for {n} completions."
                )
        try:
            return self._score(prompts, completions, columns)
        except (RewardFunctionError, MissingColumnError):
            raise
        except Exception as exc:  # any user error: handled by the on_error policy
            return self._recover(prompts, completions, columns, exc)

    def _call(
        self, prompts: list[Prompt], completions: list[str], columns: dict[str, list[Any]]
    ) -> Any:
        kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions, **columns}
        if self._params is not None:
            accepted, required = self._params
            missing = sorted(required - set(kwargs))
            if missing:
                raise MissingColumnError(
                    f"Reward function {self.name!r} needs the column {missing[0]!r}, but the batch only has the columns {_data_columns(columns)}."
                )
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return self.fn(**kwargs)

    def _score(
        self,
        prompts: list[Prompt],
        completions: list[str],
        columns: dict[str, list[Any]],
        offset: int = 0,
    ) -> list[RewardOutput]:
        raw = self._call(prompts, completions, columns)
        is_list = isinstance(raw, Sequence) or hasattr(
            raw, "tolist"
        )  # lists, tuples, arrays, tensors
        if isinstance(raw, (str, bytes)) or not is_list:
            raise RewardFunctionError(
                f"Reward function {self.name!r} must return a list, got {type(raw).__name__}."
            )
        items = raw.tolist() if hasattr(raw, "tolist") else list(raw)
        if len(items) != len(completions):
            raise RewardFunctionError(
                f"Reward function {self.name!r} returned {len(items)} items for {len(completions)} completions; it must return one per completion."
            )
        return [self._output(item, offset + i) for i, item in enumerate(items)]

    def _output(self, item: Any, index: int) -> RewardOutput:
        feedback, info = None, {}
        if item is None:
            return RewardOutput(0.0, None, {"skipped": True})
        if isinstance(item, RewardOutput):
            score, feedback, info = item.score, item.feedback, dict(item.info)
        elif isinstance(item, dict):
            if "score" not in item:
                raise RewardFunctionError(
                    f"Reward function {self.name!r} returned a dict without 'score' for sample {index}: {item!r}."
                )
            score, feedback, info = (
                item["score"],
                item.get("feedback"),
                dict(item.get("info") or {}),
            )
        elif isinstance(item, tuple) and len(item) == 2:
            score, feedback = item
        else:
            score = item
        try:
            value = float(score)
        except (TypeError, ValueError) as exc:
            raise RewardFunctionError(
                f"Reward function {self.name!r} returned {item!r} for sample {index}; expected a number, None, (score, feedback) or a dict with 'score'."
            ) from exc
        if not math.isfinite(value):
            raise RewardFunctionError(
                f"Reward function {self.name!r} returned a non-finite score ({value}) for sample {index}."
            )
        return RewardOutput(value, None if feedback is None else str(feedback), info)

    def _recover(
        self,
        prompts: list[Prompt],
        completions: list[str],
        columns: dict[str, list[Any]],
        exc: Exception,
    ) -> list[RewardOutput]:
        """Re-run ``fn`` one sample at a time to locate the failures, then apply the on_error policy."""
        outputs: list[RewardOutput | None] = []
        failures: dict[int, Exception] = {}
        for i in range(len(completions)):
            one = {k: v if k in _NOT_PER_SAMPLE else [v[i]] for k, v in columns.items()}
            if "log_extra" in one:  # per-sample calls would log misaligned columns
                one["log_extra"] = _ignore_extra
            try:
                outputs.append(self._score([prompts[i]], [completions[i]], one, offset=i)[0])
            except RewardFunctionError:
                raise
            except Exception as sample_exc:
                failures[i] = sample_exc
                outputs.append(None)
                if self.on_error == "raise":
                    break
        if self.on_error == "raise":
            if failures:
                i, err = next(iter(failures.items()))
                raise RewardFunctionError(
                    f"Reward function {self.name!r} raised {type(exc).__name__}: {exc}. "
                    f"Sample {i} alone reproduces it ({type(err).__name__}: {err})."
                ) from exc
            raise RewardFunctionError(
                f"Reward function {self.name!r} raised {type(exc).__name__}: {exc} on the batch of {len(completions)}, "
                "but on no single sample alone."
            ) from exc
        if not failures:  # fails only as a batch: nothing to trust
            failures = dict.fromkeys(range(len(completions)), exc)
        for i, err in failures.items():
            feedback = f"The reward function {self.name!r} failed on this response: {type(err).__name__}: {err}"
            outputs[i] = RewardOutput(
                0.0, feedback, {"reward_error": True, "error_type": type(err).__name__}
            )
        return [out for out in outputs if out is not None]


def _ignore_extra(column: str, values: list[Any]) -> None:
    """A ``log_extra`` that drops what it is given."""


# ----- calling a reward model from the trainer ----------------------------------------------------


class RewardTimeoutError(RewardFunctionError):
    """A reward call ran past ``data.reward_timeout_s``."""


def cap_feedback(feedback: str | None, max_chars: int | None) -> str | None:
    """``feedback`` cut to ``max_chars`` characters plus a marker saying how much was cut."""
    if feedback is None or max_chars is None or len(feedback) <= max_chars:
        return feedback
    return f"{feedback[:max_chars]}\n[feedback truncated: {len(feedback)} characters, {max_chars} kept]"


@contextlib.contextmanager
def _time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`RewardTimeoutError` in the body after ``seconds`` (SIGALRM: main thread only),
    and again every second after that, so a function that swallows the first one still stops."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RewardTimeoutError(
            f"{what} did not return within {seconds} s (data.reward_timeout_s); "
            "make it faster or raise the limit."
        )

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


# ----- combinations -------------------------------------------------------------------------------


class CombinedRewardModel(RewardModel):
    """Weighted sum of reward models: ``score = sum_i w_i * score_i``.

    ``feedback`` joins the non-empty feedbacks with blank lines, each prefixed by its model's name
    when more than one model gave feedback. ``info[name]`` holds each model's info plus its own
    ``score``. Models sharing a name get suffixes ``_1``, ``_2``, ... in order.
    """

    name = "combined"

    def __init__(
        self,
        models: Sequence[RewardModel | Callable[..., Any]],
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
        success: str | None = None,
    ) -> None:
        if not models:
            raise ValueError("CombinedRewardModel needs at least one reward model.")
        self.models = [as_reward_model(m, on_error=on_error) for m in models]
        self.weights = [1.0] * len(self.models) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.models):
            raise ValueError(
                f"CombinedRewardModel got {len(self.weights)} weights for {len(self.models)} models."
            )
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"CombinedRewardModel weights must be finite, got {self.weights}.")
        names = [m.name for m in self.models]
        self.names = [
            nm if names.count(nm) == 1 else f"{nm}_{names[:i].count(nm) + 1}"
            for i, nm in enumerate(names)
        ]
        if success not in (None, "sum", *self.names):
            raise ValueError(
                f"self_distillation.success_reward = {success!r} is not one of the reward "
                f"functions ({', '.join(self.names)}); name one of them, 'sum', or None (the first)."
            )
        self.success = success

    def success_score(self, output: RewardOutput) -> float:
        """The score success is judged on (against ``success_reward_threshold``).

        The rule: ``success=None`` (default) judges the first function's own, unweighted score;
        ``success=NAME`` that function's; ``success="sum"`` the weighted sum (the training reward).
        So a format bonus listed after the correctness reward never makes a wrong answer a
        success (a demonstration for its siblings), while it still adds to the reward."""
        if self.success == "sum":
            return float(output.score)
        name = self.success or self.names[0]
        return float(output.info[name]["score"])

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        per_model = [model(prompts, completions, **columns) for model in self.models]
        for name, outs in zip(self.names, per_model, strict=True):
            if len(outs) != len(completions):
                raise RewardFunctionError(
                    f"Reward model {name!r} returned {len(outs)} outputs for {len(completions)} completions."
                )
        combined = []
        for i in range(len(completions)):
            outs = [outs[i] for outs in per_model]
            score = sum(w * o.score for w, o in zip(self.weights, outs, strict=True))
            given = [(nm, o.feedback) for nm, o in zip(self.names, outs, strict=True) if o.feedback]
            feedback = (
                "\n\n".join(f"{nm}: {fb}" if len(given) > 1 else fb for nm, fb in given) or None
            )
            info = {
                nm: {**o.info, "score": o.score} for nm, o in zip(self.names, outs, strict=True)
            }
            combined.append(RewardOutput(score, feedback, info))
        return combined


def as_reward_model(
    obj: Any,
    on_error: str = "raise",
    weights: Sequence[float] | None = None,
    success: str | None = None,
) -> RewardModel:
    """A :class:`RewardModel` from a reward model, a plain function, or a list of them (their
    ``weights``-weighted sum, TRL's ``reward_weights``; ``success``: see
    :meth:`CombinedRewardModel.success_score`)."""
    if weights is not None or (success not in (None, "sum") and not isinstance(obj, (list, tuple))):
        if isinstance(obj, CombinedRewardModel):
            if weights is not None:
                raise ValueError(
                    "data.reward_weights is set and the reward is a CombinedRewardModel with its "
                    "own weights; give the weights once."
                )
            return CombinedRewardModel(obj.models, obj.weights, on_error, success)
        models = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        if weights is not None and len(weights) != len(models):
            raise ValueError(
                f"data.reward_weights has {len(weights)} weights for {len(models)} reward "
                "functions; give one weight per function, in the order of the functions."
            )
        return CombinedRewardModel(models, weights, on_error, success)
    if isinstance(obj, CombinedRewardModel) and success is not None:
        return CombinedRewardModel(obj.models, obj.weights, on_error, success)
    if isinstance(obj, (list, tuple)) and (len(obj) > 1 or success not in (None, "sum")):
        return CombinedRewardModel(obj, on_error=on_error, success=success)
    if isinstance(obj, RewardModel):
        return obj
    if isinstance(obj, (list, tuple)):
        return (
            as_reward_model(obj[0], on_error)
            if len(obj) == 1
            else CombinedRewardModel(obj, on_error=on_error)
        )
    if callable(obj):
        return FunctionRewardModel(obj, on_error=on_error)
    raise TypeError(
        f"Expected a RewardModel, a function fn(prompts, completions, **columns), or a list of them; got {type(obj).__name__}."
    )


def success_scores(reward_model: RewardModel, outputs: Sequence[RewardOutput]) -> list[float]:
    """Per completion, the score compared with ``success_reward_threshold``: the score itself for
    one reward function; for several, :meth:`CombinedRewardModel.success_score`'s rule."""
    judge = getattr(reward_model, "success_score", None)
    return [float(judge(o)) if judge else float(o.score) for o in outputs]


def reward_metrics(reward_model: RewardModel, outputs: Sequence[RewardOutput]) -> dict[str, float]:
    """TRL's per-function metrics ``rewards/<name>/mean`` and ``rewards/<name>/std`` (unbiased
    std over this batch's completions, 0 for one completion): each function's own, unweighted
    score."""
    names = getattr(reward_model, "names", None)
    columns = (
        {nm: [float(o.info[nm]["score"]) for o in outputs] for nm in names}
        if names
        else {reward_model.name: [float(o.score) for o in outputs]}
    )
    out = {}
    for name, values in columns.items():
        out[f"rewards/{name}/mean"] = statistics.fmean(values) if values else 0.0
        out[f"rewards/{name}/std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out
