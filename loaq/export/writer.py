"""Write a native checkpoint as a compressed-tensors Hugging Face directory.

1. read and validate the native checkpoint (complete, every expected linear, group sizes divide);
2. pack every quantized linear (:mod:`loaq.export.pack`), cast the other tensors to ``dtype``;
3. write safetensors shards (+ ``model.safetensors.index.json``), ``config.json`` with the
   ``quantization_config`` written by compressed-tensors, tokenizer, generation config, model card;
   all into a temporary sibling directory renamed to the output at the end.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from loaq.arch import arch_of
from loaq.checkpoint import atomic_dir, check_output, read_meta, tensors_to_results
from loaq.errors import LoaQError
from loaq.export.pack import pack_layer
from loaq.export.scheme import quantization_config
from loaq.grids import GridSpec
from loaq.solver import QuantResult

DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
NATIVE_ONLY = {"loaq.json", "quantized.safetensors", "model.safetensors", "config.json"}


@dataclass
class Native:
    """A validated native checkpoint: its metadata, HF config dict, other tensors and quantized layers."""

    path: str
    meta: dict
    config: dict
    base: dict[str, torch.Tensor]
    results: dict[str, QuantResult]
    specs: dict[str, GridSpec]


def layer_specs(meta: dict, names: list[str]) -> dict[str, GridSpec]:
    """Grid of every quantized linear: the run's ``config.spec``, overridden per layer by ``layer_specs``
    (``{name: {bits, group_size, symmetric}}``) where present (a per-layer allocation; read by export only)."""
    base = GridSpec(**meta["config"]["spec"])
    over = meta.get("layer_specs", {})
    return {n: GridSpec(**over[n]) if n in over else base for n in names}


def expected_linears(config) -> list[str]:
    arch = arch_of(config)
    return [f"{arch.layers}.{i}.{n}" for i in range(config.num_hidden_layers) for n in arch.linear_names()]


def _missing_message(path: str, missing: list[str]) -> str:
    shown = ", ".join(missing[:4]) + (f" and {len(missing) - 4} more" if len(missing) > 4 else "")
    return f"native checkpoint {path!r} lacks {len(missing)} quantized linear(s): {shown}; re-run `loaq quantize` for it"


def _check_layer(name: str, r: QuantResult, spec: GridSpec) -> None:
    out_f, in_f = r.codes.shape
    if spec.group_size and in_f % spec.group_size:
        raise LoaQError(f"group size {spec.group_size} does not divide the input width {in_f} of {name}; "
                        "re-quantize with a group size that divides every layer's input width")
    if tuple(r.scales.shape) != (out_f, spec.n_groups(in_f)) or r.zeros.shape != r.scales.shape:
        raise LoaQError(f"{name}: scales {tuple(r.scales.shape)} do not match {spec} on [{out_f}, {in_f}]; "
                        "the native checkpoint is inconsistent, re-run `loaq quantize`")
    if int(r.codes.max()) > spec.maxq or int(r.zeros.max()) > spec.maxq or int(r.zeros.min()) < 0:
        raise LoaQError(f"{name}: codes or zero points exceed {spec.bits} bits; the native checkpoint is inconsistent")


def read_native(path: str) -> Native:
    """Load and validate a native checkpoint; every problem is a one-line :class:`LoaQError`."""
    from transformers import AutoConfig

    if not os.path.isdir(path):
        raise LoaQError(f"native checkpoint {path!r} does not exist; pass the directory `loaq quantize --out` wrote")
    if os.path.exists(os.path.join(path, "run.json")) and not os.path.exists(os.path.join(path, "loaq.json")):
        raise LoaQError(f"{path!r} is an interrupted run, not a checkpoint; finish it with `loaq quantize --resume`")
    meta = read_meta(path)
    for f in ("quantized.safetensors", "model.safetensors", "config.json"):
        if not os.path.isfile(os.path.join(path, f)):
            raise LoaQError(f"native checkpoint {path!r} is incomplete: {f} is missing; re-run `loaq quantize`")
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    results = tensors_to_results(load_file(os.path.join(path, "quantized.safetensors")))
    missing = [n for n in expected_linears(config) if n not in results]
    if missing:
        raise LoaQError(_missing_message(path, missing))
    specs = layer_specs(meta, sorted(results))
    for name, r in results.items():
        _check_layer(name, r, specs[name])
    base = load_file(os.path.join(path, "model.safetensors"))
    return Native(path, meta, json.load(open(os.path.join(path, "config.json"))), base, results, specs)


def export_tensors(native: Native, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The exported state dict: packed linears (float32 scales) and the other tensors in ``dtype``."""
    sd = {k: v.to(dtype) if v.is_floating_point() else v for k, v in native.base.items()}
    for name, r in native.results.items():
        sd |= {f"{name}.{k}": v for k, v in pack_layer(r, native.specs[name]).items()}
    return sd


