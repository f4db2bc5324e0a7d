"""`sdpo eval` / `sdpo export` on damaged or hostile run directories, and bounded sizes (issue 23:
M2-M5 and the eval/export L items)."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path

import pytest
import yaml
from conftest import make_tiny_llama, make_trainer, parity_reward

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer
from sdpo import checkpoint as ckpt
from sdpo.cli import main
from sdpo.evaluation import evaluate_policy
from sdpo.reward_model import RewardTimeoutError, as_reward_model
from sdpo.tasks import task_reward_model

ROWS = [{"prompt": f"Q: {a}+11=", "answer": str(a + 11)} for a in range(10, 14)]
EVAL = ["--samples", "1", "--max-prompts", "2"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A one-step run with checkpoint-000001 and final/ (shared: copy before changing)."""
    run = tmp_path_factory.mktemp("eval-safety") / "run"
    make_trainer(
        run,
        reward=task_reward_model("arithmetic"),
        rows=ROWS,
        defaults={},
        data__task="arithmetic",
        generation__max_new_tokens=3,
        optimization__prompts_per_step=2,
        run__max_steps=1,
        run__save_steps=1,
        run__eval_max_prompts=1,
        run__eval_num_samples=1,
        run__progress_bar=False,
    ).train()
    return run


@pytest.fixture
def run(trained, tmp_path) -> Path:
    copy = tmp_path / "run"
    shutil.copytree(trained, copy)
    return copy


def _flip(file: Path, offset: int = -100) -> None:
    data = bytearray(file.read_bytes())
    data[offset] ^= 0xFF
    file.write_bytes(bytes(data))


# ----- M3: eval and export check the manifests; final/ has one --------------------------------


def test_final_has_a_manifest_and_eval_refuses_corrupted_final_weights(run, tmp_path, capsys):
    assert ckpt.verify(run / "final") is None
    assert main(["eval", str(run), *EVAL, "-o", str(tmp_path / "ok.json")]) == 0
    _flip(run / "final" / "model.safetensors")
    capsys.readouterr()
    assert main(["eval", str(run), *EVAL, "-o", str(tmp_path / "e.json")]) == 2
    err = capsys.readouterr().err
    assert "final/model.safetensors does not match its sha256" in err
    assert not (tmp_path / "e.json").exists()


@pytest.mark.parametrize("command", ["eval", "export"])
def test_truncated_checkpoint_weights_are_named_by_eval_and_export(run, tmp_path, capsys, command):
    weights = run / "checkpoint-000001" / "policy" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    args = (
        ["eval", str(run), "--checkpoint", "1", *EVAL, "-o", str(tmp_path / "e.json")]
        if command == "eval"
        else ["export", str(run), str(tmp_path / "out"), "--checkpoint", "1"]
    )
    assert main(args) == 2
    assert f"{weights} has 1000 bytes, the manifest says" in capsys.readouterr().err


def test_eval_of_a_policy_directory_inside_a_checkpoint_checks_the_checkpoint(run, capsys):
    policy = run / "checkpoint-000001" / "policy"
    _flip(policy / "model.safetensors")
    assert main(["eval", str(policy), "task=arithmetic", *EVAL]) == 2
    assert "does not match its sha256" in capsys.readouterr().err


# ----- M4: a run's config never turns on remote code --------------------------------------------

REMOTE_CODE = """
from pathlib import Path
from transformers import LlamaForCausalLM

Path({marker!r}).write_text("ran")


class EvilForCausalLM(LlamaForCausalLM):
    pass
"""


