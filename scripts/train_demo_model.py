"""Train the demo model shipped in ``src/sdpo/demo/model`` from scratch (CPU, float32, deterministic).

A ~1M-parameter Llama with a character-level tokenizer learns addition from a mixture:

- plain ``Q: 47+85=`` -> ``132<eos>`` examples with 1-, 2- and 3-digit operands (40/40/20%); the
  quickstart task is 2-digit addition (``sdpo.tasks.arithmetic`` defaults);
- questions in the SPEC §3 teacher template with a correct demonstration (target: the demonstrated
  answer; half of them at the longest length, half at any), so the model can act as its own teacher;
- questions in the teacher context the trainer builds from feedback alone
  (:func:`sdpo.demo.feedback_prompt`) with :func:`sdpo.tasks.arithmetic.feedback_for` on a wrong
  answer drawn like the model's own mistakes (mostly the last digit off by 1-3, else a carry or a
  digit slip; target: the right answer), so the teacher learns to read "Your answer 122 is too
  small. Its last digit is wrong." -- which never contains the answer -- and answer better than
  a fresh attempt (16 per step, half at the quickstart length).

Loss is on answer tokens + EOS only (train-split problems only). With seed 0, 2-digit accuracy
stays below ~11% for 450 steps while the 1-digit and copy skills settle (copy >90% from ~step
400), then jumps (18% at step 475, 41% at step 525). Every ``--eval-every`` steps the script
measures greedy accuracy on held-out quickstart problems (a dev set from the train split), plain
and with a demonstration, and stops at the first checkpoint whose accuracy with a demonstration
is >= ``--min-copy``, whose plain accuracy lies in ``--band``, and which reads feedback: on its
own wrong greedy answers to 200 dev problems, greedy decoding of the feedback teacher context is
right at least 2x (and 0.15 more) as often as a fresh sampled attempt (seed 0: step 550). It then
reports accuracy on the arithmetic eval split (greedy and sampled at T=1; plain, with a correct
demonstration, with feedback on a drawn wrong answer, and the own-mistakes retry), saves the
weights and exits non-zero if the required properties fail. With one thread the run is
deterministic: seed 0 reproduces the shipped weights bit for bit.

    python scripts/train_demo_model.py [--out DIR] [--seed 0]
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
    DEMO_MODEL_DIR,
    build_char_tokenizer,
    encode_batch,
    feedback_prompt,
    generate_completions,
    teacher_prompt,
    tiny_llama_config,
)
from sdpo.tasks import arithmetic, in_split


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--out", type=Path, default=DEMO_MODEL_DIR, help="Directory the weights are saved to."
    )
    p.add_argument("--seed", type=int, default=0, help="Seed of initialization, data and sampling.")
    p.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads (1: results do not depend on core count, and a busy shared machine does not stall it).",
    )
    p.add_argument(
        "--max-steps", type=int, default=1500, help="Give up (exit 1) after this many steps."
    )
    p.add_argument("--lr", type=float, default=2e-3, help="Peak AdamW learning rate.")
    p.add_argument("--warmup-steps", type=int, default=100, help="Linear warm-up steps.")
    p.add_argument(
        "--plain-per-step", type=int, default=128, help="Plain question->answer examples per step."
    )
    p.add_argument(
        "--demo-per-step",
        type=int,
        default=32,
        help="Teacher-template examples with a demonstration per step.",
    )
    p.add_argument(
        "--feedback-per-step",
        type=int,
        default=16,
        help="Teacher-template examples with feedback on a wrong answer per step.",
    )
    p.add_argument(
        "--digit-weights",
        type=float,
        nargs="+",
        default=[0.4, 0.4, 0.2],
        help="Share of 1-, 2-, ..., n-digit plain examples.",
    )
    p.add_argument(
        "--quick-digits",
        type=int,
        default=arithmetic.DIGITS,
        help="Operand digits of the quickstart task (the stopping band is measured on it).",
    )
    p.add_argument(
        "--eval-every",
        type=int,
        default=25,
        help="Check the stopping criterion every N steps.",
    )
    p.add_argument(
        "--dev-size",
        type=int,
        default=300,
        help="Held-out quickstart problems for the stopping criterion.",
    )
    p.add_argument(
        "--band",
        type=float,
        nargs=2,
        default=[0.25, 0.45],
        help="Stop once plain greedy dev accuracy lies in [low, high] ...",
    )
    p.add_argument(
        "--min-copy",
        type=float,
        default=0.9,
        help="... and greedy dev accuracy with a demonstration is at least this.",
    )
    p.add_argument(
        "--save-every-eval",
        action="store_true",
        help="Also save a checkpoint at every evaluation (for experiments).",
    )
    p.add_argument(
        "--eval-size",
        type=int,
        default=500,
        help="Arithmetic eval-split prompts of the final report.",
    )
    return p.parse_args()


class Mixture:
    """Draws training examples (prompt, answer) from the arithmetic train split only."""

    def __init__(
        self, rng: random.Random, digit_weights: list[float], quick_digits: int = arithmetic.DIGITS
    ):
        self.rng = rng
        self.digit_weights = digit_weights
        self.quick_digits = quick_digits
        self.digits = list(range(1, len(digit_weights) + 1))

    def problem(self, digits: int | None = None) -> dict:
        digits = digits or self.rng.choices(self.digits, self.digit_weights)[0]
        while True:
            row = arithmetic.random_problem(self.rng, digits, arithmetic.OPERATIONS)
            if in_split(row["prompt"], "train", arithmetic.EVAL_FRACTION):
                return row

    def plain(self) -> tuple[str, str]:
        row = self.problem()
        return row["prompt"], row["answer"]

    def demonstration(self) -> tuple[str, str]:
        # Half at the longest length (the hardest to copy), half at any length.
        row = self.problem(
            self.digits[-1] if self.rng.random() < 0.5 else self.rng.choice(self.digits)
        )
        return teacher_prompt(row["prompt"], row["answer"]), row["answer"]

    def feedback(self, row: dict | None = None) -> tuple[str, str]:
        # Half at the quickstart length (where the feedback is used), half at any length.
        row = row or self.problem(self.quick_digits if self.rng.random() < 0.5 else None)
        wrong = self.wrong_answer(row["answer"])
        return feedback_prompt(row["prompt"], arithmetic.feedback_for(wrong, row["answer"])), row[
            "answer"
        ]

    def wrong_answer(self, answer: str) -> str:
        """A mistake like the model's own: mostly a last digit off by 1-3, else a carry or digit slip.

        The demo model's wrong greedy 2-digit sums are off by -1 (32%), +1 (21%), +-2 (19%), +3
        (6%), +-10 (3%), +-9 (2%) or more (15%).
        """
        value = int(answer)
        kind = self.rng.random()
        if kind < 0.5:
            wrong = value + self.rng.choice([-1, 1])
        elif kind < 0.7:
            wrong = value + self.rng.choice([-3, -2, 2, 3])
        elif kind < 0.8:  # a missed or extra carry into the tens
            wrong = value + self.rng.choice([-10, 10])
        elif kind < 0.85:  # ... and a slipped last digit
            wrong = value + self.rng.choice([-11, -9, 9, 11])
        elif kind < 0.95:  # anything nearby
            wrong = value + self.rng.randint(-30, 30)
        elif kind < 0.975:  # a dropped leading digit
            wrong = int(answer[1:] or 0)
        else:  # an extra digit
            wrong = value * 10 + self.rng.randrange(10)
        wrong = max(wrong, 0)
        return str(wrong if wrong != value else value + 1)


def answer_loss(model, tokenizer, examples: list[tuple[str, str]]) -> tuple[torch.Tensor, int]:
    """Summed cross-entropy over answer tokens, and how many tokens it covers."""
    input_ids, attention_mask, labels = encode_batch(tokenizer, examples)
    logits = model(input_ids=input_ids, attention_mask=attention_mask).logits[:, :-1]
    targets = labels[:, 1:]
    loss = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), targets.reshape(-1), ignore_index=-100, reduction="sum"
    )
    return loss, int((targets != -100).sum())


def accuracy(
    model,
    tokenizer,
    rows: list[dict],
    demonstration: bool,
    do_sample: bool,
    seed: int = 0,
    key: str = "prompt",
) -> float:
    """Share of ``rows`` answered exactly: prompted by ``row[key]``, or with the answer as demonstration."""
    prompts = [teacher_prompt(r["prompt"], r["answer"]) if demonstration else r[key] for r in rows]
    torch.manual_seed(seed)
    completions = generate_completions(model, tokenizer, prompts, do_sample=do_sample)
    return sum(c.strip() == r["answer"] for c, r in zip(completions, rows, strict=True)) / len(rows)


def own_mistakes(model, tokenizer, rows: list[dict], seed: int = 0) -> dict:
    """Retrying the model's own wrong greedy answers: plain (sampled) vs with the feedback (greedy).

    For every row the model answers wrongly with greedy decoding, the retry is either the plain
    question sampled at T = 1 (what a fresh attempt gets) or greedy decoding of the teacher
    context the trainer builds from that attempt's feedback (:func:`sdpo.demo.feedback_prompt`).
    """
    answers = generate_completions(model, tokenizer, [r["prompt"] for r in rows])
    wrong = [(r, a.strip()) for r, a in zip(rows, answers, strict=True) if a.strip() != r["answer"]]
    missed = [
        {
            **r,
            "own_feedback_prompt": feedback_prompt(
                r["prompt"], arithmetic.feedback_for(a, r["answer"])
            ),
        }
        for r, a in wrong
    ]
    return {
        "wrong": len(missed),
        "plain_sampled": accuracy(model, tokenizer, missed, False, do_sample=True, seed=seed),
        "feedback_greedy": accuracy(
            model, tokenizer, missed, False, do_sample=False, key="own_feedback_prompt"
        ),
        "feedback_sampled": accuracy(
            model, tokenizer, missed, False, do_sample=True, seed=seed, key="own_feedback_prompt"
        ),
    }


def reads_feedback(own: dict) -> bool:
    """Whether retrying with feedback (greedy) is clearly above a plain retry (sampled): 2x and +0.15."""
    return own["feedback_greedy"] >= max(2 * own["plain_sampled"], own["plain_sampled"] + 0.15)


def main() -> int:
    args = parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    tokenizer = build_char_tokenizer()
    model = LlamaForCausalLM(tiny_llama_config(vocab_size=len(tokenizer)))
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.98), weight_decay=0.01
    )
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: min(1.0, (s + 1) / args.warmup_steps)
    )
    mixture = Mixture(rng, args.digit_weights, args.quick_digits)
    dev = [mixture.problem(args.quick_digits) for _ in range(args.dev_size)]
    others = [d for d in range(1, len(args.digit_weights) + 1) if d != args.quick_digits]
    dev_other = {d: [mixture.problem(d) for _ in range(100)] for d in others}
    print(
        f"params {sum(p.numel() for p in model.parameters()):,}; quickstart = arithmetic, {args.quick_digits}-digit {arithmetic.OPERATIONS}"
    )

    start = time.time()
    for step in range(1, args.max_steps + 1):
        model.train()
        groups = [
            [mixture.plain() for _ in range(args.plain_per_step)],
            [mixture.demonstration() for _ in range(args.demo_per_step)],
            [mixture.feedback() for _ in range(args.feedback_per_step)],
        ]
        losses, tokens = zip(*(answer_loss(model, tokenizer, g) for g in groups if g), strict=True)
        loss = sum(losses) / sum(tokens)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        if step % args.eval_every:
            continue
        model.eval()
        base = accuracy(model, tokenizer, dev, demonstration=False, do_sample=False)
        copy = accuracy(model, tokenizer, dev[:100], demonstration=True, do_sample=False)
        ready = copy >= args.min_copy and args.band[0] <= base <= args.band[1]
        # Retrying own mistakes (the slowest check): when it decides, and every 4th evaluation.
        own = (
            own_mistakes(model, tokenizer, dev[:200])
            if ready or step % (4 * args.eval_every) == 0
            else None
        )
        retried = (
            ""
            if own is None
            else f"  own mistakes retried plain {own['plain_sampled']:.2f} / with feedback {own['feedback_greedy']:.2f}"
        )
        other = " ".join(
            f"{d}-digit {accuracy(model, tokenizer, r, False, False):.2f}"
            for d, r in dev_other.items()
        )
        print(
            f"step {step:5d}  loss {loss.item():.4f}  dev plain {base:.3f}  with demonstration {copy:.3f}{retried}  ({other})  {time.time() - start:5.0f}s",
            flush=True,
        )
        if args.save_every_eval:
            model.save_pretrained(args.out / f"step-{step}", safe_serialization=True)
        if ready and reads_feedback(own):
            break
    else:
        print(f"FAILED: the stopping criterion was not met within {args.max_steps} steps")
        return 1
    train_seconds = time.time() - start

    model.eval()
    rows = arithmetic.load("eval", seed=0, n=args.eval_size, digits=args.quick_digits)
    wrong_answers = Mixture(
        random.Random(f"eval:{args.seed}"), args.digit_weights, args.quick_digits
    )
    for row in rows:  # the arithmetic reward's feedback on a plausible wrong answer
        row["feedback_prompt"] = wrong_answers.feedback(row)[0]
    report = {
        "step": step,
        "train_seconds": round(train_seconds),
        "eval_prompts": len(rows),
        "base_greedy": accuracy(model, tokenizer, rows, demonstration=False, do_sample=False),
        "base_sampled": accuracy(
            model, tokenizer, rows, demonstration=False, do_sample=True, seed=args.seed
        ),
        "teacher_greedy": accuracy(model, tokenizer, rows, demonstration=True, do_sample=False),
        "teacher_sampled": accuracy(
            model, tokenizer, rows, demonstration=True, do_sample=True, seed=args.seed
        ),
        "feedback_teacher_greedy": accuracy(
            model, tokenizer, rows, demonstration=False, do_sample=False, key="feedback_prompt"
        ),
        "feedback_teacher_sampled": accuracy(
            model, tokenizer, rows, False, do_sample=True, seed=args.seed, key="feedback_prompt"
        ),
        "own_mistakes": own_mistakes(model, tokenizer, rows, seed=args.seed),
    }
    print(json.dumps(report, indent=2))
    args.out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(args.out, safe_serialization=True)
    tokenizer.save_pretrained(
        args.out
    )  # a standard model directory; load_demo_model() builds its own
    print(f"saved to {args.out}")

    problems = []
    if not 0.10 <= report["base_greedy"] <= 0.60:
        problems.append(f"base greedy accuracy {report['base_greedy']:.3f} is outside [0.10, 0.60]")
    if report["teacher_greedy"] < 1.5 * report["base_greedy"]:
        problems.append("accuracy with a demonstration is below 1.5x the base accuracy")
    if report["base_sampled"] < 0.05:
        problems.append(
            f"sampled base accuracy {report['base_sampled']:.3f} leaves RL groups without successes"
        )
    own = report["own_mistakes"]
    if not reads_feedback(own):
        problems.append(
            f"retrying its own wrong answers with feedback ({own['feedback_greedy']:.3f}, greedy) is "
            f"not clearly above retrying them plainly ({own['plain_sampled']:.3f}, sampled)"
        )
    for problem in problems:
        print(f"FAILED: {problem}")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
