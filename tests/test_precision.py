"""Precision policy and memory levers: fp32 master weights under bf16 autocast, an EMA teacher in
float32, gradient checkpointing that leaves the loss and the gradients unchanged."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama, make_trainer, one_success_per_group, scored_batch

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer

DEFAULTS = dict(
    num_samples_per_prompt=4,
    generation__max_new_tokens=6,
    generation__min_new_tokens=6,
    optimization__prompts_per_step=2,
    optimization__micro_batch_size=8,
    run__progress_bar=False,
)


def _trainer(tmp_path, dtype="float32", seed=0, device=None, **overrides) -> SDPOTrainer:
    model, tok = make_tiny_llama(seed=seed, hidden=64)
    # As the CLI builds it: the policy loaded in model.dtype (before: pure bf16 weights).
    policy = PolicyModel(model=model, tokenizer=tok, dtype=dtype, device=device)
    return make_trainer(
        tmp_path / "run",
        reward=one_success_per_group,
        policy=policy,
        defaults=DEFAULTS,
        model__dtype=dtype,
        **overrides,
    )


def test_bf16_compute_keeps_fp32_master_weights_and_small_updates(tmp_path):
    beta = 0.01
    trainer = _trainer(
        tmp_path,
        dtype="bfloat16",
        optimization__learning_rate=1e-6,
        self_distillation__teacher_update_rate=beta,
        policy_gradient__kl_penalty_weight=0.0,
    )
    model, teacher = trainer.policy.model, trainer.teacher.copy
    assert trainer.runtime.compute_dtype == torch.bfloat16
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    assert all(p.dtype == torch.float32 for p in params.values())
    assert all(p.dtype == torch.float32 for p in teacher.parameters())
    before = {n: p.detach().clone() for n, p in params.items()}
    phi = {n: p.detach().clone() for n, p in teacher.named_parameters()}
    trainer.step()
    changed = sum(int((p.detach() != before[n]).sum()) for n, p in params.items())
    total = sum(p.numel() for p in params.values())
    assert changed / total >= 0.99, f"only {changed / total:.1%} of the weights changed"
    # EMA teacher: (1-β)·φ + β·θ in float64, to float32 rounding of the result.
    theta = dict(model.named_parameters())
    for name, p in teacher.named_parameters():
        want = (1 - beta) * phi[name].double() + beta * theta[name].detach().double()
        torch.testing.assert_close(p.double(), want, rtol=2**-23, atol=1e-12, msg=name)


def test_bf16_autocast_loss_is_close_to_fp32_loss(tmp_path):
    fp32 = _trainer(tmp_path / "a", dtype="float32")
    bf16 = _trainer(tmp_path / "b", dtype="bfloat16")
    rollouts, contexts = scored_batch(fp32)
    assert any(c is not None for c in contexts)
    losses = {}
    for name, trainer in (("fp32", fp32), ("bf16", bf16)):
        prepared = trainer.loss.prepare(rollouts, contexts)
        sums = trainer.loss.backward(rollouts, prepared)
        losses[name] = trainer.loss.metrics(sums, prepared.counts)
    # bf16 keeps 8 significant bits (relative rounding 2^-9 ≈ 0.2% per op); through the backbone
    # the hidden states drift by about 1%, and the loss — a difference of log-probs — by a few
    # percent of its own size. The LM head itself runs in fp32.
    for key in ("loss", "policy_loss", "self_distillation/distillation_loss", "entropy"):
        a, b = losses["fp32"][key], losses["bf16"][key]
        assert abs(a - b) <= 0.05 * abs(a) + 1e-3, (key, a, b)
    assert losses["fp32"]["loss"] != losses["bf16"]["loss"]  # autocast really ran in bf16


def test_lm_head_in_the_compute_dtype_only_on_request(tmp_path):
    """model.lm_head_dtype=compute runs the head product in bf16 (the logits then differ from the
    float32 head's, by bf16 rounding only) and its gradient still reaches the float32 weights;
    under float32 compute it changes nothing."""
    runs = {}
    for name, dtype, head in (
        ("fp32", "float32", "float32"),
        ("fp32_compute", "float32", "compute"),
        ("bf16", "bfloat16", "float32"),
        ("bf16_compute", "bfloat16", "compute"),
    ):
        trainer = _trainer(tmp_path / name, dtype=dtype, model__lm_head_dtype=head)
        if name == "fp32":
            rollouts, contexts = scored_batch(trainer)
        prepared = trainer.loss.prepare(rollouts, contexts)
        old = trainer.loss.old_logprobs(rollouts)
        sums = trainer.loss.backward(rollouts, prepared)
        grad = trainer.policy.lm_head.weight.grad
        assert grad is not None and grad.dtype == torch.float32
        runs[name] = (trainer.loss.metrics(sums, prepared.counts), old, grad.clone())
    (l32, o32, g32), (l32c, o32c, g32c) = runs["fp32"], runs["fp32_compute"]
    assert l32 == l32c and torch.equal(o32, o32c) and torch.equal(g32, g32c)
    (lb, ob, gb), (lbc, obc, gbc) = runs["bf16"], runs["bf16_compute"]
    mask = rollouts.completion_mask.bool()
    assert not torch.equal(ob[mask], obc[mask])  # the head really ran in bf16
    # bf16 logits: |Δz| <= |z|·2⁻⁸; log-probs move by about that (|z| ~ 1 here).
    torch.testing.assert_close(obc[mask], ob[mask], rtol=0, atol=0.05)
    for key in ("loss", "policy_loss", "self_distillation/distillation_loss", "entropy"):
        assert abs(lb[key] - lbc[key]) <= 0.05 * abs(lb[key]) + 1e-3, (key, lb[key], lbc[key])
    cos = torch.nn.functional.cosine_similarity(gb.flatten(), gbc.flatten(), dim=0)
    assert cos > 0.99, float(cos)


def test_pure_low_precision_weights_only_on_request_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="lost"):
        trainer = _trainer(tmp_path, model__param_dtype="bfloat16")
    assert next(trainer.policy.model.parameters()).dtype == torch.bfloat16


def _grads(model):
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_gradient_checkpointing_keeps_loss_and_gradients(tmp_path):
    """The trap: checkpointed layers in train mode drop the KV cache, so the shared-prompt pass
    would score completions without their prompt. The loss must not change."""
    plain = _trainer(tmp_path / "a")
    ckpt = _trainer(tmp_path / "b", model__gradient_checkpointing=True)
    assert any(getattr(m, "gradient_checkpointing", False) for m in ckpt.policy.model.modules())
    rollouts, contexts = scored_batch(plain)
    out = {}
    for name, trainer in (("plain", plain), ("ckpt", ckpt)):
        trainer.policy.model.train()
        prepared = trainer.loss.prepare(rollouts, contexts)
        trainer.policy.model.zero_grad(set_to_none=True)
        sums = trainer.loss.backward(rollouts, prepared)
        out[name] = (trainer.loss.metrics(sums, prepared.counts), _grads(trainer.policy.model))
    for key in ("loss", "policy_loss", "self_distillation/distillation_loss"):
        assert out["ckpt"][0][key] == pytest.approx(out["plain"][0][key], rel=1e-5, abs=1e-7), key
    assert out["plain"][1].keys() == out["ckpt"][1].keys()
    for name, g in out["plain"][1].items():
        torch.testing.assert_close(out["ckpt"][1][name], g, rtol=1e-4, atol=1e-6, msg=name)


def test_eager_and_sdpa_attention_give_the_same_loss(tmp_path):
    sdpa = _trainer(tmp_path / "a")
    eager = _trainer(tmp_path / "b", model__attn_implementation="eager")
    assert eager.policy.model.config._attn_implementation == "eager"
    rollouts, contexts = scored_batch(sdpa)
    losses = []
    for trainer in (sdpa, eager):
        prepared = trainer.loss.prepare(rollouts, contexts)
        sums = trainer.loss.backward(rollouts, prepared)
        losses.append(trainer.loss.metrics(sums, prepared.counts)["loss"])
    assert losses[0] == pytest.approx(losses[1], rel=1e-4, abs=1e-6)


# ----- model.dtype=auto: the choice by device and CPU capability -------------------------------


def _cpu_bf16(monkeypatch, avx512_bf16: bool, amx: bool) -> None:
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512_bf16)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)


@pytest.mark.parametrize(
    ("avx512_bf16", "amx", "want"),
    [
        (False, False, torch.float32),
        (True, False, torch.bfloat16),
        (False, True, torch.bfloat16),
        (True, True, torch.bfloat16),
    ],
)
def test_auto_dtype_on_cpu_follows_native_bf16(monkeypatch, avx512_bf16, amx, want):
    from sdpo.distributed import auto_precision, compute_dtype, precision_note

    _cpu_bf16(monkeypatch, avx512_bf16, amx)
    cpu = torch.device("cpu")
    dtype, reason = auto_precision(cpu)
    assert dtype == want
    assert compute_dtype("auto", cpu) == want and compute_dtype(None, cpu) == want
    assert ("without native" in reason) == (want == torch.float32)
    note = precision_note("auto", cpu)
    assert note.startswith(f"model.dtype=auto -> {str(want).removeprefix('torch.')} (")
    # An explicit choice is kept whatever the CPU has; bf16 without hardware support is flagged.
    assert compute_dtype("float32", cpu) == torch.float32
    assert compute_dtype("bfloat16", cpu) == torch.bfloat16
    assert ("expect it slower" in precision_note("bfloat16", cpu)) == (want == torch.float32)


def test_auto_dtype_is_bf16_on_cuda_whatever_the_cpu(monkeypatch):
    from sdpo.distributed import auto_precision

    _cpu_bf16(monkeypatch, False, False)
    assert auto_precision(torch.device("cuda")) == (torch.bfloat16, "CUDA device")


def test_auto_dtype_choice_runs_printed_and_kept_in_the_run_config(tmp_path, monkeypatch, capsys):
    _cpu_bf16(monkeypatch, True, False)  # as on a CPU with AVX512-BF16
    trainer = _trainer(tmp_path, dtype="auto", device="cpu", run__max_steps=1)  # also under CUDA
    assert trainer.runtime.compute_dtype == torch.bfloat16
    assert next(trainer.policy.model.parameters()).dtype == torch.float32  # master weights
    trainer.train()
    err = capsys.readouterr().err
    assert "precision: model.dtype=auto -> bfloat16 (CPU with native bfloat16" in err
    text = (tmp_path / "run" / "config.yaml").read_text()
    assert text.startswith("# precision: model.dtype=auto -> bfloat16 (CPU with native")
    saved = SDPOConfig.from_yaml(tmp_path / "run" / "config.yaml")
    assert saved.model.dtype == "auto"  # a resume on another machine decides again
