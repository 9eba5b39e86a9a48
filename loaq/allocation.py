"""Mixed precision under a size budget: per-linear bit widths chosen from LoaQ's own output error (issue #19).

``--target-bits B`` asks for an average of ``B`` bits per quantized weight *as the export writes it*
(:func:`avg_bits`): per linear, the bytes of ``weight_packed`` (int32 words of ``32 // b`` codes),
``weight_scale`` (one per row and group, in the grid's ``scale_dtype``: float32, or float16 with
``--scale-dtype float16``, which makes small groups affordable: 2 bits in groups of 64 cost 2.28 bits instead
of 2.53) and ``weight_zero_point`` (int32 words of packed zero
points, asymmetric grids), over its ``out × in`` weights; ``weight_shape`` (16 bytes of metadata) is not counted.

1. **Units.** Linears that read one input are solved together by the pipeline and are fused by vLLM into
   one layer with one scheme (``qkv_proj``, ``gate_up_proj``), so q/k/v share a width and gate/up share one;
   ``o_proj`` and ``down_proj`` are units of their own: four units per decoder layer.
2. **Sensitivity** (:func:`measure`), with the method itself, in one two-stream pass over the layers at the
   widest candidate: each unit's group statistics ``H, C, B`` are accumulated on the *fit* windows and only
   ``H_held`` on a held-out slice of the calibration windows (:func:`loaq.holdout.split_windows`; never the
   evaluation text); the group is solved at every candidate width ``b`` and scored by its normalized output
   error on the held-out tokens, ``e(b) = tr((Q_b − W̃) H_held (Q_b − W̃)ᵀ) / tr(W̃ H_held W̃ᵀ)``, with ``W̃``
   the method's GPTQ target (eqs. 8, 10, 12; ``W`` for GPTQ) (``criterion="output"``). With
   ``criterion="loss"`` (the default) each output row's own normalized error ``e_j(b)`` is weighted by that
   channel's loss gain (:func:`loaq.fisher.output_gains`, measured on the same held-out windows of the float
   model) and summed, ``Σ_j e_j(b) · gain_j`` (:func:`score`), so a unit whose output the rest of the model
   amplifies (depth, the softmax behind q/k, the channels the residual stream reads) counts for more than one
   whose error the model absorbs. The quantized stream advances with the widest
   solution, so each unit's error is that of it alone dropping a width. The pass reads ``windows`` of the
   calibration windows (default 0.375: 12 of 32, 9 to fit and 3 held out). Its cost is the loss gains (one
   forward and backward per held-out window), the two-stream forwards over those windows and, per unit, the
   target, one GPTQ column loop over every candidate's rows, the widest's included, whose solution the pass
   advances with (:func:`loaq.solver.gptq_solve_grids`), and the held-out quadratic forms;
   ``benchmarks/results/mixed.md`` has its seconds against the LoaQ run's.
3. **Allocation** (:func:`knapsack`): one width per unit minimizing ``Σ e(b)`` subject to the written bytes
   ``≤ B · n_weights / 8``: an exact multiple-choice knapsack by dynamic programming over sizes in units of
   ``ceil(budget / resolution)`` bytes, each size rounded *down* and the choice checked (and, over budget, solved
   again with less capacity) against the exact bytes, so the budget holds exactly for the written bytes and a budget
   equal to a uniform grid's own size can choose that grid everywhere (:func:`solve`).
4. The pipeline then quantizes every linear on its own grid (``quantize_model(specs=...)``), and ``loaq.json``
   records ``layer_specs`` (every linear) and ``allocation`` (budget, sizes, errors, seconds).
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from dataclasses import dataclass

import numpy as np
import torch

from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.solver import QuantResult

log = logging.getLogger(__name__)

SERVABLE_BITS = (2, 3, 4)  # the widths the LoaQ serving kernels run
RESOLUTION = 100_000  # size cells of the knapsack
CRITERIA = ("loss", "output")  # e(b) × the unit's loss gain (loaq.fisher), or e(b) alone


@dataclass(frozen=True)
class Allocation:
    """``target_bits``: average bits per quantized weight as written (``None``: one grid for every linear);
    ``candidates``: comma-separated grids, a width with an optional group size (default ``"2,3,4"``; e.g.
    ``"2g64,3,4"``: 2 bits in groups of 64; without ``g`` the group size comes from ``spec``; symmetry and init from
    ``spec``); ``holdout``: the fraction of the measured windows held out for scoring; ``windows``: the
    fraction of the calibration windows the sensitivity pass reads; ``criterion``: ``"loss"`` weighs each
    unit's output error by its loss gain (:mod:`loaq.fisher`), ``"output"`` sums the output errors alone."""

    target_bits: float | None = None
    candidates: str = "2,3,4"
    holdout: float = 0.25
    windows: float = 0.375
    criterion: str = "loss"

    def __post_init__(self):
        grids = self.grids  # parses
        if self.target_bits is not None and not (math.isfinite(self.target_bits) and self.target_bits > 0):
            raise LoaQError(f"--target-bits {self.target_bits} is not a positive number of bits; e.g. 2.5")
        bad = [g for g in grids if parse_grid(g)[0] not in SERVABLE_BITS]
        if bad or not grids:
            raise LoaQError(f"--candidates {self.candidates!r} must list widths from {SERVABLE_BITS} (the serving "
                            "kernels' widths), each with an optional group size, e.g. 2,3,4 or 2g64,3,4")
        if not 0 < self.holdout < 1:
            raise LoaQError(f"--alloc-holdout {self.holdout} is not a fraction strictly between 0 and 1; e.g. 0.25")
        if not 0 < self.windows <= 1:
            raise LoaQError(f"--alloc-windows {self.windows} is not a fraction in (0, 1]; e.g. 0.375 (the default)")
        if self.criterion not in CRITERIA:
            raise LoaQError(f"--alloc-criterion {self.criterion!r} is not one of {', '.join(CRITERIA)}; e.g. loss")

    @property
    def grids(self) -> tuple[str, ...]:
        """The candidate grids' labels (``"3"``, ``"2g64"``), normalized and sorted by width."""
        try:
            parsed = {parse_grid(x.strip()) for x in str(self.candidates).split(",") if x.strip()}
        except ValueError:
            raise LoaQError(f"--candidates {self.candidates!r} is not a comma-separated list of widths with optional "
                            "group sizes; e.g. 2,3,4 or 2g64,3,4") from None
        return tuple(grid_label(b, g) for b, g in sorted(parsed, key=lambda bg: (bg[0], -1 if bg[1] is None else bg[1])))

    @property
    def enabled(self) -> bool:
        return self.target_bits is not None


