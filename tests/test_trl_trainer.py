"""A TRL user's code runs on sdpo: TRL's constructor, TRL's config names, transformers callbacks,
several reward functions with weights, per-function metrics and a stated success rule."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import make_tiny_llama
from transformers import PrinterCallback, TrainerCallback

from sdpo import PolicyModel, SDPOConfig, SDPOTrainer

datasets = pytest.importorskip("datasets", reason="`make setup` installs datasets (dev extra)")

CHAT_TEMPLATE = (
    "{% for m in messages %}<{{ m['role'] }}>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<assistant>{% endif %}"
)
SRC = Path(__file__).resolve().parents[1] / "src"


def tiny_chat_model():
    model, tok = make_tiny_llama()
    tok.chat_template = CHAT_TEMPLATE
    return model, tok


def rows(n: int = 4) -> list[dict]:
    return [
        {"prompt": [{"role": "user", "content": f"{a}+1? Box it."}], "answer": str(a + 1)}
        for a in range(1, n + 1)
    ]


def small_args(tmp_path: Path, **overrides) -> SDPOConfig:
    """TRL's names where TRL has one; sdpo's for the rest."""
    args = {
        "output_dir": str(tmp_path / "run"),
        "num_generations": 2,
        "max_completion_length": 6,
        "per_device_train_batch_size": 4,
        "learning_rate": 1e-4,
        "beta": 0.0,
        "max_steps": 2,
        "prompts_per_step": 2,
        "progress_bar": False,
    }
    return SDPOConfig(**{**args, **overrides})


def length_reward(completions, **kwargs):
    return [len(c[0]["content"]) / 10 for c in completions]


# ----- 1. TRL's docs example, with only the import line changed -------------------------------

DOCS_EXAMPLE = """
from datasets import Dataset

from sdpo import SDPOConfig, SDPOTrainer

dataset = Dataset.from_dict(
    {
        "prompt": [[{"role": "user", "content": "Solve 2+2."}]],
        "privileged_context": ["Your earlier answer used the wrong format."],
    }
)

training_args = SDPOConfig(
    output_dir="sdpo-model",
    distillation_mode="topk_logits",       # Explicitly select top-K logit distillation
    distillation_topk=100,                 # Required when using top-K logit distillation
    include_environment_feedback=True,     # Use dataset privileged_context for teacher reprompts
)

trainer = SDPOTrainer(
    model="Qwen/Qwen2.5-1.5B-Instruct",
    reward_funcs=reward_func,
    args=training_args,
    train_dataset=dataset,
)
trainer.train()
"""


def _fake_hub_cache(cache: Path, repo: str) -> None:
    """A Hugging Face cache holding a tiny model under ``repo``'s id (offline, no download)."""
    model, tok = tiny_chat_model()
    commit = "0" * 40
    root = cache / f"models--{repo.replace('/', '--')}"
    snapshot = root / "snapshots" / commit
    model.save_pretrained(snapshot)
    tok.save_pretrained(snapshot)
    (root / "refs").mkdir(parents=True)
    (root / "refs" / "main").write_text(commit)


