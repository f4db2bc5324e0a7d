"""One SDPO training step, TRL 1.16's ``trl.experimental.sdpo.SDPOTrainer`` vs sdpo's ``SDPOTrainer``.

Usage::

    python benchmarks/bench_step.py                         # all 4 cases, then a table
    python benchmarks/bench_step.py --quick                 # fewer steps (1 warm-up + 2 timed)
    python benchmarks/bench_step.py --case trl --vocab 32768  # one case; prints one JSON line
    python benchmarks/bench_step.py --repeats 3 --json-out r.json  # interleaved runs, medians
    python benchmarks/bench_step.py --dtype bfloat16 --device cuda   # bf16 autocast on a GPU
    python benchmarks/bench_step.py --new-tokens 256 --samples 8 --sdpo-gradient-checkpointing

``--new-tokens``, ``--samples`` (G), ``--dtype``, ``--device`` and the two gradient-checkpointing
switches change the workload below on both sides alike (``benchmarks/bench_cost.py`` sweeps them).

Every (trainer, vocabulary) case runs in a fresh subprocess, so its peak RSS (``ru_maxrss``) is its
own. The driver prints: vocab | trainer | median step s | peak MB | base MB | peak-base MB, and the
sdpo/trl ratios of time and memory per vocabulary.

The work (the same on both sides)
---------------------------------
- float32 on CPU. Llama, 4 layers, hidden 256, 4 heads, intermediate 1024, tied embeddings
  (``sdpo.demo.tiny_llama_config``), vocabulary 128 or 32,768; random init from seed 0. The model
  is built once per vocabulary in a helper subprocess and saved under ``--model-cache`` (TRL builds
  its EMA teacher by re-loading the student from its path, so the student must come from disk);
  each case then loads it with ``from_pretrained`` on both sides.
- Tokenizer: sdpo's character tokenizer (``build_char_tokenizer``: <pad>, <eos>, <unk>, 96
  printable characters = 99 ids), padded with dummy one-character tokens (CJK ideographs, then
  Hangul) up to exactly the model's vocabulary, so that every id the model can sample decodes to
  one character and re-encodes to the same id (demonstrations in the teacher prompt keep their
  length). Prompts use only the 96 printable characters.
- 8 prompts per step ("Q: 347+586=" style, 11 characters each, drawn from 64 fixed prompts) x 4
  samples x exactly 32 new tokens (temperature 1, no top-k/top-p; EOS is blocked until token 32:
  TRL ``generation_kwargs={"min_new_tokens": 32}``, sdpo ``generation.min_new_tokens = 32``).
- Reward: 1.0 if CRC32 of the completion text is even, else 0.0 (deterministic, about half the
  rollouts succeed; success threshold 1.0). Both sides call the same TRL-convention function.
  With G = 4, a rollout gets a demonstration when one of its 3 siblings succeeded, so about
  1 - 0.5**3 = 7/8 of the rows (0.8-0.95 measured) are distilled.
- Loss: policy gradient (clipped ratio, eps 0.2, group-normalized advantages, token-mean) blended
  with logit distillation: alpha = 0.5 (Jensen-Shannon), support = the student's top-20 tokens,
  plus one tail bucket. ``--distillation-weight w`` (default 0.5) gives TRL's convex blend
  ``(1-w)*pg + w*distill``; sdpo gets ``pg_loss_weight = 1-w, distillation_weight = w`` (the same
  loss). No reference model (TRL ``beta=0``, sdpo ``kl_penalty_weight=0``).
- Teacher: EMA copy, rate 0.05, updated after every optimizer step; demonstration = the first
  successful sibling, never the completion itself; no environment feedback.
- One optimizer step = 8 prompts x 4 samples = 32 completions; micro-batch 32 by default
  (``--micro-batch``; TRL: ``per_device_train_batch_size = micro``, ``gradient_accumulation_steps =
  32 / micro``, so ``steps_per_generation = 32 / micro``: one generate call for all 32 rows per
  step). AdamW lr 1e-5, weight decay 0.01, grad clip 1.0, constant schedule, one update per batch
  (on-policy: neither side needs an old-log-prob pass).
- TRL runs without gradient checkpointing (its config default is on; ``--trl-gradient-checkpointing``
  turns it back on) and with logging, saving, evaluation and the progress bar off.

LoRA cases (``sdpo-lora``, ``trl-lora``): the same work with a LoRA adapter (``--lora-r``, default
16, alpha 2r, on all 7 projections q/k/v/o/gate/up/down) on a frozen base. sdpo's EMA teacher is a
second adapter (``model.lora``); TRL gets ``peft_config=LoraConfig(...)`` and its
``PEFTAdapterEMACallback`` "teacher" adapter. ``sdpo-lora`` vs ``sdpo`` is what LoRA saves.

Timing: TRL is driven by ``trainer.train()`` and a ``TrainerCallback`` records
``on_step_begin`` -> ``on_step_end`` (the callback is registered after TRL's EMA-sync callback, so
the teacher update is inside the interval; the data loader's fetch of 8 prompt rows is not).
sdpo is timed around each ``trainer.step()`` call. The median over the timed steps after the
warm-up steps is reported; ``gen_median_s`` is the time inside ``model.generate`` (TRL) or
``trainer.generate`` (sdpo), timed with the same clock as the step.

Memory: ``peak`` = ``ru_maxrss`` of the case's subprocess; ``base`` = RSS after imports, tokenizer
and model load, before the trainer is built; ``peak-base`` = what the trainer adds (teacher copy,
optimizer state, gradients, activations, logits).

The machine's load matters: every case records its 1-minute load average, and the driver warns
when it exceeded the core count (other processes competing for the CPU make the times noisy).

What TRL 1.16 needs to run this at all (and what it does differently)
---------------------------------------------------------------------
- Its config defaults are bf16=True and gradient checkpointing on; both are switched off here.
- The EMA teacher is built with ``from_pretrained(model.config._name_or_path)``, not a copy of the
  student: a model built in memory (empty ``_name_or_path``) fails with an OSError, hence the
  saved model. The EMA update (``SyncTeacherModelCallback``, ``on_step_end``) is
  ``phi.mul_(1-beta).add_(theta, alpha=beta)`` over ``parameters()``.
- ``distillation_mode="topk_logits"`` is needed for top-k (the default is ``sampled_token``, which
  requires alpha 1); ``distillation_add_tail`` defaults to False.
- Its importance-sampling clip only applies when old log-probs exist, i.e. when
  ``gradient_accumulation_steps`` is not a multiple of ``steps_per_generation * num_iterations``;
  here (on-policy) it never does, nor does sdpo's with ``updates_per_batch = 1``.

Known remaining differences
---------------------------
- Rollouts are sampled independently on the two sides, so the exact successes (hence the number of
  reprompted rows and the teacher-prompt lengths) differ slightly; the JSON reports each side's
  success / reprompt fractions and completion lengths.
- TRL runs the teacher forward on *all* rows (rows without a demonstration get their plain prompt
  and are masked out of the loss afterwards), always producing full-vocabulary teacher logits at
  the completion positions. sdpo may skip rows without a teacher context; that is part of what is
  measured, not a difference in the workload definition.
- TRL averages the distillation loss per sequence and then over *all* rows, including the
  masked-out ones (they dilute the mean); sdpo averages over distilled tokens only (SPEC 4). Same
  compute, different scale.
- TRL's policy loss is token-mean over the micro-batch ("dapo"); sdpo's ``token_mean``. With one
  micro-batch per step these agree.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# ---- the workload ------------------------------------------------------------------------------
HIDDEN, LAYERS, HEADS, INTERMEDIATE = 256, 4, 4, 1024
VOCABS = (128, 32768)
PROMPTS_PER_STEP = 8
SAMPLES_PER_PROMPT = 4
NEW_TOKENS = 32
TOPK = 20
ALPHA = 0.5
EMA_RATE = 0.05
LEARNING_RATE = 1e-5
WEIGHT_DECAY = 0.01
MAX_GRAD_NORM = 1.0
SEED = 0
NUM_PROMPTS = 64
DEFAULT_MODEL_CACHE = Path(tempfile.gettempdir()) / "sdpo_bench_step_models"
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TRAINERS = ("trl", "sdpo", "trl-lora", "sdpo-lora")
# Step timer: wall time, or with --clock cpu this process's CPU time (all threads), which a busy
# machine inflates far less than wall time (use it with --threads 1).
CLOCK = time.perf_counter


def rss_mb() -> float:
    """Current resident set size of this process, in MiB."""
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far (ru_maxrss is in KiB on Linux), in MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _demo():
    """``sdpo.demo`` (tokenizer, model config), or an identical local copy when the sdpo package
    cannot be imported (e.g. mid-edit), so that the TRL side never depends on sdpo's trainer."""
    try:
        from sdpo import demo

        return demo
    except Exception as exc:  # any failure of the package import
        print(
            f"[bench_step] sdpo.demo not importable ({exc!r}); using a local copy", file=sys.stderr
        )
    import string
    import types

    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import LlamaConfig, PreTrainedTokenizerFast

    special = ["<pad>", "<eos>", "<unk>"]
    chars = list(string.printable[:95]) + ["\n"]

    def build_char_tokenizer(chars_=None):
        chars_ = chars if chars_ is None else chars_
        vocab = {t: i for i, t in enumerate(special + [c for c in chars_ if c not in special])}
        core = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
        core.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
        core.decoder = decoders.Fuse()
        tok = PreTrainedTokenizerFast(
            tokenizer_object=core, pad_token="<pad>", eos_token="<eos>", unk_token="<unk>"
        )
        tok.padding_side = "left"
        return tok

    def tiny_llama_config(vocab_size, hidden=128, layers=4, heads=4, intermediate=512):
        return LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=hidden,
            num_hidden_layers=layers,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            intermediate_size=intermediate,
            max_position_embeddings=512,
            tie_word_embeddings=True,
            pad_token_id=0,
            eos_token_id=1,
            bos_token_id=None,
        )

    return types.SimpleNamespace(
        CHARS=chars,
        SPECIAL_TOKENS=special,
        build_char_tokenizer=build_char_tokenizer,
        tiny_llama_config=tiny_llama_config,
    )


