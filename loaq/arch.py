"""Supported architectures as data: where the decoder layers are and how each splits into sub-layers.

Every supported family (LLaMA, Mistral, Qwen2, Qwen3) has the pre-norm layout of the paper's
Section 2.3: ``h_mid = h + φ(Norm(h) W_in) W_out`` for attention, then the same for the MLP.
Qwen3's q/k norms live inside ``self_attn`` (part of φ) and need nothing here.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loaq.errors import LoaQError


@dataclass(frozen=True)
class SubLayer:
    """One residual sub-layer: ``h + module(norm(h))`` whose ``w_in`` read the normed input, ``w_out`` writes back."""

    name: str
    norm: str
    module: str
    w_in: tuple[str, ...]
    w_out: str
    takes_kwargs: bool = False  # attention needs the position embeddings and mask

    def run(self, layer: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """``module(norm(h))`` of this sub-layer in ``layer`` (without the residual)."""
        x = layer.get_submodule(self.norm)(h)
        mod = layer.get_submodule(self.module)
        out = mod(x, **kwargs) if self.takes_kwargs else mod(x)
        return out[0] if isinstance(out, tuple) else out


@dataclass(frozen=True)
class Arch:
    """Where things are: decoder layers, final norm, sub-layers, and the rotation sites (:mod:`loaq.rotation`):
    token embeddings, ``lm_head``, the per-head pair (``value``, ``attn_out``: v_proj's output heads are
    o_proj's input heads) and the linear ``online`` whose input gets the online Hadamard R4."""

    layers: str
    final_norm: str
    sublayers: tuple[SubLayer, ...]
    embed: str = "model.embed_tokens"
    lm_head: str = "lm_head"
    value: str = "self_attn.v_proj"
    attn_out: str = "self_attn.o_proj"
    online: str = "mlp.down_proj"

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def linear_names(self) -> list[str]:
        """Linear names inside one decoder layer, in quantization order."""
        names = []
        for sl in self.sublayers:
            names += [f"{sl.module}.{n}" for n in sl.w_in] + [f"{sl.module}.{sl.w_out}"]
        return names


PRE_NORM = Arch(
    layers="model.layers",
    final_norm="model.norm",
    sublayers=(
        SubLayer("attn", "input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", True),
        SubLayer("mlp", "post_attention_layernorm", "mlp", ("gate_proj", "up_proj"), "down_proj"),
    ),
)

SUPPORTED = {
    "LlamaForCausalLM": PRE_NORM,
    "MistralForCausalLM": PRE_NORM,
    "Qwen2ForCausalLM": PRE_NORM,
    "Qwen3ForCausalLM": PRE_NORM,
}


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM"}


def arch_of(config) -> Arch:
    """The :class:`Arch` of a HF config (``architectures``, else ``model_type`` as GGUF configs carry), or a
    one-line refusal naming the supported ones."""
    names = list(getattr(config, "architectures", None) or [])
    if not names and getattr(config, "model_type", None):
        names = [MODEL_TYPES.get(config.model_type, config.model_type)]
    for a in names:
        if a in SUPPORTED:
            return SUPPORTED[a]
    raise LoaQError(f"unsupported architecture {', '.join(names or ['(none)'])}; supported: {', '.join(SUPPORTED)}")


def rms_factor(h: torch.Tensor, eps: float) -> torch.Tensor:
    """The paper's ``r(x) = (mean(x²) + ε)^(-1/2)`` per token (eq. 1), shape [..., 1]."""
    return torch.rsqrt(h.float().pow(2).mean(-1, keepdim=True) + eps)


def input_widths(config) -> dict[str, int]:
    """Input width of every quantized linear, from the config alone (checked before weights load)."""
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    return {"q/k/v/gate/up": config.hidden_size, "o_proj": config.num_attention_heads * head_dim,
            "down_proj": config.intermediate_size}
