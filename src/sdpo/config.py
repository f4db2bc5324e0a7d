"""SDPOConfig: every hyperparameter of sdpo, declared once, with its one-line doc and default.

Sections mirror the algorithm: ``model``, ``generation``, ``self_distillation``,
``policy_gradient``, ``optimization``, ``data``, ``run``, ``health``. The seed's flat form works too::

    SDPOConfig(model_name="gpt2", num_samples_per_prompt=4,
               self_distillation__success_reward_threshold=0.8, self_distillation__alpha=0.5)

A bare leaf name that exists in exactly one section (``alpha=1.0``) is accepted as well.
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import math
import string
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from sdpo.run_dir import write_text_atomic


def _f(default: Any, doc: str, **choices: Any) -> Any:
    """A dataclass field with its help text (and optional allowed values) in the metadata."""
    meta = {"doc": doc, **choices}
    if isinstance(default, (list, dict, tuple)):
        return field(default_factory=lambda: type(default)(default), metadata=meta)
    return field(default=default, metadata=meta)


# Far above any real run (the paper: 32 prompts x 8 samples, LoRA ranks <= 256), far below what
# exhausts a machine before the first step.
MAX_PROMPTS_PER_STEP = 65536
MAX_SAMPLES_PER_PROMPT = 4096
MAX_LORA_RANK = 4096

DEFAULT_REPROMPT_TEMPLATE = (
    "{prompt}{solution}{feedback}\n\nCorrectly solve the original question.\n"
)
DEFAULT_SOLUTION_TEMPLATE = "\nCorrect solution:\n\n{successful_previous_attempt}\n\n"
DEFAULT_FEEDBACK_TEMPLATE = (
    "\nThe following is feedback from your unsuccessful earlier attempt:\n\n{feedback_raw}\n\n"
)


@dataclass
class LoraConfig:
    """LoRA (with PEFT, ``pip install 'sdpo[peft]'``): train a low-rank adapter on a frozen base.

    Field names follow PEFT's ``LoraConfig``. Teachers then cost one adapter, not one model: the
    EMA teacher is a second adapter, the frozen teacher and the reference the initial policy (the
    base with adapters off, or a snapshot of a trained starting adapter).
    """

    # Upper bounds here and below: a typo (1e9) fails at once naming the key, not in the allocator.
    r: int = _f(0, "LoRA rank; 0 = no adapter (every weight is trained).", min=0, max=MAX_LORA_RANK)
    lora_alpha: float = _f(
        32.0, "LoRA scaling numerator: the update is (lora_alpha / r)·B·A.", min_exclusive=0.0
    )
    lora_dropout: float = _f(
        0.0, "Dropout on the adapter's input while training.", min=0.0, max=1.0
    )
    target_modules: list[str] | None = _f(
        None,
        "Module names that get an adapter; None = every linear projection of the transformer "
        "blocks (attention and MLP), never the LM head.",
    )
    modules_to_save: list[str] = _f(
        [], "Modules trained in full and saved with the adapter (e.g. lm_head)."
    )


@dataclass
class ModelConfig:
    """How the policy model is loaded."""

    dtype: str = _f(
        "auto",
        "Compute dtype: forward/backward run under autocast in it; auto = bfloat16 on CUDA and on "
        "CPUs with native bf16 (AVX512-BF16/AMX), float32 elsewhere (printed at start).",
        choices=("auto", "float32", "float16", "bfloat16"),
    )
    param_dtype: str = _f(
        "float32",
        "Dtype of the stored weights, gradients, AdamW state and EMA teacher. Keep float32: in "
        "bfloat16 most small updates round away (lost updates); a warning says so.",
        choices=("float32", "bfloat16", "float16"),
    )
    gradient_checkpointing: bool = _f(
        False,
        "Recompute the student backbone's activations in the backward pass (less memory, ~1/3 more compute).",
        resumable=True,
    )
    dropout: bool = _f(
        False,
        "Keep the model's own dropout in training passes. Off (default, as in TRL's SDPO): old and "
        "new log-probs see one network, so the importance ratio is 1 at the first reuse.",
    )
    attn_implementation: str = _f(
        "sdpa",
        "Attention kernel: sdpa, eager, or flash_attention_2 (needs the flash-attn package and CUDA).",
        choices=("sdpa", "eager", "flash_attention_2"),
    )
    device: str | None = _f(
        None,
        "Device to run on (cpu, cuda, cuda:1); None picks CUDA when available.",
        resumable=True,
    )
    trust_remote_code: bool = _f(False, "Allow custom model code from the model directory.")
    max_prompt_length: int = _f(
        512, "Prompts longer than this many tokens are skipped and counted.", min=1
    )
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class GenerationConfig:
    """Sampling of the G rollouts per prompt."""

    max_new_tokens: int = _f(64, "Maximum completion length in tokens.", min=1)
    min_new_tokens: int = _f(
        0, "Suppress EOS before this many tokens (benchmarks use it to fix the length).", min=0
    )
    temperature: float = _f(
        1.0, "Sampling temperature T (log-probs are computed at the same T).", min_exclusive=0.0
    )
    top_p: float = _f(1.0, "Nucleus sampling mass; 1.0 disables it.", min_exclusive=0.0, max=1.0)
    top_k: int = _f(0, "Sample from the k most likely tokens; 0 disables it.", min=0)
    backend: str = _f(
        "hf",
        "Sampler: hf = sdpo's KV-cache sampler; vllm = a colocated vLLM engine (sdpo[vllm]).",
        choices=("hf", "vllm"),
    )
    vllm_gpu_memory_utilization: float = _f(
        0.3,
        "Fraction of GPU memory vLLM may take for weights + KV cache (CPU: VLLM_CPU_KVCACHE_SPACE).",
        min_exclusive=0.0,
        max=1.0,
    )
    vllm_max_model_len: int | None = _f(
        None, "vLLM's context length; None = model.max_prompt_length + max_new_tokens.", min=1
    )
    vllm_sleep_mode: bool = _f(
        True, "On CUDA, let vLLM release its memory between generations (sleep/wake)."
    )
    vllm_is_correction: str = _f(
        "token",
        "Truncated IS min(exp(logp_train - logp_vllm), cap) on the PG and distillation terms, per "
        "token or per sequence; none = off. Acts only when the backend reports log-probs (vllm).",
        choices=("token", "sequence", "none"),
    )
    vllm_is_cap: float = _f(
        2.0, "Upper bound of the train/inference mismatch weight.", min_exclusive=0.0
    )


@dataclass
class SelfDistillationConfig:
    """The self-teacher: who it is, what context it sees, and how the student is pulled toward it."""

    success_reward_threshold: float = _f(
        1.0, "Completions with reward >= this are successes (demonstrations)."
    )
    success_reward: str | None = _f(
        None,
        "With several reward functions: whose score is compared with success_reward_threshold. "
        "None = the first function's own score (put the correctness reward first); a function's "
        "name (e.g. accuracy_reward); 'sum' = the weighted sum (the training reward).",
    )
    alpha: float = _f(
        0.5,
        "Divergence: 0 = forward KL(teacher||student), 1 = reverse KL, between = alpha-mixture JSD.",
        min=0.0,
        max=1.0,
    )
    distillation_weight: float = _f(1.0, "Weight of the distillation loss.", min=0.0)
    distillation_topk: int | None = _f(
        None, "Distill on the student's top-k tokens only; None = full vocabulary.", min=1
    )
    distillation_add_tail: bool = _f(
        True,
        "With top-k, add one tail bucket holding the remaining mass (else renormalize over the k ids).",
    )
    distillation_level: str = _f(
        "logit",
        "logit = full/top-k distribution matching; token = sampled-token variant (alpha must be 1).",
        choices=("logit", "token"),
    )
    is_clip: float | None = _f(
        2.0,
        "Clip of the importance weight pi_theta/pi_old on the distillation loss; None turns the correction off (weight 1, as in the official code and TRL).",
        min_exclusive=0.0,
    )
    teacher: str = _f(
        "ema",
        "Teacher kind: ema copy, frozen initial model, live student, trust_region lerp, or gated "
        "(a copy frozen between refreshes, refreshed when the reward improved: docs/method.md).",
        choices=("ema", "frozen", "live", "trust_region", "gated"),
    )
    teacher_update_rate: float = _f(
        0.05,
        "EMA rate beta: phi <- (1-beta) phi + beta theta (trust_region: lerp weight). 0.05 is the paper's science setting and holds with the PG term on (the default; the study's SDPO arm); for pure SDPO (pg_loss_weight=0), long runs or a high learning rate prefer 0.01 or teacher=frozen: on arithmetic_hard at lr 1e-4, pure SDPO with 0.05 collapsed to 0.55/0.60 sampled/greedy after its peak while 0.01 reached 0.73/0.84 and frozen 0.74/0.85 (one seed; the 3-seed default decision is pending).",
        min=0.0,
        max=1.0,
    )
    # The gated teacher's refresh rule (CGTR, arXiv 2606.03532; sdpo.teacher.GateRule).
    gated_window: int = _f(
        10,
        "gated teacher: W, the steps of the rolling reward/length means and the least steps "
        "between refreshes.",
        min=1,
    )
    gated_min_improvement: float = _f(
        0.0,
        "gated teacher: refresh only when the W-step mean reward exceeds the one at the last "
        "refresh by more than this.",
        min=0.0,
    )
    gated_length_ratio: float = _f(
        1.5,
        "gated teacher: no refresh while the W-step mean p90 completion length exceeds this times "
        "the one at the last refresh (length blow-up).",
        min_exclusive=0.0,
    )
    # Method variants (docs/method.md; each is neutral at its default: plain SDPO).
    routing: str = _f(
        "none",
        "correctness = SRPO (arXiv 2604.02288): distill only rollouts with reward < "
        "success_reward_threshold; a PG term at distillation_weight covers the others.",
        choices=("none", "correctness"),
    )
    pass_rate_weighting: bool = _f(
        False,
        "SC-SDPO (arXiv 2605.27765): weight each question's distillation by sqrt(p(1-p)), p = its "
        "group's success rate (all-fail and all-success groups get 0).",
    )
    divergence_clip: float | None = _f(
        None,
        "Clip each token's divergence at this value (its gradient is 0 above it); None = off.",
        min_exclusive=0.0,
    )
    entropy_gate: float | None = _f(
        None,
        "Entropy gating: no distillation at tokens where the student's entropy exceeds this "
        "(nats; its forks); None = off.",
        min=0.0,
    )
    contrastive_weight: float = _f(
        0.0,
        "Contrastive teacher (Purified OPSD, arXiv 2607.02234): target q(x') (pi(x) / q(c))^gamma, c = "
        "the teacher context without the question; gamma = this, 0 = off (a second teacher pass).",
        min=0.0,
    )
    copy_rate_ngram: int = _f(
        0,
        "Log self_distillation/copy_rate with word n-grams of this size (3 is a good start); 0 = off.",
        min=0,
    )
    success_memory_steps: int = _f(
        0,
        "Success memory: an all-fail group or lone success takes the latest success on the same "
        "question from the last this-many steps as its demonstration; 0 = off.",
        min=0,
    )
    dont_reprompt_on_self_success: bool = _f(
        True, "Never use a completion as its own demonstration."
    )
    demonstration_selection: str = _f(
        "first",
        "Which successful sibling becomes the demonstration.",
        choices=("first", "random", "shortest"),
    )
    remove_thinking_from_demonstration: bool = _f(
        True, "Strip <think>...</think> from demonstrations."
    )
    include_environment_feedback: bool = _f(
        True, "Put the environment's feedback for this completion in the teacher context."
    )
    environment_feedback_only_without_solution: bool = _f(
        True, "Use feedback only when no demonstration is available."
    )
    chat_earlier_turns: str = _f(
        "drop",
        "Chat prompts: the teacher sees the system messages and one user turn (the reprompted last user message), as the official code builds it; drop = earlier user/assistant turns are left out; fold = they are written into {prompt} as 'role: text' lines before the question (for turns a question needs). Keeping them as turns made 'the original question' point at a few-shot example.",
        choices=("drop", "fold"),
    )
    max_reprompt_len: int = _f(
        2048,
        "Token limit of the teacher prompt; demonstration/feedback are shortened first.",
        min=1,
    )
    reprompt_template: str = _f(
        DEFAULT_REPROMPT_TEMPLATE, "Teacher prompt; fields {prompt}, {solution}, {feedback}."
    )
    solution_template: str = _f(
        DEFAULT_SOLUTION_TEMPLATE, "Demonstration block; field {successful_previous_attempt}."
    )
    feedback_template: str = _f(DEFAULT_FEEDBACK_TEMPLATE, "Feedback block; field {feedback_raw}.")
    loss_chunk_size: int = _f(
        0,
        "Completion positions per chunk when computing logits and divergences (memory O(chunk x "
        "vocab)); 0 = auto: 2^23 / vocab, clamped to [64, 1024] (~32 MB per float32 buffer).",
        min=0,
    )


@dataclass
class PolicyGradientConfig:
    """GRPO-style policy gradient and the reference KL penalty."""

    pg_loss_weight: float = _f(1.0, "Weight of the clipped policy-gradient loss.", min=0.0)
    kl_penalty_weight: float = _f(
        0.01, "Weight of the k3 reference-KL penalty; 0 skips loading a reference model.", min=0.0
    )
    clip_eps_low: float = _f(
        0.2, "Lower clip epsilon of the ratio (1 - eps_low).", min=0.0, max_exclusive=1.0
    )
    clip_eps_high: float = _f(
        0.2, "Upper clip epsilon of the ratio (1 + eps_high); DAPO uses 0.28.", min=0.0
    )
    scale_rewards: bool = _f(
        True, "Divide group-centred rewards by the group's std + eps (official SDPO runs: off)."
    )
    advantage_clip: float | None = _f(
        None,
        "Clip advantages to [-c, c] (the paper's test-time runs: 5.0); None = off.",
        min_exclusive=0.0,
    )
    rlsd_max_weight: float | None = _f(
        None,
        "RLSD (arXiv 2604.03128): scale the PG term of rows with a teacher per token by "
        "min(exp(sign(A)(log q - log pi)), this); None = off. Runs the teacher pass.",
        min_exclusive=0.0,
    )
    advantage_blend: float | None = _f(
        None,
        "The paper's Eq. 3: PG advantage lambda*A_GRPO + (1-lambda)*(log q - log pi) per token "
        "(lambda = this, 0.9 for weak models); None = off. Runs the teacher pass.",
        min=0.0,
        max=1.0,
    )
    loss_aggregation: str = _f(
        "token_mean",
        "token_mean (DAPO), sequence_mean (GRPO) or dr_grpo (Dr. GRPO: divides by num_sequences x generation.max_new_tokens, a constant).",
        choices=("token_mean", "sequence_mean", "dr_grpo"),
    )


@dataclass
class OptimizationConfig:
    """Optimizer, schedule and batching."""

    learning_rate: float = _f(1e-5, "AdamW learning rate.", min_exclusive=0.0, resumable=True)
    weight_decay: float = _f(0.01, "AdamW weight decay.", min=0.0)
    adam_beta1: float = _f(0.9, "AdamW beta1.", min=0.0, max_exclusive=1.0)
    adam_beta2: float = _f(0.999, "AdamW beta2.", min=0.0, max_exclusive=1.0)
    warmup_steps: int = _f(0, "Linear warm-up steps.", min=0)
    lr_scheduler: str = _f(
        "constant", "Schedule after warm-up.", choices=("constant", "linear", "cosine")
    )
    max_grad_norm: float | None = _f(
        1.0, "Gradient-norm clip; None disables it.", min_exclusive=0.0, resumable=True
    )
    prompts_per_step: int = _f(
        8,
        "Prompts B per step when the trainer builds the data loader itself.",
        min=1,
        max=MAX_PROMPTS_PER_STEP,
    )
    micro_batch_size: int = _f(
        8,
        "Completions per forward/backward pass (gradient accumulation over the rest).",
        min=1,
        resumable=True,
    )
    updates_per_batch: int = _f(
        1,
        "Optimizer updates per generated batch (>1 reuses it off-policy with IS clipping).",
        min=1,
    )


@dataclass
class DataConfig:
    """Where prompts and rewards come from when the trainer is driven by a config (`sdpo train`)."""

    task: str | None = _f(
        None, "Built-in task (arithmetic, reversal, code); None = use data.train_file."
    )
    train_file: str | None = _f(None, "JSONL file of training rows (a 'prompt' plus any columns).")
    eval_file: str | None = _f(None, "JSONL file of evaluation rows.", resumable=True)
    reward: str | None = _f(
        None,
        "Reward for train_file rows: math, math_lenient, code, exact, or module:function (TRL-style callable).",
    )
    reward_weights: list[float] | None = _f(
        None,
        "Weights of several reward functions (TRL's reward_weights): reward = sum_i w_i r_i; "
        "None = 1.0 each.",
    )
    reward_timeout_s: float | None = _f(
        None,
        "Stop the run when one reward call takes longer than this (seconds); None = no limit.",
        min_exclusive=0.0,
        resumable=True,
    )
    max_feedback_chars: int | None = _f(
        10_000,
        "Cut reward feedback longer than this, with a marker (teacher prompt, samples.jsonl).",
        min=1,
    )
    feedback_leak_guard: str = _f(
        "redact",
        "Feedback containing the row's reference answer (a reward declares it as "
        "info['reference_answer']): redact it (counted as feedback/redacted), refuse (stop), or off.",
        choices=("redact", "refuse", "off"),
    )


@dataclass
class RunConfig:
    """Bookkeeping: seeds, output, length, logging, checkpoints."""

    seed: int = _f(0, "Random seed of the run.", min=0, max=2**32 - 1)
    output_dir: str = _f(
        "runs/sdpo",
        "Run directory (metrics, samples, checkpoints); must be empty unless resuming or overwriting.",
        resumable=True,
    )
    overwrite_output_dir: bool = _f(
        False,
        "Delete an earlier run's checkpoints, logs and config in output_dir instead of refusing.",
        resumable=True,
    )
    max_steps: int = _f(
        100, "Training steps (one step = one generated batch).", min=1, resumable=True
    )
    logging_steps: int = _f(1, "Write metrics every N steps.", min=1, resumable=True)
    eval_steps: int = _f(
        0, "Evaluate every N steps (0 = only at the start and the end).", min=0, resumable=True
    )
    eval_max_prompts: int | None = _f(
        None, "Evaluate on at most this many eval prompts.", min=1, resumable=True
    )
    eval_num_samples: int = _f(
        1,
        "Sampled completions per eval prompt n (mean@n, pass@k and maj@k for k <= n).",
        min=1,
        resumable=True,
    )
    sample_log_steps: int = _f(
        10, "Write sample records to samples.jsonl every N steps.", min=1, resumable=True
    )
    teacher_probe_steps: int | None = _f(
        None,
        "Log the teacher's generative accuracy on a fixed probe set (teacher/probe_accuracy: "
        "contexts with the feedback on the initial model's failed attempts at eval prompts) "
        "every N steps; None = off.",
        min=1,
        resumable=True,
    )
    teacher_probe_prompts: int = _f(
        32, "Eval prompts the teacher probe set is built from.", min=1, resumable=True
    )
    save_steps: int = _f(50, "Checkpoint every N steps (and at the end).", min=1, resumable=True)
    save_total_limit: int = _f(2, "Keep the last K checkpoints.", min=1, resumable=True)
    resume_from: str | None = _f(
        None, "Run directory or checkpoint to resume from.", resumable=True
    )
    max_consecutive_nonfinite: int = _f(
        3, "Stop after this many steps in a row with a non-finite loss.", min=1, resumable=True
    )
    progress_bar: bool = _f(True, "Show a progress bar.", resumable=True)
    num_threads: int = _f(
        0,
        "PyTorch CPU threads; 0 = auto: 1 for models under 50M parameters (threading overhead "
        "dominates tiny models), PyTorch's default otherwise.",
        min=0,
        resumable=True,
    )
    report_to: list[str] = _f(
        ["jsonl"],
        "Trackers: jsonl (always on), tensorboard, wandb, mlflow, trackio (e.g. [jsonl,tensorboard]).",
    )
    tracker_project: str = _f("sdpo", "Project / experiment name in W&B, MLflow and trackio.")


@dataclass
class HealthConfig:
    """Health warnings (sdpo.health): when a run is not learning, say so, once per interval."""

    enabled: bool = _f(True, "Check the run's health and print warnings.")
    window: int = _f(20, "N: a condition must hold over the last N steps to warn.", min=1)
    warning_interval: int = _f(
        50, "Report each warning at most once per this many steps while it holds.", min=1
    )
    kl_floor: float = _f(
        1e-3,
        "Warn when the distillation divergence (self_distillation/divergence_mean) stays below this for N distilled steps.",
        min=0.0,
    )
    grad_norm_floor: float = _f(
        1e-4, "Warn when the gradient norm stays below this for N steps.", min=0.0
    )
    length_collapse_ratio: float = _f(
        0.25,
        "Warn when the N-step mean completion length falls below this fraction of its best.",
        min=0.0,
        max=1.0,
    )
    reward_drop: float = _f(
        0.15,
        "Warn when the N-step mean reward falls below its best N-step mean by more than this fraction of the best (and by more than reward_drop_z standard errors).",
        min=0.0,
    )
    reward_drop_z: float = _f(
        5.0,
        "reward_drop also needs the drop to exceed this many standard errors (the step-to-step reward noise, from successive differences, times sqrt(2 / N)).",
        min=0.0,
    )
    copy_rate_rise: float = _f(
        0.2,
        "Warn when the N-step mean self_distillation/copy_rate rises more than this above its lowest.",
        min=0.0,
    )
    teacher_max_age: int = _f(
        200, "Warn when the gated teacher has not refreshed for this many steps.", min=1
    )
    teacher_accuracy_drop: float = _f(
        0.1,
        "Warn when teacher/probe_accuracy falls more than this below its best.",
        min=0.0,
    )


@dataclass
class DistributedConfig:
    """Several processes (``torchrun`` / ``accelerate launch``): how they share the work."""

    strategy: str = _f(
        "none",
        "none = one process; ddp = replicated weights, gradients summed; fsdp = FSDP2 shards "
        "(weights, gradients, AdamW state, teachers) across processes.",
        choices=("none", "ddp", "fsdp"),
    )
    fsdp_cpu_offload: bool = _f(
        False, "fsdp only: keep the shards (and AdamW state) in CPU memory between uses."
    )
    timeout_s: float = _f(
        600.0,
        "A collective that waits longer than this (a rank died or hangs) stops the job.",
        min_exclusive=0.0,
    )


SECTIONS: dict[str, type] = {
    "model": ModelConfig,
    "generation": GenerationConfig,
    "self_distillation": SelfDistillationConfig,
    "policy_gradient": PolicyGradientConfig,
    "optimization": OptimizationConfig,
    "data": DataConfig,
    "distributed": DistributedConfig,
    "run": RunConfig,
    "health": HealthConfig,
}


@functools.cache
def _type_hints(cls: type) -> dict[str, Any]:
    """``typing.get_type_hints`` once per class (it evaluates every annotation: slow)."""
    return typing.get_type_hints(cls)


def _leaf_keys(prefix: str, cls: type) -> list[str]:
    """Dotted keys of a section's fields, descending into sub-sections (``model.lora.r``)."""
    keys = []
    for f in dataclasses.fields(cls):
        typ = _type_hints(cls)[f.name]
        if dataclasses.is_dataclass(typ):
            keys.extend(_leaf_keys(f"{prefix}.{f.name}", typ))
        else:
            keys.append(f"{prefix}.{f.name}")
    return keys


