"""Quality, quantization time and peak memory of every method on SmolLM2-135M, all in one run.

    python benchmarks/quality.py --nsamples 64 --seqlen 512 --search benchmarks/results/search_w3.json

Rows: fp32, then for each setting (2-bit and 3-bit per-channel asymmetric, 4-bit group 64 asymmetric)
rtn, gptq, gptaq, qronos, lloa, loaq. Perplexity is ppl16k on the DATA.md evaluation split
(32 windows of 512). LoaQ/LLOA α, β come from `loaq search` (held-out calibration text), passed with
--search; GPTAQ uses its own default weighting 0.25. quant_seconds is the wall time of
quantize_model; peak_mem_mb is the peak RSS above the level before quantization (sampled every 20 ms).

With --tables (issue #8: the paper's Tables 2-5 on SmolLM2; 1 and 7 for their zero-shot column) it instead
appends an "extended" section to both files, rewritten after every row so a partial run keeps what it
measured (--resume goes on from there):

    nice -n 10 python benchmarks/quality.py --nsamples 32 --seqlen 512 --tables 2,4,3,5,1,7 --zero-shot \
        --zero-shot-limit 100 --resume --out benchmarks/results/quality_tables

- Tables 1 and 7: 2- and 3-bit per-channel, no rotation: gptq, gptaq, qronos, loaq (with --zero-shot, the
  zero-shot column of the main table's settings);
- Table 2: 2- and 3-bit per-channel with Hadamard (rotate=hadamard): gptq, gptaq, qronos, loaq;
- Table 4: W4A4 (4-bit per-channel weights, 4-bit per-token asymmetric activations), without and with Hadamard;
- Table 3: 2-bit per-channel with NeUQI (integer zero points), without and with Hadamard;
- Table 5: LoaQ ablation at 2-bit: -NOA (no RMSNorm rescaling) without and with Hadamard, plus full
  LoaQ without Hadamard (with Hadamard it is Table 2's row; a setting that two tables share is measured
  once and listed in both), and -SOA and -both (no SOA; no SOA nor NOA) without and with Hadamard. At
  β = 0 (``--loaq-ab x,0``) -SOA is LoaQ itself and -both is -NOA (the SOA term is β·H⁻¹B): those rows
  are skipped then.
Rows carry rotate, init and act_bits. α, β: the defaults from `loaq search` (loaq.config), never tuned
on the evaluation split.
With --zero-shot every row also gets the average zero-shot accuracy through lm-evaluation-harness
(loaq.zeroshot; the local BIG-bench tasks, first --zero-shot-limit examples each; needs
`loaq tasks prepare`). Writes benchmarks/results/quality.json and quality.md (or --out).
"""

from __future__ import annotations

import argparse
import dataclasses
import copy
import gc
import json
import os

from loaq import api
from loaq.actquant import ActSpec
from loaq.bench import PeakRSS, command, machine, method_knobs, parse_ab, row_key, utc_date
from loaq.config import METHODS, Calibration, Method, QuantConfig
from loaq.grids import GridSpec
from loaq.metrics import perplexity
from loaq.rotation import RotationSpec
from loaq.tasks import parse_names