def test_eval_never_trusts_remote_code_because_the_run_config_says_so(run, tmp_path, capsys):
    marker = tmp_path / "marker"
    final = run / "final"
    (final / "modeling_evil.py").write_text(REMOTE_CODE.format(marker=str(marker)))
    config = json.loads((final / "config.json").read_text())
    config["auto_map"] = {"AutoModelForCausalLM": "modeling_evil.EvilForCausalLM"}
    (final / "config.json").write_text(json.dumps(config))
    ckpt.write_manifest(final)  # whoever wrote the code can write the manifest too
    saved = yaml.safe_load((run / "config.yaml").read_text())
    saved["model"]["trust_remote_code"] = True
    (run / "config.yaml").write_text(yaml.safe_dump(saved))

    assert main(["eval", str(run), *EVAL, "-o", str(tmp_path / "a.json")]) == 0
    assert not marker.exists()
    assert "sets model.trust_remote_code: true; not applied" in capsys.readouterr().err
    # The user's own flag does allow it (so the test above can see code running).
    args = ["eval", str(run), *EVAL, "-o", str(tmp_path / "b.json"), "--trust-remote-code"]
    assert main(args) == 0
    assert marker.read_text() == "ran"


# ----- M2: data.reward_timeout_s applies to evaluation --------------------------------------------


def _policy() -> PolicyModel:
    model, tok = make_tiny_llama()
    return PolicyModel(model=model, tokenizer=tok)


def test_a_hanging_reward_in_evaluation_stops_at_the_reward_timeout():
    def hangs(prompts, completions, **columns):
        time.sleep(60)
        return [0.0] * len(completions)

    config = SDPOConfig(generation__max_new_tokens=2)
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError, match=r"within 0.5 s \(data.reward_timeout_s\)"):
        evaluate_policy(
            _policy(),
            as_reward_model(hangs),
            ROWS[:1],
            generation=config.generation,
            reward_timeout_s=0.5,
        )
    assert time.monotonic() - start < 30


def test_the_trainer_step_0_evaluation_applies_the_reward_timeout(tmp_path):
    def hangs(prompts, completions, **columns):
        time.sleep(60)
        return [0.0] * len(completions)

    trainer = make_trainer(
        tmp_path / "run",
        reward=hangs,
        rows=ROWS,
        eval_rows=ROWS[:1],
        defaults={},
        generation__max_new_tokens=2,
        optimization__prompts_per_step=1,
        data__reward_timeout_s=0.5,
        run__max_steps=1,
        run__progress_bar=False,
    )
    start = time.monotonic()
    with pytest.raises(RewardTimeoutError):
        trainer.train()
    assert time.monotonic() - start < 30  # the step-0 evaluation did not wait out the sleep


# ----- M5 and eval's arguments: bounds named, checked before any model loads ---------------------


@pytest.mark.parametrize(
    "key, value",
    [
        ("optimization.prompts_per_step", 10**12),
        ("num_samples_per_prompt", 10**9),
        ("model.lora.r", 10**9),
    ],
)
def test_huge_sizes_are_refused_naming_the_key(key, value):
    config = SDPOConfig()
    config.set(key, value)
    with pytest.raises(ValueError, match=rf"^{key} = {value} is out of range: must be <= "):
        config.validate()


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--samples", "1000000000"], "--samples must be in [1, 4096], got 1000000000"),
        (["--max-prompts", "0"], "--max-prompts must be >= 1, got 0"),
        (["--batch-size", "0"], "--batch-size must be >= 1, got 0"),
        (["--baseline", "/nope"], "--baseline /nope does not exist"),
    ],
)
def test_eval_arguments_are_checked_before_evaluating(run, tmp_path, capsys, extra, message):
    assert main(["eval", str(run), "-o", str(tmp_path / "e.json"), *extra]) == 2
    err = capsys.readouterr().err
    assert message in err and "prompts x" not in err  # refused before the evaluation started


