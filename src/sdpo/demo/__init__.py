"""The small demo model shipped with sdpo, and the character-level tokenizer it (and the tests) use.

Nothing here touches the network: the tokenizer is built in-process and the weights lie next to
this file (``model/``), written by ``scripts/train_demo_model.py``.
"""

from __future__ import annotations

import string
from pathlib import Path

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

DEMO_MODEL_DIR = Path(__file__).parent / "model"
SPECIAL_TOKENS = ["<pad>", "<eos>", "<unk>"]
CHARS = list(string.printable[:95]) + ["\n"]  # digits, letters, punctuation, space, newline


def build_char_tokenizer(chars: list[str] | None = None) -> PreTrainedTokenizerFast:
    """A character-level tokenizer: one token per character, plus <pad>, <eos>, <unk>.

    Decoding joins characters without spaces, so ``decode(encode(text)) == text`` for known chars.
    """
    chars = CHARS if chars is None else chars
    vocab = {tok: i for i, tok in enumerate(SPECIAL_TOKENS + [c for c in chars if c not in SPECIAL_TOKENS])}
    core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    core.decoder = decoders.Fuse()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
    )
    tok.padding_side = "left"
    return tok


def tiny_llama_config(vocab_size: int, hidden: int = 128, layers: int = 4, heads: int = 4, intermediate: int = 512, max_positions: int = 512) -> LlamaConfig:
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
