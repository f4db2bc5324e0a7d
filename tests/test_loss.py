"""The loss component's seams (sdpo.loss): a new term, a per-token modifier and a per-sequence
modifier each enter the loss where the docstring says, and FSDP's lockstep helper."""

from __future__ import annotations

import pytest
import torch
from conftest import make_trainer, one_success_per_group, scored_batch

import sdpo.loss as loss_module
from sdpo.loss import Lockstep, Term

DISTILL_ONLY = dict(
    policy_gradient__pg_loss_weight=0.0,
    policy_gradient__kl_penalty_weight=0.0,
    generation__min_new_tokens=6,
)


def _run(trainer, rollouts, contexts):
    """(metrics, gradients, prepared batch) of one backward over the step's batch."""
    prepared = trainer.loss.prepare(rollouts, contexts)
    trainer.policy.model.zero_grad(set_to_none=True)
    sums = trainer.loss.backward(rollouts, prepared)
    grads = {
        n: p.grad.clone() for n, p in trainer.policy.model.named_parameters() if p.grad is not None
    }
    return trainer.loss.metrics(sums, prepared.counts), grads, prepared


@pytest.fixture
def batch(tmp_path):
    trainer = make_trainer(tmp_path / "run", reward=one_success_per_group, **DISTILL_ONLY)
    rollouts, contexts = scored_batch(trainer)
    assert any(c is not None for c in contexts)
    return trainer, rollouts, contexts


def test_a_token_modifier_scales_the_distillation_term(batch, monkeypatch):
    trainer, rollouts, contexts = batch
    base, base_grads, _ = _run(trainer, rollouts, contexts)
    assert base["self_distillation/distillation_loss"] > 0 and base_grads

    def double(loss, mb):  # x2 is exact in floating point: the result must be exactly 2x
        mb.distill_weights = torch.full_like(mb.head["divergence"], 2.0)

    monkeypatch.setattr(loss_module, "TOKEN_MODIFIERS", [double])
    got, grads, _ = _run(trainer, rollouts, contexts)
    assert got["loss"] == 2 * base["loss"]
    assert grads.keys() == base_grads.keys()
    for name, g in base_grads.items():
        torch.testing.assert_close(grads[name], 2 * g, rtol=1e-6, atol=1e-12, msg=name)


def test_a_batch_modifier_routes_rows_out_of_distillation(batch, monkeypatch):
    trainer, rollouts, contexts = batch
    distilled = [i for i, c in enumerate(contexts) if c is not None]
    keep = distilled[0]

    def route(loss, rollouts, prepared):  # distil one row only
        prepared.distilled[:] = False
        prepared.distilled[keep] = True

    monkeypatch.setattr(loss_module, "BATCH_MODIFIERS", [route])
    metrics, grads, prepared = _run(trainer, rollouts, contexts)
    assert list(prepared.teacher_prompts) == [keep]
    assert prepared.counts["num_distilled"] == float(rollouts.completion_mask[keep].sum())
    assert metrics["self_distillation/distillation_loss"] > 0 and grads

    def route_all(loss, rollouts, prepared):
        prepared.distilled[:] = False

    monkeypatch.setattr(loss_module, "BATCH_MODIFIERS", [route_all])
    metrics, grads, prepared = _run(trainer, rollouts, contexts)
    assert prepared.teacher_prompts == {} and prepared.counts["num_distilled"] == 0
    assert metrics["loss"] == 0.0 and not grads  # nothing had a signal: no backward


def test_per_sequence_distillation_weights_reach_the_tokens(batch, monkeypatch):
    trainer, rollouts, contexts = batch
    base, base_grads, _ = _run(trainer, rollouts, contexts)

    def weigh(loss, rollouts, prepared):
        prepared.distill_weights = torch.full((len(rollouts),), 0.5)

    monkeypatch.setattr(loss_module, "BATCH_MODIFIERS", [weigh])
    got, grads, _ = _run(trainer, rollouts, contexts)
    assert got["loss"] == 0.5 * base["loss"]
    for name, g in base_grads.items():
        torch.testing.assert_close(grads[name], 0.5 * g, rtol=1e-6, atol=1e-12, msg=name)


def test_a_registered_term_is_added_with_its_config_weight(tmp_path, monkeypatch):
    """A new term: mean sampled-token log-prob, weight 0.25. The loss is the old terms plus it,
    and by linearity the gradient is the old one plus the term alone's."""

    def mean_logprob(loss, mb):
        value = -(mb.logprobs * mb.completion_mask).sum() / mb.counts["num_tokens"]
        return value, {"mean_logprob": float(value.detach())}

    term = Term("mean_logprob", lambda config: 0.25, mean_logprob)
    runs = {}
    for name, terms in (
        ("base", loss_module.TERMS),
        ("with", [*loss_module.TERMS, term]),
        ("alone", [term]),
    ):
        monkeypatch.setattr(loss_module, "TERMS", terms)
        trainer = make_trainer(tmp_path / name, reward=one_success_per_group)
        torch.manual_seed(0)
        rollouts, contexts = scored_batch(trainer)
        runs[name] = _run(trainer, rollouts, contexts)
    base, with_term, alone = (runs[k][0] for k in ("base", "with", "alone"))
    assert "mean_logprob" not in base
    assert alone["loss"] == pytest.approx(0.25 * with_term.get("mean_logprob", float("nan")))
    assert with_term["loss"] == pytest.approx(base["loss"] + alone["loss"], rel=1e-6)
    for name, g in runs["base"][1].items():
        want = g + runs["alone"][1][name]
        torch.testing.assert_close(runs["with"][1][name], want, rtol=1e-5, atol=1e-7, msg=name)


def test_lockstep_runs_unused_passes_and_touches_every_block_only_when_active():
    hidden = torch.randn(2, 3, requires_grad=True)
    loss = hidden.new_zeros(())
    calls = []
    Lockstep(False).unused_pass(lambda: calls.append(1))
    assert not calls and Lockstep(False).touch(loss, hidden) is loss
    Lockstep(True).unused_pass(lambda: calls.append(1))
    assert calls == [1]
    touched = Lockstep(True).touch(loss, hidden)
    touched.backward()
    assert touched.item() == 0.0 and torch.equal(hidden.grad, torch.zeros(2, 3))
