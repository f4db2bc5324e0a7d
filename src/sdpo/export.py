"""The trained model as a plain Hugging Face directory (``final/`` at the end of a run).

``save_pretrained_dir`` writes what ``AutoModelForCausalLM.from_pretrained`` and
``AutoTokenizer.from_pretrained`` load: the weights (safetensors) and config, the tokenizer, a
``generation_config.json`` with the run's sampling settings, and a model card (``README.md``) with
the config and the evaluation table. A LoRA policy is written merged (the student's adapter added
into the base weights, so the directory loads on its own), with the adapter itself under
``adapter/`` in PEFT's format. The directory is written next to its place and renamed into it
when complete, so a failed export never replaces a good one.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path
from typing import Any

import yaml
from transformers import GenerationConfig as HFGenerationConfig

from sdpo.config import GenerationConfig, SDPOConfig


def generation_config(policy: Any, generation: GenerationConfig) -> HFGenerationConfig:
    """The model's generation config with the run's sampling settings and the tokenizer's EOS/pad."""
    config = HFGenerationConfig.from_model_config(policy.model.config)
    config.update(
        do_sample=True,
        temperature=generation.temperature,
        top_p=generation.top_p,
        top_k=generation.top_k or None,
        max_new_tokens=generation.max_new_tokens,
        eos_token_id=policy.tokenizer.eos_token_id,
        pad_token_id=policy.tokenizer.pad_token_id,
    )
    return config


def model_card(
    config: SDPOConfig, steps: int, first_eval: dict[str, float], last_eval: dict[str, float]
) -> str:
    """``README.md`` of an exported model: what it is, how to load it, its evals, its config."""
    lines = [
        "---",
        "library_name: transformers",
        "tags: [sdpo, reinforcement-learning, self-distillation]",
        "---",
        "",
        f"# {Path(config.model_name).name} trained with SDPO",
        "",
        f"Trained for {steps} steps from `{config.model_name}` with "
        "[sdpo](https://arxiv.org/abs/2601.20802) (Self-Distilled Policy Optimization).",
        "",
        "```python",
        "from transformers import AutoModelForCausalLM, AutoTokenizer",
        "",
        'model = AutoModelForCausalLM.from_pretrained("path/to/this/directory")',
        'tokenizer = AutoTokenizer.from_pretrained("path/to/this/directory")',
        "```",
        "",
        "## Evaluation",
        "",
    ]
    keys = sorted(set(first_eval) | set(last_eval))
    if keys:
        lines += ["| metric | before training | after training |", "|---|---:|---:|"]
        for key in keys:
            before, after = first_eval.get(key), last_eval.get(key)
            lines.append(f"| {key} | {_fmt(before)} | {_fmt(after)} |")
    else:
        lines.append("No evaluation set was given.")
    config_yaml = yaml.safe_dump(config.to_dict(), sort_keys=False).rstrip()
    lines += ["", "## Training config", "", "```yaml", config_yaml, "```", ""]
    return "\n".join(lines)


def save_pretrained_dir(
    policy: Any,
    output_dir: str | Path,
    generation: GenerationConfig,
    card: str,
    state_dict: dict[str, Any] | None = None,
) -> Path:
    """Write ``policy``'s model, tokenizer, generation config and ``card`` to ``output_dir``.

    ``state_dict``: the weights to write instead of ``policy.model.state_dict()`` (a sharded
    model's gathered weights: its own state dict holds only this rank's shards)."""
    out = Path(output_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".tmp-{out.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    # A LoRA policy: the adapter in PEFT's format under adapter/, the model itself merged.
    model = policy.standalone_model(adapter_dir=tmp / "adapter")
    model.save_pretrained(tmp, state_dict=state_dict)  # LoRA is not combined with fsdp
    policy.tokenizer.save_pretrained(tmp)
    generation_config(policy, generation).save_pretrained(tmp)
    (tmp / "README.md").write_text(card)
    from sdpo.checkpoint import write_manifest  # checked by `sdpo eval` / `sdpo export`

    write_manifest(tmp)
    if out.exists():
        old = out.parent / f".old-{out.name}-{os.getpid()}"
        out.rename(old)
        tmp.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        tmp.rename(out)
    return out


def _fmt(value: float | None) -> str:
    return "" if value is None else f"{value:.4g}"
