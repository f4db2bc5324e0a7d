"""SDPOTrainer end to end on tiny in-process models: seed API, invariance, teachers, logging, errors."""

from __future__ import annotations

import json
import math

import pytest
import torch
from conftest import (
    ROWS,
    TRAINER_DEFAULTS,
    make_tiny_llama,
    make_trainer,
    one_success_per_group,
    parity_reward,
    scored_batch,
)

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer
from sdpo.reward_model import RewardOutput


def test_train_writes_metrics_samples_checkpoints_and_changes_weights(tmp_path, tiny_llama):
    model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(
        tmp_path / "run",
        eval_rows=ROWS[:4],
        policy=PolicyModel(model=model, tokenizer=tok),
        run__save_steps=1,
        run__save_total_limit=1,
    )
    final = trainer.train()
    assert "eval/accuracy_greedy" in final and "eval/accuracy_sampled" in final
    run = tmp_path / "run"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in records if "reward" in r]
    assert [r["step"] for r in steps] == [1, 2]
    for key in (
        "reward",
        "reward_std",
        "frac_reward_zero_std",
        "completions/mean_length",
        "entropy",
        "policy_loss",
        "clip_ratio",
        "grad_norm",
        "lr",
        "step_time",
        "kl",
        "self_distillation/distillation_loss",
        "self_distillation/success_group_fraction",
        "self_distillation/reprompt_sample_fraction",
        "self_distillation/feedback_used_fraction",
        "self_distillation/teacher_student_kl",
    ):
        assert key in steps[0], key
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 * 2 * 4
    assert {"prompt", "completion", "reward", "feedback", "teacher_prompt"} <= set(samples[0])
    assert any(s["teacher_prompt"] and "Correct solution:" in s["teacher_prompt"] for s in samples)
    assert sorted(p.name for p in run.glob("checkpoint-*")) == [
        "checkpoint-000002"
    ]  # keep last K=1
    assert (run / "config.yaml").exists()
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())


def _grads(model):
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("teacher", ["ema", "live", "frozen", "trust_region"])
def test_gradients_do_not_depend_on_micro_batch_size(tmp_path, teacher):
    trainer = make_trainer(
        tmp_path / "run",
        reward=one_success_per_group,
        self_distillation__teacher=teacher,
        self_distillation__distillation_topk=5,
        policy_gradient__loss_aggregation="sequence_mean",
    )
    model = trainer.policy.model
    rollouts, contexts = scored_batch(trainer)
    assert any(c is not None for c in contexts) and any(c is None for c in contexts)
    prepared = trainer.loss.prepare(rollouts, contexts)
    grads = {}
    for mb in (len(rollouts), 3, 1):
        trainer.config.optimization.micro_batch_size = mb
        model.zero_grad(set_to_none=True)
        sums = trainer.loss.backward(rollouts, prepared)
        assert sums is not None
        grads[mb] = _grads(model)
    assert grads[1].keys() == grads[len(rollouts)].keys() and grads[1]
    for mb in (3, 1):
        for name, g in grads[len(rollouts)].items():
            torch.testing.assert_close(
                grads[mb][name], g, rtol=1e-4, atol=1e-6, msg=f"{name} at micro-batch {mb}"
            )


def test_ema_teacher_moves_toward_student_and_frozen_stays(tmp_path):
    trainer = make_trainer(
        tmp_path / "run",
        self_distillation__teacher_update_rate=0.5,
        run__max_steps=1,
        run__save_steps=100,
    )
    initial = {k: v.clone() for k, v in trainer.teacher.copy.state_dict().items()}
    trainer.step()
    student = trainer.policy.model.state_dict()
    for name, value in trainer.teacher.copy.state_dict().items():
        torch.testing.assert_close(value, 0.5 * initial[name] + 0.5 * student[name])


def test_reference_model_only_loaded_when_needed(tmp_path, tiny_llama):
    model, tok = tiny_llama
    policy = PolicyModel(model=model, tokenizer=tok)
    no_kl = make_trainer(tmp_path / "run", policy=policy, kl_penalty_weight=0.0, teacher="live")
    assert no_kl.reference is None and no_kl.teacher.copy is None
    with_kl = make_trainer(tmp_path / "run", policy=policy, kl_penalty_weight=0.1, teacher="frozen")
    assert (
        with_kl.reference is not None and with_kl.teacher.weights is with_kl.reference
    )  # one shared copy


def test_a_run_without_distillation_keeps_no_teacher_copy(tmp_path):
    """GRPO (distillation_weight=0) with the default EMA teacher: no copy in memory or on disk."""
    trainer = make_trainer(
        tmp_path / "run",
        distillation_weight=0.0,
        teacher="ema",
        kl_penalty_weight=0.0,
        run__save_steps=2,
    )
    assert trainer.teacher.copy is None
    trainer.train()
    checkpoint = tmp_path / "run" / "checkpoint-000002"
    assert checkpoint.is_dir() and not (checkpoint / "teacher.safetensors").exists()


