"""Named presets: overrides of the seed defaults (``SDPOConfig.preset(name)``,
``sdpo train --preset``)."""

from __future__ import annotations

from typing import Any

# Presets: overrides of the seed defaults. `paper` = SPEC section 7's official-run values.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "paper": {
        "num_samples_per_prompt": 8,
        "self_distillation.distillation_topk": 100,
        "self_distillation.distillation_add_tail": True,
        "self_distillation.is_clip": 2.0,
        "self_distillation.success_reward_threshold": 1.0,
        "self_distillation.teacher_update_rate": 0.05,
        "policy_gradient.pg_loss_weight": 0.0,
        "policy_gradient.kl_penalty_weight": 0.0,
        "policy_gradient.scale_rewards": False,
        "optimization.learning_rate": 1e-5,
        "optimization.weight_decay": 0.01,
        "optimization.max_grad_norm": 1.0,
        "optimization.prompts_per_step": 32,
    },
    # `sdpo train` with no arguments: the demo model on the arithmetic task, minutes on a CPU.
    "quickstart": {
        "model_name": "demo",
        "num_samples_per_prompt": 8,
        "data.task": "arithmetic",
        "generation.max_new_tokens": 8,
        "generation.temperature": 1.0,
        "self_distillation.alpha": 0.5,
        "self_distillation.teacher": "ema",
        "self_distillation.teacher_update_rate": 0.05,
        "policy_gradient.kl_penalty_weight": 0.0,
        "optimization.learning_rate": 1e-4,
        "optimization.prompts_per_step": 8,
        "optimization.micro_batch_size": 64,
        "run.max_steps": 300,
        "run.save_steps": 100,
        "run.eval_max_prompts": 500,
    },
    # List-program synthesis (sdpo.tasks.listprog) with the model trained for it; compact teacher
    # templates (feedback first, the question last, so the context ends in "Program:") keep the
    # character-level model's sequences short.
    "listprog": {
        "model_name": "demo-listprog",
        "num_samples_per_prompt": 8,
        "data.task": "listprog",
        "generation.max_new_tokens": 40,
        "generation.temperature": 1.0,
        "self_distillation.alpha": 0.5,
        "self_distillation.teacher": "ema",
        "self_distillation.teacher_update_rate": 0.05,
        "self_distillation.reprompt_template": "{feedback}{solution}{prompt}",
        "self_distillation.solution_template": "Correct: {successful_previous_attempt}\n",
        "self_distillation.feedback_template": "{feedback_raw}\n",
        "policy_gradient.kl_penalty_weight": 0.0,
        "optimization.learning_rate": 1e-4,
        "optimization.prompts_per_step": 8,
        "optimization.micro_batch_size": 64,
        "run.max_steps": 100,
        "run.save_steps": 100,
        "run.eval_max_prompts": 200,
    },
    "grpo": {
        "self_distillation.distillation_weight": 0.0,
        "policy_gradient.pg_loss_weight": 1.0,
    },
}
