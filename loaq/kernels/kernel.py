"""The kernel protocol, as vLLM's ``MPLinearKernel``: a layer's configuration, and the class each kernel is.

A kernel class answers :meth:`LinearKernel.can_implement` with ``(ok, reason)`` (the reason names what
is missing, e.g. ``"needs CUDA tensors, got cpu"``), repacks the checkpoint weight once when it is
constructed, and runs ``y = x @ W.T`` with :meth:`LinearKernel.apply`. :mod:`loaq.kernels.dispatch`
holds the kernels and picks the first that can implement a layer.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import torch

from loaq.kernels.layout import PackedLinear

__all__ = ["LinearConfig", "LinearKernel", "weight_reason", "hadamard_reason"]


@dataclass(frozen=True)
class LinearConfig:
    """What a kernel needs to know to decide whether it can run a layer."""

    device: str  # device type of the weights and activations: "cuda", "cpu", ...
    bits: int  # weight bits
    shape: tuple[int, int]  # (N, K) = (out_features, in_features)
    group_size: int | None  # None: per channel
    act_bits: int = 16  # 16: weight-only; 4: per-token 4-bit activations
    act_sym: bool = True  # symmetric activation quantizer (act_bits=4)
    hadamard: bool = False  # apply the online Hadamard transform to the activations first
    had_k: int = 1  # size K of the K×K Hadamard factor; in_features = K * 2**m

    @classmethod
    def of(cls, w: PackedLinear, device: torch.device | str, act_bits: int = 16, act_sym: bool = True,
           hadamard: bool = False, had_k: torch.Tensor | None = None) -> LinearConfig:
        """The configuration of checkpoint weight ``w`` run on ``device``."""
        return cls(torch.device(device).type, w.bits, tuple(w.shape), w.group_size, act_bits, act_sym, hadamard,
                   1 if had_k is None else had_k.shape[0])


class LinearKernel(ABC):
    """One quantized-linear kernel: construct it (the one-time repack) only if ``can_implement`` said yes."""

    def __init__(self, c: LinearConfig, w: PackedLinear, had_k: torch.Tensor | None = None) -> None:
        self.config = c
        self.had_k = None if had_k is None else had_k.to(device=w.weight_packed.device, dtype=torch.float32)
        self.weight = self.prepare_weights(w)

    @classmethod
    @abstractmethod
    def can_implement(cls, c: LinearConfig) -> tuple[bool, str | None]:
        """``(True, None)``, or ``(False, reason)`` with the reason as a short clause."""

    @abstractmethod
    def prepare_weights(self, w: PackedLinear) -> Any:
        """The kernel's weight object, repacked from the checkpoint tensors (called once)."""

    @abstractmethod
    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """``y [M, N]`` for ``x [M, K]``: the optional Hadamard transform, activation quantization, GEMM."""


def weight_reason(c: LinearConfig, act_bits: int) -> str | None:
    """Why a kernel for ``act_bits``-bit activations (16 or 4) cannot take this layer's activations or weights."""
    if c.act_bits != act_bits:
        return f"needs act_bits={act_bits}, got {c.act_bits}"
    if act_bits == 4 and (c.bits != 4 or c.group_size is not None):
        group = "per-channel" if c.group_size is None else f"group size {c.group_size}"
        return f"needs 4-bit per-channel weights, got {c.bits}-bit with {group}"
    if c.bits not in (2, 3, 4):
        return f"{c.bits}-bit weights are not supported (use 2, 3 or 4 bits)"
    if c.group_size is not None and c.group_size % 32 != 0:
        return f"group size {c.group_size} is not a multiple of 32 (use 32, 64, 128 or per-channel)"
    return None


def hadamard_reason(c: LinearConfig) -> str | None:
    """Why the online Hadamard transform cannot run on this layer's activations."""
    k = c.shape[1]
    p = k // c.had_k
    if c.hadamard and (k % c.had_k != 0 or p & (p - 1) != 0):
        return f"online Hadamard needs in_features = K * 2**m with had_k of size K, got {k} and K={c.had_k}"
    return None
