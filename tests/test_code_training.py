"""Code task end to end: sandboxed judge feedback reaches the teacher prompt and samples.jsonl."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from conftest import make_trainer

from sdpo.cli import main
from sdpo.policy_model import RolloutBatch
from sdpo.tasks.code import load, reward_model

EXAMPLE = Path(__file__).resolve().parents[1] / "examples" / "code_sdpo.yaml"


def test_runtime_error_and_failing_case_reach_the_teacher_prompt(tmp_path):
    """Hand-written completions through the trainer's score -> reprompt sub-steps."""
    row = next(r for r in load("train") if r["kind"] == "stdio")
    completions = [
        "```python\nprint(undefined_name)\n```",  # runtime error
        "```python\nimport sys\nprint(sys.stdin.read())\n```",  # wrong output
    ]
    trainer = make_trainer(
        tmp_path,
        reward=reward_model(),
        rows=[row],
        defaults={},
        num_samples_per_prompt=2,
        run__progress_bar=False,
    )
    empty = torch.zeros(2, 1, dtype=torch.long)
    rollouts = RolloutBatch(
        prompts=[row["prompt"]] * 2,
        prompt_ids=empty,
        prompt_mask=empty,
        completion_ids=empty,
        completion_mask=empty,
        completions=completions,
        group_ids=torch.tensor([0, 0]),
        rows=[row, row],
    )
    trainer.score(rollouts)
    assert rollouts.rewards.tolist() == [0.0, 0.0]
    contexts = trainer.reprompt(rollouts)
    assert "NameError" in contexts[0].prompt and "undefined_name" in contexts[0].prompt
    assert "The following is feedback from your unsuccessful earlier attempt" in contexts[1].prompt
    assert "Expected" in contexts[1].prompt or "expected" in contexts[1].prompt
    hidden = [case for case in row["tests"] if case.get("hidden")]
    for case in hidden:  # a hidden case's expected output never leaks
        assert case["stdout"].strip() not in contexts[1].prompt.replace(row["prompt"], "")


def test_example_config_trains_a_few_steps_with_feedback_in_samples(tmp_path):
    out = tmp_path / "run"
    code = main(
        [
            "train",
            "--config",
            str(EXAMPLE),
            f"run.output_dir={out}",
            "run.max_steps=2",
            "generation.max_new_tokens=16",
            "eval_max_prompts=2",
            "run.progress_bar=false",
        ]
    )
    assert code == 0
    samples = [json.loads(line) for line in (out / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["feedback"] for s in samples)
    with_feedback = [
        s for s in samples if s["teacher_prompt"] and s["feedback"] in s["teacher_prompt"]
    ]
    assert with_feedback, "environment feedback never reached a teacher prompt"
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert any(m.get("self_distillation/feedback_used_fraction", 0) > 0 for m in metrics)
