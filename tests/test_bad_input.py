"""Bad input from the adversarial trial: rewards, data, templates, logs; each gets a clear error
naming what was wrong (the model, the row, the file and line) instead of garbage training."""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import conftest
import pytest
from torch.utils.data import DataLoader

from sdpo import SDPOConfig, SDPOTrainer
from sdpo.data import load_rows
from sdpo.reward_model import RewardFunctionError, RewardModel, RewardOutput, VerifiableRewardModel

ROWS = [{"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in range(10, 13) for b in range(3)]


def parity_reward(prompts, completions, **columns):
    return [float(sum(map(ord, c)) % 2 == 0) for c in completions]


DEFAULTS = dict(
    num_samples_per_prompt=2,
    generation__max_new_tokens=4,
    optimization__prompts_per_step=2,
    run__max_steps=1,
    run__progress_bar=False,
    run__sample_log_steps=1,
)


def make_trainer(tmp_path: Path, reward=parity_reward, rows=ROWS, **overrides) -> SDPOTrainer:
    return conftest.make_trainer(
        tmp_path / "run", reward=reward, rows=rows, defaults=DEFAULTS, **overrides
    )


# ----- item 14: reward outputs -------------------------------------------------------------------


class Fixed(RewardModel):
    """A reward model that returns the same (possibly bad) score for every row but row 0."""

    name = "fixed"

    def __init__(self, score) -> None:
        self.score = score

    def __call__(self, prompts, completions, **columns):
        return [RewardOutput(0.0)] + [RewardOutput(self.score) for _ in completions[1:]]


@pytest.mark.parametrize(
    ("score", "message"),
    [
        (math.nan, "score nan, which is not a finite float32"),
        ("high", "returned 'high' as the score of row 1"),
        ("0.5", "returned '0.5' as the score of row 1"),  # a string is refused, even a numeric one
        (1e39, "score 1e\\+39, which is not a finite float32"),
    ],
)
def test_bad_scores_name_the_reward_model_and_the_row(tmp_path, score, message):
    trainer = make_trainer(tmp_path, reward=Fixed(score), policy_gradient__pg_loss_weight=0.0)
    with pytest.raises(RewardFunctionError, match=f"Reward model 'fixed'.*{message}"):
        trainer.step()


def test_a_function_reward_of_1e39_does_not_overflow_silently(tmp_path):
    def huge(prompts, completions, **columns):
        return [1e39] * len(completions)

    with pytest.raises(RewardFunctionError, match="'huge' gave row 0 .* not a finite float32"):
        make_trainer(tmp_path, reward=huge).step()


def test_sys_exit_inside_a_reward_is_an_error_not_a_clean_exit(tmp_path):
    def quits(prompts, completions, **columns):
        raise SystemExit(0)

    with pytest.raises(RewardFunctionError, match="'quits' called sys.exit"):
        make_trainer(tmp_path, reward=quits).step()


def test_a_reward_that_mutates_completions_does_not_change_the_teacher_prompts(tmp_path):
    def vandal(prompts, completions, **columns):
        scores = [float(i % 2 == 0) for i in range(len(completions))]
        completions[:] = ["HACKED"] * len(completions)
        return scores

    trainer = make_trainer(tmp_path, reward=vandal)
    trainer.step()
    assert "HACKED" not in trainer.last_rollouts.completions
    assert not any("HACKED" in c.prompt for c in trainer.last_contexts if c is not None)


# ----- item 15: reward time limit, feedback size ---------------------------------------------------


def test_a_hanging_reward_is_stopped_by_the_timeout(tmp_path):
    def hangs(prompts, completions, **columns):
        time.sleep(600)

    trainer = make_trainer(tmp_path, reward=hangs, data__reward_timeout_s=1.0)
    t0 = time.monotonic()
    with pytest.raises(RewardFunctionError, match="'hangs' did not return within 1.0 s"):
        trainer.step()
    assert time.monotonic() - t0 < 120


def test_long_feedback_is_capped_with_a_marker(tmp_path):
    def verbose(prompts, completions, **columns):
        return [(0.0, "x" * 2_000_000) for _ in completions]

    trainer = make_trainer(tmp_path, reward=verbose, data__max_feedback_chars=1000)
    trainer.train()
    record = json.loads((tmp_path / "run" / "samples.jsonl").read_text().splitlines()[0])
    assert len(record["feedback"]) < 1100
    assert record["feedback"].endswith("[feedback truncated: 2000000 characters, 1000 kept]")


# ----- item 16 / 17: data ------------------------------------------------------------------------


def test_a_row_missing_the_rewards_column_is_named_not_scored_against_none(tmp_path):
    rows = [dict(r) for r in ROWS]
    del rows[3]["answer"]
    with pytest.raises(ValueError, match="Row 3 has no 'answer' column"):
        make_trainer(tmp_path, reward=VerifiableRewardModel(mode="exact"), rows=rows)


def test_row_0_missing_a_column_that_later_rows_have_is_named_at_load(tmp_path):
    rows = [{"prompt": "Q: 1+1="}] + [{"prompt": "Q: 2+2=", "answer": "4"}] * 3
    with pytest.raises(ValueError, match="Row 0 has no 'answer' column, which row 1 has"):
        load_rows(rows)
    path = tmp_path / "rows.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(ValueError, match=r"Row 0 \(.*rows.jsonl:1\) has no 'answer' column"):
        load_rows(path)


@pytest.mark.parametrize(
    ("rows", "message"),
    [
        ([{"prompt": ""}] * 4, "Row 0: 'prompt' is empty"),
        ([{"prompt": []}] * 4, "Row 0: 'prompt' is empty"),
        (["What is 2+2?", "And 3+3?"], "Row 0 is a str, expected a dict"),
    ],
)
def test_bad_rows_are_named(rows, message):
    with pytest.raises((TypeError, ValueError, KeyError), match=message):
        load_rows(rows)


def test_invalid_utf8_names_the_file_and_line(tmp_path):
    path = tmp_path / "train.jsonl"
    path.write_bytes(b'{"prompt": "ok"}\n{"prompt": "caf\xe9"}\n')
    with pytest.raises(ValueError, match=f"{path}:2 is not valid UTF-8"):
        load_rows(path)


def test_an_empty_dataloader_says_so(tmp_path):
    trainer = make_trainer(tmp_path, rows=DataLoader([], batch_size=2, collate_fn=list))
    with pytest.raises(ValueError, match="DataLoader yielded no batch"):
        trainer.step()


# ----- item 13: templates --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "template", "message"),
    [
        ("reprompt_template", "{prompt}{answer}", "unknown field {answer}"),
        ("reprompt_template", "{solution}{feedback}", "must contain {prompt}"),
        ("reprompt_template", "{prompt} a stray { brace", "is not a valid template"),
        ("solution_template", "{solution}", "unknown field {solution}"),
        ("feedback_template", "{feedback}", "unknown field {feedback}"),
    ],
)
def test_templates_are_checked_when_the_config_is_built(key, template, message):
    with pytest.raises(ValueError, match=f"self_distillation.{key}.*{message}"):
        SDPOConfig(**{f"self_distillation__{key}": template})
