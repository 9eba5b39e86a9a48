"""Random ``pack-quantized`` layers for speed measurements (benchmarks/kernels.py, benchmarks/decode.py).

Codes are uniform over the grid, symmetric (no zero point), scales in [0.001, 0.011): the kernels'
speed does not depend on the values. Tests that check numbers build their own (tests/kernels/helpers.py).
"""

from __future__ import annotations

import torch

from loaq.kernels.layout import PackedLinear, pack_codes

__all__ = ["random_linear"]


def random_linear(bits: int, n: int, k: int, group: int | None, device: torch.device | str,
                  scale_dtype: torch.dtype = torch.float16) -> PackedLinear:
    """An [n, k] layer of ``bits``-bit codes, groups of ``group`` along k (None: per channel),
    drawn and packed on ``device``."""
    codes = torch.randint(0, 1 << bits, (n, k), dtype=torch.int32, device=device)
    g = 1 if group is None else -(-k // group)
    scale = (torch.rand(n, g, device=device) * 0.01 + 0.001).to(scale_dtype)
    return PackedLinear(pack_codes(codes, bits), scale, None, bits, (n, k), group)