def build_tokenizer(vocab_size: int):
    """sdpo's character tokenizer, padded with one-character dummy tokens to ``vocab_size`` ids."""
    demo = _demo()
    CHARS, SPECIAL_TOKENS, build_char_tokenizer = (
        demo.CHARS,
        demo.SPECIAL_TOKENS,
        demo.build_char_tokenizer,
    )
    n_extra = vocab_size - len(SPECIAL_TOKENS) - len(CHARS)
    if n_extra < 0:
        raise ValueError(f"vocab_size {vocab_size} is smaller than the base tokenizer")
    extra: list[str] = []
    # CJK, Hangul, CJK extension A, then (for 151,936 = Qwen's size) CJK extension B and the
    # supplementary private-use planes: every one a single code point.
    ranges = ((0x4E00, 0xA000), (0xAC00, 0xD7A4), (0x3400, 0x4DC0), (0x20000, 0x2A6E0))
    for lo, hi in ranges + ((0xF0000, 0xFFFFE), (0x100000, 0x10FFFE)):
        extra.extend(chr(cp) for cp in range(lo, min(hi, lo + n_extra - len(extra))))
    if len(extra) != n_extra:
        raise ValueError(f"cannot pad the tokenizer to {vocab_size} tokens")
    tokenizer = build_char_tokenizer(CHARS + extra)
    assert len(tokenizer) == vocab_size, (len(tokenizer), vocab_size)
    return tokenizer