def save_shards(sd: dict[str, torch.Tensor], out_dir: str, max_shard_size: int | str) -> list[str]:
    """``model.safetensors`` or ``model-0000i-of-0000n.safetensors`` + index; returns the file names."""
    from huggingface_hub import split_torch_state_dict_into_shards

    split = split_torch_state_dict_into_shards(sd, max_shard_size=max_shard_size)
    for fname, keys in split.filename_to_tensors.items():
        save_file({k: sd[k].contiguous() for k in keys}, os.path.join(out_dir, fname), metadata={"format": "pt"})
    if split.is_sharded:
        index = {"metadata": {**split.metadata}, "weight_map": dict(sorted(split.tensor_to_filename.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2)
    return sorted(split.filename_to_tensors)


def model_card(native: Native, total_bytes: int) -> str:
    m, c = native.meta, native.meta["config"]
    grids = sorted({(s.bits, s.group_size, s.symmetric) for s in native.specs.values()})
    grid_txt = "; ".join(f"W{b}, {'group ' + str(g) if g else 'per channel'}, {'symmetric' if s else 'asymmetric'}"
                         for b, g, s in grids)
    cal = m.get("calibration", {})
    lines = [
        f"# {m.get('source_model', 'model')} — {c['method']['name']} {grid_txt}", "",
        f"Quantized with [LoaQ](https://arxiv.org/abs/2509.06297) (`loaq`, method `{c['method']['name']}`, "
        f"α = {c['method'].get('alpha')}, β = {c['method'].get('beta')}) and exported in the compressed-tensors "
        "`pack-quantized` format (weight-only; load with vLLM or transformers + compressed-tensors).", "",
        "| | |", "|---|---|",
        f"| source model | {m.get('source_model', '?')} |",
        f"| weights | {grid_txt}; {len(native.results)} linears, lm_head and embeddings unquantized |",
        f"| calibration | {cal.get('source', '?')}: {cal.get('nsamples', '?')} × {cal.get('seqlen', '?')} tokens, "
        f"seed {cal.get('seed', '?')}, hash {cal.get('hash', '?')} |",
        f"| size | {total_bytes / 2**20:.1f} MiB of safetensors |",
    ]
    if "eval" in m:
        e = m["eval"]
        lines.append(f"| perplexity | {e['ppl']:.3f} (full precision {e.get('fp_ppl', float('nan')):.3f}; "
                     f"{e.get('tokens', '?')} tokens, window {e.get('seqlen', '?')}) |")
    else:
        lines.append("| perplexity | not measured (`loaq quantize --eval` records it) |")
    return "\n".join(lines) + "\n"


def export(native_dir: str, out_dir: str, *, dtype: torch.dtype = torch.bfloat16, force: bool = False,
           max_shard_size: int | str = "2GB") -> list[str]:
    """Export ``native_dir`` to ``out_dir``; returns the written safetensors file names."""
    from compressed_tensors.compressors import ModelCompressor

    check_output(out_dir, force)
    native = read_native(native_dir)
    with atomic_dir(out_dir, force, prefix=".loaq-export-") as tmp:
        files = save_shards(export_tensors(native, dtype), tmp, max_shard_size)
        for f in sorted(os.listdir(native_dir)):
            if f not in NATIVE_ONLY and os.path.isfile(os.path.join(native_dir, f)):
                shutil.copy2(os.path.join(native_dir, f), os.path.join(tmp, f))
        config = dict(native.config, dtype=str(dtype).removeprefix("torch."))
        config.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
        ModelCompressor(quantization_config=quantization_config(native.specs)).update_config(tmp)
        with open(os.path.join(tmp, "loaq_export.json"), "w") as fh:
            json.dump({"native": native.meta}, fh, indent=2)
        total = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
        with open(os.path.join(tmp, "README.md"), "w") as fh:
            fh.write(model_card(native, total))
    return files
