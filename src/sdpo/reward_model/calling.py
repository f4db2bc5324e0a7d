"""The calling convention: how the trainer and evaluation call a reward model (TRL's
``GRPOTrainer`` way, guarded by a time limit), check its scores, cap its feedback, and read its
success scores and per-function metrics."""

from __future__ import annotations

import contextlib
import copy
import signal
import statistics
import threading
from collections.abc import Iterator, Sequence
from typing import Any

from sdpo.reward_model.interface import (
    TRAINER_KWARGS,
    RewardFunctionError,
    RewardLog,
    RewardModel,
    RewardOutput,
    RewardTimeoutError,
    as_trl_completions,
)


def call_reward_model(
    reward_model: RewardModel,
    rows: Sequence[dict[str, Any]],
    completions: Sequence[str],
    completion_ids: Sequence[Sequence[int]],
    trainer_state: Any = None,
    timeout_s: float | None = None,
) -> tuple[list[RewardOutput], RewardLog]:
    """Score the completions of ``rows`` as TRL's GRPOTrainer calls reward functions.

    Guarded: the reward gets copies of the prompts and completions, ``sys.exit`` inside it is a
    :class:`RewardFunctionError`, and a call longer than ``timeout_s`` raises
    :class:`RewardTimeoutError`.

    ``reward_model(prompts, completions, completion_ids=, trainer_state=, log_metric=, log_extra=,
    **columns)`` with completions in TRL's form (:func:`as_trl_completions`) and ``columns`` the
    rows' other fields. ``trainer_state`` defaults to a fresh ``transformers.TrainerState``.
    Returns one :class:`RewardOutput` per completion and what the hooks logged.
    """
    from transformers import TrainerState

    prompts = [row["prompt"] for row in rows]
    skip = ("prompt", "completion", *TRAINER_KWARGS)
    columns = {k: [row.get(k) for row in rows] for k in rows[0] if k not in skip}
    log = RewardLog()
    try:
        with _time_limit(timeout_s, f"Reward model {reward_model.name!r}"):
            outputs = reward_model(
                copy.deepcopy(prompts),  # a reward that mutates its inputs changes nothing here
                as_trl_completions(prompts, completions),
                completion_ids=[list(ids) for ids in completion_ids],
                trainer_state=TrainerState() if trainer_state is None else trainer_state,
                log_metric=log.log_metric,
                log_extra=log.log_extra,
                **columns,
            )
    except SystemExit as exc:
        raise RewardFunctionError(
            f"Reward model {reward_model.name!r} called sys.exit({exc.code!r}); a reward "
            "function must return its scores."
        ) from None
    if len(outputs) != len(rows):
        raise ValueError(
            f"Reward model {reward_model.name!r} returned {len(outputs)} results for {len(rows)} completions."
        )
    context = columns.get("privileged_context")
    if (
        context is not None
    ):  # TRL's column of environment feedback, used where the reward gives none
        outputs = [
            o if o.feedback or not c else RewardOutput(o.score, str(c), o.info)
            for o, c in zip(outputs, context, strict=True)
        ]
    return outputs, log


def checked_scores(outputs: Sequence[Any], prompts: Sequence[Any], name: str) -> Any:
    """The outputs' scores as a ``[N]`` float32 tensor, each checked to be a finite number there;
    a bad one raises :class:`RewardFunctionError` naming the reward model ``name`` and the row."""
    import torch  # here: defining rewards needs no torch

    scores = []
    for i, out in enumerate(outputs):
        try:
            if isinstance(out.score, (str, bytes)):  # float("0.5") would pass a typo'd return
                raise TypeError
            scores.append(float(out.score))
        except (TypeError, ValueError, AttributeError):
            raise RewardFunctionError(
                f"Reward model {name!r} returned {getattr(out, 'score', out)!r} as the score of "
                f"row {i} (prompt {prompts[i]!r:.60}); a score must be a finite number."
            ) from None
    rewards = torch.tensor(scores, dtype=torch.float32)
    bad = (~torch.isfinite(rewards)).nonzero().flatten().tolist()
    if bad:
        i = bad[0]
        raise RewardFunctionError(
            f"Reward model {name!r} gave row {i} (prompt {prompts[i]!r:.60}) the score "
            f"{scores[i]!r}, which is not a finite float32 (|score| < 3.4e38); "
            f"{len(bad)} of {len(scores)} rows are affected."
        )
    return rewards


def cap_feedback(feedback: str | None, max_chars: int | None) -> str | None:
    """``feedback`` cut to ``max_chars`` characters plus a marker saying how much was cut."""
    if feedback is None or max_chars is None or len(feedback) <= max_chars:
        return feedback
    return f"{feedback[:max_chars]}\n[feedback truncated: {len(feedback)} characters, {max_chars} kept]"


@contextlib.contextmanager
def _time_limit(seconds: float | None, what: str) -> Iterator[None]:
    """Raise :class:`RewardTimeoutError` in the body after ``seconds`` (SIGALRM: main thread only),
    and again every second after that, so a function that swallows the first one still stops."""
    if seconds is None or threading.current_thread() is not threading.main_thread():
        yield
        return

    def expire(signum: int, frame: Any) -> None:
        raise RewardTimeoutError(
            f"{what} did not return within {seconds} s (data.reward_timeout_s); "
            "make it faster or raise the limit."
        )

    previous = signal.signal(signal.SIGALRM, expire)
    signal.setitimer(signal.ITIMER_REAL, seconds, 1.0)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def success_scores(reward_model: RewardModel, outputs: Sequence[RewardOutput]) -> list[float]:
    """Per completion, the score compared with ``success_reward_threshold``: the score itself for
    one reward function; for several, :meth:`CombinedRewardModel.success_score`'s rule."""
    judge = getattr(reward_model, "success_score", None)
    return [float(judge(o)) if judge else float(o.score) for o in outputs]


def reward_metrics(reward_model: RewardModel, outputs: Sequence[RewardOutput]) -> dict[str, float]:
    """TRL's per-function metrics ``rewards/<name>/mean`` and ``rewards/<name>/std`` (unbiased
    std over this batch's completions, 0 for one completion): each function's own, unweighted
    score."""
    names = getattr(reward_model, "names", None)
    columns = (
        {nm: [float(o.info[nm]["score"]) for o in outputs] for nm in names}
        if names
        else {reward_model.name: [float(o.score) for o in outputs]}
    )
    out = {}
    for name, values in columns.items():
        out[f"rewards/{name}/mean"] = statistics.fmean(values) if values else 0.0
        out[f"rewards/{name}/std"] = statistics.stdev(values) if len(values) > 1 else 0.0
    return out
