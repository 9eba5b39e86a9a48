"""Triton W{2,3,4}A16 GEMM against the dequantize-then-matmul reference.

Tolerance: the kernel accumulates ``x · (u - uz)`` exactly-rounded in fp32 and
scales once per group, while the reference rounds the dequantized weight and the
output to the activation dtype. Both stay within a few units of the dtype's eps
(fp16 2**-11, bf16 2**-8) of max |y|: 3e-3 for fp16, 2e-2 for bf16. A wrong bit,
shift, group or zero point gives errors of order 1.
"""

import pytest
import torch

from loaq.kernels.wna16 import DEQUANT_MIN_M, prepare_wna16, wna16_matmul
from loaq.kernels.wna16_ref import wna16_matmul_ref
from tests.kernels.helpers import DEVICE, make_packed, rel_err

TOL = {torch.float16: 3e-3, torch.bfloat16: 2e-2}


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group", [None, 32, 64, 128])
@pytest.mark.parametrize("asym", [False, True])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_wna16_matches_reference(bits, group, asym, dtype):
    n, k = 40, 224  # N not a multiple of BLOCK_N, K not of 32 * BLOCK_K; 224 % 128 != 0
    if group == 128:
        k = 256 + 96  # a partial last group
    w = make_packed(bits, n, k, group, asym, dtype, seed=bits)
    prepared = prepare_wna16(w)
    gen = torch.Generator().manual_seed(1)
    for m in (1, 2, 7, 33, DEQUANT_MIN_M):  # GEMV, split-K decode, 2-D tiles, dequant + matmul
        x = torch.randn(m, k, generator=gen).to(device=DEVICE, dtype=dtype)
        y = wna16_matmul(x, prepared)
        assert y.dtype == dtype and y.shape == (m, n)
        assert rel_err(y, wna16_matmul_ref(x, w)) < TOL[dtype], (m, rel_err(y, wna16_matmul_ref(x, w)))


def test_wna16_accepts_batched_input_and_explicit_config():
    w = make_packed(4, 64, 128, 32, False, torch.float16)
    prepared = prepare_wna16(w)
    x = torch.randn(2, 3, 128).to(device=DEVICE, dtype=torch.float16)
    for cfg in (
        dict(KERNEL="dot", BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=3, GROUP_M=1, num_warps=4,
             num_stages=2),
        dict(KERNEL="gemv", BLOCK_N=32, BLOCK_K=32, SPLIT_K=1, num_warps=4, num_stages=2),
        dict(KERNEL="dequant"),
    ):
        y = wna16_matmul(x, prepared, config=cfg)
        assert rel_err(y, wna16_matmul_ref(x, w)) < TOL[torch.float16], cfg["KERNEL"]
