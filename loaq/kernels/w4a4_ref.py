"""Reference for W4A4: per-token dynamic 4-bit activation quantization + integer GEMM.

Activation quantizer (per row of x, computed in fp32, round half to even):

* sym  (QuaRot):  ``scale = max|x| / 7``, ``q = clamp(round(x / scale), -8, 7)``
  (the range is effectively [-7, 7]), ``zero = 0``;
* asym (min-max): ``lo = min(x, 0)``, ``hi = max(x, 0)``, ``scale = (hi - lo) / 15``,
  ``z = round(-lo / scale)``, ``q = clamp(round(x / scale) + z, 0, 15)``.

An all-zero row gets ``scale = 1``. Every division is IEEE-rounded (the Triton kernel
uses ``div_rn``), so kernel and reference agree bit for bit on CPU and GPU. Both are returned as signed int8 codes ``a`` and a
signed zero ``za`` with ``x ≈ (a - za) * scale``: sym ``a = q, za = 0``; asym
``a = q - 8, za = z - 8`` so that ``a`` fits int8 tensor-core operands.
A quantizer that simulates W4A4 should fake-quantize with exactly these formulas.

Weights: 4-bit per-channel (``weight_scale`` [N, 1]); ``b = u - 8`` is the signed
checkpoint code and ``zb`` the signed zero point (0 if symmetric). Then, exactly in
integers, with ``ra = sum_k a`` (per token) and ``cb = sum_k b`` (per channel)::

    sum_k (a - za)(b - zb) = a @ b.T - zb * ra - za * cb + K * za * zb

and ``y = float32(that) * scale_x * scale_w``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from loaq.kernels.layout import PackedLinear, unpack_codes, unpack_zero_points

__all__ = ["ActQuant", "quantize_activations_ref", "w4a4_matmul_ref", "w4a4_int_accum_ref"]


@dataclass(frozen=True)
class ActQuant:
    """Per-token 4-bit activations: ``x ≈ (codes - zero) * scale`` row-wise."""

    codes: torch.Tensor  # int8 [M, K], in [-8, 7]
    scale: torch.Tensor  # fp32 [M]
    zero: torch.Tensor  # int32 [M], signed (0 when symmetric)
    rowsum: torch.Tensor  # int32 [M], sum of codes over K


def quantize_activations_ref(x: torch.Tensor, sym: bool) -> ActQuant:
    """Quantize each row of x [M, K] to 4 bits; see the module docstring."""
    x = x.float()
    if sym:
        scale = _div(x.abs().amax(-1), 7)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        q = torch.clamp(torch.round(x / scale[:, None]), -8, 7)
        zero = torch.zeros_like(scale)
    else:
        lo = x.amin(-1).clamp(max=0)
        hi = x.amax(-1).clamp(min=0)
        scale = _div(hi - lo, 15)
        scale = torch.where(scale == 0, torch.ones_like(scale), scale)
        z = torch.round(-lo / scale)
        q = torch.clamp(torch.round(x / scale[:, None]) + z[:, None], 0, 15) - 8
        zero = z - 8
    codes = q.to(torch.int8)
    return ActQuant(codes, scale, zero.to(torch.int32), codes.sum(-1, dtype=torch.int32))


def _div(t: torch.Tensor, d: float) -> torch.Tensor:
    """IEEE ``t / d``: CUDA torch turns a scalar divisor into a reciprocal multiply."""
    return t / torch.full_like(t, d)


def _signed_weight(w: PackedLinear) -> tuple[torch.Tensor, torch.Tensor]:
    """Signed codes b [N, K] and signed zero points zb [N] (per-channel 4-bit only)."""
    n, k = w.shape
    b = unpack_codes(w.weight_packed, 4, k) - 8
    zb = unpack_zero_points(w.weight_zero_point, 4, n, 1)[:, 0].to(b.device) - 8
    return b, zb


def w4a4_int_accum_ref(act: ActQuant, w: PackedLinear) -> torch.Tensor:
    """Exact ``sum_k (a - za)(b - zb)`` as int64 [M, N]."""
    b, zb = _signed_weight(w)
    a = act.codes.long() - act.zero.long()[:, None]
    b = b.long() - zb.long()[:, None]
    if a.is_cuda:  # no int64 matmul on CUDA; float64 is exact for |sums| < 2**53
        return (a.double() @ b.double().t()).round().long()
    return a @ b.t()


def w4a4_matmul_ref(act: ActQuant, w: PackedLinear, out_dtype: torch.dtype) -> torch.Tensor:
    """``y [M, N] = int_accum * scale_x * scale_w`` (fp32 epilogue, then ``out_dtype``)."""
    acc = w4a4_int_accum_ref(act, w).to(torch.float32)
    y = acc * act.scale[:, None] * w.weight_scale[:, 0].float()[None, :]
    return y.to(out_dtype)
