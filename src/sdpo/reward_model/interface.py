"""The reward interface: :class:`RewardModel`, :class:`RewardOutput`, TRL's completion form and
the keyword arguments the trainer passes (:data:`TRAINER_KWARGS`), and the errors a reward raises."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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


class RewardTimeoutError(RewardFunctionError):
    """A reward call ran past ``data.reward_timeout_s``."""