def model_dir(cache: Path, vocab_size: int) -> Path:
    return cache / f"llama_h{HIDDEN}_l{LAYERS}_a{HEADS}_i{INTERMEDIATE}_v{vocab_size}_s{SEED}"


def make_model(out: Path, vocab_size: int) -> None:
    """Build the random-init model (seed SEED) and save it to ``out`` (atomically)."""
    import torch
    from transformers import LlamaForCausalLM

    torch.manual_seed(SEED)
    config = _demo().tiny_llama_config(
        vocab_size, hidden=HIDDEN, layers=LAYERS, heads=HEADS, intermediate=INTERMEDIATE
    )
    model = LlamaForCausalLM(config).to(torch.float32)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=out.parent, prefix=out.name + ".tmp"))
    model.save_pretrained(tmp)
    try:
        tmp.rename(out)
    except OSError:  # another process won the race
        if not (out / "config.json").exists():
            raise


def ensure_model(cache: Path, vocab_size: int) -> Path:
    """The saved model for ``vocab_size``; built in a helper subprocess if missing (keeps the
    building out of the case's peak RSS)."""
    path = model_dir(cache, vocab_size)
    if not (path / "config.json").exists():
        cmd = [sys.executable, __file__, "--make-model", "--vocab", str(vocab_size)]
        subprocess.run(cmd + ["--model-cache", str(cache)], check=True)
    return path


def load_model(path: Path):
    import torch
    from transformers import LlamaForCausalLM

    model = LlamaForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.train()
    return model


def make_prompts(n: int = NUM_PROMPTS) -> list[str]:
    rng = random.Random(1234)
    return [f"Q: {rng.randint(100, 999)}+{rng.randint(100, 999)}=" for _ in range(n)]


def hash_parity_reward(prompts, completions, **kwargs) -> list[float]:
    """1.0 if CRC32 of the completion text is even, else 0.0 (TRL reward-function convention)."""
    out = []
    for completion in completions:
        text = completion if isinstance(completion, str) else completion[-1]["content"]
        out.append(1.0 if zlib.crc32(text.encode("utf-8")) % 2 == 0 else 0.0)
    return out


def summarize(times: list[float], warmup: int) -> dict:
    timed = times[warmup:]
    return {
        "median_step_s": statistics.median(timed) if timed else None,
        "mean_step_s": statistics.fmean(timed) if timed else None,
        "min_step_s": min(timed) if timed else None,
        "step_times_s": [round(t, 4) for t in times],
    }


def _mean(values) -> float | None:
    values = [float(v) for v in values if v is not None]
    return statistics.fmean(values) if values else None


# ---- TRL ---------------------------------------------------------------------------------------


