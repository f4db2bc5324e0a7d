"""SDPOConfig: the seed's API and defaults, overrides, YAML, presets, and errors that help."""

from __future__ import annotations

import math

import pytest

from sdpo.config import PRESETS, SDPOConfig


def test_seed_example_line_works_as_written():
    config = SDPOConfig(
        model_name="gpt2",
        num_samples_per_prompt=4,
        self_distillation__success_reward_threshold=0.8,
        self_distillation__alpha=0.5,
    )
    assert config.model_name == "gpt2"
    assert config.self_distillation.alpha == 0.5
    assert config.self_distillation.success_reward_threshold == 0.8


def test_seed_hyperparameter_table_defaults():
    c = SDPOConfig()
    assert c.num_samples_per_prompt == 4
    assert c.self_distillation.success_reward_threshold == 1.0
    assert c.self_distillation.alpha == 0.5
    assert c.self_distillation.teacher_update_rate == 0.05
    assert c.self_distillation.distillation_weight == 1.0
    assert c.policy_gradient.pg_loss_weight == 1.0
    assert c.policy_gradient.kl_penalty_weight == 0.01
    assert c.self_distillation.distillation_topk is None
    assert c.self_distillation.teacher == "ema"


def test_every_key_has_a_one_line_doc():
    for key in SDPOConfig.keys():
        doc = SDPOConfig.field_info(key)[0].metadata.get("doc", "")
        assert doc and "\n" not in doc, key


def test_unique_leaf_names_and_dotted_overrides_convert_types():
    c = SDPOConfig(alpha=1.0, distillation_topk=20)
    assert c.self_distillation.alpha == 1.0 and c.self_distillation.distillation_topk == 20
    c.apply_overrides(
        [
            "self_distillation.alpha=0.25",
            "is_clip=none",
            "run.max_steps=7",
            "scale_rewards=false",
            "learning_rate=3e-4",
        ]
    )
    assert c.self_distillation.alpha == 0.25 and isinstance(c.self_distillation.alpha, float)
    assert c.self_distillation.is_clip is None
    assert c.run.max_steps == 7 and isinstance(c.run.max_steps, int)
    assert c.policy_gradient.scale_rewards is False
    assert c.optimization.learning_rate == 3e-4


def test_yaml_round_trip_and_partial_yaml(tmp_path):
    c = SDPOConfig(alpha=0.0, teacher="live", run__seed=5)
    c.to_yaml(tmp_path / "c.yaml")
    assert SDPOConfig.from_yaml(tmp_path / "c.yaml") == c
    (tmp_path / "p.yaml").write_text(
        "preset: paper\nself_distillation:\n  alpha: 1.0\ntask: arithmetic\n"
    )
    p = SDPOConfig.from_yaml(tmp_path / "p.yaml")
    assert (
        p.self_distillation.alpha == 1.0
        and p.policy_gradient.pg_loss_weight == 0.0
        and p.data.task == "arithmetic"
    )
    assert c.to_dict()["self_distillation"]["teacher"] == "live"


def test_presets():
    paper = SDPOConfig.preset("paper")
    assert paper.policy_gradient.pg_loss_weight == 0.0
    assert (
        paper.self_distillation.distillation_topk == 100
        and paper.self_distillation.distillation_add_tail
    )
    assert paper.self_distillation.is_clip == 2.0 and paper.num_samples_per_prompt == 8
    assert SDPOConfig.preset("grpo").self_distillation.distillation_weight == 0.0
    assert SDPOConfig.preset("seed") == SDPOConfig()
    assert set(PRESETS) >= {"seed", "paper", "grpo", "quickstart"}
    with pytest.raises(KeyError, match="choose one of"):
        SDPOConfig.preset("papr")


def test_unknown_key_names_the_closest_valid_key():
    with pytest.raises(KeyError, match="Did you mean: alpha"):
        SDPOConfig(alpah=0.5)
    with pytest.raises(KeyError, match="self_distillation.teacher_update_rate"):
        SDPOConfig().apply_overrides(["self_distillation.teacher_update_rat=0.1"])


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"alpha": 1.5}, r"self_distillation.alpha = 1.5 is out of range: must be <= 1.0"),
        ({"alpha": -0.1}, r"self_distillation.alpha = -0.1 is out of range"),
        (
            {"distillation_weight": -1.0},
            r"distillation_weight = -1.0 is out of range: must be >= 0",
        ),
        ({"distillation_topk": 0}, r"distillation_topk = 0 is out of range: must be >= 1"),
        ({"success_reward_threshold": math.nan}, r"success_reward_threshold is NaN"),
        ({"num_samples_per_prompt": 2.5}, r"num_samples_per_prompt must be an integer"),
        ({"teacher": "emma"}, r"teacher = 'emma' is not one of"),
        ({"scale_rewards": "maybe"}, r"scale_rewards must be true or false"),
        ({"temperature": 0.0}, r"temperature = 0.0 is out of range: must be > 0"),
        ({"distillation_level": "token", "alpha": 0.5}, r"needs self_distillation.alpha = 1.0"),
    ],
)
def test_bad_values_raise_value_error_naming_field_and_range(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SDPOConfig(**kwargs)


def test_override_without_equals_sign():
    with pytest.raises(ValueError, match="key=value"):
        SDPOConfig().apply_overrides(["alpha"])
