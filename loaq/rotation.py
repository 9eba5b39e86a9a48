"""Hadamard rotation of a pre-norm decoder (QuaRot-style), exact in full precision (``--rotate hadamard``).

Applied to the float model before calibration; every step is one small function in float64:

1. untie ``lm_head`` from the token embeddings when they are tied (the final norm is fused into
   ``lm_head`` only), and say so (``config.tie_word_embeddings = False``, ``untied_embeddings``);
2. fuse each RMSNorm's scale into the linears that read it (``W ← W diag(g)``, final norm into
   ``lm_head``; Gemma-style ``1 + g`` norms fuse ``1 + g`` and keep ``g = 0``); norm scales become 1, so
   ``Norm(x R) = Norm(x) R`` for orthogonal ``R`` (RMSNorm has no mean to centre, embeddings need nothing
   else). A norm on a sub-layer's *output* (Gemma 3's post-norms) cannot be made to commute with R1: its input
   ``y R1`` has the right RMS, but its per-channel scale ``Γ`` would have to become ``R1ᵀ Γ R1``, which is no
   longer diagonal, and fusing ``Γ`` into ``W_out`` changes the RMS it divides by. Such families are refused
   (:func:`check_rotatable`);
3. R1 on the residual stream, ``R1 = diag(±1 from seed) · Mᵀ`` with ``M`` the Hadamard map of
   :mod:`loaq.hadamard`: embeddings ``E ← E R1``, every ``W_in`` and ``lm_head`` ``W ← W R1``, every
   ``W_out`` ``W ← R1ᵀ W`` (bias ``b ← b R1``);
4. R2 per attention head, ``Mᵀ`` of order ``head_dim``: ``v_proj`` output side (a fused ``qkv_proj``'s
   v rows), ``o_proj`` input side;
5. R4, the online Hadamard before ``down_proj``: ``down_proj`` gets ``W ← W Mᵀ`` and a forward
   pre-hook applies ``x ← hadamard_transform_ref(x, had_k) = x Mᵀ`` at run time (:mod:`loaq.kernels.hadamard_ref`).

The rotation is recorded in the native checkpoint (``loaq.json`` ``"rotation"``: seed, orders, kinds,
what absorbed what; ``rotation.safetensors``: ``"r4.had_k"``, absent when K = 1). Helpers:
:func:`load_had_k` (``native_dir -> Tensor | None``) and :func:`attach_online` re-create R4 on a
loaded model (:func:`loaq.checkpoint.load_native` does both).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
from torch import nn

from loaq import hadamard
from loaq.arch import Arch
from loaq.errors import LoaQError
from loaq.kernels.hadamard_ref import hadamard_transform_ref

KINDS = ("none", "hadamard")
R4_FILE = "rotation.safetensors"


@dataclass(frozen=True)
class RotationSpec:
    kind: str = "none"
    seed: int = 0
    r4_blocks: int = 1  # R4 block-diagonal with this many Hadamard blocks (one per tensor-parallel shard)

    def __post_init__(self):
        if self.kind not in KINDS:
            raise LoaQError(f"--rotate {self.kind!r} is unknown; use one of {', '.join(KINDS)}")
        if not isinstance(self.r4_blocks, int) or self.r4_blocks < 1:
            raise LoaQError(f"--r4-blocks {self.r4_blocks!r} must be a positive integer (the tensor-parallel size)")
        if self.r4_blocks > 1 and self.kind != "hadamard":
            raise LoaQError("--r4-blocks splits the online R4 of the Hadamard rotation; add --rotate hadamard or drop it")


@dataclass
class Rotation:
    """What :func:`rotate_model` did: the three factors and whether embeddings were untied."""

    seed: int
    r1: hadamard.Factor
    r2: hadamard.Factor
    r4: hadamard.Factor
    untied: bool

    def meta(self) -> dict:
        """The checkpoint's ``"rotation"`` entry (:mod:`loaq.checkpoint`)."""
        def site(f):
            return {"order": f.n, "had_k_order": f.K, "kind": f.kind}

        blocks = hadamard.blocks_of(self.r4.had_k)
        r4 = site(self.r4) | ({"blocks": blocks} if blocks > 1 else {})  # --r4-blocks; absent: the full R4

        return {"kind": "hadamard", "seed": self.seed, "r1": {**site(self.r1), "random_signs": True},
                "r2": site(self.r2), "r4": r4, "untied_embeddings": self.untied,
                "fused_norms": True,
                "absorbed": {"r1": "embed_tokens (right), W_in and lm_head (input side), W_out (output side)",
                             "r2": "v_proj (output side, per head), o_proj (input side, per head)",
                             "r4": "down_proj (input side); online hadamard_transform_ref(x, r4.had_k) before it"}}

    def tensors(self) -> dict[str, torch.Tensor]:
        return {} if self.r4.had_k is None else {"r4.had_k": self.r4.had_k.float().contiguous()}


