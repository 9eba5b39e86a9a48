"""Reference for the weight-only GEMM: dequantize the checkpoint tensors, then matmul.

Same semantics as compressed-tensors' ``dequantize``: ``W = (u - uz) * scale`` in the
scale's dtype, then ``y = x @ W.T`` in the activation dtype.
"""

from __future__ import annotations

import torch

from loaq.kernels.layout import PackedLinear, unpack_codes, unpack_zero_points

__all__ = ["dequantize_ref", "wna16_matmul_ref"]


def dequantize_ref(w: PackedLinear) -> torch.Tensor:
    """Dense weight [N, K] in ``weight_scale.dtype``."""
    n, k = w.shape
    u = unpack_codes(w.weight_packed, w.bits, k)
    g = w.weight_scale.shape[1]
    uz = unpack_zero_points(w.weight_zero_point, w.bits, n, g).to(u.device)
    group = w.group_size or k
    cols = torch.arange(k, device=u.device) // group
    scale = w.weight_scale[:, cols]
    return (u - uz[:, cols]).to(scale.dtype) * scale


def wna16_matmul_ref(x: torch.Tensor, w: PackedLinear) -> torch.Tensor:
    """``x @ dequantize(w).T`` in ``x.dtype``; x is [..., K]."""
    return x @ dequantize_ref(w).to(x.dtype).t()
