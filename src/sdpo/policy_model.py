"""PolicyModel: a Hugging Face causal LM in the roles SDPO needs — sampler, student, teacher.

The model is read as ``backbone -> hidden states -> LM head``. Training passes run the backbone on
``[prompt | completion]`` and keep only the hidden states that predict completion tokens; the LM
head is applied to those alone, in chunks (see :mod:`sdpo.self_distillation`), so prompt and
reprompt positions never cost a ``[positions, vocab]`` tensor.

One file (a little over ~600 lines): the roles share the backbone/LM-head reading and the
tokenization of ``[prompt | completion]``.
"""

from __future__ import annotations

import copy
import inspect
import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from sdpo import lora
from sdpo.config import GenerationConfig
from sdpo.lora import is_peft_model
from sdpo.train_mode import eval_scope

Prompt = str | list[dict[str, str]]


@dataclass
class RolloutBatch:
    """G sampled completions for each of B prompts (N = B·G rows), on the model's device.

    Shapes: ``prompt_ids``/``prompt_mask`` ``[N, P]`` (left-padded), ``completion_ids``/
    ``completion_mask`` ``[N, L]`` (right-padded; the mask covers tokens up to and including EOS);
    ``sampler_logprobs`` ``[N, L]``: the sampled tokens' log-probs as the generation backend
    reported them (None when it reports none, as the ``hf`` sampler).
    """

    prompts: list[Prompt]
    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    completions: list[str]
    group_ids: Tensor
    rows: list[dict[str, Any]]
    rewards: Tensor | None = None
    success_scores: list[float] = field(default_factory=list)  # vs success_reward_threshold
    feedback: list[str | None] = field(default_factory=list)
    reward_info: list[dict[str, Any]] = field(default_factory=list)
    reward_metrics: dict[str, float] = field(default_factory=dict)  # from reward fns' log_metric
    reward_extra: dict[str, list[Any]] = field(default_factory=dict)  # from their log_extra
    sampler_logprobs: Tensor | None = None

    def __len__(self) -> int:
        return self.completion_ids.shape[0]


