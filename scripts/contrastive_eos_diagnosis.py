"""Where does the contrastive teacher put the end-of-sequence mass? (docs/method.md)

Trains a run for ``run.max_steps`` steps, then, on its last batch's contrasted rows, reads at every
completion position the EOS probability under the student ``π(·|x)``, the teacher ``q(·|x')``, the
contrast pass ``q(·|c)`` and the contrastive target ``q̃ ∝ q(x') π(x) / q(c)`` (γ = 1; the current
student's weights stand in for the teacher's). Prints a few rows position by position and the
means at the rows' EOS positions.

    python scripts/contrastive_eos_diagnosis.py data.task=arithmetic_hard \\
        policy_gradient.pg_loss_weight=0 self_distillation.contrastive_weight=1 run.max_steps=118

(the setting of docs/method.md's diagnosis, run there with the code before 8831d5d, whose
contrast context still held the feedback).
"""

from __future__ import annotations

import statistics
import sys

import torch

from sdpo.cli import build_data
from sdpo.config import SDPOConfig
from sdpo.policy_model import PolicyModel
from sdpo.trainer import SDPOTrainer


def log_probs(policy: PolicyModel, prefix: str, completion: torch.Tensor) -> torch.Tensor:
    """``[L, V]`` float64 log-probs of each completion position after ``prefix``."""
    ids = policy.tokenizer(prefix, return_tensors="pt", add_special_tokens=False).input_ids[0]
    with torch.no_grad():
        logits = policy.model(torch.cat([ids, completion])[None]).logits[0]
    return logits[len(ids) - 1 : len(ids) - 1 + len(completion)].double().log_softmax(-1)


def main(overrides: list[str]) -> None:
    config = SDPOConfig.preset("quickstart")
    config.apply_overrides(
        ["run.eval_steps=1000000", "run.progress_bar=false", "run.output_dir=/tmp/sdpo-eos-diagnosis",
         "run.overwrite_output_dir=true", *overrides]
    )  # fmt: skip
    train, evaluation, reward = build_data(config)
    policy = PolicyModel(config.model_name)
    trainer = SDPOTrainer(
        config=config, policy_model=policy, reward_model=reward,
        train_dataloader=train, eval_dataloader=evaluation,
    )  # fmt: skip
    trainer.train()
    rollouts, contexts = trainer.last_rollouts, trainer.last_contexts
    eos, shown, at_eos = policy.tokenizer.eos_token_id, 0, []
    policy.model.eval()
    for i, ctx in enumerate(contexts):
        if ctx is None or ctx.contrast_prompt is None:
            continue
        n = int(rollouts.completion_mask[i].sum())
        completion = rollouts.completion_ids[i, :n]
        student = log_probs(policy, rollouts.prompts[i], completion)
        teacher = log_probs(policy, ctx.prompt, completion)
        contrast = log_probs(policy, ctx.contrast_prompt, completion)
        target = (teacher + student - contrast).log_softmax(-1)
        p = [x[:, eos].exp() for x in (student, teacher, contrast, target)]
        if completion[-1] == eos:
            at_eos.append([float(x[-1]) for x in p])
        if shown < 3:
            shown += 1
            print(f"\nstudent prompt {rollouts.prompts[i]!r} -> {rollouts.completions[i]!r}")
            print(f"contrast context {ctx.contrast_prompt!r}")
            for t in range(n):
                print(f"  position {t}: EOS  student {p[0][t]:.3f}  teacher {p[1][t]:.3f}  "
                      f"contrast {p[2][t]:.3f}  target {p[3][t]:.3f}")  # fmt: skip
    if not at_eos:
        print("no contrasted row ended with EOS in the last batch")
        return
    means = [statistics.fmean(r[k] for r in at_eos) for k in range(4)]
    print(f"\n{len(at_eos)} EOS positions: mean EOS mass student {means[0]:.3f}, teacher "
          f"{means[1]:.3f}, contrast {means[2]:.3f}, target {means[3]:.3f}")  # fmt: skip


if __name__ == "__main__":
    main(sys.argv[1:])