def _update(p: torch.Tensor, fn) -> None:
    """``p ← fn(p)`` computed in float64."""
    p.data.copy_(fn(p.data.double()).to(p.dtype))


def untie_embeddings(model: nn.Module, arch: Arch) -> bool:
    """Give ``lm_head`` its own copy of tied embeddings (config says untied from now on); True if they were tied."""
    head, embed = model.get_submodule(arch.lm_head), model.get_submodule(arch.embed)
    tied = head.weight is embed.weight
    if tied:
        head.weight = nn.Parameter(embed.weight.detach().clone())
    model.config.tie_word_embeddings = False
    return tied


def fuse_norm(norm: nn.Module, readers: list[nn.Linear], offset: float = 0.0) -> None:
    """Move the RMSNorm scale ``offset + g`` into the linears reading it: ``W ← W diag(offset + g)``, and
    make the scale 1 (``g ← 1 - offset``: Gemma's ``1 + g`` norms get ``g = 0``)."""
    g = offset + norm.weight.data.double()
    for lin in readers:
        _update(lin.weight, lambda W: W * g[None, :])
    norm.weight.data.fill_(1.0 - offset)


def rotate_embedding(embed: nn.Embedding, R) -> None:
    """Embeddings ``E ← E R``; ``R(x)`` computes ``x R`` (float64) for every rotation helper here."""
    _update(embed.weight, R)


def rotate_input(lin: nn.Linear, R) -> None:
    """The linear reads ``x R`` instead of ``x``: ``W ← W R``."""
    _update(lin.weight, R)


def rotate_output(lin: nn.Linear, R, rows: slice = slice(None)) -> None:
    """The linear writes ``y R`` instead of ``y`` on its output ``rows`` (all by default; a fused q|k|v
    linear's v rows for R2): ``W ← Rᵀ W = (Wᵀ R)ᵀ``, ``b ← b R``."""
    _update(lin.weight.data[rows], lambda W: R(W.T).T)
    if lin.bias is not None:
        _update(lin.bias.data[rows], R)


def per_head(R, head_dim: int):
    """``x (I_heads ⊗ R)``: the same rotation on every head of width ``head_dim``."""
    return lambda x: R(x.reshape(*x.shape[:-1], -1, head_dim)).reshape(x.shape)


class OnlineHadamard:
    """Forward pre-hook: ``x ← hadamard_transform_ref(x, had_k)`` (the online R4)."""

    def __init__(self, had_k: torch.Tensor | None):
        self.had_k = had_k

    def __call__(self, _module: nn.Module, args: tuple) -> tuple:
        return (hadamard_transform_ref(args[0], self.had_k), *args[1:])


def attach_online(model: nn.Module, arch: Arch, had_k: torch.Tensor | None) -> list:
    """Register the online R4 on every layer's ``arch.online`` linear; returns the hook handles."""
    return [layer.get_submodule(arch.online).register_forward_pre_hook(OnlineHadamard(had_k))
            for layer in arch.decoder_layers(model)]


def load_had_k(native_dir: str) -> torch.Tensor | None:
    """R4's ``had_k`` stored in a native checkpoint (None when its order is a power of two)."""
    from loaq.checkpoint import load_tensors

    p = os.path.join(native_dir, R4_FILE)
    return load_tensors(p).get("r4.had_k") if os.path.isfile(p) else None


