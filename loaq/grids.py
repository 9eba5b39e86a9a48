"""Uniform integer quantization grids (GPTQ conventions, integer zero points).

A grid maps a real weight ``w`` to an unsigned code ``q = clamp(round(w / scale) + zero, 0, 2^b - 1)``
and back to ``scale * (q - zero)``. Zero points are integers so that every result is exactly
representable in compressed-tensors (``signed code = q - 2^(b-1)``, ``signed zero = zero - 2^(b-1)``).

- asymmetric: ``scale = (max(w, 0) - min(w, 0)) / (2^b - 1)``, ``zero = round(-min(w, 0) / scale)``;
- symmetric:  ``scale = 2 max|w| / (2^b - 1)``, ``zero = 2^(b-1)``.

Parameters are fitted per output channel over a whole row (``group_size = 0``) or over contiguous
groups of ``group_size`` input columns, by min-max or by NeUQI (:func:`fit_neuqi`). ``scale_dtype`` is the
dtype the export writes scales in: ``float32`` (default) or ``float16`` (half the bytes: 0.25 instead of 0.5
bit per weight at group 64, as GPTQ checkpoints store them). A ``float16`` grid rounds every fitted scale to a
float16 value (:func:`representable`) before anything is quantized, so the codes are solved on the scales
that are written and ``scale * (q - zero)`` in float32 is the same number in every reader that multiplies in
float32 (the native checkpoint, the export loader, the CPU kernels).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loaq.errors import LoaQError

SUPPORTED_BITS = (2, 3, 4, 8)
INITS = ("minmax", "neuqi", "neuqi-continuous")
SCALE_DTYPES = {"float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class GridSpec:
    """How a weight matrix is quantized: bit width, group size (0 = per channel), symmetry, how
    (scale, zero) are initialized (``minmax``, ``neuqi`` with an integer zero, ``neuqi-continuous``) and the
    dtype scales are written in (``float32`` or ``float16``)."""

    bits: int = 4
    group_size: int = 0
    symmetric: bool = False
    init: str = "minmax"
    scale_dtype: str = "float32"

    def __post_init__(self):
        if self.bits not in SUPPORTED_BITS:
            raise LoaQError(f"--bits {self.bits} is not supported; use one of {', '.join(map(str, SUPPORTED_BITS))}")
        if self.group_size < 0:
            raise LoaQError(f"--group-size {self.group_size} is negative; use 0 (per channel) or a positive size")
        if self.init not in INITS:
            raise LoaQError(f"--init {self.init!r} is unknown; use minmax or neuqi (add --neuqi-continuous for a real zero)")
        if self.scale_dtype not in SCALE_DTYPES:
            raise LoaQError(f"--scale-dtype {self.scale_dtype!r} is not supported; use {' or '.join(SCALE_DTYPES)}")

    @property
    def maxq(self) -> int:
        return 2**self.bits - 1

    def n_groups(self, in_features: int) -> int:
        return 1 if self.group_size == 0 else in_features // self.group_size

    @property
    def scale_torch_dtype(self) -> torch.dtype:
        return SCALE_DTYPES[self.scale_dtype]


FP16_TINY = 2.0**-24  # the smallest positive float16 (subnormal): a float16 scale is never rounded to 0


def representable(scale: torch.Tensor, spec: GridSpec) -> torch.Tensor:
    """``scale`` (float32) rounded to the nearest value of ``spec.scale_dtype``, kept in float32; float16 scales are
    first raised to :data:`FP16_TINY` so that none becomes 0."""
    if spec.scale_dtype == "float32":
        return scale
    return scale.clamp_min(FP16_TINY).to(torch.float16).to(scale.dtype)


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


def quantize(w: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int | torch.Tensor) -> torch.Tensor:
    """Unsigned integer codes of ``w`` on the grid (broadcasting ``scale``/``zero``, and ``maxq`` when it is a
    tensor: rows of several widths solved together, :func:`loaq.solver.gptq_solve_grids`).

    ``round(w / scale + zero)``; the integer part of ``zero`` is added after rounding, so integer zero
    points give exactly GPTQ's ``round(w / scale) + zero`` and real ones (NeUQI's continuous variant)
    still give integer codes."""
    zi = torch.round(zero)
    q = torch.round(w / scale + (zero - zi)) + zi
    if isinstance(maxq, torch.Tensor):
        return torch.minimum(q.clamp_min(0), maxq)
    return torch.clamp(q, 0, maxq)


def dequantize(q: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor) -> torch.Tensor:
    """Real values of codes ``q``: ``scale * (q - zero)``."""
    return scale * (q - zero)


NEUQI_COARSE = 16  # scale candidates t / 16 of the range scale, t = 4..16
NEUQI_FINE = 128  # then ±2 steps of 1 / 128 around the best coarse t
NEUQI_SUBSTEPS = 16  # continuous zero: 1/16 steps within ±1 of the best integer zero
_BETTER = 1 - 1e-6  # a candidate must win by more than rounding noise


def weighted_error(w: torch.Tensor, d: torch.Tensor, scale: torch.Tensor, zero: torch.Tensor, maxq: int) -> torch.Tensor:
    """``Σᵢ dᵢ (Q(wᵢ) − wᵢ)²`` per row of ``w`` for per-row ``scale``, ``zero`` ([rows])."""
    s, z = scale[:, None], zero[:, None]
    return (d * (dequantize(quantize(w, s, z, maxq), s, z) - w) ** 2).sum(1)


def _zero_candidates(lo: torch.Tensor, hi: torch.Tensor, spec: GridSpec) -> list[torch.Tensor]:
    """Integer zero points worth trying for rows of ``round(w / scale)`` in ``[lo, hi]``: all of them up to
    4 bits, else 17 around the one that centres the row's range."""
    if spec.symmetric:
        return [torch.full_like(lo, 2 ** (spec.bits - 1))]
    if spec.bits <= 4:
        return [torch.full_like(lo, z) for z in range(spec.maxq + 1)]
    mid = torch.round((spec.maxq - hi - lo) / 2)
    return [torch.clamp(mid + k, 0, spec.maxq) for k in range(-8, 9)]


