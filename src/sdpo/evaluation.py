"""Evaluation: pass@k, maj@k, mean@n and a paired bootstrap, and the loop that measures them.

The figures are pure functions of per-prompt counts (``num_samples`` n, ``num_correct`` c) and, for
maj@k, of the extracted answers; :func:`evaluate_policy` generates, scores and returns those
per-prompt records together with the figures, so anyone can recompute every number from them.
The trainer's periodic evaluation and ``sdpo eval`` both call :func:`evaluate_policy`.

    pass@k = 1 − C(n−c, k) / C(n, k)      (unbiased; Chen et al. 2021)
    mean@n = c / n  (= pass@1)
    maj@k  = E over size-k subsets of the samples [ the most frequent answer is correct ]
"""

from __future__ import annotations

import itertools
import math
import random
from collections import Counter
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from sdpo import checkpoint as ckpt
from sdpo.config import GenerationConfig
from sdpo.policy_model import completion_id_lists
from sdpo.reward_model import RewardModel, call_reward_model, normalize_answer, success_scores

# ----- the figures (pure) ------------------------------------------------------------------------


def pass_at_k(n: int, c: int, k: int) -> float:
    """Unbiased pass@k of one prompt: ``1 − C(n−c, k) / C(n, k)``.

    The probability that at least one of ``k`` samples drawn without replacement from ``n`` (of
    which ``c`` are correct) is correct. Computed as ``1 − ∏_{i=n−c+1}^{n} (1 − k/i)``, which
    never forms the (huge) binomials.
    """
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got n={n}, c={c}.")
    if not 1 <= k <= n:
        raise ValueError(f"pass_at_k: need 1 <= k <= n, got k={k}, n={n}.")
    if n - c < k:
        return 1.0
    prod = 1.0
    for i in range(n - c + 1, n + 1):
        prod *= 1.0 - k / i
    return 1.0 - prod


def majority_vote_accuracy(
    answers: Sequence[Hashable | None],
    correct: Sequence[bool],
    k: int,
    max_subsets: int = 20_000,
    seed: int = 0,
) -> float:
    """maj@k of one prompt: the expected correctness of the majority answer of ``k`` samples.

    Averaged over every size-``k`` subset of the ``n`` samples (or over ``max_subsets`` subsets
    drawn with ``seed`` when C(n, k) is larger). Samples whose answer is ``None`` (nothing could be
    extracted) do not vote; a subset where nobody votes counts as wrong. Ties are broken uniformly
    at random, in expectation: the subset scores the fraction of its tied answers that are correct.
    An answer is correct when its samples are (the mean of their correctness, normally 0 or 1).
    """
    n = len(answers)
    if len(correct) != n:
        raise ValueError(
            f"majority_vote_accuracy: {n} answers but {len(correct)} correctness flags."
        )
    if not 1 <= k <= n:
        raise ValueError(f"majority_vote_accuracy: need 1 <= k <= n, got k={k}, n={n}.")
    verdicts: dict[Hashable, list[bool]] = {}
    for a, ok in zip(answers, correct, strict=True):
        if a is not None:
            verdicts.setdefault(a, []).append(bool(ok))
    answer_correct = {a: sum(v) / len(v) for a, v in verdicts.items()}

    def vote(subset: Sequence[int]) -> float:
        counts = Counter(answers[i] for i in subset if answers[i] is not None)
        if not counts:
            return 0.0
        top = max(counts.values())
        tied = [a for a, cnt in counts.items() if cnt == top]
        return sum(answer_correct[a] for a in tied) / len(tied)

    if math.comb(n, k) <= max_subsets:
        subsets: Any = itertools.combinations(range(n), k)
        total, count = 0.0, 0
        for s in subsets:
            total += vote(s)
            count += 1
        return total / count
    rng = random.Random(seed)
    return sum(vote(rng.sample(range(n), k)) for _ in range(max_subsets)) / max_subsets


