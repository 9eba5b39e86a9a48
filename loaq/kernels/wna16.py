"""Triton weight-only GEMM, W{2,3,4}A16: ``y = x @ W.T`` with W in the ``pack_kmajor`` layout.

Checkpoint layout vs kernel layout: see :mod:`loaq.kernels.layout`. :func:`prepare_wna16`
repacks once at load time; :func:`wna16_matmul` is the per-call entry point.

K is a compile-time constant (one per layer shape): besides letting the compiler
unroll, it keeps the K loop's trip count a Python int under ``TRITON_INTERPRET=1``,
whose runtime-bounded loops fail with NumPy >= 2.4.

Regimes picked by M in :func:`_config`:

* M <= GEMV_MAX_M, ``_gemv_kernel``: one token per program, fp32 FMAs on CUDA cores,
  split-K over programs (fp32 atomics) so that enough programs stream the weight;
* M <= 16, ``_wna16_kernel`` with BLOCK_M = 16 and split-K (tensor cores);
* 16 < M < DEQUANT_MIN_M: ``_wna16_kernel`` with 2-D tiles in grouped order,
  dequantized weight tiles fed to ``tl.dot``;
* M >= DEQUANT_MIN_M (prefill, compute-bound): ``_dequant_kernel`` writes ``W.T`` to a
  per-call workspace (N·K·2 bytes, freed after the call; nothing cached) and cuBLAS
  runs the GEMM; the dequantization adds ~20-25% to the GEMM's time at M = 2048.

Packed words are loaded once per tile and expanded by broadcast shifts
(:func:`loaq.kernels.triton_common.load_codes`). A K tile
lies inside one quantization group (BLOCK_K divides the group size), so in the dot
kernel the tile is ``dot(x, u - uz)`` in exact small integers and the group's scale
multiplies the fp32 partial sum once per tile.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loaq.kernels.layout import PackedLinear, pack_kmajor, unpack_codes, unpack_zero_points
from loaq.kernels.triton_common import load_codes, tile_ids

__all__ = ["WNA16Weight", "prepare_wna16", "wna16_matmul", "dequantize_kmajor", "GEMV_MAX_M", "DEQUANT_MIN_M"]

GEMV_MAX_M = 2  # up to this many tokens: CUDA-core GEMV, one token per program
DEQUANT_MIN_M = 128  # from this many tokens: dequantize into a workspace, then cuBLAS
GEMV_TILE = dict(BLOCK_N=64, num_warps=2, num_stages=3, programs_per_sm=4)  # H100 sweep (kernels.md)


@dataclass(frozen=True)
class WNA16Weight:
    """Kernel-ready weight: ``qweight`` int32 [Kp*bits/32, N], ``scales``/``zeros`` [G, N]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor | None  # unsigned zero points, int32; None when symmetric
    bits: int
    n: int
    k: int
    group_size: int  # 0 when per-channel


def prepare_wna16(w: PackedLinear) -> WNA16Weight:
    """One-time repack of checkpoint tensors into the kernel layout."""
    n, k = w.shape
    g = w.weight_scale.shape[1]
    codes = unpack_codes(w.weight_packed, w.bits, k)
    zeros = None
    if w.weight_zero_point is not None:
        zeros = unpack_zero_points(w.weight_zero_point, w.bits, n, g).t().contiguous()
        zeros = zeros.to(w.weight_packed.device)
    return WNA16Weight(
        qweight=pack_kmajor(codes, w.bits),
        scales=w.weight_scale.t().contiguous(),
        zeros=zeros,
        bits=w.bits,
        n=n,
        k=k,
        group_size=w.group_size or 0,
    )


