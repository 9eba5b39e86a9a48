"""Random checkpoint tensors in the ``pack-quantized`` format.

Packed with ``pack_codes``, which test_layout proves bit-identical to compressed-tensors'
``pack_to_int32``; this keeps the GPU-side tests free of that dependency.
"""

import math

import torch
from loaq.kernels.layout import PackedLinear, pack_codes

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_packed(bits: int, n: int, k: int, group: int | None, asym: bool,
                scale_dtype: torch.dtype, seed: int = 0, device: str = DEVICE) -> PackedLinear:
    """Signed codes, scales and zero points drawn at random, packed as the library does."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = 1 if group is None else math.ceil(k / group)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, g, generator=gen) * 0.02 + 0.005).to(scale_dtype)
    zp = torch.randint(lo, hi + 1, (n, g), generator=gen, dtype=torch.int8) if asym else None
    return PackedLinear(
        weight_packed=pack_codes(q.int() - lo, bits).to(device),
        weight_scale=scale.to(device),
        weight_zero_point=None if zp is None else pack_codes(zp.int().t() - lo, bits).t().contiguous().to(device),
        bits=bits,
        shape=(n, k),
        group_size=group,
    )


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| relative to max |ref|."""
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
