"""Reprompting: build the self-teacher's context for each completion (SPEC section 3).

For completion ``i`` of group ``g`` the teacher sees the original question plus a successful
sibling from ``g`` (the *demonstration*) and/or the environment's feedback on ``i``. With the
default templates a teacher prompt reads::

    {question}
    Correct solution:

    {demonstration}


    The following is feedback from your unsuccessful earlier attempt:

    {feedback}



    Correctly solve the original question.

For chat prompts the teacher sees the system messages and one user message holding that text
(the question being the last user message); earlier turns are left out, or folded into the
question with ``self_distillation.chat_earlier_turns=fold`` (see :func:`teacher_messages`).

Completions with neither a demonstration nor usable feedback get no context (``None``); they are
masked out of the distillation loss.

With ``self_distillation.success_memory_steps = K > 0`` a *success memory* fills the gap for
all-fail groups and lone successes (whose only success is themselves): the most recent success on
the same question (same prompt) from an earlier step, at most ``K`` steps old, serves as their
demonstration (``TeacherContext.from_memory``; counted as ``memory_demonstration_fraction``).
"""

from __future__ import annotations

import copy
import json
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from sdpo.config import SelfDistillationConfig
from sdpo.leakage import copy_rate, prompt_parts

Prompt = str | list[dict[str, str]]

TRUNCATION_MARKER = "\n...[truncated]"


@dataclass
class TeacherContext:
    """The self-teacher's context for one completion.

    Attributes:
        prompt: the teacher prompt; a string, or chat messages when the student prompt was messages.
        demonstration_index: index (into the batch's completions) of the demonstration, or None.
        used_feedback: whether the environment's feedback is part of the prompt.
        from_memory: whether the demonstration came from the success memory.
        contrast_prompt: the contrastive teacher's context (``contrastive_weight > 0``): the
            demonstration alone, without the question and the feedback; None without a demonstration.
    """

    prompt: Prompt
    demonstration_index: int | None
    used_feedback: bool
    from_memory: bool = False
    contrast_prompt: Prompt | None = None


def strip_thinking(text: str) -> str:
    """Remove reasoning: ``<think>...</think>`` blocks (as the official regex does) and a leading
    reasoning part closed by a ``</think>`` without an opener (chat templates that open the block
    themselves). An unclosed ``<think>`` is kept, text and all, as in the official code: cutting
    it left an empty demonstration. Only blank lines around the text go; a demonstration's
    leading indentation (code) is kept."""
    text = re.sub(r"<think>.*?</think>[ \t]*", "", text, flags=re.DOTALL)
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1].lstrip(" \t")
    return re.sub(r"\A(?:[ \t]*\n)+", "", text).rstrip()


def reprompt_stats(
    contexts: Sequence[TeacherContext | None],
    rewards: Sequence[float],
    group_ids: Sequence[int],
    threshold: float,
) -> dict[str, float]:
    """Fractions describing one batch's teacher contexts (SPEC section 8 names).

    - ``success_group_fraction``: groups with at least one success / groups;
    - ``success_sample_fraction``: completions whose teacher context includes a demonstration
      (a successful sibling) / N, as the official code means it (successes / N is ``accuracy``);
    - ``reprompt_sample_fraction``: completions with a teacher context / N;
    - ``feedback_used_fraction``: contexts that include feedback / N.

    An empty batch gives zeros.
    """
    n = len(contexts)
    group_ids = [int(g) for g in group_ids]
    success = [float(r) >= threshold for r in rewards]
    groups = set(group_ids)
    succeeded = {g for g, s in zip(group_ids, success, strict=True) if s}
    given = [c for c in contexts if c is not None]
    if n == 0:
        return dict.fromkeys(
            (
                "success_group_fraction",
                "success_sample_fraction",
                "reprompt_sample_fraction",
                "feedback_used_fraction",
            ),
            0.0,
        )
    return {
        "success_group_fraction": len(succeeded) / len(groups),
        "success_sample_fraction": sum(c.demonstration_index is not None for c in given) / n,
        "reprompt_sample_fraction": len(given) / n,
        "feedback_used_fraction": sum(c.used_feedback for c in given) / n,
    }


