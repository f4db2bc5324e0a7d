"""Method variants (sdpo.variants, docs/method.md): each against a float64 reference written here
with plain autograd, each neutral at its default, and the Eq. 3 advantage blend equal to the loss
blend where docs/method.md says it is."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import make_trainer, one_success_per_group, scored_batch

import sdpo.loss as loss_module
from sdpo import SDPOConfig
from sdpo.loss import MicroBatch, PreparedBatch
from sdpo.self_distillation import policy_terms

# ----- the library's path on hand-made logits --------------------------------------------------
# An identity LM head (H = V, W = I) makes the hidden states the logits, so the library's own
# policy_terms / modifiers / terms run on logits the reference below also sees.

B, L, V, G = 8, 5, 7, 4  # rows, tokens, vocabulary, group size (2 questions)


def _case(seed: int = 0, saturated: bool = False) -> dict:
    g = torch.Generator().manual_seed(seed)
    scale = 30.0 if saturated else 2.0  # saturated: near one-hot distributions, huge log-ratios
    zs = torch.randn(B, L, V, generator=g, dtype=torch.float64) * scale
    zt = torch.randn(B, L, V, generator=g, dtype=torch.float64) * scale
    ids = torch.randint(0, V, (B, L), generator=g)
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 3:] = False
    mask[6, 2:] = False
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0, 0.0, 0.0, 0.0])  # question 0: p=.5, 1: p=0
    has_teacher = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1], dtype=torch.bool)
    return dict(zs=zs, zt=zt, ids=ids, mask=mask, rewards=rewards, has_teacher=has_teacher)


def _advantages(rewards: torch.Tensor) -> torch.Tensor:
    r = rewards.double().view(-1, G)
    return ((r - r.mean(-1, keepdim=True)) / (r.std(-1, keepdim=True) + 1e-6)).view(-1)


def _library(case: dict, **overrides) -> tuple[float, torch.Tensor]:
    """(loss, d loss / d student logits) through sdpo.loss's modifiers and terms."""
    overrides = {
        "policy_gradient__kl_penalty_weight": 0.0,
        "self_distillation__alpha": 1.0,
        **overrides,
    }
    config = SDPOConfig(**overrides).validate()
    loss = SimpleNamespace(config=config)
    rollouts = SimpleNamespace(
        rewards=case["rewards"], group_ids=torch.arange(B // G).repeat_interleave(G)
    )
    batch = PreparedBatch(
        advantages=_advantages(case["rewards"]), distilled=case["has_teacher"].clone()
    )
    for modify in loss_module.BATCH_MODIFIERS:
        modify(loss, rollouts, batch)
    mask = case["mask"]
    batch.counts = {
        "num_tokens": float(mask.sum()),
        "num_sequences": float(B),
        "num_distilled": float(mask[batch.distilled].sum()),
        "max_completion_length": float(L),
    }
    zs = case["zs"].clone().requires_grad_(True)
    eye = torch.eye(V, dtype=torch.float64)
    dmask = batch.distilled.unsqueeze(-1).expand_as(mask)
    head = policy_terms(
        zs[mask], eye, case["ids"][mask], teacher_hidden=case["zt"][mask], teacher_weight=eye,
        distill_mask=dmask[mask], alpha=config.self_distillation.alpha,
        level=config.self_distillation.distillation_level,
    )  # fmt: skip
    logprobs = torch.zeros(B, L, dtype=torch.float64).masked_scatter(mask, head["logprobs"])
    dw = None
    if batch.distill_weights is not None:
        dw = batch.distill_weights.double().unsqueeze(-1).expand_as(mask)[mask]
    mb = MicroBatch(
        idx=torch.arange(B), prompt_ids=None, prompt_mask=None, completion_ids=case["ids"],
        completion_mask=mask.double(), mask=mask, hidden=zs, head=head, logprobs=logprobs,
        old_logprobs=logprobs.detach(), advantages=batch.advantages, distill_mask=dmask[mask],
        distilled=bool(batch.distilled.any()), reused=False, counts=batch.counts,
        distill_weights=dw,
    )  # fmt: skip
    for modify in loss_module.TOKEN_MODIFIERS:
        modify(loss, mb)
    total = zs.new_zeros(())
    for term in loss_module.TERMS:
        if term.weight(config) > 0:
            out = term.fn(loss, mb)
            if out is not None:
                total = total + term.weight(config) * out[0]
    total.backward()
    return float(total.detach()), zs.grad


# ----- the float64 references (no sdpo code) ----------------------------------------------------


def _reference(case: dict, variant: str, **p) -> tuple[float, torch.Tensor]:
    """Plain autograd: reverse-KL distillation (alpha = 1) plus on-policy token-mean PG."""
    zs = case["zs"].clone().requires_grad_(True)
    mask, ids, r = case["mask"], case["ids"], case["rewards"]
    log_s, log_t = zs.log_softmax(-1), case["zt"].log_softmax(-1)
    lp = log_s.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    lq = log_t.gather(-1, ids.unsqueeze(-1)).squeeze(-1)
    kl = (log_s.exp() * (log_s - log_t)).sum(-1)  # [B, L] KL(student || teacher)
    ratio = torch.exp(lp - lp.detach())  # on policy: 1, with the PG gradient
    p_hat = (r >= 1.0).double().view(-1, G).mean(-1).repeat_interleave(G)
    a = (r - r.view(-1, G).mean(-1).repeat_interleave(G)) / (
        r.view(-1, G).std(-1).repeat_interleave(G) + 1e-6
    )
    a = a.double()
    teacher = case["has_teacher"].clone()
    n_tok = mask.sum()
    m = mask.double()
    pg_w = p.get("pg_weight", 1.0)
    if variant == "advantage_clip":
        a = a.clamp(-p["c"], p["c"])
    if variant == "routing":
        teacher = teacher & (r < 1.0)
    rows = teacher.double().unsqueeze(-1) * m  # distilled tokens
    n_d = rows.sum()
    div = kl
    if variant == "divergence_clip":
        div = torch.minimum(kl, torch.full_like(kl, p["c"]))
    w = torch.ones(B, dtype=torch.float64)
    if variant == "pass_rate":
        w = (p_hat * (1 - p_hat)).sqrt()
    gate = torch.ones_like(kl)
    if variant == "entropy_gate":
        entropy = -(log_s.exp() * log_s).sum(-1)
        gate = (entropy <= p["h"]).double()
    distill = (div * rows * gate * w.unsqueeze(-1)).sum() / n_d
    adv = a.unsqueeze(-1).expand(B, L)
    if variant == "rlsd":
        mag = torch.exp(torch.sign(adv) * (lq - lp.detach())).clamp(max=p["c"])
        adv = adv * torch.where(rows.bool(), mag, torch.ones_like(mag))
    if variant == "blend":
        adv = p["lam"] * adv + (1 - p["lam"]) * (lq - lp.detach()) * rows
    pg = -(ratio * adv * m).sum() / n_tok
    if variant == "routing":
        pg = -(ratio * adv * m * (1 - rows)).sum() / n_tok
        total = p["wd"] * (pg + distill)
    elif variant in ("rlsd", "blend"):
        total = pg_w * pg
    else:
        total = pg_w * pg + distill
    total.backward()
    return float(total.detach()), zs.grad


VARIANTS = [
    ("advantage_clip", {"policy_gradient__advantage_clip": 0.5}, {"c": 0.5}),
    ("divergence_clip", {"self_distillation__divergence_clip": 0.3}, {"c": 0.3}),
    ("pass_rate", {"self_distillation__pass_rate_weighting": True}, {}),
    ("entropy_gate", {"self_distillation__entropy_gate": 0.5}, {"h": 0.5}),
    (
        "routing",
        {
            "self_distillation__routing": "correctness",
            "self_distillation__distillation_weight": 0.7,
            "policy_gradient__pg_loss_weight": 0.0,
        },
        {"wd": 0.7},
    ),  # fmt: skip
    (
        "rlsd",
        {"policy_gradient__rlsd_max_weight": 2.0, "self_distillation__distillation_weight": 0.0},
        {"c": 2.0},
    ),
    (
        "blend",
        {"policy_gradient__advantage_blend": 0.9, "self_distillation__distillation_weight": 0.0},
        {"lam": 0.9},
    ),
]


@pytest.mark.parametrize("saturated", [False, True])
@pytest.mark.parametrize("variant,overrides,params", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_variant_matches_float64_reference(variant, overrides, params, saturated):
    case = _case(seed=3, saturated=saturated)
    got, grad = _library(case, **overrides)
    want, want_grad = _reference(case, variant, **params)
    assert got == pytest.approx(want, rel=1e-9, abs=1e-9)
    torch.testing.assert_close(grad, want_grad, rtol=1e-7, atol=1e-10)
    # and the variant changes something (the test would pass on a no-op otherwise)
    base, base_grad = _reference(case, "plain")
    assert not torch.allclose(grad, base_grad, rtol=1e-4, atol=1e-8)


def test_plain_sdpo_matches_the_reference_too():
    """The harness itself: with no variant, plain reverse-KL SDPO + PG."""
    case = _case(seed=5)
    got, grad = _library(case)
    want, want_grad = _reference(case, "plain")
    assert got == pytest.approx(want, rel=1e-9)
    torch.testing.assert_close(grad, want_grad, rtol=1e-7, atol=1e-10)


# ----- neutral settings: plain SDPO, bit for bit, on a real trainer ------------------------------


def _step(tmp_path, name, **overrides):
    trainer = make_trainer(tmp_path / name, reward=one_success_per_group, **overrides)
    torch.manual_seed(0)
    rollouts, contexts = scored_batch(trainer)
    prepared = trainer.loss.prepare(rollouts, contexts)
    trainer.policy.model.zero_grad(set_to_none=True)
    sums = trainer.loss.backward(rollouts, prepared)
    grads = {
        n: p.grad.clone() for n, p in trainer.policy.model.named_parameters() if p.grad is not None
    }
    return trainer.loss.metrics(sums, prepared.counts), grads


NEUTRAL = [
    {"policy_gradient__advantage_clip": 1e30},
    {"self_distillation__divergence_clip": 1e30},
    {"self_distillation__entropy_gate": 1e30},
    {"policy_gradient__advantage_blend": 1.0},
]


@pytest.mark.parametrize("neutral", NEUTRAL, ids=lambda d: next(iter(d)))
def test_neutral_setting_is_plain_sdpo_bitwise(tmp_path, neutral):
    base, base_grads = _step(tmp_path, "base")
    got, grads = _step(tmp_path, "variant", **neutral)
    assert got["loss"] == base["loss"]
    assert grads.keys() == base_grads.keys()
    for name, g in base_grads.items():
        assert torch.equal(grads[name], g), name


def test_the_registered_variants_are_no_ops_at_their_defaults(tmp_path, monkeypatch):
    """The defaults run every registered modifier; they must change nothing at all."""
    base, base_grads = _step(tmp_path, "with")
    monkeypatch.setattr(loss_module, "BATCH_MODIFIERS", [])
    monkeypatch.setattr(loss_module, "TOKEN_MODIFIERS", [])
    got, grads = _step(tmp_path, "without")
    assert got == {k: got[k] for k in base} and got["loss"] == base["loss"]
    for name, g in base_grads.items():
        assert torch.equal(grads[name], g), name


# ----- Eq. 3: the advantage blend equals the loss blend -----------------------------------------


def test_advantage_blend_equals_the_loss_blend_when_every_row_is_distilled(tmp_path):
    """On policy, token_mean: pg·L_pg(A_GRPO·λ-blend) == λ·L_pg + w_d·L_sd(token level, α = 1)
    with w_d = (1 − λ)·N_distilled / N_tokens (docs/method.md)."""
    lam = 0.9
    common = dict(
        self_distillation__distillation_level="token",
        self_distillation__alpha=1.0,
        policy_gradient__kl_penalty_weight=0.0,
        policy_gradient__loss_aggregation="token_mean",
        self_distillation__is_clip=None,
    )
    blend, blend_grads = _step(
        tmp_path, "blend", policy_gradient__advantage_blend=lam,
        self_distillation__distillation_weight=0.0, **common,
    )  # fmt: skip
    trainer = make_trainer(
        tmp_path / "mix", reward=one_success_per_group, policy_gradient__pg_loss_weight=lam,
        **common,
    )  # fmt: skip
    torch.manual_seed(0)
    rollouts, contexts = scored_batch(trainer)
    prepared = trainer.loss.prepare(rollouts, contexts)
    counts = prepared.counts
    assert 0 < counts["num_distilled"] < counts["num_tokens"]  # the normalizers differ here
    trainer.config.self_distillation.distillation_weight = (
        (1 - lam) * counts["num_distilled"] / counts["num_tokens"]
    )
    trainer.policy.model.zero_grad(set_to_none=True)
    trainer.loss.backward(rollouts, prepared)
    for name, g in blend_grads.items():
        got = dict(trainer.policy.model.named_parameters())[name].grad
        torch.testing.assert_close(got, g, rtol=1e-5, atol=1e-8, msg=name)


# ----- config errors ------------------------------------------------------------------------------


def test_bad_variant_settings_name_the_key():
    with pytest.raises(ValueError, match="divergence_clip"):
        SDPOConfig(self_distillation__divergence_clip=1.0, self_distillation__distillation_level="token",
                   self_distillation__alpha=1.0).validate()  # fmt: skip
    with pytest.raises(ValueError, match="routing"):
        SDPOConfig(self_distillation__routing="correctness",
                   self_distillation__distillation_weight=0.0).validate()  # fmt: skip
    with pytest.raises(ValueError, match="contrastive_weight.*fsdp"):
        SDPOConfig(
            self_distillation__contrastive_weight=1.0, distributed__strategy="fsdp"
        ).validate()
    with pytest.raises(ValueError, match="advantage_blend"):
        SDPOConfig(policy_gradient__advantage_blend=1.5).validate()


# ----- the contrastive teacher ---------------------------------------------------------------------


@pytest.mark.parametrize("saturated", [False, True])
def test_contrastive_head_matches_float64_reference(saturated):
    from sdpo.variants import contrastive_head

    g = torch.Generator().manual_seed(11)
    scale = 20.0 if saturated else 1.0
    n, h, v, gamma = 6, 5, 9, 0.7
    ht, hc, hs = (torch.randn(n, h, generator=g, dtype=torch.float64) * scale for _ in range(3))
    wt, ws = (torch.randn(v, h, generator=g, dtype=torch.float64) for _ in range(2))
    bt, bs = (torch.randn(v, generator=g, dtype=torch.float64) for _ in range(2))
    hidden, weight, bias = contrastive_head(ht, wt, bt, hc, hs, ws, bs, gamma)
    got = (hidden @ weight.T + bias).log_softmax(-1)
    # q~ ∝ q(x') · (π(x) / q(c))^γ, from three separately normalized distributions
    log_q, log_c = (ht @ wt.T + bt).log_softmax(-1), (hc @ wt.T + bt).log_softmax(-1)
    log_pi = (hs @ ws.T + bs).log_softmax(-1)
    want = (log_q + gamma * (log_pi - log_c)).log_softmax(-1)
    torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("saturated", [False, True])
def test_contrastive_head_is_the_plain_teacher_on_rows_without_a_demonstration(saturated):
    """Inactive rows (no demonstration: no contrast pass) must get exactly q(x'), biases included."""
    from sdpo.variants import contrastive_head

    g = torch.Generator().manual_seed(12)
    scale = 20.0 if saturated else 1.0
    b, t, h, v, gamma = 3, 4, 5, 9, 1.0
    ht, hc, hs = (torch.randn(b, t, h, generator=g, dtype=torch.float64) * scale for _ in range(3))
    wt, ws = (torch.randn(v, h, generator=g, dtype=torch.float64) for _ in range(2))
    bt, bs = (torch.randn(v, generator=g, dtype=torch.float64) for _ in range(2))
    active = torch.tensor([[True], [False], [True]])
    for biases in ((bt, bs), (None, bs), (bt, None), (None, None)):
        hidden, weight, bias = contrastive_head(
            ht, wt, biases[0], hc, hs, ws, biases[1], gamma, active
        )
        got = (hidden @ weight.T + (0.0 if bias is None else bias)).log_softmax(-1)
        tb = torch.zeros(v, dtype=torch.float64) if biases[0] is None else biases[0]
        sb = torch.zeros(v, dtype=torch.float64) if biases[1] is None else biases[1]
        log_q, log_c = (ht @ wt.T + tb).log_softmax(-1), (hc @ wt.T + tb).log_softmax(-1)
        log_pi = (hs @ ws.T + sb).log_softmax(-1)
        contrasted = (log_q + gamma * (log_pi - log_c)).log_softmax(-1)
        want = torch.where(active[..., None], contrasted, log_q)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)


def test_contrast_context_is_the_demonstration_alone(tmp_path):
    """Feedback is the information SDPO distils, not a leak: a feedback-only row gets no contrast
    pass, and a demonstration row's contrast context holds neither the question nor the feedback
    (dividing out what the feedback explains drove arithmetic_hard to 3/3 collapses)."""
    from sdpo.reprompting import Reprompter

    config = SDPOConfig(
        self_distillation__contrastive_weight=1.0,
        self_distillation__environment_feedback_only_without_solution=False,
    ).validate()
    reprompter = Reprompter(config.self_distillation)
    prompts = ["Q: 2+3=", "Q: 2+3=", "Q: 7+1=", "Q: 7+1="]
    contexts = reprompter.build(
        prompts, ["5", "6", "9", "7"], [1.0, 0.0, 0.0, 0.0], [0, 0, 1, 1],
        [None, "FEEDBACK-A too big", "FEEDBACK-B too big", "FEEDBACK-C too small"],
    )  # fmt: skip
    with_demo, feedback_only = contexts[1], contexts[2]
    assert with_demo.demonstration_index == 0 and "FEEDBACK-A" in with_demo.prompt
    assert with_demo.contrast_prompt is not None and "5" in with_demo.contrast_prompt
    assert "Q: 2+3=" not in with_demo.contrast_prompt
    assert "FEEDBACK" not in with_demo.contrast_prompt
    assert feedback_only.demonstration_index is None and feedback_only.contrast_prompt is None


def test_contrastive_teacher_runs_a_question_free_pass_and_changes_the_target(tmp_path):
    base, base_grads = _step(tmp_path, "base")
    trainer = make_trainer(
        tmp_path / "c", reward=one_success_per_group, self_distillation__contrastive_weight=1.0
    )
    torch.manual_seed(0)
    rollouts, contexts = scored_batch(trainer)
    calls = []
    hidden = trainer.teacher.hidden

    def counting(ids, *args):
        calls.append(ids)
        return hidden(ids, *args)

    trainer.teacher.hidden = counting
    prepared = trainer.loss.prepare(rollouts, contexts)
    for i, ctx in enumerate(contexts):
        if ctx is not None and ctx.demonstration_index is not None:
            assert (
                rollouts.prompts[i] in ctx.prompt and rollouts.prompts[i] not in ctx.contrast_prompt
            )
            assert ctx.contrast_prompt == ctx.prompt.replace(rollouts.prompts[i], "", 1)
    trainer.policy.model.zero_grad(set_to_none=True)
    metrics = trainer.loss.metrics(trainer.loss.backward(rollouts, prepared), prepared.counts)
    assert len(calls) == 2  # one micro-batch: the teacher pass and the question-free pass
    assert metrics["loss"] != base["loss"] and torch.isfinite(torch.tensor(metrics["loss"]))


def test_every_variant_at_once_trains_two_steps_and_logs_its_metrics(tmp_path):
    import json

    trainer = make_trainer(
        tmp_path / "run",
        reward=one_success_per_group,
        self_distillation__teacher="gated",
        self_distillation__gated_window=1,
        self_distillation__routing="correctness",
        self_distillation__pass_rate_weighting=True,
        self_distillation__divergence_clip=5.0,
        self_distillation__contrastive_weight=0.5,
        self_distillation__success_memory_steps=3,
        self_distillation__copy_rate_ngram=2,
        policy_gradient__advantage_clip=5.0,
        policy_gradient__rlsd_max_weight=2.0,
        policy_gradient__advantage_blend=0.9,
    )
    trainer.train()
    logged = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in logged if "loss" in r]
    assert len(steps) == 2 and all(torch.isfinite(torch.tensor(r["loss"])) for r in steps)
    for key in ("teacher/refreshes", "teacher/age", "routing/policy_loss",
                "self_distillation/copy_rate", "self_distillation/memory_demonstration_fraction"):  # fmt: skip
        assert all(key in r for r in steps), key


def test_routing_and_question_weights_follow_the_runs_success_rule():
    """With several reward functions the trainer judges success by ``success_scores``, not the
    weighted reward: routing and SC-SDPO must use the same rule."""
    from sdpo.variants import pass_rate_weights, route_by_correctness

    config = SDPOConfig(
        self_distillation__routing="correctness", self_distillation__pass_rate_weighting=True
    ).validate()
    loss = SimpleNamespace(config=config)
    rollouts = SimpleNamespace(
        rewards=torch.ones(4),  # every weighted reward passes the threshold...
        success_scores=[1.0, 0.0, 0.0, 0.0],  # ...but the success rule passes one row
        group_ids=torch.zeros(4, dtype=torch.long),
    )
    batch = PreparedBatch(advantages=torch.zeros(4), distilled=torch.ones(4, dtype=torch.bool))
    route_by_correctness(loss, rollouts, batch)
    pass_rate_weights(loss, rollouts, batch)
    assert batch.distilled.tolist() == [False, True, True, True]
    torch.testing.assert_close(batch.distill_weights, torch.full((4,), (0.25 * 0.75) ** 0.5))
