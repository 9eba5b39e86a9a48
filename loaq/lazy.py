"""Lazy, layer-at-a-time weights (``--load lazy``, the default for a model path).

The model is built as a skeleton whose parameters live on the ``meta`` device (buffers such as the
rotary tables are real: they are computed, not stored). :class:`LazyWeights` reads a decoder layer's
tensors from the safetensors shards (index or single file) or the GGUF file only when the pipeline
reaches it, in float32, applies the Hadamard rotation to that layer alone (:class:`loaq.rotation.Rotator`,
bit-identical to rotating the whole model) and returns the layer to ``meta`` once it is quantized and
written. Embeddings, final norm and ``lm_head`` (everything outside the decoder layers) are read the same
way when needed: before catching the calibration inputs, and when the checkpoint is written. Peak memory
is one layer (and its float copy), the streams and the embeddings, whatever the depth.

GGUF tensors are dequantized per tensor as transformers does it (``gguf.dequantize``; names mapped by
``get_gguf_hf_weights_map``; llama's q/k rows un-permuted by its tensor processor), so lazy and eager
loads see the same float32 weights.

:func:`streamed_perplexity` measures perplexity the same way, one layer at a time over all windows, so
``evaluation=`` never needs the whole model either (see :func:`loaq.api.quantize`).
"""

from __future__ import annotations

import json
import math
import os
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from loaq.arch import Arch
from loaq.errors import LoaQError

LOADS = ("lazy", "eager")


def check_load(load: str) -> None:
    if load not in LOADS:
        raise LoaQError(f"--load {load!r} is unknown; use lazy (layer at a time, default) or eager (whole model)")


@contextmanager
def _params_on_meta():
    """Every parameter registered inside the block lives on ``meta`` (no memory, init is a no-op); buffers stay real."""
    register = nn.Module.register_parameter

    def on_meta(self, name, param):
        register(self, name, param)
        if param is not None:
            self._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def skeleton(config) -> nn.Module:
    """The causal LM of ``config`` with its parameters on ``meta`` (float32 once loaded)."""
    from transformers import AutoModelForCausalLM

    with _params_on_meta():
        return AutoModelForCausalLM.from_config(config, dtype=torch.float32, attn_implementation="sdpa").eval()


class SafetensorsReader:
    """Tensors of a Hugging Face directory (``model.safetensors.index.json`` or one ``model.safetensors``)."""

    def __init__(self, directory: str):
        self.directory = directory
        index = os.path.join(directory, "model.safetensors.index.json")
        if os.path.isfile(index):
            self.weight_map = json.load(open(index))["weight_map"]
        elif os.path.isfile(os.path.join(directory, "model.safetensors")):
            from safetensors import safe_open

            with safe_open(os.path.join(directory, "model.safetensors"), "pt") as fh:
                self.weight_map = dict.fromkeys(fh.keys(), "model.safetensors")
        else:
            raise LoaQError(f"model directory {directory!r} has no model.safetensors(.index.json); lazy loading "
                            "reads safetensors: pass --load eager for other weight formats")

    def names(self) -> set[str]:
        return set(self.weight_map)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        from safetensors import safe_open

        by_file: dict[str, list[str]] = {}
        for n in names:
            by_file.setdefault(self.weight_map[n], []).append(n)
        out = {}
        for f, keys in by_file.items():
            with safe_open(os.path.join(self.directory, f), "pt") as fh:
                out |= {k: fh.get_tensor(k).float() for k in keys}
        return out


class GGUFReader:
    """Tensors of a GGUF file by Hugging Face name, dequantized to float32 one at a time (memory-mapped file)."""

    def __init__(self, path: str, model: nn.Module):
        from transformers.modeling_gguf_pytorch_utils import (TENSOR_PROCESSORS, TensorProcessor,
                                                              get_gguf_hf_weights_map, read_field)

        from loaq.models import gguf_file, one_parse

        self.reader = gguf_file(path)
        arch = read_field(self.reader, "general.architecture")[0]
        self.processor = TENSOR_PROCESSORS.get(arch, TensorProcessor)(config=model.config.to_dict())
        with one_parse():
            to_hf = get_gguf_hf_weights_map(model, self.processor)
        self.tensors = {to_hf[t.name]: t for t in self.reader.tensors if t.name in to_hf}

    def names(self) -> set[str]:
        return set(self.tensors)

    def read(self, names: list[str]) -> dict[str, torch.Tensor]:
        import mmap

        out = {}
        for n in names:
            t = self.tensors[n]
            w = self.processor.process(weights=_dequantize(t.data, t.tensor_type), name=t.name,
                                       tensor_key_mapping={}, parsed_parameters={"tensors": {}}).weights
            out[n] = torch.from_numpy(w).float()
        # the file's pages read so far leave this process's resident set (they stay in the page cache)
        self.reader.data._mmap.madvise(mmap.MADV_DONTNEED)
        return out


def _dequantize(data, qtype, rows: int = 4096):
    """``gguf.dequantize`` a few thousand rows at a time into one new array (its temporaries stay small)."""
    import gguf
    import numpy as np

    if data.ndim < 2 or data.shape[0] <= rows:
        return np.array(gguf.dequantize(data, qtype))  # a copy: F32/F16 come back as views of the file
    first = gguf.dequantize(data[:rows], qtype)
    out = np.empty((data.shape[0], *first.shape[1:]), dtype=first.dtype)
    out[:rows] = first
    for i in range(rows, data.shape[0], rows):
        out[i:i + rows] = gguf.dequantize(data[i:i + rows], qtype)
    return out


