"""The quantized-linear kernels as classes of :mod:`loaq.kernels.kernel`, and the dispatcher over them.

Usage, as the vLLM plugin does it::

    layer = prepare_linear(PackedLinear(...), device, act_bits=16)   # once, at load: a LinearKernel
    y = apply_linear(x, layer)                                       # per forward

:data:`KERNELS` is the ordered list the dispatcher tries; the first whose ``can_implement`` says yes
runs the layer. When none can, ``prepare_linear`` raises one :class:`~loaq.errors.LoaQError` line with
every kernel's reason (``check_linear`` returns that line, or None). Supported:

=====================  ========  ======  ===========================================
kernel                 act_bits  device  weights
=====================  ========  ======  ===========================================
``CpuWNA16Kernel``     16        cpu     2/3/4-bit, per-channel or groups of 32·j
``CpuW4A4Kernel``      4         cpu     4-bit per-channel, sym or asym
``TritonWNA16Kernel``  16        cuda    2/3/4-bit, per-channel or groups of 32·j
``TritonW4A4Kernel``   4         cuda    4-bit per-channel (+ fused Hadamard)
=====================  ========  ======  ===========================================

``hadamard=True`` applies the online transform of :mod:`loaq.kernels.hadamard_ref` to the activations
first (``had_k`` the K×K factor, None when in_features is a power of two): on CPU the torch reference,
for Triton WNA16 the Triton transform, for Triton W4A4 fused into the activation quantizer.
The CPU kernels come first: under ``TRITON_INTERPRET=1`` the Triton ones also accept CPU tensors (how
the vLLM plugin's CUDA class is tested, passing ``kernels=(TritonWNA16Kernel, TritonW4A4Kernel)``).
Triton modules are imported only when a Triton kernel is constructed.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from loaq.errors import LoaQError
from loaq.kernels.cpu import CpuWeight, cpu_w4a4_linear, cpu_wna16_matmul, prepare_cpu
from loaq.kernels.hadamard_ref import hadamard_transform_ref
from loaq.kernels.kernel import LinearConfig, LinearKernel, hadamard_reason, weight_reason
from loaq.kernels.layout import PackedLinear

if TYPE_CHECKING:
    from loaq.kernels.w4a4 import W4A4Weight
    from loaq.kernels.wna16 import WNA16Weight

__all__ = ["CpuWNA16Kernel", "CpuW4A4Kernel", "TritonWNA16Kernel", "TritonW4A4Kernel", "KERNELS",
           "choose_kernel", "check_linear", "prepare_linear", "apply_linear"]


def _first(*reasons: str | None) -> tuple[bool, str | None]:
    reason = next((r for r in reasons if r is not None), None)
    return reason is None, reason


def _device_reason(c: LinearConfig, device: str) -> str | None:
    if c.device == device:
        return None
    if device == "cuda" and c.device == "cpu" and os.environ.get("TRITON_INTERPRET") == "1":
        return None  # Triton's interpreter runs the CUDA kernels on CPU tensors
    return f"needs {'CUDA' if device == 'cuda' else 'CPU'} tensors, got {c.device}"


def _triton_reason() -> str | None:
    try:
        import triton  # noqa: F401
    except ImportError:
        return "needs Triton (install loaq[kernels])"
    return None


class CpuWNA16Kernel(LinearKernel):
    """W{2,3,4}A16 on CPU: the C++/OpenMP library of :mod:`loaq.kernels.cpu`."""

    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        return _first(_device_reason(c, "cpu"), weight_reason(c, 16), hadamard_reason(c))

    def prepare_weights(self, w: PackedLinear) -> CpuWeight:
        return prepare_cpu(w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.hadamard:
            x = hadamard_transform_ref(x, self.had_k)
        return cpu_wna16_matmul(x, self.weight)


class CpuW4A4Kernel(LinearKernel):
    """W4A4 on CPU: the C++ activation quantizer and integer GEMV/GEMM of :mod:`loaq.kernels.cpu`."""

    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        return _first(_device_reason(c, "cpu"), weight_reason(c, 4), hadamard_reason(c))

    def prepare_weights(self, w: PackedLinear) -> CpuWeight:
        return prepare_cpu(w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        if self.config.hadamard:
            x = hadamard_transform_ref(x, self.had_k)
        return cpu_w4a4_linear(x, self.weight, self.config.act_sym)


class TritonWNA16Kernel(LinearKernel):
    """W{2,3,4}A16 on CUDA: :mod:`loaq.kernels.wna16`, after :mod:`loaq.kernels.hadamard`'s transform."""

    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        return _first(_device_reason(c, "cuda"), weight_reason(c, 16), hadamard_reason(c), _triton_reason())

    def prepare_weights(self, w: PackedLinear) -> WNA16Weight:
        from loaq.kernels.wna16 import prepare_wna16

        return prepare_wna16(w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        from loaq.kernels.wna16 import wna16_matmul

        if x.dtype not in (torch.float16, torch.bfloat16):
            raise ValueError(f"the Triton WNA16 kernel takes fp16 or bf16 activations, got {x.dtype}")
        if self.config.hadamard:
            from loaq.kernels.hadamard import hadamard_transform

            x = hadamard_transform(x, self.had_k)
        return wna16_matmul(x, self.weight)


class TritonW4A4Kernel(LinearKernel):
    """W4A4 on CUDA: :mod:`loaq.kernels.w4a4`, with the Hadamard transform fused into the quantizer."""

    @classmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        return _first(_device_reason(c, "cuda"), weight_reason(c, 4), hadamard_reason(c), _triton_reason())

    def prepare_weights(self, w: PackedLinear) -> W4A4Weight:
        from loaq.kernels.w4a4 import prepare_w4a4

        return prepare_w4a4(w)

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        from loaq.kernels.hadamard import hadamard_quantize
        from loaq.kernels.w4a4 import quantize_activations, w4a4_matmul

        if self.config.hadamard:
            act = hadamard_quantize(x, self.had_k, self.config.act_sym)
        else:
            act = quantize_activations(x, self.config.act_sym)
        return w4a4_matmul(act, self.weight, x.dtype)


KERNELS: tuple[type[LinearKernel], ...] = (CpuWNA16Kernel, CpuW4A4Kernel, TritonWNA16Kernel, TritonW4A4Kernel)


def choose_kernel(c: LinearConfig, kernels: Sequence[type[LinearKernel]] = KERNELS) -> type[LinearKernel]:
    """The first of ``kernels`` that can implement ``c``; else a LoaQError listing each kernel's reason."""
    reasons = []
    for kernel in kernels:
        ok, reason = kernel.can_implement(c)
        if ok:
            return kernel
        reasons.append(f"{kernel.__name__}: {reason}")
    group = "per-channel" if c.group_size is None else f"group size {c.group_size}"
    raise LoaQError(f"no kernel runs {c.bits}-bit weights ({group}) with act_bits={c.act_bits} on {c.device}: "
                    + "; ".join(reasons))


def check_linear(w: PackedLinear, device: torch.device | str, act_bits: int = 16, hadamard: bool = False,
                 had_k: torch.Tensor | None = None, kernels: Sequence[type[LinearKernel]] = KERNELS) -> str | None:
    """The one-line reason none of ``kernels`` can run this layer, or None if one can."""
    try:
        choose_kernel(LinearConfig.of(w, device, act_bits, True, hadamard, had_k), kernels)
    except LoaQError as e:
        return str(e)
    return None


def prepare_linear(w: PackedLinear, device: torch.device | str, act_bits: int = 16, act_sym: bool = True,
                   hadamard: bool = False, had_k: torch.Tensor | None = None,
                   kernels: Sequence[type[LinearKernel]] = KERNELS) -> LinearKernel:
    """Pick the kernel for this layer on ``device`` and repack its weight for it, once."""
    c = LinearConfig.of(w, device, act_bits, act_sym, hadamard, had_k)
    kernel = choose_kernel(c, kernels)
    w = PackedLinear(
        w.weight_packed.to(device), w.weight_scale.to(device),
        None if w.weight_zero_point is None else w.weight_zero_point.to(device),
        w.bits, w.shape, w.group_size,
    )
    return kernel(c, w, had_k)


def apply_linear(x: torch.Tensor, layer: LinearKernel) -> torch.Tensor:
    """``y = x @ W.T`` for x [..., K] (after the optional online Hadamard / activation quantization)."""
    shape = x.shape
    y = layer.apply(x.reshape(-1, shape[-1]))
    return y.reshape(*shape[:-1], y.shape[-1])
