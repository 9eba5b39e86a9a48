"""``loaq-export --check``: every file matches ``loaq_manifest.json`` (SHA-256), the ``loaq_format`` block of
``quantization_config`` (packing layout and LoaQ export marker) matches the config groups, the export parses with compressed-tensors' own models and holds every
tensor a loader expects, with the dtype and shape its grid implies."""

from __future__ import annotations

import json
import os

import torch
from safetensors import SafetensorError, safe_open

from loaq.arch import arch_of
from loaq.errors import LoaQError
from loaq.export import layouts
from loaq.export.manifest import MANIFEST, verify_manifest
from loaq.export.pack import MARKER_KEY, check_marker, packed_shapes
from loaq.export.scheme import FORMAT, activations, layer_specs
from loaq.export.transform import online_hadamard
from loaq.hadamard import blocks_of
from loaq.moe import unfuse

ST_DTYPES = {"I32": torch.int32, "I64": torch.int64, "F32": torch.float32, "F16": torch.float16,
             "BF16": torch.bfloat16, "I8": torch.int8, "U8": torch.uint8}


def _json(path: str) -> dict:
    try:
        out = json.load(open(path))
    except (ValueError, OSError) as exc:  # JSONDecodeError, UnicodeDecodeError
        raise LoaQError(f"{path} is not valid JSON ({str(exc).splitlines()[0]}); export again") from None
    if not isinstance(out, dict):
        raise LoaQError(f"{path} is not a JSON object; export again")
    return out


def _safe_open(path: str):
    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise LoaQError(f"{path} is truncated or corrupted ({str(exc).splitlines()[0]}); export again") from None


def _quantization_config(path: str) -> dict:
    """The raw ``quantization_config`` of the export in ``path``, refused in one line unless it is a
    compressed-tensors pack-quantized one."""
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise LoaQError(f"{path!r} is not an export (no config.json); pass the directory `loaq-export` wrote")
    qc = _json(cfg_path).get("quantization_config")
    if not qc or qc.get("quant_method") != "compressed-tensors" or qc.get("format") != FORMAT:
        raise LoaQError(f"{cfg_path} has no compressed-tensors {FORMAT} quantization_config")
    return qc


def _validated(qc: dict, path: str):
    from compressed_tensors.quantization import QuantizationConfig

    try:
        return QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    except ValueError as exc:
        raise LoaQError(f"{os.path.join(path, 'config.json')}: quantization_config does not parse: "
                        f"{str(exc).splitlines()[0]}") from None


def parse_quantization_config(path: str):
    return _validated(_quantization_config(path), path)


def checkpoint_layout(path: str) -> str:
    """The bit layout (:mod:`loaq.export.layouts`) of the export in ``path``, from the compressed-tensors
    version its ``quantization_config`` records; one line when that version's packing is unknown."""
    qc = _quantization_config(path)
    qconfig = _validated(qc, path)
    return layouts.layout_of(qc.get("version"), [s.weights.num_bits for s in qconfig.config_groups.values()])


def tensor_index(path: str) -> dict[str, str]:
    """Tensor name -> safetensors file, from the index when sharded; every listed file must exist."""
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        weight_map = _json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise LoaQError(f"{index} has no weight_map; export again")
    else:
        with _safe_open(os.path.join(path, "model.safetensors")) as f:
            weight_map = dict.fromkeys(f.keys(), "model.safetensors")
    for fname in sorted(set(weight_map.values())):
        if not os.path.isfile(os.path.join(path, fname)):
            raise LoaQError(f"{path!r}: shard {fname} listed in the index is missing")
    return weight_map


