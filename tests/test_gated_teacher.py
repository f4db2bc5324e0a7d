"""The gated teacher (sdpo.teacher.GateRule, CGTR arXiv 2606.03532): its exact refresh rule, a
teacher frozen between refreshes and equal to the student at one, metrics, and a bitwise resume."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import make_trainer

from sdpo.teacher import GateRule


def _observe(rule: GateRule, reward: float, length: float = 10.0) -> bool:
    return rule.observe(torch.full((8,), reward), torch.full((8,), length))


def test_rule_refreshes_only_after_a_window_and_a_reward_gain():
    rule = GateRule(window=2, min_improvement=0.05)
    seen = [_observe(rule, r) for r in (0.1, 0.1, 0.3, 0.3, 0.3, 0.3, 0.5, 0.5)]
    # step 2: the window fills, reference R* = 0.1 (no refresh); step 3: R = 0.2 > 0.15 -> refresh
    # (3 steps since the start); step 4: R = 0.3 but only 1 step since; step 5: R = 0.3 > 0.2 +
    # 0.05; step 6: R = 0.3, no gain; step 7: R = 0.4 > 0.35, 2 steps since; step 8: R = 0.5 >
    # 0.45, but 1 step since.
    assert [i + 1 for i, s in enumerate(seen) if s] == [3, 5, 7]
    assert rule.metrics() == {"teacher/refreshes": 3.0, "teacher/age": 1.0}
    assert rule.reference == pytest.approx([0.4, 10.0])


def test_rule_holds_the_teacher_while_the_length_tail_blows_up():
    rule = GateRule(window=1, length_ratio=1.5)
    assert not _observe(rule, 0.1, length=10)  # reference: R* = 0.1, length tail 10
    assert not _observe(rule, 0.5, length=16)  # reward up, but 16 > 1.5 x 10
    assert _observe(rule, 0.5, length=15)  # 15 <= 15: refresh, reference now (0.5, 15)
    assert not _observe(rule, 0.4, length=15)  # reward not above 0.5


def rising(prompts, completions, trainer_state=None, **columns):
    """More successes every step (k of 8 at step k), so the rolling reward keeps improving."""
    k = trainer_state.global_step + 1
    return [float(i % 8 < k) for i in range(len(completions))]


GATED = dict(
    self_distillation__teacher="gated",
    self_distillation__gated_window=2,
    num_samples_per_prompt=4,
    optimization__prompts_per_step=2,
    generation__min_new_tokens=6,
)


def _params(module):
    return [p.detach().clone() for p in module.parameters()]


def _equal(a, b):
    return all(torch.equal(x, y) for x, y in zip(a, b, strict=True))


def test_teacher_is_frozen_between_refreshes_and_the_student_at_one(tmp_path):
    trainer = make_trainer(tmp_path / "run", reward=rising, **GATED)
    initial = _params(trainer.teacher.copy)
    ages = []
    for step in range(1, 6):
        metrics = trainer.step()
        assert trainer.global_step == step
        ages.append(metrics["teacher/age"])
        teacher, student = _params(trainer.teacher.copy), _params(trainer.policy.model)
        if step in (3, 5):  # the rule's refresh steps for window 2 and a rising reward
            assert _equal(teacher, student), step
            at_refresh = teacher
        elif step < 3:
            assert _equal(teacher, initial) and not _equal(teacher, student), step
        else:  # step 4: the copy taken at step 3, not the student that moved on
            assert _equal(teacher, at_refresh) and not _equal(teacher, student), step
    assert ages == [1.0, 2.0, 0.0, 1.0, 0.0]
    assert metrics["teacher/refreshes"] == 2.0


def test_resume_keeps_the_gate_and_is_bitwise(tmp_path):
    straight = make_trainer(tmp_path / "a", reward=rising, run__max_steps=4, **GATED)
    straight.train()
    first = make_trainer(tmp_path / "b", reward=rising, run__max_steps=2, **GATED)
    first.train()
    state = json.loads((tmp_path / "b" / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["teacher_gate"]["steps"] == 2 and len(state["teacher_gate"]["rewards"]) == 2
    resumed = make_trainer(
        tmp_path / "b", reward=rising, run__max_steps=4, run__resume_from=str(tmp_path / "b"),
        **GATED,
    )  # fmt: skip
    resumed.train()
    assert resumed.teacher.gate.state_dict() == straight.teacher.gate.state_dict()
    assert resumed.teacher.gate.refreshes == 1  # step 3: the restored window decided it
    assert _equal(_params(resumed.policy.model), _params(straight.policy.model))
    assert _equal(_params(resumed.teacher.copy), _params(straight.teacher.copy))
    logged = [
        json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()
    ]
    assert [r["teacher/age"] for r in logged if "teacher/age" in r] == [1.0, 2.0, 0.0, 1.0]