def paired_bootstrap(
    a: Sequence[float],
    b: Sequence[float],
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, float]:
    """Mean of ``a − b`` over paired items and a percentile bootstrap confidence interval.

    ``a[i]`` and ``b[i]`` are two models' scores on the same item ``i`` (e.g. per-prompt c/n);
    items are resampled with replacement ``num_resamples`` times. Returns ``difference``,
    ``low`` and ``high`` (the ``(1 ± confidence)/2`` quantiles of the resampled mean differences).
    """
    if len(a) != len(b) or not a:
        raise ValueError(
            f"paired_bootstrap: needs two equally long, non-empty score lists (got {len(a)}, {len(b)})."
        )
    diffs = torch.tensor(
        [float(x) - float(y) for x, y in zip(a, b, strict=True)], dtype=torch.float64
    )
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(len(diffs), (num_resamples, len(diffs)), generator=gen)
    means = diffs[idx].mean(dim=1)
    tail = (1.0 - confidence) / 2
    low, high = torch.quantile(means, torch.tensor([tail, 1.0 - tail], dtype=torch.float64))
    return {"difference": float(diffs.mean()), "low": float(low), "high": float(high)}


def summarize(records: Sequence[dict[str, Any]], max_subsets: int = 20_000) -> dict[str, float]:
    """The aggregate figures of per-prompt records (as written by :func:`evaluate_policy`).

    Each record has ``num_samples`` n, ``num_correct`` c, ``rewards``, ``completion_lengths`` and
    optionally ``answers`` (one per sample, None when not extractable), ``greedy_reward`` and
    ``greedy_correct``. Returns ``accuracy_sampled`` (= mean@n = pass@1), ``reward_sampled``,
    ``mean@n``, ``pass@k`` for every k ≤ n, ``maj@k`` for every k ≤ n when every record has
    answers, ``mean_completion_length`` and, with greedy results, ``accuracy_greedy`` and
    ``reward_greedy``. Prompts are weighted equally.
    """
    if not records:
        return {"num_prompts": 0}
    n = min(int(r["num_samples"]) for r in records)
    m: dict[str, float] = {"num_prompts": len(records), "num_samples": n}
    if any("greedy_correct" in r for r in records):
        greedy = [r for r in records if "greedy_correct" in r]
        m["accuracy_greedy"] = _mean(float(r["greedy_correct"]) for r in greedy)
        m["reward_greedy"] = _mean(float(r["greedy_reward"]) for r in greedy)
    if n == 0:
        return m
    m["accuracy_sampled"] = _mean(r["num_correct"] / r["num_samples"] for r in records)
    m["reward_sampled"] = _mean(_mean(r["rewards"]) for r in records)
    m["mean_completion_length"] = _mean(_mean(r["completion_lengths"]) for r in records)
    m[f"mean@{n}"] = m["accuracy_sampled"]
    for k in range(1, n + 1):
        m[f"pass@{k}"] = _mean(pass_at_k(r["num_samples"], r["num_correct"], k) for r in records)
    if all(r.get("answers") is not None for r in records):
        for k in range(1, n + 1):
            m[f"maj@{k}"] = _mean(
                majority_vote_accuracy(
                    r["answers"], r["correct"], k, max_subsets=max_subsets, seed=i
                )
                for i, r in enumerate(records)
            )
    return m


def _mean(values: Any) -> float:
    values = list(values)
    return sum(values) / len(values) if values else float("nan")


# ----- the loop ---------------------------------------------------------------------------------


@dataclass
class EvalResult:
    """What one evaluation measured: the figures and the per-prompt records they come from."""

    metrics: dict[str, float]
    records: list[dict[str, Any]] = field(default_factory=list)
    skipped_prompts: int = 0


def extracted_answer(info: dict[str, Any]) -> str | None:
    """The comparable answer a reward model extracted (``info['extracted_answer']``), normalized."""
    answer = info.get("extracted_answer") if isinstance(info, dict) else None
    return None if answer is None else normalize_answer(str(answer))


