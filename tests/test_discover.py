"""Test-time SDPO (`sdpo discover`): discovery curves, the three methods, the command line."""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys

import pytest
import torch
from conftest import make_tiny_llama

from sdpo import PolicyModel, SDPOConfig
from sdpo.discover import (
    Attempt,
    Discoverer,
    attempts_to_reach,
    discovery_curve,
    summarize,
)
from sdpo.reward_model import RewardOutput

QUESTIONS = [{"prompt": "Q: 12+34=", "answer": "46"}, {"prompt": "Q: 58+67=", "answer": "125"}]


def make_config(**overrides) -> SDPOConfig:
    base = dict(
        num_samples_per_prompt=4,
        generation__max_new_tokens=4,
        optimization__learning_rate=1e-2,
        policy_gradient__pg_loss_weight=0.0,
        policy_gradient__kl_penalty_weight=0.0,
        self_distillation__teacher="live",
    )
    base.update(overrides)
    return SDPOConfig(**base)


def never(prompts, completions, **columns):
    """Every attempt fails, with feedback (the teacher learns from feedback alone)."""
    return [RewardOutput(0.0, "Your answer is too large.") for _ in completions]


def always(prompts, completions, **columns):
    return [1.0 for _ in completions]


def test_discovery_curve_by_hand():
    # Solved at attempts 1, 3, never, 3 out of a budget of 4.
    assert discovery_curve([1, 3, None, 3], 4) == [0.25, 0.25, 0.75, 0.75]
    assert attempts_to_reach([0.25, 0.25, 0.75, 0.75], 0.7) == 3
    assert attempts_to_reach([0.25, 0.25, 0.75, 0.75], 0.8) is None


def test_discovery_curve_matches_brute_force_counting():
    budget = 6
    for solved_at in itertools.product([None, 1, 2, 4, 6], repeat=3):
        curve = discovery_curve(list(solved_at), budget)
        for k in range(1, budget + 1):
            expected = sum(1 for s in solved_at if s is not None and s <= k) / 3
            assert curve[k - 1] == pytest.approx(expected)
        assert curve == sorted(curve)


def test_summary_means_and_spread_over_seeds():
    results = [
        Attempt("best_of_k", 0, 0, 1, 1),
        Attempt("best_of_k", 0, 1, None, 4),
        Attempt("best_of_k", 1, 0, 2, 2),
        Attempt("best_of_k", 1, 1, 2, 2),
        Attempt("sdpo", 0, 0, 1, 1),
        Attempt("sdpo", 0, 1, 1, 1),
        Attempt("sdpo", 1, 0, 1, 1),
        Attempt("sdpo", 1, 1, 3, 3),
    ]
    s = summarize(results, 4)
    bok, sd = s["methods"]["best_of_k"], s["methods"]["sdpo"]
    assert bok["per_seed"] == [[0.5, 0.5, 0.5, 0.5], [0.0, 1.0, 1.0, 1.0]]
    assert bok["discovery_at_k"] == [0.25, 0.75, 0.75, 0.75]
    assert bok["discovery_at_k_std"][0] == pytest.approx(0.5**0.5 / 2)
    assert sd["discovery_at_k"] == [0.75, 0.75, 1.0, 1.0]
    # best-of-k ends at 0.75; SDPO's mean curve reaches 0.75 at k = 1.
    assert sd["attempts_to_match_best_of_k"] == 1
    assert bok["attempts_to_match_best_of_k"] == 2


def test_budget_must_be_a_multiple_of_the_group():
    model, tok = make_tiny_llama()
    with pytest.raises(ValueError, match="multiple of num_samples_per_prompt"):
        Discoverer(PolicyModel(model=model, tokenizer=tok), never, make_config(), budget=6)


def test_instant_success_counts_one_attempt_for_every_method():
    model, tok = make_tiny_llama()
    d = Discoverer(PolicyModel(model=model, tokenizer=tok), always, make_config(), budget=8)
    results = d.run(QUESTIONS, seeds=[0])
    assert {(r.method, r.question) for r in results} == {
        (m, q) for m in ("sdpo", "best_of_k", "multi_turn") for q in (0, 1)
    }
    assert all(r.solved_at == 1 and r.attempts == 1 for r in results)


def test_sdpo_updates_a_copy_per_question_and_never_the_base_model():
    model, tok = make_tiny_llama()
    policy = PolicyModel(model=model, tokenizer=tok)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    d = Discoverer(policy, never, make_config(), budget=8, steps_per_round=2)
    students = []
    for row in QUESTIONS:
        assert d.run_sdpo(row, seed=0) is None
        students.append(d.last_student.model)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), f"the base model's {k} changed"
    assert students[0] is not students[1] and students[0] is not model
    for student in students:  # each trained (feedback-only teacher contexts) away from the base
        moved = [k for k, p in student.state_dict().items() if not torch.equal(p, before[k])]
        assert moved


def test_multi_turn_shows_each_chain_its_own_feedback():
    model, tok = make_tiny_llama()
    policy = PolicyModel(model=model, tokenizer=tok)
    prompts_seen: list[list[int]] = []
    generate = policy.generate

    def recording_generate(prompt_ids, *args, **kwargs):
        prompts_seen.append([tok.decode(ids) for ids in prompt_ids])
        return generate(prompt_ids, *args, **kwargs)

    policy.generate = recording_generate

    def numbered_feedback(prompts, completions, **columns):
        return [RewardOutput(0.0, f"attempt {i} failed") for i in range(len(completions))]

    d = Discoverer(policy, numbered_feedback, make_config(), budget=8)
    assert d.run_multi_turn(QUESTIONS[0], seed=0) is None
    first, second = prompts_seen
    assert first == ["Q: 12+34="] * 4
    for i, prompt in enumerate(second):
        assert prompt.startswith("Q: 12+34=")
        assert f"attempt {i} failed" in prompt
        assert "Correctly solve the original question." in prompt


def test_seeded_runs_are_reproducible():
    model, tok = make_tiny_llama()
    policy = PolicyModel(model=model, tokenizer=tok)

    def half(prompts, completions, **columns):
        return [float(sum(map(ord, c)) % 3 == 0) for c in completions]

    d = Discoverer(policy, half, make_config(generation__max_new_tokens=2), budget=8)
    a = d.run(QUESTIONS[:1], seeds=[0, 1])
    b = d.run(QUESTIONS[:1], seeds=[0, 1])
    assert [r.solved_at for r in a] == [r.solved_at for r in b]


def test_cli_discover_on_two_questions_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = tmp_path / "disc"
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "sdpo.cli",
            "discover",
            "--num-questions",
            "2",
            "--budget",
            "8",
            "--seeds",
            "0",
            "1",
            "--out",
            str(out),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    record = json.loads((out / "discover.json").read_text())
    assert set(record["methods"]) == {"sdpo", "best_of_k", "multi_turn"}
    assert len(record["results"]) == 2 * 2 * 3
    for entry in record["methods"].values():
        assert len(entry["discovery_at_k"]) == 8
    png = (out / "discovery.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert "| method |" in proc.stdout