SETTINGS = {"w2": GridSpec(2, 0, False), "w3": GridSpec(3, 0, False), "w4g64": GridSpec(4, 64, False)}
# the default run: loaq.config.METHODS and loaq-alg (ŝ = R(h + X̂W), Algorithm 1); any name of
# loaq.bench.METHOD_NAMES is accepted (the Table 5 ablations loaq-nosoa, loaq-nonoa, loaq-nosoa-nonoa)
DEFAULT_METHODS = (*METHODS, "loaq-alg")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", help="any model loaq.api.load takes, of any supported family (loaq.arch; "
                                    "default: SmolLM2-135M-Instruct)")
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS))
    ap.add_argument("--alg-settings", default="w2,w3", help="settings that also get the loaq-alg (ŝ form) row")
    ap.add_argument("--table-methods", help="--tables: run only these methods' rows, e.g. loaq (a rerun of one method "
                                            "under new defaults beside the measured baselines)")
    ap.add_argument("--loaq-ab", help="--tables: α,β of every LoaQ row instead of the registry's defaults, e.g. "
                                      "auto,auto (rows with other α, β are other rows: --resume keeps both)")
    ap.add_argument("--search", help="JSON written by `loaq search` (α, β for lloa/loaq)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--zero-shot", action="store_true", help="add the zero-shot accuracy of every row (lm-eval)")
    ap.add_argument("--tasks", default="all", help="zero-shot tasks (default: all shipped tasks)")
    ap.add_argument("--zero-shot-limit", type=int, default=250, help="first N examples per task (default 250)")
    ap.add_argument("--no-fp", action="store_true", help="skip the fp32 row (a table split over processes: "
                                                         "report.py merges runs with equal settings)")
    ap.add_argument("--out", default="benchmarks/results/quality")
    ap.add_argument("--tables", help="issue #8 tables to run, in this order, e.g. 2,4,3,5 (appends a section)")
    ap.add_argument("--resume", action="store_true", help="--tables: keep the rows an earlier run with the same "
                                                          "budget measured")
    a = ap.parse_args()
    if a.tables:
        return run_tables(a)
    tasks = zero_shot_tasks(a)
    zero_shot = lambda m: zero_shot_acc(m, tok, tasks, a)  # noqa: E731
    alpha = beta = None  # the registry's defaults (loaq.methods) unless --search gives them
    if a.search:
        s = json.load(open(a.search))
        alpha, beta = s["alpha"], s["beta"]
    model, tok, calib, evalw = _inputs(a)
    rows = [] if a.no_fp else [dict(model=model_label(a), method="fp32", bits=32, group=0, symmetric=False, alpha=None,
                                    beta=None, ppl=perplexity(model, evalw), quant_seconds=0.0, peak_mem_mb=0.0,
                                    zero_shot=zero_shot(model))]
    print(rows[:1], flush=True)
    for sname in a.settings.split(","):
        spec = SETTINGS[sname]
        for mname in a.methods.split(","):
            if mname == "loaq-alg" and sname not in a.alg_settings.split(","):
                continue
            base, knobs = method_knobs(mname)
            method = Method(base, alpha if base in ("lloa", "loaq") else None, beta if base == "loaq" else None, **knobs)
            cfg = QuantConfig(spec=spec, method=method)
            m, secs, mem, _ = _quantize(model, tok, cfg, calib, a)
            row = dict(model=model_label(a), method=mname, bits=spec.bits, group=spec.group_size,
                       symmetric=spec.symmetric, ppl=perplexity(m, evalw), **_alpha_beta(cfg),
                       quant_seconds=round(secs, 2), peak_mem_mb=round(mem.delta, 1), zero_shot=zero_shot(m))
            rows.append(row)
            print(row, flush=True)
            write(rows, a, quiet=True)  # a long run keeps every finished row
            del m
    write(rows, a)


def _inputs(a):
    """(fp model, tokenizer, calibration windows, ppl16k windows): --model (default SmolLM2) and the default
    corpus, seed 0."""
    fp = api.load(a.model)
    calib = api.calibration_windows(fp.tokenizer, Calibration(nsamples=a.nsamples, seqlen=a.seqlen, seed=0))
    return fp.model, fp.tokenizer, calib, api.eval_windows(fp.tokenizer, api.Evaluation())


def model_label(a) -> str:
    return os.path.basename(a.model.rstrip("/")) if a.model else "SmolLM2-135M"


def _quantize(model, tok, cfg: QuantConfig, calib, a):
    """(quantized copy of ``model``, seconds in the pipeline and the α/β search, PeakRSS, ``loaq.json``'s
    ``auto`` record or ``{}``) through :func:`loaq.api.quantize`."""
    m = copy.deepcopy(model)
    gc.collect()
    with PeakRSS() as mem:
        run = api.quantize(m, cfg, calib, tokenizer=tok, batch_size=a.batch_size, progress=False)
    return run.model, run.timings["quantize"] + run.timings.get("auto", 0.0), mem, run.meta.get("auto", {})


