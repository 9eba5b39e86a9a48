"""A held-out slice of the calibration windows and the layer-output error measured on it.

What ``--alpha auto`` (:mod:`loaq.auto`) and the bit allocation of ``--target-bits`` (:mod:`loaq.allocation`)
score, and what any choice made from calibration data alone can score: the calibration windows are split into the windows a
run calibrates on and a held-out tail it never sees, and a quantized model is compared with its float
reference by the normalized output error after each decoder layer on the held-out tokens,

    e_l = mean ‖Norm(h_l) − Norm(ĥ_l)‖² / d,      Norm(h) = h / RMS(h)   (LoaQ eq. 1, no weight),

the ``mse_normed`` of ``loaq eval --mse`` (:func:`loaq.metrics.hidden_mse`; position 0, the attention
sink, left out). ``Norm(h)`` has unit mean square, so ``e_l`` is relative: 0 is exact, 2 is unrelated.
Nothing here reads evaluation text: the only tokens are the windows passed in.
"""

from __future__ import annotations

import torch
from torch import nn

from loaq.arch import Arch
from loaq.errors import LoaQError
from loaq.metrics import hidden_mse, layer_outputs


def split_windows(calib: torch.Tensor, fraction: float = 0.25) -> tuple[torch.Tensor, torch.Tensor]:
    """(windows to calibrate on, held-out windows): the last ``ceil(fraction · n)`` of ``calib`` ([n, L]) are held out."""
    n = calib.shape[0]
    if not 0 < fraction < 1:
        raise LoaQError(f"held-out fraction {fraction} is not strictly between 0 and 1; e.g. 0.25")
    held = max(1, -(-int(round(fraction * n * 1e6)) // 1_000_000))  # ceil, robust to float noise
    if n < 2:
        raise LoaQError(f"{n} calibration window(s) cannot be split into a calibration part and a held-out slice; "
                        "pass --nsamples ≥ 2 (e.g. 32) or fixed --alpha/--beta")
    held = min(held, n - 1)  # at least one window to calibrate on
    return calib[: n - held], calib[n - held :]


def reference_outputs(model: nn.Module, arch: Arch, windows: torch.Tensor, batch_size: int = 4) -> list[torch.Tensor]:
    """The float model's residual stream after every decoder layer on ``windows`` (kept for :func:`layer_errors`)."""
    return layer_outputs(model, arch, windows, batch_size)


def layer_errors(ref: list[torch.Tensor], model: nn.Module, arch: Arch, windows: torch.Tensor,
                 batch_size: int = 4) -> list[float]:
    """Normalized output error ``e_l`` of ``model`` against ``ref`` (:func:`reference_outputs` on the same
    ``windows``) after each of ``model``'s decoder layers."""
    eps = model.config.rms_norm_eps
    quant = layer_outputs(model, arch, windows, batch_size)
    return hidden_mse(ref[: len(quant)], quant, eps)["mse_normed"]
