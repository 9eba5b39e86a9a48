"""Per-layer grids as a compressed-tensors ``QuantizationConfig`` (weight-only, ``pack-quantized``).

Layers are grouped by ``(bits, group_size, symmetric)``; each group becomes one config group whose
``targets`` name its layers exactly, so a per-layer bit allocation exports as several groups.
``scheme_for`` builds one group's :class:`QuantizationScheme`; activation quantization
(``input_activations``) and a ``transform_config`` are the places a W4A4 / Hadamard export will extend.
"""

from __future__ import annotations

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             QuantizationStatus, QuantizationStrategy)

from loaq.grids import GridSpec

FORMAT = CompressionFormat.pack_quantized.value
IGNORE = ["lm_head"]


def weight_args(spec: GridSpec) -> QuantizationArgs:
    """compressed-tensors' weight arguments of one grid: int, static, channel (``group_size`` 0) or group,
    float32 scales (see :mod:`loaq.export.pack`)."""
    common = dict(num_bits=spec.bits, type="int", symmetric=spec.symmetric, dynamic=False, scale_dtype=torch.float32)
    if spec.group_size:
        return QuantizationArgs(**common, strategy=QuantizationStrategy.GROUP, group_size=spec.group_size)
    return QuantizationArgs(**common, strategy=QuantizationStrategy.CHANNEL)


def scheme_for(spec: GridSpec, targets: list[str]) -> QuantizationScheme:
    return QuantizationScheme(targets=targets, weights=weight_args(spec), format=FORMAT)


def group_layers(specs: dict[str, GridSpec]) -> dict[GridSpec, list[str]]:
    """Layers of each distinct grid, grids in a stable order (bits, group size, symmetry)."""
    groups: dict[GridSpec, list[str]] = {}
    for name in sorted(specs):
        groups.setdefault(specs[name], []).append(name)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].bits, kv[0].group_size, kv[0].symmetric)))


def quantization_config(specs: dict[str, GridSpec]) -> QuantizationConfig:
    """The ``quantization_config`` of an export whose layer ``name`` uses grid ``specs[name]``."""
    groups = {f"group_{i}": scheme_for(spec, names) for i, (spec, names) in enumerate(group_layers(specs).items())}
    return QuantizationConfig(config_groups=groups, format=FORMAT, ignore=list(IGNORE),
                              quantization_status=QuantizationStatus.COMPRESSED)


def layer_specs(config: QuantizationConfig) -> dict[str, GridSpec]:
    """The inverse of :func:`quantization_config`: grid of every targeted layer (exact-name targets)."""
    out = {}
    for scheme in config.config_groups.values():
        w = scheme.weights
        spec = GridSpec(w.num_bits, w.group_size if w.strategy == QuantizationStrategy.GROUP.value else 0, w.symmetric)
        out |= {t: spec for t in scheme.targets}
    return out
