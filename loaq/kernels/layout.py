"""Weight layouts: the compressed-tensors export format and the kernel layouts.

Checkpoint (``pack-quantized``, compressed-tensors 0.17.0 ``pack_to_int32``)::

    weight_packed      int32 [N, ceil(K / pf)]   pf = 32 // bits values per word,
                       value k of row n at bits (k % pf) * bits of word k // pf,
                       stored as the unsigned code u = q + 2**(bits-1), 0..2**bits-1
                       (3 bits: 10 values per word, the top 2 bits unused)
    weight_scale       [N, G]        G = ceil(K / group_size), or G = 1 per channel
    weight_zero_point  int32 [ceil(N / pf), G]  (asymmetric only) the signed zero
                       point, offset and packed the same way along the output dim

    W[n, k] = (q - zp) * scale = (u - uz) * scale,  uz = zp + 2**(bits-1)
    (symmetric: zp = 0, so uz = 2**(bits-1)).

Kernel layouts, built once at load time:

* GPU, ``pack_kmajor``: int32 ``[Kp * bits / 32, N]``, K padded to a multiple of 32,
  contiguous along N so a tile ``[BLOCK_K, BLOCK_N]`` is a coalesced row load.
  2 and 4 bits: value k at bits ``(k * bits) % 32`` of row ``k * bits // 32``.
  3 bits (aligned bit planes, exactly 3 bits per value): every 32 values of K
  take 3 rows, ``3*(k//32) + 0..1`` hold the low 2 bits of values ``16*j..16*j+15``
  (2 bits each, like the 2-bit layout) and row ``3*(k//32) + 2`` holds the high bit
  of all 32 values (bit ``k % 32``). No value straddles a word.
* CPU, ``pack_lanes``: int32 ``[N, Kp / pf]`` (pf = 8, 10, 16 for 4, 3, 2 bits),
  K padded to a multiple of 16 * pf. Each 16-bit half of a word holds ``h = 16 // bits``
  values (4, 5, 8). Row n is a series of blocks of 16 words; word ``l`` of block ``B``
  holds value ``k = B*16*pf + 32*t + 2*l + half`` at bits ``16*half + t*bits``
  (t < h). One SIMD load of 16 words then yields, per shift t, the codes of 32
  consecutive k as 16 pairs: each 32-bit lane holds k = 2l in its low and k = 2l+1 in
  its high half, the order of 32 contiguous bf16 (or int16) activations, which is what
  pairwise dot-product instructions (``vdpbf16ps``, ``vpdpwssd``) consume.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = [
    "PackedLinear",
    "pack_codes",
    "unpack_codes",
    "unpack_zero_points",
    "pack_kmajor",
    "unpack_kmajor",
    "pack_lanes",
    "unpack_lanes",
]


@dataclass(frozen=True)
class PackedLinear:
    """One linear layer's tensors exactly as a ``pack-quantized`` checkpoint holds them."""

    weight_packed: torch.Tensor
    weight_scale: torch.Tensor
    weight_zero_point: torch.Tensor | None
    bits: int
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    group_size: int | None = None  # quantization_config's group_size; None = per channel

    def __post_init__(self) -> None:
        n, k = self.shape
        g = 1 if self.group_size is None else math.ceil(k / self.group_size)
        if tuple(self.weight_scale.shape) != (n, g):
            raise ValueError(
                f"weight_scale has shape {tuple(self.weight_scale.shape)}, expected {(n, g)} for "
                f"shape {self.shape} and group_size {self.group_size}"
            )


def pack_codes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """Checkpoint ``weight_packed`` from unsigned codes [N, K] (same bits as ``pack_to_int32``)."""
    n, k = codes.shape
    pf = 32 // bits
    u = torch.nn.functional.pad(codes.to(torch.int64), (0, -k % pf)).reshape(n, -1, pf)
    shifts = torch.arange(pf, device=codes.device, dtype=torch.int64) * bits
    return _to_int32((u << shifts).sum(-1))


