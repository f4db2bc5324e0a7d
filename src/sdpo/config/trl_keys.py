"""TRL's config names (GRPOConfig / SDPOConfig / TrainingArguments): the ones that mean an sdpo key,
the values that translate, and hints for the ones that do not map one to one."""

from __future__ import annotations

from typing import Any

# TRL (GRPOConfig / SDPOConfig / TrainingArguments) names that mean exactly an sdpo key.
TRL_ALIASES: dict[str, str] = {
    "num_generations": "num_samples_per_prompt",
    "model_name_or_path": "model_name",
    "max_completion_length": "generation.max_new_tokens",
    "beta": "policy_gradient.kl_penalty_weight",
    "epsilon_high": "policy_gradient.clip_eps_high",
    # TRL's per-device micro-batch of completions per forward/backward pass.
    "per_device_train_batch_size": "optimization.micro_batch_size",
    "num_iterations": "optimization.updates_per_batch",
    "lr_scheduler_type": "optimization.lr_scheduler",
    "distillation_alpha": "self_distillation.alpha",
    "distillation_is_clip": "self_distillation.is_clip",
}

# TRL names whose values translate one to one: name -> (sdpo key, {TRL value: sdpo value}).
TRL_VALUES: dict[str, tuple[str, dict[Any, Any]]] = {
    "distillation_mode": (
        "self_distillation.distillation_level",
        {"sampled_token": "token", "full_logits": "logit", "topk_logits": "logit"},
    ),
    "teacher_model_kind": (
        "self_distillation.teacher",
        {"ema": "ema", "live": "live", "base": "frozen"},
    ),
    "loss_type": (
        "policy_gradient.loss_aggregation",
        {"dapo": "token_mean", "grpo": "sequence_mean", "dr_grpo": "dr_grpo"},
    ),
}

# TRL names sdpo names differently in a way that is not one key for one key: refused, with why.
TRL_KEY_HINTS: dict[str, str] = {
    "lr": "the learning rate is optimization.learning_rate.",
    "gradient_accumulation_steps": "sdpo accumulates by itself: one step's "
    "optimization.prompts_per_step x num_samples_per_prompt completions go through forward/"
    "backward optimization.micro_batch_size at a time (TRL's per_device_train_batch_size). For "
    "TRL's step of per_device_train_batch_size x gradient_accumulation_steps completions, set "
    "optimization.prompts_per_step to that number / num_samples_per_prompt.",
    "num_train_epochs": "sdpo counts steps: run.max_steps (one step = one generated batch).",
    "epsilon": "the ratio clip is policy_gradient.clip_eps_low (and policy_gradient.clip_eps_high).",
    "bf16": "set model.dtype=bfloat16.",
    "fp16": "set model.dtype=float16 (CUDA only).",
    "use_cpu": "set model.device=cpu.",
    "use_vllm": "vLLM is a generation backend: generation.backend=vllm.",
    "eval_strategy": "sdpo evaluates at the start, at the end and every run.eval_steps steps.",
    "save_strategy": "sdpo checkpoints every run.save_steps steps and at the end.",
    "use_successful_as_teacher": "successful siblings are always demonstrations; "
    "self_distillation.success_reward_threshold decides what counts as one.",
    "teacher_sync_steps": "the EMA teacher is updated after every optimizer step "
    "(self_distillation.teacher_update_rate).",
}


def trl_key(name: str, value: Any) -> tuple[str, Any] | None:
    """``(sdpo key, sdpo value)`` for a TRL config name that maps onto one, else None.

    Raises ValueError for a TRL value with no sdpo counterpart (naming both)."""
    leaf = name.split(".")[-1]
    if leaf in TRL_ALIASES:
        return TRL_ALIASES[leaf], value
    if leaf in TRL_VALUES:
        key, values = TRL_VALUES[leaf]
        if value not in values:
            raise ValueError(
                f"{leaf} = {value!r}: sdpo's {key} covers {', '.join(map(repr, values))} "
                f"(as {', '.join(map(repr, dict.fromkeys(values.values())))})."
            )
        return key, values[value]
    return None
