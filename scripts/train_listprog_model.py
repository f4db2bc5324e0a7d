"""Train the list-program model shipped in ``src/sdpo/demo/listprog`` from scratch (CPU, deterministic).

A small Llama with the demo's character-level tokenizer learns the list language of
:mod:`sdpo.tasks.listprog` from a mixture drawn *only* from the task's ``model`` range of programs
(disjoint by behaviour from the ``train`` and ``eval`` splits the RL runs use). Programs are drawn
as the task draws them (:func:`sdpo.tasks.listprog.random_steps`, so common functions such as
depth-2 ones come often, as they do among the first tasks of a split), and every example gets
fresh input/output examples (the model cannot memorize a prompt; it has to read it):

- plain ``examples -> program`` (``--plain-per-step``);
- revisions (``--revision-per-step``): the teacher context the trainer builds from feedback alone
  with the ``listprog`` preset (:func:`sdpo.tasks.listprog.feedback_context`), with
  :func:`sdpo.tasks.listprog.feedback_for` on a wrong attempt -> the right program. A share
  ``--own-fraction`` of the wrong attempts are the model's *own* failed samples (temperature 1,
  refreshed every ``--own-every`` steps on ``--own-batch`` fresh tasks, from step
  ``--own-start`` on, once its attempts are more than noise): what the teacher sees during SDPO.
  The rest are the right program with one or two edits (an argument or operation changed, a
  step dropped, inserted or swapped: near misses whose feedback points at the fix) or,
  sometimes, another task's program;
- demonstrations: the teacher template with a correct program -> that program (so the teacher
  copies a successful sibling, ``--demo-per-step``).

Loss is on program tokens + EOS only; AdamW, linear warm-up then cosine decay to
``--min-lr-ratio`` of the peak at ``--steps``. Every ``--eval-every`` steps it measures, on
``--dev-size`` held-out ``model``-range functions (never trained on): plain greedy and sampled
accuracy (all hidden tests pass), and on the sampled attempts that fail (the probe's items),
the teacher's accuracy (greedy and sampled) with that attempt's real feedback vs with another
failed task's feedback. It saves the weights at every evaluation (the shipped ones are the last
step's) and at the end prints the same numbers on the ``train`` split (the tasks RL trains on,
never seen here). With one thread and a seed the run is deterministic (evaluation draws from its
own random stream, so ``--eval-every`` does not change the weights).

    python scripts/train_listprog_model.py [--out DIR] [--seed 0] [--steps N]
"""

from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from collections import deque
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from sdpo.demo import (
    LISTPROG_MODEL_DIR,
    build_char_tokenizer,
    encode_batch,
    generate_completions,
    tiny_llama_config,
)
from sdpo.tasks import listprog as lp


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=LISTPROG_MODEL_DIR, help="Where to save.")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialization, data, sampling.")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: deterministic).")
    p.add_argument("--steps", type=int, default=1200, help="Optimizer steps.")
    p.add_argument("--lr", type=float, default=2e-3, help="Peak AdamW learning rate.")
    p.add_argument("--min-lr-ratio", type=float, default=0.1, help="Final lr / peak (cosine).")
    p.add_argument("--warmup-steps", type=int, default=100, help="Linear warm-up steps.")
    p.add_argument("--plain-per-step", type=int, default=24)
    p.add_argument("--revision-per-step", type=int, default=24)
    p.add_argument("--demo-per-step", type=int, default=8)
    p.add_argument(
        "--own-fraction", type=float, default=0.5, help="Revisions of the model's own failures."
    )
    p.add_argument(
        "--own-start", type=int, default=300, help="First step that samples own failures."
    )
    p.add_argument("--own-every", type=int, default=20, help="Refresh own failures every N steps.")
    p.add_argument("--own-batch", type=int, default=96, help="Fresh tasks sampled per refresh.")
    p.add_argument("--hidden", type=int, default=128, help="Model width.")
    p.add_argument("--layers", type=int, default=2, help="Transformer layers.")
    p.add_argument("--eval-every", type=int, default=200, help="Evaluate every N steps.")
    p.add_argument("--dev-size", type=int, default=100, help="Held-out model-range functions.")
    return p.parse_args()


EDIT_KINDS = ("arg", "op", "drop", "insert", "swap")


