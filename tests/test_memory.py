"""Memory of the training step's LM-head pass: the default chunk size follows the vocabulary, so a
large vocabulary never holds a ``[1024, V]`` buffer (what lifted the V = 32,768 bench step's peak)."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from sdpo import SDPOConfig
from sdpo.self_distillation import AUTO_CHUNK_ELEMENTS, auto_chunk_size, policy_terms


class _LargestTensor(TorchDispatchMode):
    """Records the largest tensor any op produces (forward and backward)."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


@pytest.mark.parametrize(
    ("vocab", "chunk"), [(99, 1024), (128, 1024), (32768, 256), (151936, 64), (10**7, 64)]
)
def test_auto_chunk_size_by_vocabulary(vocab, chunk):
    assert auto_chunk_size(vocab) == chunk


def test_default_chunk_is_auto_and_bounds_the_largest_buffer():
    """The config default (0 = auto) gives policy_terms chunks of ⌊2²³/V⌋ positions: the largest
    tensor of forward + backward is one ``[chunk, V]`` buffer, and the values and gradients equal
    a single full-size chunk's."""
    assert SDPOConfig().self_distillation.loss_chunk_size == 0
    n, hidden, vocab = 300, 8, 65536  # one chunk would be [300, V]; auto: 128 positions
    gen = torch.Generator().manual_seed(0)
    h_s = torch.randn(n, hidden, generator=gen).requires_grad_()
    h_t = torch.randn(n, hidden, generator=gen)
    weight = (0.5 * torch.randn(vocab, hidden, generator=gen)).requires_grad_()
    ids = torch.randint(vocab, (n,), generator=gen)
    mask = torch.arange(n) % 4 > 0
    kwargs = dict(teacher_hidden=h_t, distill_mask=mask, topk=20, add_tail=True)
    out = {}
    for name, chunk in (("auto", SDPOConfig().self_distillation.loss_chunk_size), ("one", n)):
        with _LargestTensor() as probe:
            terms = policy_terms(h_s, weight, ids, chunk_size=chunk, **kwargs)
            loss = terms["logprobs"].sum() + terms["divergence"].sum()
            grads = torch.autograd.grad(loss, [h_s, weight])
        out[name] = (probe.largest, terms, grads)
    assert out["auto"][0] == max(auto_chunk_size(vocab) * vocab, vocab * hidden)
    assert out["auto"][0] <= AUTO_CHUNK_ELEMENTS < out["one"][0] == n * vocab
    for key in ("logprobs", "divergence", "entropy"):
        torch.testing.assert_close(out["auto"][1][key], out["one"][1][key], rtol=1e-5, atol=1e-6)
    for a, b in zip(out["auto"][2], out["one"][2], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)