def _best_integer_zero(w, d, scale, spec):
    """(zero, error) per row minimizing the weighted error at ``scale`` over integer zeros.

    With ``x = w / s``, ``r = round(x)``, ``u = x − r`` the dequantized error of an element is
    ``s (c − x)`` with ``c = clamp(r, −z, maxq − z)``. Elements are binned by ``r`` (per-row sums
    ``S0 = Σd``, ``S1 = Σdu``, ``S2 = Σdu²``), so each zero costs O(bins):
    ``Σ d (c − x)² = Σ_bins (c − r)² S0 − 2 (c − r) S1 + S2``."""
    x = w / scale[:, None]
    r = torch.round(x)
    u = x - r
    lo, hi = r.min(1).values, r.max(1).values
    idx = (r - lo[:, None]).long()
    nb = int(idx.max()) + 1
    du = d * u
    S0, S1, S2 = (torch.zeros(w.shape[0], nb, device=w.device).scatter_add_(1, idx, t) for t in (d, du, du * u))
    v = lo[:, None] + torch.arange(nb, device=w.device)
    best_e = best_z = None
    for z in _zero_candidates(lo, hi, spec):
        k = torch.clamp(v, -z[:, None], spec.maxq - z[:, None]) - v
        e = (k * k * S0 - 2 * k * S1 + S2).sum(1) * scale**2
        if best_e is None:
            best_e, best_z = e, z
        else:
            better = e < best_e
            best_e, best_z = torch.where(better, e, best_e), torch.where(better, z, best_z)
    return best_z, best_e


