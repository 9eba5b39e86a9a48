"""CPU kernels (compiled C++, fused unpack-and-multiply / dequantize + oneDNN) vs the references.

Every decode-path test runs twice: with the dot-product instructions this CPU has
(``vdpbf16ps`` for bf16 activations, ``vpdpwssd`` for W4A4) and with ``USE_DOT = False``,
the portable fp32 code that CPUs without them run.

Tolerances: with fp32 activations and fp32 scales everything is fp32 arithmetic in a
different order: 1e-5 of max |y|. With bf16 activations the reference rounds the
dequantized weight and the output to bf16 (eps 2**-8): 2e-2.
"""

import dataclasses

import pytest
import torch

from loaq.kernels import cpu
from loaq.kernels.cpu import (
    DEQUANT_MIN_M, DEQUANT_MIN_M_DOT, cpu_quantize_activations, cpu_w4a4_linear, cpu_w4a4_matmul, cpu_wna16_matmul, features,
    prepare_cpu,
)
from loaq.kernels.w4a4_ref import quantize_activations_ref, w4a4_int_accum_ref, w4a4_matmul_ref
from loaq.kernels.wna16_ref import wna16_matmul_ref
from tests.kernels.helpers import make_packed, rel_err

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}


@pytest.fixture(params=[True, False], ids=["dot", "portable"])
def use_dot(request, monkeypatch):
    monkeypatch.setattr(cpu, "USE_DOT", request.param)
    return request.param


def test_library_uses_the_dot_products_this_cpu_has():
    with open("/proc/cpuinfo") as f:
        flags = next((line.split(":", 1)[1].split() for line in f if line.startswith("flags")), [])
    assert ("bf16" in features()) == ("avx512_bf16" in flags)
    assert ("int" in features()) == ("avx512_vnni" in flags)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [None, 32, 128])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_wna16_matches_reference(bits, group, asym, dtype, use_dot):
    n, k = 37, 352  # K: partial last group of 128 and partial lane block for every width
    w = make_packed(bits, n, k, group, asym, dtype, seed=bits, device="cpu")
    prepared = prepare_cpu(w)
    gen = torch.Generator().manual_seed(0)
    for m in (1, 3, 6, DEQUANT_MIN_M + 1, 19, DEQUANT_MIN_M_DOT):  # token blocks of 1, 2, 4, 8; dequant
        x = torch.randn(m, k, generator=gen).to(dtype)
        y = cpu_wna16_matmul(x, prepared)
        assert y.dtype == dtype
        assert rel_err(y, wna16_matmul_ref(x, w)) < TOL[dtype], m
    x = torch.randn(2, 3, 2 * k, generator=gen).to(dtype)[..., ::2]  # strided, 3-d
    assert rel_err(cpu_wna16_matmul(x, prepared), wna16_matmul_ref(x, w)) < TOL[dtype]


