"""Dropout policy of the RL passes (sdpo.train_mode): dropout off by default, so old and new
log-probs see one network (ρ = 1 at the first reuse), a model passed in eval mode trains like one
in train mode, and gradient checkpointing still runs; ``model.dropout=true`` keeps dropout."""

from __future__ import annotations

import conftest
import pytest
import torch
from conftest import make_tiny_gpt2, make_tiny_llama, scored_batch

from sdpo import PolicyModel, SDPOTrainer

ROWS = [{"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in range(10, 12) for b in (20, 21)]


def one_success_per_group(prompts, completions, **columns):
    return [float(i % 4 == 0) for i in range(len(completions))]


def _model(arch: str, seed: int = 0):
    if arch == "gpt2":
        model, tok = make_tiny_gpt2(seed)
        model.config.resid_pdrop = model.config.embd_pdrop = model.config.attn_pdrop = 0.5
        torch.manual_seed(seed)
        model = type(model)(model.config)  # rebuilt so its nn.Dropout modules take p = 0.5
    else:
        model, tok = make_tiny_llama(seed)
        model.config.attention_dropout = 0.5
        for layer in model.model.layers:
            layer.self_attn.attention_dropout = 0.5
    return model, tok


DEFAULTS = dict(
    num_samples_per_prompt=4,
    generation__max_new_tokens=6,
    generation__min_new_tokens=6,
    optimization__prompts_per_step=2,
    optimization__micro_batch_size=8,
    optimization__updates_per_batch=2,
    policy_gradient__kl_penalty_weight=0.0,
    run__progress_bar=False,
)


def _trainer(tmp_path, arch="llama", train_mode=True, **overrides) -> SDPOTrainer:
    model, tok = _model(arch)
    model.train(train_mode)
    return conftest.make_trainer(
        tmp_path / "run",
        reward=one_success_per_group,
        rows=ROWS,
        policy=PolicyModel(model=model, tokenizer=tok),
        defaults=DEFAULTS,
        **overrides,
    )


def _loss(trainer: SDPOTrainer, rollouts, contexts):
    prepared = trainer.loss.prepare(rollouts, contexts)
    trainer.policy.model.zero_grad(set_to_none=True)
    sums = trainer.loss.backward(rollouts, prepared)
    grads = {
        n: p.grad.clone() for n, p in trainer.policy.model.named_parameters() if p.grad is not None
    }
    return trainer.loss.metrics(sums, prepared.counts), grads


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_dropout_off_old_and_new_logprobs_agree(tmp_path, arch):
    trainer = _trainer(tmp_path, arch)
    rollouts, contexts = scored_batch(trainer)
    assert any(c is not None for c in contexts)
    torch.manual_seed(1)
    first = trainer.loss.old_logprobs(rollouts)
    torch.manual_seed(2)
    assert torch.equal(trainer.loss.old_logprobs(rollouts), first)
    metrics, _ = _loss(trainer, rollouts, contexts)  # the first reuse: old log-probs vs new
    assert metrics["self_distillation/is_ratio_mean"] == pytest.approx(1.0, abs=1e-6)
    assert trainer.policy.model.training  # train mode, only the dropout is off


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_model_passed_in_eval_mode_trains_like_one_in_train_mode(tmp_path, arch):
    train = _trainer(tmp_path / "a", arch, train_mode=True)
    evalm = _trainer(tmp_path / "b", arch, train_mode=False)
    rollouts, contexts = scored_batch(train)
    a, ga = _loss(train, rollouts, contexts)
    b, gb = _loss(evalm, rollouts, contexts)
    assert a == b
    for name, g in ga.items():
        assert torch.equal(gb[name], g), name


def test_gradient_checkpointing_still_runs_without_dropout(tmp_path):
    plain = _trainer(tmp_path / "a")
    ckpt = _trainer(tmp_path / "b", model__gradient_checkpointing=True)
    layers = list(ckpt.policy.model.model.layers)
    assert all(layer.gradient_checkpointing and layer.training for layer in layers)
    assert not any(layer.self_attn.training for layer in layers)
    calls = []
    for layer in layers:
        inner = layer._gradient_checkpointing_func

        def counted(*args, _inner=inner, **kwargs):
            calls.append(1)
            return _inner(*args, **kwargs)

        layer._gradient_checkpointing_func = counted
    rollouts, contexts = scored_batch(plain)
    a, ga = _loss(plain, rollouts, contexts)
    b, gb = _loss(ckpt, rollouts, contexts)
    assert calls, "no layer was checkpointed"
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-5, abs=1e-7)
    assert ga.keys() == gb.keys()
    for name, g in ga.items():
        torch.testing.assert_close(gb[name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_model_dropout_true_keeps_dropout(tmp_path):
    trainer = _trainer(tmp_path, model__dropout=True)
    rollouts, _ = scored_batch(trainer)
    torch.manual_seed(1)
    first = trainer.loss.old_logprobs(rollouts)
    torch.manual_seed(2)
    assert not torch.equal(trainer.loss.old_logprobs(rollouts), first)