def teacher_messages(
    messages: Sequence[dict[str, str]],
    reprompt: Callable[[str], str],
    earlier_turns: str = "drop",
) -> list[dict[str, str]]:
    """The teacher's chat context as the official code builds it: the system messages, then ONE
    user message whose content is ``reprompt(question)``, the question being the last user message.

    Earlier user/assistant turns (a few-shot worked example, a conversation) are not turns of the
    teacher's context: kept there, "Correctly solve the original question." points the teacher at
    the *first* question (measured on SmolLM2 with a worked example as the earlier turn: the
    teacher preferred the example's name as its first token, log-odds -0.52 against the question's
    own name, while the student and the official construction gave +8.35 and +9.02).
    ``earlier_turns="fold"`` writes them into the question instead, as ``role: text`` lines before
    it, for conversations whose earlier turns carry what the question needs. Messages after the
    last user message are dropped either way. The input is not modified.
    """
    roles = [m.get("role") for m in messages]
    if "user" not in roles:
        raise ValueError(f"A chat prompt needs a user message to reprompt; got roles {roles}.")
    if earlier_turns not in ("drop", "fold"):
        raise ValueError(
            f"self_distillation.chat_earlier_turns={earlier_turns!r}; choose drop or fold."
        )
    last = len(roles) - 1 - roles[::-1].index("user")
    question = messages[last]["content"]
    if earlier_turns == "fold":
        earlier = [
            f"{m.get('role')}: {m.get('content', '')}"
            for m in messages[:last]
            if m.get("role") != "system"
        ]
        if earlier:
            question = "\n\n".join([*earlier, f"user: {question}"])
    system = [dict(m) for m in messages[:last] if m.get("role") == "system"]
    return [*system, {"role": "user", "content": reprompt(question)}]


