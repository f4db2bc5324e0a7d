"""SDPOConfig: every hyperparameter of sdpo, declared once, with its one-line doc and default.

Sections mirror the algorithm: ``model``, ``generation``, ``self_distillation``,
``policy_gradient``, ``optimization``, ``data``, ``run``, ``health``. The seed's flat form works too::

    SDPOConfig(model_name="gpt2", num_samples_per_prompt=4,
               self_distillation__success_reward_threshold=0.8, self_distillation__alpha=0.5)

A bare leaf name that exists in exactly one section (``alpha=1.0``) is accepted as well.

The package's modules: :mod:`~sdpo.config.sections` (the section dataclasses: every key, its doc,
default and bounds), :mod:`~sdpo.config.sdpo_config` (:class:`SDPOConfig`: keys, overrides,
validation, YAML), :mod:`~sdpo.config.parsing` (value conversion, YAML reading, templates),
:mod:`~sdpo.config.presets` and :mod:`~sdpo.config.trl_keys` (TRL's names). Every public name
is importable from ``sdpo.config`` itself.
"""

from sdpo.config.parsing import TEMPLATE_FIELDS
from sdpo.config.presets import PRESETS
from sdpo.config.sdpo_config import SDPOConfig
from sdpo.config.sections import (
    DEFAULT_FEEDBACK_TEMPLATE,
    DEFAULT_REPROMPT_TEMPLATE,
    DEFAULT_SOLUTION_TEMPLATE,
    MAX_LORA_RANK,
    MAX_PROMPTS_PER_STEP,
    MAX_SAMPLES_PER_PROMPT,
    SECTIONS,
    DataConfig,
    DistributedConfig,
    GenerationConfig,
    HealthConfig,
    LoraConfig,
    ModelConfig,
    OptimizationConfig,
    PolicyGradientConfig,
    RunConfig,
    SelfDistillationConfig,
)
from sdpo.config.trl_keys import TRL_ALIASES, TRL_KEY_HINTS, TRL_VALUES, trl_key

__all__ = [
    "DEFAULT_FEEDBACK_TEMPLATE",
    "DEFAULT_REPROMPT_TEMPLATE",
    "DEFAULT_SOLUTION_TEMPLATE",
    "DataConfig",
    "DistributedConfig",
    "GenerationConfig",
    "HealthConfig",
    "LoraConfig",
    "MAX_LORA_RANK",
    "MAX_PROMPTS_PER_STEP",
    "MAX_SAMPLES_PER_PROMPT",
    "ModelConfig",
    "OptimizationConfig",
    "PRESETS",
    "PolicyGradientConfig",
    "RunConfig",
    "SDPOConfig",
    "SECTIONS",
    "SelfDistillationConfig",
    "TEMPLATE_FIELDS",
    "TRL_ALIASES",
    "TRL_KEY_HINTS",
    "TRL_VALUES",
    "trl_key",
]
