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


# ----- the adversarial trial's config cases (issue 8, item 17) -----------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"temperature": math.inf}, r"generation.temperature is inf; give a finite number"),
        ({"distillation_weight": math.inf}, r"distillation_weight is inf"),
        ({"kl_penalty_weight": math.inf}, r"kl_penalty_weight is inf"),
        ({"adam_beta1": 1.0}, r"optimization.adam_beta1 = 1.0 is out of range: must be < 1"),
        ({"adam_beta2": 1.0}, r"optimization.adam_beta2 = 1.0 is out of range: must be < 1"),
        ({"clip_eps_low": 1.0}, r"policy_gradient.clip_eps_low = 1.0 is out of range: must be < 1"),
        (
            {"min_new_tokens": 9, "max_new_tokens": 8},
            r"generation.min_new_tokens = 9 is more than generation.max_new_tokens = 8",
        ),
        ({"model_name": ""}, r"model_name is empty"),
        ({"model_name": "  "}, r"model_name is empty"),
        ({"output_dir": ""}, r"run.output_dir is empty"),
        ({"seed": 2**70}, r"run.seed = \d+ is out of range: must be <= 4294967295"),
        ({"seed": -1}, r"run.seed = -1 is out of range: must be >= 0"),
    ],
)
def test_adversarial_values_are_refused_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SDPOConfig(**kwargs)


def test_yaml_errors_name_the_file(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("run:\n  max_steps: [1\n")
    with pytest.raises(ValueError, match=f"{bad}: invalid YAML"):
        SDPOConfig.from_yaml(bad)
    binary = tmp_path / "binary.yaml"
    binary.write_bytes(b"\x89PNG\r\n\x1a\n\x00\xff\xfe")
    with pytest.raises(ValueError, match=f"{binary} is not a UTF-8 text file"):
        SDPOConfig.from_yaml(binary)
    with pytest.raises(ValueError, match=f"{tmp_path} is a directory"):
        SDPOConfig.from_yaml(tmp_path)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("run:\n  seed: 1\n  seed: 2\n", r"duplicate key 'seed'"),
        ("alpha: 0.5\nalpha: 1.0\n", r"duplicate key 'alpha'"),
        ("alpha: 0.5\nself_distillation:\n  alpha: 1.0\n", r"self_distillation.alpha is set twice"),
        ("run.seed: 1\nrun:\n  seed: 2\n", r"run.seed is set twice"),
    ],
)
def test_duplicate_or_conflicting_yaml_keys_are_refused(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ValueError, match=message):
        SDPOConfig.from_yaml(path)


def test_unknown_key_hint_lists_each_name_once():
    with pytest.raises(KeyError) as info:
        SDPOConfig().set("model.nme", 8)
    hint = str(info.value).split("Did you mean: ")[1].split("?")[0].split(", ")
    assert len(hint) == len(set(hint)), hint