def check_rotatable(arch: Arch) -> None:
    """Refuse, in one line, a family whose layout the rotation cannot keep exact (:attr:`Arch.no_rotation`)."""
    if arch.no_rotation:
        raise LoaQError(f"--rotate hadamard: {arch.no_rotation}")


def _random_signs(n: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 2, (n,), generator=g).double() * 2 - 1


class Rotator:
    """The factors R1, R2, R4 of one model (``config``, ``seed``), applied one piece at a time: the whole model
    (:func:`rotate_model`) or each decoder layer as it loads (:mod:`loaq.lazy`); every tensor sees the same
    float64 steps in the same order either way, so both give bit-identical weights."""

    def __init__(self, config, seed: int = 0, r4_blocks: int = 1):
        self.seed = seed
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        self.r4 = hadamard.block_diagonal(config.intermediate_size, r4_blocks, seed)  # first: refuses a bad r4_blocks
        self.r1, self.r2 = (hadamard.factor(n, seed) for n in (config.hidden_size, self.head_dim))
        self.signs = _random_signs(config.hidden_size, seed)
        kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        self.kv_rows = kv * self.head_dim  # a fused q|k|v's value rows are its last ``kv_rows`` (Phi-3)

    def R1(self, x):  # x diag(s) Mᵀ
        return hadamard.multiply(x * self.signs, self.r1)

    def R2(self, x):
        return hadamard.multiply(x, self.r2)

    def R4(self, x):
        return hadamard.multiply(x, self.r4)

    @torch.no_grad()
    def layer(self, layer: nn.Module, arch: Arch, online: bool = True) -> None:
        """Steps 2-5 on one decoder layer: fuse its norms, rotate its linears, attach the online R4."""
        for sl in arch.sublayers:
            fuse_norm(layer.get_submodule(sl.norm), [layer.get_submodule(f"{sl.module}.{n}") for n in sl.w_in],
                      arch.norm_offset)
        for sl in arch.sublayers:
            for n in sl.w_in:
                rotate_input(layer.get_submodule(f"{sl.module}.{n}"), self.R1)
            rotate_output(layer.get_submodule(f"{sl.module}.{sl.w_out}"), self.R1)
        value_rows = slice(-self.kv_rows, None) if arch.fused_value else slice(None)
        rotate_output(layer.get_submodule(arch.value), per_head(self.R2, self.head_dim), value_rows)
        rotate_input(layer.get_submodule(arch.attn_out), per_head(self.R2, self.head_dim))
        rotate_input(layer.get_submodule(arch.online), self.R4)
        if online:
            layer.get_submodule(arch.online).register_forward_pre_hook(OnlineHadamard(self.r4.had_k))

    @torch.no_grad()
    def head(self, lm_head: nn.Linear, final_norm: nn.Module, norm_offset: float = 0.0) -> None:
        """The final norm fused into ``lm_head`` (untied first: :func:`untie_embeddings`), then ``W ← W R1``."""
        fuse_norm(final_norm, [lm_head], norm_offset)
        rotate_input(lm_head, self.R1)

    @torch.no_grad()
    def embed(self, embed: nn.Embedding) -> None:
        rotate_embedding(embed, self.R1)

    def rotation(self, untied: bool) -> Rotation:
        return Rotation(self.seed, self.r1, self.r2, self.r4, untied)


@torch.no_grad()
def rotate_model(model: nn.Module, arch: Arch, seed: int = 0, r4_blocks: int = 1) -> Rotation:
    """Rotate ``model`` in place (steps 1-5 of the module docstring); its function is unchanged. ``r4_blocks``
    > 1 makes R4 block-diagonal (:func:`loaq.hadamard.block_diagonal`): each tensor-parallel rank of
    ``down_proj`` then rotates its own slice of the input."""
    check_rotatable(arch)
    rot = Rotator(model.config, seed, r4_blocks)  # first: refuses a bad r4_blocks
    untied = untie_embeddings(model, arch)
    for layer in arch.decoder_layers(model):
        rot.layer(layer, arch)
    rot.head(model.get_submodule(arch.lm_head), model.get_submodule(arch.final_norm), arch.norm_offset)
    rot.embed(model.get_submodule(arch.embed))
    return rot.rotation(untied)