@pytest.mark.slow
def test_trl_docs_sdpo_example_runs_with_only_the_import_changed(tmp_path):
    """TRL's SDPO docs "Usage" block (docs/source/sdpo_trainer.md, TRL 1.16), verbatim but for
    `from trl.experimental.sdpo import` -> `from sdpo import`; the hub id resolves to a tiny model
    in a local cache. The docs leave `reward_func` to the reader: it is defined before the block."""
    _fake_hub_cache(tmp_path / "hub", "Qwen/Qwen2.5-1.5B-Instruct")
    preamble = (  # right = exactly "4": the untrained model never is, so feedback is used
        "def reward_func(completions, **kwargs):\n"
        "    return [float(c[0]['content'].strip() == '4') for c in completions]\n"
    )
    script = tmp_path / "example.py"
    script.write_text(preamble + DOCS_EXAMPLE)
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(tmp_path / "hub"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": str(SRC),
        "OMP_NUM_THREADS": "1",
    }
    proc = subprocess.run(
        [sys.executable, str(script)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "sdpo-model"
    config = (run / "config.yaml").read_text()
    assert "distillation_topk: 100" in config and "distillation_level: logit" in config
    assert "model_name: Qwen/Qwen2.5-1.5B-Instruct" in config
    assert (run / "final" / "config.json").exists()
    samples = [json.loads(x) for x in (run / "samples.jsonl").read_text().splitlines()]
    # the privileged_context column reached the teacher as feedback where no sibling succeeded
    with_feedback = [s for s in samples if s["feedback"]]
    assert with_feedback and all(
        s["feedback"] == "Your earlier answer used the wrong format." for s in with_feedback
    )
    assert any(
        "Your earlier answer used the wrong format." in json.dumps(s["teacher_prompt"])
        for s in with_feedback
    )


def test_trl_call_shape_trains_a_built_model_on_a_dataset(tmp_path):
    """model=PreTrainedModel, processing_class, reward_funcs list, datasets.Dataset train and
    eval sets, TRL config names: trains, evaluates, writes final/."""
    model, tok = tiny_chat_model()
    train = datasets.Dataset.from_list(rows(4))
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=[length_reward],
        args=small_args(tmp_path),
        train_dataset=train,
        eval_dataset=datasets.Dataset.from_list(rows(2)),
        processing_class=tok,
    )
    assert trainer.policy.model is model and trainer.policy.tokenizer is tok
    assert trainer.config.num_samples_per_prompt == 2
    assert trainer.config.generation.max_new_tokens == 6
    assert trainer.config.optimization.micro_batch_size == 4
    final = trainer.train()
    assert "eval/accuracy_greedy" in final
    assert (tmp_path / "run" / "final" / "model.safetensors").exists()


def test_trl_positional_call_shape(tmp_path):
    """TRL's positional order (model, reward_funcs, args, train_dataset) works too."""
    model, tok = tiny_chat_model()
    trainer = SDPOTrainer(model, length_reward, small_args(tmp_path), rows(4), processing_class=tok)
    assert trainer.global_step == 0 and trainer.reward_model.name == "length_reward"
    trainer.step()
    assert trainer.global_step == 1


def test_train_resume_from_checkpoint_as_in_trl(tmp_path, capsys):
    """trainer.train(resume_from_checkpoint=True) continues this run directory's newest
    checkpoint (TRL's argument); a path works too."""
    model, tok = tiny_chat_model()
    SDPOTrainer(
        model=model, reward_funcs=length_reward, args=small_args(tmp_path),
        train_dataset=rows(4), processing_class=tok,
    ).train()  # fmt: skip
    model, tok = tiny_chat_model()
    trainer = SDPOTrainer(
        model=model, reward_funcs=length_reward, args=small_args(tmp_path, max_steps=3),
        train_dataset=rows(4), processing_class=tok,
    )  # fmt: skip
    trainer.train(resume_from_checkpoint=True)
    assert trainer.global_step == 3
    assert "sdpo: resumed from checkpoint-000002 at step 2" in capsys.readouterr().err
    steps = [
        json.loads(x)["step"] for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()
    ]
    assert 3 in steps


def test_trl_call_shape_mistakes_get_clear_errors(tmp_path):
    model, tok = tiny_chat_model()
    policy = PolicyModel(model=model, tokenizer=tok)
    with pytest.raises(TypeError, match="use one call shape"):
        SDPOTrainer(config=small_args(tmp_path), policy_model=policy, reward_funcs=length_reward)
    with pytest.raises(TypeError, match="needs policy_model=, reward_model=.*TRL's"):
        SDPOTrainer(config=small_args(tmp_path), train_dataloader=rows(2))
    with pytest.raises(TypeError, match="needs reward_funcs="):
        SDPOTrainer(model=model, processing_class=tok, train_dataset=rows(2))
    trl_sdpo = pytest.importorskip("trl.experimental.sdpo", reason="trl's SDPOConfig")
    trl_args = object.__new__(trl_sdpo.SDPOConfig)  # TRL's own config class (not sdpo's)
    with pytest.raises(TypeError, match="from sdpo import SDPOConfig"):
        SDPOTrainer(
            model=model, reward_funcs=length_reward, args=trl_args, train_dataset=rows(2),
            processing_class=tok,
        )  # fmt: skip
    with pytest.raises(ValueError, match="one eval set"):
        SDPOTrainer(
            model=model, reward_funcs=length_reward, args=small_args(tmp_path),
            train_dataset=rows(2), eval_dataset={"a": rows(2)}, processing_class=tok,
        )  # fmt: skip


def test_peft_config_becomes_model_lora(tmp_path):
    peft = pytest.importorskip("peft")
    model, tok = tiny_chat_model()
    lora = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    trainer = SDPOTrainer(
        model=model, reward_funcs=length_reward, args=small_args(tmp_path),
        train_dataset=rows(2), processing_class=tok, peft_config=lora,
    )  # fmt: skip
    assert trainer.config.model.lora.r == 4 and trainer.config.model.lora.lora_alpha == 8.0
    assert trainer.config.model.lora.target_modules == ["q_proj", "v_proj"]
    assert trainer.policy.is_lora
    with pytest.raises(ValueError, match="peft_config.use_dora"):
        SDPOTrainer(
            model=model, reward_funcs=length_reward, args=small_args(tmp_path),
            train_dataset=rows(2), processing_class=tok,
            peft_config=peft.LoraConfig(r=4, use_dora=True),
        )  # fmt: skip


def test_trl_config_names_map_or_name_the_sdpo_key():
    c = SDPOConfig(
        num_generations=8,
        max_completion_length=128,
        beta=0.04,
        learning_rate=3e-6,
        per_device_train_batch_size=16,
        distillation_mode="sampled_token",
        distillation_alpha=1.0,
        teacher_model_kind="base",
        loss_type="dr_grpo",
        num_iterations=2,
    )
    assert c.num_samples_per_prompt == 8 and c.generation.max_new_tokens == 128
    assert c.policy_gradient.kl_penalty_weight == 0.04
    assert c.optimization.learning_rate == 3e-6 and c.optimization.micro_batch_size == 16
    assert c.self_distillation.distillation_level == "token" and c.self_distillation.alpha == 1.0
    assert c.self_distillation.teacher == "frozen"
    assert c.policy_gradient.loss_aggregation == "dr_grpo"
    assert c.optimization.updates_per_batch == 2
    c.apply_overrides(["num_generations=4", "max_completion_length=32"])  # the CLI too
    assert c.num_samples_per_prompt == 4 and c.generation.max_new_tokens == 32
    with pytest.raises(ValueError, match="set twice"):
        SDPOConfig(num_generations=8, num_samples_per_prompt=4)
    with pytest.raises(KeyError, match="optimization.prompts_per_step"):
        SDPOConfig(gradient_accumulation_steps=4)
    with pytest.raises(ValueError, match="distillation_mode = 'fused'"):
        SDPOConfig(distillation_mode="fused")


@pytest.mark.parametrize(
    ("key", "wanted", "not_wanted"),
    [
        ("use_cpu", "model.device=cpu", "is_clip"),
        ("gradient_accumulation_steps", "prompts_per_step", "gradient_checkpointing"),
    ],
)
def test_trl_near_misses_point_at_what_they_mean(key, wanted, not_wanted):
    """Before: use_cpu -> "Did you mean: is_clip", gradient_accumulation_steps ->
    gradient_checkpointing: look-alike names of settings that mean something else."""
    with pytest.raises(KeyError) as info:
        SDPOConfig.resolve_key(key)
    assert wanted in str(info.value) and not_wanted not in str(info.value)


def test_suggestions_are_close_spellings_in_the_named_section():
    with pytest.raises(KeyError) as info:
        SDPOConfig.resolve_key("self_distillation.alpah")
    assert "Did you mean: self_distillation.alpha?" in str(info.value)
    with pytest.raises(KeyError) as info:
        SDPOConfig.resolve_key("use_cache")
    assert "Did you mean" not in str(info.value)


# ----- 2. transformers TrainerCallback -----------------------------------------------------------


class Recorder(TrainerCallback):
    """A custom transformers callback: records events, stops the run after step 2."""

    def __init__(self) -> None:
        self.events: list[tuple] = []

    def on_train_begin(self, args, state, control, **kwargs):
        self.events.append(("train_begin", state.global_step, args.output_dir))
        assert kwargs["model"] is not None and kwargs["optimizer"] is not None

    def on_step_end(self, args, state, control, **kwargs):
        self.events.append(("step_end", state.global_step))
        if state.global_step >= 2:
            control.should_training_stop = True

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.events.append(("log", state.global_step, "reward" in logs))

    def on_evaluate(self, args, state, control, metrics=None, **kwargs):
        self.events.append(("evaluate", state.global_step, "eval/accuracy_greedy" in metrics))

    def on_save(self, args, state, control, **kwargs):
        self.events.append(("save", state.global_step))

    def on_train_end(self, args, state, control, **kwargs):
        self.events.append(("train_end", state.global_step))


def test_transformers_callbacks_run_and_can_stop_training(tmp_path, capsys):
    """Before: `on_evaluate() missing 1 required positional argument: 'control'` after the
    first evaluation. PrinterCallback prints the logs; should_training_stop ends the run at step
    2 of 5, which still evaluates and writes final/."""
    model, tok = tiny_chat_model()
    recorder = Recorder()
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=length_reward,
        args=small_args(tmp_path, max_steps=5, save_steps=1),
        train_dataset=rows(4),
        eval_dataset=rows(2),
        processing_class=tok,
        callbacks=[PrinterCallback, recorder],
    )
    trainer.train()
    assert trainer.global_step == 2
    out = capsys.readouterr().out
    assert "'reward':" in out and "'eval/accuracy_greedy':" in out  # PrinterCallback's prints
    run = str(tmp_path / "run")
    assert recorder.events == [
        ("train_begin", 0, run),
        ("log", 0, False),
        ("evaluate", 0, True),
        ("log", 1, True),
        ("save", 1),
        ("step_end", 1),
        ("log", 2, True),
        ("save", 2),
        ("step_end", 2),
        ("log", 2, False),
        ("evaluate", 2, True),
        ("train_end", 2),
    ]
    assert (tmp_path / "run" / "final" / "config.json").exists()


