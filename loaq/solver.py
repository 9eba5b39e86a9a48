"""The one GPTQ solver every method shares (Frantar et al. 2023; LoaQ Appendix B.1).

It minimizes ``||X̂ (Q - W̃)||²`` over grid points ``Q`` given ``H = X̂ᵀX̂`` and a target ``W̃``
(rows = output channels, as stored by ``nn.Linear``). Methods differ only in the target
(:mod:`loaq.targets`) and, for GPTAQ, in an extra asymmetric term ``P`` added to the error feedback.

Steps: dead columns -> damping (1 % of mean(diag H), escalated on a failed Cholesky) -> act-order
permutation -> upper Cholesky factor ``U`` of ``H⁻¹`` -> column blocks with lazy updates (eq. 32).
Group parameters are fitted once on ``W̃`` in the original column order ("static groups"), so act-order
never changes which columns share a scale and every result exports as contiguous groups; NeUQI
(``spec.init``) weights that fit by the damped ``diag(H)``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field, replace

import torch

from loaq.errors import LoaQError
from loaq.grids import GridSpec, column_groups, dequantize, fit_groups, quantize

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class SolverOptions:
    """GPTQ settings: block size of lazy updates, act-order, initial relative damping."""

    blocksize: int = 128
    act_order: bool = True
    percdamp: float = 0.01

    def __post_init__(self):
        if self.blocksize < 1:
            raise LoaQError(f"--blocksize {self.blocksize} is not positive; use a block of ≥ 1 columns (default 128)")
        if not (math.isfinite(self.percdamp) and self.percdamp >= 0):
            raise LoaQError(f"--percdamp {self.percdamp:g} is not a finite damping ≥ 0; use e.g. 0.01 (the default)")


@dataclass
class Factor:
    """Damped ``H`` (float64) with its Cholesky factor; ``dead`` marks columns no token ever touched.

    ``disposable``: the caller holds no other use for ``H`` and ``L`` (:func:`loaq.pipeline.solve_group`
    without an allocation probe), so the GPTQ solve frees them once it has ``H⁻¹``: at an 8192-wide
    ``down_proj`` that is two 512 MiB float64 matrices fewer during the column loop. ``diag`` (the damped
    diagonal) stays for act-order and the group fit."""

    H: torch.Tensor | None
    L: torch.Tensor | None
    dead: torch.Tensor
    damp: float
    disposable: bool = False
    diag: torch.Tensor = field(init=False)

    def __post_init__(self):
        self.diag = self.H.diagonal().clone()

    def solve(self, B: torch.Tensor) -> torch.Tensor:
        """``H⁻¹ B`` for ``B`` of shape [N, k] (float64)."""
        return torch.cholesky_solve(B.double(), self._factor())

    def inverse(self) -> torch.Tensor:
        return torch.cholesky_inverse(self._factor())

    def _factor(self) -> torch.Tensor:
        if self.L is None:
            raise RuntimeError("this factor was released by the GPTQ solve (disposable=True); factorize H again")
        return self.L

    def release(self, L: bool = True) -> None:
        """Free ``H`` (and ``L`` unless ``L=False``); ``diag``, ``dead`` and ``damp`` stay."""
        self.H = None
        if L:
            self.L = None

    def take_inverse(self) -> torch.Tensor:
        """``H⁻¹``, formed in the memory of ``L`` when the factor is disposable (``H`` and ``L`` are freed:
        one ``n × n`` float64 matrix alive instead of three), else a new tensor."""
        if not self.disposable:
            return self.inverse()
        L = self._factor()
        self.release()
        return torch.cholesky_inverse(L, out=L)


def factorize(H: torch.Tensor, percdamp: float, name: str = "", max_tries: int = 12, inplace: bool = False) -> Factor:
    """Dampen ``H`` by ``percdamp · mean(diag H)`` and Cholesky-factor it.

    A failed factorization multiplies the damping by 10 and tries again, with a warning naming the
    layer, instead of crashing (GPTQ's reference crashes; silently falling back to RTN hides it).
    ``inplace`` (a float64 ``H`` the caller no longer needs, e.g. a finished :class:`loaq.stats.Stats`'
    sum) damps ``H`` itself instead of a copy: one ``n × n`` float64 matrix less at the solve's peak
    (512 MiB for an 8192-wide ``down_proj``), the same numbers.
    """
    H = H if inplace and H.dtype == torch.float64 else H.double().clone()
    dead = torch.diag(H) == 0
    H[dead, dead] = 1.0
    diag = H.diagonal().clone()
    mean_diag = torch.mean(diag).item()
    damp = percdamp * mean_diag
    for attempt in range(max_tries):
        H.diagonal().copy_(diag + damp)  # the damped H, rebuilt from the undamped diagonal on every try
        L, info = torch.linalg.cholesky_ex(H)
        if info.item() == 0:
            if attempt:
                log.warning("%s: H not positive definite; damping raised to %.3g x mean(diag H)", name, damp / mean_diag)
            return Factor(H, L, dead, damp)
        damp = damp * 10 if damp > 0 else 1e-6 * mean_diag
    raise RuntimeError(f"{name}: H is not positive definite even with damping {damp:.3g}")


@dataclass
class QuantResult:
    """Integer codes [out, in] (uint8, original column order), scales and zeros [out, n_groups], and
    ``Q`` = their dequantized values (dropped once written into the model, so a run holds one layer's)."""

    codes: torch.Tensor
    scales: torch.Tensor
    zeros: torch.Tensor
    Q: torch.Tensor | None = None


def _columns(W: torch.Tensor, U: torch.Tensor, col_scale: torch.Tensor, col_zero: torch.Tensor, maxq: int | torch.Tensor,
             blocksize: int, P: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """GPTQ's column loop (eq. 32) on ``W`` [out, n] in processing order, ``U`` = upper Cholesky of ``H⁻¹``.

    With GPTAQ's ``P`` each column ``i`` also feeds ``w_i · P[i, j]`` forward to the columns ``j > i``,
    where ``w_i`` is the column as it stood just before it was quantized (inside a block and across
    blocks alike, so the result does not depend on ``blocksize``). Returns (codes, Q). ``W`` is the caller's
    working copy and is overwritten (both callers pass a fresh tensor: no second copy at the solve's peak).
    """
    codes = torch.zeros(W.shape, dtype=torch.uint8, device=W.device)  # 0..maxq, exact
    Q = torch.zeros_like(W)
    n = W.shape[1]
    for i1 in range(0, n, blocksize):
        i2 = min(i1 + blocksize, n)
        # the block transposed ([columns, rows]): each column a contiguous row of memory, so the per-column
        # quantization and rank-1 updates stream instead of striding (the loop's cost at hundreds of rows)
        W1 = W[:, i1:i2].t().contiguous()
        s1, z1 = col_scale[:, i1:i2].t().contiguous(), col_zero[:, i1:i2].t().contiguous()
        q1, Q1 = torch.empty_like(W1, dtype=torch.uint8), torch.empty_like(W1)
        Wpre = torch.zeros_like(W1)
        Err1 = torch.zeros_like(W1)
        U1 = U[i1:i2, i1:i2]
        for i in range(i2 - i1):
            w = W1[i]
            q = quantize(w, s1[i], z1[i], maxq)
            qd = dequantize(q, s1[i], z1[i])
            q1[i], Q1[i], Wpre[i] = q, qd, w
            err = (w - qd) / U1[i, i]
            W1[i:] -= U1[i, i:, None] * err[None, :]
            if P is not None:
                W1[i:] += P[i1 + i, i1 + i : i2, None] * Wpre[i][None, :]
            Err1[i] = err
        codes[:, i1:i2], Q[:, i1:i2] = q1.t(), Q1.t()
        W[:, i2:] -= Err1.t() @ U[i1:i2, i2:]
        if P is not None:
            W[:, i2:] += Wpre.t() @ P[i1:i2, i2:]
    return codes, Q


@dataclass
class _Prepared:
    W: torch.Tensor          # target, permuted columns, dead columns zeroed
    perm: torch.Tensor
    U: torch.Tensor | None   # upper Cholesky factor of the permuted H⁻¹ (float64)
    scales: torch.Tensor
    zeros: torch.Tensor
    col_scale: torch.Tensor  # per permuted column
    col_zero: torch.Tensor


def _permute_symmetric_(A: torch.Tensor, perm: torch.Tensor, rows: int = 256) -> torch.Tensor:
    """``A[perm][:, perm]`` written into ``A`` itself (the same values; one ``rows × n`` buffer, not two
    ``n × n`` copies): columns a block of rows at a time, then rows along the permutation's cycles."""
    n = A.shape[0]
    for i in range(0, n, rows):
        A[i : i + rows] = A[i : i + rows][:, perm]
    p = perm.tolist()
    seen = [False] * n
    for start in range(n):
        if seen[start]:
            continue
        first, j = A[start].clone(), start
        while True:
            seen[j] = True
            k = p[j]
            if k == start:
                A[j] = first
                break
            A[j] = A[k]
            j = k
    return A


def _prepare(W: torch.Tensor, factor: Factor, spec: GridSpec, opts: SolverOptions, keep: bool = False) -> _Prepared:
    """Target in processing order, group parameters and the upper Cholesky factor ``U`` of the permuted ``H⁻¹``.

    ``U`` is formed in the memory of ``H⁻¹`` (in-place permutation and factorization: the same numbers as
    ``cholesky(H⁻¹[perm][:, perm])``), and a disposable ``factor`` (unless ``keep``: Qronos reads ``H``
    after) gives ``H⁻¹`` in the memory of ``L`` (:meth:`Factor.take_inverse`)."""
    W = W.float().clone()
    in_f = W.shape[1]
    W[:, factor.dead] = 0
    perm = (torch.argsort(factor.diag, descending=True, stable=True) if opts.act_order
            else torch.arange(in_f, device=W.device))
    Hinv = factor.inverse() if keep else factor.take_inverse()
    U = torch.linalg.cholesky(_permute_symmetric_(Hinv, perm), upper=True, out=Hinv)
    return _Prepared(W[:, perm], perm, U, *_grid(W, spec, factor, perm))


def _grid(W: torch.Tensor, spec: GridSpec, factor: Factor, perm: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """(scales, zeros) of target ``W`` (original column order, dead columns zeroed) on ``spec``, and the same
    per permuted column."""
    scales, zeros = fit_groups(W, spec, factor.diag)
    groups = column_groups(W.shape[1], spec).to(W.device)[perm]
    return scales, zeros, scales[:, groups], zeros[:, groups]


def _finish(prep: _Prepared, codes: torch.Tensor, Q: torch.Tensor) -> QuantResult:
    inv = torch.argsort(prep.perm)
    return QuantResult(codes[:, inv], prep.scales, prep.zeros, Q[:, inv].contiguous())


def gptq_solve(W: torch.Tensor, factor: Factor, spec: GridSpec, opts: SolverOptions = SolverOptions(),
               dXXT: torch.Tensor | None = None, gptaq_alpha: float = 0.25) -> QuantResult:
    """Quantize target ``W`` ([out, in]) column by column with GPTQ's error feedback.

    With ``dXXT = (X - X̂)ᵀX̂`` (i.e. ``Cᵀ``) this is GPTAQ (Li et al. 2025, "asymmetric calibration"):
    it minimizes ``||X̂Qᵀ - XWᵀ||`` column by column through ``P = α · triu₁(dXXT Uᵀ) U`` (their
    ``fasterquant``, default ``α = 0.25``), all in act-order.
    """
    prep = _prepare(W, factor, spec, opts)
    P = None
    if dXXT is not None:
        D = dXXT.double().clone()
        D[:, factor.dead] = 0
        D = D[prep.perm][:, prep.perm]
        P = (gptaq_alpha * torch.triu(D @ prep.U.T, diagonal=1) @ prep.U).float()
        del D
    U, prep.U = prep.U.float(), None  # the column loop reads the float32 factor only
    codes, Q = _columns(prep.W, U, prep.col_scale, prep.col_zero, spec.maxq, opts.blocksize, P)
    return _finish(prep, codes, Q)


def gptq_solve_grids(W: torch.Tensor, factor: Factor, specs: list[GridSpec],
                     opts: SolverOptions = SolverOptions()) -> list[QuantResult]:
    """:func:`gptq_solve` of one target ``W`` on each grid of ``specs``, in one column loop.

    GPTQ quantizes every row on its own given ``U`` (eq. 32: the error feedback of a row reads only that row),
    and ``U`` and the act-order permutation depend on ``H`` alone, so the grids' copies of ``W`` are stacked
    (``len(specs) · out`` rows, each with its grid's scales, zero points and ``maxq``) and share one loop:
    the per-column overhead is paid once instead of once per grid (the allocation's sensitivity probe;
    ``benchmarks/solve_grids.py`` times it against one solve per grid)."""
    prep = _prepare(W, factor, specs[0], opts)
    W0 = prep.W[:, torch.argsort(prep.perm)]  # the target as _prepare fits it: original order, dead columns zeroed
    grids = [(prep.scales, prep.zeros, prep.col_scale, prep.col_zero)]
    grids += [_grid(W0, spec, factor, prep.perm) for spec in specs[1:]]
    del W0
    out_f = W.shape[0]
    maxq = torch.cat([torch.full((out_f,), float(s.maxq), device=W.device) for s in specs])
    U, prep.U = prep.U.float(), None
    codes, Q = _columns(prep.W.repeat(len(specs), 1), U, torch.cat([g[2] for g in grids]),
                        torch.cat([g[3] for g in grids]), maxq, opts.blocksize)
    out = []
    for k, (sc, ze, _, _) in enumerate(grids):
        rows = slice(k * out_f, (k + 1) * out_f)
        out.append(_finish(replace(prep, scales=sc, zeros=ze), codes[rows], Q[rows]))
    return out


def qronos_solve(W: torch.Tensor, factor: Factor, C: torch.Tensor, spec: GridSpec,
                 opts: SolverOptions = SolverOptions()) -> QuantResult:
    """Qronos (Zhang et al. 2025): correct the past on the first column, then GPTQ shapes the future.

    In processing order, with ``X̂ᵀX = H + C``:
    1. the first weight is the least-squares fit of ``Xw`` with the other weights fixed,
       ``v₀ = ((H + C)[0] w - H[0, 1:] w₁) / H₀₀`` (undamped), and is quantized to ``q₀``;
    2. all remaining weights are re-solved at once against the float target,
       ``(Ĥ₁₁) v₁ = (H + C)[1:] w - H[1:, 0] q₀ + λ w₁`` with ``Ĥ = H + λI``;
    3. plain GPTQ quantizes columns 1..n-1 of ``v`` with ``Ĥ₁₁⁻¹``, whose upper Cholesky factor is
       the trailing block of the full ``U``.
    ``λ`` is the shared solver's damping (Qronos' own code uses ``1e-6 σ_max(H)``).
    """
    prep = _prepare(W, factor, spec, opts, keep=True)
    p = prep.perm
    Hd = factor.H[p][:, p]
    H = Hd - factor.damp * torch.eye(Hd.shape[0], dtype=Hd.dtype, device=Hd.device)
    C = C.double().clone()
    C[factor.dead] = 0
    C[:, factor.dead] = 0
    G = H + C[p][:, p]  # X̂ᵀX in processing order
    w = prep.W.double()
    v0 = (w @ G[0] - w[:, 1:] @ H[0, 1:]) / H[0, 0]
    s0, z0 = prep.col_scale[:, 0], prep.col_zero[:, 0]
    c0 = quantize(v0.float(), s0, z0, spec.maxq)
    q0 = dequantize(c0, s0, z0)
    rhs = w @ G[1:].T - q0.double()[:, None] * H[1:, 0][None, :] + factor.damp * w[:, 1:]
    Hinv = factor.inverse()[p][:, p]
    iH1 = Hinv[1:, 1:] - torch.outer(Hinv[1:, 0], Hinv[0, 1:]) / Hinv[0, 0]
    v1 = (rhs @ iH1).float()
    codes, Q = _columns(v1, prep.U[1:, 1:].float(), prep.col_scale[:, 1:], prep.col_zero[:, 1:], spec.maxq,
                        opts.blocksize)
    return _finish(prep, torch.cat([c0[:, None].to(torch.uint8), codes], 1), torch.cat([q0[:, None], Q], 1))
