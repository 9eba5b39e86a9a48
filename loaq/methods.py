"""The method registry: one row per method, the only place that knows what a method name means.

A method is its GPTQ target rule (:mod:`loaq.targets`) or solver variant (:mod:`loaq.solver`), whether it
needs the full-precision stream ``(X, h)`` beside the quantized one, whether it builds LoaQ's ``W_out``
statistics (NOA's token rescaling by ``s``, ``ŝ`` and SOA's residual ``B``), and the settings it accepts
with their defaults. Adding a baseline means one :class:`MethodRule` here and, if it has a new target, one
function in :mod:`loaq.targets`.

Defaults: GPTAQ's own weighting ``α = 0.25``; LoaQ's ``α = 0.25, β = 0`` from ``loaq search`` on SmolLM2 W3
(``benchmarks/results/search_w3*.json``: α best of {0, .25, .5, .75, 1}, β best of {0, .05, .1, .15, .25,
.5, .75, 1} on held-out calibration text); LLOA takes LoaQ's α.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.solver import Factor, QuantResult, SolverOptions, gptq_solve, qronos_solve
from loaq.targets import output_target

# the settings of :class:`loaq.config.Method` besides its name, with the value that means "not used"
NEUTRAL = {"alpha": 0.0, "beta": 0.0, "rescale": True, "soa": True, "shat": "text"}
FLAGS = {"alpha": "--alpha", "beta": "--beta", "rescale": "--no-rescale", "soa": "--no-soa", "shat": "--shat"}

# solve(W, factor, C, B, method, spec, opts) -> QuantResult; C = X̂ᵀ(X − X̂) (None for one stream; a
# loaq.stats.Projected C Wᵀ for rules with reads_CW),
# B = X̂'ᵀ(s h − ŝ ĥ) (None unless LoaQ's SOA is on)
Solve = Callable[[torch.Tensor, Factor, "torch.Tensor | None", "torch.Tensor | None", object, GridSpec,
                  SolverOptions], QuantResult]


@dataclass(frozen=True)
class MethodRule:
    """What a method name means.

    - ``solve``: the GPTQ call on a group's stacked weights; ``None`` for round-to-nearest (no calibration);
    - ``two_stream``: needs the float stream ``(X, h)`` and ``C``;
    - ``resets_fp_stream``: the float layer reads the quantized stream's input (Qronos' per-layer reset);
    - ``output_stats``: ``W_out`` statistics rescaled by the RMSNorm factors, with the residual ``B`` (LoaQ);
    - ``reads_CW``: the rule reads ``C`` only as ``C Wᵀ`` (LLOA/LoaQ's target), so the statistics may keep
      that product instead (:class:`loaq.stats.Stats`' ``project``);
    - ``towards_target``: the rule is GPTQ towards :func:`loaq.targets.output_target` (``W`` itself for GPTQ),
      so a caller solving one group on several grids (the allocation's sensitivity) forms the target once;
    - ``settings``: accepted settings and their defaults; any other setting away from its neutral value
      (:data:`NEUTRAL`) is refused.
    """

    name: str
    summary: str
    solve: Solve | None
    two_stream: bool = False
    resets_fp_stream: bool = False
    output_stats: bool = False
    reads_CW: bool = False
    towards_target: bool = False
    settings: dict = field(default_factory=dict)


def _gptq(W, factor, C, B, m, spec, opts):
    return gptq_solve(W, factor, spec, opts)


def _gptaq(W, factor, C, B, m, spec, opts):
    return gptq_solve(W, factor, spec, opts, dXXT=C.T, gptaq_alpha=m.alpha)


def _qronos(W, factor, C, B, m, spec, opts):
    return qronos_solve(W, factor, C, spec, opts)


def _output_approx(W, factor, C, B, m, spec, opts):
    """LLOA/LoaQ: GPTQ towards ``W̃ = (I + αH⁻¹C)W + βH⁻¹B`` (eqs. 8, 10, 12)."""
    if factor.disposable:  # the target needs L alone: H goes before C·W is formed
        factor.release(L=False)
    target = output_target(W, factor, C, m.alpha, B, m.beta)
    del C, B  # the GPTQ solve needs the target alone: the statistics go before its H⁻¹ factors are formed
    return gptq_solve(target, factor, spec, opts)


AUTO = "auto"  # α/β chosen per model and setting on held-out calibration windows (loaq.auto)
# LoaQ's α, β default to ``auto``: one fixed pair chosen on SmolLM2 W3 lost to Qronos elsewhere (issue #18;
# benchmarks/results/robust.md and quality_tables.md have the runs that made auto the default)
_LOAQ_SETTINGS = {"alpha": AUTO, "beta": AUTO, "rescale": True, "soa": True, "shat": "text"}

METHODS: dict[str, MethodRule] = {r.name: r for r in (
    MethodRule("rtn", "round to nearest, no calibration", None),
    MethodRule("gptq", "GPTQ (Frantar et al. 2023) on the quantized stream", _gptq, towards_target=True),
    MethodRule("gptaq", "GPTAQ (Li et al. 2025): asymmetric calibration towards XWᵀ", _gptaq, two_stream=True,
               settings={"alpha": 0.25}),
    MethodRule("qronos", "Qronos (Zhang et al. 2025): correct the past, GPTQ the future", _qronos,
               two_stream=True, resets_fp_stream=True),
    MethodRule("lloa", "LoaQ's linear-layer output approximation alone (eq. 8)", _output_approx, two_stream=True,
               reads_CW=True, towards_target=True, settings={"alpha": 0.25}),
    MethodRule("loaq", "LoaQ (arXiv 2509.06297): LLOA on W_in, sub-layer + normalized output approximation on W_out",
               _output_approx, two_stream=True, output_stats=True, reads_CW=True, towards_target=True,
               settings=_LOAQ_SETTINGS),
)}


def rule(name: str) -> MethodRule:
    """The registry row of ``name``, or one line naming the known methods."""
    try:
        return METHODS[name]
    except KeyError:
        raise LoaQError(f"unknown method {name!r}; choose one of {', '.join(METHODS)}") from None


def check_settings(r: MethodRule, given: dict) -> None:
    """Refuse settings ``r`` does not use (``given``: setting -> value, ``None`` = not given)."""
    for k, v in given.items():
        if v is None or k in r.settings or v == NEUTRAL[k]:
            continue
        takes = ", ".join(FLAGS[s] for s in r.settings) or "no settings"
        raise LoaQError(f"{FLAGS[k]} {'' if isinstance(v, bool) else v!s}".rstrip()
                        + f" has no meaning for method {r.name} (it takes {takes}); drop it or choose a method that uses it")
