"""Mixture-of-experts sub-layers (Qwen3-MoE): per-expert linears, per-expert statistics and their solve.

transformers 5.19 fuses a layer's experts into two 3-D parameters (``gate_up_proj`` [E, 2I, d],
``down_proj`` [E, d, I]; checkpoints keep per-expert ``mlp.experts.{e}.gate_proj.weight`` and its
conversion mapping merges them on load). :func:`unfuse` turns them back into one ``nn.Linear`` per expert
and projection, named as on disk and as vLLM loads them, so the pipeline, the native checkpoint and the
export treat each expert's ``W_in`` (gate, up) and ``W_out`` (down) as ordinary linears.

Notation (the paper's, per token ``t``): ``x_t = Norm(h_t)``, ``x̂_t = Norm(ĥ_t)``. The router ``G`` (full
precision, never quantized) picks the top-k experts ``ε(t)`` with weights ``r_{t,e}`` on ``x_t`` and
``ε̂(t)``, ``r̂_{t,e}`` on ``x̂_t`` (``r = 0`` off the top k). Expert ``e`` computes
``X_{t,e} = φ(x_t W_in,e)`` (SwiGLU of gate and up) and the sub-layer writes

    h_mid,t = h_t + y_t,   y_t = Σ_{e∈ε(t)} r_{t,e} X_{t,e} W_out,eᵀ.                          (M1)

**Routing.** The deployed model routes by its own (quantized) stream, so expert ``e``'s weights act on the
rows ``S_e = {t : e ∈ ε̂(t)}`` and every statistic of ``e`` is summed over ``S_e``. Both inputs ``x_t`` and
``x̂_t`` exist at every token (the router only selects), so ``C = X̂ᵀ(X − X̂)`` pairs them row by row on
``S_e`` with no gap; routing the float stream's rows instead would put tokens into ``H`` where ``Q`` never
acts and leave out rows where it does. Pairing only tokens both streams send to ``e`` would drop exactly
the tokens whose routing the quantization changed, which the layer objective below still counts.

**W_in,e** (gate and up, one group): ``H = Σ_{S_e} x̂x̂ᵀ``, ``C = Σ_{S_e} x̂(x − x̂)ᵀ``: LLOA (eq. 8) on the
rows the expert serves.

**W_out,e** (down): by (M1) the expert's output enters the residual as ``r̂_{t,e} X̂_{t,e} Qᵀ``. Take the NOA
objective of the sub-layer ``Σ_t ||ŝ_t(ĥ_t + ŷ_t) − s_t(h_t + y_t)||²`` (eq. 12; ``s = R(h + y)``,
``ŝ = R(ĥ + ŷ)`` with float ``W_out``), hold the other experts at their float ``W_out`` and split the target
among the experts the quantized stream chose, by shares ``ρ_{t,e} = r̂_{t,e} / Σ_{e'∈ε̂(t)} r̂_{t,e'}``
(``Σ_e ρ = 1``: the residual is corrected once, not k times). Per expert this is

    min_Q Σ_{t∈S_e} ||X̂'_t Qᵀ − X'_t W_outᵀ − R_t||²,
    X̂'_t = ŝ_t r̂_{t,e} X̂_{t,e},   X'_t = s_t r_{t,e} X_{t,e},   R_t = ρ_{t,e} (s_t h_t − ŝ_t ĥ_t + s_t U_t),

with ``U_t = Σ_{e'∈ε(t)∖ε̂(t)} r_{t,e'} X_{t,e'} W_out,e'ᵀ`` the float output of experts only the float stream
chose (no quantized expert owns it, so it is shared like the residual) and ``r_{t,e} = 0`` for ``e ∉ ε(t)``
(the float layer has no contribution of ``e`` there). Summed over ``ε̂(t)`` the per-expert targets give
``s_t(h_t + y_t) − ŝ_t ĥ_t``, the sub-layer's. It is LoaQ's ``W̃ = (I + αH⁻¹C)W + βH⁻¹B`` (eqs. 10, 12) with
``H = X̂'ᵀX̂'``, ``C = X̂'ᵀ(X' − X̂')``, ``B = X̂'ᵀR``; ``--no-rescale`` sets ``s = ŝ = 1``. Methods without
output statistics (GPTQ, GPTAQ, Qronos, LLOA) use ``X̂' = r̂X̂``, ``X' = rX``: the ``W_out`` error reaches the
layer output weighted by ``r̂``, so ``H`` is weighted by ``r̂²``.

**Experts that see few tokens** (``|S_e| < m``, ``m`` = the linear's input width by default: fewer tokens
than columns leave ``H`` singular) get ``H`` shrunk towards the layer's: ``H ← H + (m − |S_e|)/N · H_all``
with ``H_all`` the same statistic over all ``N`` tokens of the layer as if every token were routed to ``e``
(``W_in``: ``Σ x̂x̂ᵀ``; ``W_out``: ``X̂'`` with ``r̂`` = 1/k), a prior worth ``m − |S_e|`` tokens; ``C`` and
``B`` stay those of the routed tokens (no correction without evidence). An expert no token reaches is then GPTQ on the layer's distribution instead of all-dead
columns (which would zero it). ``benchmarks/results/moe_few_tokens.md`` measures this against damping
alone and round-to-nearest.

**W4A4** (``cfg.act``): as for dense linears (:mod:`loaq.pipeline`), every expert's gate, up and down carry
the per-token activation fake quantizer ``Q_a`` (:mod:`loaq.actquant`) as input pre-hooks, so the quantized
stream computes ``Q_a(x̂_t) W_in,e`` and ``Q_a(X̂_{t,e}) W_out,eᵀ`` (``X̂_{t,e} = φ(Q_a(x̂_t) W_in,e)``) and the
statistics above read ``Q_a(x̂)`` for ``W_in`` and ``Q_a(X̂)`` for ``W_out`` (before the ``r̂``, ``ŝ`` weights,
which act on the expert's output); the float stream stays unquantized. The router is not one of the
quantized linears: it reads the unquantized ``x̂_t``, as vLLM's fused-MoE layer routes on the hidden states
before its experts quantize them (the quant method gets the hidden states and the router's top-k).
Rotation stays refused, so W4A4 experts run without Hadamard.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from loaq.arch import Arch, SubLayer, rms_factor
from loaq.errors import LoaQError
from loaq.stats import Stats


class Expert(nn.Module):
    """One expert's SwiGLU MLP as three linears: ``down(act(gate(x)) · up(x))``."""

    def __init__(self, hidden: int, inter: int, act_fn, dtype, device):
        super().__init__()
        kw = dict(bias=False, dtype=dtype, device=device)
        self.gate_proj = nn.Linear(hidden, inter, **kw)
        self.up_proj = nn.Linear(hidden, inter, **kw)
        self.down_proj = nn.Linear(inter, hidden, **kw)
        self.act_fn = act_fn

    def inner(self, x: torch.Tensor) -> torch.Tensor:
        """``X_e = φ(x W_in)``: the input of ``down_proj``."""
        return self.act_fn(self.gate_proj(x)) * self.up_proj(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.inner(x))


