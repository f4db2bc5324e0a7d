"""The `sdpo` command line.

sdpo train                                  # the quickstart: demo model, arithmetic task
sdpo train --config run.yaml key=value ...  # a config file plus dotted overrides
sdpo train --preset paper task=arithmetic   # a preset plus overrides
sdpo train --resume runs/sdpo               # continue a run exactly where it stopped
sdpo eval runs/sdpo --baseline demo         # mean@n, pass@k, maj@k; paired difference
sdpo plot runs/a runs/b -o curves.png       # training curves
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
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
        if fld.metadata.get("resumable"):
            extra += " [may change on resume]"
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
        help="Resume the run in RUN_DIR (its config.yaml, newest intact checkpoint), or from one "
        "checkpoint RUN_DIR/checkpoint-N (the run continues in RUN_DIR). With --config, that file "
        "is used and may change only the keys a resume may change.",
    )
    train.add_argument(
        "--overwrite",
        action="store_true",
        help="Replace an earlier run in the output directory (run.overwrite_output_dir=true); "
        "without it a non-empty run directory is refused.",
    )
    train.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Config overrides, e.g. self_distillation.alpha=1.0",
    )
    _add_eval_parser(sub)
    _add_plot_parser(sub)
    from sdpo import discover

    discover.add_parser(sub)
    from sdpo import probe

    probe.add_parser(sub)
    export = sub.add_parser(
        "export",
        help="Write a run's trained policy as a model directory (save_pretrained).",
        description=(
            "Write the policy of RUN_DIR (final/ when present, else the newest checkpoint) to OUT. "
            "A LoRA policy is written as its adapter in PEFT's format, or with --merge as a full "
            "model with the adapter merged into the base weights."
        ),
    )
    export.add_argument("run", metavar="RUN_DIR", help="A run directory or a checkpoint.")
    export.add_argument("out", metavar="OUT", type=Path, help="Directory to write.")
    export.add_argument(
        "--merge", action="store_true", help="LoRA: merge the adapter into the base weights."
    )
    export.add_argument(
        "--checkpoint", metavar="NAME", help="final, checkpoint-000300 or a step (default: newest)."
    )
    return parser


def _add_plot_parser(sub: Any) -> None:
    plot = sub.add_parser(
        "plot",
        help="Plot training curves of run directories to a PNG.",
        description=(
            "Reward, eval accuracy, distillation loss, teacher-student KL, success-group and "
            "reprompt fractions, entropy, completion length and gradient norm of one or more runs, "
            "overlaid, against training steps (and generated samples)."
        ),
    )
    plot.add_argument("run_dirs", nargs="+", metavar="RUN_DIR", help="Run directories to plot.")
    plot.add_argument("-o", "--output", type=Path, default=Path("curves.png"), help="PNG to write.")
    plot.add_argument(
        "--group",
        action="store_true",
        help="Average runs whose configs differ only in the seed (band: min-max over seeds).",
    )
    plot.add_argument(
        "--x",
        choices=("steps", "samples"),
        default="steps",
        help="x axis: training steps (default) or generated samples.",
    )
    plot.add_argument(
        "--smooth", type=int, default=10, help="Rolling-mean window in steps (1 = raw)."
    )


def _add_eval_parser(sub: Any) -> None:
    ev = sub.add_parser(
        "eval",
        help="Evaluate a model: mean@n, pass@k, maj@k, greedy accuracy (writes eval.json).",
        description=(
            "Evaluate a model on a task's eval split or a JSONL file: greedy accuracy, mean@n, "
            "pass@k for every k <= n (unbiased), maj@k where answers can be compared, mean "
            "completion length. Writes per-prompt counts and every figure to eval.json."
        ),
        epilog=(
            "examples:\n"
            "  sdpo eval demo --samples 8\n"
            "  sdpo eval runs/sdpo --baseline demo          # trained vs initial, paired CI\n"
            "  sdpo eval runs/sdpo --checkpoint 100 --teacher\n"
            "  sdpo eval ./my-model data.eval_file=test.jsonl data.reward=math"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    ev.add_argument(
        "model",
        help="demo, a hub id in the local cache, a model directory, a checkpoint, or a run directory.",
    )
    ev.add_argument(
        "--checkpoint",
        metavar="NAME",
        help="In a run directory: final, checkpoint-000300 or a step (default: final/, else the newest checkpoint).",
    )
    ev.add_argument(
        "--teacher",
        action="store_true",
        help="Evaluate the checkpoint's EMA teacher, not the policy.",
    )
    ev.add_argument("--samples", type=int, default=8, help="Sampled completions per prompt n.")
    ev.add_argument(
        "--temperature", type=float, help="Sampling temperature (default: generation.temperature)."
    )
    ev.add_argument(
        "--max-prompts",
        type=int,
        help="Evaluate the first N prompts (default: run.eval_max_prompts).",
    )
    ev.add_argument("--seed", type=int, default=0, help="Seed of the sampling stream.")
    ev.add_argument(
        "--baseline",
        metavar="OTHER",
        help="A second model, evaluated on the same prompts with the same seed; prints the paired difference.",
    )
    ev.add_argument("--batch-size", type=int, default=64, help="Completions generated per call.")
    ev.add_argument(
        "--trust-remote-code",
        action="store_true",
        help="Allow the model's own Python code (a run's config.yaml never turns this on).",
    )
    ev.add_argument(
        "-o", "--output", type=Path, default=Path("eval.json"), help="Where to write the JSON."
    )
    ev.add_argument(
        "overrides",
        nargs="*",
        metavar="key=value",
        help="Config keys, e.g. task=reversal or data.eval_file=x.jsonl data.reward=math.",
    )


def load_config(args: argparse.Namespace) -> SDPOConfig:
    """The run's config: resume dir's config, else --config, else --preset, else quickstart; then overrides."""
    if args.resume:
        from sdpo.checkpoint import is_checkpoint

        target = Path(args.resume)
        run_dir = target.parent if is_checkpoint(target) else target  # a checkpoint: its run
        saved = target / "config.yaml"
        if not args.config and not saved.exists():
            raise SystemExit(
                f"sdpo: --resume {target}: no config.yaml there; give the run directory of an earlier `sdpo train`."
            )
        if not args.config and not saved.read_text().strip():
            raise SystemExit(
                f"sdpo: --resume {target}: {saved} is empty (the run's settings are lost); pass "
                "the run's settings with --config FILE."
            )
        config = SDPOConfig.from_yaml(args.config or saved)
        config.run.resume_from = str(target)
        config.run.output_dir = str(run_dir)
    elif args.config:
        config = SDPOConfig.from_yaml(args.config)
    else:
        config = SDPOConfig.preset(args.preset or "quickstart")
    config.apply_overrides(args.overrides)
    if args.overwrite:
        config.run.overwrite_output_dir = True
    if not args.resume and config.run.output_dir == SDPOConfig().run.output_dir:
        # Two runs started in the same second get different directories.
        config.run.output_dir = f"runs/{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(3)}"
    return config


def build_data(config: SDPOConfig) -> tuple[Any, Any, Any]:
    """(train rows, eval rows, reward) from a built-in task or from JSONL files."""
    from sdpo.sources import rows_and_reward

    data, seed = config.data, config.run.seed
    if data.task:
        train_rows, reward = rows_and_reward(data.task, "train", seed=seed)
        return train_rows, rows_and_reward(data.task, "eval", seed=seed)[0], reward
    if not data.train_file:
        raise SystemExit(
            "sdpo: no data: set task=arithmetic (or reversal, code) or data.train_file=FILE.jsonl with data.reward=..."
        )
    if not data.reward:
        raise SystemExit(
            "sdpo: data.train_file needs data.reward (math, math_lenient, code, exact, or module:function)."
        )
    train_rows, reward = rows_and_reward(data.train_file, reward=data.reward)
    return train_rows, data.eval_file, reward


def check_inputs(config: SDPOConfig) -> None:
    """Fail fast, before anything heavy loads: the data files and the model must exist."""
    from sdpo.policy_model import check_model_source

    for key in ("data.train_file", "data.eval_file"):
        path = config.get(key)
        if path is not None and not Path(path).is_file():
            raise FileNotFoundError(f"{key}: {path} does not exist (or is not a file).")
    check_model_source(config.model_name)


def train(args: argparse.Namespace) -> int:
    from sdpo.checkpoint import CheckpointError
    from sdpo.policy_model import PolicyModel
    from sdpo.run_dir import RunDirectoryError
    from sdpo.trainer import SDPOTrainer

    try:
        config = load_config(args)
        check_inputs(config)
        train_rows, eval_rows, reward = build_data(config)
        say = print if os.environ.get("RANK", "0") == "0" else (lambda *a, **k: None)  # rank 0
        say(
            f"sdpo: model {config.model_name}, task {config.data.task or config.data.train_file}, {config.run.max_steps} steps; run directory {config.run.output_dir}"
        )
        policy = PolicyModel(
            config.model_name,
            device=config.model.device,
            dtype=config.model.param_dtype,
            trust_remote_code=config.model.trust_remote_code,
        )
        trainer = SDPOTrainer(
            config=config,
            policy_model=policy,
            reward_model=reward,
            train_dataloader=train_rows,
            eval_dataloader=eval_rows,
        )
    except (CheckpointError, RunDirectoryError) as exc:  # a refused directory or checkpoint
        print(f"sdpo: {exc}", file=sys.stderr)
        return 2
    except (KeyError, ValueError, TypeError, FileNotFoundError) as exc:
        print(f"sdpo: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    try:
        final = trainer.train()
    except (CheckpointError, RunDirectoryError) as exc:  # a refused directory or checkpoint
        print(f"sdpo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a second Ctrl-C: no checkpoint of this step
        print("sdpo: aborted; the run directory keeps its last checkpoint.", file=sys.stderr)
        return 130
    if trainer.stop_signal is not None:
        # Stopped by a signal: the trainer said where and how to resume; no final evaluation
        # happened, so no before -> after line. The shell convention: 128 + the signal number.
        trainer.runtime.close()
        return 128 + int(trainer.stop_signal)
    first = trainer.first_eval
    for key in ("eval/accuracy_greedy", "eval/accuracy_sampled"):
        if key in final:
            before = f"{first[key]:.3f} -> " if key in first else ""
            say(f"{key}: {before}{final[key]:.3f}")
    say(f"Run directory: {trainer.run_dir.resolve()} (metrics.jsonl, samples.jsonl, checkpoints)")
    trainer.runtime.close()
    return 0


def eval_config(run_dir: Path | None, overrides: list[str]) -> SDPOConfig:
    """The config an evaluation reads data/generation keys from: the run's, else the quickstart's."""
    config = (
        SDPOConfig.from_yaml(run_dir / "config.yaml")
        if run_dir is not None
        else SDPOConfig.preset("quickstart")
    )
    # An eval file on the command line replaces the run's (or the quickstart's) built-in task.
    return config.apply_overrides(overrides, data_files=("data.train_file", "data.eval_file"))


def eval_data(config: SDPOConfig) -> tuple[list[dict[str, Any]], Any]:
    """(eval rows, reward) from a built-in task's eval split or ``data.eval_file``."""
    from sdpo.reward_model import as_reward_model
    from sdpo.sources import rows_and_reward

    data = config.data
    if not data.task and not (data.eval_file and data.reward):
        raise SystemExit(
            "sdpo eval: no data: set task=arithmetic (or reversal, code) or data.eval_file=FILE.jsonl data.reward=..."
        )
    rows, reward = rows_and_reward(
        data.task or data.eval_file, "eval", reward=data.reward, seed=config.run.seed
    )
    return rows, as_reward_model(reward)


