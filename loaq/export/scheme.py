"""Per-layer grids as a compressed-tensors ``QuantizationConfig`` (``pack-quantized``).

Layers are grouped by ``(bits, group_size, symmetric)``; each group becomes one config group whose
``targets`` name its layers exactly, so a per-layer bit allocation exports as several groups.
``scheme_for`` builds one group's :class:`QuantizationScheme`. A W4A4 checkpoint (native
``activations = {"bits": 4, "symmetric": s}``) adds ``input_activations`` to every group: int, 4 bits,
per token, dynamic, symmetric as quantized — the per-token min-max of
:func:`loaq.kernels.w4a4_ref.quantize_activations_ref`.
"""

from __future__ import annotations

import torch
from compressed_tensors.config import CompressionFormat
from compressed_tensors.quantization import (QuantizationArgs, QuantizationConfig, QuantizationScheme,
                                             QuantizationStatus, QuantizationStrategy)

from loaq.errors import LoaQError
from loaq.grids import SCALE_DTYPES, GridSpec

FORMAT = CompressionFormat.pack_quantized.value
IGNORE = ["lm_head"]


def weight_args(spec: GridSpec) -> QuantizationArgs:
    """compressed-tensors' weight arguments of one grid: int, static, channel (``group_size`` 0) or group,
    scales in ``spec.scale_dtype`` (see :mod:`loaq.export.pack`)."""
    common = dict(num_bits=spec.bits, type="int", symmetric=spec.symmetric, dynamic=False,
                  scale_dtype=spec.scale_torch_dtype)
    if spec.group_size:
        return QuantizationArgs(**common, strategy=QuantizationStrategy.GROUP, group_size=spec.group_size)
    return QuantizationArgs(**common, strategy=QuantizationStrategy.CHANNEL)


def scale_dtype_name(dtype) -> str:
    """``GridSpec.scale_dtype`` of compressed-tensors' ``scale_dtype`` (unset: float32, what LoaQ always wrote)."""
    names = {v: k for k, v in SCALE_DTYPES.items()}
    if dtype is None:
        return "float32"
    if dtype not in names:
        raise LoaQError(f"weight scales in {dtype} are not LoaQ's; export again (scales are float32 or float16)")
    return names[dtype]


def act_args(act: dict) -> QuantizationArgs:
    """compressed-tensors' ``input_activations`` of a native ``activations`` entry (dynamic, per token)."""
    return QuantizationArgs(num_bits=act["bits"], type="int", symmetric=act["symmetric"], dynamic=True,
                            strategy=QuantizationStrategy.TOKEN)


def scheme_for(spec: GridSpec, targets: list[str], act: dict | None = None) -> QuantizationScheme:
    return QuantizationScheme(targets=targets, weights=weight_args(spec), format=FORMAT,
                              input_activations=act_args(act) if act else None)


def group_layers(specs: dict[str, GridSpec]) -> dict[GridSpec, list[str]]:
    """Layers of each distinct grid, grids in a stable order (bits, group size, symmetry)."""
    groups: dict[GridSpec, list[str]] = {}
    for name in sorted(specs):
        groups.setdefault(specs[name], []).append(name)
    return dict(sorted(groups.items(), key=lambda kv: (kv[0].bits, kv[0].group_size, kv[0].symmetric)))


def quantization_config(specs: dict[str, GridSpec], act: dict | None = None) -> QuantizationConfig:
    """The ``quantization_config`` of an export whose layer ``name`` uses grid ``specs[name]``, with per-token
    ``act`` (native ``activations``) input quantization on every layer when given."""
    groups = {f"group_{i}": scheme_for(spec, names, act) for i, (spec, names) in enumerate(group_layers(specs).items())}
    return QuantizationConfig(config_groups=groups, format=FORMAT, ignore=list(IGNORE),
                              quantization_status=QuantizationStatus.COMPRESSED)


def layer_specs(config: QuantizationConfig) -> dict[str, GridSpec]:
    """The inverse of :func:`quantization_config`: grid of every targeted layer (exact-name targets)."""
    out = {}
    for scheme in config.config_groups.values():
        w = scheme.weights
        spec = GridSpec(w.num_bits, w.group_size if w.strategy == QuantizationStrategy.GROUP.value else 0, w.symmetric,
                        scale_dtype=scale_dtype_name(w.scale_dtype))
        out |= {t: spec for t in scheme.targets}
    return out


def activations(config: QuantizationConfig) -> dict[str, dict | None]:
    """The inverse for activations: native ``activations`` entry (or None) of every targeted layer."""
    out = {}
    for scheme in config.config_groups.values():
        a = scheme.input_activations
        out |= {t: {"bits": a.num_bits, "symmetric": a.symmetric} if a else None for t in scheme.targets}
    return out
