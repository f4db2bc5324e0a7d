"""TRL's way of building a trainer, mapped onto sdpo's.

TRL users write ``SDPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)``. This
module turns that call shape into sdpo's own (``config``, ``policy_model``, ``reward_model``,
``train_dataloader``). TRL's config names (``num_generations``, ...) are
:mod:`sdpo.config`'s business: ``TRL_ALIASES``, ``TRL_VALUES``, ``TRL_KEY_HINTS`` there.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sdpo.config import SDPOConfig
from sdpo.policy_model import PolicyModel


@dataclass
class TrainerArgs:
    """The seed's constructor arguments, as :func:`resolve_trainer_args` returns them."""

    config: Any
    policy_model: Any
    reward_model: Any
    train_dataloader: Any
    eval_dataloader: Any


def resolve_trainer_args(
    config: Any,
    policy_model: Any,
    reward_model: Any,
    train_dataloader: Any,
    eval_dataloader: Any,
    trl: dict[str, Any],
) -> TrainerArgs:
    """sdpo's constructor arguments from either call shape.

    The seed's: ``SDPOTrainer(config, policy_model, reward_model, train_dataloader, ...)``.
    TRL's: ``SDPOTrainer(model=str | PreTrainedModel | PeftModel, reward_funcs=fn | [fn, ...],
    args=SDPOConfig, train_dataset=Dataset | IterableDataset | list, eval_dataset=...,
    processing_class=tokenizer, peft_config=peft.LoraConfig)``; positionally too
    (``SDPOTrainer("Qwen/...", reward_fn, args, dataset)``: a model where the config goes).
    """
    refused = {k: v for k, v in trl.items() if k in ("reward_processing_classes", "optimizers")}
    if refused.get("reward_processing_classes") is not None:
        raise ValueError(
            "reward_processing_classes: sdpo's reward functions are callables "
            "fn(prompts, completions, **columns); wrap a reward model in one."
        )
    if refused.get("optimizers", (None, None)) != (None, None):
        raise ValueError(
            "optimizers: sdpo builds its AdamW and schedule from the config "
            "(optimization.learning_rate, optimization.lr_scheduler, optimization.warmup_steps)."
        )
    trl = {k: v for k, v in trl.items() if k not in refused and v is not None}
    if config is not None and not isinstance(config, SDPOConfig):
        # TRL's positional order: model, reward_funcs, args, train_dataset.
        names = ("model", "reward_funcs", "args", "train_dataset")
        given = (config, policy_model, reward_model, train_dataloader)
        for name, value in zip(names, given, strict=True):
            if value is not None:
                if name in trl:
                    raise TypeError(f"SDPOTrainer got {name} twice (by position and by name).")
                trl[name] = value
        config = policy_model = reward_model = train_dataloader = None
    if not trl:
        missing = [
            name
            for name, value in (
                ("config", config),
                ("policy_model", policy_model),
                ("reward_model", reward_model),
                ("train_dataloader", train_dataloader),
            )
            if value is None
        ]
        if missing:
            raise TypeError(
                f"SDPOTrainer needs {', '.join(m + '=' for m in missing)} (sdpo's call shape), or "
                "TRL's: SDPOTrainer(model=..., reward_funcs=..., args=..., train_dataset=...)."
            )
        return TrainerArgs(config, policy_model, reward_model, train_dataloader, eval_dataloader)

    seed = {
        "config": config,
        "policy_model": policy_model,
        "reward_model": reward_model,
        "train_dataloader": train_dataloader,
        "eval_dataloader": eval_dataloader,
    }
    mixed = [k for k, v in seed.items() if v is not None]
    if mixed:
        raise TypeError(
            f"SDPOTrainer got TRL's arguments ({', '.join(sorted(trl))}) and sdpo's "
            f"({', '.join(mixed)}); use one call shape: TRL's (model=, reward_funcs=, args=, "
            "train_dataset=, ...) or sdpo's (config=, policy_model=, reward_model=, "
            "train_dataloader=, ...)."
        )
    for name in ("model", "reward_funcs", "train_dataset"):
        if trl.get(name) is None:
            raise TypeError(f"SDPOTrainer(model=..., reward_funcs=..., ...) needs {name}=.")
    args = trl.get("args")
    if args is None:
        args = SDPOConfig()
    elif not isinstance(args, SDPOConfig):
        raise TypeError(
            f"args is a {type(args).__module__}.{type(args).__name__}; pass sdpo's SDPOConfig "
            "(`from sdpo import SDPOConfig`), which takes TRL's names too "
            "(SDPOConfig(num_generations=8, max_completion_length=128, learning_rate=1e-5))."
        )
    eval_dataset = trl.get("eval_dataset")
    if isinstance(eval_dataset, dict):
        raise ValueError(
            "eval_dataset is a dict of datasets; sdpo evaluates one eval set: pass one dataset."
        )
    if trl.get("peft_config") is not None:
        apply_peft_config(args, trl["peft_config"])
    policy = _policy(trl["model"], trl.get("processing_class"), args)
    rewards = trl["reward_funcs"]
    return TrainerArgs(args, policy, rewards, trl["train_dataset"], eval_dataset)