@triton.jit
def _gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr,
    N, stride_xm, stride_ym,
    K: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_ZP: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    """One token per program (grid axis 2): fp32 FMAs on CUDA cores, no tensor cores.

    Per weight: shift, mask|magic (one LOP3), subtract, FMA; the tile (one group) is
    reduced over K and scaled once per output channel."""
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.program_id(2)
    C: tl.constexpr = 16 if BITS == 3 else 32 // BITS
    R: tl.constexpr = BLOCK_K // C
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_kx = tl.arange(0, R)[:, None] * C + tl.arange(0, C)[None, :]
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        t = i * SPLIT_K + pid_k
        k0 = t * BLOCK_K
        x = tl.load(x_ptr + m * stride_xm + k0 + offs_kx, mask=k0 + offs_kx < K, other=0.0)
        codes = load_codes(q_ptr, k0, offs_n, mask_n, N, KP, BITS, BLOCK_K, BLOCK_N)
        g = k0 // GROUP_SIZE
        mask_g = mask_n & (k0 < K)
        scale = tl.load(s_ptr + g * N + offs_n, mask=mask_g, other=0.0).to(tl.float32)
        if HAS_ZP:
            zero = tl.load(z_ptr + g * N + offs_n, mask=mask_g, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        # int -> float without the quarter-rate I2F: 0x4B000000 | u is the fp32 2**23 + u
        f = (codes | 0x4B000000).to(tl.float32, bitcast=True) - (zero + 8388608.0)[None, None, :]
        acc += tl.sum(tl.sum(x.to(tl.float32)[:, :, None] * f, 1), 0) * scale
    y = acc
    out = y_ptr + m * stride_ym + offs_n
    if SPLIT_K == 1:
        tl.store(out, y.to(y_ptr.dtype.element_ty), mask=mask_n)
    else:
        tl.atomic_add(out, y, mask=mask_n)


@triton.jit
def _dequant_kernel(
    q_ptr, s_ptr, z_ptr, out_ptr, N,
    K: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr,
    HAS_ZP: tl.constexpr, INT8: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """Unpack to a dense workspace: ``W.T = (u - uz) * s`` [K, N], or with INT8 ``u - 2**(b-1)`` [N, K]."""
    k0 = tl.program_id(0) * BLOCK_K
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_n = offs_n < N
    offs_k = k0 + tl.arange(0, BLOCK_K)
    codes = tl.reshape(load_codes(q_ptr, k0, offs_n, mask_n, N, KP, BITS, BLOCK_K, BLOCK_N), (BLOCK_K, BLOCK_N))
    if INT8:  # [N, K], K-contiguous: 8-bit tensor-core operands must be K-major
        w = (codes - (1 << (BITS - 1))).to(tl.int8)
        tl.store(out_ptr + offs_n[None, :] * K + offs_k[:, None], w,
                 mask=(offs_k < K)[:, None] & mask_n[None, :])
    else:
        g = k0 // GROUP_SIZE
        scale = tl.load(s_ptr + g * N + offs_n, mask=mask_n, other=0.0).to(tl.float32)
        if HAS_ZP:
            zero = tl.load(z_ptr + g * N + offs_n, mask=mask_n, other=0).to(tl.float32)
        else:
            zero = tl.full((BLOCK_N,), 1 << (BITS - 1), tl.float32)
        w = ((codes.to(tl.float32) - zero[None, :]) * scale[None, :]).to(out_ptr.dtype.element_ty)
        tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w, mask=(offs_k < K)[:, None] & mask_n[None, :])


def dequantize_kmajor(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor | None, bits: int,
                      n: int, k: int, group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """Dense ``W.T`` [K, N] in ``dtype``; for ``torch.int8`` the signed codes ``u - 2**(bits-1)`` as [N, K]."""
    out = torch.empty((n, k) if dtype == torch.int8 else (k, n), device=qweight.device, dtype=dtype)
    block_n, block_k = 64, _block_k(64, group_size)
    grid = (triton.cdiv(k, block_k), triton.cdiv(n, block_n))
    _dequant_kernel[grid](
        qweight, scales, zeros if zeros is not None else scales, out, n,
        K=k, KP=qweight.shape[0] * 32 // bits, BITS=bits, GROUP_SIZE=group_size or 1 << 30,
        HAS_ZP=zeros is not None, INT8=dtype == torch.int8, BLOCK_N=block_n, BLOCK_K=block_k,
    )
    return out


@triton.jit
def _wna16_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, y_ptr,
    M, N, stride_xm, stride_ym,
    K: tl.constexpr, KP: tl.constexpr, BITS: tl.constexpr, GROUP_SIZE: tl.constexpr, HAS_ZP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr, UPCAST: tl.constexpr,
    MAGIC16: tl.constexpr, MAGIC16_VALUE: tl.constexpr,
):
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    pid_m, pid_n = tile_ids(pid, M, N, BLOCK_M, BLOCK_N, GROUP_M)

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i in range(0, tl.cdiv(K, BLOCK_K * SPLIT_K)):
        t = i * SPLIT_K + pid_k
        offs_k = t * BLOCK_K + tl.arange(0, BLOCK_K)
        x = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :],
            mask=mask_m[:, None] & (offs_k[None, :] < K), other=0.0,
        )
        codes = tl.reshape(load_codes(q_ptr, t * BLOCK_K, offs_n, mask_n, N, KP, BITS, BLOCK_K, BLOCK_N),
                           (BLOCK_K, BLOCK_N))
        g = (t * BLOCK_K) // GROUP_SIZE
        mask_g = mask_n & (t * BLOCK_K < K)  # a split's last tile may lie past K
        if HAS_ZP:
            zero = tl.load(z_ptr + g * N + offs_n, mask=mask_g, other=0)
        else:
            zero = 1 << (BITS - 1)
        scale = tl.load(s_ptr + g * N + offs_n, mask=mask_g, other=0.0).to(tl.float32)
        if UPCAST:
            w = (codes - zero).to(tl.float32)
            acc += tl.dot(x.to(tl.float32), w, input_precision="ieee") * scale[None, :]
        else:
            # u | 0x6400 is the fp16 1024 + u, u | 0x4300 the bf16 128 + u: no I2F needed
            c16 = (codes.to(tl.int16) | MAGIC16).to(x.dtype, bitcast=True)
            if HAS_ZP:
                w = c16 - (zero + MAGIC16_VALUE).to(tl.float32).to(x.dtype)[None, :]
            else:
                w = c16 - (MAGIC16_VALUE + (1 << (BITS - 1)))
            acc += tl.dot(x, w) * scale[None, :]
    out = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
    mask = mask_m[:, None] & mask_n[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(y_ptr.dtype.element_ty), mask=mask)
    else:
        tl.atomic_add(out, acc, mask=mask)


