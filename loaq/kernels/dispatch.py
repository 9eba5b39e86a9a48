"""Pick the kernel for a quantized linear layer by device, activation bits, weight bits.

Usage, as the vLLM plugin does it::

    layer = prepare_linear(PackedLinear(...), device, act_bits=16)   # once, at load
    y = apply_linear(x, layer)                                       # per forward

``check_linear`` returns the one-line reason a configuration is unsupported (or None);
``prepare_linear`` raises it as a ``ValueError``. Supported:

==========  ======  ===========================================  =====================
act_bits    device  weights                                      kernel
==========  ======  ===========================================  =====================
16          cuda    2/3/4-bit, per-channel or groups of 32·j     ``wna16`` (Triton)
16          cpu     2/3/4-bit, per-channel or groups of 32·j     ``cpu`` (C++/OpenMP)
4           cuda    4-bit per-channel, sym or asym               ``w4a4`` (+ fused Hadamard)
4           cpu     4-bit per-channel, sym or asym               ``cpu`` (quantizer + GEMV)
==========  ======  ===========================================  =====================

On CPU the online Hadamard runs the torch reference. ``hadamard=True`` applies the online transform of :mod:`loaq.kernels.hadamard_ref` to the
activations first (``had_k`` the K×K factor, None when in_features is a power of two);
for W4A4 on GPU it is fused into the activation quantizer.
Triton modules are imported only when a CUDA layer is prepared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from loaq.kernels.layout import PackedLinear

__all__ = ["PreparedLinear", "check_linear", "prepare_linear", "apply_linear"]


@dataclass(frozen=True)
class PreparedLinear:
    """A layer repacked for one kernel; ``weight`` is that kernel's weight object."""

    kernel: str  # "wna16", "w4a4", "cpu_wna16", "cpu_w4a4"
    weight: Any
    act_bits: int
    act_sym: bool
    hadamard: bool
    had_k: torch.Tensor | None


def check_linear(w: PackedLinear, device: torch.device | str, act_bits: int = 16,
                 hadamard: bool = False, had_k: torch.Tensor | None = None) -> str | None:
    """The reason no kernel can run this layer, or None if one can."""
    device = torch.device(device)
    n, k = w.shape
    if device.type not in ("cuda", "cpu"):
        return f"no quantized-linear kernel for device {device.type!r}; use cuda or cpu"
    if act_bits not in (4, 16):
        return f"activations of {act_bits} bits are not supported; use act_bits=16 (WNA16) or 4 (W4A4)"
    if w.bits not in (2, 3, 4):
        return f"{w.bits}-bit weights have no kernel; use 2, 3 or 4 bits"
    if w.group_size is not None and w.group_size % 32 != 0:
        return f"group_size {w.group_size} is not a multiple of 32; use 32, 64, 128 or per-channel"
    if act_bits == 4 and (w.bits != 4 or w.group_size is not None):
        return f"W4A4 needs 4-bit per-channel weights, got {w.bits}-bit with group_size {w.group_size}"
    if hadamard:
        kh = 1 if had_k is None else had_k.shape[0]
        p = k // kh
        if k % kh != 0 or p & (p - 1) != 0:
            return f"online Hadamard needs in_features = K * 2**m with had_k of size K, got {k} and K={kh}"
    if device.type == "cuda":
        try:
            import triton  # noqa: F401
        except ImportError:
            return "the CUDA kernels need Triton; install loaq[kernels]"
    return None


def prepare_linear(w: PackedLinear, device: torch.device | str, act_bits: int = 16,
                   act_sym: bool = True, hadamard: bool = False,
                   had_k: torch.Tensor | None = None, backend: str | None = None) -> PreparedLinear:
    """Repack once for the kernel that will run this layer on ``device``.

    ``backend`` ("triton" or "cpu") overrides the choice by device: "triton" on CPU tensors
    runs the CUDA kernels under ``TRITON_INTERPRET=1`` (how the vLLM plugin's CUDA classes are tested).
    """
    device = torch.device(device)
    checked = device if backend is None else ("cuda" if backend == "triton" else "cpu")
    reason = check_linear(w, checked, act_bits, hadamard, had_k)
    backend = backend or ("triton" if device.type == "cuda" else "cpu")
    if reason is not None:
        raise ValueError(reason)
    w = PackedLinear(
        w.weight_packed.to(device), w.weight_scale.to(device),
        None if w.weight_zero_point is None else w.weight_zero_point.to(device),
        w.bits, w.shape, w.group_size,
    )
    had_k = None if had_k is None else had_k.to(device=device, dtype=torch.float32)
    if backend == "triton":
        if act_bits == 4:
            from loaq.kernels.w4a4 import prepare_w4a4

            kernel, weight = "w4a4", prepare_w4a4(w)
        else:
            from loaq.kernels.wna16 import prepare_wna16

            kernel, weight = "wna16", prepare_wna16(w)
    else:
        from loaq.kernels.cpu import prepare_cpu

        kernel, weight = ("cpu_w4a4" if act_bits == 4 else "cpu_wna16"), prepare_cpu(w)
    return PreparedLinear(kernel, weight, act_bits, act_sym, hadamard, had_k)


def apply_linear(x: torch.Tensor, layer: PreparedLinear) -> torch.Tensor:
    """``y = x @ W.T`` (after the optional online Hadamard / activation quantization)."""
    shape = x.shape
    x = x.reshape(-1, shape[-1])
    if layer.kernel == "wna16":
        from loaq.kernels.wna16 import wna16_matmul

        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the CUDA WNA16 kernel takes fp16 or bf16 activations, got {x.dtype}")
        if layer.hadamard:
            from loaq.kernels.hadamard import hadamard_transform

            x = hadamard_transform(x, layer.had_k)
        y = wna16_matmul(x, layer.weight)
    elif layer.kernel == "w4a4":
        from loaq.kernels.hadamard import hadamard_quantize
        from loaq.kernels.w4a4 import quantize_activations, w4a4_matmul

        if layer.hadamard:
            act = hadamard_quantize(x, layer.had_k, layer.act_sym)
        else:
            act = quantize_activations(x, layer.act_sym)
        y = w4a4_matmul(act, layer.weight, x.dtype)
    else:
        from loaq.kernels.cpu import cpu_w4a4_linear, cpu_wna16_matmul
        from loaq.kernels.hadamard_ref import hadamard_transform_ref

        if layer.hadamard:
            x = hadamard_transform_ref(x, layer.had_k)
        if layer.kernel == "cpu_w4a4":
            y = cpu_w4a4_linear(x, layer.weight, layer.act_sym)
        else:
            y = cpu_wna16_matmul(x, layer.weight)
    return y.reshape(*shape[:-1], y.shape[-1])
