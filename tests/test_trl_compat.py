"""TRL's shipped reward functions run unchanged through sdpo, on chat and on plain prompts.

sdpo calls reward functions as TRL's GRPOTrainer does: chat completions as
``[{"role": "assistant", "content": ...}]``, plus ``completion_ids``, ``trainer_state``,
``log_metric`` and ``log_extra``. ``make test`` installs ``trl`` (``--no-deps``: ``trl.rewards``
needs nothing beyond sdpo's own dependencies).
"""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_tiny_llama

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer

trl_rewards = pytest.importorskip("trl.rewards", reason="`make test` installs trl for these tests")
pytestmark = pytest.mark.compat

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
CHAT_ROWS = [
    {"prompt": [{"role": "user", "content": f"{a}+{b}? Box it."}], "solution": f"${a + b}$"}
    for a in range(1, 5)
    for b in range(1, 3)
]
PLAIN_ROWS = [{"prompt": f"Q: {a}+1=", "solution": f"${a + 1}$"} for a in range(1, 9)]


class KwargsProbe:
    """A TRL-style reward function that records what it was given and uses both logging hooks."""

    __name__ = "probe"

    def __init__(self) -> None:
        self.calls: list[dict] = []

    def __call__(
        self, prompts, completions, completion_ids, trainer_state, log_metric, log_extra, **kw
    ):
        self.calls.append(
            {
                "completions": completions,
                "completion_ids": completion_ids,
                "step": trainer_state.global_step,
                "max_steps": trainer_state.max_steps,
                "epoch": trainer_state.epoch,
                "columns": sorted(kw),
            }
        )
        log_metric("probe/mean_ids", sum(map(len, completion_ids)) / len(completion_ids))
        log_extra("probe_len", [len(ids) for ids in completion_ids])
        return [0.0] * len(completions)


def make_trainer(tmp_path, rows, reward, chat: bool, evaluate=True, **overrides) -> SDPOTrainer:
    model, tok = make_tiny_llama()
    if chat:
        tok.chat_template = CHAT_TEMPLATE
    config = SDPOConfig(
        num_samples_per_prompt=2,
        generation__max_new_tokens=6,
        optimization__prompts_per_step=2,
        optimization__micro_batch_size=8,
        run__max_steps=2,
        run__output_dir=str(tmp_path / "run"),
        run__progress_bar=False,
        run__sample_log_steps=1,
        policy_gradient__kl_penalty_weight=0.0,
        **overrides,
    )
    return SDPOTrainer(
        config=config,
        policy_model=PolicyModel(model=model, tokenizer=tok),
        reward_model=reward,
        train_dataloader=rows,
        eval_dataloader=rows[:2] if evaluate else None,
    )


def test_trl_text_rewards_score_chat_completions_as_trl_does(tmp_path):
    """accuracy / think-format / reasoning-accuracy / cosine rewards on chat prompts give exactly
    what the functions return when called in TRL's format on the same completions."""
    from trl.rewards import (
        accuracy_reward,
        get_cosine_scaled_reward,
        reasoning_accuracy_reward,
        think_format_reward,
    )

    funcs = [
        accuracy_reward,
        think_format_reward,
        reasoning_accuracy_reward,
        get_cosine_scaled_reward(max_len=50),
    ]
    trainer = make_trainer(tmp_path, CHAT_ROWS, funcs, chat=True)
    rollouts = trainer.generate(CHAT_ROWS[:2])
    texts = [
        r"so \boxed{2}",  # row 0 (1+1): right
        "<think>\nhm\n</think>\n3",  # row 0: think format, unboxed
        r"<think>\n2\n</think>\nThe answer is \boxed{3}",  # row 1 (1+2): right, after reasoning
        r"\boxed{4}",  # row 1: wrong
    ]
    rollouts.completions = texts
    trainer.score(rollouts)

    trl_completions = [[{"role": "assistant", "content": t}] for t in texts]
    solutions = [row["solution"] for row in rollouts.rows]
    ids = [
        row[m.bool()].tolist()
        for row, m in zip(rollouts.completion_ids, rollouts.completion_mask, strict=True)
    ]
    expected = [
        f(completions=trl_completions, solution=solutions, completion_ids=ids) for f in funcs
    ]
    for name, want in zip(trainer.reward_model.names, expected, strict=True):
        got = [info[name]["score"] for info in rollouts.reward_info]
        assert got == pytest.approx([0.0 if w is None else w for w in want]), name
    assert [info["accuracy_reward"]["score"] for info in rollouts.reward_info] == [1, 0, 1, 0]
    assert [info["think_format_reward"]["score"] for info in rollouts.reward_info] == [0, 1, 1, 0]
    # accuracy_reward's log_extra columns reach the rollouts, one value per completion
    assert rollouts.reward_extra["solution"] == solutions
    assert len(rollouts.reward_extra["answer_parsed"]) == 4