def check_eval_args(args: argparse.Namespace) -> None:
    """Bounds of ``sdpo eval``'s numbers, checked before any model is loaded."""
    from sdpo.config import MAX_SAMPLES_PER_PROMPT

    if not 1 <= args.samples <= MAX_SAMPLES_PER_PROMPT:
        raise ValueError(f"--samples must be in [1, {MAX_SAMPLES_PER_PROMPT}], got {args.samples}.")
    for flag, value in (("--max-prompts", args.max_prompts), ("--batch-size", args.batch_size)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be >= 1, got {value}.")
    if args.output.is_dir():
        raise ValueError(
            f"-o {args.output} is a directory; give a file, e.g. {args.output}/eval.json."
        )
    if args.baseline and Path(args.baseline).is_absolute() and not Path(args.baseline).exists():
        raise FileNotFoundError(f"--baseline {args.baseline} does not exist.")


def trusts_remote_code(args: argparse.Namespace, config: SDPOConfig, run_dir: Path | None) -> bool:
    """Only the user's command line allows a model's own code: ``--trust-remote-code`` or a
    ``model.trust_remote_code=true`` override, never the evaluated run's ``config.yaml``."""
    on_command_line = any(
        o.split("=", 1)[0].strip() == "model.trust_remote_code" for o in args.overrides
    )
    trust = args.trust_remote_code or (on_command_line and config.model.trust_remote_code)
    if config.model.trust_remote_code and not trust and run_dir is not None:
        print(
            f"sdpo eval: {run_dir}/config.yaml sets model.trust_remote_code: true; not applied "
            "(pass --trust-remote-code to run the model's own code).",
            file=sys.stderr,
        )
    return bool(trust)


def evaluate(args: argparse.Namespace) -> int:
    import json

    from sdpo import evaluation as ev
    from sdpo.checkpoint import CheckpointError
    from sdpo.reward_model import RewardFunctionError

    try:
        _, _, run_dir = ev.resolve_model(args.model, args.checkpoint, args.teacher)
        config = eval_config(run_dir, args.overrides)
        if args.temperature is not None:
            config.set("generation.temperature", args.temperature)
            config.validate()
        check_eval_args(args)
        trust = trusts_remote_code(args, config, run_dir)
    except (KeyError, ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"sdpo eval: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    rows, reward = eval_data(config)
    limit = args.max_prompts or config.run.eval_max_prompts
    rows = rows[:limit] if limit else rows

    def run(spec: str, checkpoint: str | None, teacher: bool) -> ev.EvalResult:
        from sdpo.progress import Progress

        policy, _ = ev.load_policy(
            spec,
            checkpoint,
            teacher,
            device=config.model.device,
            dtype=config.model.dtype,
            trust_remote_code=trust,
        )
        return ev.evaluate_policy(
            policy,
            reward,
            rows,
            generation=config.generation,
            num_samples=args.samples,
            success_threshold=config.self_distillation.success_reward_threshold,
            seed=args.seed,
            batch_size=args.batch_size,
            max_prompt_length=config.model.max_prompt_length,
            progress=Progress(len(rows) * (1 + args.samples), f"eval {spec}", unit="completions"),
            reward_timeout_s=config.data.reward_timeout_s,
        )

    print(
        f"sdpo eval: {args.model}{' (EMA teacher)' if args.teacher else ''} on "
        f"{config.data.task or config.data.eval_file}: {len(rows)} prompts x {args.samples} samples, "
        f"temperature {config.generation.temperature}, seed {args.seed}",
        file=sys.stderr,
    )
    try:
        result = run(args.model, args.checkpoint, args.teacher)
        base = run(args.baseline, None, False) if args.baseline else None
    except (ValueError, FileNotFoundError, CheckpointError, RewardFunctionError) as exc:
        print(f"sdpo eval: {exc.args[0] if exc.args else exc}", file=sys.stderr)
        return 2
    report: dict[str, Any] = {
        "model": args.model,
        "checkpoint": args.checkpoint,
        "weights": "teacher" if args.teacher else "policy",
        "data": config.data.task or config.data.eval_file,
        "num_samples": args.samples,
        "temperature": config.generation.temperature,
        "max_new_tokens": config.generation.max_new_tokens,
        "seed": args.seed,
        "success_threshold": config.self_distillation.success_reward_threshold,
        "skipped_prompts": result.skipped_prompts,
        "metrics": result.metrics,
        "per_prompt": result.records,
    }
    columns = {args.model: result.metrics}
    differences = None
    if base is not None:
        differences = ev.paired_differences(result.records, base.records, seed=args.seed)
        columns[args.baseline] = base.metrics
        report["baseline"] = {
            "model": args.baseline,
            "metrics": base.metrics,
            "per_prompt": base.records,
        }
        report["difference"] = differences
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=1))
    print(ev.format_table(columns, differences))
    print(f"Wrote {args.output}", file=sys.stderr)
    return 0


