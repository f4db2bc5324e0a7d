"""The `sdpo` command line: help generated from the config, overrides, errors, resume."""

from __future__ import annotations

import subprocess
import sys

import pytest

from sdpo.cli import build_parser, load_config, main, parse_args
from sdpo.config import SDPOConfig


def test_help_lists_every_config_key_with_its_default(capsys):
    with pytest.raises(SystemExit):
        main(["train", "--help"])
    out = capsys.readouterr().out
    for key in SDPOConfig.keys():
        assert key in out, key
    assert "self_distillation.alpha = 0.5" in out
    assert "--resume" in out and "--preset" in out


def test_load_config_quickstart_preset_and_overrides(tmp_path):
    args = build_parser().parse_args(["train", "alpha=1.0", f"run.output_dir={tmp_path}"])
    config = load_config(args)
    assert config.data.task == "arithmetic" and config.model_name == "demo"
    assert config.self_distillation.alpha == 1.0 and config.run.output_dir == str(tmp_path)
    args = build_parser().parse_args(["train", "--preset", "paper", "task=arithmetic"])
    assert load_config(args).policy_gradient.pg_loss_weight == 0.0


def test_bad_override_exits_with_a_clear_message(capsys):
    assert main(["train", "alpah=1.0"]) == 2
    assert "Did you mean: alpha" in capsys.readouterr().err


def test_resume_needs_a_run_directory(tmp_path):
    with pytest.raises(SystemExit, match="no config.yaml"):
        load_config(build_parser().parse_args(["train", "--resume", str(tmp_path)]))


