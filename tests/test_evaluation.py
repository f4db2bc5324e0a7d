"""Evaluation: pass@k / maj@k / bootstrap against hand values and brute force; `sdpo eval` end to end."""

from __future__ import annotations

import itertools
import json
import math
from fractions import Fraction

import pytest
from conftest import make_trainer

from sdpo.cli import main
from sdpo.evaluation import (
    majority_vote_accuracy,
    paired_bootstrap,
    pass_at_k,
    resolve_model,
    summarize,
)

# ----- pass@k --------------------------------------------------------------------------------------


def test_pass_at_k_hand_computed_values():
    assert pass_at_k(5, 2, 2) == pytest.approx(1 - 3 / 10)  # 1 - C(3,2)/C(5,2)
    assert pass_at_k(4, 1, 1) == pytest.approx(0.25)
    assert pass_at_k(10, 3, 4) == pytest.approx(1 - 35 / 210)  # 1 - C(7,4)/C(10,4)
    assert pass_at_k(8, 0, 8) == 0.0
    assert pass_at_k(8, 8, 1) == 1.0
    assert pass_at_k(8, 5, 4) == 1.0  # n - c = 3 < k: every 4-subset holds a correct one


def _brute_force_pass_at_k(n: int, c: int, k: int) -> Fraction:
    samples = [True] * c + [False] * (n - c)
    subsets = list(itertools.combinations(samples, k))
    return Fraction(sum(any(s) for s in subsets), len(subsets))


def test_pass_at_k_matches_enumeration_over_every_subset():
    for n in range(1, 9):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(
                    float(_brute_force_pass_at_k(n, c, k)), abs=1e-12
                ), (n, c, k)


def test_pass_at_k_is_stable_where_the_binomials_overflow_floats():
    n, c, k = 2000, 7, 500  # C(2000, 500) ~ 1e486: not a float
    exact = 1 - Fraction(math.comb(n - c, k), math.comb(n, k))
    assert pass_at_k(n, c, k) == pytest.approx(float(exact), rel=1e-12)


def test_pass_at_k_rejects_impossible_counts():
    with pytest.raises(ValueError, match="0 <= c <= n"):
        pass_at_k(4, 5, 1)
    with pytest.raises(ValueError, match="1 <= k <= n"):
        pass_at_k(4, 2, 5)


# ----- maj@k ---------------------------------------------------------------------------------------


def test_majority_vote_on_constructed_answers():
    answers, correct = ["7", "7", "9"], [True, True, False]
    assert majority_vote_accuracy(answers, correct, 3) == 1.0
    assert majority_vote_accuracy(answers, correct, 1) == pytest.approx(2 / 3)
    # pairs {0,1} -> "7" (right); {0,2}, {1,2} tie 7/9 -> half right each: (1 + .5 + .5) / 3
    assert majority_vote_accuracy(answers, correct, 2) == pytest.approx(2 / 3)
    # the wrong answer wins the vote although 2 of 5 samples are right: maj@5 = 0, pass@5 = 1
    answers, correct = ["3", "3", "5", "5", "5"], [True, True, False, False, False]
    assert majority_vote_accuracy(answers, correct, 5) == 0.0
    assert pass_at_k(5, 2, 5) == 1.0
    # samples without an extractable answer abstain; nobody voting counts as wrong
    assert majority_vote_accuracy([None, None, "4"], [False, False, True], 3) == 1.0
    assert majority_vote_accuracy([None, None, "4"], [False, False, True], 2) == pytest.approx(
        2 / 3
    )
    assert majority_vote_accuracy([None, None], [False, False], 2) == 0.0


def test_majority_vote_sampled_subsets_approach_the_exact_value():
    answers = ["a"] * 9 + ["b"] * 7 + ["c"] * 4
    correct = [a == "b" for a in answers]
    exact = majority_vote_accuracy(answers, correct, 10)  # C(20, 10) = 184756 subsets
    sampled = majority_vote_accuracy(answers, correct, 10, max_subsets=4000, seed=1)
    assert math.comb(20, 10) > 4000
    assert sampled == pytest.approx(exact, abs=0.03)


# ----- bootstrap and aggregates --------------------------------------------------------------------


def test_paired_bootstrap_on_constructed_differences():
    same = paired_bootstrap([0.5, 0.25, 1.0], [0.5, 0.25, 1.0])
    assert same == {"difference": 0.0, "low": 0.0, "high": 0.0}
    shifted = paired_bootstrap([0.1, 0.9, 0.4, 0.6], [0.0, 0.8, 0.3, 0.5])
    assert shifted["difference"] == pytest.approx(0.1)
    assert shifted["low"] == pytest.approx(0.1) and shifted["high"] == pytest.approx(0.1)
    noisy = paired_bootstrap([1, 0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 0, 0, 1, 0, 1], seed=3)
    assert noisy["difference"] == pytest.approx(3 / 8)
    assert 0.0 <= noisy["low"] < 3 / 8 < noisy["high"] <= 0.75
    assert noisy == paired_bootstrap([1, 0, 1, 1, 0, 1, 1, 1], [0, 0, 1, 0, 0, 1, 0, 1], seed=3)
    with pytest.raises(ValueError, match="equally long"):
        paired_bootstrap([1.0], [1.0, 0.0])


