"""LoaQ's W_out target for a sub-layer whose output is normalized before the residual add (Gemma 3).

Gemma 3's sub-layers carry a post-norm ``P`` besides the pre-norm (sandwich norms):

    h_mid = h + P(X W + b),   P(z) = r(z) · z Γ,   Γ = diag(γ),  γ = 1 + g,

with ``r`` the paper's RMS factor (eq. 1) of each token and ``X = φ(Norm(h) W_in)`` (eq. 5). The paper's
notation: ``W`` is [N, M] (paper layout), rows are tokens, ``R(·)`` is ``r`` per token (eq. 2).

**Objective.** NOA (eq. 11) with the post-norm in the sub-layer:

    argmin_Q || Norm(ĥ + P(X̂Q + b)) − Norm(h + P(XW + b)) ||²_F.

As the paper does for eq. 12, every scaling factor takes ``W`` in place of ``Q``, which leaves four
known diagonal matrices per token:

    p = R(XW + b),  p̂ = R(X̂W + b)                  (post-norm, float and quantized stream)
    s = R(h + P(XW + b)),  ŝ = R(ĥ + P(X̂W + b))      (the next norm, eq. 12; Algorithm 1's ŝ puts h for ĥ)

and the objective becomes

    || ŝĥ + ŝp̂(X̂Q + b)Γ − sh − sp(XW + b)Γ ||²_F = || (ŝp̂X̂ Q − (sp X W + R)) Γ ||²_F,
    R = (sh − ŝĥ) Γ⁻¹ + (sp − ŝp̂) 1 b.

``Γ`` weights output column ``j`` by ``γ_j²``. The columns of ``Q`` enter the objective separately
(GPTQ rounds each output channel on its own too), and scaling one column's loss does not move its
minimizer, so for ``γ_j ≠ 0`` the objective has the minimizer of

    || X̂' Q − (X' W + R) ||²_F,   X̂' = ŝp̂X̂,   X' = spX,

which is eq. 9's form. Lemma 1 (Appendix A) with ``H = X̂'ᵀX̂'``, ``C = X̂'ᵀ(X' − X̂')`` gives

    W̃ = (I + H⁻¹C) W + H⁻¹ X̂'ᵀ R,

and LoaQ's adjustment (Algorithm 1 line 18): ``W̃ = (I + αH⁻¹C) W + β H⁻¹ X̂'ᵀ R``. Without ``b``, ``Γ = I``
and ``p = p̂ = 1`` this is Algorithm 1's ``W_out`` step exactly. The post-norm factors ``p``, ``p̂`` are part
of the sub-layer, so ``--no-rescale`` (SOA, eq. 9 with the post-norm) drops only ``s``, ``ŝ``: ``X̂' = p̂X̂``,
``X' = pX``, ``R = (h − ĥ)Γ⁻¹ + (p − p̂) b``. A column with ``γ_j = 0`` contributes nothing to the output;
its ``R`` is set to 0 (its target is then the LLOA one). ``tests/test_sandwich.py`` checks the closed form
against a least-squares solve of the Γ-weighted objective above, and the pipeline's streams against the model.
"""

from __future__ import annotations

import torch
from torch import nn

from loaq.arch import rms_factor


def gamma(post_norm: nn.Module, offset: float) -> torch.Tensor:
    """The post-norm's per-channel scale ``γ = offset + g`` (Gemma: ``1 + g``), float32."""
    return offset + post_norm.weight.detach().float()


def w_out_terms(X_hat: torch.Tensor, X: torch.Tensor, h_hat: torch.Tensor, h: torch.Tensor, y_hat: torch.Tensor,
                y: torch.Tensor, bias: torch.Tensor | float, post_norm: nn.Module, offset: float, eps: float,
                rescale: bool, shat_from_h: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(X̂', X', R)`` of one batch for :class:`loaq.stats.Stats` (the module docstring's derivation).

    ``y = XWᵀ + b`` and ``y_hat = X̂Wᵀ + b`` are the module outputs before the post-norm (``W`` still float);
    ``shat_from_h`` takes Algorithm 1's ``ŝ = R(h + P(X̂W + b))`` instead of ``R(ĥ + P(X̂W + b))``."""
    g = gamma(post_norm, offset)
    p, p_hat = rms_factor(y, eps), rms_factor(y_hat, eps)
    if rescale:
        s = rms_factor(h + post_norm(y), eps)
        s_hat = rms_factor((h if shat_from_h else h_hat) + post_norm(y_hat), eps)
    else:
        s = s_hat = torch.ones_like(p)
    g_inv = torch.where(g != 0, 1 / g, torch.zeros_like(g))
    R = (s * h.float() - s_hat * h_hat.float()) * g_inv + (s * p - s_hat * p_hat) * bias
    R = R * (g != 0)  # a column the post-norm zeroes has no output to match
    return (s_hat * p_hat) * X_hat, (s * p) * X, R