def test_a_callback_that_is_neither_kind_is_refused_up_front(tmp_path):
    model, tok = tiny_chat_model()
    with pytest.raises(TypeError, match="neither a transformers TrainerCallback"):
        SDPOTrainer(
            model=model, reward_funcs=length_reward, args=small_args(tmp_path),
            train_dataset=rows(2), processing_class=tok, callbacks=[object()],
        )  # fmt: skip


# ----- 3. several reward functions -----------------------------------------------------------


def accuracy(completions, answer, **kwargs):
    return [
        float(f"\\boxed{{{a}}}" in c[0]["content"])
        for c, a in zip(completions, answer, strict=True)
    ]


def format_bonus(completions, **kwargs):
    return [float("\\boxed{" in c[0]["content"]) for c in completions]


def _scored(tmp_path, texts, **overrides):
    model, tok = tiny_chat_model()
    trainer = SDPOTrainer(
        model=model,
        reward_funcs=[accuracy, format_bonus],
        args=small_args(tmp_path, **overrides),
        train_dataset=rows(2),
        processing_class=tok,
    )
    rollouts = trainer.generate(rows(2)[:1])  # one prompt (1+1), two completions
    rollouts.completions = texts
    trainer.score(rollouts)
    return trainer, rollouts


def test_format_bonus_does_not_make_a_wrong_answer_a_success(tmp_path):
    """Before: the rewards were summed before the threshold, so a wrong boxed answer (0 + 1.0
    format bonus = 1.0 >= 1.0) was a success, and the demonstration for its sibling."""
    texts = ["\\boxed{3}", "two"]  # wrong but boxed; wrong and unboxed
    trainer, rollouts = _scored(tmp_path, texts)
    assert rollouts.rewards.tolist() == [1.0, 0.0]  # the bonus still counts in the reward
    assert rollouts.success_scores == [0.0, 0.0]  # the rule: the first function decides
    contexts = trainer.reprompt(rollouts)
    assert all(c is None or c.demonstration_index is None for c in contexts)
    metrics = trainer._rollout_metrics(rollouts)
    assert metrics["accuracy"] == 0.0


