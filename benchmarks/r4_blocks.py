"""Perplexity of the block-diagonal online R4 (``--r4-blocks N``) against the full R4 on SmolLM2-135M.

    nice -n 5 python -m benchmarks.r4_blocks --nsamples 32 --seqlen 512 --blocks 1,2

Rows: LoaQ with ``--rotate hadamard`` at W3 (per-channel asym) and W4A4 (4-bit per-channel weights, int4
per-token asym activations), R4 with 1 block (today's full R4) and each N of ``--blocks``; ppl16k on the
DATA.md evaluation split. The goal (issue #15): ppl(N blocks) ≤ 1.02 × ppl(full R4). Each row is written
as soon as it is measured (``--resume`` keeps finished rows). Writes ``benchmarks/results/r4_blocks.{json,md}``.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import time

from loaq import api
from loaq.actquant import ActSpec
from loaq.bench import RESULTS, command, machine, utc_date
from loaq.config import Calibration, Method, QuantConfig
from loaq.grids import GridSpec
from loaq.rotation import RotationSpec

SETTINGS = {"w3": (GridSpec(3, 0, False), ActSpec()), "w4a4": (GridSpec(4, 0, False), ActSpec(4, False))}


def render(data: dict, path: str) -> None:
    m = data["meta"]
    lines = ["# Block-diagonal online R4 (`--r4-blocks N`) against the full R4 on SmolLM2-135M", "",
             f"Command: `{m['command']}`  ", f"Machine: {m['machine']}  ", f"Date: {m['date']}  ",
             f"Budget: {m['nsamples']}x{m['seqlen']} calibration tokens, ppl16k; LoaQ (α, β defaults), "
             "--rotate hadamard (seed 0). Goal: ppl(N) ≤ 1.02 × ppl(1).", "",
             "| setting | R4 blocks | R4 had_k order | ppl | ppl / full R4 | quant s |", "|---|---|---|---|---|---|"]
    for key, r in data["rows"].items():
        full = data["rows"].get(f"{r['setting']}-b1", {}).get("ppl")
        ratio = f"{r['ppl'] / full:.4f}" if full else "-"
        lines.append(f"| {r['setting']} | {r['blocks']} | {r['had_k_order']} | {r['ppl']:.3f} | {ratio} | "
                     f"{r['quant_s']:.0f} |")
    open(path + ".md", "w").write("\n".join(lines) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--nsamples", type=int, default=32)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--blocks", default="1,2")
    ap.add_argument("--settings", default="w3,w4a4")
    ap.add_argument("--resume", action="store_true")
    ap.add_argument("--out", default=os.path.join(RESULTS, "r4_blocks"))
    a = ap.parse_args()
    data = {"rows": {}}
    if a.resume and os.path.exists(a.out + ".json"):
        data = json.load(open(a.out + ".json"))
    data["meta"] = {"command": command(), "machine": machine(), "date": utc_date(), "nsamples": a.nsamples,
                    "seqlen": a.seqlen}
    for setting in a.settings.split(","):
        spec, act = SETTINGS[setting]
        for blocks in map(int, a.blocks.split(",")):
            key = f"{setting}-b{blocks}"
            if key in data["rows"]:
                continue
            cfg = QuantConfig(spec=spec, method=Method("loaq"), act=act,
                              rotation=RotationSpec("hadamard", 0, blocks))
            t0 = time.time()
            run = api.quantize(None, cfg, Calibration(nsamples=a.nsamples, seqlen=a.seqlen), evaluation=api.Evaluation(),
                               progress=False)
            r4 = run.rotation.meta()["r4"]  # (meta holds "rotation" only when a checkpoint is written)
            data["rows"][key] = {"setting": setting, "blocks": blocks, "had_k_order": r4["had_k_order"],
                                 "ppl": run.ppl, "fp_ppl": run.fp_ppl, "quant_s": time.time() - t0}
            print(key, data["rows"][key], flush=True)
            del run
            gc.collect()
            json.dump(data, open(a.out + ".json", "w"), indent=2)
            render(data, a.out)


if __name__ == "__main__":
    main()
