"""Tiny exported checkpoints for the serving tests, and their reference (the engine's fake-quantized model).

One checkpoint holds every variant through per-layer config groups (exact-name targets): 2/3/4-bit weights,
sym and asym, per channel and groups of 32, W4A4 with sym and asym activations, and the online R4 on every
down_proj (width 192 = 12 * 16, so the exact order-12 ``had_k`` extension is exercised). Fused vLLM layers
(qkv, gate_up) take one variant for all their shards.
"""

from __future__ import annotations

import json
import os

import torch
from safetensors.torch import save_file

from loaq.shards import other_tensors
from transformers import AutoModelForCausalLM, LlamaConfig

from loaq.arch import arch_of
from loaq.checkpoint import save_native
from loaq.config import Method, QuantConfig
from loaq.export.scheme import quantization_config
from loaq.export.transform import online_hadamard
from loaq.export.writer import export
from loaq.grids import GridSpec, rtn
from loaq.kernels.hadamard_ref import hadamard_transform_ref
from loaq.kernels.w4a4_ref import quantize_activations_ref
from loaq.pipeline import quantize_model
from loaq.solver import QuantResult
from tests.tiny import tiny_tokenizer

LAYERS = 5
UNITS = {"qkv": ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"], "o": ["self_attn.o_proj"],
         "gate_up": ["mlp.gate_proj", "mlp.up_proj"], "down": ["mlp.down_proj"]}
WEIGHT_ONLY = [(GridSpec(b, g, s), None) for b in (2, 3, 4) for g in (0, 32) for s in (False, True)]
W4A4 = [(GridSpec(4, 0, True), {"bits": 4, "symmetric": True}), (GridSpec(4, 0, False), {"bits": 4, "symmetric": False})]
# 15 non-down units take the 12 weight-only variants, both W4A4 and one more; the 5 down_projs (online R4) five
_OTHER = WEIGHT_ONLY + W4A4 + [WEIGHT_ONLY[2]]
_DOWN = [WEIGHT_ONLY[1], WEIGHT_ONLY[6], WEIGHT_ONLY[9], W4A4[0], W4A4[1]]


CHAT_TEMPLATE = ("{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
                 "{% if add_generation_prompt %}assistant:{% endif %}")


def assignment(w4a4: bool = True, group: int = 32) -> dict[str, tuple[GridSpec, dict | None]]:
    """Full module name -> (weight grid, activations or None); ``w4a4=False``: the same grids, weight-only;
    ``group``: the group size of the grouped non-down_proj variants (64 = 128 / 2 splits over two TP ranks)."""
    out, other = {}, iter(_OTHER)
    for i in range(LAYERS):
        for unit, mods in UNITS.items():
            spec, act = _DOWN[i] if unit == "down" else next(other)
            if unit != "down" and spec.group_size:
                spec = GridSpec(spec.bits, group, spec.symmetric)
            out |= {f"model.layers.{i}.{m}": (spec, act if w4a4 else None) for m in mods}
    return out


def tiny_serving_model(seed: int = 0):
    """A Llama small enough to start fast and large enough for vLLM's CPU attention (head_dim 32)."""
    cfg = LlamaConfig(vocab_size=320, hidden_size=128, intermediate_size=192, num_hidden_layers=LAYERS,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
                      tie_word_embeddings=False, bos_token_id=None, eos_token_id=1)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
            elif p.ndim == 2:
                p.normal_(0, 0.25 if "lm_head" in n or "embed" in n else 0.08)
    return model


def hadamard_12() -> torch.Tensor:
    from compressed_tensors.transform.utils.hadamard import _fetch_hadamard_divisor

    return _fetch_hadamard_divisor(12, torch.float32)


def build(path: str, w4a4: bool = True, dtype: str = "float32", group: int = 32, r4_blocks: int = 1) -> str:
    """Native checkpoint ``path/native`` and its export ``path/export`` of the tiny model with every variant
    (``w4a4=False``: every layer weight-only; ``group`` as in :func:`assignment`; ``r4_blocks`` 2: the R4 of
    ``--r4-blocks 2``, √2 (I_2 ⊗ H_12) ⊗ H_8, which two tensor-parallel ranks apply on their own halves)."""
    from loaq.hadamard import block_diagonal

    model, tok = tiny_serving_model(), tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    plan = assignment(w4a4, group)
    had_k = hadamard_12() if r4_blocks == 1 else block_diagonal(192, r4_blocks).had_k
    cfg = QuantConfig(spec=GridSpec(4, 0, False), method=Method("rtn"))
    results = quantize_model(model, arch_of(model.config), torch.zeros(1, 1, dtype=torch.long), cfg, progress=False)
    for name, (spec, _) in plan.items():
        results[name] = QuantResult(*rtn(model.get_submodule(name).weight.detach(), spec))
    meta = {"config": cfg.to_dict(), "calibration": {"source": "none"}, "source_model": "tiny-serving",
            "arch": "LlamaForCausalLM", "layer_specs": {n: vars(s) for n, (s, _) in plan.items()},
            "rotation": {"kind": "hadamard", "seed": 0, "r4": {"order": 192, "had_k_order": had_k.shape[0]}}}
    native, out = os.path.join(path, "native"), os.path.join(path, "export")
    save_native(native, model, tok, results, meta, force=True)
    save_file({"r4.had_k": had_k}, os.path.join(native, "rotation.safetensors"))
    export(native, out, dtype=getattr(torch, dtype), force=True)
    _set_activations(out, plan)
    return out