def test_success_rule_by_name_and_by_sum(tmp_path):
    texts = ["\\boxed{2}", "\\boxed{3}"]  # right; wrong but boxed
    trainer, rollouts = _scored(tmp_path / "a", texts, success_reward="format_bonus")
    assert rollouts.success_scores == [1.0, 1.0]
    trainer, rollouts = _scored(tmp_path / "b", texts, success_reward="sum")
    assert rollouts.success_scores == [2.0, 1.0]  # the old rule, when asked for
    trainer, rollouts = _scored(tmp_path / "c", texts)
    assert rollouts.success_scores == [1.0, 0.0]
    contexts = trainer.reprompt(rollouts)
    assert contexts[1] is not None and contexts[1].demonstration_index == 0
    with pytest.raises(ValueError, match="success_reward = 'acc'.*accuracy, format_bonus"):
        _scored(tmp_path / "d", texts, success_reward="acc")


def test_reward_weights_and_per_function_metrics(tmp_path):
    """TRL's reward_weights weight the sum; rewards/<name>/mean|std are each function's own."""
    texts = ["\\boxed{2}", "\\boxed{3}"]
    trainer, rollouts = _scored(tmp_path, texts, reward_weights=[1.0, 0.25])
    assert rollouts.rewards.tolist() == [1.25, 0.25]
    m = rollouts.reward_metrics
    assert m["rewards/accuracy/mean"] == 0.5 and m["rewards/format_bonus/mean"] == 1.0
    assert m["rewards/accuracy/std"] == pytest.approx(0.7071067811865476)
    assert m["rewards/format_bonus/std"] == 0.0
    with pytest.raises(ValueError, match="3 weights for 2 reward functions"):
        _scored(tmp_path / "x", texts, reward_weights=[1.0, 1.0, 1.0])


