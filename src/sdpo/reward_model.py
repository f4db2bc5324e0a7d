"""Rewards with feedback: every reward model returns a score and, optionally, text the teacher sees."""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

Prompt = str | list[dict[str, str]]


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

    ``prompts`` and ``completions`` have one entry per completion; each of ``columns`` (the dataset's
    other fields, e.g. ``answer`` or ``tests``) has one value per completion too.
    """

    name: str = "reward"

    @abstractmethod
    def __call__(self, prompts: list[Prompt], completions: list[str], **columns: list[Any]) -> list[RewardOutput]:
        """Score each completion."""
