"""Shared fixtures: tiny models and a character-level tokenizer built in-process (no network)."""

from __future__ import annotations

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import GPT2Config, GPT2LMHeadModel, LlamaForCausalLM  # noqa: E402

from sdpo.demo import build_char_tokenizer, tiny_llama_config  # noqa: E402

torch.set_num_threads(2)


def make_tiny_llama(seed: int = 0, hidden: int = 32, layers: int = 2):
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        tiny_llama_config(len(tokenizer), hidden=hidden, layers=layers, heads=2, intermediate=64)
    )
    return model, tokenizer


def make_tiny_gpt2(seed: int = 0):
    tokenizer = build_char_tokenizer()
    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=len(tokenizer),
        n_embd=32,
        n_layer=2,
        n_head=2,
        n_positions=256,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
        bos_token_id=tokenizer.eos_token_id,
    )
    return GPT2LMHeadModel(config), tokenizer


@pytest.fixture(autouse=True)
def _float32_unless_a_test_says_otherwise(monkeypatch):
    """``model.dtype=auto`` picks bf16 on CPUs with native bf16 (AVX512-BF16/AMX) and float32
    elsewhere, so the in-process tests would compare against float64 references at bf16
    precision on some hosts only. Every test sees a CPU without native bf16; the precision tests
    patch the same probes to the case they check."""
    monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)
    monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: False, raising=False)


@pytest.fixture
def tiny_llama():
    return make_tiny_llama()


@pytest.fixture
def tiny_gpt2():
    return make_tiny_gpt2()


def scored_batch(trainer):
    """One generated, scored batch and its teacher contexts: ``(rollouts, contexts)``."""
    rollouts = trainer.generate(trainer.train_data.next_batch())
    trainer.score(rollouts)
    return rollouts, trainer.reprompt(rollouts)


ROWS = [
    {"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in range(10, 14) for b in range(20, 24)
]


def parity_reward(prompts, completions, **columns):
    """Deterministic, about half successes: parity of the character codes."""
    return [float(sum(map(ord, c)) % 2 == 0) for c in completions]


def one_success_per_group(prompts, completions, **columns):
    """Exactly one success per group of 4: it has no demonstration, its siblings do."""
    return [float(i % 4 == 0) for i in range(len(completions))]


TRAINER_DEFAULTS = dict(
    num_samples_per_prompt=4,
    generation__max_new_tokens=6,
    optimization__prompts_per_step=2,
    optimization__micro_batch_size=8,
    optimization__learning_rate=1e-3,
    run__max_steps=2,
    run__progress_bar=False,
    run__sample_log_steps=1,
)


def make_trainer(
    run_dir,
    *,
    reward=parity_reward,
    rows=ROWS,
    eval_rows=None,
    policy=None,
    defaults=TRAINER_DEFAULTS,
    config=None,
    bind=None,
    **overrides,
):
    """The one trainer factory of the suite: a tiny Llama (seed 0) unless ``policy`` is given;
    ``defaults`` (a test module's own base settings) updated by ``overrides``, or a ready ``config``
    (a preset's); output in ``run_dir``. ``bind``: a shared engine's ``bind(policy, generation)``,
    whose backend the trainer samples with."""
    from sdpo import PolicyModel, SDPOConfig, SDPOTrainer

    if config is None:
        config = SDPOConfig(**{**defaults, "run__output_dir": str(run_dir), **overrides})
    elif overrides:
        raise TypeError(f"make_trainer: set {sorted(overrides)} on the ready config instead")
    else:
        config.set("run.output_dir", str(run_dir))
    if policy is None:
        model, tok = make_tiny_llama()
        policy = PolicyModel(model=model, tokenizer=tok)
    return SDPOTrainer(
        config=config,
        policy_model=policy,
        reward_model=reward,
        train_dataloader=rows,
        eval_dataloader=eval_rows,
        generation_backend=bind(policy, config.generation) if bind else None,
    )


@pytest.fixture
def one_thread():
    """Tiny models: one thread (as the trainer's run.num_threads=0 picks); two threads on a busy
    machine made these tests 20x slower."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
