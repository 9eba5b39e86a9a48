"""The opaque torch custom op ``torch.ops.loaq.linear(x, handle)`` and the module that calls it.

``torch.compile`` (vLLM's, or ``benchmarks/decode.py``'s) sees one call per quantized layer: it
traces neither into the ctypes calls of the CPU kernels nor into Triton launches, and the graph
does not break there. ``handle`` is an int indexing this process's table of prepared layers
(:func:`register_layer`), which keeps the op's schema to plain types.
"""

from __future__ import annotations

import torch

from loaq.kernels.dispatch import apply_linear, prepare_linear
from loaq.kernels.kernel import LinearKernel
from loaq.kernels.layout import PackedLinear

__all__ = ["QuantLinear", "register_layer", "release_layer", "prepared_layer"]

_LAYERS: list[tuple[LinearKernel, int] | None] = []  # handle -> (prepared layer, out_features)


def register_layer(layer: LinearKernel, out_features: int) -> int:
    """Add a prepared layer to the table; returns its handle for ``torch.ops.loaq.linear``."""
    _LAYERS.append((layer, out_features))
    return len(_LAYERS) - 1


def release_layer(handle: int) -> None:
    """Drop a layer from the table (its kernel weights are freed once nothing else holds them)."""
    _LAYERS[handle] = None


def prepared_layer(handle: int) -> LinearKernel:
    entry = _LAYERS[handle]
    if entry is None:
        raise ValueError(f"quantized layer {handle} was released; swap in a new QuantLinear")
    return entry[0]


@torch.library.custom_op("loaq::linear", mutates_args=())
def _linear(x: torch.Tensor, handle: int) -> torch.Tensor:
    return apply_linear(x, prepared_layer(handle))


@_linear.register_fake
def _(x: torch.Tensor, handle: int) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], _LAYERS[handle][1])


class QuantLinear(torch.nn.Module):
    """``nn.Linear`` with a ``pack-quantized`` weight, run by the kernel :mod:`loaq.kernels.dispatch`
    picks for the weight's device (WNA16, or W4A4 with ``act_bits=4``), through ``loaq::linear``."""

    def __init__(self, w: PackedLinear, act_bits: int = 16, act_sym: bool = True,
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = w.shape
        self.handle = register_layer(prepare_linear(w, w.weight_packed.device, act_bits, act_sym), w.shape[0])
        self.bias = None if bias is None else torch.nn.Parameter(bias, requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.ops.loaq.linear(x, self.handle)
        return y if self.bias is None else y + self.bias

    def release(self) -> None:
        """Free the kernel weights now (the module must not be called afterwards)."""
        release_layer(self.handle)

    def extra_repr(self) -> str:
        p = prepared_layer(self.handle)
        return f"in_features={self.in_features}, out_features={self.out_features}, kernel={type(p).__name__}"
