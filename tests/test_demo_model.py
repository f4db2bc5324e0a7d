"""The shipped demo model: loads offline, is small, and can act as its own teacher."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sdpo.demo import (
    DEMO_MODEL_DIR,
    build_char_tokenizer,
    generate_completions,
    load_demo_model,
    teacher_prompt,
)
from sdpo.tasks import load_task


@pytest.fixture(scope="module")
def demo():
    torch.set_num_threads(min(2, os.cpu_count() or 1))
    model, tokenizer = load_demo_model()
    return model.eval(), tokenizer


def test_loads_offline():
    code = (
        "from sdpo.demo import load_demo_model; m, t = load_demo_model(); print(type(m).__name__)"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith("LlamaForCausalLM")


def test_weights_are_small_and_shipped():
    size = sum(f.stat().st_size for f in DEMO_MODEL_DIR.iterdir() if f.is_file())
    assert (DEMO_MODEL_DIR / "config.json").exists()
    assert size <= 20 * 2**20


def test_tokenizer_round_trips():
    tokenizer = build_char_tokenizer()
    text = teacher_prompt("Q: 347+586=", "933") + "933"
    ids = tokenizer(text)["input_ids"]
    assert len(ids) == len(text)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids + [tokenizer.eos_token_id], skip_special_tokens=True) == text


def test_model_matches_tokenizer(demo):
    model, tokenizer = demo
    assert model.config.vocab_size == len(tokenizer)
    assert model.config.eos_token_id == tokenizer.eos_token_id
    assert model.config.pad_token_id == tokenizer.pad_token_id


def test_model_adds_sometimes_and_copies_a_demonstration(demo):
    model, tokenizer = demo
    rows = load_task("arithmetic", "eval")[:200]
    base = generate_completions(model, tokenizer, [r["prompt"] for r in rows])
    taught = generate_completions(
        model, tokenizer, [teacher_prompt(r["prompt"], r["answer"]) for r in rows]
    )
    base_acc = sum(c.strip() == r["answer"] for c, r in zip(base, rows, strict=True)) / len(rows)
    taught_acc = sum(c.strip() == r["answer"] for c, r in zip(taught, rows, strict=True)) / len(
        rows
    )
    assert 0.05 <= base_acc <= 0.7, base_acc
    assert taught_acc >= max(1.5 * base_acc, 0.8), (base_acc, taught_acc)
