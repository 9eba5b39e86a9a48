"""Triton online Hadamard transform, alone or fused with the W4A4 activation quantizer.

Semantics of :mod:`loaq.kernels.hadamard_ref`. One program per token: the row is
held as a ``[KP, P]`` fp32 tile (``P = 2**m``, ``KP`` = K padded to a power of two
>= 16 for ``tl.dot``); ``m`` butterfly stages run along P in registers, then the
stored K×K matrix (zero-padded to KP×KP) is applied with an fp32 ``tl.dot``, and
the result is scaled by ``1/sqrt(n)``. The fused kernel quantizes that tile
directly (formulas of :mod:`loaq.kernels.w4a4_ref`), so the rotated activations
never go to memory.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from loaq.kernels.triton_common import empty_act, quantize_tile
from loaq.kernels.w4a4_ref import ActQuant

__all__ = ["hadamard_transform", "hadamard_quantize"]


@triton.jit
def _hadamard_tile(x_ptr, h_ptr, row_stride, K_HAD: tl.constexpr, KP: tl.constexpr,
                   P: tl.constexpr, LOG_P: tl.constexpr, INV_SQRT_N: tl.constexpr):
    """Transformed row as an fp32 [KP, P] tile, and its validity mask."""
    row = tl.program_id(0)
    r = tl.arange(0, KP)
    c = tl.arange(0, P)
    mask = (r[:, None] < K_HAD) & (c[None, :] < P)
    x = tl.load(x_ptr + row * row_stride + r[:, None] * P + c[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    for s in tl.static_range(LOG_P):
        y = tl.permute(tl.reshape(x, (KP, P // (2 << s), 2, 1 << s)), (0, 1, 3, 2))
        a, b = tl.split(y)
        y = tl.permute(tl.join(a + b, a - b), (0, 1, 3, 2))
        x = tl.reshape(y, (KP, P))
    if K_HAD > 1:
        hk = tl.load(h_ptr + r[:, None] * K_HAD + r[None, :],
                     mask=(r[:, None] < K_HAD) & (r[None, :] < K_HAD), other=0.0)
        x = tl.dot(hk.to(tl.float32), x, input_precision="ieee")
    return x * INV_SQRT_N, mask


@triton.jit
def _hadamard_kernel(x_ptr, h_ptr, y_ptr, row_stride,
                     K_HAD: tl.constexpr, KP: tl.constexpr, P: tl.constexpr, LOG_P: tl.constexpr,
                     INV_SQRT_N: tl.constexpr):
    x, mask = _hadamard_tile(x_ptr, h_ptr, row_stride, K_HAD, KP, P, LOG_P, INV_SQRT_N)
    row = tl.program_id(0)
    offs = tl.arange(0, KP)[:, None] * P + tl.arange(0, P)[None, :]
    tl.store(y_ptr + row * K_HAD * P + offs, x.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _hadamard_quant_kernel(x_ptr, h_ptr, q_ptr, s_ptr, z_ptr, r_ptr, row_stride,
                           K_HAD: tl.constexpr, KP: tl.constexpr, P: tl.constexpr,
                           LOG_P: tl.constexpr, INV_SQRT_N: tl.constexpr, SYM: tl.constexpr):
    x, mask = _hadamard_tile(x_ptr, h_ptr, row_stride, K_HAD, KP, P, LOG_P, INV_SQRT_N)
    codes, scale, zero = quantize_tile(x, mask, SYM)
    row = tl.program_id(0)
    offs = tl.arange(0, KP)[:, None] * P + tl.arange(0, P)[None, :]
    tl.store(q_ptr + row * K_HAD * P + offs, codes, mask=mask)
    tl.store(s_ptr + row, scale)
    tl.store(z_ptr + row, zero.to(tl.int32))
    tl.store(r_ptr + row, tl.sum(tl.sum(codes.to(tl.int32), 1), 0))


def _launch_args(x: torch.Tensor, had_k: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, dict]:
    n = x.shape[-1]
    k = 1 if had_k is None else had_k.shape[0]
    p = n // k
    if n % k != 0 or p & (p - 1) != 0:
        raise ValueError(f"n={n} is not K * 2**m with K={k}")
    if x.stride(-1) != 1 or x.stride(0) != n:
        x = x.contiguous()
    h = x if had_k is None else had_k.to(device=x.device, dtype=torch.float32).contiguous()
    kp = 1 if k == 1 else max(16, triton.next_power_of_2(k))
    meta = dict(K_HAD=k, KP=kp, P=p, LOG_P=int(math.log2(p)), INV_SQRT_N=1.0 / math.sqrt(n),
                num_warps=min(16, max(1, kp * p // 1024)))
    return x, h, meta


def hadamard_transform(x: torch.Tensor, had_k: torch.Tensor | None = None) -> torch.Tensor:
    """Normalized Walsh–Hadamard transform of the last dim of x [M, n], n = K * 2**m."""
    x, h, meta = _launch_args(x, had_k)
    y = torch.empty_like(x)
    _hadamard_kernel[(x.shape[0],)](x, h, y, x.stride(0), **meta)
    return y


def hadamard_quantize(x: torch.Tensor, had_k: torch.Tensor | None, sym: bool) -> ActQuant:
    """``quantize_activations(hadamard_transform(x, had_k), sym)`` in one kernel."""
    x, h, meta = _launch_args(x, had_k)
    out = empty_act(x.shape[0], x.shape[1], x.device)
    _hadamard_quant_kernel[(x.shape[0],)](
        x, h, out.codes, out.scale, out.zero, out.rowsum, x.stride(0), SYM=sym, **meta)
    return out
