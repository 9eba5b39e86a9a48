"""Mixed precision under a size budget on SmolLM2-135M (issue #19), all rows in one run.

    nice -n 5 python -m benchmarks.mixed --nsamples 64 --seqlen 512          # quality.md's calibration
    python -m benchmarks.mixed --model /tmp/tiny --nsamples 8 --seqlen 64 --budgets 2.75,3.5 --eval-tokens 2048 \
        --out /tmp/r                                                          # the script end to end, in minutes
    flock /tmp/loaq-vllm.lock python -m benchmarks.mixed --serve-only     # tokens/s of the exports it wrote

Rows: uniform LoaQ W2, W3, W4 (per channel, asymmetric), then for each budget (average bits per quantized
weight as written: packed codes + scales (``--scale-dtype``, default float16) + packed zero points,
:func:`loaq.allocation.written_bits`)
mixed LoaQ and mixed GPTQ over the candidates {2, 3, 4} per channel (:mod:`loaq.allocation`). The sensitivity
of each method is measured once (by its first budget's run, on the first 0.375 of the calibration windows, a quarter of those held out)
and reused for its other budgets, so ``alloc_s`` is the measurement + knapsack of that first run and
``overhead`` = ``alloc_s`` / the quantization seconds of the same run. Every row is exported (bfloat16
embeddings, as ``loaq quantize --export`` writes by default); ``size_mb`` is the export's safetensors bytes,
``avg_bits`` is read back from its quantized tensors, ``ppl`` is ppl16k (DATA.md evaluation split, 32 windows of
512, as benchmarks/quality.py). Uniform rows carry ``budget_bits: null``. With ``--serve`` (or ``--serve-only``,
under ``flock /tmp/loaq-vllm.lock``) the 2.5-bit mixed LoaQ export and the uniform W2/W3 exports are served
one after another by vLLM on CPU: output tokens/s at concurrency 1 (benchmarks/serve.py's load generator).
Writes benchmarks/results/mixed.{json,md} and mixed.size_ppl.png; rewritten after every row (``--resume``
keeps the rows already measured).
"""

from __future__ import annotations

import argparse
import copy
import gc
import json
import os
import shutil
import sys
import time
from pathlib import Path

from loaq import api
from loaq.allocation import Allocation, grid_of, unit_grid, written_bits
from loaq.bench import command, machine, mixed_variant, parse_ab, utc_date
from loaq.config import Calibration, Method, QuantConfig
from loaq.grids import SCALE_DTYPES, GridSpec
from loaq.metrics import perplexity

BUDGETS = "2.25,2.5,2.75,3.0,3.5"


def export_mb(path: str) -> float:
    return sum(os.path.getsize(os.path.join(path, f)) for f in os.listdir(path) if f.endswith(".safetensors")) / 2**20


def run_row(fp, tok, calib, windows, cfg: QuantConfig, work: Path, name: str, sensitivity=None) -> tuple[dict, dict]:
    out, exp = work / name, work / f"{name}-ct"
    t0 = time.time()
    run = api.quantize(copy.deepcopy(fp), cfg, calib, out=str(out), export=str(exp), tokenizer=tok, force=True,
                       progress=False, sensitivity=sensitivity)
    wall = time.time() - t0
    ppl = perplexity(run.model, windows, 8)
    bits, _ = written_bits(str(exp))
    row = {"method": cfg.method.name, "avg_bits": round(bits, 4), "size_mb": round(export_mb(str(exp)), 3),
           "ppl": round(ppl, 3), "quant_s": round(run.timings["quantize"], 1), "wall_s": round(wall, 1),
           "export": str(exp)}
    alloc = run.meta.get("allocation")
    del run
    gc.collect()
    return row, alloc


def uname(u: dict) -> str:
    """A uniform row's grid: ``W3``, ``W2g64``."""
    return f"W{u['bits']}" + (f"g{u['group']}" if u.get("group") else "")


def label(r: dict) -> str:
    return f"{r['method']} {uname(r)}" if r["kind"] == "uniform" else f"{r['method']} ({mixed_variant(r)})"


def same_size(rows: list[dict]) -> list[tuple[dict, dict]]:
    """(uniform row, mixed LoaQ row) pairs whose budget is the uniform grid's average bits as written (to the
    4 decimals a row records): the mix spends at most what the uniform grid spends."""
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["avg_bits"])
    return [(u, r) for u in uni for r in rows if r["kind"] == "mixed" and r["method"] == "loaq"
            and r["budget_bits"] is not None and abs(r["budget_bits"] - u["avg_bits"]) < 5e-5]