def run_trl(args, path: Path, tokenizer, prompts: list[str], out_dir: str) -> dict:
    import datasets
    import torch
    import transformers
    import trl
    from transformers import TrainerCallback
    from trl.experimental.sdpo import SDPOConfig, SDPOTrainer

    model = load_model(path)
    base = rss_mb()
    peft_config = None
    if args.case.endswith("-lora"):  # TRL's own LoRA path: a "teacher" adapter EMA'd by a callback
        import peft

        peft_config = peft.LoraConfig(
            r=args.lora_r, lora_alpha=2 * args.lora_r, target_modules=LORA_TARGETS
        )

    micro = args.micro_batch
    rows_per_step = PROMPTS_PER_STEP * SAMPLES_PER_PROMPT
    if rows_per_step % micro:
        raise ValueError(f"--micro-batch must divide {rows_per_step}")
    config = SDPOConfig(
        output_dir=out_dir,
        use_cpu=args.device == "cpu",
        bf16=args.dtype == "bfloat16",
        fp16=False,
        activation_checkpointing=args.trl_gradient_checkpointing,
        report_to="none",
        logging_strategy="no",
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        seed=SEED,
        dataloader_num_workers=0,
        max_steps=args.warmup + args.steps,
        per_device_train_batch_size=micro,
        gradient_accumulation_steps=rows_per_step // micro,
        num_generations=SAMPLES_PER_PROMPT,
        max_completion_length=NEW_TOKENS,
        generation_kwargs={"min_new_tokens": NEW_TOKENS},
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        learning_rate=LEARNING_RATE,
        weight_decay=WEIGHT_DECAY,
        max_grad_norm=MAX_GRAD_NORM,
        lr_scheduler_type="constant",
        warmup_steps=0,
        beta=0.0,
        epsilon=0.2,
        scale_rewards="group",
        loss_type="dapo",
        num_iterations=1,
        distillation_mode="topk_logits",
        distillation_topk=TOPK,
        distillation_add_tail=True,
        distillation_alpha=ALPHA,
        distillation_weight=args.distillation_weight,
        distillation_is_clip=2.0,
        teacher_model_kind="ema",
        teacher_update_rate=EMA_RATE,
        teacher_sync_steps=1,
        use_successful_as_teacher=True,
        success_reward_threshold=1.0,
        dont_reprompt_on_self_success=True,
        include_environment_feedback=False,
        diagnostics_warning_interval=0,
    )
    dataset = datasets.Dataset.from_dict({"prompt": prompts})
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=hash_parity_reward,
        args=config,
        train_dataset=dataset,
        processing_class=tokenizer,
        peft_config=peft_config,
    )

    gen_times: list[float] = []
    original_generate = trainer._generate

    def timed_generate(*a, **kw):
        t0 = CLOCK()
        result = original_generate(*a, **kw)
        gen_times.append(CLOCK() - t0)
        return result

    trainer._generate = timed_generate

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.t0 = None
            self.times: list[float] = []
            self.completion_lengths: list[float] = []
            self.reprompt_rows: list[float] = []
            self.teacher_len: list[int] = []
            self.student_len: list[int] = []

        def on_step_begin(self, args, state, control, **kwargs):
            self.t0 = CLOCK()

        def on_step_end(self, args, state, control, **kwargs):
            self.times.append(CLOCK() - self.t0)

        # SDPO-specific hook dispatched by TRL's trainer after the teacher prompts are built.
        def on_teacher_context_built(self, **kw):
            self.completion_lengths.extend(kw["completion_mask"].sum(1).float().tolist())
            self.reprompt_rows.append(float(kw["self_distillation_mask"].float().mean()))
            self.teacher_len.append(int(kw["teacher_input_ids"].shape[1]))

        def on_self_distillation_batch_prepared(self, **kw):
            self.student_len.append(int(kw["prompt_ids"].shape[1] + kw["completion_ids"].shape[1]))

    timer = StepTimer()
    trainer.add_callback(timer)  # after TRL's EMA-sync callback: the EMA update is timed too

    metrics_seen: dict[str, list[float]] = {}
    original_log = trainer.log

    def capture_log(logs, *a, **kw):  # TRL clears its metrics on log(); keep what it collected
        for key, values in trainer._metrics["train"].items():
            metrics_seen.setdefault(key, []).extend(values)
        return original_log(logs, *a, **kw)

    trainer.log = capture_log
    trainer.train()
    for key, values in trainer._metrics["train"].items():
        metrics_seen.setdefault(key, []).extend(values)

    result = {
        "available": True,
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **summarize(timer.times, args.warmup),
        "gen_median_s": statistics.median(gen_times[args.warmup :])
        if len(gen_times) > args.warmup
        else None,
        "mean_completion_len": _mean(timer.completion_lengths),
        "min_completion_len": min(timer.completion_lengths) if timer.completion_lengths else None,
        "reward_mean": _mean(metrics_seen.get("self_distillation/reward_mean", [])),
        "reprompt_fraction": _mean(timer.reprompt_rows),
        "success_group_fraction": _mean(
            metrics_seen.get("self_distillation/success_group_fraction", [])
        ),
        "student_seq_len": _mean(timer.student_len),
        "teacher_seq_len": _mean(timer.teacher_len),
        "gen_times_s": [round(t, 4) for t in gen_times],
        "teacher_rows_forwarded": "all",
        "activation_checkpointing": bool(
            getattr(trainer.model, "is_activation_checkpointing", False)
        ),
        "versions": {
            "trl": trl.__version__,
            "transformers": transformers.__version__,
            "torch": torch.__version__,
        },
    }
    return result


