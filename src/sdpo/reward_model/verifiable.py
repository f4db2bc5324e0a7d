"""Verifiable rewards: exact / contains / regex match of the completion against an answer column."""

from __future__ import annotations

import re
from typing import Any

from sdpo.reward_model.interface import (
    Prompt,
    RewardModel,
    RewardOutput,
    _column,
    _text,
)


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
