"""Why the mixed-precision allocator loses to uniform 3-bit groups (issue #19): three checks on SmolLM2-135M.

    python -m benchmarks.mixed_diagnose                      # 32 x 512 calibration, as benchmarks/mixed.py
    python -m benchmarks.mixed_diagnose --model /tmp/tiny --nsamples 8 --seqlen 64   # the script, in a minute

1. **Noise.** The sensitivity pass (:func:`loaq.allocation.measure`) runs twice, on calibration windows
   0-11 and on windows 12-23 (each: 9 fit, 3 held out). Per candidate: the correlation of the two passes'
   log errors over the units and the median ``|log(e_A / e_B)|``; per budget, the knapsack's choice from
   pass A scored by pass B against B's own choice (an allocator that exploits measurement noise scores
   worse on the other windows).
2. **Cross-unit weights.** One unit kind at a time (the q/k/v units, ``o_proj``, the gate/up units,
   ``down_proj``) takes pass A's solution on a candidate grid, every other linear stays float, and the
   mean next-token loss is measured on calibration windows 24-31 (read by neither pass). ``ratio`` = that
   loss increase ÷ the kind's summed estimate ``Σ e(b)``: the allocator's values are right across kinds
   only if the ratio is the same for every kind.
3. Per budget, the candidates the knapsack chose, by kind.

The solutions of step 2 are those of the sensitivity pass (quantized stream advanced on the widest
candidate), put into the float model without the downstream compensation of a LoaQ run, so a ratio is a
ranking of kinds, not a prediction of a run's perplexity. Writes ``benchmarks/results/mixed_diagnose.{json,md}``.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
from pathlib import Path

import numpy as np
import torch

from loaq import api
from loaq.allocation import Allocation, avg_bits, grid_of, measure, solve, units
from loaq.arch import arch_of
from loaq.bench import command, machine, parse_ab, utc_date
from loaq.checkpoint import dequantized
from loaq.config import Calibration, Method, QuantConfig
from loaq.grids import GridSpec
from loaq.metrics import perplexity
from loaq.moe import unfuse

BUDGETS = (2.25, 2.5, 2.75, 3.0, 3.5)


def kind(unit: tuple[str, ...]) -> str:
    """A unit's kind: its first linear's name without the layer prefix (``self_attn.q_proj`` for q/k/v)."""
    return unit[0].split(".", 3)[-1]


def put(model, unit: tuple[str, ...], W: torch.Tensor) -> None:
    """Write a unit's stacked rows ``W`` into its linears, in order."""
    o = 0
    for n in unit:
        w = model.get_submodule(n).weight
        w.data.copy_(W[o:o + w.shape[0]])
        o += w.shape[0]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model (default: SmolLM2-135M-Instruct)")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--candidates", default="2g96,2g64,2g32,3g192,3g64,4")
    ap.add_argument("--kinds-at", default="2g32,3g192", help="candidates of check 2")
    ap.add_argument("--loaq-ab", default="0.25,0", help="α,β (benchmarks/mixed.py's default)")
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    torch.set_grad_enabled(False)
    fp = api.load(a.model)
    model = fp.model
    arch = arch_of(model.config)
    unfuse(model, arch)
    calib = api.calibration_windows(fp.tokenizer, Calibration(nsamples=a.nsamples, seqlen=a.seqlen))
    n = calib.shape[0]
    alloc = Allocation(2.5, a.candidates)
    part = math.ceil(alloc.windows * n)  # the windows one pass reads
    if 2 * part >= n:
        raise SystemExit(f"--nsamples {n} is too few for two passes and windows neither reads; use ≥ 8")
    al, be = parse_ab(a.loaq_ab)
    base = GridSpec(3, 0, False, scale_dtype="float16")
    cfg = QuantConfig(spec=base, method=Method("loaq", alpha=al, beta=be), allocation=alloc)
    labels = alloc.grids
    at = [c.strip() for c in a.kinds_at.split(",")]
    kept = {c: {} for c in at}
    A, _ = measure(model, arch, calib, cfg, kept=kept)
    B, _ = measure(model, arch, torch.roll(calib, -part, 0), cfg)
    groups = units(arch, len(arch.decoder_layers(model)))
    shapes = {x: tuple(model.get_submodule(x).weight.shape) for u in groups for x in u}
    us = [tuple(u) for u in groups]

    noise = {}
    for c in labels:
        x, y = np.log([max(A[u][c], 1e-30) for u in us]), np.log([max(B[u][c], 1e-30) for u in us])
        noise[c] = {"log_corr": round(float(np.corrcoef(x, y)[0, 1]), 4),
                    "median_abs_log_ratio": round(float(np.median(np.abs(x - y))), 4),
                    "sum_A": round(sum(A[u][c] for u in us), 1), "sum_B": round(sum(B[u][c] for u in us), 1),
                    "avg_bits": round(avg_bits(shapes, {x: grid_of(c, base) for x in shapes}), 4)}
    label_of = {grid_of(c, base): c for c in labels}
    budgets, plans = [], {}
    for bud in BUDGETS:
        if bud < min(v["avg_bits"] for v in noise.values()):
            continue
        pa, pb = (solve(shapes, groups, E, base, labels, bud) for E in (A, B))
        ca, cb = ({u: label_of[p[u[0]]] for u in us} for p in (pa, pb))
        plans[bud] = ca
        budgets.append({"budget": bud, "A_choice_by_A": round(sum(A[u][ca[u]] for u in us), 1),
                        "A_choice_by_B": round(sum(B[u][ca[u]] for u in us), 1),
                        "B_choice_by_B": round(sum(B[u][cb[u]] for u in us), 1)})

    ev = calib[2 * part:]
    float_nll = math.log(perplexity(model, ev, 4))
    W0 = {x: model.get_submodule(x).weight.detach().clone() for x in shapes}
    kinds = sorted({kind(u) for u in us}, key=lambda k: [kind(u) for u in us].index(k))
    rows = []
    for c in at:
        spec = grid_of(c, base)
        for k in kinds:
            for u in us:
                if kind(u) == k:
                    put(model, u, dequantized(kept[c][u], spec))
            dl = math.log(perplexity(model, ev, 4)) - float_nll
            for x in W0:
                model.get_submodule(x).weight.data.copy_(W0[x])
            est = sum(A[u][c] for u in us if kind(u) == k)
            rows.append({"grid": c, "kind": k, "delta_nll": round(dl, 5), "estimate": round(est, 2),
                         "ratio": dl / est if est > 0 else None})
            print(json.dumps(rows[-1]), flush=True)
    chosen = {str(b): {k: dict(collections.Counter(p[u] for u in us if kind(u) == k)) for k in kinds}
              for b, p in plans.items()}
    doc = {"command": command(), "machine": machine(), "date": utc_date(), "model": fp.source,
           "nsamples": n, "seqlen": a.seqlen, "candidates": list(labels), "loaq_ab": a.loaq_ab,
           "windows": {"A": [0, part], "B": [part, 2 * part], "kinds": [2 * part, n]},
           "float_nll": round(float_nll, 5), "noise": noise, "budgets": budgets, "kinds": rows, "chosen": chosen}
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "mixed_diagnose.json").write_text(json.dumps(doc, indent=1) + "\n")
    render(doc, out)
    print((out / "mixed_diagnose.md").read_text())
    return 0


