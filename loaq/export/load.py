"""Load an export with transformers so that it computes what the LoaQ vLLM plugin serves.

transformers + compressed-tensors decompress the packed weights bit-exactly (float32 scales), but
transformers 5.19 ignores ``transform_config`` (the online R4) and the library's own dynamic
activation quantizer is not the kernels' formula. So :func:`load_export`:

1. drops ``input_activations`` from the config before loading (weights only through the library);
   when the checkpoint's bit layout is not the installed library's (a 3-bit export of compressed-tensors
   0.18-0.20, :mod:`loaq.export.layouts`), it builds the model without ``quantization_config`` and loads
   every packed linear dequantized by :func:`loaq.export.check.dequantize_layer` instead, the same
   ``(q - z) * scale``; a layout it cannot determine is refused with one line;
2. registers the engine's forward pre-hooks: the online R4 (:class:`loaq.rotation.OnlineHadamard`, with
   the ``had_k`` of :func:`loaq.export.transform.online_hadamard`) on every target, then the W4A4
   activation fake-quantizer (:mod:`loaq.actquant`) on every layer whose group quantizes activations.

The result equals :func:`loaq.checkpoint.load_native` of the checkpoint it came from (float32 exports).
"""

from __future__ import annotations

import copy
import os

import torch

from loaq.actquant import ActQuantizer
from loaq.arch import arch_of
from loaq.errors import LoaQError
from loaq.export.check import checkpoint_layout, dequantize_layer, parse_quantization_config, tensor_index
from loaq.export.layouts import library_layout
from loaq.export.scheme import activations
from loaq.export.transform import online_hadamard
from loaq.moe import unfuse
from loaq.rotation import OnlineHadamard


def load_export(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the export in ``path`` with its online R4 and W4A4 activations simulated."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    qconfig = parse_quantization_config(path)
    layout = checkpoint_layout(path)
    acts = activations(qconfig)
    r4 = online_hadamard(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    qc = copy.deepcopy(config.quantization_config)
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    for group in qc["config_groups"].values():
        group["input_activations"] = None
    qc.pop("transform_config", None)
    config.quantization_config = qc
    if layout == library_layout() and not arch_of(config).num_experts(config):  # MoE: per-expert names, below
        model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True).eval()
    else:
        model = _load_decoded(path, config, qconfig, layout, dtype)
    for name, had_k in r4.items():
        model.get_submodule(name).register_forward_pre_hook(OnlineHadamard(had_k))
    for name, act in acts.items():
        if act:
            model.get_submodule(name).register_forward_pre_hook(ActQuantizer(act["symmetric"]))
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)


def _load_decoded(path: str, config, qconfig, layout: str, dtype: torch.dtype):
    """The model of ``config`` (quantization dropped) with every tensor of ``path``, packed linears dequantized."""
    from compressed_tensors.utils.match import is_match
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    config = copy.deepcopy(config)
    del config.quantization_config
    model = unfuse(AutoModelForCausalLM.from_config(config, dtype=dtype).eval(), arch_of(config))
    weight_map = tensor_index(path)
    tensors: dict[str, torch.Tensor] = {}
    for fname in sorted(set(weight_map.values())):
        with safe_open(os.path.join(path, fname), "pt") as f:
            tensors |= {k: f.get_tensor(k) for k in f.keys()}
    state = {}
    for name in sorted({k.removesuffix(".weight_packed") for k in tensors if k.endswith(".weight_packed")}):
        module = model.get_submodule(name)
        schemes = [s for s in qconfig.config_groups.values() if is_match(name, module, s.targets, qconfig.ignore)]
        if not schemes:
            raise LoaQError(f"{path!r}: packed layer {name} matches no config group of its quantization_config")
        local = {k.removeprefix(name + "."): tensors.pop(k) for k in list(tensors) if k.startswith(name + ".weight_")}
        state[name + ".weight"] = dequantize_layer(local, schemes[0].weights, layout).to(dtype)
    state |= {k: v.to(dtype) if v.is_floating_point() else v for k, v in tensors.items()}
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        bad = (missing or unexpected)[0]
        raise LoaQError(f"{path!r}: tensor {bad} is {'missing' if missing else 'not a parameter of the model'}")
    model.tie_weights()
    return model
