"""sdpo: Self-Distilled Policy Optimization for language models."""

from sdpo.config import SDPOConfig
from sdpo.policy_model import PolicyModel
from sdpo.reprompting import Reprompter, TeacherContext
from sdpo.reward_model import (
    CombinedRewardModel,
    FunctionRewardModel,
    MathRewardModel,
    RewardModel,
    RewardOutput,
    RuleBasedCodeRewardModel,
    VerifiableRewardModel,
)
from sdpo.trainer import SDPOTrainer

__all__ = [
    "CombinedRewardModel",
    "FunctionRewardModel",
    "MathRewardModel",
    "PolicyModel",
    "Reprompter",
    "RewardModel",
    "RewardOutput",
    "RuleBasedCodeRewardModel",
    "SDPOConfig",
    "SDPOTrainer",
    "TeacherContext",
    "VerifiableRewardModel",
]
__version__ = "0.1.0"
