"""Math rewards: the final answer (``\\boxed{...}`` or lenient fallbacks) checked for equivalence
with ``math_verify``."""

from __future__ import annotations

import re
import threading
from typing import Any

from sdpo.reward_model.interface import (
    Completion,
    Prompt,
    RewardModel,
    RewardOutput,
    _column,
    _text,
)


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
