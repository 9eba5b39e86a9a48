"""The loss gains of :mod:`loaq.fisher` against an independent autograd computation of the same quantity,
and the second-order loss estimate they stand for against a measured loss change."""

import torch
import torch.nn.functional as F

from loaq.fisher import output_gains
from tests.tiny import tiny_model, tokens

NAMES = ["model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj", "model.layers.1.self_attn.o_proj"]


def window_loss(model, ids):
    logits = model(ids[None], use_cache=False).logits[0, :-1].float()
    return F.cross_entropy(logits, ids[1:], reduction="sum")


def test_gains_equal_an_explicit_output_gradient():
    """gain_j = Σ_t y_tj² · Σ_t (∂L/∂y_tj)² / T per output channel, with ∂L/∂y from a zero bias added to the
    output (a parameter gradient, not the tensor hook the module uses); parameters untouched, their
    requires_grad restored."""
    model = tiny_model(seed=3).float().eval()
    ids = tokens(3, 16, vocab=96, seed=4)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gains = output_gains(model, NAMES, ids)
    assert all(p.requires_grad for p in model.parameters())
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    assert all(p.grad is None for p in model.parameters())
    for name in NAMES:
        lin = model.get_submodule(name)
        y2 = g2 = 0.0
        for w in ids:
            z = torch.zeros(1, w.numel(), lin.out_features, dtype=torch.float64, requires_grad=True)
            outs = []
            h = lin.register_forward_hook(lambda m, i, o: outs.append(o) or (o + z.to(o.dtype)))
            try:
                loss = window_loss(model, w)
                (g,) = torch.autograd.grad(loss, z)
            finally:
                h.remove()
            y2 = y2 + outs[0].detach().double().pow(2).sum((0, 1))
            g2 = g2 + g.pow(2).sum((0, 1))
        want = y2 * g2 / ids.numel()
        assert gains[name].shape == (lin.out_features,)
        torch.testing.assert_close(gains[name], want, rtol=1e-5, atol=1e-12 * float(want.max()))
        assert float(want.max()) > 3 * float(want.min()), name  # channels differ: one number would blur them


def _loss_gradient(model, ids, name):
    """(y, ∂L/∂y) of linear ``name`` on one window."""
    lin = model.get_submodule(name)
    outs = []
    h = lin.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    z = torch.zeros(1, ids.shape[1], lin.out_features, requires_grad=True)
    h2 = lin.register_forward_hook(lambda m, i, o: o + z)
    try:
        (g,) = torch.autograd.grad(window_loss(model, ids[0]), z)
    finally:
        h.remove(), h2.remove()
    return outs[0], g


def test_gain_predicts_the_second_order_loss_change():
    """Perturbations δy_tj = √e · y_tj · ξ (relative energy ``e`` in every channel): the loss change's second
    moment along the gradient, E[(Σ_tj g_tj δy_tj)²] = e Σ_tj g_tj² y_tj², is Monte Carlo within 15 % and
    ``e · Σ_j gain_j`` within its order of magnitude (exact when y² and g² are uncorrelated over tokens)."""
    model = tiny_model(seed=5).float().eval()
    ids = tokens(1, 24, vocab=96, seed=6)
    name = "model.layers.1.mlp.down_proj"
    gain = output_gains(model, [name], ids)[name]
    y, g = _loss_gradient(model, ids, name)
    e = 1e-3
    gen = torch.Generator().manual_seed(0)
    draws = [float((g * y * e ** 0.5 * torch.randn(y.shape, generator=gen)).sum()) ** 2 for _ in range(4000)]
    mc = sum(draws) / len(draws)
    exact = e * float((y.pow(2) * g.pow(2)).sum())
    assert abs(mc - exact) <= 0.15 * exact
    assert 0.2 * exact <= e * float(gain.sum()) <= 5 * exact


def test_per_channel_gains_follow_each_channels_exact_moment():
    """Per channel, the exact second moment of a relative error ``e`` in that channel alone is
    ``e Σ_t g_tj² y_tj²``; ``e · gain_j`` is within 2× of it for ≥ 90 % of the channels (log-correlation ≥ 0.9),
    while one number per linear (the isotropic form: every channel the mean gain) misses more channels."""
    model = tiny_model(seed=5).float().eval()
    ids = tokens(1, 96, vocab=96, seed=6)
    name = "model.layers.1.mlp.down_proj"
    gain = output_gains(model, [name], ids)[name]
    y, g = _loss_gradient(model, ids, name)
    exact = (y.pow(2) * g.pow(2)).sum((0, 1)).double()
    per_channel = float((((gain / exact) <= 2) & ((exact / gain) <= 2)).float().mean())
    isotropic = float((((gain.mean() / exact) <= 2) & ((exact / gain.mean()) <= 2)).float().mean())
    assert per_channel >= 0.9 and per_channel > isotropic, (per_channel, isotropic)
    assert float(torch.corrcoef(torch.stack([gain.log(), exact.log()]))[0, 1]) >= 0.9
