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

import torch


class Stats:
    """Accumulator of ``H``, ``C`` and ``B`` over batches of tokens."""

    def __init__(self, n_in: int, cross: bool = False, n_res: int = 0, device: torch.device | str = "cpu",
                 batch_dtype: torch.dtype = torch.float32):
        self.H = torch.zeros(n_in, n_in, dtype=torch.float64, device=device)
        self.C = torch.zeros(n_in, n_in, dtype=torch.float64, device=device) if cross else None
        self.B = torch.zeros(n_in, n_res, dtype=torch.float64, device=device) if n_res else None
        self.batch_dtype = batch_dtype
        self.tokens = 0

    def add(self, x_hat: torch.Tensor, x: torch.Tensor | None = None, r: torch.Tensor | None = None) -> None:
        """Add a batch: ``x_hat``, ``x`` of shape [..., n_in]; ``r`` of shape [..., n_res]."""
        dt = self.batch_dtype
        xh = x_hat.reshape(-1, x_hat.shape[-1])
        xh_t = xh.to(dt).T
        self.H += (xh_t @ xh.to(dt)).double()
        if self.C is not None:
            d = x.reshape(-1, x.shape[-1]).to(dt) - xh.to(dt)
            self.C += (xh_t @ d).double()
        if self.B is not None:
            self.B += (xh_t @ r.reshape(-1, r.shape[-1]).to(dt)).double()
        self.tokens += xh.shape[0]