def _recompute(record_list: list[dict], n: int) -> dict[str, float]:
    """The aggregates from per-prompt counts only, with exact binomials (independent of the module)."""
    out = {
        "accuracy_sampled": sum(r["num_correct"] / r["num_samples"] for r in record_list)
        / len(record_list)
    }
    for k in range(1, n + 1):
        out[f"pass@{k}"] = sum(
            1 - math.comb(r["num_samples"] - r["num_correct"], k) / math.comb(r["num_samples"], k)
            for r in record_list
        ) / len(record_list)
    return out


def test_summarize_is_a_function_of_the_per_prompt_counts():
    records = [
        {"num_samples": 4, "num_correct": c, "rewards": [1.0] * c + [0.0] * (4 - c)}
        | {"completion_lengths": [3] * 4, "correct": [True] * c + [False] * (4 - c)}
        | {"answers": ["1"] * c + ["2"] * (4 - c), "greedy_correct": c > 1, "greedy_reward": 0.0}
        for c in (0, 1, 3, 4)
    ]
    m = summarize(records)
    for key, value in _recompute(records, 4).items():
        assert m[key] == pytest.approx(value), key
    assert m["mean@4"] == m["pass@1"] == m["accuracy_sampled"] == pytest.approx(0.5)
    assert m["maj@4"] == pytest.approx((0 + 0 + 1 + 1) / 4)
    assert m["accuracy_greedy"] == 0.5 and m["mean_completion_length"] == 3.0


# ----- `sdpo eval` end to end ------------------------------------------------------------------------


def _eval(tmp_path, name, *extra):
    out = tmp_path / name
    argv = ["eval", "demo", "--samples", "4", "--max-prompts", "12", "-o", str(out), *extra]
    assert main(argv) == 0
    return json.loads(out.read_text())


def test_sdpo_eval_demo_arithmetic_json_recomputes_and_is_seeded(tmp_path, capsys):
    first = _eval(tmp_path, "a.json")
    m, records = first["metrics"], first["per_prompt"]
    assert first["data"] == "arithmetic" and m["num_prompts"] == len(records) == 12
    assert all(r["num_samples"] == 4 and len(r["completions"]) == 4 for r in records)
    for key, value in _recompute(records, 4).items():
        assert m[key] == pytest.approx(value), key
    assert m["accuracy_greedy"] == pytest.approx(
        sum(r["greedy_correct"] for r in records) / len(records)
    )
    # the demo model gets some but not all right: the figures are not degenerate
    assert 0 < m["accuracy_sampled"] < 1 and m["pass@1"] < m["pass@4"]
    assert {"maj@1", "maj@4", "mean_completion_length"} <= set(m)
    table = capsys.readouterr().out
    assert "mean@4" in table and "pass@4" in table and "maj@4" in table

    assert _eval(tmp_path, "b.json") == first  # same seed: identical, completions included
    other = _eval(tmp_path, "c.json", "--seed", "1")
    assert [r["completions"] for r in other["per_prompt"]] != [r["completions"] for r in records]


def test_sdpo_eval_baseline_is_paired_on_the_same_samples(tmp_path, capsys):
    report = _eval(tmp_path, "ab.json", "--baseline", "demo")
    # the same model with the same seed sees the same samples: every difference is exactly 0
    assert report["baseline"]["per_prompt"] == report["per_prompt"]
    for key, d in report["difference"].items():
        assert d == {"difference": 0.0, "low": 0.0, "high": 0.0}, key
    assert "difference [95% CI]" in capsys.readouterr().out


def test_sdpo_eval_reads_a_run_directory_policy_and_ema_teacher(tmp_path, capsys):
    rows = [{"prompt": f"Q: {a}+11=", "answer": str(a + 11)} for a in range(10, 20)]
    from sdpo.tasks import task_reward_model

    make_trainer(
        tmp_path / "run",
        reward=task_reward_model("arithmetic"),
        rows=rows,
        defaults={},
        data__task="arithmetic",
        generation__max_new_tokens=4,
        optimization__prompts_per_step=2,
        optimization__learning_rate=1e-2,
        run__max_steps=2,
        run__save_steps=1,
        run__progress_bar=False,
    ).train()
    run = tmp_path / "run"
    name, teacher, run_dir = resolve_model(str(run), teacher=True)
    assert name == str(run / "checkpoint-000002" / "policy") and run_dir == run
    assert teacher == run / "checkpoint-000002" / "teacher.safetensors"
    assert resolve_model(str(run), checkpoint="1")[0] == str(run / "checkpoint-000001" / "policy")
    with pytest.raises(FileNotFoundError, match="it has: checkpoint-000001, checkpoint-000002"):
        resolve_model(str(run), checkpoint="7")
    policy_eval = _run_eval(tmp_path, str(run), "p.json")
    teacher_eval = _run_eval(tmp_path, str(run), "t.json", "--teacher")
    assert policy_eval["data"] == "arithmetic" and teacher_eval["weights"] == "teacher"
    # lr 1e-2 moved the policy; the EMA teacher (rate 0.05) lags behind: different completions
    assert [r["completions"] for r in policy_eval["per_prompt"]] != [
        r["completions"] for r in teacher_eval["per_prompt"]
    ]
    assert main(["eval", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _run_eval(tmp_path, model, name, *extra):
    out = tmp_path / name
    assert (
        main(["eval", model, "--samples", "2", "--max-prompts", "4", "-o", str(out), *extra]) == 0
    )
    return json.loads(out.read_text())