class Experts(nn.ModuleList):
    """Per-expert linears behind the fused experts' call ``(hidden [T, d], top_k_index, top_k_weights) -> [T, d]``."""

    def forward(self, hidden_states: torch.Tensor, top_k_index: torch.Tensor,
                top_k_weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(hidden_states)
        for e, expert in enumerate(self):
            tok, pos = torch.where(top_k_index == e)
            if tok.numel():
                y = expert(hidden_states[tok]) * top_k_weights[tok, pos, None]
                out.index_add_(0, tok, y.to(out.dtype))
        return out

    @classmethod
    def from_fused(cls, fused: nn.Module) -> Experts:
        """Split transformers' fused ``gate_up_proj`` [E, 2I, d] and ``down_proj`` [E, d, I] per expert."""
        gate_up, down = fused.gate_up_proj, fused.down_proj
        if gate_up.ndim != 3 or down.ndim != 3 or gate_up.shape[1] != 2 * down.shape[2]:
            raise LoaQError(f"experts of type {type(fused).__name__} are not fused [gate; up] and down tensors; "
                            "this transformers version stores them differently, use transformers 5.19")
        n, inter2, hidden = gate_up.shape
        inter = inter2 // 2
        out = cls(Expert(hidden, inter, fused.act_fn, gate_up.dtype, gate_up.device) for _ in range(n))
        with torch.no_grad():
            for e, ex in enumerate(out):
                ex.gate_proj.weight.copy_(gate_up[e, :inter])
                ex.up_proj.weight.copy_(gate_up[e, inter:])
                ex.down_proj.weight.copy_(down[e])
        return out


def unfuse(model: nn.Module, arch: Arch) -> nn.Module:
    """Give every MoE sub-layer of ``model`` per-expert linears (:class:`Experts`) in place; a no-op for dense
    families and for experts already split. Returns ``model``."""
    moe = [sl for sl in arch.sublayers if sl.experts]
    if not moe:
        return model
    for layer in arch.decoder_layers(model):
        for sl in moe:
            block = layer.get_submodule(sl.module)
            fused = block.get_submodule(sl.experts)
            if not isinstance(fused, Experts):
                setattr(block, sl.experts, Experts.from_fused(fused))
    return model


def check_moe(arch: Arch, config, cfg) -> None:
    """Refuse in one line what LoaQ does not do for a mixture-of-experts model (nothing for dense families)."""
    if not arch.num_experts(config):
        return
    name = (getattr(config, "architectures", None) or ["this MoE model"])[0]
    if getattr(config, "mlp_only_layers", None) or getattr(config, "decoder_sparse_step", 1) != 1:
        raise LoaQError(f"{name} with dense MLP layers (mlp_only_layers / decoder_sparse_step > 1) is not supported; "
                        "LoaQ quantizes MoE models whose every layer is sparse")
    if cfg.rotation.kind != "none":
        raise LoaQError(f"--rotate {cfg.rotation.kind} is not supported for {name}: its online R4 before every "
                        "expert's down_proj has no place in vLLM's fused-MoE kernels; drop --rotate")
    if cfg.allocation.enabled:
        raise LoaQError(f"--target-bits is not supported for {name} yet (the allocator measures dense linears only); "
                        "drop --target-bits and choose one --bits")


@dataclass(frozen=True)
class FewTokens:
    """What an expert linear with fewer than ``m = width × in_features`` routed calibration tokens gets:
    ``shrink`` (its ``H`` shrunk towards the layer's, see the module docstring), ``damp`` (GPTQ's damping
    alone) or ``rtn``; ``benchmarks/results/moe_few_tokens.md`` chose shrink at ``width = 1``."""

    policy: str = "shrink"
    width: float = 1.0

    def __post_init__(self):
        if self.policy not in ("shrink", "damp", "rtn"):
            raise LoaQError(f"few-token policy {self.policy!r} is unknown; use shrink, damp or rtn")

    def min_tokens(self, n_in: int) -> int:
        return 0 if self.policy == "damp" else math.ceil(self.width * n_in)


FEW_TOKENS = FewTokens()


@dataclass
class _Routes:
    """One batch's routing: top-k mask [T, E] and dense weights [T, E] (zero off the top k)."""

    mask: torch.Tensor
    weight: torch.Tensor

    @classmethod
    def of(cls, router: nn.Module, x: torch.Tensor, n_experts: int) -> _Routes:
        _, w, idx = router(x)
        mask = torch.zeros(x.shape[0], n_experts, dtype=torch.bool, device=x.device).scatter_(1, idx, True)
        weight = torch.zeros(x.shape[0], n_experts, dtype=x.dtype, device=x.device).scatter_(1, idx, w.to(x.dtype))
        return cls(mask, weight)

    def call(self, experts: Experts, x: torch.Tensor) -> torch.Tensor:
        """``Σ_e r_{t,e} expert_e(x_t)`` over this routing."""
        idx = self.mask.nonzero()[:, 1].reshape(x.shape[0], -1)
        return experts(x, idx, self.weight.gather(1, idx))


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(-1, t.shape[-1])


def _shrink(st: Stats, H_all: torch.Tensor, n_all: int, m: int) -> None:
    st.H += (m - st.tokens) / max(n_all, 1) * H_all


def quantize_moe(layer: nn.Module, fp_layer: nn.Module | None, sl: SubLayer, streams, cfg, eps: float, prefix: str,
                 device, few: FewTokens | None = None) -> dict:
    """Quantize every expert of MoE sub-layer ``sl`` of ``layer`` in place (W_in of all experts, then W_out)
    and advance ``streams`` past it; returns the results by qualified name. ``few`` defaults to
    :data:`FEW_TOKENS` (read at call time, so a benchmark can compare policies)."""
    from loaq.pipeline import rtn_linear, solve_group

    few = few or FEW_TOKENS

    two = streams.h is not None
    norm = layer.get_submodule(sl.norm)
    block = layer.get_submodule(sl.module)
    experts, router = block.get_submodule(sl.experts), block.get_submodule(sl.router)
    fp_experts = fp_layer.get_submodule(sl.module).get_submodule(sl.experts) if two else None
    E = len(experts)
    with torch.no_grad():
        xh = [_flat(norm(h)) for h in streams.h_hat]  # the router's input and the experts' (their hooks apply Q_a)
        xq = [cfg.act.quantize(t) for t in xh]  # W_in's input Q_a(x̂)
        x = [_flat(norm(h)) for h in streams.h] if two else None
        rh = [_Routes.of(router, t, E) for t in xh]
        r = [_Routes.of(router, t, E) for t in x] if two else None
    n_all = sum(t.shape[0] for t in xh)
    results = {}
    H_in_all = None
    for e, expert in enumerate(experts):  # (a) W_in per expert, on the rows it serves
        names = [f"{prefix}{sl.module}.{sl.experts}.{e}.{n}" for n in sl.w_in]
        lins = [expert.get_submodule(n) for n in sl.w_in]
        st = Stats(xh[0].shape[1], cross=two, device=device)
        with torch.no_grad():
            for b in range(len(xh)):
                rows = rh[b].mask[:, e]
                st.add(xq[b][rows], x[b][rows] if two else None)
        m_in = few.min_tokens(st.H.shape[0])
        if st.tokens < m_in and few.policy == "rtn":
            results |= {n: rtn_linear(lin, cfg.spec) for n, lin in zip(names, lins)}
            continue
        if st.tokens < m_in and few.policy == "shrink":
            if H_in_all is None:
                H_in_all = Stats(xh[0].shape[1], device=device)
                for t in xq:
                    H_in_all.add(t)
            _shrink(st, H_in_all.H, n_all, m_in)
        results |= solve_group(names, lins, st, cfg, ",".join(names))
    results |= _quantize_w_out(experts, fp_experts, router, sl, streams, xh, x, rh, r, cfg, eps, prefix, device, few)
    _advance(streams, experts, fp_experts, xh, x, rh, r)
    return results


def _down_input(expert: Expert, x: torch.Tensor, act) -> torch.Tensor:
    """``Q_a(X̂_e)``, ``X̂_e = φ(x W_in,e)``: what ``down_proj`` multiplies, its input hook's fake quantization
    applied (``act``: the :class:`loaq.actquant.ActSpec`; identity unless W4A4)."""
    return act.quantize(expert.inner(x))


def _advance(streams, experts, fp_experts, xh, x, rh, r) -> None:
    """(c) advance both streams past the MoE sub-layer with the experts as they now are."""
    streams.at_layer = None
    with torch.no_grad():
        for b, h_hat in enumerate(streams.h_hat):
            streams.h_hat[b] = h_hat + rh[b].call(experts, xh[b]).reshape(h_hat.shape)
            if x is not None:
                streams.h[b] = streams.h[b] + r[b].call(fp_experts, x[b]).reshape(h_hat.shape)


def advance_moe(layer: nn.Module, fp_layer: nn.Module | None, sl: SubLayer, streams) -> None:
    """Advance ``streams`` past MoE sub-layer ``sl`` of a finished ``layer`` (its stored codes written in),
    with the same operations as :func:`quantize_moe` (``--resume`` replay)."""
    two = streams.h is not None
    norm = layer.get_submodule(sl.norm)
    block = layer.get_submodule(sl.module)
    experts, router = block.get_submodule(sl.experts), block.get_submodule(sl.router)
    fp_experts = fp_layer.get_submodule(sl.module).get_submodule(sl.experts) if two else None
    with torch.no_grad():
        xh = [_flat(norm(h)) for h in streams.h_hat]
        x = [_flat(norm(h)) for h in streams.h] if two else None
        rh = [_Routes.of(router, t, len(experts)) for t in xh]
        r = [_Routes.of(router, t, len(experts)) for t in x] if two else None
    _advance(streams, experts, fp_experts, xh, x, rh, r)


def _quantize_w_out(experts, fp_experts, router, sl, streams, xh, x, rh, r, cfg, eps, prefix, device, few) -> dict:
    """(b) every expert's ``W_out`` from ``X̂' = ŝ r̂ X̂``, ``X' = s r X`` and ``R = ρ(s h − ŝ ĥ + s U)`` (docstring)."""
    from loaq.pipeline import rtn_linear, solve_group

    m = cfg.method
    two = streams.h is not None
    use_B = two and m.rule.output_stats and m.soa and m.beta != 0
    rescale = two and m.rule.output_stats and m.rescale
    s_hat, s, res = [], [], []
    with torch.no_grad():
        for b in range(len(xh)):
            h_hat = _flat(streams.h_hat[b])
            if not (rescale or use_B):
                s_hat.append(None)
                continue
            h = _flat(streams.h[b])
            y_hat, y = rh[b].call(experts, xh[b]), r[b].call(fp_experts, x[b])  # W_out still float in both
            sb = rms_factor(h + y, eps) if rescale else torch.ones_like(h[:, :1])
            shb = rms_factor((h_hat if m.shat == "text" else h) + y_hat, eps) if rescale else torch.ones_like(sb)
            s_hat.append(shb)
            s.append(sb)
            if use_B:
                only_fp = r[b].mask & ~rh[b].mask
                U = torch.zeros_like(h)
                for e in only_fp.any(0).nonzero()[:, 0].tolist():
                    rows = only_fp[:, e]
                    U[rows] += r[b].weight[rows, e, None] * fp_experts[e](x[b][rows])
                share = rh[b].weight / rh[b].weight.sum(-1, keepdim=True)
                res.append((share, sb * h - shb * h_hat + sb * U))
    n_all = sum(t.shape[0] for t in xh)
    k = int(rh[0].mask[0].sum())
    results = {}
    for e, expert in enumerate(experts):
        w_out = expert.get_submodule(sl.w_out)
        name = f"{prefix}{sl.module}.{sl.experts}.{e}.{sl.w_out}"
        st = Stats(w_out.in_features, cross=two, n_res=w_out.out_features if use_B else 0, device=device)
        with torch.no_grad():
            for b in range(len(xh)):
                rows = rh[b].mask[:, e]
                Xh = rh[b].weight[rows, e, None] * _down_input(expert, xh[b][rows], cfg.act)
                if not two:
                    st.add(Xh)
                    continue
                X = r[b].weight[rows, e, None] * fp_experts[e].inner(x[b][rows])
                if s_hat[b] is not None:
                    Xh, X = s_hat[b][rows] * Xh, s[b][rows] * X
                st.add(Xh, X, res[b][0][rows, e, None] * res[b][1][rows] if use_B else None)
        m_out = few.min_tokens(w_out.in_features)
        if st.tokens < m_out and few.policy == "rtn":
            results[name] = rtn_linear(w_out, cfg.spec)
            continue
        if st.tokens < m_out and few.policy == "shrink":
            prior = Stats(w_out.in_features, device=device)
            with torch.no_grad():
                for b in range(len(xh)):
                    Xh = _down_input(expert, xh[b], cfg.act) / k
                    prior.add(s_hat[b] * Xh if s_hat[b] is not None else Xh)
            _shrink(st, prior.H, n_all, m_out)
        results |= solve_group([name], [w_out], st, cfg, name, st.B)
    return results