def test_cpu_fp16_activations_run_through_fp32(use_dot):
    w = make_packed(4, 16, 64, 32, True, torch.float16, device="cpu")
    x = torch.randn(3, 64).half()
    y = cpu_wna16_matmul(x, prepare_cpu(w))
    assert y.dtype == torch.float16 and rel_err(y, wna16_matmul_ref(x.float(), w)) < 2e-3


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_activation_quantizer_is_bit_exact(sym, dtype):
    x = (torch.randn(7, 200, generator=torch.Generator().manual_seed(5)) * 3 + 0.4).to(dtype)
    x[2] = 0.0
    got, ref = cpu_quantize_activations(x, sym), quantize_activations_ref(x, sym)
    for field in ("codes", "scale", "zero", "rowsum"):
        assert torch.equal(getattr(got, field), getattr(ref, field)), field


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("asym_w", [False, True])
def test_cpu_w4a4_exact_and_scaled(sym, asym_w, use_dot):
    n, k = 26, 200  # N: 6 blocks of 4 output channels and a tail of 2
    m = 13  # M: a block of 8 tokens + 5 (VNNI); the portable path's dequantize + float32 GEMM from M = 8
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(4))
    act = quantize_activations_ref(x, sym)
    w = make_packed(4, n, k, None, asym_w, torch.float32, device="cpu")
    unit = make_packed(4, n, k, None, asym_w, torch.float32, device="cpu")
    unit = type(unit)(unit.weight_packed, torch.ones_like(unit.weight_scale), unit.weight_zero_point, 4, (n, k), None)
    unit_act = type(act)(act.codes, torch.ones_like(act.scale), act.zero, act.rowsum)
    exact = cpu_w4a4_matmul(unit_act, prepare_cpu(unit), torch.float32)
    assert torch.equal(exact.double(), w4a4_int_accum_ref(act, unit).double())
    y = cpu_w4a4_matmul(act, prepare_cpu(w), torch.bfloat16)
    assert rel_err(y, w4a4_matmul_ref(act, w, torch.bfloat16)) < 1e-2
    y32, ref32 = cpu_w4a4_matmul(act, prepare_cpu(w), torch.float32), w4a4_matmul_ref(act, w, torch.float32)
    if use_dot and "int" in features():  # integer path: the reference's epilogue, bit for bit
        assert torch.equal(y32, ref32)
    else:  # float32 sums of exact products: the reference up to rounding order, at the GEMV's M and the GEMM's
        torch.testing.assert_close(y32, ref32, rtol=1e-5, atol=1e-5)
        small = type(act)(act.codes[:5], act.scale[:5], act.zero[:5], act.rowsum[:5])
        torch.testing.assert_close(cpu_w4a4_matmul(small, prepare_cpu(w), torch.float32), ref32[:5], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("sym", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpu_w4a4_linear_is_quantize_then_matmul(sym, dtype, use_dot):
    n, k = 22, 300  # K: not a multiple of 32
    w = make_packed(4, n, k, None, True, torch.float32, seed=7, device="cpu")
    prepared = prepare_cpu(w)
    gen = torch.Generator().manual_seed(8)
    # VNNI: one fused call at every M (blocks of 8 tokens + a tail); portable: quantizer + dequant GEMM from M = 8
    for m in (1, 3, 11, DEQUANT_MIN_M_DOT, 2 * DEQUANT_MIN_M_DOT + 5):
        x = (torch.randn(m, 2 * k, generator=gen) * 2).to(dtype)[:, ::2]  # strided rows
        y = cpu_w4a4_linear(x, prepared, sym)
        assert y.dtype == dtype
        two_step = cpu_w4a4_matmul(cpu_quantize_activations(x, sym), prepared, dtype)
        assert torch.equal(y, two_step), m
        act = quantize_activations_ref(x, sym)
        assert rel_err(y, w4a4_matmul_ref(act, w, dtype)) < 1e-2, m
        if use_dot and "int" in features():  # exact integer sums and the reference's epilogue at any M
            assert torch.equal(y, w4a4_matmul_ref(act, w, dtype)), m


def test_library_builds_from_the_packaged_source_into_loaq_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("LOAQ_CACHE", str(tmp_path))
    cpu._library.cache_clear()
    try:
        cpu._library()
    finally:
        cpu._library.cache_clear()  # later tests load the library from the default cache again
    assert [p.name[:17] for p in tmp_path.glob("*.so")] == ["loaq_cpu_kernels_"]


def test_a_failing_c_call_raises_with_what_failed():
    w = prepare_cpu(make_packed(4, 8, 64, None, False, torch.float32, device="cpu"))
    bad = dataclasses.replace(w, bits=5)  # the C library refuses the width with return code 1
    x = torch.randn(DEQUANT_MIN_M, 64)
    with pytest.raises(RuntimeError, match=r"loaq_dequant failed: unsupported bit width \(code 1\)"):
        cpu_wna16_matmul(x, bad)
