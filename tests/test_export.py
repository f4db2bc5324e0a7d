"""final/: the trained policy as a from_pretrained-loadable directory with a model card."""

from __future__ import annotations

import contextlib
import io

import pytest
import torch
from conftest import make_tiny_llama, make_trainer
from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from sdpo import PolicyModel

ROWS = [{"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in range(10, 14) for b in range(3)]


def sequence_logprobs(model, ids: torch.Tensor) -> torch.Tensor:
    """log p(token t | tokens < t) for every position after the first: ``[1, T-1]``."""
    with torch.no_grad():
        logits = model(ids).logits.double()
    return logits[:, :-1].log_softmax(-1).gather(-1, ids[:, 1:, None]).squeeze(-1)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    tmp_path = tmp_path_factory.mktemp("export")
    model, tok = make_tiny_llama()
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    trainer = make_trainer(
        tmp_path / "run",
        rows=ROWS,
        eval_rows=ROWS[:4],
        policy=PolicyModel(model=model, tokenizer=tok),
        defaults={},
        num_samples_per_prompt=4,
        generation__max_new_tokens=6,
        generation__temperature=0.9,
        optimization__prompts_per_step=2,
        optimization__learning_rate=1e-3,
        policy_gradient__kl_penalty_weight=0.0,
        run__max_steps=2,
        run__progress_bar=False,
    )
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        trainer.train()
    return trainer, initial, printed.getvalue()


def test_final_loads_with_from_pretrained_and_reproduces_the_policy(trained):
    trainer, initial, printed = trained
    final = trainer.run_dir / "final"
    assert f"Final model: {final.resolve()}" in printed
    loaded = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    ids = torch.tensor([tok("Q: 12+2=14 and 13+1=14")["input_ids"]])
    ours = sequence_logprobs(trainer.policy.model.eval(), ids)
    torch.testing.assert_close(sequence_logprobs(loaded.eval(), ids), ours, rtol=0, atol=1e-9)
    # ... and training moved them, so the comparison can tell a stale export from the policy
    base, _ = make_tiny_llama()
    base.load_state_dict(initial)
    assert (sequence_logprobs(base.eval(), ids) - ours).abs().max() > 1e-4

    gen = GenerationConfig.from_pretrained(final)
    assert gen.do_sample and gen.temperature == 0.9 and gen.max_new_tokens == 6
    assert gen.eos_token_id == tok.eos_token_id

    card = (final / "README.md").read_text()
    assert "| eval/accuracy_greedy |" in card and "before training" in card
    assert "learning_rate: 0.001" in card and "Trained for 2 steps" in card


def test_save_model_to_a_directory_and_a_failed_export_keeps_the_old_one(
    trained, tmp_path, monkeypatch
):
    trainer, _, _ = trained
    out = trainer.save_model(tmp_path / "mine")
    assert (out / "config.json").exists() and (out / "model.safetensors").exists()
    before = (out / "model.safetensors").read_bytes()

    def broken(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(trainer.policy.tokenizer, "save_pretrained", broken)
    with torch.no_grad():
        next(trainer.policy.model.parameters()).add_(1.0)
    with pytest.raises(OSError, match="disk full"):
        trainer.save_model(out)
    assert (out / "model.safetensors").read_bytes() == before
    AutoModelForCausalLM.from_pretrained(out)
