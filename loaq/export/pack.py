"""One quantized linear in compressed-tensors' ``pack-quantized`` layout, packed by the library itself.

Native codes and zero points are unsigned (``0..2^b-1``); compressed-tensors stores signed ones
(``code - 2^(b-1)``), packs ``32 // b`` of them per int32 along the input dim (3 bits: 10 per word,
2 high bits unused) and the zero points along the output dim. Symmetric grids have signed zero 0
and store none. ``weight_scale`` is written in the grid's ``scale_dtype``: float32 by default, or float16,
whose values the solver already rounded to float16 (:func:`loaq.grids.representable`), so the cast is exact.
The library dequantizes as ``(q - z).to(scale.dtype) * scale``: with float32 scales that is bit-identical to
:func:`loaq.checkpoint.dequantized`; with float16 ones its float16 product rounds, so LoaQ's readers (``--check``,
:func:`loaq.export.load.load_export`, the serving kernels) multiply in float32 and stay bit-identical.

Other compressed-tensors versions pack differently (0.19 packs 3-bit codes densely across words), so an
export names its layout in ``quantization_config.loaq_format`` (:func:`format_marker`):
``{"format_version": 1, "compressed_tensors": "0.17.0", "packing": {"group_0": "int32-10x3bit", ...}}``,
``int32-{32 // b}x{b}bit`` per config group; ``--check`` validates it (:func:`check_marker`). The block is also
the LoaQ export marker the vLLM plugin routes by (:mod:`loaq.serve.routing`); compressed-tensors' and
transformers' config models ignore the extra key.
"""

from __future__ import annotations

import math

import torch
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.serve import routing
from loaq.solver import QuantResult

MARKER_KEY = routing.MARKER_KEY  # defined where the plugin's guard reads it on any vLLM (no heavy imports)
MARKER_VERSION = 1


def _signed(unsigned: torch.Tensor, bits: int) -> torch.Tensor:
    return (unsigned.to(torch.int32) - 2 ** (bits - 1)).to(torch.int8)


def pack_layer(r: QuantResult, spec: GridSpec) -> dict[str, torch.Tensor]:
    """Local-name tensors (``weight_packed``, ``weight_scale``, ``weight_shape``[, ``weight_zero_point``])."""
    out = {
        "weight_packed": pack_to_int32(_signed(r.codes, spec.bits), spec.bits),
        "weight_scale": r.scales.to(spec.scale_torch_dtype).contiguous(),
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
        "weight_scale": ((out_features, n_groups), spec.scale_torch_dtype),
        "weight_shape": ((2,), torch.int64),
    }
    if not spec.symmetric:
        shapes["weight_zero_point"] = ((math.ceil(out_features / per_word), n_groups), torch.int32)
    return shapes


def layout(bits: int) -> str:
    """Name of :func:`pack_layer`'s layout: ``32 // bits`` codes per int32 word, low bits first."""
    return f"int32-{32 // bits}x{bits}bit"


def format_marker(qconfig) -> dict:
    """The ``loaq_format`` block of an export with compressed-tensors ``QuantizationConfig`` ``qconfig``."""
    from compressed_tensors import __version__

    return {"format_version": MARKER_VERSION, "compressed_tensors": __version__,
            "packing": {g: layout(s.weights.num_bits) for g, s in qconfig.config_groups.items()}}


def check_marker(marker, qconfig, where: str) -> None:
    """Refuse a ``loaq_format`` block that is not :func:`format_marker`'s layout for ``qconfig``'s groups."""
    if not isinstance(marker, dict) or marker.get("format_version") != MARKER_VERSION:
        version = marker.get("format_version") if isinstance(marker, dict) else marker
        raise LoaQError(f"{where}: {MARKER_KEY}.format_version {version!r} is not {MARKER_VERSION}; "
                        "check it with the LoaQ that wrote it or re-export")
    if not isinstance(marker.get("compressed_tensors"), str):
        raise LoaQError(f"{where}: {MARKER_KEY}.compressed_tensors (the packing library's version) is missing; re-export")
    packing = marker.get("packing") if isinstance(marker.get("packing"), dict) else {}
    for g, scheme in qconfig.config_groups.items():
        want = layout(scheme.weights.num_bits)
        if packing.get(g) != want:
            raise LoaQError(f"{where}: {MARKER_KEY}.packing.{g} is {packing.get(g)!r}, but LoaQ packs "
                            f"{scheme.weights.num_bits}-bit weights as {want!r}; re-export with `loaq-export`")
    extra = sorted(set(packing) - set(qconfig.config_groups))
    if extra:
        raise LoaQError(f"{where}: {MARKER_KEY}.packing names {extra[0]!r}, which is no config group; re-export")