def _header(path: str, weight_map: dict[str, str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    out = {}
    for fname in sorted(set(weight_map.values())):
        with _safe_open(os.path.join(path, fname)) as f:
            for k in f.keys():
                s = f.get_slice(k)
                out[k] = (tuple(s.get_shape()), ST_DTYPES.get(s.get_dtype()))
    missing = sorted(set(weight_map) - set(out))
    if missing:
        raise LoaQError(f"{path!r}: tensor {missing[0]} is in the index but in no shard")
    return out


def check_export(path: str) -> str:
    """Validate the export in ``path``; returns a one-line summary or raises a one-line :class:`LoaQError`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if not os.path.isdir(path):
        raise LoaQError(f"{path!r} does not exist")
    hashed = verify_manifest(path)  # first: a damaged file is named before anything parses it
    qconfig = parse_quantization_config(path)
    raw = _json(os.path.join(path, "config.json"))
    marker = raw["quantization_config"].get(MARKER_KEY, raw.get(MARKER_KEY))  # top level: exports before 2026-11-30
    if marker is not None:
        check_marker(marker, qconfig, os.path.join(path, "config.json"))
    specs = layer_specs(qconfig)
    acts = activations(qconfig)
    r4 = online_hadamard(path)
    weight_map = tensor_index(path)
    header = _header(path, weight_map)
    config = AutoConfig.from_pretrained(path, local_files_only=True)
    with torch.device("meta"):  # shapes only; from_config applies no quantization
        model = unfuse(AutoModelForCausalLM.from_config(config), arch_of(config))
    expected: dict[str, tuple[tuple[int, ...], torch.dtype | None]] = {}
    for name, spec in specs.items():
        try:
            out_f, in_f = model.get_submodule(name).weight.shape
        except AttributeError:
            raise LoaQError(f"{path!r}: config target {name} is not a layer of this model") from None
        expected |= {f"{name}.{k}": v for k, v in packed_shapes(out_f, in_f, spec).items()}
    tied = getattr(config, "tie_word_embeddings", False)
    for k, p in model.state_dict().items():
        if k.removesuffix(".weight") in specs or (tied and k == "lm_head.weight"):
            continue
        expected[k] = (tuple(p.shape), None)
    for k, (shape, dtype) in expected.items():
        if k not in header:
            raise LoaQError(f"{path!r}: tensor {k} is missing")
        got_shape, got_dtype = header[k]
        if got_shape != shape or (dtype is not None and got_dtype != dtype):
            raise LoaQError(f"{path!r}: tensor {k} is {got_dtype} {list(got_shape)}, expected {dtype or 'float'} {list(shape)}")
    extra = sorted(set(header) - set(expected))
    if extra:
        raise LoaQError(f"{path!r}: unexpected tensor {extra[0]} ({len(extra)} in all)")
    for name in specs:
        fname = weight_map[f"{name}.weight_shape"]
        with _safe_open(os.path.join(path, fname)) as f:
            shape = f.get_tensor(f"{name}.weight_shape").tolist()
        if shape != list(model.get_submodule(name).weight.shape):
            raise LoaQError(f"{path!r}: {name}.weight_shape is {shape}, the model's layer is {list(model.get_submodule(name).weight.shape)}")
    for name, act in acts.items():
        if act and (specs[name].bits, specs[name].group_size, act["bits"]) != (4, 0, 4):
            raise LoaQError(f"{path!r}: {name} quantizes activations but is not W4A4 with per-channel weights")
    for name, had_k in r4.items():
        if name not in specs:
            raise LoaQError(f"{path!r}: transform target {name} is not a packed linear of this export")
        width = model.get_submodule(name).weight.shape[1]
        k = 1 if had_k is None else had_k.shape[0]
        if width % k or (width // k) & (width // k - 1):
            raise LoaQError(f"{path!r}: online Hadamard of {name} does not fit its input width {width}")
    groups = len(qconfig.config_groups)
    notes = (f"{hashed} files match {MANIFEST}" if hashed is not None else f"no {MANIFEST}: files not verified")
    if marker is None:
        notes += (f"; no {MARKER_KEY} marker: packing assumed compressed-tensors 0.17's, and the vLLM plugin serves "
                  "it as a stock checkpoint")
    elif MARKER_KEY not in raw["quantization_config"]:
        notes += (f"; {MARKER_KEY} at the top level of config.json (an older export): the vLLM plugin serves it as a "
                  "stock checkpoint; export again to mark it")
    extras = ("; W4A4" if any(acts.values()) else "") + (f"; online R4 on {len(r4)} linears" if r4 else "")
    blocks = {blocks_of(h) for h in r4.values()}
    extras += f" in {min(blocks)} diagonal blocks" if r4 and blocks != {1} else ""
    return (f"ok: {len(specs)} packed linears in {groups} config group(s), {len(header)} tensors in "
            f"{len(set(weight_map.values()))} file(s); {notes}{extras}")


def decompress_export(path: str) -> dict[str, torch.Tensor]:
    """Every packed linear of an export dequantized by compressed-tensors' own ``PackedQuantizationCompressor``,
    or by :func:`loaq.export.layouts.dequantize` when the installed library packs differently."""
    from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor

    qconfig = parse_quantization_config(path)
    layout = checkpoint_layout(path)
    weight_map = tensor_index(path)
    out = {}
    for scheme in qconfig.config_groups.values():
        for name in scheme.targets:
            local = {}
            for key in (k for k in weight_map if k.startswith(name + ".")):
                with _safe_open(os.path.join(path, weight_map[key])) as f:
                    local[key.removeprefix(name + ".")] = f.get_tensor(key)
            if layout == layouts.library_layout():
                local["weight_scale"] = local["weight_scale"].float()  # float16 scales: an exact float32 product
                out[name] = PackedQuantizationCompressor.decompress(local, scheme)["weight"]
            else:
                out[name] = dequantize_layer(local, scheme.weights, layout)
    return out


def dequantize_layer(local: dict[str, torch.Tensor], weights, layout: str) -> torch.Tensor:
    """One layer's dense weight from its tensors (local names) and ``QuantizationArgs``, in ``layout``."""
    if "weight_g_idx" in local or weights.strategy not in ("channel", "group"):
        raise LoaQError(f"{weights.strategy} weights{' with weight_g_idx' if 'weight_g_idx' in local else ''} "
                        f"are read by compressed-tensors only; install the version that wrote them")
    group = weights.group_size if weights.strategy == "group" else None
    return layouts.dequantize(local, weights.num_bits, group, weights.symmetric, layout)


def round_trip(native_dir: str, path: str) -> tuple[int, int]:
    """(linears, bit-identical linears): the export decompressed by the library vs the native dequantized weights."""
    from loaq.checkpoint import dequantized
    from loaq.export.writer import read_native

    native = read_native(native_dir)
    got = decompress_export(path)
    same = 0
    for names in native.groups():
        same += sum(torch.equal(got[n].float(), dequantized(r, native.specs[n])) for n, r in native.results(names).items()
                    if n in got)
    return len(native.quantized), same
