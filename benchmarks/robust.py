"""Issue #18 diagnosis: why LoaQ loses to Qronos when calibration and evaluation text differ.

    nice -n 5 python benchmarks/robust.py --out benchmarks/results/robust

SmolLM2-135M, 32 x 512 calibration tokens, two transfer directions:

- ``wiki>lee``: calibrate on the DATA.md wiki calibration split, score ppl on the first 16,384 tokens
  of gensim's ``lee_background.cor`` (lines joined by blank lines);
- ``lee>wiki``: calibrate on ``lee_background.cor``, score ppl16k on the wiki evaluation split.

In both, the calibration windows are drawn from the first 90 % of the calibration text's tokens; its
last 10 % is the held-out calibration slice (4 windows of 512) on which, beside the evaluation text's
first 4 windows, every run's per-layer normalized output error (``loaq.holdout.layer_errors``, the
``mse_normed`` of ``loaq eval --mse``) is measured. A run is one ``loaq.api.quantize`` of a fresh copy
of the float model; rows are written after each run and ``--resume`` keeps the finished ones.

Variants beyond the registry's methods (diagnosis only):
- ``+reset``: LoaQ with Qronos' per-layer reset of the float stream (``C`` sees this layer's error only);
- ``tdamp=x``: the target solve ``W̃ = W + H_x⁻¹(αCW + βB)`` uses damping ``x · mean(diag H)`` instead of
  the GPTQ solve's 1 % (``tdamp=0`` is the undamped ``H⁻¹``, floored at 1e-6 for the Cholesky).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import gc
import json
import os
import time

import torch

from loaq import api, data, methods
from loaq.bench import command, machine, utc_date
from loaq.config import Method, QuantConfig
from loaq.grids import GridSpec
from loaq.holdout import layer_errors, reference_outputs
from loaq.metrics import perplexity
from loaq.rotation import RotationSpec

LEE = os.path.join(os.path.dirname(__import__("gensim").__file__), "test", "test_data", "lee_background.cor")
SPECS = {"w3": GridSpec(3, 0, False), "w2": GridSpec(2, 0, False), "w2n": GridSpec(2, 0, False, "neuqi")}


def lee_text() -> str:
    with open(LEE, encoding="utf-8") as fh:
        return "\n\n".join(ln.strip() for ln in fh if ln.strip())


def run_list() -> list[tuple]:
    """(direction, setting, rotate, label, method kwargs, tdamp), most decisive first (the machine is shared)."""
    A, B = "wiki>lee", "lee>wiki"
    q, lo = dict(name="qronos"), dict(name="loaq")
    a1, r1 = dict(name="loaq", alpha=1.0), dict(name="loaq+reset", alpha=1.0)
    au = dict(name="loaq", alpha="auto", beta="auto")
    return [
        (A, "w3", "none", "qronos", q, None), (A, "w3", "none", "loaq", lo, None),
        (A, "w3", "none", "loaq a=1", a1, None), (A, "w3", "none", "loaq+reset a=1", r1, None),
        (B, "w3", "none", "qronos", q, None), (B, "w3", "none", "loaq", lo, None),
        (B, "w3", "none", "loaq a=1", a1, None),
        (A, "w3", "none", "lloa a=1", dict(name="lloa", alpha=1.0), None),
        (A, "w3", "none", "loaq a=1 tdamp=0", a1, 0.0),
        (A, "w3", "none", "loaq b=0.25", dict(name="loaq", beta=0.25), None),
        (A, "w3", "none", "loaq a=0.5", dict(name="loaq", alpha=0.5), None),
        (B, "w3", "none", "loaq+reset a=1", r1, None),
        (A, "w2", "hadamard", "qronos", q, None), (A, "w2", "hadamard", "loaq", lo, None),
        (A, "w2", "hadamard", "loaq a=1", a1, None), (A, "w2", "hadamard", "loaq+reset a=1", r1, None),
        (A, "w3", "none", "loaq shat=alg", dict(name="loaq", shat="alg"), None),
        (A, "w3", "none", "loaq -NOA", dict(name="loaq", rescale=False), None),
        (A, "w3", "none", "loaq a=1 tdamp=0.1", a1, 0.1),
        (A, "w3", "none", "gptaq", dict(name="gptaq"), None),
        (A, "w3", "none", "loaq auto", au, None), (B, "w3", "none", "loaq auto", au, None),
        (A, "w2", "hadamard", "loaq auto", au, None),
    ]


def prefix_list() -> list[tuple]:
    """The --prefix diagnosis: W3 per channel, both directions, every target variant."""
    A, B = "wiki>lee", "lee>wiki"
    q, lo = dict(name="qronos"), dict(name="loaq")
    a1, r1 = dict(name="loaq", alpha=1.0), dict(name="loaq+reset", alpha=1.0)
    L = [(d, "w3", "none", lab, kw, td) for d in (A, B) for lab, kw, td in (
        ("qronos", q, None), ("loaq", lo, None), ("loaq a=1", a1, None), ("loaq+reset a=1", r1, None))]
    L += [(A, "w3", "none", lab, kw, td) for lab, kw, td in (
        ("loaq a=1 tdamp=0", a1, 0.0), ("loaq a=0.5", dict(name="loaq", alpha=0.5), None),
        ("lloa a=1", dict(name="lloa", alpha=1.0), None), ("loaq b=0.25", dict(name="loaq", beta=0.25), None),
        ("loaq+reset a=0.5", dict(name="loaq+reset", alpha=0.5), None), ("loaq -NOA", dict(name="loaq", rescale=False), None),
        ("loaq shat=alg", dict(name="loaq", shat="alg"), None), ("gptaq", dict(name="gptaq"), None))]
    return L


def _register_reset() -> None:
    """``loaq+reset``: LoaQ whose float stream restarts from the quantized one at every layer (as Qronos)."""
    methods.METHODS["loaq+reset"] = dataclasses.replace(methods.METHODS["loaq"], name="loaq+reset",
                                                        resets_fp_stream=True)


@contextlib.contextmanager
def target_damping(tdamp: float | None):
    """Solve the target with damping ``tdamp · mean(diag H)`` (the GPTQ solve keeps its own)."""
    if tdamp is None:
        yield
        return
    from loaq.solver import factorize

    orig = methods.output_target

    def patched(W, factor, C, alpha, B=None, beta=0.0):
        n = factor.H.shape[0]
        H = factor.H - factor.damp * torch.eye(n, dtype=factor.H.dtype)
        f = factorize(H, max(tdamp, 1e-6))
        f.dead = factor.dead
        return orig(W, f, C, alpha, B, beta)

    methods.output_target = patched
    try:
        yield
    finally:
        methods.output_target = orig


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out", default="benchmarks/results/robust")
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--only", help="comma-separated run indices")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--report", action="store_true", help="only rewrite the tables of OUT.md from OUT.json")
    ap.add_argument("--prefix", type=int, help="quantize only the first K decoder layers and measure their output "
                                               "errors (no ppl): a cheap diagnosis on a busy machine")
    a = ap.parse_args()
    if a.report:
        return report(json.load(open(a.out + ".json")), a.out + ".md")
    torch.manual_seed(0)
    _register_reset()
    fp = api.load(None)
    model, tok = fp.model, fp.tokenizer
    if a.prefix:
        from loaq.auto import _prefix

        model = _prefix(model, fp.arch, a.prefix)
    wiki_cal = data.calibration_ids(data.CalibSource(None), tok)
    wiki_eval = data.tokenize(tok, data.default_split("eval"))
    lee = data.tokenize(tok, lee_text())
    dirs = {}
    for d, cal_ids, ev_ids in (("wiki>lee", wiki_cal, lee), ("lee>wiki", lee, wiki_eval)):
        train, held = data.split_tokens(cal_ids, 0.1)
        dirs[d] = dict(calib=data.random_windows(train, a.nsamples, a.seqlen, 0),
                       held=data.eval_windows(held, a.seqlen, 4 * a.seqlen),
                       ev=data.eval_windows(ev_ids, a.seqlen, 16384))
    rows = []
    if a.resume and os.path.exists(a.out + ".json"):
        rows = json.load(open(a.out + ".json"))["rows"]
    done = {(r["dir"], r["setting"], r["rotate"], r["label"]) for r in rows}
    fp_ppl = {r["dir"]: r["ppl"] for r in rows if r["label"] == "fp32"}
    for d, w in dirs.items():
        if d not in fp_ppl and not a.prefix:
            fp_ppl[d] = perplexity(model, w["ev"], 8)
            rows.append(dict(dir=d, setting="fp", rotate="none", label="fp32", ppl=fp_ppl[d]))
            print(rows[-1], flush=True)
            write(rows, a)
    refs = {}
    plan = prefix_list() if a.prefix else run_list()
    pick = [int(i) for i in a.only.split(",")] if a.only else range(len(plan))
    for i in pick:
        d, s, rot, label, kw, tdamp = plan[i]
        if (d, s, rot, label) in done:
            continue
        w = dirs[d]
        if (rot, d) not in refs:
            refs.clear()  # one rotation and direction's float outputs at a time (memory)
            gc.collect()
            ref = copy.deepcopy(model)
            if rot == "hadamard":
                from loaq.rotation import rotate_model

                rotate_model(ref, fp.arch, 0)
            refs[(rot, d)] = {k: reference_outputs(ref, fp.arch, w[k] if k == "held" else w[k][:4]) for k in ("held", "ev")}
            del ref
        cfg = QuantConfig(spec=SPECS[s], method=Method(**kw), rotation=RotationSpec(rot))
        m = copy.deepcopy(model)
        gc.collect()
        t0 = time.time()
        with target_damping(tdamp):
            run = api.quantize(m, cfg, w["calib"], tokenizer=tok, progress=False)
        secs = time.time() - t0
        err = {k: layer_errors(refs[(rot, d)][k], run.model, fp.arch, w[k] if k == "held" else w[k][:4])
               for k in ("held", "ev")}
        row = dict(dir=d, setting=s, rotate=rot, label=label, method=cfg.method.name,
                   alpha=run.meta.get("auto", {}).get("alpha", cfg.method.alpha),
                   beta=run.meta.get("auto", {}).get("beta", cfg.method.beta), tdamp=tdamp, layers=a.prefix or len(fp.arch.decoder_layers(model)),
                   ppl=None if a.prefix else perplexity(run.model, w["ev"], 8), fp_ppl=fp_ppl.get(d),
                   err_held=err["held"], err_eval=err["ev"], seconds=round(secs, 1))
        rows.append(row)
        print({k: v for k, v in row.items() if not k.startswith("err")}, f"held {err['held'][-1]:.5f}",
              f"eval {err['ev'][-1]:.5f}", flush=True)
        write(rows, a)
        del run, m
    write(rows, a)


def write(rows, a) -> None:
    tmp = a.out + ".json.tmp"
    with open(tmp, "w") as fh:
        json.dump({"command": command(), "machine": machine(), "date": utc_date(), "nsamples": a.nsamples,
                   "seqlen": a.seqlen, "rows": rows}, fh, indent=1)
    os.replace(tmp, a.out + ".json")


MARK = "<!-- tables: written by benchmarks/robust.py --report; text below is hand-written -->"


def report(doc: dict, path: str, k: int = 4) -> None:
    """Rewrite the generated head of ``path`` (tables per transfer direction and setting), keeping the text after MARK."""
    rows = doc["rows"]
    fp = {r["dir"]: r["ppl"] for r in rows if r["label"] == "fp32"}
    lines = ["# LoaQ vs Qronos under transfer (issue #18 diagnosis)", "",
             f"Command: `{doc['command']}`  ", f"Machine: {doc['machine']}  ", f"Date: {doc['date']}  ",
             f"Calibration: {doc['nsamples']} x {doc['seqlen']} tokens from the first 90 % of the calibration text; "
             "ppl on the first 16,384 tokens of the other text (32 windows of 512). "
             f"fp32: wiki>lee {fp.get('wiki>lee', float('nan')):.3f}, lee>wiki {fp.get('lee>wiki', float('nan')):.3f}.  ",
             f"err@k: normalized output error (mse_normed) after decoder layer k on 4 held-out calibration windows "
             f"(held) or the first 4 evaluation windows (eval); k = {k} is what `--alpha auto` scores on SmolLM2.", ""]
    groups: dict = {}
    for r in rows:
        if r["label"] != "fp32":
            groups.setdefault((r["dir"], r["setting"], r["rotate"]), []).append(r)
    for (d, s, rot), rs in groups.items():
        lines += [f"### {d}, {s}, rotate {rot}", "",
                  f"| run | α | β | ppl | ppl / fp | held err@{k} | held err@last | eval err@last | quant s |",
                  "|---|---|---|---|---|---|---|---|---|"]
        key = (lambda r: r["ppl"]) if all(r["ppl"] for r in rs) else (lambda r: r["err_eval"][-1])  # --prefix: no ppl
        best = min(key(r) for r in rs)
        for r in sorted(rs, key=key):
            ppl = "-" if r["ppl"] is None else f"**{r['ppl']:.3f}**" if r["ppl"] == best else f"{r['ppl']:.3f}"
            ratio = f"{r['ppl'] / fp[d]:.3f}" if r["ppl"] and d in fp else "-"
            lines.append(f"| {r['label']} | {r['alpha']:g} | {r['beta']:g} | {ppl} | {ratio} | "
                         f"{r['err_held'][k - 1]:.4f} | {r['err_held'][-1]:.4f} | {r['err_eval'][-1]:.4f} | "
                         f"{r['seconds']:.0f} |")
        lines.append("")
    old = open(path).read() if os.path.exists(path) else ""
    tail = old[old.index(MARK):] if MARK in old else MARK + "\n"
    with open(path, "w") as fh:
        fh.write("\n".join(lines) + "\n" + tail)


if __name__ == "__main__":
    main()
