"""vLLM ``MPLinearKernel`` classes that run LoaQ's kernels through :mod:`loaq.kernels.dispatch`.

They read a layer's parameters in the compressed-tensors ``pack-quantized`` layout
(:mod:`loaq.kernels.layout`: ``weight_packed`` [N, ceil(K/pf)], ``weight_scale`` [N, G],
``weight_zero_point`` packed along N), repack them once with ``prepare_linear`` and call
``apply_linear`` per forward. :class:`LoaQCPULinearKernel` uses the C++/OpenMP path,
:class:`LoaQTritonLinearKernel` the Triton kernels (CUDA; on CPU tensors under ``TRITON_INTERPRET=1``).

The call goes through one opaque torch custom op, ``torch.ops.loaq.linear(x, handle)``
(:mod:`loaq.kernels.op`), so that vLLM's ``torch.compile`` neither traces into ctypes/Triton
launches nor breaks the graph; ``handle`` indexes this process's table of prepared layers.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear.mixed_precision.MPLinearKernel import MPLinearKernel, MPLinearLayerConfig
from vllm.platforms import current_platform
from vllm.scalar_type import scalar_types

from loaq.kernels.dispatch import (
    CpuW4A4Kernel, CpuWNA16Kernel, TritonW4A4Kernel, TritonWNA16Kernel, check_linear, prepare_linear,
)
from loaq.kernels.layout import PackedLinear
from loaq.kernels.op import prepared_layer, register_layer

__all__ = ["LoaQCPULinearKernel", "LoaQTritonLinearKernel", "WEIGHT_TYPES", "prepared_layer"]

# vLLM's scalar types of 2/3/4-bit codes: symmetric (bias 2**(bits-1)) and with zero points.
WEIGHT_TYPES = {
    (2, True): scalar_types.uint2b2, (3, True): scalar_types.uint3b4, (4, True): scalar_types.uint4b8,
    (2, False): scalar_types.uint2, (3, False): scalar_types.uint3, (4, False): scalar_types.uint4,
}
_BITS = {t.id: (bits, sym) for (bits, sym), t in WEIGHT_TYPES.items()}

class _LoaQLinearKernel(MPLinearKernel):
    """Common body; subclasses fix the backend ("cpu" or "triton"), its LoaQ kernel classes and the platform."""

    backend = ""
    loaq_kernels: tuple = ()
    # set by LoaQLinearScheme after construction (stock schemes leave them: WNA16, no transform)
    act_bits = 16
    act_sym = True
    hadamard = False
    had_k: torch.Tensor | None = None

    @classmethod
    def _platform_ok(cls) -> bool:
        raise NotImplementedError

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not cls._platform_ok():
            return False, f"{cls.__name__} runs on {'CPU' if cls.backend == 'cpu' else 'CUDA'} only"
        if c.weight_type.id not in _BITS:
            return False, f"{cls.__name__} takes 2/3/4-bit integer weights, got {c.weight_type}"
        if c.act_type not in (torch.float16, torch.bfloat16, torch.float32):
            return False, f"{cls.__name__} takes fp16/bf16/fp32 activations, got {c.act_type}"
        k, n = c.partition_weight_shape
        bits, sym = _BITS[c.weight_type.id]
        w = PackedLinear(torch.empty(0), torch.empty(n, 1 if c.group_size == -1 else -(-k // c.group_size)), None,
                         bits, (n, k), None if c.group_size == -1 else c.group_size)
        reason = check_linear(w, "cuda" if cls.backend == "triton" else "cpu", kernels=cls.loaq_kernels)
        return reason is None, reason

    def packed_linear(self, layer: torch.nn.Module) -> PackedLinear:
        """The layer's checkpoint tensors (compressed-tensors layout) as a :class:`PackedLinear`."""
        c = self.config
        w_q, w_s, w_zp = self._get_weight_params(layer)
        if getattr(w_q, "packed_dim", 1) != 1 or getattr(w_q, "input_dim", 1) != 1:
            raise ValueError(f"{type(self).__name__} needs weights packed along the input dim "
                             "(compressed-tensors pack-quantized), not the GPTQ layout")
        k, n = c.partition_weight_shape
        bits, sym = _BITS[c.weight_type.id]
        return PackedLinear(w_q.data, w_s.data, None if sym else w_zp.data, bits, (n, k),
                            None if c.group_size == -1 else c.group_size)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        w = self.packed_linear(layer)
        prepared = prepare_linear(w, w.weight_packed.device, self.act_bits, self.act_sym, self.hadamard,
                                  self.had_k, kernels=self.loaq_kernels)
        layer.loaq_handle = register_layer(prepared, w.shape[0])
        for name in (self.w_q_name, self.w_s_name, self.w_zp_name):  # the kernel keeps its own copy
            if name and getattr(layer, name, None) is not None:
                delattr(layer, name)
                setattr(layer, name, None)

    def apply_weights(self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        y = torch.ops.loaq.linear(x, layer.loaq_handle)
        return y if bias is None else y + bias


class LoaQCPULinearKernel(_LoaQLinearKernel):
    backend = "cpu"
    loaq_kernels = (CpuWNA16Kernel, CpuW4A4Kernel)

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @classmethod
    def _platform_ok(cls) -> bool:
        return current_platform.is_cpu()


class LoaQTritonLinearKernel(_LoaQLinearKernel):
    backend = "triton"
    loaq_kernels = (TritonWNA16Kernel, TritonW4A4Kernel)  # CPU tensors: under TRITON_INTERPRET=1 (tests)

    @classmethod
    def get_min_capability(cls) -> int:
        return 75

    @classmethod
    def _platform_ok(cls) -> bool:
        return current_platform.is_cuda() or current_platform.is_cpu()  # CPU: TRITON_INTERPRET=1 (tests)