def _set_activations(out: str, plan: dict) -> None:
    """Rewrite the export's config groups with per-layer ``input_activations`` (the exporter applies one
    ``activations`` entry to the whole model; a test checkpoint mixes W4A4 and weight-only layers)."""
    p = os.path.join(out, "config.json")
    config = json.load(open(p))
    qc = config["quantization_config"]
    groups: dict[tuple, list[str]] = {}
    for name, (spec, act) in sorted(plan.items()):
        groups.setdefault((spec, json.dumps(act)), []).append(name)
    new = {}
    for i, ((spec, act), names) in enumerate(groups.items()):
        sub = quantization_config({n: spec for n in names}, json.loads(act))
        new[f"group_{i}"] = next(iter(sub.config_groups.values())).model_dump(mode="json", exclude_none=False)
    qc["config_groups"] = new
    json.dump(config, open(p, "w"), indent=2)


def reference_model(export_dir: str, native_dir: str, w4a4: bool = True, group: int = 32, tp: int = 1):
    """HF float32 model with the export's dequantized weights, the online R4 before every down_proj and per-token
    activation fake-quant (:func:`quantize_activations_ref`) on every W4A4 layer's input, as the contract defines;
    ``tp`` > 1: row-parallel layers (o_proj, down_proj) quantize activations per token per tensor-parallel shard
    of their input (what each rank computes, :mod:`loaq.serve.shard`)."""
    from tests.export.test_export import decompressed

    model = tiny_serving_model()
    sd = other_tensors(native_dir)
    sd |= {f"{n}.weight": w.float() for n, w in decompressed(export_dir).items()}
    model.load_state_dict(sd, strict=True)
    r4 = online_hadamard(export_dir)
    for name, (_, act) in assignment(w4a4, group).items():
        had = r4[name] if name in r4 else False
        row = name.endswith(("o_proj", "down_proj"))
        model.get_submodule(name).register_forward_pre_hook(_pre_hook(had, act, tp if row else 1))
    return model


def fake_quant_activations(x: torch.Tensor, sym: bool) -> torch.Tensor:
    a = quantize_activations_ref(x.reshape(-1, x.shape[-1]), sym)
    y = (a.codes.float() - a.zero.float()[:, None]) * a.scale[:, None]
    return y.reshape(x.shape).to(x.dtype)


def _pre_hook(had_k, act, shards: int = 1):
    def hook(_module, args):
        x = args[0]
        if had_k is not False:
            x = hadamard_transform_ref(x, had_k)
        if act:
            x = torch.cat([fake_quant_activations(s, act["symmetric"]) for s in x.chunk(shards, -1)], -1)
        return (x,)

    return hook


def build_w4a16(path: str, marker: bool) -> str:
    """The tiny model at W4 symmetric groups of 32 on every linear (llm-compressor's W4A16 scheme; its default
    group of 128 does not divide the tiny down_proj's 192 inputs), exported to ``path/export``; ``marker=False``
    drops the ``loaq_format`` block: then it is a stock compressed-tensors W4A16 checkpoint as llm-compressor
    writes one (same config groups, tensors and packing)."""
    model, tok = tiny_serving_model(), tiny_tokenizer()
    spec = GridSpec(4, 32, True)
    cfg = QuantConfig(spec=spec, method=Method("rtn"))
    results = quantize_model(model, arch_of(model.config), torch.zeros(1, 1, dtype=torch.long), cfg, progress=False)
    meta = {"config": cfg.to_dict(), "calibration": {"source": "none"}, "source_model": "tiny-serving",
            "arch": "LlamaForCausalLM"}
    native, out = os.path.join(path, "native"), os.path.join(path, "export")
    save_native(native, model, tok, results, meta, force=True)
    export(native, out, dtype=torch.float32, force=True)
    if not marker:
        p = os.path.join(out, "config.json")
        config = json.load(open(p))
        del config["quantization_config"]["loaq_format"]
        json.dump(config, open(p, "w"), indent=2)
    return out


def save_bf16(path: str) -> str:
    """The tiny model unquantized in bfloat16 with its tokenizer (a stock model for vLLM)."""
    model, tok = tiny_serving_model(), tiny_tokenizer()
    model.to(torch.bfloat16).save_pretrained(path)
    tok.save_pretrained(path)
    return path
