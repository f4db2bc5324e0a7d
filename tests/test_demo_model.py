"""The shipped demo model: loads offline, is small, and can act as its own teacher."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

from sdpo.config import SelfDistillationConfig
from sdpo.demo import (
    DEMO_MODEL_DIR,
    build_char_tokenizer,
    feedback_prompt,
    generate_completions,
    load_demo_model,
    teacher_prompt,
)
from sdpo.reprompting import Reprompter
from sdpo.tasks import arithmetic, load_task


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


def test_feedback_prompt_is_the_trainers_feedback_only_teacher_context():
    # The demo model is trained on feedback_prompt(); the trainer must build the same text.
    tokenizer = build_char_tokenizer()
    prompt, completions = "Q: 58+67=", ["115", "124"]
    feedback = [arithmetic.feedback_for(c, "125") for c in completions]
    contexts = Reprompter(SelfDistillationConfig(), tokenizer=tokenizer).build(
        [prompt] * 2, completions, [0.0, 0.0], [0, 0], feedback=feedback
    )
    assert [c.prompt for c in contexts] == [feedback_prompt(prompt, f) for f in feedback]
    assert "115 is too small. Its last digit is right." in contexts[0].prompt


@pytest.mark.slow  # ~19 s of CPU: 200 greedy + 4 x ~60 sampled completions
def test_model_reads_feedback_on_its_own_mistakes(demo):
    # Retrying its own wrong greedy answers: with the feedback in the teacher context the model
    # (greedy) is right far more often than a fresh plain attempt (sampled, 4 per question).
    model, tokenizer = demo
    rows = load_task("arithmetic", "eval")[:200]
    greedy = generate_completions(model, tokenizer, [r["prompt"] for r in rows])
    wrong = [(r, g.strip()) for r, g in zip(rows, greedy, strict=True) if g.strip() != r["answer"]]
    assert len(wrong) >= 50, len(wrong)
    prompts = [
        feedback_prompt(r["prompt"], arithmetic.feedback_for(g, r["answer"])) for r, g in wrong
    ]
    retried = generate_completions(model, tokenizer, prompts)
    with_feedback = sum(
        c.strip() == r["answer"] for c, (r, _) in zip(retried, wrong, strict=True)
    ) / len(wrong)
    torch.manual_seed(0)
    plain = generate_completions(
        model, tokenizer, [r["prompt"] for r, _ in wrong for _ in range(4)], do_sample=True
    )
    answers = [r["answer"] for r, _ in wrong for _ in range(4)]
    plain_acc = sum(c.strip() == a for c, a in zip(plain, answers, strict=True)) / len(answers)
    assert with_feedback >= max(2 * plain_acc, plain_acc + 0.2), (with_feedback, plain_acc)
