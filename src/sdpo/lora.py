"""LoRA with PEFT: the policy as a frozen base plus a trainable adapter, and teachers as adapters.

One base model holds every set of weights a run needs:

- the student: adapter ``default`` (trainable; PEFT's name, so saved adapters load as usual);
- the EMA teacher: adapter ``teacher``, initialized *equal* to the student's adapter, never
  trainable, updated ``φ ← (1−β)·φ + β·θ`` over the adapter tensors only, in float32;
- the frozen teacher, the reference model and ``trust_region``'s anchor: the *initial policy*
  (SPEC section 6). When the student adapter starts as a no-op (PEFT's default init, ``lora_B =
  0``, as when sdpo adds the adapter) that is the base with adapters off, no copy at all; when it
  starts from a user's trained adapter it is adapter ``initial``, a frozen float32 snapshot of the
  student's adapter taken before the first step.

Switching between them is :func:`adapter_scope`. It flips PEFT's per-layer active-adapter and
disabled flags directly: PEFT's own ``set_adapter`` / ``disable_adapter`` also toggle
``requires_grad``, which makes the teacher's adapter trainable and silently drops the student's
gradients when a teacher pass runs between the student's forward and backward.

``peft`` is an optional dependency (``pip install 'sdpo[peft]'``); this module imports it lazily.
"""

from __future__ import annotations

import contextlib
import copy
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

STUDENT = "default"
TEACHER = "teacher"
INITIAL = "initial"
INSTALL_HINT = "pip install 'sdpo[peft]'"


def require_peft() -> Any:
    """The ``peft`` module, or an ImportError naming the extra to install."""
    try:
        import peft
    except ImportError:
        raise ImportError(
            f"LoRA (model.lora.r > 0) needs the `peft` package: {INSTALL_HINT} "
            "(or pip install -c constraints.txt -e '.[peft]' in a checkout)."
        ) from None
    return peft


def is_peft_model(model: Any) -> bool:
    """True for a ``peft.PeftModel`` (checked without importing peft)."""
    return hasattr(model, "peft_config") and hasattr(model, "get_base_model")


def default_target_modules(model: torch.nn.Module) -> list[str]:
    """Names of every linear projection inside the transformer blocks (attention and MLP).

    Found from the model itself, so it holds for any architecture: ``q/k/v/o_proj``,
    ``gate/up/down_proj`` for Llama-like models, ``c_attn``/``c_proj``/``c_fc`` for GPT-2. The
    embeddings and the LM head are never targets.
    """
    from transformers.pytorch_utils import Conv1D

    head = model.get_output_embeddings()
    names: list[str] = []
    for name, module in model.named_modules():
        if module is head or not isinstance(module, (torch.nn.Linear, Conv1D)):
            continue
        leaf = name.rsplit(".", 1)[-1]
        if leaf not in names:
            names.append(leaf)
    if not names:
        raise ValueError(
            f"{type(model).__name__} has no linear projections to put LoRA adapters on; "
            "set model.lora.target_modules."
        )
    return names