def parse_grid(label: str) -> tuple[int, int | None]:
    """``"3"`` → (3, None: the spec's group size); ``"2g64"`` → (2, 64); ``"4g0"`` → (4, 0: per channel)."""
    b, _, g = label.lower().partition("g")
    bits, group = int(b), (int(g) if g else None)
    if group is not None and group < 0:
        raise ValueError(label)
    return bits, group


def grid_label(bits: int, group: int | None) -> str:
    return f"{bits}" if group is None else f"{bits}g{group}"


def fineness(spec: GridSpec) -> tuple:
    """Orders grids from coarse to fine: more bits decide first, then smaller groups (per channel is coarsest)."""
    return spec.bits, -(spec.group_size or math.inf)


def widest(labels: tuple[str, ...], spec: GridSpec) -> str:
    """The finest candidate: the one the sensitivity pass advances the quantized stream with."""
    return max(labels, key=lambda c: fineness(grid_of(c, spec)))


def grid_of(label: str, spec: GridSpec) -> GridSpec:
    """The grid of candidate ``label`` on top of ``spec`` (its symmetry, init and, without ``g``, group size)."""
    bits, group = parse_grid(label)
    return dataclasses.replace(spec, bits=bits, group_size=spec.group_size if group is None else group)


def units(arch, n_layers: int) -> list[list[str]]:
    """Qualified names of the linears that share a width: per layer and sub-layer, ``w_in`` then ``w_out``."""
    out = []
    for i in range(n_layers):
        p = f"{arch.layers}.{i}."
        for sl in arch.sublayers:
            out.append([f"{p}{sl.module}.{n}" for n in sl.w_in])
            out.append([f"{p}{sl.module}.{sl.w_out}"])
    return out


