"""Random checkpoint tensors in the ``pack-quantized`` format, packed by compressed-tensors."""

import math

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from loaq.kernels.layout import PackedLinear

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def make_packed(bits: int, n: int, k: int, group: int | None, asym: bool,
                scale_dtype: torch.dtype, seed: int = 0, device: str = DEVICE) -> PackedLinear:
    """Signed codes, scales and zero points drawn at random, packed by the library."""
    gen = torch.Generator().manual_seed(seed)
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    g = 1 if group is None else math.ceil(k / group)
    q = torch.randint(lo, hi + 1, (n, k), generator=gen, dtype=torch.int8)
    scale = (torch.rand(n, g, generator=gen) * 0.02 + 0.005).to(scale_dtype)
    zp = torch.randint(lo, hi + 1, (n, g), generator=gen, dtype=torch.int8) if asym else None
    return PackedLinear(
        weight_packed=pack_to_int32(q, bits).to(device),
        weight_scale=scale.to(device),
        weight_zero_point=None if zp is None else pack_to_int32(zp, bits, packed_dim=0).to(device),
        bits=bits,
        shape=(n, k),
        group_size=group,
    )


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    """max |y - ref| relative to max |ref|."""
    return ((y.double() - ref.double()).abs().max() / ref.double().abs().max()).item()
