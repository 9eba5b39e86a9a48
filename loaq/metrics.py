"""Evaluation: perplexity on held-out text and per-layer hidden-state error between two models.

Perplexity follows GPTQ's protocol: non-overlapping windows of ``seqlen`` tokens, each scored alone,
loss on positions 1..L-1, ``ppl = exp(mean NLL)`` over a fixed token budget (DATA.md: ``ppl16k`` =
the first 16,384 evaluation tokens in 32 windows of 512).

Hidden-state error (the paper's Figures 3 and 4): after every decoder layer, the MSE between the
reference and quantized residual streams, unnormalized and after the paper's ``Norm`` (eq. 1, the
RMSNorm without its weight). Position 0 of each window carries the attention-sink outliers and is
left out ("without outlier tokens").
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from loaq.arch import Arch, rms_factor


@torch.no_grad()
def perplexity(model: nn.Module, windows: torch.Tensor, batch_size: int = 4, progress: bool = False) -> float:
    """``exp`` of the mean next-token NLL over ``windows`` ([n, L])."""
    from tqdm.auto import tqdm

    nll, count = 0.0, 0
    device = next(model.parameters()).device
    for batch in tqdm(windows.split(batch_size), desc="ppl", disable=not progress, unit="batch"):
        batch = batch.to(device)
        logits = model(batch, use_cache=False).logits[:, :-1].float()
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), batch[:, 1:].reshape(-1), reduction="sum")
        nll += loss.item()
        count += batch[:, 1:].numel()
    return math.exp(nll / count)


@torch.no_grad()
def layer_outputs(model: nn.Module, arch: Arch, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """Residual stream after every decoder layer, [n_layers] of [tokens, hidden] (position 0 dropped)."""
    layers = arch.decoder_layers(model)
    outs: list[list[torch.Tensor]] = [[] for _ in layers]
    hooks = [l.register_forward_hook(lambda _m, _a, o, i=i: outs[i].append((o[0] if isinstance(o, tuple) else o)[:, 1:].float().cpu()))
             for i, l in enumerate(layers)]
    try:
        for batch in windows.split(batch_size):
            model.model(batch, use_cache=False)
    finally:
        for h in hooks:
            h.remove()
    return [torch.cat(o).reshape(-1, o[0].shape[-1]) for o in outs]


def hidden_mse(ref: list[torch.Tensor], quant: list[torch.Tensor], eps: float) -> dict[str, list[float]]:
    """Per-layer MSE between two lists of layer outputs, raw and after ``Norm`` (eq. 1)."""
    raw, normed = [], []
    for h, hq in zip(ref, quant):
        raw.append(torch.mean((h - hq) ** 2).item())
        normed.append(torch.mean((rms_factor(h, eps) * h - rms_factor(hq, eps) * hq) ** 2).item())
    return {"mse": raw, "mse_normed": normed}
