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
    """gain = Σ‖y‖² · Σ‖∂L/∂y‖² / (T · d_out), with ∂L/∂y from a zero bias added to the output (a parameter
    gradient, not the tensor hook the module uses); parameters untouched, their requires_grad restored."""
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
            y2 += float(outs[0].detach().double().pow(2).sum())
            g2 += float(g.pow(2).sum())
        want = y2 * g2 / (ids.numel() * lin.out_features)
        assert abs(gains[name] - want) <= 1e-5 * want, name
    assert len({round(v, 12) for v in gains.values()}) == len(NAMES)  # not one number for every linear


def test_gain_predicts_the_second_order_loss_change():
    """Averaged over random output perturbations of relative energy e, the loss change's second moment along
    the gradient, E[(Σ_t g_t·δy_t)²], is e·gain (the isotropic step of the module docstring): Monte Carlo
    within 15 %."""
    model = tiny_model(seed=5).float().eval()
    ids = tokens(1, 24, vocab=96, seed=6)
    name = "model.layers.1.mlp.down_proj"
    gain = output_gains(model, [name], ids)[name]
    lin = model.get_submodule(name)
    outs = []
    h = lin.register_forward_hook(lambda m, i, o: outs.append(o.detach()))
    z = torch.zeros(1, ids.shape[1], lin.out_features, requires_grad=True)
    h2 = lin.register_forward_hook(lambda m, i, o: o + z)
    try:
        (g,) = torch.autograd.grad(window_loss(model, ids[0]), z)
    finally:
        h.remove(), h2.remove()
    y = outs[0]
    e = 1e-3
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(4000):
        u = torch.randn(y.shape, generator=gen)
        u *= (e * y.pow(2).sum(-1, keepdim=True) / u.pow(2).sum(-1, keepdim=True)).sqrt()  # ‖δy_t‖² = e‖y_t‖²
        draws.append(float((g * u).sum()) ** 2)
    mc = sum(draws) / len(draws)
    # per-token energies differ, so the estimate is exact only when ‖y_t‖² and ‖g_t‖² are uncorrelated over t
    exact = e * float((y.pow(2).sum(-1) * g.pow(2).sum(-1)).sum()) / lin.out_features
    assert abs(mc - exact) <= 0.15 * exact
    assert 0.2 * exact <= e * gain <= 5 * exact  # the decoupled form keeps the order of magnitude