def linear_bytes(out_features: int, in_features: int, spec: GridSpec) -> int:
    """Bytes the export writes for one [out, in] linear: packed codes + scales (``spec.scale_dtype``) + packed zero
    points."""
    from loaq.export.pack import packed_shapes

    return sum(math.prod(shape) * dtype.itemsize for k, (shape, dtype) in
               packed_shapes(out_features, in_features, spec).items() if k != "weight_shape")


def avg_bits(shapes: dict[str, tuple[int, int]], specs: dict[str, GridSpec]) -> float:
    """Average bits per quantized weight as written (:func:`linear_bytes`) of linears ``shapes`` [out, in]."""
    nbytes = sum(linear_bytes(*shapes[n], specs[n]) for n in shapes)
    return 8 * nbytes / sum(o * i for o, i in shapes.values())


def knapsack(costs: list[list[int]], values: list[list[float]], capacity: int) -> list[int]:
    """Exact multiple-choice knapsack: one choice ``j`` per item, ``Σ costs[i][j] ≤ capacity`` (non-negative
    integers), minimizing ``Σ values[i][j]``; returns the choices. Dynamic programming over the total cost."""
    if capacity < 0:
        raise LoaQError("the size budget is negative")
    dp = np.full(capacity + 1, np.inf)
    dp[0] = 0.0
    pick = np.zeros((len(costs), capacity + 1), dtype=np.int16)
    for i, (cs, vs) in enumerate(zip(costs, values)):
        new = np.full(capacity + 1, np.inf)
        for j, (c, v) in enumerate(zip(cs, vs)):
            if c > capacity:
                continue
            cand = np.full(capacity + 1, np.inf)
            cand[c:] = dp[: capacity + 1 - c] + v
            better = cand < new
            new[better] = cand[better]
            pick[i, better] = j
        dp = new
    if not np.isfinite(dp).any():
        raise LoaQError("no allocation fits the size budget")
    c = int(np.argmin(dp))
    choice = []
    for i in range(len(costs) - 1, -1, -1):
        j = int(pick[i, c])
        choice.append(j)
        c -= costs[i][j]
    return choice[::-1]


