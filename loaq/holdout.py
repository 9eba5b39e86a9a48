"""A held-out slice of the calibration windows, for choices scored on calibration data only.

Settings that LoaQ chooses itself (the per-linear bit allocation of :mod:`loaq.allocation`; ``--alpha
auto``) are fitted on some calibration windows and scored on others, never on the evaluation text. The
slice is a deterministic tail of the ``[n, L]`` windows, so it is a subset of exactly what calibration reads.
"""

from __future__ import annotations

import math

import torch

from loaq.errors import LoaQError


def split_windows(calib: torch.Tensor, fraction: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(fit, held): the first windows of ``calib`` and its last ``ceil(fraction · n)`` (at least one each)."""
    n = calib.shape[0]
    if not 0 < fraction < 1:
        raise LoaQError(f"held-out fraction {fraction} is not strictly between 0 and 1; e.g. 0.25 holds out a quarter")
    if n < 2:
        raise LoaQError(f"holding out calibration windows needs ≥ 2 of them, got {n}; raise --nsamples")
    held = min(n - 1, max(1, math.ceil(fraction * n)))
    return calib[: n - held], calib[n - held :]
