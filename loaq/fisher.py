"""How much the model's loss cares about each linear's output: the gains that turn a unit's own normalized
output error into an estimate of the end-to-end loss increase (issue #19's allocation).

A unit's held-out error ``e`` (:class:`loaq.allocation.Probe`) is ``E‖δy‖² / E‖y‖²`` on its own outputs: it
is blind to what happens after the linear (the softmax behind q/k, the residual stream, the depth left). A
second-order expansion of the calibration loss ``L`` around the float model, with the empirical Fisher in
place of the Hessian, gives for an output perturbation ``δy_t`` on token ``t``

    ΔL ≈ ½ Σ_t δy_tᵀ F_t δy_t,    F_t ≈ g_t g_tᵀ,    g_t = ∂L/∂y_t,

and for a perturbation spread evenly over the ``d_out`` output directions with ``Σ_t ‖δy_t‖² = e · Σ_t ‖y_t‖²``

    ΔL ≈ ½ · e · gain,    gain = (Σ_t ‖y_t‖²) · (Σ_t ‖g_t‖²) / (T · d_out).

``gain`` is measured once per linear on a few calibration windows of the float model (one forward and one
backward each, the next-token cross-entropy of the window's own text as ``L``); a fused unit's gain is the sum
of its linears' (each linear's share of ``e`` is its share of the output energy). The gains' common scale
does not matter to the allocation (it multiplies every unit's value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def output_gains(model: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, float]:
    """``gain`` of each linear in ``names`` (module docstring), from ``windows`` [n, seqlen] of token ids,
    one window per forward/backward; the model's parameters are left untouched (no parameter gradients)."""
    y2 = {n: 0.0 for n in names}
    g2 = {n: 0.0 for n in names}
    tokens = 0
    hooks = []

    def hook(name):
        def fwd(mod, inp, out):
            y2[name] += float(out.detach().double().pow(2).sum())

            def bwd(g):
                g2[name] += float(g.double().pow(2).sum())
            out.register_hook(bwd)
        return fwd

    for n in names:
        hooks.append(model.get_submodule(n).register_forward_hook(hook(n)))
    flags = [p.requires_grad for p in model.parameters()]
    try:
        for p in model.parameters():
            p.requires_grad_(False)
        emb = model.get_input_embeddings()
        for ids in windows:
            ids = ids[None]
            with torch.enable_grad():
                x = emb(ids).detach().requires_grad_(True)
                logits = model(inputs_embeds=x, use_cache=False).logits[0, :-1].float()
                loss = F.cross_entropy(logits, ids[0, 1:], reduction="sum")
                loss.backward()
            tokens += ids.shape[1]
    finally:
        for h in hooks:
            h.remove()
        for p, f in zip(model.parameters(), flags):
            p.requires_grad_(f)
    return {n: y2[n] * g2[n] / (tokens * model.get_submodule(n).weight.shape[0]) for n in names}
