"""Supported architectures as data: where the decoder layers are and how each splits into sub-layers.

LLaMA, Mistral, Qwen2, Qwen3 and Phi-3 have the pre-norm layout of the paper's Section 2.3:
``h_mid = h + φ(Norm(h) W_in) W_out`` for attention, then the same for the MLP. Qwen3's and Gemma 3's q/k
norms live inside ``self_attn`` (part of φ) and need nothing here. Phi-3 fuses ``W_in`` into one linear
(``qkv_proj``, ``gate_up_proj``): the group is that one linear, and the value rows R2 rotates are the last
``num_key_value_heads · head_dim`` rows of ``qkv_proj`` (``fused_value``). Gemma 3 adds a post-norm on each
sub-layer's output before the residual add, ``h_mid = h + PostNorm(φ(PreNorm(h) W_in) W_out)``
(``SubLayer.post_norm``; the W_out target: :mod:`loaq.sandwich`), scales every RMSNorm by ``1 + g``
(``norm_offset``), multiplies the embeddings by √hidden inside its embedding module and alternates
sliding-window and global attention layers, whose different masks and rotary tables
:func:`loaq.pipeline.capture_inputs` catches per layer.
Qwen3-MoE's MLP is a sparse mixture of experts: its :class:`SubLayer` names ``experts`` (and the
full-precision ``router``), and every expert ``e`` has its own ``W_in``/``W_out`` (:mod:`loaq.moe`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from loaq.errors import LoaQError


@dataclass(frozen=True)
class SubLayer:
    """One residual sub-layer: ``h + module(norm(h))`` whose ``w_in`` read the normed input, ``w_out`` writes back
    (``h + post_norm(module(norm(h)))`` when it has a post-norm)."""

    name: str
    norm: str
    module: str
    w_in: tuple[str, ...]
    w_out: str
    takes_kwargs: bool = False  # attention needs the position embeddings and mask
    experts: str | None = None  # a mixture of experts: ``module.experts.{e}.{w_in, w_out}`` (:mod:`loaq.moe`)
    router: str | None = None  # its router (kept in full precision), reading the same normed input
    post_norm: str | None = None  # a norm on the module's output before the residual add (Gemma 3)

    def linear_names(self, num_experts: int = 0) -> list[str]:
        """The quantized linears of this sub-layer, relative to the decoder layer (every expert's, in order)."""
        ws = [*self.w_in, self.w_out]
        if self.experts:
            return [f"{self.module}.{self.experts}.{e}.{n}" for e in range(num_experts) for n in ws]
        return [f"{self.module}.{n}" for n in ws]

    def run(self, layer: nn.Module, h: torch.Tensor, kwargs: dict) -> torch.Tensor:
        """``module(norm(h))`` of this sub-layer in ``layer`` (without the residual)."""
        x = layer.get_submodule(self.norm)(h)
        mod = layer.get_submodule(self.module)
        out = mod(x, **kwargs) if self.takes_kwargs else mod(x)
        return out[0] if isinstance(out, tuple) else out

    def finish(self, layer: nn.Module, y: torch.Tensor) -> torch.Tensor:
        """What the residual adds for module output ``y``: ``PostNorm(y)``, or ``y`` without a post-norm."""
        return y if self.post_norm is None else layer.get_submodule(self.post_norm)(y)


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
    fused_value: bool = False  # ``value`` is a fused q|k|v linear: v is its last num_key_value_heads·head_dim rows
    norm_offset: float = 0.0  # RMSNorm multiplies by ``norm_offset + g`` (Gemma: 1 + g)
    no_rotation: str | None = None  # why ``--rotate`` cannot be exact for this family (refused), or None

    def decoder_layers(self, model: nn.Module) -> nn.ModuleList:
        return model.get_submodule(self.layers)

    def linear_names(self, num_experts: int = 0) -> list[str]:
        """Linear names inside one decoder layer, in quantization order (``num_experts`` per MoE sub-layer)."""
        return [n for sl in self.sublayers for n in sl.linear_names(num_experts)]

    def layer_linears(self, layer: nn.Module) -> list[str]:
        """:meth:`linear_names` of one decoder layer, its experts counted in the layer itself."""
        n = max((len(layer.get_submodule(f"{sl.module}.{sl.experts}")) for sl in self.sublayers if sl.experts),
                default=0)
        return self.linear_names(n)

    @property
    def moe(self) -> bool:
        """Whether a sub-layer of this family is a mixture of experts."""
        return any(sl.experts for sl in self.sublayers)

    def num_experts(self, config) -> int:
        """Experts per MoE sub-layer of ``config`` (0 for a dense family)."""
        return getattr(config, "num_experts", 0) if self.moe else 0


PRE_NORM = Arch(
    layers="model.layers",
    final_norm="model.norm",
    sublayers=(
        SubLayer("attn", "input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", True),
        SubLayer("mlp", "post_attention_layernorm", "mlp", ("gate_proj", "up_proj"), "down_proj"),
    ),
)

QWEN3_MOE = Arch(
    layers="model.layers",
    final_norm="model.norm",
    sublayers=(
        PRE_NORM.sublayers[0],
        SubLayer("mlp", "post_attention_layernorm", "mlp", ("gate_proj", "up_proj"), "down_proj",
                 experts="experts", router="gate"),
    ),
)

PHI3 = Arch(
    layers="model.layers",
    final_norm="model.norm",
    sublayers=(
        SubLayer("attn", "input_layernorm", "self_attn", ("qkv_proj",), "o_proj", True),
        SubLayer("mlp", "post_attention_layernorm", "mlp", ("gate_up_proj",), "down_proj"),
    ),
    value="self_attn.qkv_proj",
    fused_value=True,
)

GEMMA3 = Arch(
    layers="model.layers",
    final_norm="model.norm",
    sublayers=(
        SubLayer("attn", "input_layernorm", "self_attn", ("q_proj", "k_proj", "v_proj"), "o_proj", True,
                 post_norm="post_attention_layernorm"),
        SubLayer("mlp", "pre_feedforward_layernorm", "mlp", ("gate_proj", "up_proj"), "down_proj",
                 post_norm="post_feedforward_layernorm"),
    ),
    norm_offset=1.0,
    no_rotation=("Gemma 3 normalizes each sub-layer's output before the residual add, and that post-norm's "
                 "per-channel scale (1 + g) does not commute with the residual rotation R1, so --rotate cannot "
                 "be exact; quantize Gemma 3 without --rotate"),
)

SUPPORTED = {
    "LlamaForCausalLM": PRE_NORM,
    "MistralForCausalLM": PRE_NORM,
    "Qwen2ForCausalLM": PRE_NORM,
    "Qwen3ForCausalLM": PRE_NORM,
    "Qwen3MoeForCausalLM": QWEN3_MOE,
    "Phi3ForCausalLM": PHI3,
    "Gemma3ForCausalLM": GEMMA3,
}


MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM",
               "qwen3": "Qwen3ForCausalLM", "qwen3_moe": "Qwen3MoeForCausalLM", "phi3": "Phi3ForCausalLM",
               "gemma3_text": "Gemma3ForCausalLM"}


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
    widths = {"q/k/v/gate/up": config.hidden_size, "o_proj": config.num_attention_heads * head_dim,
              "down_proj": config.intermediate_size}
    if getattr(config, "moe_intermediate_size", None):
        widths["experts' down_proj"] = config.moe_intermediate_size
    return widths