def unpack_codes(weight_packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Unsigned codes ``u`` (int32 [N, K]) from the checkpoint's ``weight_packed``."""
    pf = 32 // bits
    shifts = torch.arange(pf, device=weight_packed.device, dtype=torch.int32) * bits
    u = (weight_packed.unsqueeze(-1) >> shifts) & ((1 << bits) - 1)
    return u.reshape(weight_packed.shape[0], -1)[:, :k]


def unpack_zero_points(zp_packed: torch.Tensor | None, bits: int, n: int, g: int) -> torch.Tensor:
    """Unsigned zero points ``uz`` (int32 [N, G]); ``2**(bits-1)`` when symmetric."""
    if zp_packed is None:
        return torch.full((n, g), 1 << (bits - 1), dtype=torch.int32)
    return unpack_codes(zp_packed.t(), bits, n).t().contiguous()


def pack_kmajor(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """GPU layout from unsigned codes [N, K]: int32 ``[ceil(K/32) * bits, N]``."""
    n, k = codes.shape
    kp = math.ceil(k / 32) * 32
    u = torch.nn.functional.pad(codes.to(torch.int64), (0, kp - k)).t().reshape(kp // 32, 32, n)
    if bits == 3:
        lo = _pack_rows((u & 3).reshape(kp // 16, 16, n), 2).reshape(kp // 32, 2, n)
        hi = _pack_rows(u >> 2, 1).reshape(kp // 32, 1, n)
        words = torch.cat([lo, hi], dim=1)
    else:
        words = _pack_rows(u.reshape(kp * bits // 32, 32 // bits, n), bits)
    return _to_int32(words.reshape(-1, n))


def unpack_kmajor(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_kmajor`: unsigned codes int32 [N, K]."""
    n = packed.shape[1]
    w = packed.to(torch.int64) & 0xFFFFFFFF
    if bits == 3:
        w = w.reshape(-1, 3, n)
        lo = _unpack_rows(w[:, :2].reshape(-1, n), 2, 16)
        hi = _unpack_rows(w[:, 2], 1, 32)
        u = lo | (hi << 2)
    else:
        u = _unpack_rows(w, bits, 32 // bits)
    return u[:k].t().to(torch.int32).contiguous()


def pack_lanes(codes: torch.Tensor, bits: int) -> torch.Tensor:
    """CPU layout from unsigned codes [N, K]: int32 ``[N, Kp / pf]``, see module doc."""
    n, k = codes.shape
    h = 16 // bits
    kp = math.ceil(k / (32 * h)) * 32 * h
    u = torch.nn.functional.pad(codes.to(torch.int64), (0, kp - k))
    u = u.reshape(n, kp // (32 * h), h, 16, 2).permute(0, 1, 3, 4, 2)  # [n, B, l, half, t]
    shifts = torch.arange(2, dtype=torch.int64)[:, None] * 16 + torch.arange(h, dtype=torch.int64) * bits
    return _to_int32((u << shifts.to(u.device)).sum((-2, -1)).reshape(n, -1))


def unpack_lanes(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """Inverse of :func:`pack_lanes`: unsigned codes int32 [N, K]."""
    n = packed.shape[0]
    h = 16 // bits
    shifts = torch.arange(2, dtype=torch.int64)[:, None] * 16 + torch.arange(h, dtype=torch.int64) * bits
    w = (packed.to(torch.int64) & 0xFFFFFFFF).reshape(n, -1, 16)[..., None, None]
    u = (w >> shifts.to(packed.device)) & ((1 << bits) - 1)  # [n, B, l, half, t]
    return u.permute(0, 1, 4, 2, 3).reshape(n, -1)[:, :k].to(torch.int32)


def _pack_rows(u: torch.Tensor, bits: int) -> torch.Tensor:
    """[R, pf, N] codes -> [R, N] words, value j of a word at bits ``j * bits``."""
    shifts = torch.arange(u.shape[-2], device=u.device, dtype=torch.int64).unsqueeze(-1) * bits
    return (u << shifts).sum(-2)


def _unpack_rows(w: torch.Tensor, bits: int, pf: int) -> torch.Tensor:
    """[R, N] words -> [R * pf, N] codes."""
    shifts = torch.arange(pf, device=w.device, dtype=torch.int64).view(1, pf, 1) * bits
    return ((w.unsqueeze(1) >> shifts) & ((1 << bits) - 1)).reshape(-1, w.shape[-1])


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """uint32 bit patterns held in int64 -> int32 with the same bits."""
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32).contiguous()
