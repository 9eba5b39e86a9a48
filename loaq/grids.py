"""Uniform integer quantization grids (GPTQ conventions, integer zero points).

A grid maps a real weight ``w`` to an unsigned code ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``
and back to ``scale * (q - zero)``. Zero points are integers so that every result is exactly
representable in compressed-tensors (``signed code = q - 2^(b-1)``, ``signed zero = zero - 2^(b-1)``).

- asymmetric: ``scale = (max(w, 0) - min(w, 0)) / (2^b - 1)``, ``zero = round(-min(w, 0) / scale)``;
- symmetric:  ``scale = 2 max|w| / (2^b - 1)``, ``zero = 2^(b-1)``.

Parameters are fitted per output channel over a whole row (``group_size = 0``) or over contiguous
groups of ``group_size`` input columns.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loaq.errors import LoaQError

SUPPORTED_BITS = (2, 3, 4, 8)


@dataclass(frozen=True)
class GridSpec:
    """How a weight matrix is quantized: bit width, group size (0 = per channel), symmetry."""

    bits: int = 4
    group_size: int = 0
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise LoaQError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size < 0:
            raise LoaQError(f"--group-size {self.group_size} is negative; use 0 (per channel) or a positive size")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == 0 else in_features // self.group_size


def fit_minmax(w: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Min-max scale and integer zero point per row of ``w`` ([rows, cols]) -> (scale, zero), each [rows]."""
    w = w.float()
    lo = torch.clamp(w.min(dim=1).values, max=0)
    hi = torch.clamp(w.max(dim=1).values, min=0)
    if spec.symmetric:
        amax = torch.maximum(-lo, hi)
        amax = torch.where(amax == 0, torch.ones_like(amax), amax)
        scale = 2 * amax / spec.maxq
        zero = torch.full_like(scale, 2 ** (spec.bits - 1))
    else:
        empty = (lo == 0) & (hi == 0)
        lo = torch.where(empty, -torch.ones_like(lo), lo)
        hi = torch.where(empty, torch.ones_like(hi), hi)
        scale = (hi - lo) / spec.maxq
        zero = torch.round(-lo / scale)
    return scale, zero


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """Unsigned integer codes of ``w`` on the grid (broadcasting ``scale``/``zero``)."""
    return torch.clamp(torch.round(w / scale) + zero, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Real values of codes ``q``: ``scale * (q - zero)``."""
    return scale * (q - zero)


def fit_groups(W: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit per-group parameters of ``W`` ([out, in]) in its original column order -> (scales, zeros) [out, n_groups]."""
    out_f, in_f = W.shape
    if spec.group_size == 0:
        s, z = fit_minmax(W, spec)
        return s[:, None], z[:, None]
    g = spec.group_size
    Wg = W.reshape(out_f, in_f // g, g).reshape(-1, g)
    s, z = fit_minmax(Wg, spec)
    return s.reshape(out_f, -1), z.reshape(out_f, -1)


def column_groups(in_features: int, spec: GridSpec) -> torch.Tensor:
    """Group index of every input column ([in])."""
    if spec.group_size == 0:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // spec.group_size


def expand(params: torch.Tensor, spec: GridSpec, in_features: int) -> torch.Tensor:
    """Per-group parameters [out, n_groups] broadcast to every column [out, in]."""
    return params[:, column_groups(in_features, spec)]


def rtn(W: torch.Tensor, spec: GridSpec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes [out, in] uint8, scales [out, G], zeros [out, G])."""
    scales, zeros = fit_groups(W, spec)
    in_f = W.shape[1]
    q = quantize(W.float(), expand(scales, spec, in_f), expand(zeros, spec, in_f), spec.maxq)
    return q.to(torch.uint8), scales, zeros


def check_group_size(spec: GridSpec, in_features: dict[str, int]) -> None:
    """Refuse a group size that does not divide every quantized layer's input width, listing the valid ones."""
    if spec.group_size == 0:
        return
    bad = sorted({n for n in in_features.values() if n % spec.group_size})
    if bad:
        common = math.gcd(*in_features.values())
        valid = [g for g in range(16, common + 1, 16) if common % g == 0]
        raise LoaQError(
            f"--group-size {spec.group_size} does not divide input width(s) {bad} of this model; "
            f"valid group sizes: {', '.join(map(str, valid)) or 'none'} (or 0 for per-channel)"
        )
