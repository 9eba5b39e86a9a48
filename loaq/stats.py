"""Running second-order statistics of a linear layer's calibration inputs.

For tokens ``t`` with quantized-stream input ``x̂_t``, full-precision input ``x_t`` and an optional
residual target ``r_t`` (LoaQ's ``s_t h_t - ŝ_t ĥ_t``) it keeps

    H = Σ x̂_t x̂_tᵀ,   C = Σ x̂_t (x_t - x̂_t)ᵀ  (the paper's X̂ᵀ(X - X̂)),   B = Σ x̂_t r_tᵀ.

Each batch's products are formed in ``batch_dtype`` (float32 by default: half the cost of float64 on
CPUs and far faster on GPUs) and summed across batches in float64. ``C`` is accumulated from the
difference ``x - x̂`` directly, never as ``X̂ᵀX - X̂ᵀX̂``, so float32 does not cancel it away;
``tests/test_stats.py`` bounds the effect on the target against a float64 accumulation.
"""

from __future__ import annotations

from typing import NamedTuple

import torch


class Projected(NamedTuple):
    """``C Wᵀ`` ([n_in, out], float64) kept in place of ``C`` (see :class:`Stats`' ``project``)."""

    CW: torch.Tensor


class Stats:
    """Accumulator of ``H``, ``C`` and ``B`` over batches of tokens.

    ``project`` (``Wᵀ``, [n_in, out]): keep ``C Wᵀ = Σ_t x̂_t ((x_t - x̂_t)ᵀ Wᵀ)`` instead of ``C``, for a
    linear whose only use of ``C`` is LLOA/LoaQ's target ``W̃ᵀ = Wᵀ + H⁻¹(α C Wᵀ + β B)`` (eqs. 8, 12).
    With ``out < n_in / 2`` (``down_proj``) that is smaller (n_in·out against n_in² float64: 128 against
    512 MiB at 8192 × 2048) and cheaper (2·T·n_in·out multiply-adds against T·n_in² for ``C`` plus
    n_in²·out for ``C Wᵀ`` at the target)."""

    def __init__(self, n_in: int, cross: bool = False, n_res: int = 0, device: torch.device | str = "cpu",
                 batch_dtype: torch.dtype = torch.float32, project: torch.Tensor | None = None):
        self.H = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.C = torch.zeros(n_in, n_in, dtype=torch.float64, device=device) if cross and project is None else None
        self.CW = torch.zeros(n_in, project.shape[1], dtype=torch.float64, device=device) if cross and project is not None else None
        self._Wt = project.to(device, batch_dtype) if self.CW is not None else None
        self.B = torch.zeros(n_in, n_res, dtype=torch.float64, device=device) if n_res else None
        self.batch_dtype = batch_dtype
        self.tokens = 0

    def add(self, x_hat: torch.Tensor, x: torch.Tensor | None = None, r: torch.Tensor | None = None) -> None:
        """Add a batch: ``x_hat``, ``x`` of shape [..., n_in]; ``r`` of shape [..., n_res]."""
        dt = self.batch_dtype
        xh = x_hat.reshape(-1, x_hat.shape[-1])
        xh_t = xh.to(dt).T
        self.H += (xh_t @ xh.to(dt)).double()
        if self.C is not None or self.CW is not None:
            d = x.reshape(-1, x.shape[-1]).to(dt) - xh.to(dt)
            if self.C is not None:
                self.C += (xh_t @ d).double()
            else:
                self.CW += (xh_t @ (d @ self._Wt)).double()
        if self.B is not None:
            self.B += (xh_t @ r.reshape(-1, r.shape[-1]).to(dt)).double()
        self.tokens += xh.shape[0]