class Reprompter:
    """Builds teacher contexts from a scored batch, following a :class:`SelfDistillationConfig`.

    Args:
        config: the ``self_distillation`` section (threshold, selection, templates, length limit).
        tokenizer: used to enforce ``max_reprompt_len``; without one no limit is applied.
        seed: seed of the generator behind ``demonstration_selection="random"``.

    After every :meth:`build`, ``last_stats`` holds :func:`reprompt_stats` plus
    ``dropped_too_long`` (contexts dropped because even without demonstration and feedback they
    exceed the limit) and ``truncated`` (contexts whose demonstration/feedback were shortened).
    """

    def __init__(
        self, config: SelfDistillationConfig, tokenizer: Any = None, seed: int = 0
    ) -> None:
        self.config = config
        self.tokenizer = tokenizer
        self.rng = random.Random(seed)
        self.last_stats: dict[str, float] = {}
        # success memory: prompt key -> [build number, completion] of its latest success
        self.builds = 0
        self.memory: dict[str, list] = {}

    def build(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        rewards: Sequence[float],
        group_ids: Sequence[int],
        feedback: Sequence[str | None] | None = None,
    ) -> list[TeacherContext | None]:
        """One teacher context (or None) per completion.

        Args:
            prompts: the student prompt of each completion (N entries; strings or chat messages).
            completions: the sampled completions (N).
            rewards: their rewards (N).
            group_ids: the group (prompt) of each completion (N ints); demonstrations come from the same group.
            feedback: the environment's feedback per completion (N, None or "" = none), or None.
        """
        cfg = self.config
        n = len(completions)
        feedback = [None] * n if feedback is None else list(feedback)
        rewards = [float(r) for r in rewards]
        group_ids = [int(g) for g in group_ids]  # tensors would hash by identity
        for name, values in (
            ("prompts", prompts),
            ("rewards", rewards),
            ("group_ids", group_ids),
            ("feedback", feedback),
        ):
            if len(values) != n:
                raise ValueError(
                    f"Reprompter.build: {name} has {len(values)} entries for {n} completions."
                )
        successes: dict[int, list[int]] = {}
        for i, (g, r) in enumerate(zip(group_ids, rewards, strict=True)):
            if r >= cfg.success_reward_threshold:
                successes.setdefault(g, []).append(i)
        self.builds += 1
        limit = cfg.success_memory_steps
        self.memory = {k: v for k, v in self.memory.items() if self.builds - v[0] <= limit}

        contexts: list[TeacherContext | None] = []
        dropped = truncated = remembered = 0
        self._remembered: dict[int, str] = {}  # row -> the remembered success it was shown
        for i in range(n):
            demo_index = self._select(i, successes.get(group_ids[i], []), completions)
            demo = None if demo_index is None else self._demonstration(completions[demo_index])
            from_memory = False
            if demo is None and limit > 0 and _key(prompts[i]) in self.memory:
                self._remembered[i] = self.memory[_key(prompts[i])][1]
                demo = self._demonstration(self._remembered[i])
                from_memory = True
            fb = (
                feedback[i]
                if cfg.include_environment_feedback and feedback[i] and feedback[i].strip()
                else None
            )
            if (
                fb is not None
                and demo is not None
                and cfg.environment_feedback_only_without_solution
            ):
                fb = None
            if demo is None and fb is None:
                contexts.append(None)
                continue
            fitted = self._fit(prompts[i], demo, fb)
            if fitted is None:
                dropped += 1
                contexts.append(None)
                continue
            prompt, was_truncated = fitted
            truncated += was_truncated
            remembered += from_memory
            contrast = None
            if cfg.contrastive_weight > 0 and demo is not None:  # the demonstration alone
                contrast = self._fit(_without_question(prompts[i]), demo, None)
                contrast = None if contrast is None else contrast[0]
            contexts.append(
                TeacherContext(prompt, demo_index, fb is not None, from_memory, contrast)
            )

        if limit > 0:  # this step's successes, for later steps (the first per question)
            for g in sorted(successes):
                i = successes[g][0]
                self.memory[_key(prompts[i])] = [self.builds, completions[i]]
        self.last_stats = reprompt_stats(contexts, rewards, group_ids, cfg.success_reward_threshold)
        self.last_stats["dropped_too_long"] = float(dropped)
        self.last_stats["truncated"] = float(truncated)
        if limit > 0:
            self.last_stats["memory_demonstration_fraction"] = remembered / n if n else 0.0
        if cfg.copy_rate_ngram > 0:
            self.last_stats["copy_rate"] = self._copy_rate(prompts, completions, contexts)
        return contexts

    def _copy_rate(
        self,
        prompts: Sequence[Prompt],
        completions: Sequence[str],
        contexts: Sequence[TeacherContext | None],
    ) -> float:
        """Mean :func:`sdpo.leakage.copy_rate` over the rows that have a privileged source: their
        demonstration (from the batch or the memory) and the prompt's earlier chat turns."""
        rates = []
        for i, (prompt, completion) in enumerate(zip(prompts, completions, strict=True)):
            question, turns = prompt_parts(prompt)
            ctx = contexts[i]
            sources = list(turns)
            if ctx is not None and ctx.demonstration_index is not None:
                sources.append(self._demonstration(completions[ctx.demonstration_index]))
            elif ctx is not None and ctx.from_memory:
                sources.append(self._demonstration(self._remembered[i]))
            rate = copy_rate(completion, sources, question, self.config.copy_rate_ngram)
            if rate is not None:
                rates.append(rate)
        return sum(rates) / len(rates) if rates else 0.0

    def state_dict(self) -> dict[str, Any]:
        """The success memory (JSON-serializable), for checkpoints."""
        return {"builds": self.builds, "memory": copy.deepcopy(self.memory)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.builds = int(state["builds"])
        self.memory = copy.deepcopy(state["memory"])

    # ----- demonstration ----------------------------------------------------------------------

    def _select(self, i: int, group_successes: list[int], completions: Sequence[str]) -> int | None:
        """Index of the demonstration for completion ``i`` among its group's successes, or None."""
        candidates = [
            j for j in group_successes if j != i or not self.config.dont_reprompt_on_self_success
        ]
        if not candidates:
            return None
        policy = self.config.demonstration_selection
        if policy == "first":
            return candidates[0]
        if policy == "random":
            return self.rng.choice(candidates)
        if policy == "shortest":  # ties go to the first
            return min(candidates, key=lambda j: len(self._demonstration(completions[j])))
        raise ValueError(
            f"Unknown demonstration_selection {policy!r}; choose first, random or shortest."
        )

    def _demonstration(self, completion: str) -> str:
        return (
            strip_thinking(completion)
            if self.config.remove_thinking_from_demonstration
            else completion
        )

    # ----- prompt assembly --------------------------------------------------------------------

    def _render(self, prompt: Prompt, demo: str | None, fb: str | None) -> Prompt:
        """The teacher prompt: the template around the question (chat: see :func:`teacher_messages`)."""
        cfg = self.config

        def reprompt(question: str) -> str:
            return cfg.reprompt_template.format(
                prompt=question,
                solution=""
                if demo is None
                else cfg.solution_template.format(successful_previous_attempt=demo),
                feedback="" if fb is None else cfg.feedback_template.format(feedback_raw=fb),
            )

        if isinstance(prompt, str):
            return reprompt(prompt)
        return teacher_messages(prompt, reprompt, cfg.chat_earlier_turns)

    def _length(self, prompt: Prompt) -> int:
        """Token length of a teacher prompt as the teacher will see it."""
        tok = self.tokenizer
        if isinstance(prompt, list):
            if getattr(tok, "chat_template", None):
                ids = tok.apply_chat_template(prompt, add_generation_prompt=True, tokenize=True)
                if isinstance(ids, dict) or hasattr(ids, "keys"):
                    ids = ids["input_ids"]
                return len(ids)
            prompt = "\n".join(str(m.get("content", "")) for m in prompt)
        return len(tok(prompt)["input_ids"])

    def _fit(self, prompt: Prompt, demo: str | None, fb: str | None) -> tuple[Prompt, bool] | None:
        """The teacher prompt within ``max_reprompt_len`` and whether it was shortened; None if impossible.

        Only the demonstration and the feedback are shortened (cut from their end, marked with
        ``TRUNCATION_MARKER``), never the question or the instruction: a binary search finds the
        largest character cap ``c`` such that cutting every piece longer than ``c`` to ``c`` fits.
        """
        full = self._render(prompt, demo, fb)
        limit = self.config.max_reprompt_len
        if self.tokenizer is None or self._length(full) <= limit:
            return full, False

        def capped(c: int) -> Prompt:
            def cut(piece: str | None) -> str | None:
                if piece is None or len(piece) <= c:
                    return piece
                return (
                    (piece[:c].rstrip() + TRUNCATION_MARKER)
                    if c > 0
                    else TRUNCATION_MARKER.lstrip()
                )

            return self._render(prompt, cut(demo), cut(fb))

        if self._length(capped(0)) > limit:
            return None
        lo, hi = (
            0,
            max(len(demo or ""), len(fb or "")),
        )  # capped(lo) fits, capped(hi) is the full prompt
        while hi - lo > 1:
            mid = (lo + hi) // 2
            if self._length(capped(mid)) <= limit:
                lo = mid
            else:
                hi = mid
        return capped(lo), True


def _key(prompt: Prompt) -> str:
    """A question's key in the success memory: the prompt text, or its messages as JSON."""
    return prompt if isinstance(prompt, str) else json.dumps(prompt, sort_keys=True)


def _without_question(prompt: Prompt) -> Prompt:
    """The prompt with its question removed (chat: the last user message emptied)."""
    if isinstance(prompt, str):
        return ""
    messages = copy.deepcopy(list(prompt))
    users = [k for k, m in enumerate(messages) if m.get("role") == "user"]
    if users:
        messages[users[-1]]["content"] = ""
    return messages
