"""A tiny Qwen3-MoE export for the serving tests: one layer of 2-bit, one of 3-bit and one of 4-bit experts.

Head dim 32 (vLLM's CPU attention), expert width 64 (the CPU kernels' groups of 32); attention 4-bit per channel.
"""

from __future__ import annotations

import os

import torch

from loaq.arch import arch_of
from loaq.checkpoint import save_native
from loaq.config import Method, QuantConfig
from loaq.export.writer import export
from loaq.grids import GridSpec, rtn
from loaq.moe import unfuse
from loaq.pipeline import quantize_model
from loaq.solver import QuantResult
from tests.serve.checkpoints import CHAT_TEMPLATE
from tests.tiny import tiny_model, tiny_tokenizer

EXPERT_SPECS = [GridSpec(2, 32, False), GridSpec(3, 0, True), GridSpec(4, 32, False)]  # per layer
SIZE = dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32, moe_intermediate_size=64,
            num_hidden_layers=len(EXPERT_SPECS), bos_token_id=None)  # the served MoE's config overrides


def tiny_serving_moe():
    m = tiny_model("qwen3_moe", vocab=320, eos_token_id=1, **SIZE)
    return unfuse(m, arch_of(m.config))


def build_moe(path: str) -> tuple[str, str]:
    """(export dir, native dir) of the tiny MoE under ``path`` (RTN; experts of layer i on ``EXPERT_SPECS[i]``)."""
    model, tok = tiny_serving_moe(), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    arch = arch_of(model.config)
    cfg = QuantConfig(spec=GridSpec(4, 0, False), method=Method("rtn"))
    results = quantize_model(model, arch, torch.zeros(1, 1, dtype=torch.long), cfg, progress=False)
    specs = {}
    for name in results:
        i = int(name.split(".")[2])
        if ".experts." in name:
            specs[name] = EXPERT_SPECS[i]
            results[name] = QuantResult(*rtn(model.get_submodule(name).weight.detach(), EXPERT_SPECS[i]))
    meta = {"config": cfg.to_dict(), "calibration": {"source": "none"}, "source_model": "tiny-serving-moe",
            "arch": "Qwen3MoeForCausalLM", "layer_specs": {n: vars(s) for n, s in specs.items()}}
    native, out = os.path.join(path, "native"), os.path.join(path, "export")
    save_native(native, model, tok, results, meta, force=True)
    export(native, out, dtype=torch.float32, force=True)
    return out, native
