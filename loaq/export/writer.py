"""Write a native checkpoint as a compressed-tensors Hugging Face directory.

1. read and validate the native checkpoint's index (complete, every expected linear, group sizes divide);
2. plan the output shards from the tensor headers alone (``max_shard_size``; a native shard, one decoder
   layer, is never split);
3. one native shard at a time: read it, check and pack every quantized linear (:mod:`loaq.export.pack`),
   cast the other tensors to ``dtype``, and stream them into their output shard
   (:class:`loaq.shards.SafetensorsStream`), so memory holds one layer, never the state dict;
4. write ``model.safetensors.index.json`` (when sharded), ``config.json`` with the
   ``quantization_config`` written by compressed-tensors with the ``loaq_format`` block inside it (packing
   layout and LoaQ export marker: :func:`loaq.export.pack.format_marker`), tokenizer, generation config, model
   card, and last
   ``loaq_manifest.json`` (:mod:`loaq.export.manifest`); all into a temporary sibling directory renamed
   to the output at the end.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass

import torch
from safetensors.torch import save_file

from loaq.arch import arch_of
from loaq.checkpoint import atomic_dir, check_output, layer_specs, read_meta, tensors_to_results
from loaq.errors import LoaQError
from loaq.export.manifest import write_manifest
from loaq.export.pack import MARKER_KEY, format_marker, pack_layer, packed_shapes
from loaq.export.scheme import quantization_config
from loaq.export.transform import EXTENSION_KEY, r4_config, r4_targets
from loaq.hadamard import blocks_of
from loaq.grids import GridSpec
from loaq.shards import PARTS, NativeTensors, SafetensorsStream, is_quantized_part
from loaq.solver import QuantResult

NATIVE_ONLY = {"loaq.json", "quantized.safetensors", "model.safetensors", "rotation.safetensors", "config.json"}


@dataclass
class Native:
    """A native checkpoint with its index validated: metadata, HF config dict, its tensors (read per shard:
    :class:`loaq.shards.NativeTensors`), quantized linears and their grids."""

    path: str
    meta: dict
    config: dict
    tensors: NativeTensors
    quantized: list[str]
    specs: dict[str, GridSpec]
    act: dict | None = None  # W4A4: {"bits": 4, "symmetric": bool}
    r4: tuple[list[str], int, torch.Tensor | None] | None = None  # online R4: (targets, width, had_k)

    def results(self, names: list[str] | None = None) -> dict[str, QuantResult]:
        """The quantized linears among tensor ``names`` (default: all; prefer one group of :meth:`groups`), checked."""
        names = list(self.tensors.weight_map) if names is None else names
        results = tensors_to_results(self.tensors.read([n for n in names if is_quantized_part(n)]), self.path)
        for name, r in results.items():
            _check_layer(name, r, self.specs[name])
        return results

    def groups(self) -> list[list[str]]:
        return self.tensors.groups()


def expected_linears(config) -> list[str]:
    arch = arch_of(config)
    return [f"{arch.layers}.{i}.{n}" for i in range(config.num_hidden_layers) for n in arch.linear_names(arch.num_experts(config))]


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
    if not torch.equal(r.zeros, torch.round(r.zeros)):
        raise LoaQError(f"{name} has real-valued zero points (--neuqi-continuous), which compressed-tensors cannot "
                        "hold; re-quantize with --init neuqi (integer zero points) to export")
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
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LoaQError(f"native checkpoint {path!r} is incomplete: config.json is missing; re-run `loaq quantize`")
    try:
        config = AutoConfig.from_pretrained(path, local_files_only=True)
        config_dict = json.load(open(os.path.join(path, "config.json")))
    except (OSError, ValueError) as exc:
        raise LoaQError(f"{os.path.join(path, 'config.json')} does not load ({str(exc).splitlines()[0]}); "
                        "the checkpoint is damaged, re-run `loaq quantize`") from None
    tensors = NativeTensors(path)
    quantized = tensors.quantized_names()
    for n in quantized:
        for part in PARTS:
            if f"{n}.{part}" not in tensors.weight_map:
                raise LoaQError(f"{path} lacks tensor {n}.{part}; the checkpoint is damaged, re-run `loaq quantize`")
    missing = [n for n in expected_linears(config) if n not in quantized]
    if missing:
        raise LoaQError(_missing_message(path, missing))
    specs = layer_specs(meta, quantized)
    act = _activations(path, meta, specs)
    return Native(path, meta, config_dict, tensors, quantized, specs, act, _online_r4(path, meta, config))


def _activations(path: str, meta: dict, specs: dict[str, GridSpec]) -> dict | None:
    """The native ``activations`` entry, refused unless the W4A4 kernels can run it (4-bit per-channel weights)."""
    act = meta.get("activations")
    if not act:
        return None
    if act.get("bits") != 4 or not isinstance(act.get("symmetric"), bool):
        raise LoaQError(f"{path!r}: activations {act} cannot be exported; LoaQ writes 4-bit per-token activations only")
    bad = sorted(n for n, s in specs.items() if (s.bits, s.group_size) != (4, 0))
    if bad:
        raise LoaQError(f"{path!r}: W4A4 needs 4-bit per-channel weights, but {bad[0]} is {specs[bad[0]]}; "
                        "re-quantize with --bits 4 --group-size 0")
    return {"bits": 4, "symmetric": act["symmetric"]}


def _online_r4(path: str, meta: dict, config) -> tuple[list[str], int, torch.Tensor | None] | None:
    """(targets, width, had_k) of a rotated checkpoint's online R4 (``rotation.safetensors`` holds ``r4.had_k``)."""
    from loaq.rotation import load_had_k

    rot = meta.get("rotation")
    if not rot:
        return None
    had_k = load_had_k(path)
    k = rot.get("r4", {}).get("had_k_order", 1)
    if (1 if had_k is None else had_k.shape[0]) != k:
        raise LoaQError(f"native checkpoint {path!r} is rotated with a {k}x{k} R4 factor but rotation.safetensors "
                        "does not hold it; re-run `loaq quantize`")
    return r4_targets(arch_of(config), config.num_hidden_layers), config.intermediate_size, had_k


