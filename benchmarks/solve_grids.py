"""One GPTQ column loop over several grids (``loaq.solver.gptq_solve_grids``, the allocation's sensitivity
probe) against one ``gptq_solve`` per grid, side by side in one process, at SmolLM2-135M's linear shapes.

    python -m benchmarks.solve_grids

Synthetic correlated inputs (2048 tokens) give ``H``; the target is random. Each timing is the median of
``--repeats`` runs; ``ratio`` = separate ÷ together (> 1: the one loop is faster). Both give the same codes
(tests/test_solver.py). Writes benchmarks/results/solve_grids.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from loaq.bench import command, machine, utc_date
from loaq.grids import GridSpec
from loaq.solver import factorize, gptq_solve, gptq_solve_grids
from loaq.stats import Stats

# (unit, out, in) of one SmolLM2-135M decoder layer
SHAPES = [("q,k,v", 960, 576), ("o_proj", 576, 576), ("gate,up", 3072, 576), ("down_proj", 576, 1536)]
GRIDS = "2g192,2g96,2g64,3"  # the non-widest candidates of benchmarks/results/mixed-float32.md (float32 scales)


def timed(fn, repeats: int) -> float:
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", default="benchmarks/results")
    a = ap.parse_args()
    from loaq.allocation import grid_of

    specs = [grid_of(c, GridSpec(3, 0, False)) for c in GRIDS.split(",")]
    g = torch.Generator().manual_seed(0)
    rows = []
    for unit, out_f, in_f in SHAPES:
        A = torch.randn(in_f, in_f, generator=g) / in_f ** 0.5 + torch.eye(in_f)
        st = Stats(in_f)
        st.add((torch.randn(2048, in_f, generator=g) @ A) * torch.logspace(-1, 1, in_f))
        factor = factorize(st.H, 0.01)
        W = torch.randn(out_f, in_f, generator=g)
        together = timed(lambda: gptq_solve_grids(W, factor, specs), a.repeats)
        separate = timed(lambda: [gptq_solve(W, factor, s) for s in specs], a.repeats)
        rows.append({"unit": unit, "out": out_f, "in": in_f, "together_s": round(together, 4),
                     "separate_s": round(separate, 4), "ratio": round(separate / together, 2)})
        print(json.dumps(rows[-1]), flush=True)
    doc = {"command": command(), "machine": machine(), "date": utc_date(), "grids": GRIDS, "rows": rows}
    out = Path(a.out)
    (out / "solve_grids.json").write_text(json.dumps(doc, indent=2))
    lines = ["# GPTQ on several grids: one column loop against one solve per grid", "",
             f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']}  ", f"Date: {doc['date']}  ",
             f"Grids: {GRIDS} (per unit, as the allocation's sensitivity probe solves them); median of {a.repeats}.", "",
             "| unit | out × in | one loop s | one solve per grid s | ratio |", "|---|---|---|---|---|"]
    lines += [f"| {r['unit']} | {r['out']} × {r['in']} | {r['together_s']:.3f} | {r['separate_s']:.3f} | {r['ratio']:.2f} |"
              for r in rows]
    (out / "solve_grids.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