def test_gpt2_and_token_level_and_updates_per_batch(tmp_path, tiny_gpt2):
    model, tok = tiny_gpt2
    trainer = make_trainer(
        tmp_path / "run",
        policy=PolicyModel(model=model, tokenizer=tok),
        alpha=1.0,
        distillation_level="token",
        updates_per_batch=2,
        lr_scheduler="cosine",
        warmup_steps=1,
    )
    metrics = trainer.step()
    assert torch.isfinite(torch.tensor(metrics["loss"]))
    assert metrics["self_distillation/is_ratio_mean"] <= 2.0 + 1e-6
    assert trainer.scheduler.last_epoch == 2


def test_feedback_from_reward_model_reaches_teacher_prompt(tmp_path):
    class Feedbacky:
        name = "feedbacky"

        def __call__(self, prompts, completions, **columns):
            return [
                RewardOutput(0.0, feedback=f"error in attempt {i}") for i in range(len(completions))
            ]

    trainer = make_trainer(tmp_path / "run", reward=Feedbacky(), run__max_steps=1)
    trainer.step()
    contexts = trainer.last_contexts
    assert all(c is not None and c.used_feedback for c in contexts)
    assert "error in attempt 3" in contexts[3].prompt


def test_nonfinite_loss_skips_then_stops(tmp_path, monkeypatch):
    import sdpo.loss as loss_module
    from sdpo.trainer import NonFiniteLossError

    trainer = make_trainer(tmp_path / "run", run__max_steps=5, run__max_consecutive_nonfinite=2)
    model = trainer.policy.model
    real = loss_module.policy_terms

    def poisoned(*args, **kwargs):  # NaN reaches the loss through the real computation
        out = real(*args, **kwargs)
        out["logprobs"] = out["logprobs"] * float("nan")
        return out

    monkeypatch.setattr(loss_module, "policy_terms", poisoned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.warns(UserWarning, match="non-finite"):
        trainer.step()
    assert trainer.counters["skipped_nonfinite_steps"] == 1
    assert all(
        torch.equal(before[k], v) for k, v in model.state_dict().items()
    )  # no update applied
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"), pytest.warns(UserWarning):
        trainer.step()


def test_long_prompts_are_skipped_and_counted(tmp_path):
    rows = [{"prompt": "x" * 50}, {"prompt": "short"}]
    trainer = make_trainer(tmp_path / "run", rows=rows, max_prompt_length=20, run__max_steps=1)
    metrics = trainer.step()
    assert metrics["skipped_long_prompts"] == 1
    assert len(trainer.last_rollouts) == 4


def test_dataset_without_prompt_column_says_which_columns_it_found(tmp_path, tiny_llama):
    model, tok = tiny_llama
    with pytest.raises(KeyError, match=r"no 'prompt' column.*\['answer', 'question'\]"):
        SDPOTrainer(
            config=SDPOConfig(**TRAINER_DEFAULTS, run__output_dir=str(tmp_path / "run")),
            policy_model=PolicyModel(model=model, tokenizer=tok),
            reward_model=parity_reward,
            train_dataloader=[{"question": "1+1", "answer": "2"}],
        )


def test_jsonl_and_dataloader_sources(tmp_path, tiny_llama):
    from torch.utils.data import DataLoader

    model, tok = tiny_llama
    path = tmp_path / "train.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ROWS))
    policy = PolicyModel(model=model, tokenizer=tok)
    for source in (str(path), DataLoader(ROWS, batch_size=2, shuffle=False)):
        trainer = make_trainer(tmp_path / "run", rows=source, policy=policy, run__max_steps=1)
        trainer.step()
        assert len(trainer.last_rollouts) == 8
        assert trainer.last_rollouts.rows[0]["answer"] in {r["answer"] for r in ROWS}


def test_seed_usage_example_runs_as_written(tmp_path, monkeypatch):
    """The seed README's example, with a local model path instead of a hub id."""
    model, tok = make_tiny_llama()
    model_dir = tmp_path / "tiny-model"
    model.save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    dataloader = ROWS
    from sdpo import MathRewardModel

    config = SDPOConfig(
        model_name=str(model_dir),
        num_samples_per_prompt=4,
        self_distillation__success_reward_threshold=0.8,
        self_distillation__alpha=0.5,
        run__max_steps=1,
        run__output_dir=str(tmp_path / "seed-run"),
        run__progress_bar=False,
        generation__max_new_tokens=4,
    )
    policy_model = PolicyModel(config.model_name, device="cpu")
    reward_model = MathRewardModel()
    trainer = SDPOTrainer(
        config=config,
        policy_model=policy_model,
        reward_model=reward_model,
        train_dataloader=dataloader,
    )
    trainer.train()
    assert (tmp_path / "seed-run" / "checkpoint-000001" / "trainer_state.json").exists()


def test_missing_model_path_fails_at_once(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        PolicyModel(str(tmp_path / "nope"))
    with pytest.raises(FileNotFoundError, match="HF_HUB_OFFLINE"):
        PolicyModel("some-org/some-model-that-is-not-cached")


def test_pure_sdpo_step_without_any_teacher_context_is_a_no_op_not_a_crash(tmp_path, tiny_llama):
    # The paper's setting (PG term off) on a batch where nothing succeeded and no feedback came:
    # no term has a gradient; the step must pass without touching the weights.
    model, tok = tiny_llama
    before = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(
        tmp_path / "run",
        reward=lambda prompts, completions, **kw: [0.0] * len(completions),
        policy=PolicyModel(model=model, tokenizer=tok),
        policy_gradient__pg_loss_weight=0.0,
        policy_gradient__kl_penalty_weight=0.0,
        optimization__weight_decay=0.0,
    )
    metrics = trainer.step()
    assert metrics["grad_norm"] == 0.0
    assert metrics["self_distillation/distilled_token_fraction"] == 0.0
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_dr_grpo_divides_by_the_generation_budget_not_the_batch_width(tmp_path):
    """Dr. GRPO's normalizer is num_sequences x generation.max_new_tokens, a constant: padding the
    same rollouts with 20 empty columns must not change the gradient (it changed it ~4x)."""
    import dataclasses

    trainer = make_trainer(
        tmp_path / "run",
        reward=one_success_per_group,
        policy_gradient__loss_aggregation="dr_grpo",
    )
    model, tok, config = trainer.policy.model, trainer.policy.tokenizer, trainer.config
    rollouts, contexts = scored_batch(trainer)
    pad = torch.full((len(rollouts), 20), tok.pad_token_id, dtype=torch.long)
    padded = dataclasses.replace(
        rollouts,
        completion_ids=torch.cat([rollouts.completion_ids, pad], dim=1),
        completion_mask=torch.cat([rollouts.completion_mask, torch.zeros_like(pad)], dim=1),
    )
    grads = []
    for batch in (rollouts, padded):
        prepared = trainer.loss.prepare(batch, contexts)
        assert prepared["counts"]["max_completion_length"] == config.generation.max_new_tokens
        model.zero_grad(set_to_none=True)
        assert trainer.loss.backward(batch, prepared) is not None
        grads.append(_grads(model))
    for name, g in grads[0].items():
        torch.testing.assert_close(grads[1][name], g, rtol=1e-4, atol=1e-7, msg=name)


def test_nonfinite_gradient_with_finite_loss_is_skipped_and_counted(tmp_path, monkeypatch):
    """A NaN in one row of the LM-head gradient (the loss stays finite): no optimizer step, no EMA
    teacher update, the counter moves, and the bounded-skip rule still stops the run."""
    import sdpo.loss as loss_module
    from sdpo.trainer import NonFiniteLossError

    trainer = make_trainer(tmp_path / "run", run__max_steps=5, run__max_consecutive_nonfinite=2)
    model = trainer.policy.model
    real = loss_module.policy_terms

    def poison_row(grad):
        grad = grad.clone()
        grad[0] = float("nan")
        return grad

    def poisoned(*args, **kwargs):  # finite values, NaN in the backward only
        out = real(*args, **kwargs)
        if out["logprobs"].requires_grad:
            out["logprobs"].register_hook(poison_row)
        return out

    monkeypatch.setattr(loss_module, "policy_terms", poisoned)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in trainer.teacher.copy.state_dict().items()}
    with pytest.warns(UserWarning, match="non-finite gradient norm"):
        metrics = trainer.step()
    assert trainer.counters["skipped_nonfinite_steps"] == 1
    assert not math.isfinite(metrics["grad_norm"])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    teacher_after = trainer.teacher.copy.state_dict()
    assert all(torch.equal(teacher_before[k], v) for k, v in teacher_after.items())
    with pytest.raises(NonFiniteLossError, match="2 steps in a row"), pytest.warns(UserWarning):
        trainer.step()


def test_cpu_threads_default_to_one_for_small_models(tmp_path, tiny_llama):
    from sdpo.distributed import cpu_threads

    assert cpu_threads(0, 1_000_000) == 1
    assert cpu_threads(0, 135_000_000) is None  # PyTorch's default for real models
    assert cpu_threads(3, 1_000_000) == 3
    previous = torch.get_num_threads()
    model, tok = tiny_llama
    policy = PolicyModel(model=model, tokenizer=tok)
    try:
        torch.set_num_threads(2)
        # direct and positional (the seed API): the constructor itself sets the thread count
        config = SDPOConfig(**TRAINER_DEFAULTS, run__output_dir=str(tmp_path / "run"))
        SDPOTrainer(config, policy, parity_reward, ROWS)
        assert torch.get_num_threads() == 1
        config = SDPOConfig(
            **TRAINER_DEFAULTS, run__num_threads=2, run__output_dir=str(tmp_path / "r2")
        )
        SDPOTrainer(config, policy, parity_reward, ROWS)
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(previous)
