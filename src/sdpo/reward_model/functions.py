"""Plain functions as reward models (TRL's ``fn(prompts, completions, **columns)`` convention),
weighted combinations of reward models, and :func:`as_reward_model`, which turns any of them into
one :class:`~sdpo.reward_model.RewardModel`."""

from __future__ import annotations

import functools
import inspect
import math
from collections.abc import Callable, Sequence
from typing import Any

from sdpo.reward_model.interface import (
    _NOT_PER_SAMPLE,
    MissingColumnError,
    Prompt,
    RewardFunctionError,
    RewardModel,
    RewardOutput,
    _data_columns,
)


def _function_name(fn: Callable[..., Any]) -> str:
    while isinstance(fn, functools.partial):
        fn = fn.func
    return getattr(fn, "__name__", type(fn).__name__)


class FunctionRewardModel(RewardModel):
    """Adapter for a plain function ``fn(prompts, completions, **columns) -> list`` (TRL's convention).

    Each returned item may be:
    - a number: the score;
    - ``None`` (TRL: "not applicable"): scored 0.0, with ``info["skipped"] = True``;
    - ``(score, feedback)``;
    - ``{"score": ..., "feedback": ..., "info": {...}}`` (feedback and info optional);
    - a :class:`RewardOutput`.

    ``fn`` receives only the columns it can take: all of them if it has ``**kwargs``, else those it
    names (a named column missing from the batch raises :class:`MissingColumnError`). Called by the
    trainer, it gets TRL's arguments: ``prompts``, ``completions`` (message lists for chat
    prompts), ``completion_ids``, ``trainer_state``, ``log_metric``, ``log_extra`` and the columns,
    so TRL's reward functions (``trl.rewards.accuracy_reward``, ...) run unchanged.

    Errors: a wrong number of items, an item of another kind, or a non-finite score raise
    :class:`RewardFunctionError` naming the function (and the sample). If ``fn`` itself raises, it
    is re-run on one sample at a time to find the samples that break it; then
    ``on_error="raise"`` raises :class:`RewardFunctionError` naming the function, the first such
    sample and the original exception (chained), while ``on_error="zero"`` scores those samples 0
    (all samples if none fails alone) with the error as feedback and ``info["reward_error"] = True``.
    """

    def __init__(
        self, fn: Callable[..., Sequence[Any]], name: str | None = None, on_error: str = "raise"
    ) -> None:
        if not callable(fn):
            raise TypeError(f"FunctionRewardModel needs a callable, got {type(fn).__name__}.")
        if on_error not in ("raise", "zero"):
            raise ValueError(f"on_error must be 'raise' or 'zero', got {on_error!r}.")
        self.fn = fn
        self.name = name or _function_name(fn)
        self.on_error = on_error
        self._params = self._signature(fn)
        if self._params is not None and "completions" not in self._params[0]:
            raise TypeError(
                f"Reward function {self.name!r} must take a `completions` argument "
                "(convention: fn(prompts, completions, **columns))."
            )

    @staticmethod
    def _signature(fn: Callable[..., Any]) -> tuple[set[str], set[str]] | None:
        """(accepted names, required names) of ``fn``; None when it takes ``**kwargs`` or is opaque."""
        try:
            params = inspect.signature(fn).parameters.values()
        except (TypeError, ValueError):
            return None
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return None
        named = [p for p in params if p.kind not in (p.VAR_POSITIONAL, p.POSITIONAL_ONLY)]
        return {p.name for p in named}, {p.name for p in named if p.default is p.empty}

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        n = len(completions)
        for key, values in columns.items():
            if key in _NOT_PER_SAMPLE:
                continue
            if len(values) != n:
                raise ValueError(
                    f"Reward function {self.name!r}: column {key!r} has {len(values)} values for {n} completions."
                )
        try:
            return self._score(prompts, completions, columns)
        except (RewardFunctionError, MissingColumnError):
            raise
        except Exception as exc:  # any user error: handled by the on_error policy
            return self._recover(prompts, completions, columns, exc)

    def _call(
        self, prompts: list[Prompt], completions: list[str], columns: dict[str, list[Any]]
    ) -> Any:
        kwargs: dict[str, Any] = {"prompts": prompts, "completions": completions, **columns}
        if self._params is not None:
            accepted, required = self._params
            missing = sorted(required - set(kwargs))
            if missing:
                raise MissingColumnError(
                    f"Reward function {self.name!r} needs the column {missing[0]!r}, but the batch only has the columns {_data_columns(columns)}."
                )
            kwargs = {k: v for k, v in kwargs.items() if k in accepted}
        return self.fn(**kwargs)

    def _score(
        self,
        prompts: list[Prompt],
        completions: list[str],
        columns: dict[str, list[Any]],
        offset: int = 0,
    ) -> list[RewardOutput]:
        raw = self._call(prompts, completions, columns)
        is_list = isinstance(raw, Sequence) or hasattr(
            raw, "tolist"
        )  # lists, tuples, arrays, tensors
        if isinstance(raw, (str, bytes)) or not is_list:
            raise RewardFunctionError(
                f"Reward function {self.name!r} must return a list, got {type(raw).__name__}."
            )
        items = raw.tolist() if hasattr(raw, "tolist") else list(raw)
        if len(items) != len(completions):
            raise RewardFunctionError(
                f"Reward function {self.name!r} returned {len(items)} items for {len(completions)} completions; it must return one per completion."
            )
        return [self._output(item, offset + i) for i, item in enumerate(items)]

    def _output(self, item: Any, index: int) -> RewardOutput:
        feedback, info = None, {}
        if item is None:
            return RewardOutput(0.0, None, {"skipped": True})
        if isinstance(item, RewardOutput):
            score, feedback, info = item.score, item.feedback, dict(item.info)
        elif isinstance(item, dict):
            if "score" not in item:
                raise RewardFunctionError(
                    f"Reward function {self.name!r} returned a dict without 'score' for sample {index}: {item!r}."
                )
            score, feedback, info = (
                item["score"],
                item.get("feedback"),
                dict(item.get("info") or {}),
            )
        elif isinstance(item, tuple) and len(item) == 2:
            score, feedback = item
        else:
            score = item
        try:
            value = float(score)
        except (TypeError, ValueError) as exc:
            raise RewardFunctionError(
                f"Reward function {self.name!r} returned {item!r} for sample {index}; expected a number, None, (score, feedback) or a dict with 'score'."
            ) from exc
        if not math.isfinite(value):
            raise RewardFunctionError(
                f"Reward function {self.name!r} returned a non-finite score ({value}) for sample {index}."
            )
        return RewardOutput(value, None if feedback is None else str(feedback), info)

    def _recover(
        self,
        prompts: list[Prompt],
        completions: list[str],
        columns: dict[str, list[Any]],
        exc: Exception,
    ) -> list[RewardOutput]:
        """Re-run ``fn`` one sample at a time to locate the failures, then apply the on_error policy."""
        outputs: list[RewardOutput | None] = []
        failures: dict[int, Exception] = {}
        for i in range(len(completions)):
            one = {k: v if k in _NOT_PER_SAMPLE else [v[i]] for k, v in columns.items()}
            if "log_extra" in one:  # per-sample calls would log misaligned columns
                one["log_extra"] = _ignore_extra
            try:
                outputs.append(self._score([prompts[i]], [completions[i]], one, offset=i)[0])
            except RewardFunctionError:
                raise
            except Exception as sample_exc:
                failures[i] = sample_exc
                outputs.append(None)
                if self.on_error == "raise":
                    break
        if self.on_error == "raise":
            if failures:
                i, err = next(iter(failures.items()))
                raise RewardFunctionError(
                    f"Reward function {self.name!r} raised {type(exc).__name__}: {exc}. "
                    f"Sample {i} alone reproduces it ({type(err).__name__}: {err})."
                ) from exc
            raise RewardFunctionError(
                f"Reward function {self.name!r} raised {type(exc).__name__}: {exc} on the batch of {len(completions)}, "
                "but on no single sample alone."
            ) from exc
        if not failures:  # fails only as a batch: nothing to trust
            failures = dict.fromkeys(range(len(completions)), exc)
        for i, err in failures.items():
            feedback = f"The reward function {self.name!r} failed on this response: {type(err).__name__}: {err}"
            outputs[i] = RewardOutput(
                0.0, feedback, {"reward_error": True, "error_type": type(err).__name__}
            )
        return [out for out in outputs if out is not None]