def test_trl_rewards_train_on_chat_prompts_and_hooks_reach_the_logs(tmp_path):
    from trl.rewards import accuracy_reward, get_soft_overlong_punishment, think_format_reward

    probe = KwargsProbe()
    overlong = get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=3)
    trainer = make_trainer(
        tmp_path, CHAT_ROWS, [accuracy_reward, think_format_reward, overlong, probe], chat=True
    )
    trainer.train()

    # calls: eval greedy, eval sampled, step 0, step 1, eval greedy, eval sampled
    assert [(c["step"], c["max_steps"]) for c in probe.calls] == [(0, 2)] * 3 + [(1, 2)] + [
        (2, 2)
    ] * 2
    call = probe.calls[2]
    assert all(
        isinstance(c, list) and c[0]["role"] == "assistant" and isinstance(c[0]["content"], str)
        for c in call["completions"]
    )
    assert call["epoch"] == 0.25  # this step drew 2 of the 8 prompts
    assert call["columns"] == ["solution"]
    tok = trainer.policy.tokenizer
    for ids, msg in zip(call["completion_ids"], call["completions"], strict=True):
        assert tok.decode(ids, skip_special_tokens=True) == msg[0]["content"]
        assert ids.count(tok.eos_token_id) <= 1 and (tok.eos_token_id not in ids[:-1])

    run = tmp_path / "run"
    steps = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    train_steps = [r for r in steps if "reward" in r]
    assert all("probe/mean_ids" in r for r in train_steps)
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    assert {"solution", "gold_parsed", "answer_parsed", "probe_len"} <= set(samples[0]["extra"])
    assert samples[0]["extra"]["probe_len"] >= 1
    # the soft overlong punishment saw the real token counts (EOS included, as in TRL)
    last = trainer.last_rollouts
    lengths = last.completion_mask.sum(-1).tolist()
    want = [0.0 if n <= 3 else (-1.0 if n > 6 else (3 - n) / 3) for n in lengths]
    got = [info["soft_overlong_punishment_reward"]["score"] for info in last.reward_info]
    assert got == pytest.approx(want)


def test_trl_token_rewards_train_on_plain_prompts(tmp_path):
    """Plain prompts keep plain-text completions (as in TRL); token-id rewards work on them."""
    from trl.rewards import get_repetition_penalty_reward, get_soft_overlong_punishment

    probe = KwargsProbe()
    funcs = [
        get_repetition_penalty_reward(ngram_size=2),
        get_soft_overlong_punishment(max_completion_len=6, soft_punish_cache=3),
        probe,
    ]
    trainer = make_trainer(tmp_path, PLAIN_ROWS, funcs, chat=False, evaluate=False)
    trainer.train()
    assert all(isinstance(c, str) for call in probe.calls for c in call["completions"])
    last = trainer.last_rollouts
    ids = [
        row[m.bool()].tolist()
        for row, m in zip(last.completion_ids, last.completion_mask, strict=True)
    ]
    want = get_repetition_penalty_reward(ngram_size=2)(completion_ids=ids)
    got = [info["repetition_penalty_reward"]["score"] for info in last.reward_info]
    assert got == pytest.approx(want)
    assert torch.isfinite(last.rewards).all()


def test_math_reward_default_against_trl_accuracy_reward():
    """docs/trl.md's comparison table: sdpo's default math reward and TRL's accuracy_reward agree
    except where TRL takes the first \\boxed{} (sdpo: the last) or ignores \\fbox{}."""
    from helpers import MATH_CASES
    from trl.rewards import accuracy_reward

    from sdpo import MathRewardModel

    completions = [c for c, *_ in MATH_CASES]
    golds = [g for _, g, *_ in MATH_CASES]
    trl_scores = accuracy_reward(
        [[{"role": "assistant", "content": c}] for c in completions], golds
    )
    ours = [o.score for o in MathRewardModel()(["q"] * len(golds), completions, answer=golds)]
    differ = [c for c, a, b in zip(completions, ours, trl_scores, strict=True) if a != b]
    assert differ == ["first \\boxed{3}, no: \\boxed{4}", "\\fbox{4}"]
    assert ours == [d for *_, d, _ in MATH_CASES]