# Sections nested inside sections, by dotted path.
_SUBSECTIONS = {
    f"{s}.{f.name}"
    for s, c in SECTIONS.items()
    for f in dataclasses.fields(c)
    if dataclasses.is_dataclass(_type_hints(c)[f.name])
}


@dataclass
class SDPOConfig:
    """The whole configuration of an sdpo run (see the section classes for each field's doc)."""

    model_name: str = _f(
        "demo", "Model path or hub id; 'demo' = the small model shipped with sdpo."
    )
    num_samples_per_prompt: int = _f(
        4, "Rollouts per prompt G (one group).", min=1, max=MAX_SAMPLES_PER_PROMPT
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    generation: GenerationConfig = field(default_factory=GenerationConfig)
    self_distillation: SelfDistillationConfig = field(default_factory=SelfDistillationConfig)
    policy_gradient: PolicyGradientConfig = field(default_factory=PolicyGradientConfig)
    optimization: OptimizationConfig = field(default_factory=OptimizationConfig)
    data: DataConfig = field(default_factory=DataConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)
    run: RunConfig = field(default_factory=RunConfig)
    health: HealthConfig = field(default_factory=HealthConfig)

    def __init__(self, **kwargs: Any) -> None:
        for fld in dataclasses.fields(self):
            has_factory = fld.default_factory is not dataclasses.MISSING
            setattr(self, fld.name, fld.default_factory() if has_factory else fld.default)
        given: dict[str, str] = {}  # dotted key -> how it was given, to catch a key set twice

        def assign(name: str, value: Any) -> None:
            if isinstance(value, dict) and name in _SUBSECTIONS:  # model.lora: {r: 8}
                for sub, v in value.items():
                    assign(f"{name}.{sub}", v)
                return
            mapped = trl_key(name, value) if "." not in name else None
            if mapped is not None and name not in self.keys():
                name, value = mapped  # a TRL name (and value) for an sdpo key
            key = self.resolve_key(name)
            if key in given:
                raise ValueError(
                    f"{key} is set twice (as {given[key]!r} and as {name!r}); keep one of them."
                )
            given[key] = name
            self.set(key, value)

        for key, value in kwargs.items():
            if key in SECTIONS and isinstance(value, dict):
                for sub, v in value.items():
                    assign(f"{key}.{sub}", v)
            elif key in SECTIONS and isinstance(value, SECTIONS[key]):
                setattr(self, key, value)
            else:
                assign(key.replace("__", "."), value)
        self.validate()

    # ----- lookup -------------------------------------------------------------------------------

    @classmethod
    def keys(cls) -> list[str]:
        """Every valid dotted key, e.g. ``self_distillation.alpha``."""
        return list(_all_keys(cls))

    @classmethod
    def resolve_key(cls, key: str) -> str:
        """Map a dotted key, or a leaf name unique across sections, to its dotted key."""
        valid = cls.keys()
        if key in valid:
            return key
        if "." not in key:
            owners = [k for k in valid if k.split(".")[-1] == key]
            if len(owners) == 1:
                return owners[0]
            if key in TRL_ALIASES:  # TRL's name for the same setting
                return TRL_ALIASES[key]
            if key in TRL_VALUES:
                return TRL_VALUES[key][0]
        if key.split(".")[-1] in TRL_KEY_HINTS:
            raise KeyError(f"Unknown config key {key!r}: {TRL_KEY_HINTS[key.split('.')[-1]]}")
        hint = _suggestions(key, valid)
        raise KeyError(f"Unknown config key {key!r}.{hint} (`sdpo train --help` lists all keys.)")

    @staticmethod
    def field_info(key: str) -> tuple[dataclasses.Field, Any]:
        """The dataclass field and its resolved type for a dotted key."""
        owner: type = SDPOConfig
        *path, name = key.split(".")
        for part in path:  # a section, then nested sub-sections (model.lora)
            owner = SECTIONS[part] if owner is SDPOConfig else _type_hints(owner)[part]
        fld = next(f for f in dataclasses.fields(owner) if f.name == name)
        return fld, _type_hints(owner)[name]

    def get(self, key: str) -> Any:
        """Value of a (dotted or unique leaf) key."""
        key = self.resolve_key(key)
        obj: Any = self
        for part in key.split("."):
            obj = getattr(obj, part)
        return obj

    def set(self, key: str, value: Any) -> None:
        """Set a (dotted or unique leaf) key, converting strings to the field's type.

        A sub-section (``model.lora``) takes a mapping of its own keys."""
        if isinstance(value, dict) and key.replace("__", ".") in _SUBSECTIONS:
            for sub, v in value.items():
                self.set(f"{key.replace('__', '.')}.{sub}", v)
            return
        mapped = trl_key(key, value) if "." not in key else None
        if mapped is not None and key not in self.keys():
            key, value = mapped  # a TRL name (and value) for an sdpo key
        key = self.resolve_key(key)
        fld, typ = self.field_info(key)
        value = _convert(key, value, typ)
        obj: Any = self
        *path, name = key.split(".")
        for part in path:
            obj = getattr(obj, part)
        setattr(obj, name, value)

    def apply_overrides(
        self, overrides: list[str], data_files: tuple[str, ...] = ("data.train_file",)
    ) -> SDPOConfig:
        """Apply ``key=value`` strings (``self_distillation.alpha=1.0``) in order, then validate.

        The overrides are a layer over this config: naming one of ``data_files`` replaces a
        built-in ``data.task`` set before (a preset's), see :meth:`replace_data_source`."""
        given: set[str] = set()
        for item in overrides:
            if "=" not in item:
                raise ValueError(
                    f"Override {item!r} must look like key=value, e.g. self_distillation.alpha=1.0"
                )
            key, raw = item.split("=", 1)
            self.set(key.strip(), raw.strip())
            given.add(self.resolve_key(key.strip()))
        self.replace_data_source(given, data_files)
        self.validate()
        return self

    def replace_data_source(
        self, given: set[str], data_files: tuple[str, ...] = ("data.train_file",)
    ) -> None:
        """The data source set last wins: a layer (the keys ``given`` over a preset, a config
        file or a run's config) that sets a data file but no ``data.task`` drops the task set
        before, so ``sdpo train data.train_file=x.jsonl`` trains on the file as a TRL user
        expects, not on the quickstart's arithmetic; a layer that sets ``data.task`` but no file
        drops earlier files. Both in one layer is refused by :meth:`validate`."""
        files = [k for k in data_files if k in given and self.get(k) is not None]
        if files and "data.task" not in given:
            self.data.task = None
        elif "data.task" in given and self.data.task is not None and not files:
            self.data.train_file = self.data.eval_file = None

    # ----- validation ---------------------------------------------------------------------------

    def validate(self) -> SDPOConfig:
        """Check every field's type and range; raise ValueError naming the field and the allowed range."""
        for key in self.keys():
            fld, typ = self.field_info(key)
            value = self.get(key)
            _convert(key, value, typ)  # type check
            meta = fld.metadata
            if value is None:
                continue
            if "choices" in meta and value not in meta["choices"]:
                raise ValueError(f"{key} = {value!r} is not one of {list(meta['choices'])}.")
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                if isinstance(value, float) and not math.isfinite(value):
                    raise ValueError(
                        f"{key} is {'NaN' if math.isnan(value) else value}; give a finite number."
                    )
                lo, hi = meta.get("min"), meta.get("max")
                lo_ex, hi_ex = meta.get("min_exclusive"), meta.get("max_exclusive")
                if lo is not None and value < lo:
                    raise ValueError(
                        f"{key} = {value} is out of range: must be >= {lo}{f' and <= {hi}' if hi is not None else ''}."
                    )
                if hi is not None and value > hi:
                    raise ValueError(
                        f"{key} = {value} is out of range: must be <= {hi}{f' and >= {lo}' if lo is not None else ''}."
                    )
                if lo_ex is not None and value <= lo_ex:
                    raise ValueError(f"{key} = {value} is out of range: must be > {lo_ex}.")
                if hi_ex is not None and value >= hi_ex:
                    raise ValueError(f"{key} = {value} is out of range: must be < {hi_ex}.")
        for key in ("model_name", "run.output_dir"):
            if not self.get(key).strip():
                raise ValueError(
                    f"{key} is empty; give a {'model path or hub id' if key == 'model_name' else 'directory'}."
                )
        gen = self.generation
        if gen.min_new_tokens > gen.max_new_tokens:
            raise ValueError(
                f"generation.min_new_tokens = {gen.min_new_tokens} is more than "
                f"generation.max_new_tokens = {gen.max_new_tokens}."
            )
        if self.generation.backend == "vllm" and self.model.lora.r > 0:
            raise ValueError(
                "generation.backend = 'vllm' with model.lora.r > 0 is not supported yet (the weight "
                "push sends full weights, not adapters); use generation.backend = 'hf' with LoRA."
            )
        from sdpo.tracking import TRACKERS

        for name in self.run.report_to:
            if name not in TRACKERS:
                raise ValueError(
                    f"run.report_to: unknown tracker {name!r}; choose from {', '.join(TRACKERS)}."
                )
        if self.data.task is not None and self.data.train_file is not None:
            raise ValueError(
                f"data.task = {self.data.task!r} and data.train_file = {self.data.train_file!r} are "
                "both set, and a built-in task brings its own data: set data.task=none to train on "
                "the file, or drop data.train_file."
            )
        sd = self.self_distillation
        for name, (fields, required) in TEMPLATE_FIELDS.items():
            _check_template(f"self_distillation.{name}", getattr(sd, name), fields, required)
        if not math.isfinite(sd.success_reward_threshold):
            raise ValueError("self_distillation.success_reward_threshold must be a finite number.")
        if sd.distillation_level == "token" and sd.alpha != 1.0:
            raise ValueError(
                "self_distillation.distillation_level = 'token' needs self_distillation.alpha = 1.0 (reverse KL on the sampled token)."
            )
        if sd.divergence_clip is not None and sd.distillation_level != "logit":
            raise ValueError(
                "self_distillation.divergence_clip clips a divergence, which the sampled-token "
                "estimator (distillation_level = 'token') does not compute; use "
                "distillation_level=logit or divergence_clip=null."
            )
        if sd.contrastive_weight > 0 and self.distributed.strategy == "fsdp":
            raise ValueError(
                "self_distillation.contrastive_weight > 0 is not supported with "
                "distributed.strategy=fsdp yet (its second teacher pass is not run in lockstep); "
                "use ddp or contrastive_weight=0."
            )
        if sd.routing != "none" and sd.distillation_weight == 0:
            raise ValueError(
                "self_distillation.routing splits rows between distillation and a PG term weighted "
                "like the distillation term; with distillation_weight = 0 both are off. Set "
                "self_distillation.distillation_weight > 0 or routing=none."
            )
        return self

    # ----- serialization ------------------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        """Nested plain dict of the config."""
        out: dict[str, Any] = {
            "model_name": self.model_name,
            "num_samples_per_prompt": self.num_samples_per_prompt,
        }
        for name in SECTIONS:
            out[name] = dataclasses.asdict(getattr(self, name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SDPOConfig:
        """Build from a nested (or flat dotted) dict; unknown keys raise with the closest valid key."""
        if not isinstance(data, dict):
            raise ValueError(
                f"A config must be a mapping of keys to values, got {type(data).__name__}."
            )
        return cls(**{k.replace(".", "__"): v for k, v in data.items()})

    def to_yaml(self, path: str | Path, comment: str | None = None) -> None:
        """Write the config as YAML, atomically (the old file stays whole if the write fails);
        ``comment`` lines go first as ``# ...`` (what the run resolved, e.g. model.dtype=auto)."""
        head = "".join(f"# {line}\n" for line in comment.splitlines()) if comment else ""
        write_text_atomic(path, head + yaml.safe_dump(self.to_dict(), sort_keys=False))

    def diff(self, other: SDPOConfig) -> dict[str, tuple[Any, Any]]:
        """``{dotted key: (self's value, other's value)}`` for every key where the two differ."""
        return {k: (self.get(k), other.get(k)) for k in self.keys() if self.get(k) != other.get(k)}

    @classmethod
    def resumable_keys(cls) -> list[str]:
        """Keys a resumed run may change (bookkeeping, learning rate, clip); the others are fixed."""
        return [k for k in cls.keys() if cls.field_info(k)[0].metadata.get("resumable")]

    @classmethod
    def from_yaml(cls, path: str | Path) -> SDPOConfig:
        """Read a YAML config written by :meth:`to_yaml` (or by hand; sections may be partial).

        Errors name the file (and line); a key given twice is refused.
        """
        path = Path(path)
        data = _read_yaml(path) or {}
        if isinstance(data, dict) and "preset" in data:
            name = data.pop("preset")
            base = cls.preset(name)
            given: dict[str, str] = {}
            for key, value in _flatten(data):
                if isinstance(value, dict) and key in _SUBSECTIONS:
                    base.set(key, value)
                    continue
                resolved = cls.resolve_key(key)
                if resolved in given:
                    raise ValueError(
                        f"{path}: {resolved} is set twice (as {given[resolved]!r} and as {key!r})."
                    )
                given[resolved] = key
                base.set(key, value)
            base.replace_data_source(set(given))
            return base.validate()
        return cls.from_dict(data)

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> SDPOConfig:
        """A named preset (``seed``, ``paper``, ``grpo``) with optional keyword overrides."""
        if name not in PRESETS:
            raise KeyError(f"Unknown preset {name!r}; choose one of {sorted(PRESETS)}.")
        config = cls()
        for key, value in PRESETS[name].items():
            config.set(key, value)
        for key, value in overrides.items():
            config.set(key.replace("__", "."), value)
        config.replace_data_source({cls.resolve_key(k.replace("__", ".")) for k in overrides})
        return config.validate()

    def __repr__(self) -> str:
        return f"SDPOConfig({self.to_dict()!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, SDPOConfig) and self.to_dict() == other.to_dict()


TEMPLATE_FIELDS: dict[str, tuple[set[str], str | None]] = {
    "reprompt_template": ({"prompt", "solution", "feedback"}, "prompt"),
    "solution_template": ({"successful_previous_attempt"}, None),
    "feedback_template": ({"feedback_raw"}, None),
}


def _check_template(key: str, text: str, fields: set[str], required: str | None) -> None:
    """A ``str.format`` template may use only ``fields`` (``{{``/``}}`` for literal braces)."""
    try:
        used = [name for _, name, _, _ in string.Formatter().parse(text) if name is not None]
    except ValueError as exc:
        raise ValueError(
            f"{key} is not a valid template ({exc}); write a literal brace as {{{{ or }}}}."
        ) from None
    allowed = ", ".join("{" + f + "}" for f in sorted(fields))
    for name in used:
        if name not in fields:
            raise ValueError(f"{key} has an unknown field {{{name}}}; its fields are {allowed}.")
    if required and required not in used:
        raise ValueError(f"{key} must contain {{{required}}} (its fields are {allowed}).")


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a mapping key given twice."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        seen: set[Any] = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r}", key_node.start_mark
                )
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _read_yaml(path: Path) -> Any:
    """Parse a YAML file; every error names the file (and the line for syntax errors)."""
    if path.is_dir():
        raise ValueError(f"{path} is a directory; give a YAML config file.")
    if not path.exists():
        raise FileNotFoundError(f"Config file {path} does not exist.")
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{path} is not a UTF-8 text file (byte {exc.start}); give a YAML config file."
        ) from None
    loader = _UniqueKeyLoader(text)
    loader.name = str(path)  # marks say the file, not "<unicode string>"
    try:
        return loader.get_single_data()
    except yaml.YAMLError as exc:
        raise ValueError(f"{path}: invalid YAML: {exc}") from None
    finally:
        loader.dispose()


def _flatten(data: dict[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    items: list[tuple[str, Any]] = []
    for key, value in data.items():
        full = f"{prefix}{key}"
        if isinstance(value, dict) and key in SECTIONS:
            items.extend(_flatten(value, full + "."))
        else:
            items.append((full, value))
    return items


@functools.cache
def _all_keys(cls: type) -> tuple[str, ...]:
    top = [f.name for f in dataclasses.fields(cls) if f.name not in SECTIONS]
    return tuple(top + [key for s, c in SECTIONS.items() for key in _leaf_keys(s, c)])


def _suggestions(key: str, valid: list[str]) -> str:
    """ " Did you mean: ...?" for a typo of a key, or "".

    Only close spellings count (difflib ratio >= 0.75: a letter or two off). A section's key is
    compared by its leaf name, and only within the section the key names (if it names one), so a
    setting elsewhere whose name merely looks alike (use_cpu / is_clip) is not offered."""
    section, _, leaf = key.rpartition(".")
    named = section if any(k.rpartition(".")[0] == section for k in valid) else ""
    leaf_count: dict[str, int] = {}
    for k in valid:
        leaf_count[k.split(".")[-1]] = leaf_count.get(k.split(".")[-1], 0) + 1
    scored = []
    for k in valid:
        owner, _, name = k.rpartition(".")
        if not owner:  # a top-level key (model_name): compared as written
            score = difflib.SequenceMatcher(None, key, k).ratio()
        elif named and owner != named:
            continue
        else:
            score = difflib.SequenceMatcher(None, leaf, name).ratio()
        if score >= 0.75:
            shown = name if leaf_count[name] == 1 and not named else k
            scored.append((-score, shown))
    close = list(dict.fromkeys(shown for _, shown in sorted(scored)))[:3]
    return f" Did you mean: {', '.join(close)}?" if close else ""


_NONE_STRINGS = {"none", "null", "~", ""}


def _convert(key: str, value: Any, typ: Any) -> Any:
    """Convert ``value`` (possibly a string from the command line) to ``typ`` or raise ValueError."""
    args = typing.get_args(typ) if isinstance(typ, types.UnionType) else ()
    optional = type(None) in args
    base = next((a for a in args if a is not type(None)), typ) if args else typ
    if value is None or (
        isinstance(value, str) and optional and value.strip().lower() in _NONE_STRINGS
    ):
        if optional:
            return None
        raise ValueError(f"{key} may not be None; expected {base.__name__}.")
    if isinstance(value, str) and base in (int, float):
        try:  # YAML 1.1 reads "3e-4" as a string
            value = float(value) if base is float else int(value)
        except ValueError:
            pass
    if isinstance(value, str) and base is not str:
        try:
            value = yaml.safe_load(value)
        except yaml.YAMLError as exc:
            raise ValueError(f"{key}: cannot parse {value!r} as {base.__name__}.") from exc
    if base is bool:
        if isinstance(value, bool):
            return value
        raise ValueError(f"{key} must be true or false, got {value!r}.")
    if base is int:
        if (
            isinstance(value, bool)
            or not isinstance(value, (int, float))
            or (isinstance(value, float) and not value.is_integer())
        ):
            raise ValueError(f"{key} must be an integer, got {value!r}.")
        return int(value)
    if base is float:
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ValueError(f"{key} must be a number, got {value!r}.")
        return float(value)
    if base is str:
        if not isinstance(value, str):
            raise ValueError(f"{key} must be a string, got {value!r}.")
        return value
    if typing.get_origin(base) is list:
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, str):  # a,b
            value = [v.strip() for v in value.split(",") if v.strip()]
        if typing.get_args(base) == (float,):
            if not isinstance(value, list):
                raise ValueError(
                    f"{key} must be a list of numbers, e.g. [1.0, 0.5]; got {value!r}."
                )
            return [_convert(f"{key}[{i}]", v, float) for i, v in enumerate(value)]
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise ValueError(
                f"{key} must be a list of strings, e.g. {key}=a,b or {key}=[] for none; "
                f"got {value!r}."
            )
        return value
    return value


# TRL (GRPOConfig / SDPOConfig / TrainingArguments) names that mean exactly an sdpo key.
TRL_ALIASES: dict[str, str] = {
    "num_generations": "num_samples_per_prompt",
    "model_name_or_path": "model_name",
    "max_completion_length": "generation.max_new_tokens",
    "beta": "policy_gradient.kl_penalty_weight",
    "epsilon_high": "policy_gradient.clip_eps_high",
    # TRL's per-device micro-batch of completions per forward/backward pass.
    "per_device_train_batch_size": "optimization.micro_batch_size",
    "num_iterations": "optimization.updates_per_batch",
    "lr_scheduler_type": "optimization.lr_scheduler",
    "distillation_alpha": "self_distillation.alpha",
    "distillation_is_clip": "self_distillation.is_clip",
}

# TRL names whose values translate one to one: name -> (sdpo key, {TRL value: sdpo value}).
TRL_VALUES: dict[str, tuple[str, dict[Any, Any]]] = {
    "distillation_mode": (
        "self_distillation.distillation_level",
        {"sampled_token": "token", "full_logits": "logit", "topk_logits": "logit"},
    ),
    "teacher_model_kind": (
        "self_distillation.teacher",
        {"ema": "ema", "live": "live", "base": "frozen"},
    ),
    "loss_type": (
        "policy_gradient.loss_aggregation",
        {"dapo": "token_mean", "grpo": "sequence_mean", "dr_grpo": "dr_grpo"},
    ),
}

# TRL names sdpo names differently in a way that is not one key for one key: refused, with why.
TRL_KEY_HINTS: dict[str, str] = {
    "lr": "the learning rate is optimization.learning_rate.",
    "gradient_accumulation_steps": "sdpo accumulates by itself: one step's "
    "optimization.prompts_per_step x num_samples_per_prompt completions go through forward/"
    "backward optimization.micro_batch_size at a time (TRL's per_device_train_batch_size). For "
    "TRL's step of per_device_train_batch_size x gradient_accumulation_steps completions, set "
    "optimization.prompts_per_step to that number / num_samples_per_prompt.",
    "num_train_epochs": "sdpo counts steps: run.max_steps (one step = one generated batch).",
    "epsilon": "the ratio clip is policy_gradient.clip_eps_low (and policy_gradient.clip_eps_high).",
    "bf16": "set model.dtype=bfloat16.",
    "fp16": "set model.dtype=float16 (CUDA only).",
    "use_cpu": "set model.device=cpu.",
    "use_vllm": "vLLM is a generation backend: generation.backend=vllm.",
    "eval_strategy": "sdpo evaluates at the start, at the end and every run.eval_steps steps.",
    "save_strategy": "sdpo checkpoints every run.save_steps steps and at the end.",
    "use_successful_as_teacher": "successful siblings are always demonstrations; "
    "self_distillation.success_reward_threshold decides what counts as one.",
    "teacher_sync_steps": "the EMA teacher is updated after every optimizer step "
    "(self_distillation.teacher_update_rate).",
}


def trl_key(name: str, value: Any) -> tuple[str, Any] | None:
    """``(sdpo key, sdpo value)`` for a TRL config name that maps onto one, else None.

    Raises ValueError for a TRL value with no sdpo counterpart (naming both)."""
    leaf = name.split(".")[-1]
    if leaf in TRL_ALIASES:
        return TRL_ALIASES[leaf], value
    if leaf in TRL_VALUES:
        key, values = TRL_VALUES[leaf]
        if value not in values:
            raise ValueError(
                f"{leaf} = {value!r}: sdpo's {key} covers {', '.join(map(repr, values))} "
                f"(as {', '.join(map(repr, dict.fromkeys(values.values())))})."
            )
        return key, values[value]
    return None


# Presets: overrides of the seed defaults. `paper` = SPEC section 7's official-run values.
PRESETS: dict[str, dict[str, Any]] = {
    "seed": {},
    "paper": {
        "num_samples_per_prompt": 8,
        "self_distillation.distillation_topk": 100,
        "self_distillation.distillation_add_tail": True,
        "self_distillation.is_clip": 2.0,
        "self_distillation.success_reward_threshold": 1.0,
        "self_distillation.teacher_update_rate": 0.05,
        "policy_gradient.pg_loss_weight": 0.0,
        "policy_gradient.kl_penalty_weight": 0.0,
        "policy_gradient.scale_rewards": False,
        "optimization.learning_rate": 1e-5,
        "optimization.weight_decay": 0.01,
        "optimization.max_grad_norm": 1.0,
        "optimization.prompts_per_step": 32,
    },
    # `sdpo train` with no arguments: the demo model on the arithmetic task, minutes on a CPU.
    "quickstart": {
        "model_name": "demo",
        "num_samples_per_prompt": 8,
        "data.task": "arithmetic",
        "generation.max_new_tokens": 8,
        "generation.temperature": 1.0,
        "self_distillation.alpha": 0.5,
        "self_distillation.teacher": "ema",
        "self_distillation.teacher_update_rate": 0.05,
        "policy_gradient.kl_penalty_weight": 0.0,
        "optimization.learning_rate": 1e-4,
        "optimization.prompts_per_step": 8,
        "optimization.micro_batch_size": 64,
        "run.max_steps": 300,
        "run.save_steps": 100,
        "run.eval_max_prompts": 500,
    },
    # List-program synthesis (sdpo.tasks.listprog) with the model trained for it; compact teacher
    # templates (feedback first, the question last, so the context ends in "Program:") keep the
    # character-level model's sequences short.
    "listprog": {
        "model_name": "demo-listprog",
        "num_samples_per_prompt": 8,
        "data.task": "listprog",
        "generation.max_new_tokens": 40,
        "generation.temperature": 1.0,
        "self_distillation.alpha": 0.5,
        "self_distillation.teacher": "ema",
        "self_distillation.teacher_update_rate": 0.05,
        "self_distillation.reprompt_template": "{feedback}{solution}{prompt}",
        "self_distillation.solution_template": "Correct: {successful_previous_attempt}\n",
        "self_distillation.feedback_template": "{feedback_raw}\n",
        "policy_gradient.kl_penalty_weight": 0.0,
        "optimization.learning_rate": 1e-4,
        "optimization.prompts_per_step": 8,
        "optimization.micro_batch_size": 64,
        "run.max_steps": 100,
        "run.save_steps": 100,
        "run.eval_max_prompts": 200,
    },
    "grpo": {
        "self_distillation.distillation_weight": 0.0,
        "policy_gradient.pg_loss_weight": 1.0,
    },
}