def _policy(model: Any, tokenizer: Any, config: Any) -> Any:
    """A :class:`~sdpo.policy_model.PolicyModel` from a model id/path or a built model."""
    if isinstance(model, PolicyModel):
        return model
    if isinstance(model, str):
        default = type(config)().model_name
        if config.model_name not in (default, model):
            raise ValueError(
                f"model={model!r} but args.model_name = {config.model_name!r}; give the model once."
            )
        config.model_name = model
        policy = PolicyModel(
            model,
            device=config.model.device,
            dtype=config.model.param_dtype,
            trust_remote_code=config.model.trust_remote_code,
        )
        if tokenizer is not None:
            policy.tokenizer = tokenizer
        return policy
    if not hasattr(model, "generate") or not hasattr(model, "config"):
        raise TypeError(
            f"model must be a model id or path, a transformers PreTrainedModel or a PeftModel; "
            f"got {type(model).__name__}."
        )
    if tokenizer is None:
        from transformers import AutoTokenizer

        name = getattr(model.config, "_name_or_path", "")
        if not name:
            raise ValueError("model= is a built model without a name; pass processing_class=tok.")
        tokenizer = AutoTokenizer.from_pretrained(name)
    config.model_name = getattr(model.config, "_name_or_path", "") or config.model_name
    return PolicyModel(model=model, tokenizer=tokenizer, device=config.model.device)


def apply_peft_config(config: Any, peft_config: Any) -> None:
    """Copy a ``peft.LoraConfig`` into ``model.lora``; refuse settings sdpo does not implement."""
    kind = type(peft_config).__name__
    if kind != "LoraConfig":
        raise ValueError(f"peft_config is a {kind}; sdpo trains LoRA adapters (peft.LoraConfig).")
    unsupported = {
        "bias": "none",
        "use_rslora": False,
        "use_dora": False,
        "fan_in_fan_out": False,
    }
    for name, default in unsupported.items():
        if getattr(peft_config, name, default) != default:
            raise ValueError(
                f"peft_config.{name} = {getattr(peft_config, name)!r} is not supported by sdpo's "
                f"LoRA (model.lora); leave it at {default!r}."
            )
    targets = peft_config.target_modules
    if isinstance(targets, str):
        raise ValueError(
            f"peft_config.target_modules = {targets!r} (a pattern); give a list of module names."
        )
    config.set("model.lora.r", peft_config.r)
    config.set("model.lora.lora_alpha", float(peft_config.lora_alpha))
    config.set("model.lora.lora_dropout", float(peft_config.lora_dropout))
    config.set("model.lora.target_modules", sorted(targets) if targets else None)
    config.set("model.lora.modules_to_save", list(peft_config.modules_to_save or []))
    config.validate()
