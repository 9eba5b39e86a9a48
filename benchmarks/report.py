"""Regenerate benchmarks/REPORT.md (and its plots) from the measured JSON in benchmarks/results/.

    python benchmarks/report.py

The paper's Tables 1-5 and 7 re-created on SmolLM2-135M: perplexity (ppl16k) and average zero-shot
accuracy (lm-eval ``acc`` averaged over the local BIG-bench tasks) per method. Every results file with
``rows`` is read; a row is matched on ``method, bits, group`` and the optional keys ``hadamard`` (bool),
``init`` (e.g. ``"neuqi"``) and ``act_bits`` (e.g. 4 for W4A4), absent = off. Ablations are the methods
``loaq-nosoa``, ``loaq-nonoa``, ``loaq-nosoa-nonoa``. When several runs hold a row, the one with
zero-shot accuracy wins, then the newer file; every cell says which run it came from. A row nobody
measured is printed as "not measured yet", never guessed.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from loaq.plots import layer_mse, ppl_vs_bits, serve_throughput, size_vs_ppl  # noqa: E402

BASELINES = ("gptq", "gptaq", "qronos")
MAIN = (*BASELINES, "loaq")
NO, HAD = {"hadamard": False}, {"hadamard": True}
W2, W3 = {"bits": 2, "group": 0}, {"bits": 3, "group": 0}
PENDING = "needs the engine's {} runs (issue #8); regenerate with the quality benchmark once it has them"

# id, title, methods (rows), column groups (title, selector), per-task columns, why it can be missing
TABLES = [
    ("1", "2-bit channel-wise (paper Table 1)", ("rtn", *MAIN[:3], "lloa", "loaq", "loaq-alg"), [("W2 per-channel", W2 | NO)], True, None),
    ("2", "2- and 3-bit channel-wise with the Hadamard transform (paper Table 2)", MAIN,
     [("W2 + Hadamard", W2 | HAD), ("W3 + Hadamard", W3 | HAD)], False, "Hadamard"),
    ("3", "2-bit channel-wise with NeUQI initialization (paper Table 3)", MAIN,
     [("W2 NeUQI", W2 | NO | {"init": "neuqi"}), ("W2 NeUQI + Hadamard", W2 | HAD | {"init": "neuqi"})], False, "NeUQI"),
    ("4", "W4A4, 4-bit channel-wise weights, 4-bit per-token dynamic activations (paper Table 4)", MAIN,
     [("W4A4", {"bits": 4, "group": 0, "act_bits": 4} | NO), ("W4A4 + Hadamard", {"bits": 4, "group": 0, "act_bits": 4} | HAD)],
     False, "W4A4"),
    ("5", "Ablation of SOA and NOA, 2-bit channel-wise (paper Table 5)", ("loaq", "loaq-nosoa", "loaq-nonoa", "loaq-nosoa-nonoa"),
     [("W2", W2 | NO), ("W2 + Hadamard", W2 | HAD)], False, "ablation"),
    ("7", "3-bit channel-wise (paper Table 7)", ("rtn", *MAIN[:3], "lloa", "loaq", "loaq-alg"), [("W3 per-channel", W3 | NO)], True, None),
]


def load_runs(results: str) -> list[dict]:
    """Every results JSON with quality rows, oldest first: ``{path, command, date, rows, zero_shot}``."""
    runs = []
    for path in sorted(glob.glob(os.path.join(results, "*.json"))):
        doc = json.load(open(path))
        rows = doc.get("rows") if isinstance(doc, dict) else None
        if rows and all("method" in r and "bits" in r and "ppl" in r for r in rows):
            runs.append({"path": path, "command": doc.get("command", "?"), "date": doc.get("date", ""),
                         "nsamples": doc.get("nsamples"), "seqlen": doc.get("seqlen"), "rows": rows,
                         "zero_shot": doc.get("zero_shot")})
    return sorted(runs, key=lambda r: r["date"])


def matches(row: dict, method: str, sel: dict) -> bool:
    want = {"hadamard": False, "init": None, "act_bits": None} | sel
    have = {"hadamard": bool(row.get("hadamard")), "init": row.get("init"), "act_bits": row.get("act_bits")}
    return row["method"] == method and all((row.get(k) if k in ("bits", "group") else have[k]) == v for k, v in want.items())


def pick(runs: list[dict], method: str, sel: dict) -> tuple[dict, int] | None:
    """The row for ``method`` under ``sel`` and the index of its run (zero-shot rows first, then newest)."""
    found = [(bool(r.get("zero_shot")), i, r) for i, run in enumerate(runs) for r in run["rows"] if matches(r, method, sel)]
    if not found:
        return None
    _, i, row = max(found, key=lambda t: (t[0], t[1]))
    return row, i


def fmt_ppl(p: float) -> str:
    return f"{p:,.0f}" if p >= 1000 else f"{p:.2f}"


def acc_of(row: dict) -> float | None:
    z = row.get("zero_shot")
    return 100 * z["average"]["acc"] if z else None


def table(runs: list[dict], used: dict[int, str], spec) -> list[str]:
    tid, title, methods, groups, per_task, pending = spec
    lines = [f"### Table {tid}: {title}", ""]
    cells = {(m, g): pick(runs, m, sel) for m in methods for g, sel in groups}
    if not any(cells.values()):
        return lines + [f"Not measured yet: {PENDING.format(pending)}.", ""]
    tasks = next((list(row["zero_shot"]["tasks"]) for c in cells.values() if c for row in [c[0]] if row.get("zero_shot")), [])
    head = ["method"]
    for g, _ in groups:
        head += [f"{g} ppl ↓", f"{g} acc ↑"] + ([t.removeprefix("bb_") for t in tasks] if per_task else [])
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    best = {}
    for g, _ in groups:
        got = [c[0] for m, gg in cells if gg == g and m != "rtn" for c in [cells[(m, gg)]] if c]
        best[g] = (min((r["ppl"] for r in got), default=None), max((a for r in got if (a := acc_of(r)) is not None), default=None))
    fp = pick(runs, "fp32", {"bits": 32, "group": 0})
    rows = ([("fp32", {g: fp for g, _ in groups})] if fp else []) + [(m, {g: cells[(m, g)] for g, _ in groups}) for m in methods]
    for m, by_group in rows:
        out = [m]
        for g, _ in groups:
            c = by_group[g]
            if not c:
                out += ["not measured yet", "-"] + (["-"] * len(tasks) if per_task else [])
                continue
            row, i = c
            mark = used.setdefault(i, chr(ord("a") + len(used)))
            a = acc_of(row)
            bold = lambda s, on: f"**{s}**" if on and m != "fp32" else s  # noqa: E731
            out.append(bold(fmt_ppl(row["ppl"]), row["ppl"] == best[g][0]) + f" <sup>{mark}</sup>")
            out.append(bold(f"{a:.1f}", a == best[g][1]) if a is not None else "-")
            if per_task:
                out += [f"{100 * row['zero_shot']['tasks'][t]['acc']:.1f}" if row.get("zero_shot") else "-" for t in tasks]
        lines.append("| " + " | ".join(out) + " |")
    return lines + [""]


def claims(runs: list[dict]) -> list[str]:
    """The paper's central claim, checked on every setting measured here: LoaQ beats GPTQ, GPTAQ, Qronos."""
    lines = ["| setting | metric | LoaQ | best baseline | LoaQ best? |", "|---|---|---|---|---|"]
    for name, sel in (("W2 per-channel", W2 | NO), ("W3 per-channel", W3 | NO), ("W2 + Hadamard", W2 | HAD),
                      ("W3 + Hadamard", W3 | HAD)):
        loaq = pick(runs, "loaq", sel)
        base = {m: p for m in BASELINES if (p := pick(runs, m, sel))}
        if not loaq or not base:
            lines.append(f"| {name} | ppl, acc | not measured yet | - | - |")
            continue
        lp = loaq[0]["ppl"]
        bm, bp = min(((m, p[0]["ppl"]) for m, p in base.items()), key=lambda t: t[1])
        lines.append(f"| {name} | ppl ↓ | {fmt_ppl(lp)} | {bm} {fmt_ppl(bp)} | {'yes' if lp <= bp else 'no'} |")
        la = acc_of(loaq[0])
        accs = [(m, a) for m, p in base.items() if (a := acc_of(p[0])) is not None]
        if la is not None and accs:
            am, ab = max(accs, key=lambda t: t[1])
            lines.append(f"| {name} | avg acc ↑ | {la:.1f} | {am} {ab:.1f} | {'yes' if la >= ab else 'no'} |")
    return lines