class Probe:
    """The pipeline's per-group hook during :func:`measure`: solve the group at every candidate and keep, per
    candidate grid and output row ``j``, the held-out squared output error ``num_j = ((Q − W̃) H_held (Q − W̃)ᵀ)_jj``
    and the target's output energy ``den_j = (W̃ H_held W̃ᵀ)_jj`` (``cfg``: the run's config on the widest
    candidate's grid; ``spec``: the run's own grid, the candidates' base). :func:`score` turns them into values."""

    def __init__(self, cfg, grids: tuple[str, ...], spec: GridSpec, kept: dict[str, dict] | None = None):
        self.cfg, self.grids = cfg, {c: grid_of(c, spec) for c in grids}
        self.rows: dict[tuple[str, ...], dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self.kept = kept or {}

    def __call__(self, names, W, factor, stats, B, spec: GridSpec, held):
        """Solve the group on every candidate, record its rows' errors, and return the solution on ``spec`` (the
        widest candidate: what the pass advances the quantized stream with)."""
        from loaq.solver import gptq_solve_grids
        from loaq.targets import output_target

        m = self.cfg.method
        T = output_target(W, factor, stats.C, m.alpha, B, m.beta)
        Hh = held.H.float()  # float32 quadratic forms: a ranking needs ~1e-5, and this is most of the probe's time
        den = ((T @ Hh) * T).sum(1).double().cpu()
        labels = list(self.grids)
        if m.rule.towards_target:  # the rule's own solve: one target, every grid (the widest too) in one column loop
            solved = gptq_solve_grids(T, factor, [self.grids[c] for c in labels], self.cfg.solver)
        else:
            solved = [m.rule.solve(W, factor, stats.C, B, m, self.grids[c], self.cfg.solver) for c in labels]
        results = dict(zip(labels, solved))
        rows = {}
        for c in labels:
            D = results[c].Q.float() - T
            rows[c] = (((D @ Hh) * D).sum(1).double().cpu(), den)
        self.rows[tuple(names)] = rows
        for c, store in self.kept.items():  # codes, scales and zeros only: one byte per weight
            store[tuple(names)] = QuantResult(results[c].codes, results[c].scales, results[c].zeros)
        return next(r for c, r in results.items() if self.grids[c] == spec)


def score(num: torch.Tensor, den: torch.Tensor, gain: torch.Tensor | None = None) -> float:
    """A unit's value at one width from its per-row held-out errors (:class:`Probe`): without ``gain`` (the
    ``"output"`` criterion) the normalized output error ``Σ num / Σ den``; with the per-row loss gains of
    :func:`loaq.fisher.output_gains` (``"loss"``) the second-order loss estimate ``Σ_j (num_j / den_j) · gain_j``
    (a row with no output energy counts 0)."""
    if gain is None:
        return float(num.sum()) / max(float(den.sum()), 1e-30)
    e = torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num))
    return float((e * gain).sum())


def measure(model, arch, calib: torch.Tensor, cfg, *, batch_size: int = 8, device: str = "cpu",
            progress: bool = True, kept: dict[str, dict] | None = None
            ) -> tuple[dict[tuple[str, ...], dict[str, float]], dict]:
    """Per-unit held-out errors at every candidate grid (module docstring, step 2), on a copy of ``model``;
    returns (errors, the windows read: ``{"fit": n, "held": n}``). ``kept``: candidate label → a dict this
    fills with each unit's solution on that grid (:class:`loaq.solver.QuantResult` without ``Q``; the
    allocation diagnostics, ``benchmarks/mixed_diagnose.py``, put them into the float model)."""
    from tqdm.auto import tqdm

    from loaq.holdout import split_windows
    from loaq.pipeline import _capture, quantize_layer
    from loaq.streams import StreamOptions, Streams

    alloc = cfg.allocation
    if cfg.method.auto:  # direct calls; loaq.api.quantize chooses α, β before allocating
        from loaq.auto import choose

        cfg, _ = choose(model, arch, calib, cfg, batch_size=batch_size, device=device)
    n = max(2, math.ceil(alloc.windows * calib.shape[0]))
    fit, held = split_windows(calib[:n], alloc.holdout)
    wide = dataclasses.replace(cfg, spec=grid_of(widest(alloc.grids, cfg.spec), cfg.spec))
    m = copy.deepcopy(model)
    groups = units(arch, len(arch.decoder_layers(m)))
    gains = None
    if alloc.criterion == "loss":  # on the float model, before the pass quantizes it
        from loaq.fisher import output_gains

        gains = output_gains(m, [n for u in groups for n in u], held)
    n_fit = len(fit.split(batch_size))
    streams = Streams(n_fit + len(held.split(batch_size)), cfg.method.two_stream, StreamOptions(), device)
    try:
        _capture(m, arch, fit, batch_size, streams)
        _capture(m, arch, held, batch_size, streams, offset=n_fit)
        streams.held = len(streams) - n_fit
        probe = Probe(wide, alloc.grids, cfg.spec, kept)
        eps = m.config.rms_norm_eps
        layers = arch.decoder_layers(m)
        for i in tqdm(range(len(layers)), desc="sensitivity", disable=not progress, unit="layer"):
            streams.kw_layer = i
            quantize_layer(layers[i], arch, streams, wide, eps, f"{arch.layers}.{i}.", probe=probe)
    finally:
        streams.close()
    gain = (lambda u: None) if gains is None else (lambda u: torch.cat([gains[n] for n in u]))
    errors = {u: {c: score(num, den, gain(u)) for c, (num, den) in rows.items()} for u, rows in probe.rows.items()}
    return errors, {"fit": int(fit.shape[0]), "held": int(held.shape[0])}


