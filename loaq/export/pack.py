"""One quantized linear in compressed-tensors' ``pack-quantized`` layout, packed by the library itself.

Native codes and zero points are unsigned (``0..2^b-1``); compressed-tensors stores signed ones
(``code - 2^(b-1)``), packs ``32 // b`` of them per int32 along the input dim (3 bits: 10 per word,
2 high bits unused) and the zero points along the output dim. Symmetric grids have signed zero 0
and store none. ``weight_scale`` stays float32: the library dequantizes as
``(q - z).to(scale.dtype) * scale``, so with the native float32 scales the result is bit-identical
to :func:`loaq.checkpoint.dequantized`; bf16/fp16 scales would round them.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from loaq.grids import GridSpec
from loaq.solver import QuantResult


def _signed(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    return (unsigned.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)


def pack_layer(r: QuantResult, spec: GridSpec) -> dict[str, torch.Tensor]:
    """Local-name tensors (``weight_packed``, ``weight_scale``, ``weight_shape``[, ``weight_zero_point``])."""
    out = {
        "weight_packed": pack_to_int32(_signed(r.codes, spec.bits), spec.bits),
        "weight_scale": r.scales.float().contiguous(),
        "weight_shape": torch.tensor(r.codes.shape, dtype=torch.int64),
    }
    if not spec.symmetric:
        out["weight_zero_point"] = pack_to_int32(_signed(r.zeros, spec.bits), spec.bits, packed_dim=0).contiguous()
    return out


def packed_shapes(out_features: int, in_features: int, spec: GridSpec) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Shape and dtype of every tensor :func:`pack_layer` writes for an [out, in] layer."""
    per_word = 32 // spec.bits
    n_groups = spec.n_groups(in_features)
    shapes = {
        "weight_packed": ((out_features, math.ceil(in_features / per_word)), torch.int32),
        "weight_scale": ((out_features, n_groups), torch.float32),
        "weight_shape": ((2,), torch.int64),
    }
    if not spec.symmetric:
        shapes["weight_zero_point"] = ((math.ceil(out_features / per_word), n_groups), torch.int32)
    return shapes