def export(args: argparse.Namespace) -> int:
    """``sdpo export [--merge] RUN_DIR OUT``: the trained policy as a ``save_pretrained`` directory."""
    from sdpo import lora
    from sdpo.checkpoint import CheckpointError
    from sdpo.evaluation import resolve_model
    from sdpo.policy_model import PolicyModel

    try:
        name, _, _ = resolve_model(str(args.run), args.checkpoint)
    except (ValueError, FileNotFoundError, CheckpointError) as exc:
        print(f"sdpo: {exc}", file=sys.stderr)
        return 2
    if args.out.exists() and any(args.out.iterdir()):
        print(f"sdpo: {args.out} exists and is not empty; choose a new directory.", file=sys.stderr)
        return 2
    adapter = Path(name) / "adapter"  # final/ of a LoRA run: the merged model plus its adapter
    if not args.merge and (adapter / "adapter_config.json").is_file():
        shutil.copytree(adapter, args.out, dirs_exist_ok=True)
        print(f"sdpo: wrote the LoRA adapter (PEFT format) of {name} to {args.out}")
        return 0
    try:
        policy = PolicyModel(name, device="cpu")
    except (ValueError, FileNotFoundError, ImportError) as exc:
        print(f"sdpo: {exc}", file=sys.stderr)
        return 2
    if policy.is_lora and not args.merge:
        lora.save_adapter(policy.model, args.out, lora.student_adapter(policy.model))
        what = "LoRA adapter (PEFT format; PeftModel.from_pretrained(base, OUT) loads it)"
    else:
        model = lora.merged(policy.model) if policy.is_lora else policy.model
        model.save_pretrained(args.out)
        what = "merged model" if policy.is_lora else "model"
    policy.tokenizer.save_pretrained(args.out)
    print(f"sdpo: wrote the {what} of {name} to {args.out}")
    return 0


