"""Leakage controls (docs/method.md): a guard on the environment's feedback and a copy-rate metric.

- **Feedback leak guard.** A reward may declare each row's reference answer as
  ``RewardOutput.info["reference_answer"]``. Feedback that contains it (as a whole token: not
  inside a longer word or number) would hand the teacher the label; ``data.feedback_leak_guard``
  redacts it (``redact``, counted as ``feedback/redacted``) or stops the run (``refuse``).
- **Copy rate.** The share of a completion's word n-grams that appear in its privileged sources —
  the teacher context's demonstration and a chat prompt's earlier (example) turns — but not in
  the question: ``|C ∩ (S \\ Q)| / |C|`` with ``C, S, Q`` the n-gram sets of completion, sources
  and question. A student that copies the worked example's surface (the SmolLM2 run's names) has
  a rising copy rate (health warning ``copy_rate_rising``).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

REDACTED = "[redacted]"
_WORD = re.compile(r"\w+|[^\w\s]")


def _reference_pattern(reference: str) -> re.Pattern[str]:
    return re.compile(r"(?<!\w)" + re.escape(reference) + r"(?!\w)")


def guard_feedback(
    feedback: Sequence[str | None], infos: Sequence[dict[str, Any]], mode: str
) -> tuple[list[str | None], int | None]:
    """Feedback with each row's declared reference answer redacted, and the number of rows
    redacted (``None`` when no row declared one: the metric is not logged then).

    Args:
        feedback: per-row feedback (N).
        infos: per-row ``RewardOutput.info`` (N); the reference is ``info["reference_answer"]``.
        mode: ``redact``, ``refuse`` (ValueError naming the row) or ``off``.
    """
    out = list(feedback)
    if mode == "off":
        return out, None
    declared, redacted = False, 0
    for i, (fb, info) in enumerate(zip(feedback, infos, strict=True)):
        ref = (info or {}).get("reference_answer")
        if ref is None or str(ref).strip() == "":
            continue
        declared = True
        pattern = _reference_pattern(str(ref).strip())
        if fb and pattern.search(fb):
            if mode == "refuse":
                raise ValueError(
                    f"The feedback of row {i} contains its reference answer {str(ref).strip()!r}: "
                    "the teacher would be shown the label. Fix the reward's feedback, or set "
                    "data.feedback_leak_guard=redact to redact it."
                )
            out[i] = pattern.sub(REDACTED, fb)
            redacted += 1
    return out, redacted if declared else None


def ngrams(text: str, n: int) -> set[tuple[str, ...]]:
    """The set of word n-grams of ``text`` (words and single punctuation marks, lowercased)."""
    words = _WORD.findall(text.lower())
    return {tuple(words[k : k + n]) for k in range(len(words) - n + 1)}


def copy_rate(completion: str, sources: Sequence[str], question: str, n: int = 3) -> float | None:
    """``|C ∩ (S \\ Q)| / |C|`` (module docstring); ``None`` when the completion has no n-gram or
    there is no source."""
    c = ngrams(completion, n)
    if not c or not any(sources):
        return None
    s = set().union(*(ngrams(x, n) for x in sources if x))
    return len(c & (s - ngrams(question, n))) / len(c)


def prompt_parts(prompt: str | list[dict[str, str]]) -> tuple[str, list[str]]:
    """``(question, earlier turns)``: a string prompt is all question; for chat messages the last
    user message is the question and every message before it an earlier (example) turn."""
    if isinstance(prompt, str):
        return prompt, []
    users = [k for k, m in enumerate(prompt) if m.get("role") == "user"]
    last = users[-1] if users else len(prompt) - 1
    return str(prompt[last].get("content", "")), [str(m.get("content", "")) for m in prompt[:last]]
