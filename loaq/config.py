"""Typed settings of one quantization run: grid, method, solver, activations, rotation.

Flags (:mod:`loaq.cli`), recipes (:mod:`loaq.recipe`) and Python callers all build a :class:`QuantConfig`;
``QuantConfig.to_dict()`` is what ``loaq.json`` records under ``"config"`` and ``QuantConfig.from_dict``
reads it back, refusing unknown fields and meaningless combinations with one line each.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field

from loaq import methods
from loaq.actquant import ActSpec
from loaq.allocation import Allocation
from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.rotation import RotationSpec
from loaq.solver import SolverOptions

METHODS = tuple(methods.METHODS)
AUTO = methods.AUTO


@dataclass(frozen=True)
class Method:
    """A method (:mod:`loaq.methods`) and its settings; ``None`` takes the method's default.

    - ``alpha``: LLOA/LoaQ's ``α`` (eq. 8), GPTAQ's weighting of the asymmetric term;
    - ``beta``: LoaQ's ``β`` on the sub-layer residual term (eq. 10/12);
    - ``rescale`` (NOA) and ``soa``: switch LoaQ's normalized / sub-layer approximation off (Table 5);
    - ``shat``: ``"text"`` takes ``ŝ = R(ĥ + X̂W)`` (Section 3.3), ``"alg"`` takes ``R(h + X̂W)`` (Algorithm 1 line 11).

    ``alpha``/``beta`` = ``"auto"`` (LLOA/LoaQ) are chosen by :func:`loaq.api.quantize` on held-out calibration
    windows (:mod:`loaq.auto`), which then runs and records the method with the chosen numbers.

    A setting the method does not use is refused (``Method("gptq", beta=0.5)``), as are LoaQ settings that
    cancel each other (``shat="alg"`` without ``rescale``, ``beta`` without ``soa``).
    """

    name: str = "loaq"
    alpha: float | str | None = None
    beta: float | str | None = None
    rescale: bool = True
    soa: bool = True
    shat: str = "text"

    def __post_init__(self):
        r = methods.rule(self.name)
        if self.shat not in ("text", "alg"):
            raise LoaQError(f"--shat {self.shat!r} is unknown; use 'text' or 'alg'")
        methods.check_settings(r, {"alpha": self.alpha, "beta": self.beta, "rescale": self.rescale,
                                   "soa": self.soa, "shat": self.shat})
        for k in ("alpha", "beta"):
            if getattr(self, k) is None:
                d = r.settings.get(k, methods.NEUTRAL[k])
                d = 0.0 if (k, d, self.soa) == ("beta", AUTO, False) else d  # no SOA term: nothing to choose
                object.__setattr__(self, k, d if d == AUTO else float(d))
            elif isinstance(getattr(self, k), str):
                if getattr(self, k) != AUTO or self.name not in ("lloa", "loaq"):
                    raise LoaQError(f"--{k} {getattr(self, k)!r} is not a number; pass a real weighting such as 0.25"
                                    + (" or 'auto' (chosen on held-out calibration windows)" if self.name in
                                       ("lloa", "loaq") else f" ({self.name} has no automatic choice)"))
            elif not math.isfinite(getattr(self, k)):
                raise LoaQError(f"--{k} {getattr(self, k)} is not a finite number; pass a real weighting such as 0.25")
        if self.shat == "alg" and not self.rescale:
            raise LoaQError("--shat alg changes NOA's ŝ, which --no-rescale switches off; drop one of them")
        if self.beta == AUTO and not self.soa:
            raise LoaQError("--beta auto chooses the weight of the SOA term, which --no-soa switches off; drop one of them")
        if self.beta and not self.soa:
            raise LoaQError(f"--beta {self.beta:g} weights the SOA term, which --no-soa switches off; drop one of them")

    @property
    def auto(self) -> bool:
        """α or β is still to be chosen (:mod:`loaq.auto`)."""
        return AUTO in (self.alpha, self.beta)

    @property
    def rule(self) -> methods.MethodRule:
        return methods.rule(self.name)

    @property
    def two_stream(self) -> bool:
        """Needs the full-precision stream (X, h) beside the quantized one."""
        return self.rule.two_stream

    @property
    def resets_fp_stream(self) -> bool:
        """Qronos feeds the float layer with the quantized stream's input, resetting the error per layer."""
        return self.rule.resets_fp_stream


