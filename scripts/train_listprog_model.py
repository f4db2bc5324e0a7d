"""Train the list-program model shipped in ``src/sdpo/demo/listprog`` from scratch (CPU, deterministic).

A small Llama with the demo's character-level tokenizer learns the list language of
:mod:`sdpo.tasks.listprog` from a mixture drawn *only* from the task's ``model`` range of programs
(disjoint by behaviour from the ``train`` and ``eval`` splits the RL runs use):

- plain ``examples -> program`` (``--plain-per-step``);
- revisions: the question in the teacher context the trainer builds from feedback alone with the
  ``listprog`` preset (:func:`sdpo.tasks.listprog.feedback_context`) with :func:`sdpo.tasks.listprog.feedback_for` on a wrong
  attempt -> the right program (``--revision-per-step``). The wrong attempt is the right program
  with one or two edits (an argument or operation changed, a step dropped, inserted or swapped)
  or, sometimes, another task's program: like a model's near misses and far misses;
- demonstrations: the teacher template with a correct program -> that program (so the teacher
  copies a successful sibling, ``--demo-per-step``).

Loss is on program tokens + EOS only. Every ``--eval-every`` steps it measures, on held-out
``model``-range tasks: plain greedy accuracy (all hidden tests pass), and on the plain greedy
attempts that fail, greedy accuracy of the teacher context with that attempt's real feedback vs
with another task's feedback. After ``--steps`` steps it saves the weights, and then prints the
same numbers on the ``train`` split (the tasks RL trains on, never seen here). With one thread and
a seed the run is deterministic.

    python scripts/train_listprog_model.py [--out DIR] [--seed 0] [--steps 700]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch
from transformers import LlamaForCausalLM

from sdpo.demo import (
    LISTPROG_MODEL_DIR,
    build_char_tokenizer,
    generate_completions,
    tiny_llama_config,
)
from sdpo.tasks import listprog as lp


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", type=Path, default=LISTPROG_MODEL_DIR, help="Where to save.")
    p.add_argument("--seed", type=int, default=0, help="Seed of initialization, data, sampling.")
    p.add_argument("--threads", type=int, default=1, help="CPU threads (1: deterministic).")
    p.add_argument(
        "--steps", type=int, default=700, help="Optimizer steps (700: the shipped weights)."
    )
    p.add_argument("--lr", type=float, default=3e-3, help="Peak AdamW learning rate.")
    p.add_argument("--warmup-steps", type=int, default=50, help="Linear warm-up steps.")
    p.add_argument(
        "--pool", type=int, default=3000, help="model-range tasks to draw examples from."
    )
    p.add_argument("--plain-per-step", type=int, default=24)
    p.add_argument("--revision-per-step", type=int, default=24)
    p.add_argument("--demo-per-step", type=int, default=4)
    p.add_argument("--hidden", type=int, default=64, help="Model width.")
    p.add_argument("--layers", type=int, default=2, help="Transformer layers.")
    p.add_argument("--eval-every", type=int, default=100, help="Evaluate every N steps.")
    p.add_argument("--dev-size", type=int, default=100, help="Held-out model-range tasks.")
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


class Mixture:
    """Training examples (prompt, target) from a pool of ``model``-range tasks."""

    def __init__(self, rng: random.Random, pool: list[dict]):
        self.rng, self.pool = rng, pool

    def plain(self) -> tuple[str, str]:
        row = self.rng.choice(self.pool)
        return row["prompt"], row["program"]

    def demonstration(self) -> tuple[str, str]:
        row = self.rng.choice(self.pool)
        return lp.demonstration_context(row["prompt"], row["program"]), row["program"]

    def wrong_attempt(self, row: dict) -> str:
        """A failing program: one or two edits of the right one, or another task's program."""
        for _ in range(20):
            if self.rng.random() < 0.15:
                attempt = self.rng.choice(self.pool)["program"]
            else:
                steps = lp.parse(row["program"])
                for _ in range(1 if self.rng.random() < 0.7 else 2):
                    steps = edit(steps, self.rng)
                attempt = lp.format_program(steps)
            if not all(lp.passes(attempt, row["tests"])):
                return attempt
        return "rev | rev"

    def revision(self) -> tuple[str, str]:
        row = self.rng.choice(self.pool)
        feedback = lp.feedback_for(self.wrong_attempt(row), row["shown"])
        return lp.feedback_context(row["prompt"], feedback), row["program"]


def encode_batch(tokenizer, examples: list[tuple[str, str]]):
    """Left-padded ids, attention mask and labels (-100 except target + EOS)."""
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


def measure(model, tokenizer, rows: list[dict]) -> dict:
    """Plain greedy accuracy; on its failed attempts, greedy teacher accuracy with the real
    feedback vs another failed task's feedback (a cyclic shift)."""
    gen = lambda prompts: generate_completions(  # noqa: E731
        model, tokenizer, prompts, max_new_tokens=40, batch_size=64
    )
    attempts = gen([r["prompt"] for r in rows])
    ok = solved(attempts, rows)
    failed = [(r, a.strip()) for r, a, o in zip(rows, attempts, ok, strict=True) if not o]
    out = {"plain_greedy": sum(ok) / len(rows), "failed": len(failed)}
    if len(failed) < 2:
        return out
    feedback = [lp.feedback_for(a, r["shown"]) for r, a in failed]
    shuffled = feedback[1:] + feedback[:1]
    fr = [r for r, _ in failed]
    real = solved(
        gen([lp.feedback_context(r["prompt"], f) for r, f in zip(fr, feedback, strict=True)]), fr
    )
    shuf = solved(
        gen([lp.feedback_context(r["prompt"], f) for r, f in zip(fr, shuffled, strict=True)]), fr
    )
    out["teacher_real"] = sum(real) / len(fr)
    out["teacher_shuffled"] = sum(shuf) / len(fr)
    return out


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t0 = time.time()
    tasks = lp.draw_tasks("model", args.pool + args.dev_size, seed=args.seed)
    dev, pool = tasks[: args.dev_size], tasks[args.dev_size :]
    print(
        f"{len(pool)} model-range tasks in the pool, {len(dev)} held out ({time.time() - t0:.0f}s)"
    )
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
    # Constant after warm-up, so the weights saved at any evaluation equal those of a run with
    # --steps set to that step (a run cut short still ships reproducible weights).
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps)
    )
    mixture = Mixture(rng, pool)
    start = time.time()
    for step in range(1, args.steps + 1):
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
            print(
                f"step {step:5d}  loss {loss.item():.4f}  {time.time() - start:5.0f}s", flush=True
            )
        if step % args.eval_every == 0 or step == args.steps:
            model.eval()
            print(f"step {step} dev {json.dumps(measure(model, tokenizer, dev))}", flush=True)
            args.out.mkdir(parents=True, exist_ok=True)
            model.save_pretrained(args.out, safe_serialization=True)
            tokenizer.save_pretrained(args.out)
            print(f"saved step {step} to {args.out} ({time.time() - start:.0f}s)", flush=True)
    train_rows = lp.load("train", seed=0, n=200)
    print(f"train split (never seen) {json.dumps(measure(model, tokenizer, train_rows))}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
