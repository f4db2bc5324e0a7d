"""The `sdpo` command line.

sdpo train                                  # the quickstart: demo model, arithmetic task
sdpo train --config run.yaml key=value ...  # a config file plus dotted overrides
sdpo train --preset paper task=arithmetic   # a preset plus overrides
sdpo train --resume runs/sdpo               # continue a run exactly where it stopped
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import time
from pathlib import Path
from typing import Any

from sdpo.config import PRESETS, SDPOConfig


def _config_help() -> str:
    """Every config key with its default and doc, generated from the dataclasses."""
    lines = ["config keys (set as key=value; a leaf name unique across sections works too):"]
    default = SDPOConfig()
    for key in SDPOConfig.keys():
        fld, _ = SDPOConfig.field_info(key)
        value = default.get(key)
        shown = (
            repr(value)
            if not isinstance(value, str) or len(value) < 40
            else repr(value[:37] + "...")
        )
        choices = fld.metadata.get("choices")
        extra = f" {{{', '.join(choices)}}}" if choices else ""
        lines.append(f"  {key} = {shown}{extra}\n      {fld.metadata.get('doc', '')}")
    return "\n".join(lines)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sdpo", description="Self-Distilled Policy Optimization for language models."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    train = sub.add_parser(
        "train",
        help="Train a model (no arguments: the built-in quickstart).",
        description="Train with SDPO. With no arguments: the quickstart (demo model, arithmetic task, a few minutes on CPU).",
        epilog=_config_help(),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    train.add_argument(
        "--config", type=Path, help="YAML config file (nested sections or dotted keys)."
    )
    train.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="Start from a preset (quickstart when neither --config nor --preset is given).",
    )
    train.add_argument(
        "--resume",
        metavar="RUN_DIR",
        help="Resume the run in RUN_DIR (its config.yaml, newest checkpoint).",
    )
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Config overrides, e.g. self_distillation.alpha=1.0",
    )
    return parser


def load_config(args: argparse.Namespace) -> SDPOConfig:
    """The run's config: resume dir's config, else --config, else --preset, else quickstart; then overrides."""
    if args.resume:
        run_dir = Path(args.resume)
        if not (run_dir / "config.yaml").exists():
            raise SystemExit(
                f"sdpo: --resume {run_dir}: no config.yaml there; give the run directory of an earlier `sdpo train`."
            )
        config = SDPOConfig.from_yaml(run_dir / "config.yaml")
        config.run.resume_from = str(run_dir)
        config.run.output_dir = str(run_dir)
    elif args.config:
        config = SDPOConfig.from_yaml(args.config)
    else:
        config = SDPOConfig.preset(args.preset or "quickstart")
    config.apply_overrides(args.overrides)
    if not args.resume and config.run.output_dir == SDPOConfig().run.output_dir:
        config.run.output_dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}"
    return config


def load_reward(spec: str) -> Any:
    """A reward model by name (math, code, exact) or a ``module:function`` callable."""
    from sdpo import reward_model as rm

    named = {"math": rm.MathRewardModel, "exact": lambda: rm.VerifiableRewardModel(mode="exact")}
    if spec == "code":
        from sdpo.environments import CodeExecutionRewardModel

        return CodeExecutionRewardModel()
    if spec in named:
        return named[spec]()
    if ":" not in spec:
        raise SystemExit(f"sdpo: data.reward={spec!r}: use math, code, exact, or module:function.")
    module, name = spec.split(":", 1)
    sys.path.insert(0, os.getcwd())
    return getattr(importlib.import_module(module), name)


def build_data(config: SDPOConfig) -> tuple[Any, Any, Any]:
    """(train rows, eval rows, reward) from a built-in task or from JSONL files."""
    data = config.data
    if data.task:
        from sdpo.tasks import load_task, task_reward_model

        return (
            load_task(data.task, "train", seed=config.run.seed),
            load_task(data.task, "eval", seed=config.run.seed),
            task_reward_model(data.task),
        )
    if not data.train_file:
        raise SystemExit(
            "sdpo: no data: set task=arithmetic (or reversal, code) or data.train_file=FILE.jsonl with data.reward=..."
        )
    if not data.reward:
        raise SystemExit(
            "sdpo: data.train_file needs data.reward (math, code, exact, or module:function)."
        )
    return data.train_file, data.eval_file, load_reward(data.reward)


def train(args: argparse.Namespace) -> int:
    from sdpo.policy_model import PolicyModel
    from sdpo.trainer import SDPOTrainer

    try:
        config = load_config(args)
    except (KeyError, ValueError, FileNotFoundError) as exc:
        print(f"sdpo: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    train_rows, eval_rows, reward = build_data(config)
    print(
        f"sdpo: model {config.model_name}, task {config.data.task or config.data.train_file}, {config.run.max_steps} steps; run directory {config.run.output_dir}"
    )
    policy = PolicyModel(
        config.model_name,
        device=config.model.device,
        dtype=config.model.dtype,
        trust_remote_code=config.model.trust_remote_code,
    )
    trainer = SDPOTrainer(
        config=config,
        policy_model=policy,
        reward_model=reward,
        train_dataloader=train_rows,
        eval_dataloader=eval_rows,
    )
    final = trainer.train()
    first = getattr(trainer, "first_eval", {})
    for key in ("eval/accuracy_greedy", "eval/accuracy_sampled"):
        if key in final:
            before = f"{first[key]:.3f} -> " if key in first else ""
            print(f"{key}: {before}{final[key]:.3f}")
    print(f"Run directory: {trainer.run_dir.resolve()} (metrics.jsonl, samples.jsonl, checkpoints)")
    return 0


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = build_parser().parse_args(argv)
    if args.command == "train":
        return train(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
