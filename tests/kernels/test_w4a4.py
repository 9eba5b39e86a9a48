"""Triton W4A4: activation quantizer and integer GEMM against the references."""

import pytest
import torch

from loaq.kernels.w4a4 import INT8_WORKSPACE_MIN_M, W4A4Weight, prepare_w4a4, quantize_activations, w4a4_matmul
from loaq.kernels.w4a4_ref import ActQuant, quantize_activations_ref, w4a4_int_accum_ref, w4a4_matmul_ref
from tests.kernels.helpers import DEVICE, make_packed, rel_err


def _activations(m, k, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(m, k, generator=gen) * torch.rand(m, 1, generator=gen) * 4 + 0.3
    x[0] = 0.0  # an all-zero token takes the scale = 1 branch
    return x.to(device=DEVICE, dtype=dtype)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32])
@pytest.mark.parametrize("k", [96, 200])
def test_activation_quantizer_is_bit_exact(sym, dtype, k):
    """Same fp32 IEEE ops (div_rn, round half to even) as the reference: equal bits."""
    x = _activations(9, k, dtype)
    got, ref = quantize_activations(x, sym), quantize_activations_ref(x, sym)
    for field in ("codes", "scale", "zero", "rowsum"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field
    assert ref.codes.min() >= -8 and ref.codes.max() <= 7
    if sym:  # max |x| maps to ±7, so -8 never occurs
        assert ref.codes.min() >= -7 and (ref.codes.abs().amax(-1)[1:] == 7).all()
    if not sym:  # dequantization error is at most half a step, except for clamping
        xr = (ref.codes.float() - ref.zero.float()[:, None]) * ref.scale[:, None]
        assert ((xr - x.float()).abs() <= ref.scale[:, None] * 0.5001).all()


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("asym_w", [False, True])
@pytest.mark.parametrize("m", [1, 5, 70, INT8_WORKSPACE_MIN_M])
def test_w4a4_integer_accumulation_is_exact(sym, asym_w, m):
    """Unit scales and fp32 output expose the int32 accumulator: equal to int64 reference."""
    n, k = 48, 160
    w = make_packed(4, n, k, None, asym_w, torch.float16)
    act = quantize_activations_ref(_activations(m, k, torch.float32), sym)
    prepared = prepare_w4a4(w)
    unit = W4A4Weight(prepared.qweight, torch.ones_like(prepared.scale), prepared.zero,
                      prepared.colsum, prepared.n, prepared.k)
    unit_act = ActQuant(act.codes, torch.ones_like(act.scale), act.zero, act.rowsum)
    y = w4a4_matmul(unit_act, unit, torch.float32)
    assert torch.equal(y.double(), w4a4_int_accum_ref(act, w).double())
    cfg = dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, GROUP_M=2, B_INT8=True, num_warps=4, num_stages=2)
    y = w4a4_matmul(unit_act, unit, torch.float32, cfg)  # the int8-workspace path
    assert torch.equal(y.double(), w4a4_int_accum_ref(act, w).double())


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("out_dtype", [torch.float16, torch.bfloat16])
def test_w4a4_matches_reference(sym, out_dtype):
    """Same fp32 epilogue as the reference; only the final cast may differ by an ulp."""
    n, k, m = 40, 224, 33
    w = make_packed(4, n, k, None, True, torch.float16, seed=3)
    act = quantize_activations(_activations(m, k, out_dtype, seed=2), sym)
    y = w4a4_matmul(act, prepare_w4a4(w), out_dtype)
    assert y.dtype == out_dtype
    tol = 1e-2 if out_dtype == torch.bfloat16 else 1e-3
    assert rel_err(y, w4a4_matmul_ref(act, w, out_dtype)) < tol