def edit(steps: list[lp.Step], rng: random.Random) -> list[lp.Step]:
    """``steps`` with one random edit (a changed argument or operation, a step dropped, inserted or
    swapped); number-valued steps stay last."""
    steps = list(steps)
    kind = rng.choice(EDIT_KINDS)
    i = rng.randrange(len(steps))
    last = i == len(steps) - 1
    if kind == "arg" and steps[i][1] is not None:
        name, arg = steps[i]
        steps[i] = (name, rng.choice([a for a in range(0, 6) if a != arg]))
    elif kind == "drop" and len(steps) > 1:
        del steps[i]
    elif kind == "insert" and len(steps) < 5:
        steps.insert(i, lp.random_step(rng, last=False))
    elif (
        kind == "swap" and len(steps) > 1 and not last and lp.PRIMITIVES[steps[-1][0]][1] == "list"
    ):
        j = rng.randrange(len(steps))
        steps[i], steps[j] = steps[j], steps[i]
    else:
        steps[i] = lp.random_step(rng, last=last)
    return steps


class Tasks:
    """Fresh ``model``-range tasks: a program drawn as the task draws them (common functions
    often), never one of ``excluded`` behaviours (the dev set), with fresh examples each time."""

    def __init__(self, rng: random.Random, excluded: set[tuple]):
        self.rng, self.excluded = rng, excluded
        self.ok: dict[str, bool] = {}  # program text -> usable (model range, acceptable, not dev)

    def program(self) -> list[lp.Step]:
        while True:
            steps = lp.random_steps(self.rng)
            text = lp.format_program(steps)
            if text not in self.ok:
                key = lp.split_key(steps)
                self.ok[text] = (
                    lp.split_of(steps, key) == "model"
                    and key not in self.excluded
                    and lp.acceptable(steps, lp.behaviour(steps))
                )
            if self.ok[text]:
                return steps

    def task(self) -> dict:
        while True:
            row = lp.make_task(self.program(), self.rng)
            if row is not None:
                return row


class Mixture:
    """Training examples (prompt, target): plain, revision, demonstration."""

    def __init__(self, rng: random.Random, tasks: Tasks, own_fraction: float):
        self.rng, self.tasks, self.own_fraction = rng, tasks, own_fraction
        self.own: deque[tuple[dict, str]] = deque(maxlen=1024)  # (task, failed own attempt)

    def plain(self) -> tuple[str, str]:
        row = self.tasks.task()
        return row["prompt"], row["program"]

    def demonstration(self) -> tuple[str, str]:
        row = self.tasks.task()
        return lp.demonstration_context(row["prompt"], row["program"]), row["program"]

    def wrong_attempt(self, row: dict) -> str:
        """A failing program: one or two edits of the right one, or another task's program."""
        for _ in range(20):
            if self.rng.random() < 0.15:
                attempt = lp.format_program(self.tasks.program())
            else:
                steps = lp.parse(row["program"])
                for _ in range(1 if self.rng.random() < 0.7 else 2):
                    steps = edit(steps, self.rng)
                attempt = lp.format_program(steps)
            if not all(lp.passes(attempt, row["tests"])):
                return attempt
        return "rev | rev"

    def revision(self) -> tuple[str, str]:
        if self.own and self.rng.random() < self.own_fraction:
            row, attempt = self.own[self.rng.randrange(len(self.own))]
        else:
            row = self.tasks.task()
            attempt = self.wrong_attempt(row)
        feedback = lp.feedback_for(attempt, row["shown"])
        return lp.feedback_context(row["prompt"], feedback), row["program"]

    def refresh_own(self, model, tokenizer, n: int) -> int:
        """Sample one attempt (temperature 1) at ``n`` fresh tasks; keep the failed ones."""
        rows = [self.tasks.task() for _ in range(n)]
        model.eval()
        attempts = generate_completions(
            model, tokenizer, [r["prompt"] for r in rows], do_sample=True, max_new_tokens=40
        )
        model.train()
        failed = [(r, a.strip()) for r, a in zip(rows, attempts, strict=True)]
        failed = [(r, a) for r, a in failed if not all(lp.passes(a, r["tests"]))]
        self.own.extend(failed)
        return len(failed)


def target_loss(model, tokenizer, examples):
    """Summed cross-entropy over target tokens, and how many there are."""
    input_ids, attention_mask, labels = encode_batch(tokenizer, examples)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((targets != -100).sum())


def solved(programs: list[str], rows: list[dict]) -> list[bool]:
    return [all(lp.passes(p.strip(), r["tests"])) for p, r in zip(programs, rows, strict=True)]


