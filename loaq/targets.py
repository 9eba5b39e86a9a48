"""GPTQ targets ``W̃`` of every method (LoaQ Section 3, Algorithm 1 line 18).

Weights are stored as ``nn.Linear`` does, ``W`` of shape [out, in]; the paper writes ``W_paper = Wᵀ``
([in, out]), so its ``W̃ = (I + α H⁻¹C) W_paper + β H⁻¹ X̂ᵀ R`` reads here

    W̃ᵀ = Wᵀ + H⁻¹ (α C Wᵀ + β B),   B = X̂ᵀ R,

with a single Cholesky solve. ``α = β = 0`` returns ``W``, but the run is plain GPTQ only on ``W_in``:
on ``W_out`` LoaQ's NOA still builds ``H`` from the rescaled ``X̂' = ŝX̂`` (GPTQ's is ``X̂ᵀX̂``), so
LoaQ at ``α = β = 0`` is GPTQ only with ``rescale=False``.

- LLOA (eq. 8): ``B = 0``; minimizes ``||X̂Q - XW||`` at ``α = 1`` (Appendix A, eqs. 23-26).
- SOA (eq. 10): ``R = h - ĥ``; NOA (eq. 12): ``R = s h - ŝ ĥ`` with ``H, C, B`` built from the
  token-rescaled inputs ``X' = sX``, ``X̂' = ŝX̂`` (Algorithm 1 lines 10-16).
- GPTAQ's asymmetric term ``P`` (Li et al. 2025) is built here too; the solver consumes it.
"""

from __future__ import annotations

import torch

from loaq.solver import Factor
from loaq.stats import Projected


def output_target(W: torch.Tensor, factor: Factor, C: torch.Tensor | Projected | None, alpha: float,
                  B: torch.Tensor | None = None, beta: float = 0.0) -> torch.Tensor:
    """``W̃ = (I + α H⁻¹C) W + β H⁻¹ B`` in [out, in] layout (eqs. 8, 10, 12)."""
    if (alpha == 0 or C is None) and (beta == 0 or B is None):
        return W.float().clone()
    Wt = W.double().T
    rhs = torch.zeros_like(Wt)
    if alpha and C is not None:  # C, or C Wᵀ already formed (loaq.stats.Projected)
        rhs += alpha * (C.CW if isinstance(C, Projected) else C.double() @ Wt)
    if beta and B is not None:
        rhs += beta * B
    rhs[factor.dead] = 0  # dead inputs' rows of C and B count as zero (no n × n copy of C to zero them in)
    return (Wt + factor.solve(rhs)).T.float().contiguous()