def render(doc: dict, out: Path, stem: str = "mixed") -> None:
    rows = doc["rows"]
    uni = sorted((r for r in rows if r["kind"] == "uniform"), key=lambda r: r["avg_bits"])
    lines = [f"# Mixed precision under a size budget on {doc.get('model') or 'SmolLM2-135M'}", "",
             f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']}  ", f"Date: {doc['date']}  ",
             f"Calibration: {doc['nsamples']} × {doc['seqlen']} tokens (all rows); candidates {{2, 3, 4}} per channel unless a row names others (`2g64`: 2 bits in groups of 64), "
             f"asymmetric; sensitivity measured on {doc.get('alloc_windows', 0.375):g} of the calibration windows, a "
             f"quarter of those held out for scoring; perplexity on the first {doc.get('eval_tokens', 16384)} tokens of "
             "the DATA.md evaluation split in windows of 512 (16384: ppl16k as quality.md).", "",
             f"avg bits: per quantized weight as written (packed codes + {doc.get('scale_dtype', 'float32')} scales + "
             "packed zero points); "
             "size: the export's safetensors (bf16 embeddings and norms included).", "",
             "| budget | kind | method | avg bits | size MB | ppl | quant s | alloc s | overhead |", "|---|---|---|---|---|---|---|---|---|"]
    for r in sorted(rows, key=lambda r: (r["budget_bits"] or r["avg_bits"], r["kind"] != "uniform", r["method"],
                                         mixed_variant(r) or "")):
        b = "-" if r["budget_bits"] is None else f"{r['budget_bits']:g}"
        a = r.get("alloc_s")
        over = "-" if a is None or not r.get("measured") else f"{a / r['quant_s']:.2f}"
        lines.append(f"| {b} | {r['kind']} | {label(r)} | {r['avg_bits']:.3f} | {r['size_mb']:.2f} | {r['ppl']:.3f} | "
                     f"{r['quant_s']:.0f} | {'-' if a is None else f'{a:.0f}'} | "
                     f"{over} |")
    lines += ["", "## Goals", ""]
    for r in sorted((r for r in rows if r["kind"] == "mixed" and r["method"] == "loaq"),
                    key=lambda r: (mixed_variant(r), r["budget_bits"])):
        b = r["budget_bits"]
        bigger = [u for u in uni if u["size_mb"] >= r["size_mb"]]
        smaller = [u for u in uni if u["size_mb"] < r["size_mb"]]  # the allocation's floor: same bits spent better
        g = [f"vs uniform {uname(u)} ({u['size_mb']:.1f} MB, ppl {u['ppl']:.2f}): "
             f"{'beats' if r['ppl'] < u['ppl'] else 'LOSES'}" for u in smaller[-1:] + bigger[:1]]
        gq = next((q for q in rows if q["kind"] == "mixed" and q["method"] == "gptq" and q["budget_bits"] == b
                   and mixed_variant(q) == mixed_variant(r)), None)
        if gq:
            g.append(f"vs mixed GPTQ (ppl {gq['ppl']:.2f}): {'beats' if r['ppl'] < gq['ppl'] else 'LOSES'}")
        w3 = next((u for u in uni if u["bits"] == 3 and not u.get("group")), None)
        if w3 and b == 2.5:
            g.append(f"≤ 2 × uniform W3 ({2 * w3['ppl']:.2f}): {'yes' if r['ppl'] <= 2 * w3['ppl'] else 'NO'}")
        if w3 and b == 3.0:
            g.append(f"below uniform W3 ({w3['ppl']:.2f}): {'yes' if r['ppl'] < w3['ppl'] else 'NO'}")
        lines.append(f"- {b:g} bits, {mixed_variant(r)} criterion (mixed LoaQ ppl {r['ppl']:.2f}, {r['size_mb']:.1f} MB): " + "; ".join(g))
    same = same_size(rows)
    if same:
        lines += ["", "At the same size (the budget set to a uniform grid's average bits as written; the mix is at most "
                  "that large):", ""]
        for u, r in same:
            verdict = "beats" if r["ppl"] < u["ppl"] else "LOSES"
            if set(r.get("widths") or {}) == {uname(u)[1:]}:  # every unit on that grid: the uniform checkpoint itself
                verdict = "the same allocation (the only one that fits: no candidate is narrower)"
            lines.append(f"- {uname(u)} ({u['avg_bits']:.4f} bits, ppl {u['ppl']:.2f}): mixed LoaQ {r['ppl']:.2f} at "
                         f"{r['avg_bits']:.4f} bits ({mixed_variant(r)}): {verdict}")
    if doc.get("notes"):  # hand-written findings, kept in mixed.json across --resume
        lines += ["", "## Notes", ""] + [f"- {n}" for n in doc["notes"]]
    if doc.get("serve"):
        lines += ["", "## Serving (vLLM on CPU, LoaQ kernels, concurrency 1)", "",
                  f"{doc['serve']['meta']}", "", "| export | output tokens/s | TPOT p50 ms | TTFT p50 ms |", "|---|---|---|---|"]
        for name, r in doc["serve"]["results"].items():
            lines.append(f"| {name} | {r['output_throughput']:.1f} | {r['p50_tpot_ms']:.1f} | {r['p50_ttft_ms']:.0f} |")
    (out / f"{stem}.md").write_text("\n".join(lines) + "\n")
    (out / f"{stem}.json").write_text(json.dumps(doc, indent=2))
    try:
        from loaq.plots import mixed_size_ppl

        import matplotlib.pyplot as plt

        mixed_size_ppl(rows, str(out / f"{stem}.size_ppl.png"))
        plt.close("all")
    except ImportError:
        pass