# ---- sdpo --------------------------------------------------------------------------------------


def _import_sdpo():
    """(SDPOConfig, PolicyModel, SDPOTrainer) from sdpo, or raise ImportError."""
    try:
        from sdpo import PolicyModel, SDPOConfig, SDPOTrainer

        return SDPOConfig, PolicyModel, SDPOTrainer
    except Exception as first:  # sdpo may be mid-edit
        try:
            from sdpo.config import SDPOConfig
            from sdpo.policy_model import PolicyModel
            from sdpo.trainer import SDPOTrainer

            return SDPOConfig, PolicyModel, SDPOTrainer
        except Exception as exc:
            raise ImportError(f"{first!r}; {exc!r}") from exc


def run_sdpo(args, path: Path, tokenizer, prompts: list[str], out_dir: str) -> dict:
    import torch

    try:
        SDPOConfig, PolicyModel, SDPOTrainer = _import_sdpo()
    except ImportError as exc:
        return {"available": False, "error": f"sdpo's trainer is not available yet: {exc}"}

    model = load_model(path)
    base = rss_mb()

    notes: list[str] = []
    overrides = {
        "model_name": "bench",
        "num_samples_per_prompt": SAMPLES_PER_PROMPT,
        "model__dtype": args.dtype,
        "model__device": args.device,
        "model__gradient_checkpointing": args.sdpo_gradient_checkpointing,
        "model__lm_head_dtype": args.sdpo_lm_head,
        "generation__max_new_tokens": NEW_TOKENS,
        "generation__temperature": 1.0,
        "generation__top_p": 1.0,
        "generation__top_k": 0,
        "self_distillation__alpha": ALPHA,
        "self_distillation__distillation_topk": TOPK,
        "self_distillation__distillation_add_tail": True,
        "self_distillation__distillation_level": "logit",
        "self_distillation__distillation_weight": args.distillation_weight,
        "self_distillation__is_clip": 2.0,
        "self_distillation__teacher": "ema",
        "self_distillation__teacher_update_rate": EMA_RATE,
        "self_distillation__success_reward_threshold": 1.0,
        "self_distillation__dont_reprompt_on_self_success": True,
        "self_distillation__demonstration_selection": "first",
        "self_distillation__include_environment_feedback": False,
        "policy_gradient__pg_loss_weight": 1.0 - args.distillation_weight,
        "policy_gradient__kl_penalty_weight": 0.0,
        "policy_gradient__clip_eps_low": 0.2,
        "policy_gradient__clip_eps_high": 0.2,
        "policy_gradient__scale_rewards": True,
        "policy_gradient__loss_aggregation": "token_mean",
        "optimization__learning_rate": LEARNING_RATE,
        "optimization__weight_decay": WEIGHT_DECAY,
        "optimization__max_grad_norm": MAX_GRAD_NORM,
        "optimization__lr_scheduler": "constant",
        "optimization__warmup_steps": 0,
        "optimization__prompts_per_step": PROMPTS_PER_STEP,
        "optimization__micro_batch_size": args.micro_batch,
        "optimization__updates_per_batch": 1,
        "run__seed": SEED,
        "run__max_steps": args.warmup + args.steps,
        "run__output_dir": out_dir,
        "run__progress_bar": False,
        "run__logging_steps": 1,
        "run__save_steps": 1000,
        "run__sample_log_steps": 1000,
    }
    import yaml

    for item in args.sdpo_set:  # KEY=VALUE, e.g. self_distillation.loss_chunk_size=1024
        key, _, value = item.partition("=")
        overrides[key.replace(".", "__")] = yaml.safe_load(value)
    if args.case.endswith("-lora"):  # same adapter as TRL's case: all 7 projections, alpha = 2r
        overrides["model__lora__r"] = args.lora_r
        overrides["model__lora__lora_alpha"] = 2.0 * args.lora_r
        overrides["model__lora__target_modules"] = LORA_TARGETS
    # Forcing exactly NEW_TOKENS new tokens needs generation.min_new_tokens.
    if "generation.min_new_tokens" in SDPOConfig.keys():
        overrides["generation__min_new_tokens"] = NEW_TOKENS
    else:
        notes.append("generation.min_new_tokens missing: completions may stop early at <eos>")
    known = set(SDPOConfig.keys())
    for key in list(overrides):
        dotted = key.replace("__", ".")
        if dotted not in known:
            notes.append(f"config key {dotted} not available; left at its default")
            del overrides[key]
    config = SDPOConfig(**overrides)

    policy_model = PolicyModel(model=model, tokenizer=tokenizer, device=args.device)
    rows = [{"prompt": p} for p in prompts]
    trainer = SDPOTrainer(
        config=config,
        policy_model=policy_model,
        reward_model=hash_parity_reward,
        train_dataloader=rows,
    )

    gen_times: list[float] = []  # in CLOCK's time (the trainer's own metric is wall time)
    original_generate = trainer.generate

    def timed_generate(*a, **kw):
        t0 = CLOCK()
        out = original_generate(*a, **kw)
        gen_times.append(CLOCK() - t0)
        return out

    trainer.generate = timed_generate

    params = [
        p
        for p in inspect.signature(trainer.step).parameters.values()
        if p.default is p.empty and p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)
    ]
    rng = random.Random(SEED)

    times: list[float] = []
    step_metrics: list[dict] = []
    for _ in range(args.warmup + args.steps):
        if params:  # step(batch) variant: hand it 8 prompt rows
            batch = rng.sample(rows, PROMPTS_PER_STEP)
            t0 = CLOCK()
            metrics = trainer.step(batch)
        else:
            t0 = CLOCK()
            metrics = trainer.step()
        times.append(CLOCK() - t0)
        step_metrics.append(dict(metrics or {}))

    timed_metrics = step_metrics[args.warmup :]

    def metric(*names):
        for name in names:
            values = [m[name] for m in timed_metrics if isinstance(m.get(name), (int, float))]
            if values:
                return statistics.fmean(values)
        return None

    timing_keys = sorted(
        {k for m in timed_metrics for k in m if "time" in k.lower() or k.startswith("timing/")}
    )
    return {
        "available": True,
        "base_rss_mb": round(base, 1),
        "peak_rss_mb": round(peak_rss_mb(), 1),
        **summarize(times, args.warmup),
        "gen_median_s": statistics.median(gen_times[args.warmup :])
        if len(gen_times) > args.warmup
        else None,
        "mean_completion_len": metric("completions/mean_length", "completion_length"),
        "min_completion_len": metric("completions/min_length"),
        "reward_mean": metric("reward", "reward_mean"),
        "reprompt_fraction": metric("self_distillation/reprompt_sample_fraction"),
        "success_group_fraction": metric("self_distillation/success_group_fraction"),
        "step_timing_metrics": {k: metric(k) for k in timing_keys},
        "notes": notes,
        "versions": {"torch": torch.__version__},
    }


