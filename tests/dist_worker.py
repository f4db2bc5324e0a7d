"""Worker for tests/test_distributed.py, launched by ``torchrun`` (or run as one process).

Trains a tiny Llama for a few steps and writes, from rank 0, the final policy and EMA-teacher
weights; every rank records the rollouts it generated (``rollouts-rank{r}.pt``). In replay mode
(one process) the step's rollouts are those recorded by the ranks, concatenated: the same
global batch, so the update can be compared with the multi-process one.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from conftest import make_tiny_llama  # noqa: E402

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer  # noqa: E402
from sdpo.policy_model import RolloutBatch  # noqa: E402

ROWS = [
    {"prompt": f"Q: {a}+{b}=", "answer": str(a + b)} for a in range(10, 20) for b in range(20, 24)
]


def one_success_per_group(prompts, completions, **columns):
    return [float(i % 4 == 0) for i in range(len(completions))]


def raising_on_rank_1(prompts, completions, **columns):
    if os.environ.get("RANK") == "1":
        raise ValueError("reward blew up on purpose")
    return one_success_per_group(prompts, completions)


def build(
    out: Path, strategy: str, steps: int, reward=one_success_per_group, **extra
) -> SDPOTrainer:
    model, tok = make_tiny_llama(seed=0, hidden=32, layers=2)
    settings = dict(
        # float32 whatever the host: model.dtype=auto would pick bf16 on a CPU with AVX512-BF16,
        # and the equality tests below compare at float32 tolerances.
        model__dtype="float32",
        num_samples_per_prompt=4,
        generation__max_new_tokens=5,
        optimization__prompts_per_step=4,
        optimization__micro_batch_size=4,
        optimization__learning_rate=1e-3,
        self_distillation__teacher_update_rate=0.2,
        policy_gradient__kl_penalty_weight=0.01,
        distributed__strategy=strategy,
        run__max_steps=steps,
        run__save_steps=1000,
        run__output_dir=str(out / "run"),
        run__progress_bar=False,
    )
    config = SDPOConfig(**{**settings, **extra})
    return SDPOTrainer(config, PolicyModel(model=model, tokenizer=tok), reward, ROWS)


def _pad(tensors: list[torch.Tensor], value: int, left: bool) -> torch.Tensor:
    width = max(t.shape[1] for t in tensors)
    out = []
    for t in tensors:
        pad = t.new_full((t.shape[0], width - t.shape[1]), value)
        out.append(torch.cat([pad, t] if left else [t, pad], dim=1))
    return torch.cat(out)


def merge(parts: list[RolloutBatch], pad_id: int) -> RolloutBatch:
    offset, groups = 0, []
    for p in parts:
        groups.append(p.group_ids + offset)
        offset += int(p.group_ids.max()) + 1
    return RolloutBatch(
        prompts=[x for p in parts for x in p.prompts],
        prompt_ids=_pad([p.prompt_ids for p in parts], pad_id, left=True),
        prompt_mask=_pad([p.prompt_mask for p in parts], 0, left=True),
        completion_ids=_pad([p.completion_ids for p in parts], pad_id, left=False),
        completion_mask=_pad([p.completion_mask for p in parts], 0, left=False),
        completions=[x for p in parts for x in p.completions],
        group_ids=torch.cat(groups),
        rows=[x for p in parts for x in p.rows],
    )


def _full(grad: torch.Tensor) -> torch.Tensor:
    """A gradient as one full tensor on the CPU (an FSDP2 shard is gathered: a collective)."""
    if hasattr(grad, "full_tensor"):
        grad = grad.full_tensor()
    return grad.detach().to("cpu", copy=True)


def main() -> None:
    out, strategy, steps = Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])
    mode = sys.argv[4] if len(sys.argv) > 4 else "train"
    reward = raising_on_rank_1 if mode == "raise" else one_success_per_group
    extra = {}
    if mode in ("kill", "resume", "whole"):  # checkpoint every 2 steps
        extra["run__save_steps"] = 2
        extra["run__output_dir"] = str(out / ("whole" if mode == "whole" else "run"))
    if mode == "replay":  # its own run directory (the ranks' run holds "run")
        extra["run__output_dir"] = str(out / "replay")
    if mode == "resume":
        extra["run__resume_from"] = str(out / "run")
    trainer = build(out, strategy, steps, reward, **extra)
    if mode == "kill":  # rank 1 dies (SIGKILL) right after the step-2 checkpoint

        class Die:
            def on_step_end(self, trainer, metrics):
                if trainer.global_step == 2 and trainer.runtime.rank == 1:
                    os.kill(os.getpid(), 9)

        trainer.callbacks.append(Die())
    rank = trainer.runtime.rank
    if mode == "replay":
        world = int(sys.argv[5])
        recorded = [
            torch.load(out / f"rollouts-rank{r}.pt", weights_only=False) for r in range(world)
        ]
        pad = trainer.policy.tokenizer.pad_token_id
        batches = iter([merge([rec[s] for rec in recorded], pad) for s in range(steps)])
        trainer.generate = lambda rows, **kw: next(batches)
    else:
        record, generate = [], trainer.generate

        def recording(rows, **kw):
            rollouts = generate(rows, **kw)
            record.append(rollouts)
            return rollouts

        trainer.generate = recording
    # Every step's full gradient, before clipping: AdamW's update is nearly blind to a gradient
    # scale (a world-size error in the loss normalization), the gradient is not.
    grads, clip = [], trainer._clip_gradients

    def recording_clip():
        grads.append(
            {
                name.removeprefix("module."): _full(p.grad)
                for name, p in trainer.policy.model.named_parameters()
                if p.grad is not None
            }
        )
        return clip()

    trainer._clip_gradients = recording_clip
    trainer.train()
    policy = trainer.runtime.full_state_dict(trainer.policy.model)
    teacher = trainer.runtime.full_state_dict(trainer.teacher.copy)
    if mode != "replay":
        torch.save(record, out / f"rollouts-rank{rank}.pt")
    if trainer.runtime.is_main:
        tmp = out / f"final-{mode}.pt.tmp"  # whole or absent: the test reads its presence
        torch.save({"policy": policy, "teacher": teacher, "grads": grads}, tmp)
        tmp.replace(out / f"final-{mode}.pt")
    trainer.runtime.close()


if __name__ == "__main__":
    main()