def _interpreting() -> bool:
    """Triton's interpreter computes bf16 ``tl.dot`` wrongly; it then runs in fp32."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def _block_k(cap: int, group: int) -> int:
    """Largest power of two <= cap dividing the group size (any, per-channel)."""
    return cap if group == 0 else min(cap, group & -group)


def _split_k(programs: int, k_tiles: int, per_sm: int = 4) -> int:
    """Enough programs for ``per_sm`` per SM (2-way under the interpreter, for coverage)."""
    if not torch.cuda.is_available():
        return min(2, k_tiles)
    sms = torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count
    return max(1, min(k_tiles, per_sm * sms // programs))


def _config(m: int, n: int, k: int, group: int) -> dict:
    """Kernel and tile sizes by regime (tuned on H100, see benchmarks/results/kernels.md)."""
    if m <= GEMV_MAX_M:
        block_n, block_k = GEMV_TILE["BLOCK_N"], _block_k(128, group)
        split_k = _split_k(triton.cdiv(n, block_n) * m, triton.cdiv(k, block_k), GEMV_TILE["programs_per_sm"])
        return dict(KERNEL="gemv", BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k,
                    num_warps=GEMV_TILE["num_warps"], num_stages=GEMV_TILE["num_stages"])
    if m <= 16:
        block_n, block_k = 64, _block_k(128, group)
        split_k = _split_k(triton.cdiv(n, block_n), triton.cdiv(k, block_k))
        return dict(KERNEL="dot", BLOCK_M=16, BLOCK_N=block_n, BLOCK_K=block_k, SPLIT_K=split_k, GROUP_M=1,
                    num_warps=4, num_stages=4)
    if m >= DEQUANT_MIN_M:
        return dict(KERNEL="dequant")
    block_m = 64 if m <= 64 else 128
    return dict(KERNEL="dot", BLOCK_M=block_m, BLOCK_N=128, BLOCK_K=_block_k(64, group), SPLIT_K=1, GROUP_M=8,
                num_warps=4 if block_m == 64 else 8, num_stages=4)


def wna16_matmul(x: torch.Tensor, w: WNA16Weight, config: dict | None = None) -> torch.Tensor:
    """``x @ W.T`` for x [..., K] in fp16/bf16; returns [..., N] in x.dtype."""
    if x.shape[-1] != w.k:
        raise ValueError(f"x has K={x.shape[-1]}, weight has K={w.k}")
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise ValueError(f"the Triton WNA16 kernel takes fp16 or bf16 activations, got {x.dtype}")
    x2 = x.reshape(-1, w.k)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    m = x2.shape[0]
    cfg = dict(config or _config(m, w.n, w.k, w.group_size))
    kernel = cfg.pop("KERNEL")
    if kernel == "dequant":
        wt = dequantize_kmajor(w.qweight, w.scales, w.zeros, w.bits, w.n, w.k, w.group_size, x.dtype)
        return (x2 @ wt).reshape(*x.shape[:-1], w.n)
    if w.group_size % cfg["BLOCK_K"] != 0:
        raise ValueError(f"BLOCK_K={cfg['BLOCK_K']} does not divide the group size {w.group_size}")
    split_k = cfg["SPLIT_K"]
    if split_k == 1:
        y = torch.empty((m, w.n), device=x.device, dtype=x.dtype)
    else:
        y = torch.zeros((m, w.n), device=x.device, dtype=torch.float32)
    args = (x2, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, y)
    meta = dict(K=w.k, KP=w.qweight.shape[0] * 32 // w.bits, BITS=w.bits, GROUP_SIZE=w.group_size or 1 << 30,
                HAS_ZP=w.zeros is not None)
    if kernel == "gemv":
        grid = (triton.cdiv(w.n, cfg["BLOCK_N"]), split_k, m)
        _gemv_kernel[grid](*args, w.n, x2.stride(0), y.stride(0), **meta, **cfg)
    else:
        grid = (triton.cdiv(m, cfg["BLOCK_M"]) * triton.cdiv(w.n, cfg["BLOCK_N"]), split_k)
        _wna16_kernel[grid](*args, m, w.n, x2.stride(0), y.stride(0), **meta,
                            UPCAST=_interpreting() and x.dtype == torch.bfloat16,
                            MAGIC16=0x6400 if x.dtype == torch.float16 else 0x4300,
                            MAGIC16_VALUE=1024 if x.dtype == torch.float16 else 128, **cfg)
    return y.to(x.dtype).reshape(*x.shape[:-1], w.n)