def export_tensors(native: Native, dtype: torch.dtype, names: list[str] | None = None) -> dict[str, torch.Tensor]:
    """The exported tensors of native tensor ``names`` (one group of :meth:`Native.groups`; default: all):
    packed linears (scales in each grid's scale_dtype) and the other tensors in ``dtype``."""
    names = list(native.tensors.weight_map) if names is None else names
    sd = {k: v.to(dtype) if v.is_floating_point() else v
          for k, v in native.tensors.read([n for n in names if not is_quantized_part(n)]).items()}
    for name, r in native.results(names).items():
        sd |= {f"{name}.{k}": v for k, v in pack_layer(r, native.specs[name]).items()}
    return dict(sorted(sd.items()))


def export_plan(native: Native, dtype: torch.dtype, names: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """(shape, dtype) of every tensor :func:`export_tensors` makes of ``names``, from the headers alone, in its order."""
    plan = {}
    for k, (shape, dt) in native.tensors.header([n for n in names if not is_quantized_part(n)]).items():
        plan[k] = (shape, dtype if dt.is_floating_point else dt)
    codes = native.tensors.header([n for n in names if n.endswith(".codes")])
    for k, (shape, _) in codes.items():
        name = k.removesuffix(".codes")
        plan |= {f"{name}.{t}": v for t, v in packed_shapes(*shape, native.specs[name]).items()}
    return dict(sorted(plan.items()))


def _bytes(plan: dict) -> int:
    return sum(math.prod(shape) * torch.empty((), dtype=dt).element_size() for shape, dt in plan.values())


def stream_shards(native: Native, dtype: torch.dtype, out_dir: str, max_shard_size: int | str) -> list[str]:
    """Write the export's tensors one native group (layer) at a time into ``model.safetensors`` or
    ``model-0000i-of-0000n.safetensors`` + index (consecutive groups share a shard up to ``max_shard_size``);
    returns the file names."""
    from huggingface_hub.serialization._base import parse_size_to_int

    limit = parse_size_to_int(max_shard_size) if isinstance(max_shard_size, str) else max_shard_size
    groups = native.groups()
    plans = [export_plan(native, dtype, g) for g in groups]
    shards: list[list[int]] = []
    size = 0
    for i, plan in enumerate(plans):
        b = _bytes(plan)
        if not shards or size + b > limit:
            shards.append([])
            size = 0
        shards[-1].append(i)
        size += b
    n = len(shards)
    names = ["model.safetensors"] if n == 1 else [f"model-{k:05d}-of-{n:05d}.safetensors" for k in range(1, n + 1)]
    weight_map = {}
    for fname, members in zip(names, shards):
        plan = {k: v for i in members for k, v in plans[i].items()}
        out = SafetensorsStream(os.path.join(out_dir, fname), plan, {"format": "pt"})
        try:
            for i in members:
                sd = export_tensors(native, dtype, groups[i])
                if list(sd) != list(plans[i]):
                    raise LoaQError(f"{native.path}: layer tensors {sorted(set(sd) ^ set(plans[i]))[:3]} differ from "
                                    "the shard headers; the checkpoint is damaged, re-run `loaq quantize`")
                for k, v in sd.items():
                    out.write(k, v)
                del sd
        finally:
            out.fh.close()
        out.close()
        weight_map |= dict.fromkeys(plan, fname)
    if n > 1:
        index = {"metadata": {"total_size": sum(_bytes(p) for p in plans)}, "weight_map": dict(sorted(weight_map.items()))}
        with open(os.path.join(out_dir, "model.safetensors.index.json"), "w") as fh:
            json.dump(index, fh, indent=2)
    return names


def model_card(native: Native, total_bytes: int) -> str:
    m, c = native.meta, native.meta["config"]
    method = c.get("method") if isinstance(c.get("method"), dict) else {}
    grids = sorted({(s.bits, s.group_size, s.symmetric) for s in native.specs.values()})
    grid_txt = "; ".join(f"W{b}, {'group ' + str(g) if g else 'per channel'}, {'symmetric' if s else 'asymmetric'}"
                         for b, g, s in grids)
    cal = m.get("calibration")
    cal_txt = ("none (round to nearest)" if not cal else
               f"{cal.get('source', '?')}: {cal.get('nsamples', '?')} × {cal.get('seqlen', '?')} tokens, "
               f"seed {cal.get('seed', '?')}, hash {cal.get('hash', '?')}")
    lines = [
        f"# {m.get('source_model', 'model')} — {method.get('name', '?')} {grid_txt}", "",
        f"Quantized with [LoaQ](https://arxiv.org/abs/2509.06297) (`loaq`, method `{method.get('name', '?')}`, "
        f"α = {method.get('alpha')}, β = {method.get('beta')}) and exported in the compressed-tensors "
        "`pack-quantized` format (load with vLLM + the `loaq` plugin; weight-only exports without rotation "
        "also with transformers + compressed-tensors).", "",
        "| | |", "|---|---|",
        f"| source model | {m.get('source_model', '?')} |",
        f"| weights | {grid_txt}; {len(native.quantized)} linears, lm_head and embeddings unquantized |",
        f"| activations | {_act_text(native.act)} |",
        f"| rotation | {_rotation_text(native)} |",
        f"| calibration | {cal_txt} |",
        f"| size | {total_bytes / 2**20:.1f} MiB of safetensors |",
    ]
    if "eval" in m:
        e = m["eval"]
        lines.append(f"| perplexity | {e['ppl']:.3f} (full precision {e.get('fp_ppl', float('nan')):.3f}; "
                     f"{e.get('tokens', '?')} tokens, window {e.get('seqlen', '?')}) |")
    else:
        lines.append("| perplexity | not measured (`loaq quantize --eval` records it) |")
    return "\n".join(lines) + "\n"


def _act_text(act: dict | None) -> str:
    if not act:
        return "not quantized (weight-only)"
    return f"{act['bits']}-bit per token, dynamic min-max, {'symmetric' if act['symmetric'] else 'asymmetric'}"


def _rotation_text(native: Native) -> str:
    if native.r4 is None:
        return "none"
    _, n, had_k = native.r4
    k = 1 if had_k is None else had_k.shape[0]
    kind = native.meta["rotation"].get("r4", {}).get("kind", "hadamard")
    r4 = f"H_{n}" if k == 1 else f"H_{k} ⊗ H_{n // k}" if kind == "hadamard" else f"({kind} {k}x{k}) ⊗ H_{n // k}"
    if (blocks := blocks_of(had_k)) > 1:
        r4 += f" = {blocks} diagonal blocks (serve with a tensor-parallel size dividing {blocks})"
    return (f"Hadamard (seed {native.meta['rotation'].get('seed')}): R1, R2 fused into the weights; online R4 = {r4} "
            "before every down_proj (`transform_config`; the LoaQ vLLM plugin applies it)")


def add_marker(config_path: str, marker: dict) -> None:
    """Put the ``loaq_format`` block (packing layout and LoaQ export marker) into ``quantization_config``."""
    with open(config_path) as fh:
        config = json.load(fh)
    config["quantization_config"][MARKER_KEY] = marker
    with open(config_path, "w") as fh:
        json.dump(config, fh, indent=2)


def export(native_dir: str, out_dir: str, *, dtype: torch.dtype = torch.bfloat16, force: bool = False,
           max_shard_size: int | str = "2GB") -> list[str]:
    """Export ``native_dir`` to ``out_dir``; returns the written safetensors file names."""
    from compressed_tensors.compressors import ModelCompressor

    check_output(out_dir, force)
    native = read_native(native_dir)
    with atomic_dir(out_dir, force, prefix=".loaq-export-") as tmp:
        files = stream_shards(native, dtype, tmp, max_shard_size)
        for f in sorted(os.listdir(native_dir)):
            if f not in NATIVE_ONLY and os.path.isfile(os.path.join(native_dir, f)):
                shutil.copy2(os.path.join(native_dir, f), os.path.join(tmp, f))
        tc, ext = r4_config(*native.r4) if native.r4 else (None, None)
        qconfig = quantization_config(native.specs, native.act)
        config = dict(native.config, dtype=str(dtype).removeprefix("torch."), **({EXTENSION_KEY: ext} if ext else {}))
        config.pop("torch_dtype", None)
        with open(os.path.join(tmp, "config.json"), "w") as fh:
            json.dump(config, fh, indent=2)
        ModelCompressor(quantization_config=qconfig, transform_config=tc).update_config(tmp)  # adds quantization_config
        add_marker(os.path.join(tmp, "config.json"), format_marker(qconfig))
        with open(os.path.join(tmp, "loaq_export.json"), "w") as fh:
            json.dump({"native": native.meta}, fh, indent=2)
        total = sum(os.path.getsize(os.path.join(tmp, f)) for f in files)
        with open(os.path.join(tmp, "README.md"), "w") as fh:
            fh.write(model_card(native, total))
        write_manifest(tmp)
    return files