def apply_lora(model: torch.nn.Module, lora: Any) -> torch.nn.Module:
    """Wrap ``model`` in a PEFT ``PeftModel`` with a trainable ``default`` adapter (``lora``: the
    config's :class:`~sdpo.config.LoraConfig`). The base weights are frozen, not copied."""
    peft = require_peft()
    target = list(lora.target_modules or default_target_modules(model))
    head_name = _module_name(model, model.get_output_embeddings())
    if head_name is not None and any(head_name.endswith(t) or t == head_name for t in target):
        raise ValueError(
            f"model.lora.target_modules includes the LM head ({head_name!r}); sdpo applies the head "
            "in chunks and cannot add a LoRA update to it. Put it in model.lora.modules_to_save instead."
        )
    config = peft.LoraConfig(
        r=lora.r,
        lora_alpha=lora.lora_alpha,
        lora_dropout=lora.lora_dropout,
        target_modules=target,
        modules_to_save=list(lora.modules_to_save) or None,
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft calls a transformers method deprecated in v5
        warnings.filterwarnings(
            "ignore", message=".*is_gradient_checkpointing", category=FutureWarning
        )
        return peft.get_peft_model(model, config)


def attach(policy: Any, lora: Any) -> None:
    """Make ``policy`` (a :class:`~sdpo.policy_model.PolicyModel`) a LoRA policy when the config
    asks for one (``lora.r > 0``); a PeftModel the user built is checked and kept as it is."""
    if policy.is_lora:
        if lora.r > 0:
            raise ValueError(
                "The policy is already a PeftModel; leave model.lora.r = 0 to train its adapter, "
                "or pass the plain model to have sdpo add one."
            )
        check_peft_model(policy.model)
    elif lora.r > 0:
        policy.model = apply_lora(policy.model, lora)


def check_peft_model(model: torch.nn.Module) -> None:
    """Refuse what sdpo cannot train correctly: an adapter on the LM head, several active adapters."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    if isinstance(model.get_output_embeddings(), BaseTunerLayer):
        raise ValueError(
            "The PeftModel has a LoRA adapter on its LM head; sdpo applies the head in chunks and "
            "cannot add a LoRA update to it. Put the head in modules_to_save instead."
        )
    if len(model.active_adapters) != 1:
        raise ValueError(
            f"The PeftModel has active adapters {model.active_adapters}; sdpo trains exactly one."
        )


def student_adapter(model: torch.nn.Module) -> str:
    """Name of the trained adapter of a PeftModel (its single active adapter)."""
    return model.active_adapters[0]


def _adapter_layers(model: torch.nn.Module) -> list[torch.nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    return [m for m in model.modules() if isinstance(m, (BaseTunerLayer, AuxiliaryTrainingWrapper))]


@contextlib.contextmanager
def adapter_scope(model: torch.nn.Module, adapter: str | None) -> Iterator[torch.nn.Module]:
    """Forward passes inside run with ``adapter`` active (None: the base, adapters off).

    Yields the underlying transformers model. ``requires_grad`` is left untouched (see the
    module docstring), and the previous state is restored on exit.
    """
    layers = _adapter_layers(model)
    saved = [(m._active_adapter, m._disable_adapters) for m in layers]
    try:
        for m in layers:
            if adapter is None:
                m._disable_adapters = True
            elif adapter in _layer_adapters(m):
                m._active_adapter = [adapter] if isinstance(m._active_adapter, list) else adapter
                m._disable_adapters = False
        yield model.get_base_model()
    finally:
        for m, (active, disabled) in zip(layers, saved, strict=True):
            m._active_adapter, m._disable_adapters = active, disabled


def _layer_adapters(module: torch.nn.Module) -> set[str]:
    names: set[str] = set()
    for attr in getattr(module, "adapter_layer_names", ()) or ("modules_to_save",):
        names.update(getattr(module, attr, {}).keys())
    return names


def adapter_parameters(model: torch.nn.Module, adapter: str) -> dict[str, torch.nn.Parameter]:
    """The parameters of one adapter (LoRA A/B and its ``modules_to_save`` copies), by the name
    they would have under adapter ``default`` (so two adapters' dicts have the same keys)."""
    out = {}
    for name, param in model.named_parameters():
        parts = name.split(".")
        if adapter in parts:
            out[".".join(STUDENT if p == adapter else p for p in parts)] = param
    return out


def adapter_adds_nothing(model: torch.nn.Module) -> bool:
    """True when the student adapter leaves the base model's outputs exactly as they are: every
    LoRA ``B`` is zero (``ΔW = (lora_alpha / r)·B·A = 0``) and every ``modules_to_save`` copy
    equals the module it replaces. Any other adapter tensor (a DoRA magnitude, ...) counts as
    changing the outputs, so the initial policy is then snapshotted rather than assumed."""
    for name, param in adapter_parameters(model, student_adapter(model)).items():
        parts = name.split(".")
        if "lora_A" in parts or "lora_embedding_A" in parts:
            continue
        if "lora_B" in parts or "lora_embedding_B" in parts:
            if torch.count_nonzero(param):
                return False
        elif "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            # Through the module: a tied original (lm_head = embed_tokens) has no name of its own.
            wrapper = model.get_submodule(".".join(parts[:i]))
            original = wrapper.original_module.get_parameter(".".join(parts[i + 2 :]))
            if not torch.equal(original, param):
                return False
        else:
            return False
    return True


def add_adapter_copy(model: torch.nn.Module, name: str) -> dict[str, torch.nn.Parameter]:
    """Add adapter ``name`` equal to the student's adapter, in float32, never trainable (the EMA
    teacher ``teacher``, the initial-policy snapshot ``initial``).

    Returns the new adapter's parameters keyed like :func:`adapter_parameters`.
    """
    student = student_adapter(model)
    if name in model.peft_config:
        raise ValueError(f"The PeftModel already has an adapter named {name!r}.")
    config = model.peft_config[student]
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    model.add_adapter(name, config)
    # add_adapter re-marks trainable parameters; restore the student's flags exactly.
    for param_name, param in model.named_parameters():
        if param_name in grads:
            param.requires_grad_(grads[param_name])
    theta = adapter_parameters(model, student)
    phi = adapter_parameters(model, name)
    if theta.keys() != phi.keys():
        raise RuntimeError(f"Adapter {name!r} tensors {sorted(phi)} do not match the student's.")
    with torch.no_grad():
        for key, p in phi.items():
            p.requires_grad_(False)
            p.data = theta[key].detach().to(torch.float32).clone()
    return phi


@torch.no_grad()
def ema_update(teacher: list[Tensor], student: list[Tensor], rate: float) -> None:
    """``φ ← (1−β)·φ + β·θ`` in place, in float32 (``teacher``: float32 tensors)."""
    torch._foreach_lerp_(teacher, [s.detach().to(torch.float32) for s in student], rate)


def adapter_state(model: torch.nn.Module, adapter: str) -> dict[str, Tensor]:
    """An adapter's tensors in PEFT's saved format (keys without the adapter name)."""
    from peft import get_peft_model_state_dict

    return {
        k: v.detach().contiguous()
        for k, v in get_peft_model_state_dict(model, adapter_name=adapter).items()
    }


def load_adapter_state(model: torch.nn.Module, adapter: str, state: dict[str, Tensor]) -> None:
    """Copy ``state`` (from :func:`adapter_state`) into ``adapter``, bit for bit; every tensor must match."""
    expected = adapter_state(model, adapter)
    if expected.keys() != state.keys():
        missing, extra = (
            sorted(expected.keys() - state.keys()),
            sorted(state.keys() - expected.keys()),
        )
        raise ValueError(
            f"Adapter {adapter!r} does not match the saved one (missing {missing[:3]}, "
            f"unexpected {extra[:3]}); was the checkpoint written with other model.lora settings?"
        )
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            key = _saved_key(name, adapter)
            if key is not None and key in state:
                if state[key].shape != param.shape:
                    raise ValueError(
                        f"{key}: saved shape {tuple(state[key].shape)} != {tuple(param.shape)}."
                    )
                param.copy_(state[key])


def _saved_key(name: str, adapter: str) -> str | None:
    """PEFT's saved key of parameter ``name`` of ``adapter`` (None if it belongs to no adapter)."""
    parts = name.split(".")
    if adapter not in parts:
        return None
    i = parts.index(adapter)
    if (
        parts[i - 1] == "modules_to_save"
    ):  # ...lm_head.modules_to_save.default.weight -> ...lm_head.weight
        return ".".join(parts[: i - 1] + parts[i + 1 :])
    return ".".join(parts[:i] + parts[i + 1 :])


def save_adapter(
    model: torch.nn.Module, directory: str | Path, adapter: str, base_name: str | None = None
) -> None:
    """Write one adapter in PEFT's format (``adapter_config.json``, ``adapter_model.safetensors``):
    ``PeftModel.from_pretrained(base, directory)`` loads it; ``base_name`` is recorded as
    ``base_model_name_or_path`` (what :class:`~sdpo.policy_model.PolicyModel` loads it onto)."""
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = copy.copy(model.peft_config[adapter])
    config.inference_mode = True
    if base_name:
        config.base_model_name_or_path = base_name
    config.save_pretrained(str(directory))
    save_file(
        adapter_state(model, adapter),
        str(directory / "adapter_model.safetensors"),
        metadata={"format": "pt"},
    )


def load_adapter(model: torch.nn.Module, directory: str | Path, adapter: str) -> None:
    """Load an adapter written by :func:`save_adapter` into ``adapter`` of ``model``, bit for bit."""
    from safetensors.torch import load_file

    file = Path(directory) / "adapter_model.safetensors"
    if not file.exists():
        raise FileNotFoundError(f"{file} is missing; {directory} holds no saved LoRA adapter.")
    load_adapter_state(model, adapter, load_file(str(file)))


def save_checkpoint_adapters(policy: Any, directory: Path) -> None:
    """A LoRA policy's part of a checkpoint: ``policy/`` (the student adapter, PEFT's format, with
    the tokenizer) and, with an EMA teacher, ``teacher/`` (its adapter, same format). The base
    weights are not written: they never change."""
    model = policy.model
    save_adapter(model, directory / "policy", student_adapter(model), base_name=policy.name)
    policy.tokenizer.save_pretrained(directory / "policy")
    if TEACHER in model.peft_config:
        save_adapter(model, directory / "teacher", TEACHER, base_name=policy.name)


def load_checkpoint_adapters(policy: Any, directory: Path) -> None:
    """Restore what :func:`save_checkpoint_adapters` wrote into the running LoRA policy."""
    model = policy.model
    if not (directory / "policy" / "adapter_config.json").exists():
        raise FileNotFoundError(
            f"{directory} holds no LoRA adapter (policy/adapter_config.json); it was written by a "
            "run without model.lora (full fine-tuning) and cannot resume a LoRA run."
        )
    load_adapter(model, directory / "policy", student_adapter(model))
    if TEACHER in model.peft_config:
        if not (directory / "teacher").is_dir():
            raise FileNotFoundError(
                f"{directory} has no teacher/ adapter; was it written with another teacher setting?"
            )
        load_adapter(model, directory / "teacher", TEACHER)


def load_pretrained(directory: Path, base: torch.nn.Module) -> torch.nn.Module:
    """``base`` with the adapter saved in ``directory`` (PEFT's ``PeftModel.from_pretrained``),
    trainable, as the policy of a run that continues from it."""
    peft = require_peft()
    return peft.PeftModel.from_pretrained(base, str(directory), is_trainable=True)


def merged(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model with the active adapter merged into the base weights
    (``W ← W + (lora_alpha / r)·B·A``); the adapters are removed."""
    model = model.merge_and_unload()
    head, embed = model.get_output_embeddings(), model.get_input_embeddings()
    if head is not None and head.weight is not embed.weight:  # e.g. lm_head in modules_to_save
        model.config.tie_word_embeddings = False
    return model


def iter_merged_weights(model: torch.nn.Module, dtype: torch.dtype) -> Iterator[tuple[str, Tensor]]:
    """``(name, tensor)`` of the policy with its adapter merged, under the plain transformers names
    (``...q_proj.weight = W + (lora_alpha / r)·B·A``; a ``modules_to_save`` copy under the
    module's own name), one tensor at a time: what an inference engine that knows only the base
    architecture (vLLM) loads. Other adapters (the EMA teacher's) are left out."""
    from peft.tuners.tuners_utils import BaseTunerLayer

    adapter = student_adapter(model)
    hf = model.get_base_model()
    layers = {n: m for n, m in hf.named_modules() if isinstance(m, BaseTunerLayer)}
    for name, param in hf.named_parameters():
        parts = name.split(".")
        if any(p.startswith("lora_") for p in parts) or "original_module" in parts:
            continue
        if "modules_to_save" in parts:
            i = parts.index("modules_to_save")
            if parts[i + 1] != adapter:
                continue
            yield ".".join(parts[:i] + parts[i + 2 :]), param.detach().to(dtype)
            continue
        tensor = param.detach()
        if "base_layer" in parts:
            i = parts.index("base_layer")
            layer = layers.get(".".join(parts[:i]))
            if parts[i + 1] == "weight" and layer is not None and adapter in layer.lora_A:
                tensor = tensor + layer.get_delta_weight(adapter).to(tensor.dtype)
            parts = parts[:i] + parts[i + 1 :]
        yield ".".join(parts), tensor.to(dtype)


def _module_name(model: torch.nn.Module, target: torch.nn.Module | None) -> str | None:
    for name, module in model.named_modules():
        if module is target:
            return name
    return None
