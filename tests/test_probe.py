"""`sdpo probe` (the pre-flight check) and the teacher's accuracy logged during training."""

from __future__ import annotations

import json

import pytest
from conftest import make_trainer

from sdpo.config import SDPOConfig
from sdpo.policy_model import PolicyModel
from sdpo.probe import run_probe, verdict
from sdpo.reward_model import RewardOutput
from sdpo.tasks import load_task, task_reward_model

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def demo():
    return PolicyModel("demo")


def config(**overrides) -> SDPOConfig:
    cfg = SDPOConfig.preset("quickstart")
    cfg.apply_overrides([f"{k}={v}" for k, v in overrides.items()])
    return cfg


def test_probe_on_the_demo_model(demo):
    rows = load_task("arithmetic_hard", "train")[:8]
    reward = task_reward_model("arithmetic_hard")
    result = run_probe(demo, reward, rows, config(), attempts=2, samples=1, seed=0)
    assert result["questions"] == 8 and result["attempts"] == 2
    assert 0 < result["failed_items"] <= 8
    for value in (*result["accuracy"].values(), result["all_fail_fraction"]):
        assert 0.0 <= value <= 1.0
    acc = result["accuracy"]
    gap = result["feedback_minus_shuffled"]
    assert gap["difference"] == pytest.approx(acc["feedback"] - acc["shuffled"])
    assert gap["low"] <= gap["difference"] <= gap["high"]
    assert result["verdict"]
    assert run_probe(demo, reward, rows, config(), attempts=2, samples=1, seed=0) == result


class SameFeedback:
    """The arithmetic reward, but every failure gets one fixed text: real == shuffled."""

    name = "same_feedback"

    def __init__(self) -> None:
        self.inner = task_reward_model("arithmetic_hard")

    def __call__(self, prompts, completions, **columns):
        outs = self.inner(prompts, completions, **columns)
        return [RewardOutput(o.score, None if o.score >= 1 else "Try again.") for o in outs]


def test_probe_sees_no_gap_when_the_feedback_carries_nothing(demo):
    rows = load_task("arithmetic_hard", "train")[:16]
    result = run_probe(demo, SameFeedback(), rows, config(), attempts=2, samples=2)
    assert result["accuracy"]["feedback"] > 0  # else equal accuracies would prove nothing
    gap = result["feedback_minus_shuffled"]
    assert gap["difference"] == gap["low"] == gap["high"] == 0.0
    assert "does not read the feedback" in result["verdict"]


def test_verdicts():
    ci = lambda d, lo, hi: {"difference": d, "low": lo, "high": hi}  # noqa: E731
    assert verdict(ci(0.2, 0.1, 0.3), ci(0.1, 0.0, 0.2)).startswith("feedback helps")
    assert "small" in verdict(ci(0.05, 0.01, 0.1), ci(0.1, 0.0, 0.2))
    assert "no clear evidence" in verdict(ci(0.05, -0.01, 0.1), ci(0.1, 0.0, 0.2))
    text = verdict(ci(0.0, -0.1, 0.1), ci(-0.2, -0.3, -0.1))
    assert "does not read" in text and "no better than a fresh attempt" in text


def test_probe_cli_writes_json(tmp_path, capsys):
    from sdpo.cli import main

    out = tmp_path / "probe.json"
    argv = ["probe", "--task", "arithmetic_hard", "--num-questions", "6", "--attempts", "2"]
    assert main([*argv, "--samples", "1", "--json", str(out)]) == 0
    assert "verdict:" in capsys.readouterr().out
    assert json.loads(out.read_text())["questions"] == 6


def test_teacher_probe_is_logged_during_training(tmp_path):
    from sdpo.cli import main

    run_dir = tmp_path / "run"
    argv = [
        "train",
        "task=arithmetic_hard",
        "run.max_steps=2",
        "optimization.prompts_per_step=2",
        "run.teacher_probe_steps=2",
        "run.teacher_probe_prompts=8",
        "run.eval_steps=0",
        "run.eval_max_prompts=8",
        "run.progress_bar=false",
        f"run.output_dir={run_dir}",
    ]
    assert main(argv) == 0
    records = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines()]
    probed = [r for r in records if "teacher/probe_accuracy" in r]
    assert [r["step"] for r in probed] == [1, 2]
    assert all(0.0 <= r["teacher/probe_accuracy"] <= 1.0 for r in probed)


def test_teacher_probe_needs_eval_rows(tmp_path):
    cfg = config(**{"run.teacher_probe_steps": 1})  # valid: the trainer, with no eval rows, refuses
    rows = load_task("arithmetic", "train")[:4]
    with pytest.raises(ValueError, match="run.teacher_probe_steps"):
        make_trainer(tmp_path, reward=task_reward_model("arithmetic"), rows=rows, config=cfg)
