"""``--alpha auto --beta auto``: choose LoaQ's α, β for the model and setting at hand, from calibration data alone.

A cheap stand-in for ``loaq search`` (which scores full runs by held-out perplexity) that runs inside
:func:`loaq.api.quantize`, after the rotation and before the pipeline:

1. split the run's calibration windows into a fitting part and a held-out tail
   (:func:`loaq.holdout.split_windows`, 25 %);
2. for each candidate, quantize only the first ``k`` decoder layers of a copy of the (rotated) model
   with the run's own setting (bits, group, init, activation bits, rotation) on the fitting windows;
3. score it by the normalized output error after layer ``k`` on the held-out windows
   (:func:`loaq.holdout.layer_errors`) and keep the smallest: α over :data:`ALPHAS` first (at the given β,
   or 0 when β is auto too), then β over :data:`BETAS` at that α (LoaQ's α-then-β order, Appendix C.2).

``k`` is sized so the candidates together cost at most :data:`BUDGET` of one quantization run
(``candidates · k · (1 − holdout) ≤ BUDGET · n_layers``). The chosen values replace ``auto`` in the run's
config, so ``loaq.json`` records fixed α, β (and its ``--recipe`` reproduces the run without searching);
``loaq.json["auto"]`` records the candidates, their criterion values, ``k`` and the held-out windows.
The evaluation text is never read: the only tokens are the run's calibration windows.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import math
import sys
import time

import torch
from torch import nn

from loaq.arch import Arch
from loaq.config import AUTO, QuantConfig
from loaq.holdout import layer_errors, reference_outputs, split_windows

ALPHAS = (0.25, 0.5, 1.0)
BETAS = (0.0, 0.25)
HOLDOUT = 0.25
BUDGET = 0.45  # of one run, leaving room for the held-out forwards
MAX_LAYERS = 4  # the prefix and a candidate's copy hold 2k float32 layers: 4 keeps a 70B's search near 27 GB


def search_layers(n_layers: int, candidates: int, holdout: float = HOLDOUT, budget: float = BUDGET) -> int:
    """Layers ``k`` each candidate quantizes so all of them cost ≤ ``budget`` of a run (at least 1, at most
    :data:`MAX_LAYERS`)."""
    return max(1, min(n_layers, MAX_LAYERS, math.floor(budget * n_layers / (candidates * (1 - holdout)))))


def copy_layers(model: nn.Module, arch: Arch) -> nn.Module:
    """A copy of ``model`` whose decoder layers are its own and whose other tensors (embeddings, final norm,
    ``lm_head``: never changed by the pipeline) are shared, not copied: a large vocabulary is not held twice."""
    inside = arch.layers + "."
    outside = [t for n, t in [*model.named_parameters(remove_duplicate=False), *model.named_buffers(remove_duplicate=False)]
               if not n.startswith(inside)]
    return copy.deepcopy(model, {id(t): t for t in outside})


def _prefix(model: nn.Module, arch: Arch, k: int) -> nn.Module:
    """:func:`copy_layers` of ``model`` keeping only its first ``k`` decoder layers (the original is untouched)."""
    parent_name, _, list_name = arch.layers.rpartition(".")
    parent = model.get_submodule(parent_name)
    full = getattr(parent, list_name)
    setattr(parent, list_name, nn.ModuleList(list(full)[:k]))
    try:
        return copy_layers(model, arch)
    finally:
        setattr(parent, list_name, full)


def choose(model: nn.Module, arch: Arch, calib: torch.Tensor, cfg: QuantConfig, *, batch_size: int = 8,
           device: str = "cpu", alphas=ALPHAS, betas=BETAS, holdout: float = HOLDOUT,
           layers: int | None = None, progress: bool = False, weights=None) -> tuple[QuantConfig, dict]:
    """(``cfg`` with its ``auto`` settings fixed, the record written to ``loaq.json["auto"]``); ``progress``
    prints one line per candidate (stderr); ``weights``: the :class:`loaq.lazy.LazyWeights` of a lazily
    loaded ``model`` (a skeleton), from which only the embeddings, head and the first ``k`` layers are read."""
    from loaq.pipeline import quantize_model

    t0 = time.time()
    m = cfg.method
    auto_a, auto_b = m.alpha == AUTO, m.beta == AUTO
    if not (auto_a or auto_b):
        return cfg, {}
    n_cand = (len(alphas) if auto_a else 0) + (len(betas) - (1 if auto_a and 0.0 in betas else 0) if auto_b else 0)
    n_layers = len(arch.decoder_layers(model))
    k = layers or search_layers(n_layers, max(1, n_cand), holdout)
    fit, held = split_windows(calib, holdout)
    with contextlib.ExitStack() as loaded:
        if weights is not None:  # the prefix's float weights, rotated as the run rotates them, then released
            loaded.enter_context(weights.rest())
            for i in range(k):
                loaded.enter_context(weights.layer(i))
        prefix = _prefix(model, arch, k)
    ref = reference_outputs(prefix, arch, held, batch_size)
    tried: dict[tuple[float, float], float] = {}

    def score(alpha: float, beta: float) -> float:
        if (alpha, beta) not in tried:
            q = copy_layers(prefix, arch)
            c = dataclasses.replace(cfg, method=dataclasses.replace(m, alpha=alpha, beta=beta))
            quantize_model(q, arch, fit, c, batch_size=batch_size, device=device, progress=False)
            tried[(alpha, beta)] = layer_errors(ref, q, arch, held, batch_size)[-1]
            del q
            if progress:
                print(f"auto: alpha={alpha:g} beta={beta:g} held-out error after layer {k}: "
                      f"{tried[(alpha, beta)]:.5f}", file=sys.stderr, flush=True)
        return tried[(alpha, beta)]

    beta0 = 0.0 if auto_b else m.beta
    alpha = min(alphas, key=lambda a: score(a, beta0)) if auto_a else m.alpha
    beta = min(betas, key=lambda b: score(alpha, b)) if auto_b else beta0
    fixed = dataclasses.replace(cfg, method=dataclasses.replace(m, alpha=float(alpha), beta=float(beta)))
    record = {
        "alpha": float(alpha), "beta": float(beta),
        "searched": [k_ for k_, on in (("alpha", auto_a), ("beta", auto_b)) if on],
        "how": f"α over {list(alphas)} then β over {list(betas)} at the best α; each candidate quantizes the first "
               f"{k} of {n_layers} decoder layers on {fit.shape[0]} calibration windows",
        "criterion": f"normalized output error after layer {k} on the {held.shape[0]} held-out calibration windows "
                     "(mean ‖Norm(h) − Norm(ĥ)‖² / d, position 0 left out)",
        "layers": k, "fit_windows": int(fit.shape[0]), "holdout_windows": int(held.shape[0]),
        "candidates": [{"alpha": a, "beta": b, "error": e} for (a, b), e in tried.items()],
        "seconds": round(time.time() - t0, 2),
    }
    return fixed, record
