"""Triton helpers shared by the kernels of :mod:`loaq.kernels.wna16`, :mod:`loaq.kernels.w4a4` and
:mod:`loaq.kernels.hadamard`: reading ``pack_kmajor`` codes, the grouped tile order, the per-token
4-bit activation quantizer (formulas of :mod:`loaq.kernels.w4a4_ref`) and its output buffers."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loaq.kernels.w4a4_ref import ActQuant

__all__ = ["load_codes", "tile_ids", "quantize_tile", "empty_act"]

_MAGIC = tl.constexpr(12582912.0)  # 1.5 * 2**23: (v + M) - M rounds fp32 |v| < 2**22 half-to-even


@triton.jit
def load_codes(q_ptr, k0, offs_n, mask_n, N, KP: tl.constexpr, BITS: tl.constexpr,
               BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unsigned codes of K tile ``k0`` of a ``pack_kmajor`` weight as [R, C, BLOCK_N], k = k0 + r*C + c.

    Each packed word is loaded once and expanded by broadcasting shifts: C = 32 // BITS
    for 2/4 bits (one word row per r), C = 16 for the 3-bit planes (two low-plane rows
    and one high-plane row per 32 values). Reshape to [BLOCK_K, BLOCK_N] for a ``tl.dot`` operand."""
    if BITS == 3:
        B32: tl.constexpr = BLOCK_K // 32
        blk = k0 // 32 + tl.arange(0, B32)
        valid = (blk * 32 < KP)[:, None] & mask_n[None, :]
        lo_rows = blk[:, None] * 3 + tl.arange(0, 2)[None, :]
        lo = tl.load(q_ptr + lo_rows[:, :, None] * N + offs_n[None, None, :], mask=valid[:, None, :], other=0)
        lo = (lo[:, :, None, :] >> (tl.arange(0, 16) * 2)[None, None, :, None]) & 3
        hi = tl.load(q_ptr + (blk * 3 + 2)[:, None] * N + offs_n[None, :], mask=valid, other=0)
        hi = (hi[:, None, :] >> tl.arange(0, 32)[None, :, None]) & 1
        codes = tl.reshape(lo, (2 * B32, 16, BLOCK_N)) | (tl.reshape(hi, (2 * B32, 16, BLOCK_N)) << 2)
    else:
        PF: tl.constexpr = 32 // BITS
        rows = k0 // PF + tl.arange(0, BLOCK_K // PF)
        mask = (rows * PF < KP)[:, None] & mask_n[None, :]
        word = tl.load(q_ptr + rows[:, None] * N + offs_n[None, :], mask=mask, other=0)
        codes = (word[:, None, :] >> (tl.arange(0, PF) * BITS)[None, :, None]) & ((1 << BITS) - 1)
    return codes


@triton.jit
def tile_ids(pid, M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """(row tile, column tile) of program ``pid`` in grouped order: GROUP_M row tiles sweep the columns
    together, so the weight tiles they share stay in L2."""
    grid_m = tl.cdiv(M, BLOCK_M)
    grid_n = tl.cdiv(N, BLOCK_N)
    width = GROUP_M * grid_n
    first_m = (pid // width) * GROUP_M
    rows = tl.minimum(grid_m - first_m, GROUP_M)
    return first_m + (pid % width) % rows, (pid % width) // rows


@triton.jit
def _round(v):
    return (v + _MAGIC) - _MAGIC


@triton.jit
def quantize_tile(x, mask, SYM: tl.constexpr):
    """Quantize one token held in any-shaped fp32 tile x; returns (codes, scale, zero)."""
    if SYM:
        amax = tl.max(tl.max(tl.reshape(tl.abs(x), (1, x.numel)), 1), 0)
        scale = tl.math.div_rn(amax, 7.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        q = tl.clamp(_round(tl.math.div_rn(x, scale)), -8.0, 7.0)
        zero = 0.0
    else:
        flat = tl.reshape(tl.where(mask, x, 0.0), (1, x.numel))
        lo = tl.minimum(tl.min(tl.min(flat, 1), 0), 0.0)
        hi = tl.maximum(tl.max(tl.max(flat, 1), 0), 0.0)
        scale = tl.math.div_rn(hi - lo, 15.0)
        scale = tl.where(scale == 0.0, 1.0, scale)
        z = _round(tl.math.div_rn(-lo, scale))
        q = tl.clamp(_round(tl.math.div_rn(x, scale)) + z, 0.0, 15.0) - 8.0
        zero = z - 8.0
    codes = tl.where(mask, q, 0.0).to(tl.int8)
    return codes, scale, zero


def empty_act(m: int, k: int, device: torch.device) -> ActQuant:
    """Uninitialized output buffers of the activation quantizer for x [m, k]."""
    return ActQuant(
        codes=torch.empty((m, k), device=device, dtype=torch.int8),
        scale=torch.empty(m, device=device, dtype=torch.float32),
        zero=torch.empty(m, device=device, dtype=torch.int32),
        rowsum=torch.empty(m, device=device, dtype=torch.int32),
    )
