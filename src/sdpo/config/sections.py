"""The sections of :class:`~sdpo.config.SDPOConfig`: one dataclass per part of the algorithm,
each field with its one-line doc, default and bounds (the configuration reference is generated
from them). One file (about 600 lines) on purpose: it is the list a user reads, section by
section."""

from __future__ import annotations

import dataclasses
import functools
import typing
from dataclasses import dataclass, field
from typing import Any


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
    lm_head_dtype: str = _f(
        "float32",
        "Dtype of the LM-head product in the training passes. float32 (default): compute-dtype "
        "hidden states times float32 weights, exact logits for the divergence and the importance "
        "ratios. compute: in model.dtype (as TRL does under bf16), faster where the head "
        "dominates (large vocabularies: 0.56x the bf16 step at V = 32,768 on CPU), with logits "
        "rounded to bf16 (|z|·2⁻⁸).",
        choices=("float32", "compute"),
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
        "EMA rate beta: phi <- (1-beta) phi + beta theta (trust_region: lerp weight). 0.05 is the paper's setting and the default; it holds with the PG term on (SDPO + PG). Pure SDPO (pg_loss_weight=0) needs a slower teacher: on arithmetic_hard at lr 1e-4, 150 steps, 3 seeds (docs/method.md), final sampled/greedy accuracy was 0.500/0.558 at 0.05 (collapsed after its peak in every seed), 0.703/0.828 at 0.01 and 0.755/0.888 at 0 (teacher=frozen's behaviour); SDPO + PG: 0.722/0.853 at 0.05, 0.753/0.883 at 0.01 (within the seeds' spread).",
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
        "the demonstration alone (no question, no feedback; rows without one are not contrasted); "
        "gamma = this, 0 = off (a second teacher pass). For long demonstrations, not short answers.",
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
    length_blowup_clipped: float = _f(
        0.5,
        "Warn (length_blowup) when the N-step mean share of completions cut at max_new_tokens "
        "reaches this, having been at most half of it.",
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
    heldout_drop_z: float = _f(
        2.0,
        "heldout_drop (at each evaluation) also needs the held-out accuracy's drop below its best to exceed this many binomial standard errors.",
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
