"""The module modes of the RL passes: train mode with dropout off (TRL's SDPO does the same).

The old log-probs, the new ones at each reuse, and the teacher's all see one network, so the
importance ratio ``ρ = exp(new − old)`` is exactly 1 at the first reuse, and a model passed in
eval mode trains like one passed in train mode. The model itself stays in train mode so HF
gradient checkpointing (which runs only when a layer's ``training`` is True) still applies: only
the modules whose ``training`` flag switches dropout on are put in eval.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

# Attributes through which HF attention modules apply dropout as ``p if self.training else 0``
# (Llama & co: ``attention_dropout``; GPT-2: ``attn_dropout``).
_ATTENTION_DROPOUT_ATTRS = ("attention_dropout", "attn_dropout")


def set_rl_mode(model: torch.nn.Module, *, dropout: bool = False) -> None:
    """Train mode; unless ``dropout``, every dropout module and dropout-applying attention module in
    eval mode (decoder layers stay in train mode, so gradient checkpointing still runs)."""
    model.train()
    if dropout:
        return
    from transformers.modeling_layers import GradientCheckpointingLayer

    for module in model.modules():
        if isinstance(module, GradientCheckpointingLayer):
            continue
        if isinstance(module, torch.nn.modules.dropout._DropoutNd) or any(
            hasattr(module, a) for a in _ATTENTION_DROPOUT_ATTRS
        ):
            module.training = False


@contextlib.contextmanager
def eval_scope(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """``model`` in eval mode inside; every module's own mode restored after (``train(True)``
    would switch the dropout that :func:`set_rl_mode` turned off back on)."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield model
    finally:
        for m, training in modes:
            m.training = training
