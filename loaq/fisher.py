"""How much the model's loss cares about each output channel of each linear: the gains that turn a unit's
per-channel normalized output error into an estimate of the end-to-end loss increase (issue #19's allocation).

A unit's held-out error (:class:`loaq.allocation.Probe`) is measured on its own outputs, row by row:
``e_j = E δy_j² / E y_j²`` for output channel ``j``. That is blind to what happens after the linear (the
softmax behind q/k, the residual stream, the depth left). A second-order expansion of the calibration loss
``L`` around the float model, with the diagonal of the empirical Fisher in place of the Hessian, gives for an
output perturbation ``δy_t`` on token ``t``

    ΔL ≈ ½ Σ_t Σ_j g_tj² δy_tj²,    g_t = ∂L/∂y_t,

and, with ``g_tj²`` and ``δy_tj²`` uncorrelated over tokens and ``Σ_t δy_tj² = e_j · Σ_t y_tj²``,

    ΔL ≈ ½ Σ_j e_j · gain_j,    gain_j = (Σ_t y_tj²) · (Σ_t g_tj²) / T.

Per channel, not per linear: the residual stream's gradient and a linear's output energy both sit in a few
channels (massive activations), so one number per linear (``Σ_j``, the isotropic form the fourth session
used) mis-ranks ``o_proj`` and ``down_proj`` against the ``w_in`` units. ``gain`` is measured once per linear
on a few calibration windows of the float model (one forward and one backward each, the next-token
cross-entropy of the window's own text as ``L``); a fused unit's gains are its linears' concatenated, as its
rows are. The gains' common scale does not matter to the allocation (it multiplies every unit's value).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def output_gains(model: nn.Module, names: list[str], windows: torch.Tensor) -> dict[str, torch.Tensor]:
    """``gain`` [out_features] float64 of each linear in ``names`` (module docstring), from ``windows``
    [n, seqlen] of token ids, one window per forward/backward; the model's parameters are left untouched
    (no parameter gradients)."""
    y2 = {n: 0.0 for n in names}
    g2 = {n: 0.0 for n in names}
    tokens = 0
    hooks = []

    def hook(name):
        def fwd(mod, inp, out):
            y2[name] = y2[name] + out.detach().double().pow(2).flatten(0, -2).sum(0)

            def bwd(g):
                g2[name] = g2[name] + g.double().pow(2).flatten(0, -2).sum(0)
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
    return {n: y2[n] * g2[n] / tokens for n in names}
