"""Does the SmolLM2 example's self-teacher do better than its student? (docs/examples/smollm2.md)

Greedy completions of the base model on the first N training questions, in the student's prompt and
in the teacher contexts the trainer builds (``sdpo.reprompting.Reprompter``) for a failed attempt
with the format feedback, with earlier chat turns dropped (the official construction, the default)
or folded into the question, without and with a correct sibling answer. Prints how many answers
are boxed and right. Needs ``python scripts/fetch_smollm2.py`` first.

    python scripts/smollm2_teacher_contexts.py [--questions 24]
"""

from __future__ import annotations

import argparse
import copy
import json
import re

import torch

from sdpo import PolicyModel, SDPOConfig
from sdpo.reprompting import Reprompter

FEEDBACK = "No final answer found. Write the final answer as \\boxed{...}."


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="examples/smollm2_math.yaml")
    p.add_argument("--questions", type=int, default=24)
    args = p.parse_args()
    torch.set_num_threads(1)
    cfg = SDPOConfig.from_yaml(args.config)
    policy = PolicyModel(cfg.model_name, device="cpu")
    with open(cfg.data.train_file) as f:
        rows = [json.loads(line) for line in f][: args.questions]
    n = len(rows)
    prompts = [r["prompt"] for r in rows]

    def greedy(contexts: list) -> list[str]:
        out = []
        for i in range(0, len(contexts), 8):
            ids = [policy.encode_prompt(c) for c in contexts[i : i + 8]]
            _, _, completion_ids, mask = policy.generate(ids, 1, cfg.generation, greedy=True)
            out += policy.decode(completion_ids, mask)
        return out

    def report(name: str, completions: list[str]) -> None:
        boxed = right = 0
        for c, r in zip(completions, rows, strict=True):
            answers = re.findall(r"\\boxed\{([^}]*)\}", c)
            boxed += bool(answers)
            right += bool(answers) and answers[-1].strip() == str(r["answer"]).strip()
        print(f"| {name} | {boxed}/{n} | {right}/{n} |", flush=True)

    print("| context | answers boxed | right |\n|---|---|---|")
    report("student prompt", greedy(prompts))
    wrong = ["I think the answer is 7."] * n
    demos = [f"The answer is \\boxed{{{r['answer']}}}." for r in rows]
    for mode in ("drop", "fold"):
        sd = copy.deepcopy(cfg.self_distillation)
        sd.chat_earlier_turns = mode
        reprompter = Reprompter(sd, tokenizer=policy.tokenizer, seed=0)
        ctx = reprompter.build(prompts, wrong, [0.0] * n, list(range(n)), feedback=[FEEDBACK] * n)
        report(f"teacher ({mode}), format feedback", greedy([c.prompt for c in ctx]))
        ctx = reprompter.build(  # each failed attempt's group also holds a correct answer
            prompts * 2,
            wrong + demos,
            [0.0] * n + [1.0] * n,
            list(range(n)) * 2,
            feedback=[FEEDBACK] * n + [None] * n,
        )
        report(f"teacher ({mode}), feedback + correct sibling", greedy([c.prompt for c in ctx[:n]]))


if __name__ == "__main__":
    main()