def measure(model, tokenizer, rows: list[dict], seed: int) -> dict:
    """Plain greedy and sampled accuracy; on the failed sampled attempts (the probe's items), the
    teacher's greedy and sampled accuracy with the real feedback vs another failed task's (the
    one half-way round the list, as the probe picks it). Its own random stream."""

    def gen(prompts: list[str], sample: bool) -> list[str]:
        return generate_completions(
            model, tokenizer, prompts, do_sample=sample, max_new_tokens=40, batch_size=64
        )

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        prompts = [r["prompt"] for r in rows]
        out = {"plain_greedy": sum(solved(gen(prompts, False), rows)) / len(rows)}
        attempts = gen(prompts, True)
        ok = solved(attempts, rows)
        out["plain_sampled"] = sum(ok) / len(rows)
        failed = [(r, a.strip()) for r, a, o in zip(rows, attempts, ok, strict=True) if not o]
        out["failed"] = len(failed)
        if len(failed) < 2:
            return out
        fr = [r for r, _ in failed]
        feedback = [lp.feedback_for(a, r["shown"]) for r, a in failed]
        half = len(feedback) // 2
        contexts = {
            "real": feedback,
            "shuffled": feedback[half:] + feedback[:half],
        }
        for name, fb in contexts.items():
            teacher = [lp.feedback_context(r["prompt"], f) for r, f in zip(fr, fb, strict=True)]
            for mode, sample in (("greedy", False), ("sampled", True)):
                acc = sum(solved(gen(teacher, sample), fr)) / len(fr)
                out[f"teacher_{name}_{mode}"] = round(acc, 3)
    return out


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    # Held-out functions: every 3rd of the first 3N model-range behaviours (common ones, like the
    # first tasks of the train split the probe uses), never drawn for training.
    dev = lp.draw_tasks("model", 3 * args.dev_size, seed=args.seed)[::3][: args.dev_size]
    tasks = Tasks(rng, {lp.split_key(lp.parse(r["program"])) for r in dev})
    tokenizer = build_char_tokenizer()
    config = tiny_llama_config(
        vocab_size=len(tokenizer),
        hidden=args.hidden,
        layers=args.layers,
        intermediate=4 * args.hidden,
    )
    model = LlamaForCausalLM(config)
    print(f"params {sum(p.numel() for p in model.parameters()):,}", flush=True)
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )

    def lr_factor(s: int) -> float:
        if s < args.warmup_steps:
            return (s + 1) / args.warmup_steps
        progress = min(1.0, (s - args.warmup_steps) / max(1, args.steps - args.warmup_steps))
        return args.min_lr_ratio + (1 - args.min_lr_ratio) * 0.5 * (
            1 + math.cos(math.pi * progress)
        )

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    mixture = Mixture(rng, tasks, args.own_fraction)
    start, cpu0 = time.time(), time.process_time()
    for step in range(1, args.steps + 1):
        if args.own_fraction > 0 and step >= args.own_start and step % args.own_every == 0:
            mixture.refresh_own(model, tokenizer, args.own_batch)
        model.train()
        groups = [
            [mixture.plain() for _ in range(args.plain_per_step)],
            [mixture.revision() for _ in range(args.revision_per_step)],
            [mixture.demonstration() for _ in range(args.demo_per_step)],
        ]
        losses, tokens = zip(*(target_loss(model, tokenizer, g) for g in groups if g), strict=True)
        loss = sum(losses) / sum(tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % 10 == 0:
            parts = [f"{(ls / n).item():.3f}" for ls, n in zip(losses, tokens, strict=True)]
            print(
                f"step {step:5d}  loss {loss.item():.4f} (plain/revision/demo {'/'.join(parts)})"
                f"  lr {schedule.get_last_lr()[0]:.2e}  {time.time() - start:5.0f}s wall"
                f"  {time.process_time() - cpu0:5.0f}s cpu",
                flush=True,
            )
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            dev_numbers = measure(model, tokenizer, dev, seed=args.seed + 1)
            print(f"step {step} dev {json.dumps(dev_numbers)}", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(args.out, safe_serialization=True)
            tokenizer.save_pretrained(args.out)
            print(f"saved step {step} to {args.out} ({time.time() - start:.0f}s)", flush=True)
    train_rows = lp.load("train", seed=0, n=200)
    numbers = measure(model, tokenizer, train_rows, seed=args.seed + 1)
    print(f"train split (never seen) {json.dumps(numbers)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
