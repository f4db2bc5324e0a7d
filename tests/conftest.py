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
