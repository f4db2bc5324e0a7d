"""sdpo without peft installed: full fine-tuning trains, LoRA names the extra to install.

Usage: no_peft.py RUN_DIR   (prints "ERROR: <message>" for the LoRA attempt)
"""

import sys

sys.modules["peft"] = None  # as if peft were not installed

from transformers import LlamaForCausalLM  # noqa: E402

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer  # noqa: E402
from sdpo.demo import build_char_tokenizer, tiny_llama_config  # noqa: E402

tok = build_char_tokenizer()
cfg = dict(
    num_samples_per_prompt=2,
    generation__max_new_tokens=3,
    run__max_steps=1,
    run__output_dir=sys.argv[1],
    run__progress_bar=False,
)
rows = [{"prompt": "Q: 1+1="}] * 4


def reward(prompts, completions, **kw):
    return [1.0] * len(completions)


def trainer(**extra):
    config = tiny_llama_config(len(tok), hidden=32, layers=1, heads=2, intermediate=64)
    return SDPOTrainer(
        config=SDPOConfig(**cfg, **extra),
        policy_model=PolicyModel(model=LlamaForCausalLM(config), tokenizer=tok),
        reward_model=reward,
        train_dataloader=rows,
    )


trainer().step()
try:
    trainer(model__lora__r=4)
except ImportError as exc:
    print("ERROR:", exc)
