"""Simulated activation quantization (W4A4): per-token dynamic min-max on every quantized linear's input.

The fake-quantized value is ``(codes - zero) * scale`` of the serving kernels' reference
:func:`loaq.kernels.w4a4_ref.quantize_activations_ref` (computed in float32, cast back to the input
dtype), so calibration, evaluation and serving see the same activations.
It runs as a forward pre-hook on each quantized linear, after any other pre-hook already there
(the online Hadamard R4 before ``down_proj``, :mod:`loaq.rotation`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loaq.errors import LoaQError
from loaq.kernels.w4a4_ref import quantize_activations_ref


@dataclass(frozen=True)
class ActSpec:
    """Activation bits (16 = unquantized, 4 = W4A4) and symmetry of the per-token grid."""

    bits: int = 16
    symmetric: bool = False

    def __post_init__(self):
        if self.bits not in (4, 16):
            raise LoaQError(f"--act-bits {self.bits} is not supported; use 16 (weight-only) or 4 (W4A4)")

    @property
    def enabled(self) -> bool:
        return self.bits < 16

    def meta(self) -> dict | None:
        """The checkpoint's ``"activations"`` entry (:mod:`loaq.checkpoint`)."""
        return {"bits": self.bits, "symmetric": self.symmetric} if self.enabled else None

    def quantize(self, x: torch.Tensor) -> torch.Tensor:
        """``Q_a(x)``: :func:`fake_quantize` of ``x`` per token, or ``x`` itself when activations stay unquantized."""
        return fake_quantize(x, self.symmetric) if self.enabled else x


def fake_quantize(x: torch.Tensor, symmetric: bool) -> torch.Tensor:
    """Per-token (last dim) 4-bit fake quantization of ``x`` with the kernels' exact formulas."""
    a = quantize_activations_ref(x.reshape(-1, x.shape[-1]), symmetric)
    y = (a.codes.float() - a.zero.float()[:, None]) * a.scale[:, None]
    return y.reshape(x.shape).to(x.dtype)


class ActQuantizer:
    """Forward pre-hook replacing a linear's input by its fake-quantized value."""

    def __init__(self, symmetric: bool):
        self.symmetric = symmetric

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        return (fake_quantize(args[0], self.symmetric), *args[1:])


def attach(linears: list[nn.Module], spec: ActSpec) -> list:
    """Quantize the inputs of ``linears`` per ``spec`` from now on; returns the hook handles."""
    if not spec.enabled:
        return []
    return [lin.register_forward_pre_hook(ActQuantizer(spec.symmetric)) for lin in linears]
