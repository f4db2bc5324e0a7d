"""The small demo model shipped with sdpo, and the character-level tokenizer it (and the tests) use.

Nothing here touches the network: the tokenizer is built in-process and the weights lie next to
this file (``model/``), written by ``scripts/train_demo_model.py``.
"""

from __future__ import annotations

import string
from pathlib import Path

import torch
from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from sdpo.config import (
    DEFAULT_FEEDBACK_TEMPLATE,
    DEFAULT_REPROMPT_TEMPLATE,
    DEFAULT_SOLUTION_TEMPLATE,
)

DEMO_MODEL_DIR = Path(__file__).parent / "model"
LISTPROG_MODEL_DIR = Path(__file__).parent / "listprog"  # model_name=demo-listprog
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARS = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline


def build_char_tokenizer(chars: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, plus <pad>, <eos>, <unk>.

    Decoding joins characters without spaces, so ``decode(encode(text)) == text`` for known chars.
    """
    chars = CHARS if chars is None else chars
    vocab = {
        tok: i
        for i, tok in enumerate(SPECIAL_TOKENS + [c for c in chars if c not in SPECIAL_TOKENS])
    }
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(
        Regex(r"[\s\S]"), behavior="isolated"
    )  # one token per character, newlines too
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        eos_token="<eos>",
        unk_token="<unk>",
        padding_side="left",
    )
    return tok


def tiny_llama_config(
    vocab_size: int,
    hidden: int = 128,
    layers: int = 4,
    heads: int = 4,
    intermediate: int = 512,
    max_positions: int = 512,
) -> LlamaConfig:
    """Config of a tiny Llama (the demo model's shape by default; tied embeddings)."""
    return LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        intermediate_size=intermediate,
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=1,
        bos_token_id=None,
    )


def load_demo_model() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load the shipped demo model and its tokenizer (float32)."""
    if not (DEMO_MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The demo model's weights are missing from {DEMO_MODEL_DIR}. "
            "Run `python scripts/train_demo_model.py` to create them."
        )
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM.from_pretrained(DEMO_MODEL_DIR, dtype="float32")
    return model, tokenizer


def load_listprog_model() -> tuple[LlamaForCausalLM, PreTrainedTokenizerFast]:
    """Load the shipped list-program model (:mod:`sdpo.tasks.listprog`) and its tokenizer."""
    if not (LISTPROG_MODEL_DIR / "model.safetensors").exists():
        raise FileNotFoundError(
            f"The list-program model's weights are missing from {LISTPROG_MODEL_DIR}. "
            "Run `python scripts/train_listprog_model.py` to create them."
        )
    return LlamaForCausalLM.from_pretrained(LISTPROG_MODEL_DIR, dtype="float32"), (
        build_char_tokenizer()
    )


def teacher_prompt(prompt: str, demonstration: str) -> str:
    """``prompt`` in the default teacher template (SPEC §3) with ``demonstration`` as the solution."""
    solution = DEFAULT_SOLUTION_TEMPLATE.format(successful_previous_attempt=demonstration)
    return DEFAULT_REPROMPT_TEMPLATE.format(prompt=prompt, solution=solution, feedback="")


def feedback_prompt(prompt: str, feedback: str) -> str:
    """``prompt`` in the default teacher template with only the environment's ``feedback``.

    The teacher context the trainer builds (:class:`sdpo.reprompting.Reprompter`, default
    config) for a failed attempt whose group has no success.
    """
    block = DEFAULT_FEEDBACK_TEMPLATE.format(feedback_raw=feedback)
    return DEFAULT_REPROMPT_TEMPLATE.format(prompt=prompt, solution="", feedback=block)


@torch.no_grad()
def encode_batch(
    tokenizer: PreTrainedTokenizerFast, examples: list[tuple[str, str]]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A character-level training batch for the demo models' scripts: left-padded ``input_ids``,
    ``attention_mask`` and ``labels`` ``[B, W]`` (-100 except the target's characters + EOS)."""
    vocab = tokenizer.get_vocab()
    eos = tokenizer.eos_token_id
    seqs = [([vocab[c] for c in p], [vocab[c] for c in a] + [eos]) for p, a in examples]
    width = max(len(p) + len(a) for p, a in seqs)
    input_ids = torch.full((len(seqs), width), tokenizer.pad_token_id)
    attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
    labels = torch.full((len(seqs), width), -100)
    for i, (p, a) in enumerate(seqs):
        start = width - len(p) - len(a)
        input_ids[i, start:] = torch.tensor(p + a)
        attention_mask[i, start:] = 1
        labels[i, width - len(a) :] = torch.tensor(a)
    return input_ids, attention_mask, labels


def generate_completions(
    model: LlamaForCausalLM,
    tokenizer: PreTrainedTokenizerFast,
    prompts: list[str],
    do_sample: bool = False,
    max_new_tokens: int = 8,
    batch_size: int = 256,
) -> list[str]:
    """One completion per prompt (greedy, or sampled at temperature 1), decoded without specials."""
    completions: list[str] = []
    for start in range(0, len(prompts), batch_size):
        batch = tokenizer(prompts[start : start + batch_size], return_tensors="pt", padding=True)
        out = model.generate(
            **batch,
            do_sample=do_sample,
            temperature=1.0 if do_sample else None,
            top_p=None,
            top_k=None,
            max_new_tokens=max_new_tokens,
            pad_token_id=tokenizer.pad_token_id,
            eos_token_id=tokenizer.eos_token_id,
        )
        new_tokens = out[:, batch["input_ids"].shape[1] :]
        completions += tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
    return completions
