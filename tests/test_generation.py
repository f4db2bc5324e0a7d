"""Generation backends and the train/inference mismatch correction (no vLLM needed here).

The trainer-level test gives the trainer a real sampler whose reported log-probs disagree with the
trainer's (the hf sampler, reporting each token's log-prob at another temperature) and checks the
step's gradient against an independent float64 computation of the weighted loss.
"""

from __future__ import annotations

import copy
import math
import sys

import pytest
import torch
from conftest import make_trainer, scored_batch

from sdpo import PolicyModel, SDPOConfig
from sdpo.config import GenerationConfig
from sdpo.generation import (
    Completions,
    HFBackend,
    build_backend,
    iter_full_weights,
    mismatch_weights,
    vllm_logprobs_mode,
)

# ----- the weighting math ---------------------------------------------------------------------


def reference_weights(train, sampler, mask, level, cap):
    """Plain-Python float64 loops: the definition, independently of the tensor code."""
    out = []
    for tr, sa, m in zip(train.tolist(), sampler.tolist(), mask.tolist(), strict=True):
        if level == "none":
            out.append([1.0] * len(tr))
            continue
        if level == "sequence":
            total = sum(a - b for a, b, k in zip(tr, sa, m, strict=True) if k)
            w = min(math.exp(max(min(total, 20.0), -20.0)), cap)
            out.append([w if k else 1.0 for k in m])
        else:
            out.append(
                [
                    min(math.exp(max(min(a - b, 20.0), -20.0)), cap) if k else 1.0
                    for a, b, k in zip(tr, sa, m, strict=True)
                ]
            )
    return torch.tensor(out, dtype=torch.float64)


@pytest.mark.parametrize("level", ["token", "sequence", "none"])
@pytest.mark.parametrize(
    "scale", [0.05, 3.0, 40.0]
)  # near-agreement, capped, saturated (±20 clamp)
def test_mismatch_weights_match_float64_reference(level, scale):
    g = torch.Generator().manual_seed(0)
    train = -torch.rand(5, 7, generator=g, dtype=torch.float64) * 4
    sampler = train + torch.randn(5, 7, generator=g, dtype=torch.float64) * scale
    mask = torch.rand(5, 7, generator=g) > 0.3
    mask[0] = False  # a row with no tokens
    got = mismatch_weights(train.float(), sampler.float(), mask, level=level, cap=2.0)
    ref = reference_weights(train.float().double(), sampler.float().double(), mask, level, 2.0)
    torch.testing.assert_close(got.double(), ref, rtol=1e-5, atol=1e-7)
    assert not got.requires_grad
    if level != "none" and scale >= 3.0:
        assert (got[mask] == 2.0).any() and (got[mask] < 1.0).any()


def test_mismatch_weights_are_detached_and_reject_unknown_level():
    train = torch.zeros(2, 3, requires_grad=True)
    w = mismatch_weights(train, torch.full((2, 3), -0.5), torch.ones(2, 3), level="token")
    assert not w.requires_grad
    torch.testing.assert_close(w, torch.full((2, 3), math.exp(0.5)))
    with pytest.raises(ValueError, match="not one of"):
        mismatch_weights(train, train, torch.ones(2, 3), level="tokens")


# ----- which log-probs vLLM reports (no engine needed: its two modes emulated in float64) --------


def emulated_vllm_logprobs(logits, mode, temperature, top_k, top_p):
    """vLLM's reported log-probs ``[n, V]`` from ``logits`` ``[n, V]`` (float64): ``raw_logprobs``
    = log softmax(z), before temperature and filters; ``processed_logprobs`` = log softmax of
    z / T over the tokens top-k then top-p keep (the smallest set whose sorted mass reaches p)."""
    if mode == "raw_logprobs":
        return logits.log_softmax(-1)
    z = logits / temperature
    keep = torch.zeros_like(z, dtype=torch.bool)
    for i in range(z.shape[0]):
        order = z[i].argsort(descending=True).tolist()
        if top_k:
            order = order[:top_k]
        mass = 0.0
        for j, pj in zip(order, z[i, order].softmax(-1).tolist(), strict=True):
            keep[i, j] = True
            mass += pj
            if mass >= top_p:
                break
    return z.masked_fill(~keep, float("-inf")).log_softmax(-1)