def _ignore_extra(column: str, values: list[Any]) -> None:
    """A ``log_extra`` that drops what it is given."""


class CombinedRewardModel(RewardModel):
    """Weighted sum of reward models: ``score = sum_i w_i * score_i``.

    ``feedback`` joins the non-empty feedbacks with blank lines, each prefixed by its model's name
    when more than one model gave feedback. ``info[name]`` holds each model's info plus its own
    ``score``. Models sharing a name get suffixes ``_1``, ``_2``, ... in order.
    """

    name = "combined"

    def __init__(
        self,
        models: Sequence[RewardModel | Callable[..., Any]],
        weights: Sequence[float] | None = None,
        on_error: str = "raise",
        success: str | None = None,
    ) -> None:
        if not models:
            raise ValueError("CombinedRewardModel needs at least one reward model.")
        self.models = [as_reward_model(m, on_error=on_error) for m in models]
        self.weights = [1.0] * len(self.models) if weights is None else [float(w) for w in weights]
        if len(self.weights) != len(self.models):
            raise ValueError(
                f"CombinedRewardModel got {len(self.weights)} weights for {len(self.models)} models."
            )
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"CombinedRewardModel weights must be finite, got {self.weights}.")
        names = [m.name for m in self.models]
        self.names = [
            nm if names.count(nm) == 1 else f"{nm}_{names[:i].count(nm) + 1}"
            for i, nm in enumerate(names)
        ]
        if success not in (None, "sum", *self.names):
            raise ValueError(
                f"self_distillation.success_reward = {success!r} is not one of the reward "
                f"functions ({', '.join(self.names)}); name one of them, 'sum', or None (the first)."
            )
        self.success = success

    def success_score(self, output: RewardOutput) -> float:
        """The score success is judged on (against ``success_reward_threshold``).

        The rule: ``success=None`` (default) judges the first function's own, unweighted score;
        ``success=NAME`` that function's; ``success="sum"`` the weighted sum (the training reward).
        So a format bonus listed after the correctness reward never makes a wrong answer a
        success (a demonstration for its siblings), while it still adds to the reward."""
        if self.success == "sum":
            return float(output.score)
        name = self.success or self.names[0]
        return float(output.info[name]["score"])

    def __call__(
        self, prompts: list[Prompt], completions: list[str], **columns: list[Any]
    ) -> list[RewardOutput]:
        per_model = [model(prompts, completions, **columns) for model in self.models]
        for name, outs in zip(self.names, per_model, strict=True):
            if len(outs) != len(completions):
                raise RewardFunctionError(
                    f"Reward model {name!r} returned {len(outs)} outputs for {len(completions)} completions."
                )
        combined = []
        for i in range(len(completions)):
            outs = [outs[i] for outs in per_model]
            score = sum(w * o.score for w, o in zip(self.weights, outs, strict=True))
            given = [(nm, o.feedback) for nm, o in zip(self.names, outs, strict=True) if o.feedback]
            feedback = (
                "\n\n".join(f"{nm}: {fb}" if len(given) > 1 else fb for nm, fb in given) or None
            )
            info = {
                nm: {**o.info, "score": o.score} for nm, o in zip(self.names, outs, strict=True)
            }
            combined.append(RewardOutput(score, feedback, info))
        return combined