def render(doc: dict, out: Path) -> None:
    w = doc["windows"]
    lines = ["# Mixed-precision allocator diagnostics (issue #19)", "",
             f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']}  ", f"Date: {doc['date']}  ",
             f"Model: {doc['model']}; calibration {doc['nsamples']} × {doc['seqlen']} tokens; LoaQ α,β = "
             f"{doc['loaq_ab']}; pass A reads windows {w['A'][0]}-{w['A'][1] - 1}, pass B {w['B'][0]}-"
             f"{w['B'][1] - 1}, check 2 scores on {w['kinds'][0]}-{w['kinds'][1] - 1}.", "",
             "## 1. Noise: the sensitivity pass on two disjoint window sets", "",
             "| candidate | avg bits | Σe pass A | Σe pass B | corr(log e_A, log e_B) | median abs log ratio |",
             "|---|---|---|---|---|---|"]
    for c, v in doc["noise"].items():
        lines.append(f"| {c} | {v['avg_bits']:.3f} | {v['sum_A']:.0f} | {v['sum_B']:.0f} | {v['log_corr']:.3f} | "
                     f"{v['median_abs_log_ratio']:.3f} |")
    lines += ["", "| budget | A's choice scored by A | A's choice scored by B | B's own choice scored by B |",
              "|---|---|---|---|"]
    for b in doc["budgets"]:
        lines.append(f"| {b['budget']} | {b['A_choice_by_A']:.0f} | {b['A_choice_by_B']:.0f} | {b['B_choice_by_B']:.0f} |")
    lines += ["", f"## 2. Cross-unit weights: one unit kind quantized, the rest float (float NLL {doc['float_nll']:.4f})",
              "", "| grid | kind | Δ NLL (nats/token) | Σ e(b) of the kind | ratio ×1e4 |", "|---|---|---|---|---|"]
    for r in doc["kinds"]:
        ratio = "-" if r["ratio"] is None else f"{r['ratio'] * 1e4:.2f}"
        lines.append(f"| {r['grid']} | {r['kind']} | {r['delta_nll']:.4f} | {r['estimate']:.0f} | {ratio} |")
    lines += ["", "## 3. The knapsack's choices (units per kind)", "", "| budget | kind | candidates chosen |",
              "|---|---|---|"]
    for b, ks in doc["chosen"].items():
        for k, cnt in ks.items():
            lines.append(f"| {b} | {k} | {', '.join(f'{c}: {v}' for c, v in sorted(cnt.items()))} |")
    if doc.get("notes"):
        lines += ["", "## Notes", ""] + [f"- {x}" for x in doc["notes"]]
    (out / "mixed_diagnose.md").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    raise SystemExit(main())