def fit_neuqi(w: torch.Tensor, d: torch.Tensor, spec: GridSpec, continuous: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """NeUQI initialization (Lin, Hu and Wan 2025, "NeUQI: Near-Optimal Uniform Quantization Parameter
    Initialization", arXiv 2505.17595): per row of ``w`` ([rows, cols]) the (scale, zero) minimizing
    the diagonal proxy ``Σᵢ Hᵢᵢ (Q(wᵢ) − wᵢ)²`` of GPTQ's loss, ``d`` = diag(H) per column ([rows, cols]).

    As in NeUQI's two-level (``grid2``) search, the scale runs over a coarse grid ``t/16`` (t = 4..16)
    of the range scale ``(max w − min w) / (2^b − 1)`` (``2 max|w| / (2^b − 1)`` symmetric), then over
    ±2 steps of ``1/128`` around the best coarse ``t`` (NeUQI's GPU default is 256 steps; this is a
    CPU budget); at each scale every integer zero is tried
    (17 around the centre for 8 bits). Zero points are integers by default, exactly representable in
    compressed-tensors; ``continuous`` lifts that restriction as NeUQI does, searching 1/16 steps
    within ±1 of the best integer zero at the final scale (NeUQI solves this sub-problem exactly with
    an event sweep). Min-max's own (scale, zero) is the starting candidate and a candidate must beat
    the best by more than rounding noise, so the result is never worse than min-max on this proxy.
    CPU cost: 17 scales × a few passes over ``w`` (zeros are scored on per-row histograms).
    """
    w, d = w.float(), d.float()
    best_s, best_z = fit_minmax(w, spec)
    best_e = weighted_error(w, d, best_s, best_z, spec.maxq)
    hi, lo = w.max(1).values, w.min(1).values
    base = 2 * torch.maximum(hi.abs(), lo.abs()) / spec.maxq if spec.symmetric else (hi - lo) / spec.maxq
    base = torch.where(base > 0, base, torch.ones_like(base))

    def consider(t: torch.Tensor) -> torch.Tensor:
        nonlocal best_s, best_z, best_e
        scale = base * t
        z, e = _best_integer_zero(w, d, scale, spec)
        better = e < best_e * _BETTER
        best_s, best_z, best_e = (torch.where(better, scale, best_s), torch.where(better, z, best_z),
                                  torch.where(better, e, best_e))
        return e

    coarse_t = torch.ones_like(base)
    coarse_e = torch.full_like(base, float("inf"))
    for k in range(NEUQI_COARSE // 4, NEUQI_COARSE + 1):
        t = torch.full_like(base, k / NEUQI_COARSE)
        e = consider(t)
        better = e < coarse_e
        coarse_t, coarse_e = torch.where(better, t, coarse_t), torch.where(better, e, coarse_e)
    for k in (-2, -1, 1, 2):
        consider(coarse_t + k / NEUQI_FINE)
    if continuous and not spec.symmetric:
        base_z = best_z.clone()
        for k in range(-NEUQI_SUBSTEPS, NEUQI_SUBSTEPS + 1):
            z = base_z + k / NEUQI_SUBSTEPS
            e = weighted_error(w, d, best_s, z, spec.maxq)
            better = e < best_e * _BETTER
            best_z, best_e = torch.where(better, z, best_z), torch.where(better, e, best_e)
    return best_s, best_z


def fit_groups(W: torch.Tensor, spec: GridSpec, hdiag: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit per-group parameters of ``W`` ([out, in]) in its original column order -> (scales, zeros) [out, n_groups].

    ``hdiag`` (diag(H) per input column) weights NeUQI's error; without it every column weighs 1."""
    out_f, in_f = W.shape
    g = spec.group_size or in_f
    Wg = W.reshape(-1, g)
    if spec.init == "minmax":
        s, z = fit_minmax(Wg, spec)
    else:
        d = torch.ones(in_f) if hdiag is None else hdiag.float().cpu()
        d = d.to(W.device).reshape(1, in_f // g, g).expand(out_f, -1, -1).reshape(-1, g)
        s, z = fit_neuqi(Wg, d, spec, continuous=spec.init == "neuqi-continuous")
    return representable(s, spec).reshape(out_f, -1), z.reshape(out_f, -1)


def column_groups(in_features: int, spec: GridSpec) -> torch.Tensor:
    """Group index of every input column ([in])."""
    if spec.group_size == 0:
        return torch.zeros(in_features, dtype=torch.long)
    return torch.arange(in_features) // spec.group_size


def expand(params: torch.Tensor, spec: GridSpec, in_features: int) -> torch.Tensor:
    """Per-group parameters [out, n_groups] broadcast to every column [out, in]."""
    return params[:, column_groups(in_features, spec).to(params.device)]


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