def as_reward_model(
    obj: Any,
    on_error: str = "raise",
    weights: Sequence[float] | None = None,
    success: str | None = None,
) -> RewardModel:
    """A :class:`RewardModel` from a reward model, a plain function, or a list of them (their
    ``weights``-weighted sum, TRL's ``reward_weights``; ``success``: see
    :meth:`CombinedRewardModel.success_score`)."""
    if weights is not None or (success not in (None, "sum") and not isinstance(obj, (list, tuple))):
        if isinstance(obj, CombinedRewardModel):
            if weights is not None:
                raise ValueError(
                    "data.reward_weights is set and the reward is a CombinedRewardModel with its "
                    "own weights; give the weights once."
                )
            return CombinedRewardModel(obj.models, obj.weights, on_error, success)
        models = list(obj) if isinstance(obj, (list, tuple)) else [obj]
        if weights is not None and len(weights) != len(models):
            raise ValueError(
                f"data.reward_weights has {len(weights)} weights for {len(models)} reward "
                "functions; give one weight per function, in the order of the functions."
            )
        return CombinedRewardModel(models, weights, on_error, success)
    if isinstance(obj, CombinedRewardModel) and success is not None:
        return CombinedRewardModel(obj.models, obj.weights, on_error, success)
    if isinstance(obj, (list, tuple)) and (len(obj) > 1 or success not in (None, "sum")):
        return CombinedRewardModel(obj, on_error=on_error, success=success)
    if isinstance(obj, RewardModel):
        return obj
    if isinstance(obj, (list, tuple)):
        return (
            as_reward_model(obj[0], on_error)
            if len(obj) == 1
            else CombinedRewardModel(obj, on_error=on_error)
        )
    if callable(obj):
        return FunctionRewardModel(obj, on_error=on_error)
    raise TypeError(
        f"Expected a RewardModel, a function fn(prompts, completions, **columns), or a list of them; got {type(obj).__name__}."
    )
