"""Triton W4A4: fused per-token 4-bit activation quantizer and int8-tensor-core GEMM.

Semantics are those of :mod:`loaq.kernels.w4a4_ref` (read its docstring for the
quantizer formulas and the exact zero-point correction). Weights use the 4-bit
``pack_kmajor`` layout; codes are unpacked to signed int8 in registers, activation
codes are stored as int8 (one per byte). For M >= INT8_WORKSPACE_MIN_M the weight
is first unpacked into a per-call int8 [N, K] workspace so that both ``tl.dot``
operands stream through shared memory (nothing is cached between calls). ``tl.dot`` accumulates in int32, which is
exact: |a·b| <= 64 per term, so |acc| < 2**31 for any K < 3.3e7.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loaq.kernels.layout import PackedLinear, pack_kmajor, unpack_codes, unpack_zero_points
from loaq.kernels.w4a4_ref import ActQuant
from loaq.kernels.triton_common import empty_act, load_codes, quantize_tile, tile_ids
from loaq.kernels.wna16 import dequantize_kmajor

__all__ = ["W4A4Weight", "prepare_w4a4", "quantize_activations", "w4a4_matmul"]

INT8_WORKSPACE_MIN_M = 128  # from here: unpack weights to an int8 workspace, both operands via smem
PREFILL_CONFIG = dict(BLOCK_M=128, BLOCK_N=256, BLOCK_K=128, GROUP_M=8, B_INT8=True,
                      num_warps=8, num_stages=3)  # H100 sweep, benchmarks/results/kernels.md


@dataclass(frozen=True)
class W4A4Weight:
    """Kernel-ready 4-bit per-channel weight."""

    qweight: torch.Tensor  # int32 [Kp/8, N], pack_kmajor
    scale: torch.Tensor  # fp32 [N]
    zero: torch.Tensor  # int32 [N], signed zero point (0 when symmetric)
    colsum: torch.Tensor  # int32 [N], sum over K of the signed codes
    n: int
    k: int


def prepare_w4a4(w: PackedLinear) -> W4A4Weight:
    """One-time repack of a 4-bit per-channel checkpoint weight."""
    if w.bits != 4 or w.weight_scale.shape[1] != 1:
        raise ValueError(f"W4A4 needs 4-bit per-channel weights, got {w.bits}-bit with group_size {w.group_size}")
    n, k = w.shape
    codes = unpack_codes(w.weight_packed, 4, k)
    zero = unpack_zero_points(w.weight_zero_point, 4, n, 1)[:, 0].to(codes.device) - 8
    return W4A4Weight(
        qweight=pack_kmajor(codes, 4),
        scale=w.weight_scale[:, 0].float().contiguous(),
        zero=zero.to(torch.int32).contiguous(),
        colsum=(codes - 8).sum(-1, dtype=torch.int32),
        n=n,
        k=k,
    )


@triton.jit
def _act_quant_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, r_ptr, stride_x,
    K: tl.constexpr, BLOCK: tl.constexpr, SYM: tl.constexpr,
):
    row = tl.program_id(0)
    offs = tl.arange(0, BLOCK)
    mask = offs < K
    x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
    codes, scale, zero = quantize_tile(x, mask, SYM)
    tl.store(q_ptr + row * K + offs, codes, mask=mask)
    tl.store(s_ptr + row, scale)
    tl.store(z_ptr + row, zero.to(tl.int32))
    tl.store(r_ptr + row, tl.sum(codes.to(tl.int32), 0))


def quantize_activations(x: torch.Tensor, sym: bool) -> ActQuant:
    """Per-token 4-bit quantization of x [M, K] (any float dtype)."""
    m, k = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    out = empty_act(m, k, x.device)
    block = triton.next_power_of_2(k)
    _act_quant_kernel[(m,)](
        x, out.codes, out.scale, out.zero, out.rowsum, x.stride(0),
        K=k, BLOCK=block, SYM=sym, num_warps=min(16, max(1, block // 512)),
    )
    return out


@triton.jit
def _w4a4_kernel(
    a_ptr, q_ptr, sx_ptr, zx_ptr, rx_ptr, sw_ptr, zw_ptr, cw_ptr, y_ptr,
    M, N, stride_ym,
    K: tl.constexpr, KP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    B_INT8: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_m, pid_n = tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
    for i in range(0, tl.cdiv(K, BLOCK_K)):
        offs_k = i * BLOCK_K + tl.arange(0, BLOCK_K)
        a = tl.load(a_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=mask_m[:, None] & (offs_k[None, :] < K), other=0)
        if B_INT8:  # q_ptr is the int8 [N, K] workspace of signed codes
            b = tl.load(q_ptr + offs_n[None, :] * K + offs_k[:, None],
                        mask=(offs_k[:, None] < K) & mask_n[None, :], other=0)
        else:
            codes = tl.reshape(load_codes(q_ptr, i * BLOCK_K, offs_n, mask_n, N, KP, 4, BLOCK_K, BLOCK_N),
                               (BLOCK_K, BLOCK_N))
            b = (codes - 8).to(tl.int8)
        acc += tl.dot(a, b, out_dtype=tl.int32)

    zx = tl.load(zx_ptr + offs_m, mask=mask_m, other=0)
    rx = tl.load(rx_ptr + offs_m, mask=mask_m, other=0)
    zw = tl.load(zw_ptr + offs_n, mask=mask_n, other=0)
    cw = tl.load(cw_ptr + offs_n, mask=mask_n, other=0)
    acc = acc - zw[None, :] * rx[:, None] - zx[:, None] * cw[None, :] + K * zx[:, None] * zw[None, :]
    sx = tl.load(sx_ptr + offs_m, mask=mask_m, other=0.0)
    sw = tl.load(sw_ptr + offs_n, mask=mask_n, other=0.0)
    y = acc.to(tl.float32) * sx[:, None] * sw[None, :]
    tl.store(y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :], y.to(y_ptr.dtype.element_ty),
             mask=mask_m[:, None] & mask_n[None, :])


def _config(m: int) -> dict:
    if m <= 64:
        return dict(BLOCK_M=max(16, triton.next_power_of_2(m)), BLOCK_N=64, BLOCK_K=128,
                    GROUP_M=1, num_warps=4, num_stages=4)
    if m < INT8_WORKSPACE_MIN_M:
        return dict(BLOCK_M=128, BLOCK_N=128, BLOCK_K=64, GROUP_M=8, num_warps=4, num_stages=4)
    return dict(PREFILL_CONFIG)


def w4a4_matmul(act: ActQuant, w: W4A4Weight, out_dtype: torch.dtype, config: dict | None = None) -> torch.Tensor:
    """``y [M, N]`` from quantized activations and a prepared 4-bit weight."""
    m, k = act.codes.shape
    if k != w.k:
        raise ValueError(f"activations have K={k}, weight has K={w.k}")
    cfg = dict(config or _config(m))
    qweight = w.qweight
    if cfg.setdefault("B_INT8", False):
        qweight = dequantize_kmajor(w.qweight, w.scale, None, 4, w.n, w.k, 0, torch.int8)
    y = torch.empty((m, w.n), device=act.codes.device, dtype=out_dtype)
    grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(w.n, cfg["BLOCK_N"]),)
    _w4a4_kernel[grid](
        act.codes, qweight, act.scale, act.zero, act.rowsum, w.scale, w.zero, w.colsum, y,
        m, w.n, y.stride(0), K=k, KP=w.qweight.shape[0] * 8, **cfg,
    )
    return y