@torch.no_grad()
def evaluate_policy(
    policy: Any,
    reward_model: RewardModel,
    rows: Sequence[dict[str, Any]],
    *,
    generation: GenerationConfig,
    num_samples: int = 1,
    success_threshold: float = 1.0,
    seed: int = 0,
    batch_size: int = 64,
    max_prompt_length: int | None = None,
    greedy: bool = True,
    trainer_state: Any = None,
    sampler: Any = None,
    progress: Any = None,
    reward_timeout_s: float | None = None,
) -> EvalResult:
    """Greedy and ``num_samples`` sampled completions per prompt, scored by ``reward_model``.

    Runs on its own random stream seeded with ``seed`` (the caller's stream is restored), so the
    same seed gives the same evaluation and evaluating never changes what training samples next.
    ``batch_size`` is the number of completions generated per call. Prompts longer than
    ``max_prompt_length`` tokens are skipped and counted. Correct = success score >=
    ``success_threshold`` (the reward; with several functions, the success rule of
    :func:`sdpo.reward_model.success_scores`).
    ``trainer_state`` reaches the reward functions (TRL's keyword; default: a fresh one).
    ``sampler``: the run's :class:`~sdpo.generation.GenerationBackend` (e.g. vLLM), so evaluation
    samples as training does; default: the policy's own HF sampler with ``generation``.
    ``progress`` (e.g. :class:`sdpo.progress.Progress`) gets ``update(n)`` per generated batch of
    n completions and ``close()`` at the end.
    ``reward_timeout_s``: a reward call longer than this raises
    :class:`~sdpo.reward_model.RewardTimeoutError` (``data.reward_timeout_s``, as in training).
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}.")
    encoded, kept = [], []
    for row in rows:
        ids = policy.encode_prompt(row["prompt"])
        if max_prompt_length is not None and len(ids) > max_prompt_length:
            continue
        encoded.append(ids)
        kept.append(row)
    records: list[dict[str, Any]] = [
        {"prompt": row["prompt"], "num_samples": num_samples} for row in kept
    ]
    devices = [policy.device] if policy.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        if greedy:
            _generate_and_score(
                policy, reward_model, kept, encoded, records, 1, generation, True, batch_size,
                success_threshold, trainer_state, sampler, progress, reward_timeout_s,
            )  # fmt: skip
        _generate_and_score(
            policy, reward_model, kept, encoded, records, num_samples, generation, False,
            batch_size, success_threshold, trainer_state, sampler, progress, reward_timeout_s,
        )  # fmt: skip
    if progress is not None:
        progress.close()
    return EvalResult(summarize(records), records, skipped_prompts=len(rows) - len(kept))


def _generate_and_score(
    policy: Any,
    reward_model: RewardModel,
    rows: list[dict[str, Any]],
    encoded: list[list[int]],
    records: list[dict[str, Any]],
    g: int,
    generation: GenerationConfig,
    greedy: bool,
    batch_size: int,
    threshold: float,
    trainer_state: Any = None,
    sampler: Any = None,
    progress: Any = None,
    reward_timeout_s: float | None = None,
) -> None:
    """Fill ``records`` with ``g`` completions per prompt (greedy: the ``greedy_*`` fields)."""
    per_call = max(1, batch_size // g)
    for start in range(0, len(rows), per_call):
        batch, ids = rows[start : start + per_call], encoded[start : start + per_call]
        if sampler is None:
            _, _, completion_ids, completion_mask = policy.generate(
                ids, g, generation, greedy=greedy
            )
        else:
            out = sampler.generate(ids, g, greedy=greedy)
            completion_ids, completion_mask = out.completion_ids, out.completion_mask
        completions = policy.decode(completion_ids, completion_mask)
        expanded = [row for row in batch for _ in range(g)]
        outputs, _ = call_reward_model(
            reward_model,
            expanded,
            completions,
            completion_id_lists(completion_ids, completion_mask),
            trainer_state=trainer_state,
            timeout_s=reward_timeout_s,
        )
        lengths = completion_mask.sum(-1).tolist()
        judged = success_scores(reward_model, outputs)  # several functions: the success rule
        if progress is not None:
            progress.update(len(completions))
        for j, record in enumerate(records[start : start + len(batch)]):
            outs = outputs[j * g : (j + 1) * g]
            if greedy:
                record["greedy_completion"] = completions[j]
                record["greedy_reward"] = float(outs[0].score)
                record["greedy_correct"] = judged[j] >= threshold
                continue
            correct = [x >= threshold for x in judged[j * g : (j + 1) * g]]
            answers = [extracted_answer(o.info) for o in outs]
            has_answers = all("extracted_answer" in (o.info or {}) for o in outs)
            record.update(
                num_correct=sum(correct),
                correct=correct,
                rewards=[float(o.score) for o in outs],
                answers=answers if has_answers else None,
                completions=completions[j * g : (j + 1) * g],
                completion_lengths=[int(n) for n in lengths[j * g : (j + 1) * g]],
            )


# ----- what `sdpo eval` evaluates ----------------------------------------------------------------


def resolve_model(
    spec: str, checkpoint: str | None = None, teacher: bool = False
) -> tuple[str, Path | None, Path | None]:
    """Where the weights of ``spec`` are: ``(model path or name, teacher weights file, run dir)``.

    ``spec`` is ``demo``, a hub id (read from the local cache), a model directory (``config.json``),
    a checkpoint directory, or a run directory (``config.yaml``); in a run directory ``checkpoint``
    names ``final``, ``checkpoint-000300`` or a step (``300``); by default ``final/`` when present,
    else the newest checkpoint. ``teacher`` picks the EMA teacher's weights of that checkpoint.
    """
    path = Path(spec)
    if path.is_dir():
        verify_files(path)
    if not path.is_dir():
        if checkpoint or teacher:
            raise ValueError(f"--checkpoint/--teacher need a run directory; {spec!r} is not one.")
        return spec, None, None
    run_dir = (
        path if (path / "config.yaml").exists() and not (path / ckpt.STATE_FILE).exists() else None
    )
    if (path / ckpt.STATE_FILE).exists():
        chosen = path
        run_dir = path.parent if (path.parent / "config.yaml").exists() else None
    elif run_dir is not None:
        chosen = _pick_checkpoint(run_dir, checkpoint, teacher)
    elif (path / "config.json").exists() or (path / "adapter_config.json").exists():
        if checkpoint or teacher:
            raise ValueError(
                f"{spec} is a model directory; --checkpoint/--teacher need a run directory."
            )
        return str(path), None, None
    else:
        raise FileNotFoundError(
            f"{spec} is neither a model directory (config.json), a checkpoint ({ckpt.STATE_FILE}) "
            "nor a run directory (config.yaml)."
        )
    if (chosen / "config.json").exists():  # an exported model (e.g. final/)
        model_dir = chosen
    else:
        model_dir = chosen / "policy"
    teacher_file = None
    if teacher and (chosen / "teacher" / "adapter_config.json").exists():  # a LoRA teacher adapter
        return str(chosen / "teacher"), None, run_dir
    if teacher:
        teacher_file = chosen / "teacher.safetensors"
        if not teacher_file.exists():
            raise FileNotFoundError(
                f"{chosen} has no EMA teacher weights (teacher.safetensors); only runs with "
                "self_distillation.teacher=ema that distill (distillation_weight > 0) keep one, in their "
                "checkpoints."
            )
    return str(model_dir), teacher_file, run_dir


def verify_files(path: Path) -> None:
    """Check ``path`` against its manifest before its weights are read: a checkpoint, ``final/``
    (which has one since issue 23), or a directory inside a checkpoint (``checkpoint-N/policy``).
    Raises :class:`~sdpo.checkpoint.CheckpointError` naming the broken file; a directory with no
    manifest anywhere (a model from elsewhere) is not checked."""
    for owner in (path, path.parent):
        if (owner / ckpt.MANIFEST).exists() or (owner / ckpt.STATE_FILE).exists():
            problem = ckpt.verify(owner)
            if problem:
                raise ckpt.CheckpointError(f"{owner} is broken: {problem}.")
            return


def _pick_checkpoint(run_dir: Path, name: str | None, teacher: bool) -> Path:
    if name is None:
        final = run_dir / "final"
        if final.is_dir() and not teacher:
            verify_files(final)
            return final
        return ckpt.resolve_checkpoint(run_dir)
    candidates = [run_dir / name]
    if name.isdigit():
        candidates.append(run_dir / f"checkpoint-{int(name):06d}")
    for c in candidates:
        if c.is_dir():
            verify_files(c)
            return c
    found = [p.name for p in ckpt.list_checkpoints(run_dir)]
    if (run_dir / "final").is_dir():
        found.append("final")
    raise FileNotFoundError(
        f"No checkpoint {name!r} in {run_dir}; it has: {', '.join(found) or 'none'}."
    )


def load_policy(
    spec: str,
    checkpoint: str | None = None,
    teacher: bool = False,
    device: str | None = None,
    dtype: str = "auto",
    trust_remote_code: bool = False,
) -> tuple[Any, Path | None]:
    """The :class:`~sdpo.policy_model.PolicyModel` of ``spec`` (see :func:`resolve_model`) and its
    run directory (None when ``spec`` is not part of a run)."""
    from safetensors.torch import load_model

    from sdpo.policy_model import PolicyModel

    name, teacher_file, run_dir = resolve_model(spec, checkpoint, teacher)
    policy = PolicyModel(name, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    if teacher_file is not None:
        load_model(policy.model, str(teacher_file), device=str(policy.device))
    return policy, run_dir


def table_keys(metrics: dict[str, float]) -> list[str]:
    """The figures a printed table shows: accuracies, mean@n, pass@k and maj@k at k = 1, 2, 4, ..., n."""
    n = int(metrics.get("num_samples", 0))
    ks = sorted(
        {k for k in (2**i for i in range(n.bit_length())) if k <= n} | ({n} if n else set())
    )
    keys = ["accuracy_greedy", f"mean@{n}"]
    keys += [f"pass@{k}" for k in ks] + [f"maj@{k}" for k in ks]
    keys += ["reward_greedy", "reward_sampled", "mean_completion_length"]
    return [k for k in keys if k in metrics]


def format_table(
    columns: dict[str, dict[str, float]],
    differences: dict[str, dict[str, float]] | None = None,
    confidence: float = 0.95,
) -> str:
    """A plain-text table: one row per figure, one column per model (and the paired difference)."""
    first = next(iter(columns.values()))
    keys = table_keys(first)
    header = ["metric", *columns]
    if differences:
        header.append(f"difference [{confidence:.0%} CI]")
    lines = [header]
    for key in keys:
        line = [key] + [_fmt(m.get(key)) for m in columns.values()]
        if differences:
            d = differences.get(key)
            line.append(f"{d['difference']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]" if d else "")
        lines.append(line)
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    return "\n".join(
        "  ".join(
            cell.ljust(w) if i == 0 else cell.rjust(w)
            for i, (cell, w) in enumerate(zip(row, widths, strict=True))
        )
        for row in lines
    )


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.3f}"


def paired_differences(
    records: Sequence[dict[str, Any]],
    baseline: Sequence[dict[str, Any]],
    num_resamples: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Per-figure difference (model − baseline) with a paired bootstrap CI over prompts.

    The two record lists must cover the same prompts in the same order. Covers the greedy
    accuracy, mean@n and pass@k / maj@k at the table's k (each a mean over prompts of a
    per-prompt score, so the bootstrap resamples prompts).
    """
    if [r["prompt"] for r in records] != [r["prompt"] for r in baseline]:
        raise ValueError("The model and the baseline were evaluated on different prompts.")
    n = min(min(r["num_samples"] for r in records), min(r["num_samples"] for r in baseline))
    per_prompt: dict[str, Any] = {
        "accuracy_greedy": lambda r: float(r.get("greedy_correct", float("nan"))),
        f"mean@{n}": lambda r: r["num_correct"] / r["num_samples"],
    }
    for key in table_keys({"num_samples": n, **{f"pass@{k}": 0 for k in range(1, n + 1)}}):
        if key.startswith("pass@"):
            k = int(key[5:])
            per_prompt[key] = lambda r, k=k: pass_at_k(r["num_samples"], r["num_correct"], k)
    out = {}
    for key, score in per_prompt.items():
        a, b = [score(r) for r in records], [score(r) for r in baseline]
        if any(math.isnan(x) for x in a + b):
            continue
        out[key] = paired_bootstrap(a, b, num_resamples, confidence, seed)
    return out
