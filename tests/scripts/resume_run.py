"""A training run the SIGKILL-resume tests start, kill and resume as a real process.

Usage: resume_run.py RUN_DIR fresh|resume DELAY_S full|lora
"""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # tests/: conftest

import torch  # noqa: E402

torch.set_num_threads(1)
from conftest import make_tiny_llama  # noqa: E402

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer  # noqa: E402

run_dir, resume, delay, variant = (
    sys.argv[1],
    sys.argv[2] == "resume",
    float(sys.argv[3]),
    sys.argv[4],
)
rows = [
    {"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in range(10, 16) for b in range(20, 23)
]


def reward(prompts, completions, **columns):
    return [float(sum(map(ord, c)) % 2 == 0) for c in completions]


class Slow:
    def on_step_end(self, trainer, metrics):
        time.sleep(delay)


common = dict(
    num_samples_per_prompt=4,
    generation__max_new_tokens=6,
    optimization__prompts_per_step=2,
    optimization__warmup_steps=2,
    optimization__lr_scheduler="cosine",
    run__save_steps=2,
    run__save_total_limit=5,
    run__output_dir=run_dir,
    run__progress_bar=False,
    run__resume_from=run_dir if resume else None,
    run__seed=3,
)
if variant == "lora":
    settings = dict(
        optimization__learning_rate=1e-2,
        model__lora__r=4,
        model__lora__lora_dropout=0.1,
        model__lora__modules_to_save=["lm_head"],
        policy_gradient__kl_penalty_weight=0.1,
        run__max_steps=5,
    )
else:
    settings = dict(
        optimization__learning_rate=1e-3,
        self_distillation__demonstration_selection="random",
        run__max_steps=6,
    )
model, tok = make_tiny_llama(seed=0)
trainer = SDPOTrainer(
    config=SDPOConfig(**common, **settings),
    policy_model=PolicyModel(model=model, tokenizer=tok),
    reward_model=reward,
    train_dataloader=rows,
    callbacks=[Slow()],
)
trainer.train()