def _one_sampled_row(temperature, top_k, top_p, n=400, vocab=50):
    """Logits of one n-token row, the tokens a truncated sampler drew, and the trainer's
    log-probs (untruncated, at T) of them: the same weights on both sides."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(n, vocab, generator=g, dtype=torch.float64) * 3
    probs = emulated_vllm_logprobs(logits, "processed_logprobs", temperature, top_k, top_p).exp()
    tokens = torch.multinomial(probs, 1, generator=g)
    train = (logits / temperature).log_softmax(-1).gather(-1, tokens)[:, 0]
    return logits, tokens, train


def _reported(logits, tokens, mode, temperature, top_k, top_p):
    lp = emulated_vllm_logprobs(logits, mode, temperature, top_k, top_p)
    return lp.gather(-1, tokens)[:, 0]


@pytest.mark.parametrize(("top_k", "top_p"), [(0, 0.95), (20, 1.0), (20, 0.9)])
@pytest.mark.parametrize("level", ["token", "sequence"])
def test_identical_weights_give_weight_one_with_top_p_and_top_k(top_k, top_p, level):
    # Audit R4: with the truncated (processed) log-probs, log π_train − log π_sampler = log Z_t < 0
    # on every token even for identical weights; a 400-token row's sequence weight collapsed.
    generation = GenerationConfig(top_p=top_p, top_k=top_k, vllm_is_correction=level)
    mode = vllm_logprobs_mode(generation)
    logits, tokens, train = _one_sampled_row(1.0, top_k, top_p)
    sampler = _reported(logits, tokens, mode, 1.0, top_k, top_p)
    mask = torch.ones(1, len(tokens), dtype=torch.bool)
    w = mismatch_weights(train.float()[None], sampler.float()[None], mask, level=level)
    torch.testing.assert_close(w, torch.ones_like(w), rtol=0, atol=1e-4)
    # What the processed log-probs gave: every token scaled down by its kept mass.
    processed = _reported(logits, tokens, "processed_logprobs", 1.0, top_k, top_p)
    w_old = mismatch_weights(train.float()[None], processed.float()[None], mask, level=level)
    assert float(w_old.min()) < 0.99


def test_vllm_logprobs_mode_by_setting():
    assert vllm_logprobs_mode(GenerationConfig(temperature=0.7)) == "processed_logprobs"
    assert vllm_logprobs_mode(GenerationConfig(top_p=0.95)) == "raw_logprobs"
    assert vllm_logprobs_mode(GenerationConfig()) == "raw_logprobs"  # T = 1: raw = trainer's
    # No truncation at T != 1: the processed log-probs are the trainer's (weight 1).
    logits, tokens, train = _one_sampled_row(0.7, 0, 1.0)
    sampler = _reported(logits, tokens, "processed_logprobs", 0.7, 0, 1.0)
    w = mismatch_weights(train[None], sampler[None], torch.ones(1, len(tokens)), level="sequence")
    torch.testing.assert_close(w, torch.ones_like(w), rtol=0, atol=1e-9)
    # Truncation at T != 1: no mode is right; refused unless the correction is off.
    for level in ("token", "sequence"):
        with pytest.raises(ValueError, match="vllm_is_correction = none"):
            vllm_logprobs_mode(
                GenerationConfig(temperature=0.7, top_p=0.95, vllm_is_correction=level)
            )
    none = GenerationConfig(temperature=0.7, top_k=20, vllm_is_correction="none")
    assert vllm_logprobs_mode(none) == "processed_logprobs"


# ----- backends --------------------------------------------------------------------------------


def test_hf_backend_is_the_policy_sampler(tiny_llama):
    model, tok = tiny_llama
    policy = PolicyModel(model=model, tokenizer=tok)
    config = SDPOConfig(generation__max_new_tokens=5)
    prompts = [policy.encode_prompt("Q: 1+2="), policy.encode_prompt("Q: 10+20=")]
    torch.manual_seed(3)
    expected = policy.generate(prompts, 3, config.generation)
    backend = build_backend(config.generation, policy)
    assert isinstance(backend, HFBackend)
    torch.manual_seed(3)
    out = backend.generate(prompts, 3)
    for a, b in zip(
        expected,
        (out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask),
        strict=True,
    ):
        assert torch.equal(a, b)
    assert out.sampler_logprobs is None


def test_vllm_backend_without_vllm_says_how_to_install(tiny_llama, monkeypatch):
    model, tok = tiny_llama
    monkeypatch.setitem(sys.modules, "vllm", None)  # `import vllm` raises ImportError
    config = SDPOConfig(generation__backend="vllm")
    with pytest.raises(ImportError, match=r"sdpo\[vllm\].*generation.backend = 'hf'"):
        build_backend(config.generation, PolicyModel(model=model, tokenizer=tok))


def test_unknown_backend_is_a_config_error():
    with pytest.raises(ValueError, match="generation.backend"):
        SDPOConfig(generation__backend="sglang")


def test_iter_full_weights_casts_one_tensor_at_a_time(tiny_llama):
    model, _ = tiny_llama
    pushed = list(iter_full_weights(model, torch.bfloat16))
    names = [n for n, _ in model.named_parameters()]
    assert [n for n, _ in pushed] == names
    for (_, t), p in zip(pushed, model.parameters(), strict=True):
        assert t.dtype == torch.bfloat16 and torch.equal(t, p.detach().to(torch.bfloat16))


# ----- the trainer applies the weights ---------------------------------------------------------


class TemperedLogprobBackend(HFBackend):
    """The hf sampler, reporting each sampled token's log-prob at ``report_temperature`` instead of
    the training temperature: a real sampler whose log-probs disagree with the trainer's."""

    def __init__(self, policy, generation, report_temperature: float) -> None:
        super().__init__(policy, generation)
        self.report_temperature = report_temperature

    @torch.no_grad()
    def generate(self, prompt_ids, num_samples, *, greedy=False):
        out = super().generate(prompt_ids, num_samples, greedy=greedy)
        ids = torch.cat([out.prompt_ids, out.completion_ids], 1)
        mask = torch.cat([out.prompt_mask, out.completion_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.policy.model(
            input_ids=ids, attention_mask=mask, position_ids=positions
        ).logits
        p, n = out.prompt_ids.shape[1], out.completion_ids.shape[1]
        logp = (logits[:, p - 1 : p - 1 + n].float() / self.report_temperature).log_softmax(-1)
        lp = logp.gather(-1, out.completion_ids.unsqueeze(-1)).squeeze(-1) * out.completion_mask
        return Completions(
            out.prompt_ids, out.prompt_mask, out.completion_ids, out.completion_mask, lp
        )


class ReferenceLoss:
    """pg + distillation (alpha = 1, live teacher, T = 1, token-mean) in float64, per unpadded row.

    s = log_softmax(student logits), t = log_softmax(teacher logits) (no grad), lp_t = s[y_t],
    w = weight_of(sg(lp), sampler_lp) for the row:
    L = Σ_tokens −w·A·exp(lp − sg(lp)) / n_tokens + Σ_distilled w·Σ_v e^s (s − t) / n_distilled.
    The forward runs once; :meth:`gradients` differentiates L for one choice of weights.
    """

    def __init__(self, policy, rollouts, contexts):
        self.model = copy.deepcopy(policy.model).double().eval()
        rewards, groups = rollouts.rewards.double(), rollouts.group_ids
        self.n_tokens = float(rollouts.completion_mask.sum())
        self.n_distilled = float(
            sum(int(rollouts.completion_mask[i].sum()) for i, c in enumerate(contexts) if c)
        )
        self.rows = []
        for i in range(len(rollouts)):
            p = rollouts.prompt_ids[i][rollouts.prompt_mask[i].bool()]
            length = int(rollouts.completion_mask[i].sum())
            y = rollouts.completion_ids[i][:length]
            s = self.model(torch.cat([p, y])[None]).logits[0, len(p) - 1 : len(p) - 1 + length]
            s = s.log_softmax(-1)
            divergence = None
            if contexts[i] is not None:
                t_prompt = torch.tensor(policy.encode_prompt(contexts[i].prompt))
                with torch.no_grad():
                    t = self.model(torch.cat([t_prompt, y])[None]).logits[0]
                    t = t[len(t_prompt) - 1 : len(t_prompt) - 1 + length].log_softmax(-1)
                divergence = (s.exp() * (s - t)).sum(-1)
            self.rows.append(
                {
                    "lp": s.gather(-1, y[:, None]).squeeze(-1),
                    "sampler_lp": rollouts.sampler_logprobs[i][:length].double(),
                    "advantage": rewards[i] - rewards[groups == groups[i]].mean(),
                    "divergence": divergence,
                }
            )

    def gradients(self, weight_of):
        loss = torch.zeros((), dtype=torch.float64)
        for row in self.rows:
            lp = row["lp"]
            w = weight_of(lp.detach(), row["sampler_lp"])
            loss = loss - (w * row["advantage"] * torch.exp(lp - lp.detach())).sum() / self.n_tokens
            if row["divergence"] is not None:
                loss = loss + (w * row["divergence"]).sum() / self.n_distilled
        names, params = zip(*self.model.named_parameters(), strict=True)
        grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
        return {
            n: torch.zeros_like(p) if g is None else g
            for n, p, g in zip(names, params, grads, strict=True)
        }


def token_weights(lp, sampler_lp):
    return (lp - sampler_lp).exp().clamp(max=2.0)


def sequence_weights(lp, sampler_lp):
    return (lp - sampler_lp).sum().exp().clamp(max=2.0).expand_as(lp)


def inverse_token_weights(lp, sampler_lp):
    return (sampler_lp - lp).exp().clamp(max=2.0)


def unit_weights(lp, sampler_lp):
    return torch.ones_like(lp)


def _close(grads, ref, rtol=1e-4):
    num = sum(float((grads[n].double() - ref[n]).square().sum()) for n in ref)
    den = sum(float(ref[n].square().sum()) for n in ref)
    return math.sqrt(num / den) < rtol


@pytest.mark.parametrize(
    "level, right, wrong",
    [
        ("token", token_weights, [unit_weights, inverse_token_weights, sequence_weights]),
        ("sequence", sequence_weights, [unit_weights, token_weights]),
        pytest.param("none", unit_weights, [token_weights], marks=pytest.mark.slow),
    ],
)
def test_trainer_weights_pg_and_distillation_by_the_mismatch(tmp_path, level, right, wrong):
    torch.manual_seed(0)
    policy = PolicyModel("demo")
    trainer = make_trainer(
        tmp_path / "run",
        policy=policy,
        defaults={},
        num_samples_per_prompt=4,
        generation__max_new_tokens=6,
        generation__min_new_tokens=4,  # past the answer: several uncertain tokens per row
        generation__vllm_is_correction=level,
        generation__vllm_is_cap=2.0,
        self_distillation__teacher="live",
        self_distillation__alpha=1.0,
        policy_gradient__kl_penalty_weight=0.0,
        policy_gradient__scale_rewards=False,
        optimization__prompts_per_step=2,
        optimization__micro_batch_size=3,  # the step's rows split unevenly
        run__progress_bar=False,
    )
    config = trainer.config
    # Reported at T = 0.4 vs trained at 1: confident tokens get weights well below 1, unlikely ones
    # hit the cap (both regimes, asserted below).
    trainer.generator = TemperedLogprobBackend(policy, config.generation, report_temperature=0.4)
    rollouts, contexts = scored_batch(trainer)
    assert any(c is not None for c in contexts)
    prepared = trainer.loss.prepare(rollouts, contexts)
    trainer.optimizer.zero_grad(set_to_none=True)
    sums = trainer.loss.backward(rollouts, prepared)
    grads = {n: p.grad.clone() for n, p in policy.model.named_parameters()}

    reference = ReferenceLoss(policy, rollouts, contexts)
    assert _close(grads, reference.gradients(right))
    for other in wrong:  # the test tells the right ratio from a wrong one or none
        assert not _close(grads, reference.gradients(other), 1e-2)

    # The step's metrics: |logπ_train − logπ_sampler| and the weights, over all tokens.
    metrics = trainer.loss.metrics(sums, prepared.counts)
    mask = rollouts.completion_mask.bool()
    train_lp = trainer.loss.old_logprobs(rollouts)
    diff = (train_lp - rollouts.sampler_logprobs)[mask].abs()
    assert metrics["sampling/logprob_diff_mean"] == pytest.approx(float(diff.mean()), rel=1e-4)
    assert metrics["sampling/logprob_diff_max"] == pytest.approx(float(diff.max()), rel=1e-4)
    weights = torch.cat(
        [
            right(train_lp[i][mask[i]].double(), rollouts.sampler_logprobs[i][mask[i]].double())
            for i in range(len(rollouts))
        ]
    )
    assert metrics["sampling/is_weight_mean"] == pytest.approx(float(weights.mean()), rel=1e-4)
    assert metrics["sampling/is_weight_min"] == pytest.approx(float(weights.min()), rel=1e-4)
    if level == "token":
        assert float(weights.max()) == 2.0 and float(weights.min()) < 0.9  # both regimes


def test_hf_backend_logs_no_mismatch_metrics(tmp_path):
    trainer = make_trainer(
        tmp_path / "run",
        defaults={},
        generation__max_new_tokens=4,
        optimization__prompts_per_step=2,
        run__max_steps=1,
        run__progress_bar=False,
    )
    metrics = trainer.step()
    assert not any(k.startswith("sampling/") for k in metrics)


def test_vllm_with_lora_is_a_clear_config_error():
    with pytest.raises(ValueError, match="not supported yet"):
        SDPOConfig(generation__backend="vllm", model__lora__r=8)
