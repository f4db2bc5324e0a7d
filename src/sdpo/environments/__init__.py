"""Environments: reward models that run or check something and explain what went wrong."""

from sdpo.environments.code import CodeExecutionRewardModel

__all__ = ["CodeExecutionRewardModel"]
