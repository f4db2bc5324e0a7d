"""List programs (:mod:`sdpo.tasks.listprog`) with another question's feedback: the binary reward,
but each failed attempt's feedback is that of an attempt at a different question in the same batch
(:class:`~sdpo.tasks.listprog.ShuffledFeedback`). The study's control that must show no gain from
self-distillation (``data.task=listprog_shuffled``)."""

from __future__ import annotations

from sdpo.reward_model import RewardModel
from sdpo.tasks.listprog import ListProgRewardModel, ShuffledFeedback, load

__all__ = ["load", "reward_model"]


def reward_model() -> RewardModel:
    """All hidden tests pass; the feedback comes from another question's failed attempt."""
    return ShuffledFeedback(ListProgRewardModel())
