"""Success memory (self_distillation.success_memory_steps): all-fail groups and lone successes take
the latest earlier success on the same question as their demonstration, within an age limit."""

from __future__ import annotations

import json

from conftest import make_trainer

from sdpo.config import SelfDistillationConfig
from sdpo.reprompting import Reprompter


def _build(rp, completions, rewards, prompts=("Q1", "Q1", "Q2", "Q2")):
    return rp.build(list(prompts), completions, rewards, [0, 0, 1, 1])


def test_all_fail_group_and_lone_success_use_an_earlier_success():
    rp = Reprompter(SelfDistillationConfig(success_memory_steps=2))
    first = _build(rp, ["7", "8", "1", "2"], [1.0, 0.0, 0.0, 0.0])
    assert first[0] is None and first[1].demonstration_index == 0  # no memory yet
    assert first[2] is None and first[3] is None  # Q2: all fail, nothing remembered
    assert rp.last_stats["memory_demonstration_fraction"] == 0.0

    second = _build(
        rp, ["9", "5", "3", "4"], [1.0, 0.0, 0.0, 0.0], prompts=("Q2", "Q2", "Q1", "Q1")
    )
    # Q2's lone success (row 0) and Q1's failures (rows 2, 3) take Q1's / no memory
    assert second[0] is None  # Q2 never succeeded before: the lone success has no demonstration
    for i in (2, 3):
        assert second[i].from_memory and second[i].demonstration_index is None
        assert "Correct solution:\n\n7\n" in second[i].prompt
    assert second[1].demonstration_index == 0 and not second[1].from_memory
    assert rp.last_stats["memory_demonstration_fraction"] == 0.5

    third = _build(rp, ["6", "0", "1", "1"], [1.0, 0.0, 0.0, 0.0])
    # Q1's lone success (row 0) now has Q1's memory from step 1 (age 2 <= 2); Q2 fails: step 2's 9
    assert third[0].from_memory and "\n7\n" in third[0].prompt
    assert third[2].from_memory and "\n9\n" in third[2].prompt


def test_memory_older_than_the_limit_is_not_used_and_zero_is_off():
    rp = Reprompter(SelfDistillationConfig(success_memory_steps=1))
    _build(rp, ["7", "8", "1", "2"], [1.0, 0.0, 0.0, 0.0])
    _build(rp, ["0", "0", "0", "0"], [0.0, 0.0, 0.0, 0.0])  # step 2: Q1 from memory (age 1)
    assert all(c is None for c in _build(rp, ["0"] * 4, [0.0] * 4))  # step 3: age 2 > 1
    off = Reprompter(SelfDistillationConfig())
    _build(off, ["7", "8", "1", "2"], [1.0, 0.0, 0.0, 0.0])
    assert all(c is None for c in _build(off, ["0"] * 4, [0.0] * 4))
    assert "memory_demonstration_fraction" not in off.last_stats


def test_memory_is_checkpointed_and_restored(tmp_path):
    def one_per_group(prompts, completions, **columns):
        return [float(i % 4 == 0) for i in range(len(completions))]

    kw = dict(reward=one_per_group, self_distillation__success_memory_steps=5)
    first = make_trainer(tmp_path / "run", run__max_steps=2, **kw)
    first.train()
    assert first.reprompter.memory  # the lone successes were remembered
    state = json.loads((tmp_path / "run" / "checkpoint-000002" / "trainer_state.json").read_text())
    assert state["success_memory"] == first.reprompter.state_dict()
    resumed = make_trainer(
        tmp_path / "run", run__max_steps=2, run__resume_from=str(tmp_path / "run"), **kw
    )
    assert resumed.reprompter.state_dict() == first.reprompter.state_dict()
