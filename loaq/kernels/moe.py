"""Mixture-of-experts forward over LoaQ's packed linears: ``torch.ops.loaq.moe(x, topk_weights, topk_ids, handle)``.

Each expert ``e`` is two prepared linears (:func:`loaq.kernels.dispatch.prepare_linear`): ``w13`` (gate and up
stacked, [2I, d]) and ``w2`` (down, [d, I]). For tokens ``x`` [T, d] routed to experts ``topk_ids`` [T, k] with
weights ``topk_weights`` [T, k] it returns ``Σ_j w_{t,j} · down(silu(gate(x_t)) · up(x_t))`` of expert
``topk_ids[t, j]``: a loop over the experts present, gathering their tokens (correctness first; every expert
call is one of the dense kernels). One opaque custom op, like ``loaq::linear`` (:mod:`loaq.kernels.op`), so
``torch.compile`` neither traces the data-dependent gathers nor breaks the graph; ``handle`` indexes this
process's table of registered expert sets.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from loaq.kernels.dispatch import apply_linear
from loaq.kernels.kernel import LinearKernel

__all__ = ["register_experts", "moe_forward"]

_EXPERTS: list[tuple[list[LinearKernel], list[LinearKernel]]] = []  # handle -> (w13 per expert, w2 per expert)


def register_experts(w13: list[LinearKernel], w2: list[LinearKernel]) -> int:
    """Add one layer's prepared experts to the table; returns the handle for ``torch.ops.loaq.moe``."""
    if len(w13) != len(w2):
        raise ValueError(f"{len(w13)} gate/up linears but {len(w2)} down linears")
    _EXPERTS.append((w13, w2))
    return len(_EXPERTS) - 1


def moe_forward(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                w13: list, w2: list) -> torch.Tensor:
    """The routed experts' weighted sum for ``x`` [T, d]; ``w13``/``w2``: per expert, callables or kernels."""
    out = torch.zeros_like(x)
    ids = topk_ids.long()
    for e in torch.unique(ids).tolist():
        tok, pos = torch.where(ids == e)
        gate, up = _call(w13[e], x[tok]).chunk(2, dim=-1)
        y = _call(w2[e], F.silu(gate) * up)
        out.index_add_(0, tok, (y * topk_weights[tok, pos, None]).to(out.dtype))
    return out


def _call(layer, x: torch.Tensor) -> torch.Tensor:
    return apply_linear(x, layer) if isinstance(layer, LinearKernel) else layer(x)


@torch.library.custom_op("loaq::moe", mutates_args=())
def _moe(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, handle: int) -> torch.Tensor:
    w13, w2 = _EXPERTS[handle]
    return moe_forward(x, topk_weights, topk_ids, w13, w2)


@_moe.register_fake
def _(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, handle: int) -> torch.Tensor:
    return torch.empty_like(x)
