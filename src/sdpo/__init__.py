"""sdpo: Self-Distilled Policy Optimization for language models.

The public names are imported on first use (PEP 562), so ``import sdpo`` and ``sdpo --help``
do not pay for torch and transformers until something needs them.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "SDPOConfig": "sdpo.config",
    "PolicyModel": "sdpo.policy_model",
    "Reprompter": "sdpo.reprompting",
    "TeacherContext": "sdpo.reprompting",
    "CombinedRewardModel": "sdpo.reward_model",
    "FunctionRewardModel": "sdpo.reward_model",
    "MathRewardModel": "sdpo.reward_model",
    "RewardModel": "sdpo.reward_model",
    "RewardOutput": "sdpo.reward_model",
    "RuleBasedCodeRewardModel": "sdpo.reward_model",
    "VerifiableRewardModel": "sdpo.reward_model",
    "SDPOTrainer": "sdpo.trainer",
}
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

if TYPE_CHECKING:  # for type checkers and IDEs: the eager imports
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


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'sdpo' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # the next lookup skips this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
