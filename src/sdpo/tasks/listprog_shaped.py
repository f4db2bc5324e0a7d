"""List programs (:mod:`sdpo.tasks.listprog`) with a shaped reward: the fraction of the hidden tests
passed, instead of 1 only when all pass. Same rows and feedback; the study's information-matched
control for GRPO (``data.task=listprog_shaped``)."""

from __future__ import annotations

from sdpo.reward_model import RewardModel
from sdpo.tasks.listprog import ListProgRewardModel, load

__all__ = ["load", "reward_model"]


def reward_model() -> RewardModel:
    """The fraction of hidden tests passed; feedback on the shown examples below 1."""
    return ListProgRewardModel(shaped=True)
