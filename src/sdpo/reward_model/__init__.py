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

The package's modules: :mod:`~sdpo.reward_model.interface` (the interface and its errors),
:mod:`~sdpo.reward_model.calling` (the calling convention), :mod:`~sdpo.reward_model.math_reward`,
:mod:`~sdpo.reward_model.code_reward`, :mod:`~sdpo.reward_model.verifiable`, and
:mod:`~sdpo.reward_model.functions` (plain functions, combinations, :func:`as_reward_model`).
Every public name is importable from ``sdpo.reward_model`` itself.
"""

from sdpo.reward_model.calling import (
    call_reward_model,
    cap_feedback,
    checked_scores,
    reward_metrics,
    success_scores,
)
from sdpo.reward_model.code_reward import RuleBasedCodeRewardModel, extract_code
from sdpo.reward_model.functions import CombinedRewardModel, FunctionRewardModel, as_reward_model

# _column and _text, not public, are the helpers environments and tasks share
from sdpo.reward_model.interface import (  # noqa: F401
    TRAINER_KWARGS,
    Completion,
    MissingColumnError,
    Prompt,
    RewardFunctionError,
    RewardLog,
    RewardModel,
    RewardOutput,
    RewardTimeoutError,
    _column,
    _text,
    as_trl_completions,
)
from sdpo.reward_model.math_reward import MathRewardModel, extract_boxed, extract_math_answer
from sdpo.reward_model.verifiable import VerifiableRewardModel, normalize_answer

__all__ = [
    "CombinedRewardModel",
    "Completion",
    "FunctionRewardModel",
    "MathRewardModel",
    "MissingColumnError",
    "Prompt",
    "RewardFunctionError",
    "RewardLog",
    "RewardModel",
    "RewardOutput",
    "RewardTimeoutError",
    "RuleBasedCodeRewardModel",
    "TRAINER_KWARGS",
    "VerifiableRewardModel",
    "as_reward_model",
    "as_trl_completions",
    "call_reward_model",
    "cap_feedback",
    "checked_scores",
    "extract_boxed",
    "extract_code",
    "extract_math_answer",
    "normalize_answer",
    "reward_metrics",
    "success_scores",
]
