"""``sdpo probe``: before training, does the model's teacher read the environment's feedback?

SDPO learns only what the self-teacher knows better than the student. The pre-flight check
(LITERATURE §3.1 rule 3, after arXiv 2605.30070: the initial student-teacher gap predicts the
gain) measures it on the model's *own failed attempts*:

    for each question: sample G attempts; keep the failed ones that got feedback   (items i)
    (a) fresh:     accuracy of new samples of the plain question                    a_i
    (b) feedback:  accuracy of samples of the teacher context with i's feedback      b_i
    (c) shuffled:  the same with another question's feedback (a failed attempt's)    c_i

each a_i, b_i, c_i the fraction correct of ``samples`` completions at the run's sampling
settings; the teacher context is the one the trainer builds (:class:`sdpo.reprompting.Reprompter`,
the config's templates, feedback only). It prints mean(b − c) and mean(b − a) with paired
bootstrap intervals over items (:func:`sdpo.evaluation.paired_bootstrap`) and a verdict:
b − c is what the feedback itself carries (the shuffled context has the same template and
length); b − a is the teacher's edge over simply trying again. Also reported: the share of
questions whose G attempts all fail (where GRPO has no signal).

:class:`TeacherProbe` logs the teacher's own generative accuracy (``teacher/probe_accuracy``) on a
fixed probe set every ``run.teacher_probe_steps`` training steps (the paper's Fig. 10, right).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sdpo.config import SDPOConfig

GOOD_GAP = 0.10  # the pre-flight rule's "go" threshold on b − c (LITERATURE §3.1)


@dataclass
class Item:
    """One failed attempt: its question's row, the feedback, and a donor's feedback."""

    row: dict[str, Any]
    feedback: str
    shuffled: str | None = None


def _sample(
    policy: Any, prompts: Sequence[Any], n: int, config: SDPOConfig, batch_size: int = 64
) -> list[str]:
    """``n`` sampled completions per prompt (prompt-major), at the config's generation settings."""
    out: list[str] = []
    per_call = max(1, batch_size // n)
    for start in range(0, len(prompts), per_call):
        ids = [policy.encode_prompt(p) for p in prompts[start : start + per_call]]
        _, _, completion_ids, completion_mask = policy.generate(ids, n, config.generation)
        out += policy.decode(completion_ids, completion_mask)
    return out


def _score(
    reward_model: Any, rows: Sequence[dict[str, Any]], completions: Sequence[str]
) -> list[Any]:
    from sdpo.reward_model import call_reward_model

    ids = [[] for _ in completions]  # the rewards here read text, not token ids
    outputs, _ = call_reward_model(reward_model, rows, completions, ids)
    return outputs


def _accuracy(
    policy: Any,
    reward_model: Any,
    rows: Sequence[dict[str, Any]],
    prompts: Sequence[Any],
    n: int,
    config: SDPOConfig,
) -> list[float]:
    """Per prompt, the fraction of ``n`` samples of ``prompts[i]`` that solve ``rows[i]``."""
    completions = _sample(policy, prompts, n, config)
    expanded = [row for row in rows for _ in range(n)]
    outputs = _score(reward_model, expanded, completions)
    threshold = config.self_distillation.success_reward_threshold
    hits = [float(o.score >= threshold) for o in outputs]
    return [sum(hits[i * n : (i + 1) * n]) / n for i in range(len(rows))]


def feedback_contexts(config: SDPOConfig, tokenizer: Any, items: Sequence[Item], shuffled: bool):
    """The trainer's teacher context (feedback only, no demonstration) for each item."""
    from sdpo.reprompting import Reprompter

    reprompter = Reprompter(config.self_distillation, tokenizer=tokenizer)
    contexts = reprompter.build(
        [it.row["prompt"] for it in items],
        [""] * len(items),
        [0.0] * len(items),  # failures: no demonstration
        list(range(len(items))),
        feedback=[it.shuffled if shuffled else it.feedback for it in items],
    )
    return [None if c is None else c.prompt for c in contexts]


def failed_attempts(
    policy: Any,
    reward_model: Any,
    rows: Sequence[dict[str, Any]],
    config: SDPOConfig,
    attempts: int,
) -> tuple[list[Item], float]:
    """Sample ``attempts`` per row; the failed attempts with feedback (at most one per row, the
    first) and the fraction of rows whose attempts all fail. Each item's ``shuffled`` feedback
    is the feedback of the item half-way round the list (another question's)."""
    completions = _sample(policy, [r["prompt"] for r in rows], attempts, config)
    expanded = [row for row in rows for _ in range(attempts)]
    outputs = _score(reward_model, expanded, completions)
    threshold = config.self_distillation.success_reward_threshold
    items: list[Item] = []
    all_fail = 0
    for q, row in enumerate(rows):
        group = outputs[q * attempts : (q + 1) * attempts]
        all_fail += all(o.score < threshold for o in group)
        failed = [o for o in group if o.score < threshold and o.feedback and o.feedback.strip()]
        if failed:
            items.append(Item(row, failed[0].feedback))
    n = len(items)
    for i, item in enumerate(items):
        for k in range(n // 2, n // 2 + n):  # the first other question from half-way round
            donor = items[(i + k) % n]
            if donor.row["prompt"] != item.row["prompt"]:
                item.shuffled = donor.feedback
                break
    items = [it for it in items if it.shuffled is not None]
    return items, all_fail / max(len(rows), 1)


def verdict(real_vs_shuffled: dict[str, float], real_vs_fresh: dict[str, float]) -> str:
    """Plain-language reading of the two gaps (differences with 95% bootstrap intervals)."""
    gap, low = real_vs_shuffled["difference"], real_vs_shuffled["low"]
    if low > 0 and gap >= GOOD_GAP:
        text = (
            "feedback helps this model: with the real feedback the teacher solves "
            f"{gap:+.0%} more of its failed attempts than with another question's; "
            "expect SDPO to learn from it"
        )
    elif low > 0:
        text = (
            f"the teacher reads the feedback, but the gain is small ({gap:+.0%}, below "
            f"{GOOD_GAP:.0%}): SDPO may help a little; compare it against GRPO"
        )
    elif gap > 0:
        text = (
            f"no clear evidence that the teacher reads the feedback (b - c = {gap:+.0%}, its "
            "interval includes 0): probe more questions (--num-questions); if that stays, use "
            "GRPO or a hybrid (SDPO + PG)"
        )
    else:
        text = (
            "the teacher does not read the feedback (real and shuffled feedback do equally well): "
            "use GRPO or a hybrid (SDPO + PG)"
        )
    if real_vs_fresh["high"] <= 0:
        text += "; the teacher is no better than a fresh attempt"
    return text + "."


def run_probe(
    policy: Any,
    reward_model: Any,
    rows: Sequence[dict[str, Any]],
    config: SDPOConfig,
    *,
    attempts: int | None = None,
    samples: int = 4,
    seed: int = 0,
) -> dict[str, Any]:
    """The pre-flight numbers (see the module docstring) on ``rows``; deterministic per ``seed``.

    Returns a dict with ``questions``, ``attempts``, ``all_fail_fraction``, ``failed_items``,
    ``accuracy`` (``fresh``, ``feedback``, ``shuffled``), ``feedback_minus_shuffled`` and
    ``feedback_minus_fresh`` (``difference``, ``low``, ``high``) and ``verdict``.
    """
    import torch  # here, not at import: `sdpo --help` needs no torch

    from sdpo.evaluation import paired_bootstrap
    from sdpo.reward_model import as_reward_model

    reward_model = as_reward_model(reward_model)
    attempts = attempts or config.num_samples_per_prompt
    devices = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.no_grad():
        torch.manual_seed(seed)
        items, all_fail = failed_attempts(policy, reward_model, rows, config, attempts)
        result: dict[str, Any] = {
            "questions": len(rows),
            "attempts": attempts,
            "samples": samples,
            "all_fail_fraction": all_fail,
            "failed_items": len(items),
        }
        if len(items) < 2:
            result["verdict"] = (
                "too few failed attempts with feedback to probe (the model solves these "
                "questions, or the reward gives no feedback)."
            )
            return result
        item_rows = [it.row for it in items]
        prompts = {
            "fresh": [it.row["prompt"] for it in items],
            "feedback": feedback_contexts(config, policy.tokenizer, items, shuffled=False),
            "shuffled": feedback_contexts(config, policy.tokenizer, items, shuffled=True),
        }
        keep = [i for i in range(len(items)) if all(p[i] is not None for p in prompts.values())]
        item_rows = [item_rows[i] for i in keep]
        acc = {}
        for name, p in prompts.items():
            torch.manual_seed(seed + 1)  # one stream per condition: equal contexts, equal samples
            acc[name] = _accuracy(
                policy, reward_model, item_rows, [p[i] for i in keep], samples, config
            )
    result["failed_items"] = len(keep)
    result["accuracy"] = {k: sum(v) / len(v) for k, v in acc.items()}
    result["feedback_minus_shuffled"] = paired_bootstrap(
        acc["feedback"], acc["shuffled"], seed=seed
    )
    result["feedback_minus_fresh"] = paired_bootstrap(acc["feedback"], acc["fresh"], seed=seed)
    result["verdict"] = verdict(result["feedback_minus_shuffled"], result["feedback_minus_fresh"])
    return result


def format_report(result: dict[str, Any]) -> str:
    """The probe's numbers as text."""
    lines = [
        f"questions {result['questions']}, {result['attempts']} attempts each: all attempts fail "
        f"on {result['all_fail_fraction']:.1%} of questions (GRPO has no signal there)",
        f"failed attempts probed: {result['failed_items']} ({result['samples']} sample(s) each)",
    ]
    if "accuracy" in result:
        acc = result["accuracy"]
        lines += [
            f"(a) fresh attempt                      {acc['fresh']:.3f}",
            f"(b) teacher with the real feedback     {acc['feedback']:.3f}",
            f"(c) teacher with shuffled feedback     {acc['shuffled']:.3f}",
        ]
        for key, name in (("feedback_minus_shuffled", "b - c"), ("feedback_minus_fresh", "b - a")):
            g = result[key]
            lines.append(
                f"{name} = {g['difference']:+.3f}  95% CI [{g['low']:+.3f}, {g['high']:+.3f}]"
            )
    lines.append(f"verdict: {result['verdict']}")
    return "\n".join(lines)


# ----- during training: the teacher's own accuracy on a fixed probe set --------------------------


class TeacherProbe:
    """Trainer callback: every ``every`` steps, the teacher's generative accuracy on fixed contexts.

    The probe set is built once, when the callback is created, from the initial model's failed
    attempts at the first ``num_prompts`` evaluation prompts (one per question, with its
    feedback); every ``every`` steps the current teacher weights (EMA copy, frozen reference or
    the live student) sample ``samples`` completions of each context, and the fraction that
    solve it is logged as ``teacher/probe_accuracy`` (the trust-region teacher, a mixture of
    logits, is probed with the student's weights). Runs on its own random stream.
    """

    def __init__(self, trainer: Any, every: int, num_prompts: int, samples: int = 2) -> None:
        import torch  # here, not at import: `sdpo --help` needs no torch

        self.every, self.samples = every, samples
        rows = trainer.eval_rows
        if not rows:
            raise ValueError(
                "run.teacher_probe_steps needs evaluation rows (an eval split or data.eval_file) "
                "to build the probe set from; set run.teacher_probe_steps=null to turn it off."
            )
        config = trainer.config
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            torch.manual_seed(config.run.seed)
            items, _ = failed_attempts(
                trainer.policy, trainer.reward_model, rows[:num_prompts], config, attempts=1
            )
        contexts = feedback_contexts(config, trainer.policy.tokenizer, items, shuffled=False)
        self.pairs = [(it.row, c) for it, c in zip(items, contexts, strict=True) if c is not None]

    def accuracy(self, trainer: Any) -> float:
        """The current teacher's accuracy on the probe set (NaN when it is empty)."""
        import torch  # here, not at import: `sdpo --help` needs no torch

        from sdpo.policy_model import PolicyModel

        if not self.pairs:
            return float("nan")
        policy = trainer.policy
        with trainer.teacher.weights.active() as model:
            teacher = PolicyModel(model=model, tokenizer=policy.tokenizer, device=policy.device)
            with torch.random.fork_rng(devices=[]), torch.no_grad():
                torch.manual_seed(trainer.config.run.seed + trainer.global_step)
                rows, prompts = zip(*self.pairs, strict=True)
                acc = _accuracy(
                    teacher, trainer.reward_model, rows, prompts, self.samples, trainer.config
                )
        return sum(acc) / len(acc)

    def on_step_end(self, trainer: Any, metrics: dict[str, float]) -> None:
        step = trainer.global_step
        if step % self.every == 0 or step == 1:
            trainer.log.metrics(step, {"teacher/probe_accuracy": self.accuracy(trainer)})


# ----- command line ------------------------------------------------------------------------------


def add_parser(sub: Any) -> None:
    """Register ``sdpo probe`` on the CLI's subparsers."""
    p = sub.add_parser(
        "probe",
        help="Pre-flight check: does the teacher read the feedback on the model's own failures?",
        description=__doc__.split("\n\n")[0],
    )
    p.add_argument("--preset", default="quickstart", help="Config preset (model, task, templates).")
    p.add_argument("--config", type=Path, help="YAML config file instead of a preset.")
    p.add_argument("--task", help="Built-in task (default: the config's data.task).")
    p.add_argument("--split", default="train", choices=["train", "eval"], help="Task split.")
    p.add_argument("--file", help="JSONL file of questions (a 'prompt' plus the reward's columns).")
    p.add_argument("--reward", help="Reward for --file: math, code, exact, or module:function.")
    p.add_argument("--model", help="Model path, hub id in the cache, or demo (default: config's).")
    p.add_argument("--num-questions", type=int, default=64, help="Questions (the first N).")
    p.add_argument("--attempts", type=int, help="Attempts per question (default: G of the config).")
    p.add_argument("--samples", type=int, default=4, help="Samples per probed context.")
    p.add_argument("--seed", type=int, default=0, help="Seed of sampling and the bootstrap.")
    p.add_argument("--json", type=Path, help="Also write the numbers to this JSON file.")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="Config overrides.")


def main(args: argparse.Namespace) -> int:
    """``sdpo probe``: print the report (and write ``--json``)."""
    from sdpo.policy_model import PolicyModel
    from sdpo.sources import rows_and_reward

    config = SDPOConfig.from_yaml(args.config) if args.config else SDPOConfig.preset(args.preset)
    config.apply_overrides(args.overrides)
    if args.model:
        config.model_name = args.model
    if args.file and not args.reward:
        raise SystemExit("sdpo probe: --file needs --reward (math, code, exact, module:fn).")
    source = args.file or args.task or config.data.task
    if not source:
        raise SystemExit("sdpo probe: give --task NAME, or --file with --reward.")
    rows, reward = rows_and_reward(source, args.split, reward=args.reward, seed=config.run.seed)
    rows = rows[: args.num_questions]
    policy = PolicyModel(config.model_name, device=config.model.device, dtype=config.model.dtype)
    result = run_probe(
        policy, reward, rows, config, attempts=args.attempts, samples=args.samples, seed=args.seed
    )
    print(f"sdpo probe: model {config.model_name}, {len(rows)} questions")
    print(format_report(result))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=1) + "\n")
    return 0