class LazyWeights:
    """Loads and releases the parts of a skeleton ``model`` (:func:`skeleton`) from ``src``; ``rotation_seed``
    (not None) Hadamard-rotates every part as it loads (``config.tie_word_embeddings`` becomes False then)."""

    def __init__(self, src, model: nn.Module, arch: Arch, rotation_seed: int | None = None, r4_blocks: int = 1):
        self.model, self.arch = model, arch
        self.reader = GGUFReader(os.path.join(src.directory, src.gguf_file), model) if src.gguf_file else \
            SafetensorsReader(src.directory)
        self.tied = bool(getattr(model.config, "tie_word_embeddings", False))
        self.rotator = None
        if rotation_seed is not None:
            from loaq.rotation import Rotator

            from loaq.rotation import attach_online

            self.rotator = Rotator(model.config, rotation_seed, r4_blocks)
            model.config.tie_word_embeddings = False
            attach_online(model, arch, self.rotator.r4.had_k)  # first on every layer, as rotate_model does
        expected = set(model.state_dict()) - ({f"{arch.lm_head}.weight"} if self.tied else set())
        missing = sorted(expected - self.reader.names())
        if missing:
            raise LoaQError(f"{src.label}: weights {', '.join(missing[:3])} not found under their Hugging Face names; "
                            "pass --load eager (transformers then converts the checkpoint)")

    def rotation(self):
        return self.rotator.rotation(self.tied) if self.rotator else None

    def _assign(self, module: nn.Module, prefix: str, tensors: dict[str, torch.Tensor]) -> None:
        module.load_state_dict({k.removeprefix(prefix): v for k, v in tensors.items()}, strict=False, assign=True)

    @staticmethod
    def _release(module: nn.Module, names) -> None:
        """Put the checkpoint tensors ``names`` of ``module`` back on ``meta``; buffers the checkpoint does not
        hold (rotary frequencies, Gemma's embedding scale) stay, so the part can be loaded again."""
        for name in names:
            owner, _, leaf = name.rpartition(".")
            mod = module.get_submodule(owner)
            t = getattr(mod, leaf)
            if isinstance(t, nn.Parameter):
                mod._parameters[leaf] = nn.Parameter(t.detach().to("meta"), requires_grad=t.requires_grad)
            else:
                mod._buffers[leaf] = t.to("meta")

    @contextmanager
    def layer(self, i: int):
        """Decoder layer ``i`` with its float32 weights (rotated) inside the block, back on ``meta`` after."""
        layer = self.arch.decoder_layers(self.model)[i]
        prefix = f"{self.arch.layers}.{i}."
        self._assign(layer, prefix, self.reader.read([prefix + k for k in layer.state_dict()]))
        if self.rotator:
            self.rotator.layer(layer, self.arch, online=False)  # the online R4 hooks are attached already
        try:
            yield layer
        finally:
            self._release(layer, list(layer.state_dict()))

    def _outside(self) -> list[str]:
        return [k for k in self.model.state_dict() if not k.startswith(self.arch.layers + ".")]

    @contextmanager
    def rest(self):
        """Embeddings, final norm, ``lm_head`` (everything outside the layers) loaded, rotated, inside the block."""
        head_name = f"{self.arch.lm_head}.weight"
        names = [k for k in self._outside() if not (self.tied and k == head_name)]
        self._assign(self.model, "", self.reader.read(names))
        head, embed = self.model.get_submodule(self.arch.lm_head), self.model.get_submodule(self.arch.embed)
        if self.tied:
            head.weight = embed.weight if not self.rotator else nn.Parameter(embed.weight.detach().clone())
        if self.rotator:
            self.rotator.head(head, self.model.get_submodule(self.arch.final_norm), self.arch.norm_offset)
            self.rotator.embed(embed)
        try:
            yield self.model
        finally:
            self._release(self.model, self._outside())

    def rest_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors outside the layers as the checkpoint stores them (tied ``lm_head`` once)."""
        with self.rest() as model:
            return {k: v.detach() for k, v in model.state_dict().items()  # kept alive past the release below
                    if not k.startswith(self.arch.layers + ".")
                    and not (self.tied and not self.rotator and k == f"{self.arch.lm_head}.weight")}


@torch.no_grad()
def streamed_perplexity(weights: LazyWeights, windows: torch.Tensor, batch_size: int, quantized=None) -> float:
    """:func:`loaq.metrics.perplexity` one decoder layer at a time over every window (the same operations, the
    same number); ``quantized(i, layer)`` (optional) puts layer ``i``'s quantized weights in before it runs."""
    from loaq.pipeline import capture_inputs

    model, arch = weights.model, weights.arch
    with weights.rest():
        hs, kws = capture_inputs(model, arch, windows, batch_size, "cpu")
    for i in range(len(arch.decoder_layers(model))):
        with weights.layer(i) as layer:
            if quantized is not None:
                quantized(i, layer)
            for b, h in enumerate(hs):
                out = layer(h, **kws[i][b])  # each layer's own kwargs (Gemma 3: sliding vs global)
                hs[b] = out[0] if isinstance(out, tuple) else out
    nll, count = 0.0, 0
    with weights.rest():
        norm, head = model.get_submodule(arch.final_norm), model.get_submodule(arch.lm_head)
        for h, batch in zip(hs, windows.split(batch_size)):
            logits = head(norm(h))[:, :-1].float()
            nll += F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum").item()
            count += batch[:, 1:].numel()
    return math.exp(nll / count)