@dataclass(frozen=True)
class QuantConfig:
    """Everything that determines the quantized weights (its hash guards --resume): grid (with its
    initialization), method, solver, activation quantization (W4A4), rotation and the per-linear bit
    allocation (:mod:`loaq.allocation`; its widths replace ``spec.bits`` linear by linear)."""

    spec: GridSpec = field(default_factory=GridSpec)
    method: Method = field(default_factory=Method)
    solver: SolverOptions = field(default_factory=SolverOptions)
    act: ActSpec = field(default_factory=ActSpec)
    rotation: RotationSpec = field(default_factory=RotationSpec)
    allocation: Allocation = field(default_factory=Allocation)

    def __post_init__(self):
        if self.allocation.enabled and (self.method.rule.solve is None or self.act.enabled):
            raise LoaQError("--target-bits measures each linear's error with a calibrated weight-only method; "
                            "drop it, or use --method loaq/gptq/... without --act-bits 4")
        if self.act.enabled and (self.spec.bits != 4 or self.spec.group_size != 0):
            raise LoaQError(f"--act-bits 4 needs 4-bit per-channel weights (--bits 4 --group-size 0), got --bits "
                            f"{self.spec.bits} --group-size {self.spec.group_size}: the W4A4 serving kernels take only that")
        if self.act.symmetric and not self.act.enabled:
            raise LoaQError("--act-sym sets the grid of quantized activations; add --act-bits 4 or drop it")
        if self.rotation.kind == "none" and self.rotation.seed != 0:
            raise LoaQError("--rotate-seed seeds the Hadamard rotation; add --rotate hadamard or drop it")

    def to_dict(self) -> dict:
        d = dataclasses.asdict(self)
        if not self.allocation.enabled:  # uniform runs keep the digest and loaq.json they always had
            del d["allocation"]
        if self.spec.scale_dtype == "float32":  # so do runs with the scales they always wrote
            del d["spec"]["scale_dtype"]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> QuantConfig:
        """The inverse of :meth:`to_dict`; missing fields take their defaults, unknown ones are refused."""
        types = {"spec": GridSpec, "method": Method, "solver": SolverOptions, "act": ActSpec, "rotation": RotationSpec,
                 "allocation": Allocation}
        _no_unknown(d, types, "recipe")
        kw = {}
        for name, typ in types.items():
            sub = d.get(name) or {}
            if not isinstance(sub, dict):
                raise LoaQError(f"recipe field {name!r} must be a mapping of settings, got {sub!r}")
            _no_unknown(sub, {f.name for f in dataclasses.fields(typ)}, f"recipe section {name!r}")
            _check_types(sub, typ, f"recipe section {name!r}")
            kw[name] = typ(**sub)
        return cls(**kw)

    def digest(self, calib_hash: str, run: dict | None = None) -> str:
        """What ``--resume`` checks: this config, the calibration tokens and the ``run`` settings that
        change codes without being part of the config (non-float32 stream/compute dtypes)."""
        d = {"config": self.to_dict(), "calib": calib_hash} | ({"run": run} if run else {})
        blob = json.dumps(d, sort_keys=True)
        return hashlib.sha256(blob.encode()).hexdigest()[:16]


def _no_unknown(d: dict, known, where: str) -> None:
    bad = sorted(set(d) - set(known))
    if bad:
        raise LoaQError(f"{where} has unknown field(s) {', '.join(bad)}; known: {', '.join(sorted(known))}")


_SCALARS = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,), "None": (type(None),)}


def _check_types(d: dict, typ, where: str) -> None:
    """Refuse a recipe value whose type is not its field's (``"4"`` for ``bits``, ``true`` for ``nsamples``)."""
    for f in dataclasses.fields(typ):
        if f.name not in d:
            continue
        allowed = [t.strip() for t in str(f.type).split("|")]  # the annotation string, e.g. "float | None"
        v = d[f.name]
        if not any(isinstance(v, _SCALARS[t]) and not (t in ("int", "float") and isinstance(v, bool))
                   for t in allowed if t in _SCALARS):
            raise LoaQError(f"{where} field {f.name!r} must be {' or '.join(allowed)}, got {v!r}; fix the recipe")


DEFAULT_CALIB = "default:wiki-calib"  # how loaq.json names the default corpus's calibration split


@dataclass(frozen=True)
class Calibration:
    """Calibration text and windows: ``nsamples`` windows of ``seqlen`` tokens at offsets drawn with ``seed``.

    ``source``: ``None`` (the default corpus, DATA.md), a ``.txt`` file, a directory of ``.txt``, a ``.jsonl``
    (``text`` or chat ``messages``), or a ``datasets`` source (a ``save_to_disk`` directory or data files)
    read at ``split``/``field``; ``chat`` renders ``messages`` through the tokenizer's chat template
    (``None``: whenever the field holds messages). Paper: 128 × 2048 tokens.
    """

    source: str | None = None
    nsamples: int = 128
    seqlen: int = 2048
    seed: int = 0
    split: str = "train"
    field: str | None = None
    chat: bool | None = None

    def __post_init__(self):
        if self.source == DEFAULT_CALIB:
            object.__setattr__(self, "source", None)
        if self.nsamples < 1 or self.seqlen < 2:
            raise LoaQError(f"calibration needs --nsamples ≥ 1 and --seqlen ≥ 2, got {self.nsamples} and {self.seqlen}")

    def meta(self, calib_hash: str) -> dict:
        """The checkpoint's ``"calibration"`` entry; :func:`loaq.recipe.read_raw` reads it back."""
        return {"source": self.source or DEFAULT_CALIB, "split": self.split, "field": self.field, "chat": self.chat,
                "nsamples": self.nsamples, "seqlen": self.seqlen, "seed": self.seed, "hash": calib_hash}

    @classmethod
    def from_dict(cls, d: dict) -> Calibration:
        known = {f.name for f in dataclasses.fields(cls)}
        _no_unknown({k: v for k, v in d.items() if k != "hash"}, known, "recipe section 'calibration'")
        _check_types(d, cls, "recipe section 'calibration'")
        return cls(**{k: v for k, v in d.items() if k in known})
