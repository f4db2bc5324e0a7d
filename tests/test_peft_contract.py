"""The PEFT internals sdpo.lora relies on, checked by name: if PEFT renames or stops reading them,
this fails with the attribute's name instead of LoRA teachers silently using the wrong weights.

sdpo.lora.adapter_scope flips each adapter layer's ``_active_adapter`` and ``_disable_adapters``
directly (PEFT's ``set_adapter`` / ``disable_adapter`` would also toggle ``requires_grad``), and
finds a layer's adapters through ``adapter_layer_names`` (LoRA layers) or ``modules_to_save``
(``AuxiliaryTrainingWrapper``)."""

from __future__ import annotations

import pytest
import torch
from conftest import make_tiny_llama

pytest.importorskip("peft")

from sdpo import lora  # noqa: E402
from sdpo.config import LoraConfig  # noqa: E402

PRIVATE = ("_active_adapter", "_disable_adapters")


@pytest.fixture
def peft_model():
    model, _ = make_tiny_llama()
    model = lora.apply_lora(model, LoraConfig(r=4, modules_to_save=["lm_head"]))
    with torch.no_grad():  # B = 0 at init would make "adapter on" equal "adapter off"
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    return model


def test_adapter_layers_have_the_attributes_adapter_scope_flips(peft_model):
    from peft.tuners.tuners_utils import BaseTunerLayer
    from peft.utils.other import AuxiliaryTrainingWrapper

    layers = lora._adapter_layers(peft_model)
    kinds = {type(m).__mro__[1].__name__ for m in layers}
    assert any(isinstance(m, BaseTunerLayer) for m in layers), kinds
    assert any(isinstance(m, AuxiliaryTrainingWrapper) for m in layers), kinds  # modules_to_save
    for m in layers:
        missing = [a for a in PRIVATE if not hasattr(m, a)]
        assert not missing, f"PEFT's {type(m).__name__} has no {missing}: update sdpo.lora"
        assert lora.STUDENT in lora._layer_adapters(m), (
            f"{type(m).__name__}: the adapter names are no longer in adapter_layer_names / "
            "modules_to_save; update sdpo.lora._layer_adapters"
        )
    assert all(hasattr(m, "adapter_layer_names") for m in layers if isinstance(m, BaseTunerLayer))


def test_peft_forward_reads_the_flags(peft_model):
    """Setting ``_disable_adapters`` must change the output (PEFT reads the flag, not a copy),
    and adapter_scope(None) must equal PEFT's own disable_adapter()."""
    ids = torch.tensor([[3, 5, 7, 9]])
    peft_model.eval()
    with torch.no_grad():
        on = peft_model(input_ids=ids).logits
        with lora.adapter_scope(peft_model, None) as base:
            off = base(input_ids=ids).logits
        with peft_model.disable_adapter():
            peft_off = peft_model(input_ids=ids).logits
        again = peft_model(input_ids=ids).logits
    assert not torch.allclose(on, off), "adapters off changed nothing: PEFT ignores the flag"
    torch.testing.assert_close(off, peft_off, rtol=0, atol=0)
    torch.testing.assert_close(again, on, rtol=0, atol=0)  # the scope restored the flags
