"""Load an export with transformers so that it computes what the LoaQ vLLM plugin serves.

transformers + compressed-tensors decompress the packed weights bit-exactly (float32 scales), but
transformers 5.19 ignores ``transform_config`` (the online R4) and the library's own dynamic
activation quantizer is not the kernels' formula. So :func:`load_export`:

1. drops ``input_activations`` from the config before loading (weights only through the library);
2. registers the engine's forward pre-hooks: the online R4 (:class:`loaq.rotation.OnlineHadamard`, with
   the ``had_k`` of :func:`loaq.export.transform.online_hadamard`) on every target, then the W4A4
   activation fake-quantizer (:mod:`loaq.actquant`) on every layer whose group quantizes activations.

The result equals :func:`loaq.checkpoint.load_native` of the checkpoint it came from (float32 exports).
"""

from __future__ import annotations

import copy

import torch

from loaq.actquant import ActQuantizer
from loaq.export.check import parse_quantization_config
from loaq.export.scheme import activations
from loaq.export.transform import online_hadamard
from loaq.rotation import OnlineHadamard


def load_export(path: str, dtype: torch.dtype = torch.float32):
    """(model, tokenizer) of the export in ``path`` with its online R4 and W4A4 activations simulated."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    acts = activations(parse_quantization_config(path))
    r4 = online_hadamard(path)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    qc = copy.deepcopy(config.quantization_config)
    qc = qc if isinstance(qc, dict) else qc.to_dict()
    for group in qc["config_groups"].values():
        group["input_activations"] = None
    qc.pop("transform_config", None)
    config.quantization_config = qc
    model = AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype, local_files_only=True).eval()
    for name, had_k in r4.items():
        model.get_submodule(name).register_forward_pre_hook(OnlineHadamard(had_k))
    for name, act in acts.items():
        if act:
            model.get_submodule(name).register_forward_pre_hook(ActQuantizer(act["symmetric"]))
    return model, AutoTokenizer.from_pretrained(path, local_files_only=True)