def test_per_function_metrics_reach_metrics_jsonl(tmp_path):
    model, tok = tiny_chat_model()
    trainer = SDPOTrainer(
        model=model, reward_funcs=[accuracy, format_bonus], args=small_args(tmp_path),
        train_dataset=rows(2), processing_class=tok,
    )  # fmt: skip
    trainer.train()
    lines = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    step = next(r for r in lines if "reward" in r)
    assert {"rewards/accuracy/mean", "rewards/accuracy/std", "rewards/format_bonus/mean"} <= set(
        step
    )


def test_privileged_context_column_is_feedback_where_the_reward_gives_none():
    from sdpo.reward_model import as_reward_model, call_reward_model

    def with_feedback(completions, **kwargs):
        return [(0.0, "from the reward"), 0.0]

    rows_ = [{"prompt": "q", "privileged_context": "from the data"}] * 2
    outs, _ = call_reward_model(as_reward_model(with_feedback), rows_, ["a", "b"], [[1], [2]])
    assert [o.feedback for o in outs] == ["from the reward", "from the data"]


# ----- the same two fixes in sdpo's own call shape (what the seed's users write) -------------


def _seed_trainer(tmp_path, reward, callbacks=None, max_steps=2):
    model, tok = tiny_chat_model()
    config = SDPOConfig(
        num_samples_per_prompt=2,
        generation__max_new_tokens=6,
        optimization__prompts_per_step=2,
        run__max_steps=max_steps,
        run__output_dir=str(tmp_path / "run"),
        run__progress_bar=False,
    )
    return SDPOTrainer(
        config=config,
        policy_model=PolicyModel(model=model, tokenizer=tok),
        reward_model=reward,
        train_dataloader=rows(2),
        eval_dataloader=rows(2),
        callbacks=callbacks,
    )


def test_transformers_callback_in_the_seed_call_shape(tmp_path):
    """Before: TypeError `on_evaluate() missing 1 required positional argument: 'control'`."""
    recorder = Recorder()
    trainer = _seed_trainer(tmp_path, length_reward, callbacks=[recorder], max_steps=4)
    trainer.train()
    assert trainer.global_step == 2  # should_training_stop at step 2 of 4
    assert [e[0] for e in recorder.events].count("evaluate") == 2


def test_format_bonus_is_no_demonstration_in_the_seed_call_shape(tmp_path):
    """Before: 0 + 1.0 format bonus >= threshold 1.0: the wrong answer was a success."""
    trainer = _seed_trainer(tmp_path, [accuracy, format_bonus])
    rollouts = trainer.generate(rows(2)[:1])
    rollouts.completions = ["\\boxed{3}", "two"]
    trainer.score(rollouts)
    assert rollouts.rewards.tolist() == [1.0, 0.0]
    assert trainer._rollout_metrics(rollouts)["accuracy"] == 0.0
    assert all(c is None or c.demonstration_index is None for c in trainer.reprompt(rollouts))
