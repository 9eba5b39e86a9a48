"""Typed settings of one quantization run (flags map onto these 1:1)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from dataclasses import dataclass, field

from loaq.actquant import ActSpec
from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.rotation import RotationSpec
from loaq.solver import SolverOptions

METHODS = ("rtn", "gptq", "gptaq", "qronos", "lloa", "loaq")
# α (and β) when not given: GPTAQ's own default weighting; LoaQ's from `loaq search` on SmolLM2 W3
# (benchmarks/results/search_w3*.json: α = 0.25 best of {0,.25,.5,.75,1}; β = 0 best of
# {0,.05,.1,.15,.25,.5,.75,1} on held-out calibration text). LLOA takes LoaQ's α.
DEFAULT_ALPHA = {"gptaq": 0.25, "lloa": 0.25, "loaq": 0.25}
DEFAULT_BETA = {"loaq": 0.0}


@dataclass(frozen=True)
class Method:
    """A method and its knobs.

    - ``alpha``: LLOA/LoaQ's ``α`` (eq. 8), GPTAQ's weighting of the asymmetric term;
    - ``beta``: LoaQ's ``β`` on the sub-layer residual term (eq. 10/12);
    - ``rescale`` (NOA) and ``soa``: switch LoaQ's normalized / sub-layer approximation off (Table 5);
    - ``shat``: ``"text"`` takes ``ŝ = R(ĥ + X̂W)`` (Section 3.3), ``"alg"`` takes ``R(h + X̂W)`` (Algorithm 1 line 11).
    """

    name: str = "loaq"
    alpha: float | None = None
    beta: float | None = None
    rescale: bool = True
    soa: bool = True
    shat: str = "text"

    def __post_init__(self):
        if self.name not in METHODS:
            raise LoaQError(f"unknown method {self.name!r}; choose one of {', '.join(METHODS)}")
        if self.shat not in ("text", "alg"):
            raise LoaQError(f"--shat {self.shat!r} is unknown; use 'text' or 'alg'")
        if self.alpha is None:
            object.__setattr__(self, "alpha", DEFAULT_ALPHA.get(self.name, 0.0))
        if self.beta is None:
            object.__setattr__(self, "beta", DEFAULT_BETA.get(self.name, 0.0))

    @property
    def two_stream(self) -> bool:
        """Needs the full-precision stream (X, h) beside the quantized one."""
        return self.name in ("gptaq", "qronos", "lloa", "loaq")

    @property
    def resets_fp_stream(self) -> bool:
        """Qronos feeds the float layer with the quantized stream's input, resetting the error per layer."""
        return self.name == "qronos"


@dataclass(frozen=True)
class QuantConfig:
    """Everything that determines the quantized weights (its hash guards --resume): grid (with its
    initialization), method, solver, activation quantization (W4A4) and rotation."""

    spec: GridSpec = field(default_factory=GridSpec)
    method: Method = field(default_factory=Method)
    solver: SolverOptions = field(default_factory=SolverOptions)
    act: ActSpec = field(default_factory=ActSpec)
    rotation: RotationSpec = field(default_factory=RotationSpec)

    def __post_init__(self):
        if self.act.enabled and (self.spec.bits != 4 or self.spec.group_size != 0):
            raise LoaQError(f"--act-bits 4 needs 4-bit per-channel weights (--bits 4 --group-size 0), got --bits "
                            f"{self.spec.bits} --group-size {self.spec.group_size}: the W4A4 serving kernels take only that")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def digest(self, calib_hash: str) -> str:
        blob = json.dumps({"config": self.to_dict(), "calib": calib_hash}, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]
