"""Perplexity effect of storing the calibration streams in bfloat16 (issue #14 item 2), SmolLM2-135M.

    nice -n 5 python -m benchmarks.stream_dtype

LoaQ (the registry's α, β) at W3 and W2 per channel, asymmetric, with the quality tables' calibration
(32 windows of 512 tokens, seed 0) and ppl16k; each setting quantized twice in one run: streams stored in
float32 (the default) and in bfloat16 (``StreamOptions(dtype="bfloat16")``; all math stays float32);
plus one W3 row with the forward passes in bfloat16 (``compute_dtype="bfloat16"``, streams float32).
The float32 rows must equal ``benchmarks/results/quality_tables.json``'s LoaQ rows (same codes).
Writes benchmarks/results/stream_dtype.{json,md}.
"""

from __future__ import annotations

import argparse
import copy
import json
import os

from loaq import api
from loaq.bench import RESULTS, PeakRSS, command, machine, utc_date
from loaq.config import Calibration, Method, QuantConfig
from loaq.grids import GridSpec
from loaq.metrics import perplexity
from loaq.streams import StreamOptions

SETTINGS = {"w3": GridSpec(3, 0, False), "w2": GridSpec(2, 0, False)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=16384, help="ppl tokens (default 16384: ppl16k)")
    ap.add_argument("--out", default=os.path.join(RESULTS, "stream_dtype"))
    a = ap.parse_args()
    fp = api.load(None)
    calib = api.calibration_windows(fp.tokenizer, Calibration(nsamples=a.nsamples, seqlen=a.seqlen, seed=0))
    windows = api.eval_windows(fp.tokenizer, api.Evaluation(tokens=a.eval_tokens))
    rows = []
    # each setting's float32 reference, then bf16 storage; last, forwards in bf16 (a sanity row)
    runs = [("w3", "float32", "float32"), ("w3", "bfloat16", "float32"), ("w2", "float32", "float32"),
            ("w2", "bfloat16", "float32"), ("w3", "float32", "bfloat16")]
    for setting, dtype, compute in runs:
        spec = SETTINGS[setting]
        m = copy.deepcopy(fp.model)
        with PeakRSS() as mem:
            run = api.quantize(m, QuantConfig(spec=spec, method=Method("loaq")), calib, tokenizer=fp.tokenizer,
                               progress=False, streams=StreamOptions(dtype=dtype, compute_dtype=compute))
        rows.append(dict(setting=setting, bits=spec.bits, method="loaq", stream_dtype=dtype, compute_dtype=compute,
                         ppl=perplexity(run.model, windows, 8), quant_seconds=round(run.timings["quantize"], 1),
                         peak_rss_mb=round(mem.delta, 1)))
        print(rows[-1], flush=True)
        del m, run
        doc = dict(command=command(), machine=machine(), date=utc_date(), nsamples=a.nsamples, seqlen=a.seqlen,
                   eval=f"ppl of the first {windows.numel():,} eval-split tokens, {windows.shape[0]} windows of 512",
                   rows=rows)
        with open(a.out + ".json", "w") as fh:  # after every row: a cut-short run keeps what it measured
            json.dump(doc, fh, indent=2)
        with open(a.out + ".md", "w") as fh:
            fh.write(markdown(doc))


def markdown(doc: dict) -> str:
    lines = ["# Stream storage dtype: perplexity effect (SmolLM2-135M, LoaQ)", "",
             f"`{doc['command']}` on {doc['machine']}, {doc['date']}.", "",
             f"Calibration {doc['nsamples']} × {doc['seqlen']} tokens (the quality tables': 32 × 512), {doc['eval']}. "
             "Streams h, ĥ and the kept X̂ stored in the given dtype between uses; norms, residual sums and "
             "H, C, B stay float32 (float64 sums).", "",
             "| setting | stream dtype | compute dtype | ppl | Δ ppl vs float32 | quant s | peak RSS MB (above start) |",
             "|---|---|---|---:|---:|---:|---:|"]
    base = {r["setting"]: r["ppl"] for r in doc["rows"] if r["stream_dtype"] == r["compute_dtype"] == "float32"}
    for r in doc["rows"]:
        d = 100 * (r["ppl"] / base[r["setting"]] - 1) if r["setting"] in base else float("nan")
        lines.append(f"| {r['setting']} | {r['stream_dtype']} | {r['compute_dtype']} | {r['ppl']:.3f} | {d:+.2f} % | "
                     f"{r['quant_seconds']} | {r['peak_rss_mb']} |")
    lines += [""] + [f"- {n}" for n in doc.get("notes", [])]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