def test_cli_entry_point_runs_as_a_subprocess():
    out = subprocess.run(
        [sys.executable, "-m", "sdpo.cli", "train", "--help"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0 and "quickstart" in out.stdout


def test_config_with_resume_is_used_not_ignored(tmp_path):
    run = tmp_path / "run"
    run.mkdir()
    SDPOConfig(run__max_steps=5).to_yaml(run / "config.yaml")
    new = tmp_path / "new.yaml"
    SDPOConfig(run__max_steps=9).to_yaml(new)
    args = build_parser().parse_args(["train", "--resume", str(run), "--config", str(new)])
    config = load_config(args)
    assert config.run.max_steps == 9 and config.run.output_dir == str(run)
    args = build_parser().parse_args(["train", "--resume", str(run), "--overwrite"])
    assert load_config(args).run.overwrite_output_dir


def test_a_directory_as_config_is_a_clear_error(tmp_path, capsys):
    assert main(["train", "--config", str(tmp_path)]) == 2
    assert f"sdpo: {tmp_path} is a directory" in capsys.readouterr().err


def _one_clean_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    assert err.startswith("sdpo: ")
    return err


def test_missing_model_path_is_one_clean_line(capsys, tmp_path):
    assert main(["train", f"model_name={tmp_path}/nope", "run.progress_bar=false"]) == 2
    assert "does not exist" in _one_clean_line(capsys)
    assert main(["train", "model_name=someone/not-cached", "run.progress_bar=false"]) == 2
    assert "not in the Hugging Face cache" in _one_clean_line(capsys)


def test_missing_data_file_is_reported_before_the_model_loads(capsys, tmp_path, monkeypatch):
    import sdpo.policy_model

    def no_loading(*args, **kwargs):
        raise AssertionError("the model was loaded before the data file was checked")

    monkeypatch.setattr(sdpo.policy_model, "_load", no_loading)
    argv = ["train", "data.task=none", f"data.train_file={tmp_path}/missing.jsonl"]
    assert main([*argv, "data.reward=math", "model_name=demo"]) == 2
    assert "data.train_file" in _one_clean_line(capsys)


def test_a_data_file_replaces_the_presets_task(tmp_path):
    """`sdpo train data.train_file=x` trains on x (the quickstart's task used to win silently)."""
    from sdpo.cli import build_data, eval_config, eval_data

    rows = tmp_path / "rows.jsonl"
    rows.write_text('{"prompt": "1+1=", "answer": "2"}\n')
    argv = ["train", f"data.train_file={rows}", f"data.eval_file={rows}", "data.reward=exact"]
    config = load_config(build_parser().parse_args(argv))
    assert config.data.task is None
    train_rows, eval_rows, _ = build_data(config)
    assert train_rows == [{"prompt": "1+1=", "answer": "2"}] and eval_rows == str(rows)
    # the same through a YAML file over a preset, and through the Python preset
    yaml_file = tmp_path / "c.yaml"
    yaml_file.write_text(f"preset: quickstart\ndata:\n  train_file: {rows}\n  reward: exact\n")
    assert SDPOConfig.from_yaml(yaml_file).data.task is None
    assert SDPOConfig.preset("quickstart", data__train_file=str(rows)).data.task is None
    # a later task replaces earlier files: --config x.yaml task=arithmetic trains arithmetic
    config = SDPOConfig(data__train_file=str(rows), data__eval_file=str(rows))
    config.apply_overrides(["task=arithmetic"])
    assert config.data.task == "arithmetic" and config.data.train_file is None
    assert config.data.eval_file is None
    # `sdpo eval MODEL data.eval_file=x` evaluates x, not the quickstart's arithmetic
    config = eval_config(None, [f"data.eval_file={rows}", "data.reward=exact"])
    assert eval_data(config)[0] == [{"prompt": "1+1=", "answer": "2"}]


def test_a_task_and_a_train_file_in_one_layer_is_a_clear_error(tmp_path, capsys):
    argv = ["train", "task=arithmetic", f"data.train_file={tmp_path}/x.jsonl"]
    assert main([*argv, "data.reward=math"]) == 2
    err = _one_clean_line(capsys)
    assert "data.task" in err and "data.task=none" in err and "data.train_file" in err
    with pytest.raises(ValueError, match="data.task=none"):
        SDPOConfig(data__task="arithmetic", data__train_file="x.jsonl")


@pytest.mark.parametrize(
    ("argv", "hint"),
    [
        (["lr=1e-4"], "optimization.learning_rate"),
        (["--learning_rate", "1e-5"], "key=value: optimization.learning_rate=VALUE"),
        (["--learning_rate=1e-5"], "optimization.learning_rate=1e-5"),
        (["--gradient_checkpointing"], "model.gradient_checkpointing=VALUE"),
        (["use_vllm=true"], "generation.backend=vllm"),
        (["gradient_accumulation_steps=4"], "optimization.prompts_per_step"),
        (["--num_generations", "8"], "num_samples_per_prompt=VALUE"),
    ],
)
def test_trl_keys_point_at_sdpo_keys(argv, hint, capsys):
    assert main(["train", *argv]) == 2
    assert hint in _one_clean_line(capsys)


def test_trl_keys_that_mean_the_same_are_accepted():
    args = build_parser().parse_args(
        ["train", "beta=0.1", "num_generations=8", "max_completion_length=64"]
    )
    config = load_config(args)
    assert config.policy_gradient.kl_penalty_weight == 0.1
    assert config.num_samples_per_prompt == 8 and config.generation.max_new_tokens == 64


@pytest.mark.parametrize(
    "argv",
    [
        ["eval", "demo", "task=reversal", "--samples", "4", "run.seed=3"],
        ["eval", "demo", "--samples", "4", "task=reversal", "run.seed=3"],
        ["eval", "--samples", "4", "demo", "task=reversal", "run.seed=3"],
    ],
)
def test_overrides_may_come_before_or_after_the_options(argv):
    args, unknown = parse_args(argv)
    assert unknown == []
    assert args.model == "demo" and args.samples == 4
    assert args.overrides == ["task=reversal", "run.seed=3"]


def test_an_unknown_option_after_the_overrides_is_still_refused(capsys):
    assert main(["eval", "demo", "--samples", "4", "task=reversal", "--bogus"]) == 2
    assert "--bogus is not an option" in capsys.readouterr().err


def test_help_and_the_config_import_no_torch():
    """`sdpo --help` and `from sdpo import SDPOConfig` must not import torch or transformers (they
    cost ~5 s of CPU); the package's public names load on first use (PEP 562)."""
    code = (
        "import sys, sdpo\n"
        "from sdpo import SDPOConfig\n"
        "from sdpo.cli import build_parser\n"
        "build_parser()\n"
        "assert 'torch' not in sys.modules and 'transformers' not in sys.modules\n"
        "assert sorted(sdpo.__all__) == sorted(n for n in sdpo.__all__ if getattr(sdpo, n))\n"
        "assert 'torch' in sys.modules\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    import sdpo

    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        sdpo.Nope  # noqa: B018