# ---- one case / the driver ---------------------------------------------------------------------


def run_case(args) -> dict:
    import torch

    global NEW_TOKENS, SAMPLES_PER_PROMPT, CLOCK
    NEW_TOKENS, SAMPLES_PER_PROMPT = args.new_tokens, args.samples
    CLOCK = time.process_time if args.clock == "cpu" else time.perf_counter

    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    cache = Path(args.model_cache)
    path = ensure_model(cache, args.vocab)
    tokenizer = build_tokenizer(args.vocab)
    prompts = make_prompts()
    header = {
        "case": args.case,
        "vocab": args.vocab,
        "warmup": args.warmup,
        "steps": args.steps,
        "micro_batch": args.micro_batch,
        "distillation_weight": args.distillation_weight,
        "threads": torch.get_num_threads(),
        "new_tokens": args.new_tokens,
        "samples": args.samples,
        "dtype": args.dtype,
        "device": args.device,
        "sdpo_gradient_checkpointing": args.sdpo_gradient_checkpointing,
        "sdpo_lm_head": args.sdpo_lm_head,
        "sdpo_set": args.sdpo_set,
        "trl_gradient_checkpointing": args.trl_gradient_checkpointing,
        "clock": args.clock,
    }
    with tempfile.TemporaryDirectory(prefix=f"bench_step_{args.case}_") as out_dir:
        if args.case.startswith("trl"):
            # Import TRL before the base measurement so both sides' base includes their library.
            import trl.experimental.sdpo  # noqa: F401

            result = run_trl(args, path, tokenizer, prompts, out_dir)
        else:
            result = run_sdpo(args, path, tokenizer, prompts, out_dir)
    if result.get("available"):
        result["delta_mb"] = round(result["peak_rss_mb"] - result["base_rss_mb"], 1)
    if args.device == "cuda" and result.get("available"):
        result["cuda_peak_mb"] = round(torch.cuda.max_memory_allocated() / 2**20, 1)
    result["loadavg_1m"] = os.getloadavg()[0]
    return {**header, **result}


def _fmt(x, nd=2) -> str:
    return "-" if x is None else f"{x:.{nd}f}"