def serve(doc: dict, work: Path, prompts: int, in_len: int, out_len: int) -> dict:
    from benchmarks.serve import bench
    from loaq.serve.server import Server

    kept = [r for r in doc["rows"] if os.path.isdir(r["export"])]  # the best 2.5-bit variant whose export is kept
    pick = {"mixed-2.5": min((r for r in kept if r["kind"] == "mixed" and r["method"] == "loaq" and r["budget_bits"] == 2.5),
                             key=lambda r: r["ppl"])}
    pick |= {f"uniform-w{b}": next(r for r in kept if r["kind"] == "uniform" and r["bits"] == b and not r.get("group"))
             for b in (2, 3)}
    results = {}
    for name, r in pick.items():
        server = Server(r["export"], name=name, max_num_seqs=4)
        print(f"== serving {name} (log {server.log_path})", flush=True)
        server.start(timeout=900)
        try:
            results[name] = bench(server, Path(r["export"]), 1, prompts, in_len, out_len)
        finally:
            server.stop()
        print(f"   {results[name]['output_throughput']:.1f} tok/s", flush=True)
    return {"meta": f"{prompts} prompts of {in_len} random tokens, {out_len} output tokens each, one at a time",
            "results": results}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", help="model to quantize (default: SmolLM2-135M-Instruct; a tiny one checks the script)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--budgets", default=BUDGETS)
    ap.add_argument("--methods", default="loaq,gptq")
    ap.add_argument("--work", default="runs/bench-mixed")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--serve", action="store_true", help="also serve the 2.5-bit mixed and uniform W2/W3 exports")
    ap.add_argument("--serve-only", action="store_true", help="only the serving rows, from an earlier run's exports")
    ap.add_argument("--prompts", type=int, default=4)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="perplexity tokens (default 16384: ppl16k)")
    ap.add_argument("--alloc-windows", type=float, default=Allocation.windows, help="Allocation.windows (default %(default)s)")
    ap.add_argument("--criterion", default="loss", choices=("loss", "output"),
                    help="Allocation.criterion of the mixed rows (rows of both are kept apart by --resume)")
    ap.add_argument("--scale-dtype", default="float16", choices=tuple(SCALE_DTYPES),
                    help="GridSpec.scale_dtype of every row (default float16; rows of both are kept apart by --resume)")
    ap.add_argument("--candidates", default="2,3,4", help="Allocation.candidates of the mixed rows, e.g. 2g64,3,4")
    ap.add_argument("--loaq-ab", default="0.25,0", help="α,β of every LoaQ row (default: the values the uniform rows "
                                                        "have always used, so the rows stay comparable)")
    ap.add_argument("--uniform-extra", default="", help="more uniform rows on candidate grids, e.g. 2g64 (beside W2-W4)")
    ap.add_argument("--no-uniform", action="store_true", help="only the mixed rows (a run split over processes)")
    ap.add_argument("--tag", default="mixed", help="results file stem (a split run: mixed.loaq, mixed.gptq)")
    ap.add_argument("--merge", help="comma-separated stems of split runs to merge into mixed.{json,md,png}")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{a.tag}.json"
    if a.merge:
        parts = [json.loads((out / f"{t}.json").read_text()) for t in a.merge.split(",")]
        doc = {k: v for k, v in parts[0].items() if k != "rows"} | {"rows": [r for p in parts for r in p["rows"]]}
        doc["command"] = " + ".join(p["command"] for p in parts)
        render(doc, out)
        print((out / "mixed.md").read_text())
        return 0
    if a.serve_only:
        doc = json.loads(path.read_text())
        doc["serve"] = serve(doc, work, a.prompts, 128, 128)
        render(doc, out)
        print((out / "mixed.md").read_text())
        return 0
    doc = json.loads(path.read_text()) if a.resume and path.exists() else {"rows": []}
    doc |= {"command": command(), "machine": machine(), "date": utc_date(), "nsamples": a.nsamples, "seqlen": a.seqlen,
            "eval_tokens": a.eval_tokens, "alloc_windows": a.alloc_windows, "scale_dtype": a.scale_dtype}
    done = {(r["kind"], r["method"], r["budget_bits"], r.get("grid", r.get("bits")), mixed_variant(r),
             r.get("scale_dtype", "float32")) for r in doc["rows"]}
    base = GridSpec(3, 0, False, scale_dtype=a.scale_dtype)
    al, be = parse_ab(a.loaq_ab)
    method_of = lambda name: Method(name, alpha=al, beta=be) if name == "loaq" else Method(name)  # noqa: E731
    fp = api.load(a.model)
    doc["model"] = fp.source
    cal = Calibration(nsamples=a.nsamples, seqlen=a.seqlen)
    calib = api.calibration_windows(fp.tokenizer, cal)
    windows = api.eval_windows(fp.tokenizer, api.Evaluation(tokens=a.eval_tokens))

    def add(row):
        doc["rows"].append(row)
        render(doc, out, a.tag)
        print(json.dumps({k: v for k, v in row.items() if k != "export"}), flush=True)

    budgets = [float(x) for x in a.budgets.split(",")]
    methods = a.methods.split(",")
    first = [x for x in (2.5, 3.0) if x in budgets]  # the goals' budgets first: a cut-short run keeps them
    jobs = [("uniform", "loaq", None, 3)] + [("mixed", "loaq", x, None) for x in first] + [("uniform", "loaq", None, 2)]
    jobs += [("mixed", m, x, None) for m in methods if m != "loaq" for x in first]
    jobs += [("mixed", "loaq", x, None) for x in budgets if x not in first] + [("uniform", "loaq", None, 4)]
    jobs += [("mixed", m, x, None) for m in methods if m != "loaq" for x in budgets if x not in first]
    jobs[1:1] = [("uniform", "loaq", None, g) for g in a.uniform_extra.split(",") if g]
    for kind, method, budget, bits in jobs:
        variant = mixed_variant({"kind": kind, "criterion": a.criterion, "candidates": a.candidates})
        if (kind, method, budget, bits, variant, a.scale_dtype) in done or (kind == "mixed" and method not in methods) or \
                (kind == "uniform" and a.no_uniform):
            continue
        if kind == "uniform":
            spec = grid_of(str(bits), base)
            cfg = QuantConfig(spec=spec, method=method_of("loaq"))
            row, _ = run_row(fp.model, fp.tokenizer, calib, windows, cfg, work, f"uniform-w{bits}")
            extra = {"grid": bits, "group": spec.group_size} if isinstance(bits, str) else {}
            add({"budget_bits": None, "kind": "uniform", "bits": spec.bits, **extra, "scale_dtype": a.scale_dtype, **row})
            continue
        sens = next((r["allocation"] for r in doc["rows"] if r["kind"] == "mixed" and r["method"] == method
                     and r.get("measured") and mixed_variant(r) == variant
                     and r.get("scale_dtype", "float32") == a.scale_dtype), None)
        cfg = QuantConfig(spec=base, method=method_of(method),
                          allocation=Allocation(budget, a.candidates, windows=a.alloc_windows, criterion=a.criterion))
        name = f"mixed-{method}-{budget:g}" + ("" if a.candidates == Allocation.candidates else
                                                f"-{a.candidates.replace(',', '_')}")  # variants keep their exports apart
        row, alloc = run_row(fp.model, fp.tokenizer, calib, windows, cfg, work, name, sens)
        widths = {}
        for u in alloc["units"]:
            g = unit_grid(u)
            widths[g] = widths.get(g, 0) + len(u["linears"])
        add({"budget_bits": budget, "kind": "mixed", "criterion": a.criterion, "candidates": a.candidates,
             "scale_dtype": a.scale_dtype, **row, "measured": sens is None,
             "alloc_s": alloc["seconds"]["total"], "widths": widths, "allocation": alloc if sens is None else None})
        if budget != 2.5:  # the 2.5-bit export is served (--serve); the others are measured, not kept
            shutil.rmtree(work / f"{name}-ct", ignore_errors=True)
        shutil.rmtree(work / name, ignore_errors=True)
    if a.serve:
        doc["serve"] = serve(doc, work, a.prompts, 128, 128)
        render(doc, out)
    print((out / "mixed.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