def solve(shapes: dict[str, tuple[int, int]], groups: list[list[str]], errors: dict, spec: GridSpec,
          labels: tuple[str, ...], target_bits: float, resolution: int = RESOLUTION) -> dict[str, GridSpec]:
    """Per-linear grids minimizing the summed errors with the written bytes ``≤ target_bits · n_weights / 8``.

    The knapsack counts sizes in cells of ``ceil(budget / resolution)`` bytes, each unit's size rounded *down*,
    so an allocation that fits the budget exactly in bytes (every unit on the narrowest candidate at a budget of
    that grid's own size) is one the knapsack can choose; a choice whose exact bytes exceed the budget (the
    rounding under-counts by less than a cell per unit) is solved again with the capacity lowered by the excess."""
    budget = math.floor(target_bits * sum(o * i for o, i in shapes.values()) / 8)
    cell = max(1, math.ceil(budget / resolution))
    grids = [grid_of(c, spec) for c in labels]
    exact = [[sum(linear_bytes(*shapes[n], g) for n in u) for g in grids] for u in groups]
    costs = [[b // cell for b in row] for row in exact]
    values = [[errors[tuple(u)][c] for c in labels] for u in groups]
    cheapest = [min(range(len(grids)), key=row.__getitem__) for row in exact]
    if sum(row[j] for row, j in zip(exact, cheapest)) > budget:
        raise LoaQError("no allocation fits the size budget")
    capacity = budget // cell
    while True:
        choice = knapsack(costs, values, capacity)
        over = sum(row[j] for row, j in zip(exact, choice)) - budget
        if over <= 0:
            break
        capacity -= math.ceil(over / cell)
        if capacity < sum(row[j] for row, j in zip(costs, cheapest)):  # the narrowest allocation fits: take it
            choice = cheapest
            break
    return {n: grids[j] for u, j in zip(groups, choice) for n in u}


def check_budget(shapes: dict[str, tuple[int, int]], spec: GridSpec, labels: tuple[str, ...], target_bits: float) -> None:
    """Refuse candidates that do not fit the linears' shapes, and a budget below every linear at the smallest
    candidate (before any measurement)."""
    for c in labels:
        g = grid_of(c, spec).group_size
        bad = sorted({i for o, i in shapes.values() if g and i % g})
        if bad:
            raise LoaQError(f"--candidates {c}: groups of {g} do not divide the input widths {bad} of this model; "
                            f"choose a group size that divides {math.gcd(*bad)}, or per channel")
    size = {c: avg_bits(shapes, {n: grid_of(c, spec) for n in shapes}) for c in labels}
    low = min(size, key=size.get)
    if target_bits < size[low]:
        raise LoaQError(f"--target-bits {target_bits} is below {size[low]:.4f}, the size of every linear at {low} "
                        f"(codes, scales and zero points as written); raise it or add a narrower candidate")


def allocate(model, arch, calib: torch.Tensor, cfg, *, batch_size: int = 8, device: str = "cpu",
             progress: bool = True, sensitivity: dict | None = None) -> tuple[dict[str, GridSpec], dict]:
    """(per-linear grids, the ``allocation`` metadata) of ``cfg.allocation`` for ``model`` on ``calib``;
    ``sensitivity``: the ``allocation`` metadata of an earlier run of the same model, calibration and method
    (another budget), whose measured errors are reused instead of measured again."""
    alloc = cfg.allocation
    groups = units(arch, len(arch.decoder_layers(model)))
    shapes = {n: tuple(model.get_submodule(n).weight.shape) for u in groups for n in u}
    check_budget(shapes, cfg.spec, alloc.grids, alloc.target_bits)
    wide = {n: grid_of(widest(alloc.grids, cfg.spec), cfg.spec) for n in shapes}
    t0 = time.time()
    if sensitivity is not None:
        errors, windows = errors_from_meta(sensitivity, alloc.grids, alloc.criterion), sensitivity["windows"]
    elif avg_bits(shapes, wide) <= alloc.target_bits:  # everything fits at the widest width: nothing to measure
        errors, windows = {tuple(u): {c: 0.0 for c in alloc.grids} for u in groups}, {"fit": 0, "held": 0}
    else:
        errors, windows = measure(model, arch, calib, cfg, batch_size=batch_size, device=device, progress=progress)
    t1 = time.time()
    specs = solve(shapes, groups, errors, cfg.spec, alloc.grids, alloc.target_bits)
    t2 = time.time()
    achieved = avg_bits(shapes, specs)
    log.info("allocation: %.4f bits per weight as written (budget %.4f)", achieved, alloc.target_bits)
    label = {grid_of(c, cfg.spec): c for c in alloc.grids}
    meta = {"target_bits": alloc.target_bits, "candidates": list(alloc.grids), "criterion": alloc.criterion,
            "avg_bits": achieved,
            "bytes": sum(linear_bytes(*shapes[n], specs[n]) for n in shapes),
            "weights": sum(o * i for o, i in shapes.values()), "windows": windows,
            "seconds": {"measure": round(t1 - t0, 2), "solve": round(t2 - t1, 2)}, "reused": sensitivity is not None,
            "units": [{"linears": u, "bits": specs[u[0]].bits, "grid": label[specs[u[0]]],
                       "error": dict(errors[tuple(u)])}
                      for u in groups]}
    return specs, meta


def unit_grid(unit: dict) -> str:
    """The candidate label an ``allocation`` metadata unit chose (entries written before group-size candidates
    record only ``bits``)."""
    return unit.get("grid", str(unit["bits"]))


def specs_from_meta(meta: dict, spec: GridSpec) -> dict[str, GridSpec]:
    """The per-linear grids an ``allocation`` metadata entry chose (what a resumed run reuses)."""
    return {n: grid_of(unit_grid(u), spec) for u in meta["units"] for n in u["linears"]}


def errors_from_meta(meta: dict, labels: tuple[str, ...], criterion: str = "loss") -> dict[tuple[str, ...], dict[str, float]]:
    """The measured per-unit errors of an ``allocation`` metadata entry, at candidates ``labels``, by ``criterion``."""
    measured = meta.get("criterion", "output")  # entries from before --alloc-criterion were scored by output
    if measured != criterion:
        raise LoaQError(f"the reused sensitivity was scored by the {measured!r} criterion, not {criterion!r}; "
                        f"measure again or pass --alloc-criterion {measured}")
    errors = {tuple(u["linears"]): dict(u["error"]) for u in meta["units"]}
    if any(set(labels) - set(e) for e in errors.values()):
        raise LoaQError(f"the reused sensitivity measured the candidates {meta['candidates']}, not all of "
                        f"{list(labels)}; measure again with these candidates")
    return errors


def written_bits(export_dir: str) -> tuple[float, int]:
    """(average bits per quantized weight, bytes) of an export as written: the ``weight_packed``,
    ``weight_scale`` and ``weight_zero_point`` tensors of every shard, over the weights ``weight_shape`` names."""
    import glob
    import os

    from safetensors import safe_open

    nbytes = weights = 0
    for path in sorted(glob.glob(os.path.join(export_dir, "*.safetensors"))):
        with safe_open(path, "pt") as f:
            for k in f.keys():
                if k.endswith((".weight_packed", ".weight_scale", ".weight_zero_point")):
                    t = f.get_slice(k)
                    nbytes += math.prod(t.get_shape()) * {"I32": 4, "F32": 4, "BF16": 2, "F16": 2}[t.get_dtype()]
                elif k.endswith(".weight_shape"):
                    weights += int(f.get_tensor(k).prod())
    return 8 * nbytes / weights, nbytes