def _run_one(args, trainer: str, vocab: int, passthrough: list[str]) -> dict:
    cmd = [sys.executable, __file__, "--case", trainer, "--vocab", str(vocab), *passthrough]
    print(f"[bench_step] {trainer} vocab={vocab} ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.case_timeout)
    except subprocess.TimeoutExpired:
        print(f"[bench_step]   timed out after {args.case_timeout:.0f}s", file=sys.stderr)
        return {"case": trainer, "vocab": vocab, "available": False, "error": "timed out"}
    found = []
    for line in proc.stdout.splitlines():
        try:
            obj = json.loads(line)
        except ValueError:
            continue
        if isinstance(obj, dict) and "case" in obj:
            found.append(obj)
    if proc.returncode != 0 or not found:
        tail = (proc.stderr or proc.stdout)[-3000:]
        print(f"[bench_step]   failed (rc={proc.returncode}):\n{tail}", file=sys.stderr)
        last = (tail.strip().splitlines() or ["?"])[-1]
        return {"case": trainer, "vocab": vocab, "available": False, "error": f"failed: {last}"}
    res = found[-1]
    print(
        f"[bench_step]   done in {time.perf_counter() - t0:.0f}s: {json.dumps(res)}",
        file=sys.stderr,
        flush=True,
    )
    return res


def _combine(runs: list[dict]) -> dict:
    """One row from the repeats of a case: the median of each number over the runs."""
    ok = [r for r in runs if r.get("available")]
    if not ok:
        return runs[-1]
    out = dict(ok[-1])
    for key in (
        "median_step_s",
        "gen_median_s",
        "peak_rss_mb",
        "base_rss_mb",
        "delta_mb",
        "mean_completion_len",
        "reprompt_fraction",
        "loadavg_1m",
    ):
        values = [r[key] for r in ok if isinstance(r.get(key), (int, float))]
        out[key] = statistics.median(values) if values else None
    out["repeats"] = len(ok)
    return out


def passthrough_workload(args) -> list[str]:
    """The case arguments that define the workload beyond the defaults (for bench_cost.py too)."""
    out = ["--new-tokens", str(args.new_tokens), "--samples", str(args.samples)]
    out += ["--dtype", args.dtype, "--device", args.device, "--clock", args.clock]
    if args.trl_gradient_checkpointing:
        out.append("--trl-gradient-checkpointing")
    if args.sdpo_gradient_checkpointing:
        out.append("--sdpo-gradient-checkpointing")
    out += [f"--sdpo-set={item}" for item in args.sdpo_set]
    return out + ["--sdpo-lm-head", args.sdpo_lm_head]


def drive(args) -> int:
    cache = Path(args.model_cache)
    for vocab in args.vocabs:
        ensure_model(cache, vocab)
    passthrough = [
        "--warmup",
        str(args.warmup),
        "--steps",
        str(args.steps),
        "--micro-batch",
        str(args.micro_batch),
        "--distillation-weight",
        str(args.distillation_weight),
        "--model-cache",
        str(cache),
        "--threads",
        str(args.threads),
        "--lora-r",
        str(args.lora_r),
        *passthrough_workload(args),
    ]
    runs: dict[tuple[int, str], list[dict]] = {
        (v, t): [] for v in args.vocabs for t in args.trainers
    }
    for _ in range(args.repeats):  # interleaved, so drifting machine load hits both sides alike
        for vocab in args.vocabs:
            for trainer in args.trainers:
                runs[(vocab, trainer)].append(_run_one(args, trainer, vocab, passthrough))
    results = {key: _combine(value) for key, value in runs.items()}

    cols = (
        f"{'vocab':>6} | {'trainer':<9} | {'median step s':>13} | {'gen s':>6} | "
        f"{'peak MB':>8} | {'base MB':>8} | {'peak-base MB':>12} | {'len':>5} | {'reprompt':>8}"
    )
    print()
    print(
        f"SDPO step (*-lora: LoRA r={args.lora_r}, alpha {2 * args.lora_r}, all 7 projections, "
        "EMA teacher adapter): "
        f"Llama {LAYERS}x{HIDDEN} (heads {HEADS}, ffn {INTERMEDIATE}), {args.dtype} "
        f"{args.device}, {PROMPTS_PER_STEP} prompts x {args.samples} samples x "
        f"{args.new_tokens} tokens, "
        f"top-{TOPK}+tail, alpha {ALPHA}, EMA teacher, micro-batch {args.micro_batch}; "
        f"median of {args.steps} steps after {args.warmup} warm-up, {args.clock} time"
        + (f", median over {args.repeats} runs" if args.repeats > 1 else "")
    )
    print(cols)
    print("-" * len(cols))
    for (vocab, trainer), r in results.items():
        if not r.get("available"):
            print(f"{vocab:>6} | {trainer:<9} | not available: {str(r.get('error', '?'))[:160]}")
            continue
        print(
            f"{vocab:>6} | {trainer:<9} | {_fmt(r['median_step_s'], 3):>13} | "
            f"{_fmt(r.get('gen_median_s'), 3):>6} | {_fmt(r['peak_rss_mb'], 0):>8} | "
            f"{_fmt(r['base_rss_mb'], 0):>8} | {_fmt(r['delta_mb'], 0):>12} | "
            f"{_fmt(r.get('mean_completion_len'), 1):>5} | {_fmt(r.get('reprompt_fraction'), 2):>8}"
        )
    pairs = [
        ("sdpo", "trl", "sdpo / trl (full fine-tuning)"),
        ("sdpo-lora", "trl-lora", f"sdpo / trl (LoRA r={args.lora_r})"),
        ("sdpo-lora", "sdpo", f"sdpo: LoRA r={args.lora_r} / full fine-tuning"),
        ("trl-lora", "trl", f"trl: LoRA r={args.lora_r} / full fine-tuning"),
    ]
    print()
    print("ratios (below 1: the first is faster / smaller):")
    print(f"{'vocab':>6} | {'pair':<38} | {'time':>6} | {'peak MB':>8} | {'peak-base MB':>12}")
    for vocab in args.vocabs:
        for first, second, label in pairs:
            a, b = results.get((vocab, first), {}), results.get((vocab, second), {})
            if not (a.get("available") and b.get("available")):
                continue

            def ratio(key, a=a, b=b):
                return a[key] / b[key] if a.get(key) is not None and b.get(key) else None

            print(
                f"{vocab:>6} | {label:<38} | {_fmt(ratio('median_step_s')):>6} | "
                f"{_fmt(ratio('peak_rss_mb')):>8} | {_fmt(ratio('delta_mb')):>12}"
            )
    loads = [r.get("loadavg_1m") for r in results.values() if r.get("loadavg_1m") is not None]
    cores = os.cpu_count() or 1
    if loads and max(loads) > cores:
        print(
            f"\nwarning: 1-minute load average reached {max(loads):.1f} on {cores} cores during "
            "the runs; other processes competed for the CPU and the times are noisy."
        )
    if args.json_out:
        Path(args.json_out).write_text(
            json.dumps(
                [{"vocab": v, "trainer": t, "runs": r} for (v, t), r in runs.items()], indent=2
            )
        )
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--case", choices=TRAINERS, help="run one case and print one JSON line")
    parser.add_argument("--vocab", type=int, help="vocabulary size of the case (128 or 32768)")
    parser.add_argument("--vocabs", type=int, nargs="+", default=list(VOCABS))
    parser.add_argument("--trainers", nargs="+", choices=TRAINERS, default=list(TRAINERS))
    parser.add_argument("--quick", action="store_true", help="1 warm-up + 2 timed steps")
    parser.add_argument("--warmup", type=int, default=None, help="warm-up steps (default 2)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (default 5)")
    parser.add_argument("--micro-batch", type=int, default=32, help="completions per fwd/bwd")
    parser.add_argument("--distillation-weight", type=float, default=0.5)
    parser.add_argument("--trl-gradient-checkpointing", action="store_true")
    parser.add_argument("--sdpo-gradient-checkpointing", action="store_true")
    parser.add_argument(
        "--sdpo-lm-head",
        choices=("float32", "compute"),
        default="float32",
        help="sdpo's model.lm_head_dtype (compute: the head in --dtype, as TRL's)",
    )
    parser.add_argument(
        "--sdpo-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another sdpo config key for the sdpo cases (repeatable)",
    )
    parser.add_argument("--new-tokens", type=int, default=NEW_TOKENS, help="per completion")
    parser.add_argument("--samples", type=int, default=SAMPLES_PER_PROMPT, help="G per prompt")
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument(
        "--clock", choices=["wall", "cpu"], default="wall", help="step timer (cpu: CPU time)"
    )
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = default)")
    parser.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the *-lora cases")
    parser.add_argument("--model-cache", default=str(DEFAULT_MODEL_CACHE))
    parser.add_argument("--repeats", type=int, default=1, help="driver: runs per case (median)")
    parser.add_argument("--case-timeout", type=float, default=3600)
    parser.add_argument("--json-out", help="driver: also write all results to this JSON file")
    parser.add_argument("--make-model", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.warmup is None:
        args.warmup = 1 if args.quick else 2
    if args.steps is None:
        args.steps = 2 if args.quick else 5

    if args.make_model:
        make_model(model_dir(Path(args.model_cache), args.vocab), args.vocab)
        return 0
    if args.case:
        if args.vocab is None:
            parser.error("--case needs --vocab")
        print(json.dumps(run_case(args)), flush=True)
        return 0
    return drive(args)


if __name__ == "__main__":
    sys.exit(main())