def test_eval_output_directory_is_refused_before_evaluating(run, tmp_path, capsys):
    assert main(["eval", str(run), *EVAL, "-o", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert f"-o {tmp_path} is a directory" in err and "prompts x" not in err


# ----- sdpo export of a LoRA run: the adapter, as documented ------------------------------------


def _lora_trainer(tmp_path: Path) -> SDPOTrainer:
    """A one-step LoRA run (r = 4) in ``tmp_path/run``, checkpointed at step 1."""
    return make_trainer(
        tmp_path / "run",
        reward=parity_reward,
        rows=ROWS,
        defaults=dict(
            num_samples_per_prompt=2,
            generation__max_new_tokens=4,
            optimization__prompts_per_step=2,
            run__max_steps=1,
            run__save_steps=1,
            run__progress_bar=False,
            model__lora__r=4,
        ),
    )


def test_export_of_a_lora_run_writes_the_adapter_and_merge_the_model(tmp_path):
    pytest.importorskip("peft")

    _lora_trainer(tmp_path).train()
    run = tmp_path / "run"
    assert (run / "final" / "adapter" / "adapter_config.json").exists()
    assert main(["export", str(run), str(tmp_path / "adapter")]) == 0
    names = sorted(p.name for p in (tmp_path / "adapter").iterdir())
    assert "adapter_config.json" in names and "model.safetensors" not in names
    assert main(["export", "--merge", str(run), str(tmp_path / "merged")]) == 0
    assert (tmp_path / "merged" / "model.safetensors").exists()


# ----- sdpo plot: a torn line, an empty run, -o DIR -------------------------------------------------


def _metrics_run(tmp_path: Path, lines: list[str]) -> Path:
    run = tmp_path / "plotrun"
    run.mkdir()
    (run / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    return run


def test_plot_skips_a_torn_line_naming_file_and_line(tmp_path):
    pytest.importorskip("matplotlib")
    good = [json.dumps({"step": s, "reward": s / 10}) for s in range(1, 4)]
    run = _metrics_run(tmp_path, [*good, '{"step": 4, "rew'])
    with pytest.warns(UserWarning, match=r"metrics.jsonl:4: not a metrics record"):
        assert main(["plot", str(run), "-o", str(tmp_path / "c.png")]) == 0
    assert (tmp_path / "c.png").stat().st_size > 0


def test_plot_refuses_an_empty_run_and_an_output_directory(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    empty = _metrics_run(tmp_path, [])
    assert main(["plot", str(empty), "-o", str(tmp_path / "e.png")]) == 2
    assert "No numeric metrics to plot in" in capsys.readouterr().err
    assert not (tmp_path / "e.png").exists()
    (empty / "metrics.jsonl").write_text(json.dumps({"step": 1, "reward": 0.5}) + "\n")
    assert main(["plot", str(empty), "-o", str(tmp_path)]) == 2
    assert f"-o {tmp_path} is a directory" in capsys.readouterr().err


def test_an_empty_list_override_names_its_own_key_not_another():
    config = SDPOConfig.preset("quickstart")
    with pytest.raises(
        ValueError, match=r"run.report_to must be a list .*run.report_to=\[\]"
    ) as err:
        config.apply_overrides(["run.report_to="])
    assert "q_proj" not in str(err.value)


def test_eval_of_a_lora_checkpoint_policy_directory(tmp_path, capsys):
    """``sdpo eval RUN/checkpoint-N/policy`` of a LoRA run: an adapter directory on its base."""
    pytest.importorskip("peft")

    trainer = _lora_trainer(tmp_path)
    trainer.train()
    base = tmp_path / "base"  # the run's base is an in-process model: give it a directory
    model, tok = make_tiny_llama()
    model.save_pretrained(base)
    tok.save_pretrained(base)
    point = tmp_path / "run" / "checkpoint-000001"
    cfg = point / "policy" / "adapter_config.json"
    cfg.write_text(
        json.dumps({**json.loads(cfg.read_text()), "base_model_name_or_path": str(base)})
    )
    ckpt.write_manifest(point)
    args = ["eval", str(point / "policy"), "task=arithmetic", *EVAL, "-o", str(tmp_path / "e.json")]
    assert main(args) == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "e.json").read_text())["metrics"]