def _alpha_beta(cfg: QuantConfig) -> dict:
    """The row's alpha/beta: the values the method uses, None where it has no such setting."""
    s = cfg.method.rule.settings
    return {"alpha": cfg.method.alpha if "alpha" in s else None, "beta": cfg.method.beta if "beta" in s else None}


def zero_shot_tasks(a) -> list[str]:
    """The --zero-shot task names, each checked to have its data (a missing one fails before hours of work)."""
    tasks = parse_names(a.tasks) if a.zero_shot else []
    api.check_tasks(tasks, None)
    return tasks


def zero_shot_acc(m, tok, tasks: list[str], a) -> dict | None:
    """lm-eval accuracy of model ``m`` on ``tasks`` (first --zero-shot-limit examples), without the raw loglikelihoods."""
    if not tasks:
        return None
    return api.evaluate(m, tok, evaluation=None, tasks=tasks, limit=a.zero_shot_limit, batch_size=a.batch_size)["zero_shot"]


def tasks_of(rows: list[dict]) -> list[str]:
    return next((list(r["zero_shot"]["tasks"]) for r in rows if r.get("zero_shot")), [])


def _lm_eval_version() -> str:
    from importlib.metadata import version

    return version("lm-eval")


def _acc(r: dict) -> str:
    z = r.get("zero_shot")
    return f"{100 * z['average']['acc']:.1f}" if z else "-"