def plots(results: str, runs: list[dict], here: str) -> list[str]:
    """Draw every plot the results hold, next to its JSON; markdown embedding them."""
    md = []
    for run in runs:
        if any(r["bits"] < 16 for r in run["rows"]):
            png = os.path.splitext(run["path"])[0] + ".ppl_bits.png"
            ppl_vs_bits(run["rows"], png)
            md.append(f"![perplexity vs bits, {os.path.basename(run['path'])}]({os.path.relpath(png, here)})")
    mse_files = sorted(glob.glob(os.path.join(results, "mse", "*.json")))
    if mse_files:
        recs = [json.load(open(f)) for f in mse_files]
        series = {f"{r['method']} W{r['bits']}{' +Hadamard' if r.get('hadamard') else ''}": r for r in recs}
        png = os.path.join(results, "mse", "layer_mse.png")
        layer_mse(series, png)
        md.append(f"![per-layer hidden-state MSE]({os.path.relpath(png, here)})")
    else:
        md.append("Per-layer MSE (Figures 3/4): not measured yet.")
    for key, fn, suffix, what in (("disk_bytes", size_vs_ppl, "size_ppl", "size on disk vs perplexity"),
                                  ("tokens_per_s", serve_throughput, "serve", "serving tokens/s")):
        docs = [(p, json.load(open(p))) for p in sorted(glob.glob(os.path.join(results, "*.json")))]
        hits = [(p, d["rows"]) for p, d in docs if isinstance(d, dict) and d.get("rows") and all(key in r for r in d["rows"])]
        for p, rows in hits:
            png = os.path.splitext(p)[0] + f".{suffix}.png"
            fn(rows, png)
            md.append(f"![{what}]({os.path.relpath(png, here)})")
        if not hits:
            md.append(f"{what.capitalize()}: not measured yet (no results file with `{key}` rows).")
    import matplotlib.pyplot as plt

    plt.close("all")
    return md


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--results", default="benchmarks/results")
    ap.add_argument("--out", default="benchmarks/REPORT.md")
    a = ap.parse_args()
    runs = load_runs(a.results)
    used: dict[int, str] = {}
    body = []
    for spec in TABLES:
        body += table(runs, used, spec)
    lines = ["# LoaQ on SmolLM2-135M: the paper's tables at small scale", "",
             "Generated by `python benchmarks/report.py` from `benchmarks/results/*.json`; do not edit by hand.",
             "ppl = ppl16k (first 16,384 tokens of the DATA.md evaluation split, 32 windows of 512; the paper uses "
             "WikiText2/C4). acc = lm-evaluation-harness `acc` averaged over the local BIG-bench zero-shot tasks "
             "(`loaq eval --tasks all`; the paper averages ArcE/ArcC/PiQA/HellaS/WinoG, none of which is available "
             "offline here). Best quantized value per column in bold (RTN excluded). Superscripts name the run "
             "(command below) each row comes from; runs differ in calibration size, so compare rows of one run.", ""]
    lines += body
    lines += ["### Runs", ""]
    for i, mark in sorted(used.items(), key=lambda t: t[1]):
        run = runs[i]
        z = run["zero_shot"]
        zs = (f"; zero-shot: {', '.join(z['tasks'])}, first {z['limit']} examples each, {z['harness']}" if z else "; no zero-shot")
        lines.append(f"- <sup>{mark}</sup> `{run['command']}` ({os.path.basename(run['path'])}, {run['date']}, "
                     f"{run['nsamples']}x{run['seqlen']} calibration tokens{zs})")
    lines += ["", "## Plots", ""] + [m + "\n" for m in plots(a.results, runs, os.path.dirname(os.path.abspath(a.out)))]
    lines += ["## Which of the paper's claims reproduce at this scale", "", *claims(runs), ""]
    with open(a.out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    print(f"wrote {a.out}")


if __name__ == "__main__":
    main()
