"""Triton Hadamard transform (alone and fused with the W4A4 quantizer) vs the reference."""

import math

import pytest
import torch

from loaq.hadamard import hadamard
from loaq.kernels.hadamard import hadamard_quantize, hadamard_transform
from loaq.kernels.hadamard_ref import hadamard_transform_ref
from loaq.kernels.w4a4_ref import quantize_activations_ref
from tests.kernels.helpers import DEVICE, rel_err


def _had_k(k: int) -> torch.Tensor | None:
    """The engine's K×K Hadamard factor (loaq.hadamard: Paley I for 12, 20, 24), None for 1."""
    return None if k == 1 else hadamard(k).float()


@pytest.mark.parametrize("k,p", [(1, 64), (1, 256), (12, 16), (20, 8), (24, 4)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_hadamard_matches_reference(k, p, dtype):
    """fp32 in-register arithmetic: 1e-5 relative for fp32; bf16 output: one rounding."""
    x = torch.randn(5, k * p, generator=torch.Generator().manual_seed(k)).to(DEVICE, dtype)
    h = _had_k(k)
    y = hadamard_transform(x, h)
    ref = hadamard_transform_ref(x, h)
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 8e-3)
    # orthonormal: norms preserved (in fp32)
    if dtype == torch.float32:
        assert torch.allclose(y.norm(dim=-1), x.norm(dim=-1), rtol=1e-5)
    assert not torch.equal(y, x)


@pytest.mark.parametrize("k,p", [(1, 128), (12, 16), (24, 8)])
@pytest.mark.parametrize("sym", [True, False])
def test_fused_hadamard_quantize(k, p, sym):
    """Transform rounding may differ by ~1e-7 between kernel and reference, flipping a
    code at an exact rounding boundary: allow <=1% of codes off by one, none by more."""
    x = torch.randn(9, k * p, generator=torch.Generator().manual_seed(p)).to(DEVICE, torch.float16)
    got = hadamard_quantize(x, _had_k(k), sym)
    ref = quantize_activations_ref(hadamard_transform_ref(x.float(), _had_k(k)), sym)
    diff = (got.codes.int() - ref.codes.int()).abs()
    assert diff.max() <= 1 and diff.float().mean() <= 0.01
    assert torch.allclose(got.scale, ref.scale, rtol=1e-5)
    assert torch.equal(got.rowsum, got.codes.sum(-1, dtype=torch.int32))
    assert (got.zero - ref.zero).abs().max() <= 1