def write(rows: list[dict], a, quiet: bool = False) -> None:
    cmd, where, date = command(), machine(), utc_date()
    with open(a.out + ".json", "w") as fh:
        json.dump({"command": cmd, "machine": where, "date": date, "nsamples": a.nsamples, "seqlen": a.seqlen,
                   "eval": "ppl16k: first 16,384 eval-split tokens, 32 windows of 512",
                   "zero_shot": {"tasks": tasks_of(rows), "limit": a.zero_shot_limit, "harness": "lm-eval " + _lm_eval_version()}
                   if any(r.get("zero_shot") for r in rows) else None, "rows": rows}, fh, indent=2)
    lines = [f"# Quality on {model_label(a)} ({a.nsamples}x{a.seqlen} calibration tokens, ppl16k)", "",
             f"Command: `{cmd}`  ", f"Machine: {where}  ", f"Date: {date}", "",
             "| bits | group | method | alpha | beta | ppl | 0-shot avg acc | quant s | peak MB | time / gptq |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    gptq_time = {(r["bits"], r["group"]): r["quant_seconds"] for r in rows if r["method"] == "gptq"}
    for r in rows:
        ratio = r["quant_seconds"] / gptq_time[(r["bits"], r["group"])] if (r["bits"], r["group"]) in gptq_time else None
        lines.append(f"| {r['bits']} | {r['group'] or 'ch'} | {r['method']} | {r['alpha'] if r['alpha'] is not None else '-'} | "
                     f"{r['beta'] if r['beta'] is not None else '-'} | {r['ppl']:.3f} | {_acc(r)} | {r['quant_seconds']:.1f} | "
                     f"{r['peak_mem_mb']:.0f} | {f'{ratio:.2f}' if ratio else '-'} |")
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    if not quiet:
        print("\n".join(lines))


FOUR = ("loaq", "gptq", "qronos", "gptaq")  # LoaQ first: on a busy machine the run may not finish
W2, W3, W4 = GridSpec(2, 0, False), GridSpec(3, 0, False), GridSpec(4, 0, False)
W2N = GridSpec(2, 0, False, "neuqi")
A4 = ActSpec(4, False)
# table -> [(spec, rotate, act, [(label, Method)])], most important setting first
TABLES = {
    "1": [(W2, "none", ActSpec(), [(m, Method(m)) for m in FOUR])],
    "7": [(W3, "none", ActSpec(), [(m, Method(m)) for m in FOUR])],
    "2": [(W3, "hadamard", ActSpec(), [(m, Method(m)) for m in FOUR]),
          (W2, "hadamard", ActSpec(), [(m, Method(m)) for m in FOUR])],
    "4": [(W4, "hadamard", A4, [(m, Method(m)) for m in FOUR]), (W4, "none", A4, [(m, Method(m)) for m in FOUR])],
    "3": [(W2N, "hadamard", ActSpec(), [(m, Method(m)) for m in FOUR]),
          (W2N, "none", ActSpec(), [(m, Method(m)) for m in FOUR])],
    "5": [(W2, "hadamard", ActSpec(), [("loaq -NOA", Method("loaq", rescale=False)),
                                        ("loaq -SOA", Method("loaq", soa=False)),
                                        ("loaq -both", Method("loaq", soa=False, rescale=False))]),
          (W2, "none", ActSpec(), [("loaq", Method("loaq")), ("loaq -NOA", Method("loaq", rescale=False)),
                                   ("loaq -SOA", Method("loaq", soa=False)),
                                   ("loaq -both", Method("loaq", soa=False, rescale=False))])],
}


def _loaq_method(method: Method, loaq_ab: str | None) -> Method | None:
    """A table's LoaQ row with ``--loaq-ab``'s α, β; ``None`` for an -SOA row whose full LoaQ runs at β = 0
    (the SOA term β·H⁻¹B vanishes: -SOA is LoaQ and -both is -NOA, bit for bit, so they are not run)."""
    al, be = parse_ab(loaq_ab) if loaq_ab else (Method("loaq").alpha, Method("loaq").beta)
    if not method.soa:
        return None if be == 0 else dataclasses.replace(method, alpha=al)  # β has no meaning without SOA
    return dataclasses.replace(method, alpha=al, beta=be)


def run_tables(a) -> None:
    """The issue #8 rows, rewritten after every row. With --resume, rows of an earlier run with the same
    budget and zero-shot settings are kept and not re-run (a stopped run goes on where it stopped)."""
    path = a.out + ".json"
    doc = json.load(open(path)) if os.path.exists(path) else {"rows": []}
    tasks = zero_shot_tasks(a)
    zs = {"tasks": tasks, "limit": a.zero_shot_limit, "harness": "lm-eval " + _lm_eval_version()} if tasks else None
    ext = {"command": command(), "machine": machine(), "nsamples": a.nsamples,
           "seqlen": a.seqlen, "eval": "ppl16k: first 16,384 eval-split tokens, 32 windows of 512",
           "zero_shot": zs, "rows": []}
    old = doc.get("extended") or {}
    resumable = a.resume and (old.get("nsamples"), old.get("seqlen"), old.get("zero_shot")) == (a.nsamples, a.seqlen, zs)
    done = {(r["table"], row_key(r)): r for r in old.get("rows", [])} if resumable else {}
    if resumable and old.get("date"):  # the date of the newest row; a run that adds none keeps it
        ext["date"] = old["date"]
    if a.resume and not resumable and old:
        print("--resume: the earlier run used another budget or zero-shot setting; starting afresh", flush=True)
    doc["extended"] = ext
    model, tok, calib, evalw = _inputs(a)
    zero_shot = lambda m: zero_shot_acc(m, tok, tasks, a)  # noqa: E731
    fp = dict(table="-", method="fp32", bits=32, group=0, rotate="none", init="-", act_bits=16, alpha=None, beta=None,
              quant_seconds=0.0)
    ext["rows"].append(done.get((fp["table"], row_key(fp))) or dict(fp, ppl=perplexity(model, evalw), zero_shot=zero_shot(model)))
    for t in a.tables.split(","):
        for spec, rot, act, methods in TABLES[t]:
            for label, method in methods:
                if a.table_methods and method.name not in a.table_methods.split(","):
                    continue
                if method.name == "loaq":
                    method = _loaq_method(method, a.loaq_ab)
                    if method is None:
                        continue
                cfg = QuantConfig(spec=spec, method=method, act=act, rotation=RotationSpec(rot, 0))
                row = dict(table=t, method=label, bits=spec.bits, group=spec.group_size, rotate=rot, init=spec.init,
                           act_bits=act.bits, **_alpha_beta(cfg))
                key = row_key(row)
                earlier = done.get((t, key)) or next((r for r in ext["rows"] + list(done.values()) if row_key(r) == key), None)
                if earlier:  # measured before, or the same setting in another table (Table 5's LoaQ is Table 1's)
                    ext["rows"].append(dict(earlier, table=t))
                    continue
                # the API rotates the copy (exact in fp, tests/test_smollm2.py, so no second fp row)
                m, secs, _, auto = _quantize(model, tok, cfg, calib, a)
                row.update(quant_seconds=round(secs, 2), ppl=perplexity(m, evalw), zero_shot=zero_shot(m))
                if auto:  # the key keeps "auto"; the numbers it chose are recorded beside it
                    row["auto"] = {k: auto[k] for k in ("alpha", "beta", "seconds", "layers")}
                del m
                ext["rows"].append(row)
                print(row, flush=True)
                ext["date"] = utc_date()
                _write_extended(doc, a)
    _write_extended(doc, a)


def _write_extended(doc: dict, a) -> None:
    """Rewrite the JSON and the markdown's extended section (the original table above it is kept)."""
    with open(a.out + ".json", "w") as fh:
        json.dump(doc, fh, indent=2)
    md = a.out + ".md"
    head = open(md).read().split(EXT_TITLE)[0].strip() if os.path.exists(md) else ""
    head = head + "\n\n" if head else ""
    ext = doc["extended"]
    fp = ext["rows"][0]["ppl"]
    lines = [EXT_TITLE, "", f"Command: `{ext['command']}`  ", f"Machine: {ext['machine']}  ",
             f"Date: {ext.get('date', '-')}  ",
             f"Budget: {ext['nsamples']}x{ext['seqlen']} calibration tokens{' (the table above used 64x512)' if head else ''}, ppl16k; "
             f"fp32 {fp:.3f} (the rotated fp model is the same function).  ", "",
             "| table | bits | rotate | init | act | method | alpha | beta | ppl | ppl / fp | 0-shot avg acc | quant s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    zs = ext.get("zero_shot")
    if zs:
        lines[6:6] = [f"Zero-shot: lm-evaluation-harness ({zs['harness']}) acc averaged over {', '.join(zs['tasks'])}, "
                      f"first {zs['limit']} examples of each.  "]
    for r in ext["rows"]:
        lines.append(f"| {r['table']} | {r['bits']} | {r['rotate']} | {r['init']} | A{r['act_bits']} | {r['method']} | "
                     f"{_chosen(r, 'alpha')} | {_chosen(r, 'beta')} | "
                     f"{r['ppl']:.3f} | {r['ppl'] / fp:.3f} | {_acc(r)} | {r['quant_seconds']:.1f} |")
    lines += ["", "Table 5: at β = 0 the SOA term β·H⁻¹B vanishes, so LoaQ -SOA is LoaQ and -both is -NOA, bit for "
              "bit (not run at β = 0). `auto → x`: α or β chosen for that row on held-out calibration windows (loaq.auto)."]
    with open(md, "w") as fh:
        fh.write(head + "\n".join(lines) + "\n")


def _chosen(r: dict, k: str) -> str:
    """α or β of a row: the number, ``-`` where the method has none, ``auto → x`` where ``auto`` chose ``x``."""
    if r.get(k) is None:
        return "-"
    return f"auto → {r['auto'][k]:g}" if r.get("auto") else f"{r[k]}"


EXT_TITLE = "## Hadamard rotation, NeUQI and W4A4 (issue #8; the paper's Tables 2-5)"


if __name__ == "__main__":
    main()
