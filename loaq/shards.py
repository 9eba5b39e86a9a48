"""The tensors of a native checkpoint, read and written one shard (one decoder layer) at a time.

Layout ``loaq-native/2`` (written since lazy loading, issue #14): ``weights/index.json``
(``{"format", "weight_map": {tensor: file}}``) and one safetensors shard per decoder layer
(``weights/layer-00000.safetensors``: its linears' ``codes``/``scales``/``zeros`` and its other tensors,
norms and biases) plus ``weights/rest.safetensors`` (embeddings, final norm, lm_head: every tensor outside
the decoder layers). Layer shards are the per-layer files of :class:`loaq.checkpoint.LayerStore`,
written as each layer finishes and moved into the checkpoint, so no whole state dict is ever in memory.

Layout ``loaq-native/1`` (``quantized.safetensors`` + ``model.safetensors``) is still read:
:class:`NativeTensors` groups its tensors by decoder layer the same way and reads them memory-mapped.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping

import torch

from loaq.errors import LoaQError

WEIGHTS = "weights"
INDEX = "index.json"
REST = "rest.safetensors"
PARTS = ("codes", "scales", "zeros")
_LAYER = re.compile(r"\.layers\.(\d+)\.")


def layer_file(i: int) -> str:
    return f"layer-{i:05d}.safetensors"


def layer_of(name: str) -> int | None:
    """The decoder layer index in a tensor name (``model.layers.3.mlp...`` → 3), or None outside the layers."""
    m = _LAYER.search("." + name)
    return int(m[1]) if m else None


def is_quantized_part(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in PARTS


def _open(path: str):
    from safetensors import SafetensorError, safe_open

    try:
        return safe_open(path, "pt")
    except (SafetensorError, OSError) as exc:
        raise LoaQError(f"{path} is truncated or corrupted ({str(exc).splitlines()[0]}); "
                        "re-run `loaq quantize` or copy the checkpoint again") from None


class NativeTensors:
    """Name → file of every tensor of a native checkpoint (either layout); :meth:`groups` lists the names per
    decoder layer (then the rest) and :meth:`read` loads only the names asked for."""

    def __init__(self, path: str):
        self.path = path
        index = os.path.join(path, WEIGHTS, INDEX)
        if os.path.isfile(index):
            try:
                weight_map = json.load(open(index))["weight_map"]
                if not all(isinstance(k, str) and isinstance(f, str) and f == os.path.basename(f) and f.endswith(
                        ".safetensors") for k, f in weight_map.items()):
                    raise ValueError("weight_map is not tensor name → shard file name")
            except (ValueError, OSError, KeyError, TypeError, AttributeError) as exc:
                raise LoaQError(f"{index} is not a valid shard index ({str(exc).splitlines()[0]}); the checkpoint is "
                                "damaged, re-run `loaq quantize`") from None
            self.weight_map = {k: os.path.join(WEIGHTS, f) for k, f in weight_map.items()}
        else:
            self.weight_map = {}
            for f in ("model.safetensors", "quantized.safetensors"):
                p = os.path.join(path, f)
                if not os.path.isfile(p):
                    raise LoaQError(f"native checkpoint {path!r} is incomplete: {f} is missing; re-run `loaq quantize`")
                with _open(p) as fh:
                    self.weight_map |= dict.fromkeys(fh.keys(), f)
        for f in sorted(set(self.weight_map.values())):
            if not os.path.isfile(os.path.join(path, f)):
                raise LoaQError(f"native checkpoint {path!r} is incomplete: {f} is missing; re-run `loaq quantize`")

    def quantized_names(self) -> list[str]:
        return sorted({k.rsplit(".", 1)[0] for k in self.weight_map if is_quantized_part(k)})

    def groups(self) -> list[list[str]]:
        """Tensor names per decoder layer in layer order, then the names outside the layers."""
        by_layer: dict[int, list[str]] = {}
        for k in sorted(self.weight_map):
            by_layer.setdefault(layer_of(k) if layer_of(k) is not None else -1, []).append(k)
        return [by_layer[i] for i in sorted(i for i in by_layer if i >= 0)] + ([by_layer[-1]] if -1 in by_layer else [])

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        out = {}
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        for f, keys in by_file.items():
            p = os.path.join(self.path, f)
            try:
                with _open(p) as fh:
                    out |= {k: fh.get_tensor(k) for k in keys}
            except LoaQError:
                raise
            except Exception as exc:  # noqa: BLE001 - a header that parses over data that does not
                raise LoaQError(f"{p} is truncated or corrupted ({str(exc).splitlines()[0]}); "
                                "re-run `loaq quantize` or copy the checkpoint again") from None
        return out

    def header(self, names: list[str]) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """(shape, dtype) of ``names`` from the shard headers, no data read."""
        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            p = os.path.join(self.path, f)
            try:
                with _open(p) as fh:
                    for k in keys:
                        sl = fh.get_slice(k)
                        out[k] = (tuple(sl.get_shape()), DTYPES[sl.get_dtype()])
            except LoaQError:
                raise
            except Exception as exc:  # noqa: BLE001 - the index names a tensor its shard does not hold
                raise LoaQError(f"{p} is truncated or corrupted ({str(exc).splitlines()[0]}); "
                                "re-run `loaq quantize` or copy the checkpoint again") from None
        return out

    def files(self) -> list[str]:
        return sorted(set(self.weight_map.values()))


DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16, "F64": torch.float64,
          "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
          "BOOL": torch.bool}
_NAMES = {v: k for k, v in DTYPES.items()}


class SafetensorsStream:
    """A safetensors file written one tensor at a time: the header from ``plan`` (name → (shape, dtype), in
    file order) first, then each tensor's bytes as :meth:`write` gets them, in that order. Readers see an
    ordinary safetensors file; only one tensor is in memory at a time."""

    def __init__(self, path: str, plan: dict[str, tuple[tuple[int, ...], torch.dtype]], metadata: dict | None = None):
        import struct

        self.order, self.plan, offset, header = list(plan), plan, 0, {}
        if metadata:
            header["__metadata__"] = metadata
        for name, (shape, dtype) in plan.items():
            n = math.prod(shape) * torch.empty((), dtype=dtype).element_size()
            header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + n]}
            offset += n
        raw = json.dumps(header, separators=(",", ":")).encode()
        raw += b" " * (-len(raw) % 8)
        self.fh = open(path, "wb")
        self.fh.write(struct.pack("<Q", len(raw)) + raw)
        self.done = 0

    def write(self, name: str, tensor: torch.Tensor) -> None:
        if self.done >= len(self.order) or name != self.order[self.done] or \
                (tuple(tensor.shape), tensor.dtype) != self.plan[name]:
            raise ValueError(f"tensor {name} {tuple(tensor.shape)} {tensor.dtype} is not the next one planned")
        self.fh.write(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        self.done += 1

    def close(self) -> None:
        self.fh.close()
        if self.done != len(self.order):
            raise ValueError(f"only {self.done} of {len(self.order)} planned tensors were written")


def write_index(weights_dir: str, fmt: str) -> dict[str, str]:
    """Write ``index.json`` for the shards in ``weights_dir`` (read from their headers); returns the weight map."""
    weight_map = {}
    for f in sorted(os.listdir(weights_dir)):
        if f.endswith(".safetensors"):
            with _open(os.path.join(weights_dir, f)) as fh:
                weight_map |= dict.fromkeys(fh.keys(), f)
    with open(os.path.join(weights_dir, INDEX), "w") as fh:
        json.dump({"format": fmt, "weight_map": dict(sorted(weight_map.items()))}, fh, indent=2)
    return weight_map


class NativeResults(Mapping):
    """The quantized linears of a native checkpoint as a read-only mapping name → :class:`loaq.solver.QuantResult`,
    each read from its shard when asked for (what :func:`loaq.api.quantize` returns for a lazily loaded model)."""

    def __init__(self, path: str):
        self.tensors = NativeTensors(path)
        self.names = self.tensors.quantized_names()

    def __getitem__(self, name: str):
        from loaq.checkpoint import tensors_to_results

        if name not in self.names:
            raise KeyError(name)
        return tensors_to_results(self.tensors.read([f"{name}.{p}" for p in PARTS]), self.tensors.path)[name]

    def __iter__(self):
        return iter(self.names)

    def __len__(self) -> int:
        return len(self.names)


def quantized_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every ``codes``/``scales``/``zeros`` tensor of the native checkpoint in ``path`` (either layout)."""
    t = NativeTensors(path)
    return t.read([k for k in t.weight_map if is_quantized_part(k)])


def other_tensors(path: str) -> dict[str, torch.Tensor]:
    """Every tensor of the native checkpoint in ``path`` besides the quantized linears' (norms, embeddings, ...)."""
    t = NativeTensors(path)
    return t.read([k for k in t.weight_map if not is_quantized_part(k)])
