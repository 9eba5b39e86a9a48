"""Reference online Hadamard transform (QuaRot ``matmul_hadU``), computed in fp32.

For ``n = K * 2**m`` and a K×K Hadamard matrix ``had_k`` (None for K = 1), the
last dim of x is viewed as ``[K, 2**m]`` (high index first) and transformed by
``had_k ⊗ H_{2**m} / sqrt(n)`` where ``H_{2**m}`` is Sylvester's (natural order).
"""

from __future__ import annotations

import math

import torch

__all__ = ["hadamard_transform_ref"]


def hadamard_transform_ref(x: torch.Tensor, had_k: torch.Tensor | None = None) -> torch.Tensor:
    """``x @ (had_k ⊗ H).T / sqrt(n)`` along the last dim, returned in x.dtype."""
    n = x.shape[-1]
    k = 1 if had_k is None else had_k.shape[0]
    if n % k != 0 or (n // k) & (n // k - 1) != 0:
        raise ValueError(f"n={n} is not K * 2**m with K={k}")
    y = x.float().reshape(-1, n, 1)
    while y.shape[1] > k:
        y = y.view(y.shape[0], y.shape[1] // 2, 2, y.shape[2])
        y = torch.stack([y[:, :, 0] + y[:, :, 1], y[:, :, 0] - y[:, :, 1]], dim=2)
        y = y.view(y.shape[0], y.shape[1], -1)
    if k > 1:
        y = had_k.float().to(y.device) @ y
    return (y / math.sqrt(n)).reshape(x.shape).to(x.dtype)