class PolicyModel:
    """A causal LM and its tokenizer: ``PolicyModel("gpt2")``, ``PolicyModel("path/to/dir",
    device="cuda")``, ``PolicyModel("demo")`` (the model shipped with sdpo) or
    ``PolicyModel(model=hf_model, tokenizer=hf_tokenizer)``.

    Loads offline-safe: a path that does not exist, or a hub id without a local copy while
    ``HF_HUB_OFFLINE=1``, fails at once with a message saying so.
    """

    def __init__(
        self,
        model_name_or_path: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
        *,
        model: PreTrainedModel | None = None,
        tokenizer: PreTrainedTokenizerBase | None = None,
        trust_remote_code: bool = False,
    ) -> None:
        if model is None:
            if model_name_or_path is None:
                raise ValueError(
                    "PolicyModel needs a model name/path or an already-built `model=`."
                )
            model, loaded_tok = _load(model_name_or_path, trust_remote_code)
            tokenizer = tokenizer or loaded_tok
        if tokenizer is None:
            raise ValueError("PolicyModel(model=...) also needs tokenizer=...")
        self.name = model_name_or_path or getattr(model.config, "_name_or_path", "") or "model"
        self.device = torch.device(device) if device is not None else _default_device()
        # False when every forward must be the same on all ranks (fsdp; see sdpo.distributed).
        self.share_prompts = True
        model.to(device=self.device, dtype=_resolve_dtype(dtype, self.device))
        self.model = model
        self.tokenizer = tokenizer
        if tokenizer.pad_token_id is None:
            tokenizer.pad_token = tokenizer.eos_token
        tokenizer.padding_side = "left"
        head = output_head(model)
        if not isinstance(head, torch.nn.Linear):
            raise ValueError(
                f"{type(model).__name__}'s LM head is {type(head).__name__}; sdpo needs a linear head."
            )
        for attr in ("final_logit_softcapping", "logit_scale"):
            if getattr(model.config, attr, None) not in (None, 1.0):
                raise ValueError(
                    f"{type(model).__name__} uses {attr}, which sdpo's chunked LM head does not apply yet."
                )
        self.logit_scale = _logit_scale(model)

    def head_temperature(self, temperature: float) -> float:
        """The divisor the chunked LM head applies to ``hidden @ Wᵀ + b`` so that its logits are
        the model's own (``logit_scale`` included) at sampling ``temperature``."""
        return temperature / self.logit_scale

    # ----- parts ------------------------------------------------------------------------------

    @property
    def lm_head(self) -> torch.nn.Linear:
        """The output projection ``[V, H]`` (weight) applied to hidden states."""
        return output_head(self.model)

    @property
    def is_lora(self) -> bool:
        """True when the policy is a PEFT model (a frozen base plus a trained adapter)."""
        return is_peft_model(self.model)

    # ----- weights: adapter or full, decided here once ------------------------------------------

    def save_weights(self, directory: Path) -> None:
        """A checkpoint's trained weights, ``from_pretrained``-loadable: for a LoRA policy the
        adapters in PEFT's format (``policy/``, and ``teacher/`` with an EMA teacher; the base never
        changes), else ``policy/model.safetensors`` with the model config and tokenizer."""
        if self.is_lora:
            lora.save_checkpoint_adapters(self, directory)
            return
        from safetensors.torch import save_model

        (directory / "policy").mkdir()
        save_model(self.model, str(directory / "policy" / "model.safetensors"), {"format": "pt"})
        self.model.config.save_pretrained(directory / "policy")
        self.tokenizer.save_pretrained(directory / "policy")

    def load_weights(self, directory: Path) -> None:
        """Restore what :meth:`save_weights` wrote into this (running) policy, in place."""
        if self.is_lora:
            lora.load_checkpoint_adapters(self, directory)
            return
        from safetensors.torch import load_model

        file = directory / "policy" / "model.safetensors"
        if not file.exists():
            raise FileNotFoundError(
                f"{directory}/policy holds no full model weights (a LoRA checkpoint?); resume it "
                "with the same model.lora settings."
            )
        load_model(self.model, str(file), device=str(self.device))

    def standalone_model(self, adapter_dir: Path) -> PreTrainedModel:
        """The model a ``save_pretrained`` directory holds: for a LoRA policy its adapter merged
        into a copy of the base (the adapter itself written to ``adapter_dir``, PEFT's format),
        else the model as it is."""
        if not self.is_lora:
            return self.model
        lora.save_adapter(self.model, adapter_dir, lora.student_adapter(self.model), self.name)
        return lora.merged(copy.deepcopy(self.model))

    def full_weights(self, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
        """What an inference engine loads (a vLLM weight push): every weight under the base
        architecture's names, one tensor at a time, cast to ``dtype``; a LoRA policy's adapter
        merged in (:func:`iter_full_weights`)."""
        return iter_full_weights(self.model, dtype)

    @property
    def eos_token_id(self) -> int:
        return self.tokenizer.eos_token_id

    def encode_prompt(self, prompt: Prompt) -> list[int]:
        """Token ids of a prompt: chat messages through the chat template (with the generation
        prompt), plain strings through the tokenizer."""
        if isinstance(prompt, list):
            if getattr(self.tokenizer, "chat_template", None) is None:
                raise ValueError(
                    "A chat prompt (list of messages) needs a tokenizer with a chat_template."
                )
            text = self.tokenizer.apply_chat_template(
                prompt, add_generation_prompt=True, tokenize=False
            )
            return self.tokenizer(text, add_special_tokens=False)[
                "input_ids"
            ]  # the template has its specials
        return self.tokenizer(prompt)["input_ids"]

    def pad_left(self, sequences: list[list[int]]) -> tuple[Tensor, Tensor]:
        """Left-pad token lists to ``[n, max_len]`` ids and mask."""
        width = max(len(s) for s in sequences)
        ids = torch.full((len(sequences), width), self.tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for i, seq in enumerate(sequences):
            if seq:
                ids[i, width - len(seq) :] = torch.tensor(seq)
                mask[i, width - len(seq) :] = 1
        return ids.to(self.device), mask.to(self.device)

    # ----- sampling ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        prompt_ids: list[list[int]],
        num_samples: int,
        generation: GenerationConfig,
        *,
        greedy: bool = False,
    ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Sample ``num_samples`` completions per prompt (rows grouped: prompt i -> rows i·G..i·G+G-1).

        Returns ``prompt_ids [N, P]``, ``prompt_mask [N, P]``, ``completion_ids [N, L]``,
        ``completion_mask [N, L]`` with N = len(prompt_ids)·num_samples; the mask keeps the first EOS.
        """
        repeated = [ids for ids in prompt_ids for _ in range(num_samples)]
        ids, mask = self.pad_left(repeated)
        with eval_scope(self.model):
            completion_ids = sample(
                unwrap(self.model),
                ids,
                mask,
                generation,
                self.eos_token_id,
                self.tokenizer.pad_token_id,
                greedy=greedy,
            )
        completion_mask = completion_tokens_mask(completion_ids, self.eos_token_id)
        return ids, mask, completion_ids, completion_mask

    def decode(self, completion_ids: Tensor, completion_mask: Tensor) -> list[str]:
        """Completion texts without padding and special tokens."""
        return [
            self.tokenizer.decode(row[m.bool()].tolist(), skip_special_tokens=True)
            for row, m in zip(completion_ids, completion_mask, strict=True)
        ]

    # ----- training passes --------------------------------------------------------------------

    def completion_hidden(
        self,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        completion_ids: Tensor,
        completion_mask: Tensor,
        model: PreTrainedModel | None = None,
        *,
        share_prompts: bool | None = None,
    ) -> Tensor:
        """Hidden states that predict each completion token: ``[n, L, H]``.

        Runs the backbone of ``model`` (default: the policy) on ``[prompt | completion]`` with
        position ids from the attention mask (so left padding does not shift positions, matching
        ``generate``); position ``P-1+j`` predicts completion token ``j``.

        With ``share_prompts`` (default), rows whose prompt rows are identical (the G samples of a
        group; the teacher prompts of a group's failed rows, which all carry the same
        demonstration) share one pass over the prompt: the backbone runs once per distinct prompt
        with a KV cache, the cache is expanded to the n rows, and only the completions run per row.
        The result equals the single pass up to float rounding, gradients included. Under gradient
        checkpointing (training mode, gradients on) every row runs the single pass.
        """
        model = unwrap(self.model if model is None else model)
        share_prompts = self.share_prompts if share_prompts is None else share_prompts
        backbone = model.base_model
        cache_arg = _cache_kwarg(backbone)
        # Checkpointed layers drop the KV cache while recording a backward (transformers' rule),
        # so the completion pass would not see the prompt: sharing steps aside there.
        checkpointed = model.training and any(
            getattr(m, "gradient_checkpointing", False) for m in model.modules()
        )
        share = (
            share_prompts
            and cache_arg is not None
            and not (checkpointed and torch.is_grad_enabled())
        )
        shared = _distinct_rows(prompt_ids, prompt_mask) if share else None
        if shared is None or completion_ids.shape[1] < 2:
            ids = torch.cat([prompt_ids, completion_ids], dim=1)
            mask = torch.cat([prompt_mask, completion_mask], dim=1)
            positions = (mask.cumsum(-1) - 1).clamp(min=0)
            out = backbone(
                input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=False
            )
            p, length = prompt_ids.shape[1], completion_ids.shape[1]
            return out.last_hidden_state[:, p - 1 : p - 1 + length]
        from transformers import DynamicCache

        first, inverse = shared
        cache = DynamicCache()
        p_positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
        prefix = backbone(
            input_ids=prompt_ids[first],
            attention_mask=prompt_mask[first],
            position_ids=p_positions[first],
            use_cache=True,
            **{cache_arg: cache},
        )
        cache.batch_select_indices(inverse)
        # The last prompt position predicts completion token 0; completion token j predicts j+1.
        mask = torch.cat([prompt_mask, completion_mask[:, :-1]], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)[:, prompt_ids.shape[1] :]
        rest = backbone(
            input_ids=completion_ids[:, :-1],
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            **{cache_arg: cache},
        )
        head = prefix.last_hidden_state[:, -1:][inverse]
        return torch.cat([head, rest.last_hidden_state], dim=1)


def iter_full_weights(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` for every parameter, one at a time, cast to ``dtype``.

    A sharded parameter (a DTensor, as FSDP2 makes them) is gathered to its full tensor here, one
    tensor at a time, so the push never holds more than one unsharded parameter; every rank must
    iterate (the gather is a collective).
    """
    if is_peft_model(model):  # LoRA: the merged weights under the base model's names
        yield from lora.iter_merged_weights(model, dtype)
        return
    for name, param in model.named_parameters():
        tensor = param.detach()
        if hasattr(tensor, "full_tensor"):
            tensor = tensor.full_tensor()
        yield name, tensor.to(dtype)


def unwrap(model: torch.nn.Module) -> PreTrainedModel:
    """The transformers model to run: a PEFT model's base, whose layers carry the adapters."""
    return model.get_base_model() if is_peft_model(model) else model


def output_head(model: torch.nn.Module) -> torch.nn.Module:
    """The LM head ``[V, H]`` that the model's current adapter state applies.

    A head in PEFT's ``modules_to_save`` is a wrapper; this returns the copy of the active
    adapter, or the original head when adapters are off.
    """
    head = unwrap(model).get_output_embeddings()
    if hasattr(head, "original_module") and hasattr(head, "modules_to_save"):
        active = head.active_adapters
        if head.disable_adapters or not active or active[0] not in head.modules_to_save:
            return head.original_module
        return head.modules_to_save[active[0]]
    return head


def _distinct_rows(ids: Tensor, mask: Tensor) -> tuple[Tensor, Tensor] | None:
    """``(first, inverse)`` with ``ids[first][inverse] == ids`` (same for the mask): the first row
    of each distinct ``(ids, mask)`` row and, per row, its distinct row. None if all are distinct."""
    _, inverse = torch.unique(torch.cat([ids, mask], dim=1), dim=0, return_inverse=True)
    n_distinct = int(inverse.max()) + 1 if inverse.numel() else 0
    if n_distinct == ids.shape[0]:
        return None
    rows = torch.arange(ids.shape[0], device=ids.device)
    first = torch.full((n_distinct,), ids.shape[0], dtype=rows.dtype, device=ids.device)
    first = first.scatter_reduce(0, inverse, rows, reduce="amin")
    # Renumber so that distinct rows keep their order of first appearance.
    order = torch.argsort(first)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n_distinct, device=ids.device)
    return first[order], rank[inverse]


def _cache_kwarg(module: torch.nn.Module) -> str | None:
    """transformers 5 names the KV-cache argument ``cache``; earlier versions ``past_key_values``.
    None when the module's forward takes neither (and no ``**kwargs``)."""
    params = inspect.signature(module.forward).parameters
    for name in ("cache", "past_key_values"):
        if name in params:
            return name
    has_kwargs = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    return "past_key_values" if has_kwargs else None


@torch.no_grad()
def sample(
    model: PreTrainedModel,
    prompt_ids: Tensor,
    prompt_mask: Tensor,
    generation: GenerationConfig,
    eos_token_id: int,
    pad_token_id: int,
    *,
    greedy: bool = False,
) -> Tensor:
    """Autoregressive sampling with a KV cache: ``[N, P]`` left-padded prompts -> ``[N, L]`` tokens.

    Logits are divided by the temperature, then top-k / top-p filtered; tokens are drawn by
    :func:`_draw` from the global torch RNG, so a checkpoint's RNG state replays them. EOS is
    blocked before ``min_new_tokens``; rows that finished get ``pad_token_id``. Position ids come
    from the attention mask, as in :meth:`PolicyModel.completion_hidden`.
    """
    from transformers import DynamicCache

    n, width = prompt_ids.shape
    # The whole attention mask up front, one column switched on per step: a view per step instead
    # of a torch.cat that copies the [N, P + t] mask at every token.
    full_mask = prompt_mask.new_zeros(n, width + generation.max_new_tokens)
    full_mask[:, :width] = prompt_mask
    mask = prompt_mask
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    cache = DynamicCache()  # filled in place by every forward
    inputs = prompt_ids
    finished = torch.zeros(prompt_ids.shape[0], dtype=torch.bool, device=prompt_ids.device)
    tokens = []
    cache_arg = _cache_kwarg(model) or "past_key_values"
    # The G copies of a prompt share one prefill; the cache is then expanded to all rows.
    rows = _distinct_rows(prompt_ids, prompt_mask)
    for step in range(generation.max_new_tokens):
        select = step == 0 and rows is not None
        out = model(
            input_ids=inputs[rows[0]] if select else inputs,
            attention_mask=mask[rows[0]] if select else mask,
            position_ids=positions[rows[0]] if select else positions,
            use_cache=True,
            logits_to_keep=1,
            **{cache_arg: cache},
        )
        logits = out.logits[:, -1, :].float()
        if select:
            cache.batch_select_indices(rows[1])
            logits = logits[rows[1]]
        if step < generation.min_new_tokens:
            logits[:, eos_token_id] = float("-inf")
        if greedy:
            next_tokens = logits.argmax(-1)
        else:
            if generation.temperature != 1.0:
                logits = logits / generation.temperature
            probs = _filter(logits, generation.top_k, generation.top_p).softmax(-1)
            next_tokens = _draw(probs)
        next_tokens = next_tokens.masked_fill(finished, pad_token_id)
        tokens.append(next_tokens)
        finished |= next_tokens == eos_token_id
        if finished.all():
            break
        inputs = next_tokens.unsqueeze(-1)
        full_mask[:, width + step] = 1
        mask = full_mask[:, : width + step + 1]
        positions = positions[:, -1:] + 1
    return torch.stack(tokens, dim=1)


def _draw(probs: Tensor, block: int = 1024) -> Tensor:
    """One token per row of ``[N, V]`` probabilities by inverse-CDF sampling.

    ``u ~ U[0, 1)·Σp`` from the global torch RNG (one number per row) is located in two levels:
    first among the ``ceil(V / block)`` block sums ``s_b``, then inside the chosen block, both
    with float64 cumulative sums. That is exactly a draw from ``p`` (zero-probability tokens are
    never chosen) and much cheaper on CPU than ``torch.multinomial``, an exponential race over the
    vocabulary, or even a full-vocabulary cumulative sum. A single float32 ``cumsum(p)`` is not
    exact: a token below half an ulp of the running sum (~3e-8 near 1) gets an empty interval and
    can never be drawn, most of the far tail of a 150k vocabulary.
    """
    n, vocab = probs.shape
    block = min(block, vocab)
    whole = vocab // block * block
    sums = probs.unfold(-1, block, block).sum(-1)  # [N, V // block], a view: no copy
    if whole < vocab:
        sums = torch.cat([sums, probs[:, whole:].sum(-1, keepdim=True)], dim=-1)
    cdf = sums.double().cumsum(-1)
    total = cdf[:, -1:]
    if not torch.isfinite(total).all():
        raise RuntimeError(
            "The model produced non-finite probabilities while sampling; its weights are likely "
            "corrupted (NaN/inf). Lower the learning rate or resume from an earlier checkpoint."
        )
    u = torch.rand(n, 1, device=probs.device, dtype=cdf.dtype) * total
    b = torch.searchsorted(cdf, u, right=True).clamp(max=_last_positive(cdf))
    start = b * block
    index = start + torch.arange(block, device=probs.device)
    inside = probs.gather(-1, index.clamp(max=vocab - 1)).masked_fill(index >= vocab, 0.0)
    inner = inside.double().cumsum(-1)
    # u's place inside block b, rescaled to the block's own float64 total.
    before = cdf.gather(-1, b) - sums.gather(-1, b).double()
    target = (u - before).clamp(min=0) / (cdf.gather(-1, b) - before) * inner[:, -1:]
    j = torch.searchsorted(inner, target, right=True).clamp(max=_last_positive(inner))
    return (start + j).squeeze(-1)


def _last_positive(cdf: Tensor) -> Tensor:
    """``[N, 1]`` index of the last entry that raises a non-decreasing ``[N, K]`` cumulative sum
    (the last bin with positive mass): the number of entries strictly below the row's total."""
    return (cdf < cdf[:, -1:]).sum(-1, keepdim=True)


def _filter(logits: Tensor, top_k: int, top_p: float) -> Tensor:
    """Top-k then top-p (nucleus) filtering of ``[N, V]`` logits (removed entries set to -inf)."""
    if top_k and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(-1).cumsum(-1)
        remove = cumulative - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses p
        logits = logits.masked_fill(
            torch.zeros_like(remove).scatter(-1, order, remove), float("-inf")
        )
    return logits


def completion_id_lists(completion_ids: Tensor, completion_mask: Tensor) -> list[list[int]]:
    """Each row's completion tokens (up to and including EOS) as a list: ``[N, L]`` -> N lists."""
    return [ids[m.bool()].tolist() for ids, m in zip(completion_ids, completion_mask, strict=True)]


def completion_tokens_mask(completion_ids: Tensor, eos_token_id: int) -> Tensor:
    """``[N, L]`` mask of tokens up to and including the first EOS (all tokens if none)."""
    is_eos = completion_ids == eos_token_id
    after_eos = (is_eos.cumsum(-1) - is_eos.long()) > 0
    return (~after_eos).long()


# Config attributes of models whose logits are a constant multiple of ``lm_head(last hidden)``:
# Granite (divides by logits_scaling), MiniCPM3 (divides the hidden state by logits_scaling),
# HyperCLOVA X (multiplies by logits_scaling), Falcon-H1 (multiplies by lm_head_multiplier).
_SCALE_ATTRS = ("logits_scaling", "lm_head_multiplier")


def _logit_scale(model: PreTrainedModel) -> float:
    """The constant ``c`` with ``model(ids).logits = c · lm_head(backbone(ids))``; 1 for most models.

    Models that declare one of ``_SCALE_ATTRS`` are probed with one short forward: ``c`` is the
    declared value, its inverse, or 1, whichever the two logits agree on to rounding (relative to
    the largest logit: 1e-4 in float32, 4 ulps in a half-precision dtype; a looser test accepted a
    scale 0.5% off or a bias left unscaled). The whole logit is scaled, bias included
    (``c·(W·h + b)``, what the chunked head computes as ``(W·h + b) / (T / c)``); a model that
    scales the hidden state before a biased head (``W·(c·h) + b``, MiniCPM3's form) or applies
    anything else is refused with an error, since the training passes could not reproduce the
    sampler's distribution.
    """
    declared = [getattr(model.config, a, None) for a in _SCALE_ATTRS]
    declared = [float(v) for v in declared if isinstance(v, (int, float)) and v not in (0, 1)]
    if not declared:
        return 1.0
    head = model.get_output_embeddings()
    ids = (torch.arange(1, 9, device=head.weight.device) % head.weight.shape[0]).unsqueeze(0)
    with eval_scope(model), torch.no_grad():
        out = model(input_ids=ids).logits
        hidden = model.base_model(input_ids=ids).last_hidden_state
        plain = head(hidden).double()
    full = out.double()
    tol = max(1e-4, 4 * torch.finfo(out.dtype).eps) * float(full.abs().max())
    candidates = [1.0] + [x for v in declared for x in (v, 1.0 / v)]
    for c in candidates:
        if float((full - c * plain).abs().max()) <= tol:
            return c
    if head.bias is not None:
        bias = head.bias.detach().double()
        for c in candidates:
            if float((full - c * (plain - bias) - bias).abs().max()) <= tol:
                raise ValueError(
                    f"{type(model).__name__} scales the hidden state by {c:g} before a biased LM "
                    "head (W·(c·h) + b); sdpo's chunked head scales the whole logit, bias "
                    "included. Use a model whose head has no bias or whose scale is 1."
                )
    raise ValueError(
        f"{type(model).__name__}'s logits are not lm_head(last hidden state) times a constant from "
        f"its config ({', '.join(_SCALE_ATTRS)}); sdpo's chunked LM head cannot reproduce them. "
        "Use a model whose logits come from a plain linear head."
    )


def _default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _resolve_dtype(dtype: str | torch.dtype | None, device: torch.device) -> torch.dtype:
    """Dtype of the stored weights: float32 unless asked (compute precision is autocast's job,
    see :mod:`sdpo.distributed`; the trainer casts to ``model.param_dtype``)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype in (None, "auto"):
        return torch.float32
    return getattr(torch, dtype)


def check_model_source(name: str) -> None:
    """Raise ``FileNotFoundError`` when ``name`` is neither ``demo``, a local model directory, nor
    (with ``HF_HUB_OFFLINE=1``) in the Hugging Face cache. Cheap: reads no weights."""
    if name in ("demo", "demo-listprog"):
        return
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").exists():
            raise FileNotFoundError(
                f"Model directory {name!r} has no config.json; give a directory written by save_pretrained."
            )
        return
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise FileNotFoundError(f"Model path {name!r} does not exist.")
    if os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes"):
        from huggingface_hub import try_to_load_from_cache

        if not isinstance(try_to_load_from_cache(name, "config.json"), str):
            raise FileNotFoundError(
                f"Model {name!r} is not a local directory and not in the Hugging Face cache "
                "(HF_HUB_OFFLINE=1 is set). Give a local directory, or model_name=demo."
            )


def _load(name: str, trust_remote_code: bool) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    if name == "demo":
        from sdpo.demo import load_demo_model

        return load_demo_model()
    if name == "demo-listprog":  # the list-program model (sdpo.tasks.listprog)
        from sdpo.demo import load_listprog_model

        return load_listprog_model()
    path = Path(name)
    if (path / "adapter_config.json").exists():  # a LoRA adapter (PEFT's format) on its base
        from sdpo.lora import load_pretrained

        base_name = json.loads((path / "adapter_config.json").read_text()).get(
            "base_model_name_or_path"
        )
        if not base_name:
            raise FileNotFoundError(
                f"{path}/adapter_config.json names no base model (base_model_name_or_path)."
            )
        base, tokenizer = _load(base_name, trust_remote_code)
        if (path / "tokenizer_config.json").exists():
            tokenizer = AutoTokenizer.from_pretrained(path)
        return load_pretrained(path, base), tokenizer
    # A hub id is "name" or "org/name"; anything else is a local path.
    looks_local = name.startswith((".", "/", "~")) or name.count("/") > 1
    if looks_local and not path.exists():
        raise FileNotFoundError(f"Model path {name!r} does not exist.")
    offline = os.environ.get("HF_HUB_OFFLINE", "0").lower() in ("1", "true", "yes")
    try:
        model = AutoModelForCausalLM.from_pretrained(
            name, trust_remote_code=trust_remote_code, local_files_only=offline or path.exists()
        )
        tokenizer = AutoTokenizer.from_pretrained(
            name, trust_remote_code=trust_remote_code, local_files_only=offline or path.exists()
        )
    except OSError as exc:
        where = (
            "this directory"
            if path.exists()
            else "the local Hugging Face cache (HF_HUB_OFFLINE=1 is set)"
            if offline
            else "the hub or the local cache"
        )
        raise FileNotFoundError(
            f"Could not load model {name!r} from {where}: {exc}. Pass a local directory with config.json, "
            "weights and tokenizer files, or model_name='demo' for the model shipped with sdpo."
        ) from None
    return model, tokenizer