def plot(args: argparse.Namespace) -> int:
    from sdpo.plotting import plot_runs

    try:
        path = plot_runs(
            args.run_dirs, args.output, group=args.group, x=args.x, smooth=max(args.smooth, 1)
        )
    except (ImportError, FileNotFoundError, ValueError) as exc:
        print(f"sdpo plot: {exc}", file=sys.stderr)
        return 2
    print(f"Wrote {path}")
    return 0


def unknown_option_hint(option: str) -> str:
    """What to write instead of an unknown ``--option`` (TRL users type config keys as flags)."""
    name, _, value = option.lstrip("-").partition("=")
    if not option.startswith("-"):
        return f"unexpected argument {option!r}; config keys are given as key=value."
    try:
        key = SDPOConfig.resolve_key(name)
    except KeyError as exc:
        return f"{option} is not an option. {exc.args[0]}"
    return (
        f"{option} is not an option; config keys are given as key=value: {key}={value or 'VALUE'}"
    )


def parse_args(argv: list[str] | None = None) -> tuple[argparse.Namespace, list[str]]:
    """The parsed command line and what was not understood.

    Config overrides may come before or after the options: argparse gives the ``key=value`` list
    only the positionals before the first option, so those after one
    (``sdpo eval MODEL --samples 4 task=reversal``) are taken back from the unknown ones.
    """
    args, unknown = build_parser().parse_known_args(argv)
    if hasattr(args, "overrides"):
        late = [u for u in unknown if not u.startswith("-") and "=" in u]
        args.overrides = [*(args.overrides or []), *late]
        unknown = [u for u in unknown if u not in late]
    return args, unknown


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args, unknown = parse_args(argv)
    if unknown:
        print(f"sdpo: {unknown_option_hint(unknown[0])}", file=sys.stderr)
        return 2
    if args.command == "train":
        return train(args)
    if args.command == "eval":
        return evaluate(args)
    if args.command == "plot":
        return plot(args)
    if args.command == "discover":
        from sdpo import discover

        return discover.main(args)
    if args.command == "probe":
        from sdpo import probe

        return probe.main(args)
    if args.command == "export":
        return export(args)
    return 1


if __name__ == "__main__":
    sys.exit(main())
