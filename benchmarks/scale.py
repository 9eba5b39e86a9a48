"""Memory and time of quantizing real model shapes (issue #14 item 5): random weights, no download.

    nice -n 5 python -m benchmarks.scale                  # CPU: SmolLM2-135M, Llama-3.2-1B shape at 4 and 16 layers
    python -m benchmarks.scale --device cuda --nsamples 128 --seqlen 2048 --cases all   # a GPU adds Llama-3-8B

Each model is written to a temporary directory as bf16 safetensors shards (several, with an index)
from its config, with random weights (normal, std 0.02; norms 1). Every row (shape, depth, method,
path) runs in a fresh subprocess that records its RSS after its imports, then calls
:func:`loaq.api.quantize` on the directory with random calibration token windows and samples its RSS
every 20 ms (:class:`loaq.bench.PeakRSS`): ``peak_rss_mb`` is the peak above the post-import level;
on CUDA ``peak_device_mb`` is ``torch.cuda.max_memory_allocated``. ``path`` is ``lazy`` (layer-at-a-time
weights, ``quantize(load="lazy")``) or ``eager`` (the whole float32 model in memory first, the old
path); where the API has no ``load`` argument only ``eager`` runs. A row stops after ``--max-layers``
decoder layers (the whole depth when it has fewer): ``seconds_per_layer`` is the time from the first
layer's start to the last timed layer's end over their number, ``layers_timed`` says how many.
Writes benchmarks/results/scale.{json,md} and scale.peak_rss.png; projections to 8B and 70B: see
:func:`projection`.
"""

from __future__ import annotations

import argparse
import inspect
import json
import os
import subprocess
import sys
import tempfile
import time

SHAPES = {  # HF LlamaConfig fields
    "smollm2-135m": dict(hidden_size=576, intermediate_size=1536, num_hidden_layers=30, num_attention_heads=9,
                         num_key_value_heads=3, head_dim=64, vocab_size=49152, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_theta=100000.0, max_position_embeddings=8192),
    "llama-3.2-1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
                         num_key_value_heads=8, head_dim=64, vocab_size=128256, tie_word_embeddings=True,
                         rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=131072),
    "llama-3-8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                       rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
    "llama-3-70b": dict(hidden_size=8192, intermediate_size=28672, num_hidden_layers=80, num_attention_heads=64,
                        num_key_value_heads=8, head_dim=128, vocab_size=128256, tie_word_embeddings=False,
                        rms_norm_eps=1e-5, rope_theta=500000.0, max_position_embeddings=8192),
}
# (shape, layers, devices it is measured on, layers timed per row unless --max-layers says otherwise)
CASES = [("smollm2-135m", 30, ("cpu", "cuda"), 2), ("llama-3.2-1b", 4, ("cpu", "cuda"), 1),
         ("llama-3.2-1b", 16, ("cpu", "cuda"), 1), ("llama-3-8b", 32, ("cuda",), 2)]
# one decoder layer of the 1B shape (with its 128k-token embeddings): seconds per layer and LoaQ ÷ GPTQ where
# the deeper eager rows do not fit in memory (--only llama-3.2-1b:1)
EXTRA_CASES = [("llama-3.2-1b", 1, ("cpu", "cuda"), 1)]
METHODS = ("gptq", "loaq")


def _linears(s: dict) -> list[tuple[int, int]]:
    """(out, in) of one decoder layer's linears: q, k, v, o, gate, up, down."""
    h, i, hd = s["hidden_size"], s["intermediate_size"], s["head_dim"]
    q, kv = s["num_attention_heads"] * hd, s["num_key_value_heads"] * hd
    return [(q, h), (kv, h), (kv, h), (h, q), (i, h), (i, h), (h, i)]


def params(s: dict, layers: int) -> int:
    """Parameters of ``s`` at depth ``layers`` (embeddings, lm_head unless tied, norms)."""
    per_layer = sum(o * k for o, k in _linears(s)) + 2 * s["hidden_size"]
    head = 0 if s["tie_word_embeddings"] else s["vocab_size"] * s["hidden_size"]
    return s["vocab_size"] * s["hidden_size"] + head + layers * per_layer + s["hidden_size"]


def write_model(path: str, shape: str, layers: int, seed: int = 0) -> str:
    """A random-weight HF directory of ``shape`` at depth ``layers``: config, a word-level tokenizer, bf16
    safetensors shards (embeddings + final norm + lm_head in the first, then ≤ 4 layers per shard) and
    their index, written one shard at a time."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig

    s = dict(SHAPES[shape], num_hidden_layers=layers)
    os.makedirs(path, exist_ok=True)
    LlamaConfig(**s, architectures=["LlamaForCausalLM"], torch_dtype="bfloat16").save_pretrained(path)
    _write_tokenizer(path)
    g = torch.Generator().manual_seed(seed)
    h = s["hidden_size"]

    def rand(*shape):
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    shards = [{"model.embed_tokens.weight": rand(s["vocab_size"], h),
               "model.norm.weight": torch.ones(h, dtype=torch.bfloat16)}]
    if not s["tie_word_embeddings"]:
        shards[0]["lm_head.weight"] = rand(s["vocab_size"], h)
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj",
             "mlp.up_proj", "mlp.down_proj"]
    for first in range(0, layers, 4):
        shards.append({})
        for i in range(first, min(first + 4, layers)):
            for n, (o, k) in zip(names, _linears(s)):
                shards[-1][f"model.layers.{i}.{n}.weight"] = rand(o, k)
            for n in ("input_layernorm", "post_attention_layernorm"):
                shards[-1][f"model.layers.{i}.{n}.weight"] = torch.ones(h, dtype=torch.bfloat16)
    weight_map, total = {}, 0
    for j in range(len(shards)):
        name = f"model-{j + 1:05d}-of-{len(shards):05d}.safetensors"
        shard = shards[j]
        save_file(shard, os.path.join(path, name), metadata={"format": "pt"})
        weight_map |= {k: name for k in shard}
        total += sum(t.numel() * t.element_size() for t in shard.values())
        shards[j] = None  # one shard in memory at a time
    with open(os.path.join(path, "model.safetensors.index.json"), "w") as fh:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fh)
    return path


def _write_tokenizer(path: str) -> None:
    """A word-level tokenizer (the benchmark feeds token ids; the loader only needs one to exist)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({"<unk>": 0, "<eos>": 1}, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>", eos_token="<eos>").save_pretrained(path)


def load_paths() -> list[str]:
    """``["lazy", "eager"]`` when :func:`loaq.api.quantize` takes ``load``, else ``["eager"]`` (the old path only)."""
    from loaq import api

    return ["lazy", "eager"] if "load" in inspect.signature(api.quantize).parameters else ["eager"]


class _Enough(Exception):
    pass


def measure(row: dict) -> dict:
    """Run one row in this (fresh) process: quantize ``row["dir"]`` and measure peak RSS and seconds per layer."""
    import torch
    # transformers' model classes (~300 MB of RSS on import) are imported before the base is taken: the peak
    # is the quantization's own memory above the process's RSS after its imports, as the issue defines it
    import transformers.models.llama.modeling_llama  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    import loaq.pipeline as pipeline
    from loaq import api
    from loaq.bench import PeakRSS
    from loaq.config import Method, QuantConfig
    from loaq.grids import GridSpec

    g = torch.Generator().manual_seed(1)
    calib = torch.randint(2, SHAPES[row["model"]]["vocab_size"], (row["nsamples"], row["seqlen"]), generator=g)
    starts, ends = [], []
    real = pipeline.quantize_layer

    def timed(*args, **kwargs):
        starts.append(time.perf_counter())
        out = real(*args, **kwargs)
        ends.append(time.perf_counter())
        if len(ends) >= row["max_layers"]:
            raise _Enough
        return out

    pipeline.quantize_layer = timed
    # LoaQ at fixed α, β: the rows measure the layer pipeline (the default α/β search would run its own layers
    # first, and this timer would stop inside it)
    fixed = {"alpha": 0.25, "beta": 0.0} if row["method"] == "loaq" else {}
    cfg = QuantConfig(spec=GridSpec(3, 0, False), method=Method(row["method"], **fixed))
    extra = {"load": row["path"]} if "load" in inspect.signature(api.quantize).parameters else {}
    cuda = row["device"].startswith("cuda")
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        try:
            api.quantize(row["dir"], cfg, calib, device=row["device"], batch_size=row["batch_size"], progress=False,
                         **extra)
        except _Enough:
            pass
    n = len(ends)
    return dict(peak_rss_mb=round(mem.delta, 1), base_rss_mb=round(mem.base, 1),
                peak_device_mb=round(torch.cuda.max_memory_allocated() / 2**20, 1) if cuda else None,
                seconds_per_layer=round((ends[-1] - starts[0]) / n, 2), layers_timed=n,
                wall_seconds=round(time.perf_counter() - t0, 1))


def run_row(row: dict) -> dict:
    """:func:`measure` in a fresh subprocess (its own imports, its own peak)."""
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", str(os.cpu_count())))
    r = subprocess.run([sys.executable, "-m", "benchmarks.scale", "--row", json.dumps(row)], env=env,
                       capture_output=True, text=True)
    if r.returncode != 0:  # recorded, not fatal: the other rows still run
        why = "killed by the OOM killer" if r.returncode == -9 else f"exit status {r.returncode}"
        print(r.stderr[-3000:], file=sys.stderr)
        return dict(peak_rss_mb=None, peak_device_mb=None, seconds_per_layer=None, failed=why)
    return json.loads(r.stdout.strip().splitlines()[-1])


def layer_flops(s: dict, tokens: int, method: str) -> dict:
    """Multiply-adds ×2 of one decoder layer at ``tokens`` calibration tokens, by part (the cost model of
    the projection): forwards (the quantized one, plus the float one for two-stream methods), statistics
    (``H``; LoaQ adds ``C``, or ``C Wᵀ`` where ``2·out ≤ in``: ``down_proj``, :class:`loaq.stats.Stats`),
    the solve (GPTQ's column loop ``out · in²`` plus the float64 Cholesky factor, inverse and factor of the
    inverse, ``≈ 1.5 in³``, per group) and LoaQ's target ``H⁻¹ C W`` (``2 in² out`` for ``C W`` unless
    projected, ``2 in² out`` for the two triangular solves)."""
    lin = _linears(s)
    weights = sum(o * k for o, k in lin)
    attn = 2 * tokens * s["seqlen_for_flops"] * s["num_attention_heads"] * s["head_dim"] * 2
    fwd = 2 * tokens * weights + attn
    groups = [(sum(o for o, _ in lin[:3]), s["hidden_size"]), lin[3], (2 * s["intermediate_size"], s["hidden_size"]), lin[6]]
    two = method != "gptq"
    projected = [two and i in (1, 3) and 2 * o <= k for i, (o, k) in enumerate(groups)]  # W_out groups only
    stats = sum(2 * tokens * k * k for _, k in groups)
    cross = sum(4 * tokens * k * o if p else 2 * tokens * k * k for (o, k), p in zip(groups, projected)) if two else 0
    solve = sum(o * k * k + 1.5 * k ** 3 for o, k in groups)
    target = sum((2 if p else 4) * o * k * k for (o, k), p in zip(groups, projected)) if two else 0
    return dict(forward=fwd * (2 if two else 1), stats=stats + cross, solve=solve, target=target)


def projection(rows: list[dict], tokens_paper: int = 128 * 2048, seqlen_paper: int = 2048) -> list[dict]:
    """Per-layer seconds and peak memory of the 8B and 70B shapes, projected from the measured 1B-shape rows.

    Time: the measured seconds per layer of the deepest measured 1B-shape row (per method), scaled by the
    ratio of :func:`layer_flops` totals (same machine, same token budget, and at the paper's 128 × 2048
    tokens), times the depth. Memory (:func:`_memory_model`, streams on the device): lazy = two float32
    copies of one layer + both streams + the kept ``X̂`` (tokens × intermediate) + one batch's largest
    activations + float32 embeddings; eager adds the whole float32 model. ``fitted_mb`` scales the
    model of the reference row's path by that row's measured / modelled ratio."""
    base = [r for r in rows if r["model"] == "llama-3.2-1b" and r.get("seconds_per_layer") and r["device"] == "cpu"]
    if not base:
        return []
    out = []
    for method in METHODS:
        ref = max((r for r in base if r["method"] == method), key=lambda r: (r["layers"], r["path"] == "lazy"), default=None)
        if ref is None:
            continue
        s1 = dict(SHAPES["llama-3.2-1b"], seqlen_for_flops=ref["seqlen"])
        f1 = sum(layer_flops(s1, ref["tokens"], method).values())
        for shape in ("llama-3-8b", "llama-3-70b"):
            for tokens, seqlen in ((ref["tokens"], ref["seqlen"]), (tokens_paper, seqlen_paper)):
                s = dict(SHAPES[shape], seqlen_for_flops=seqlen)
                f = sum(layer_flops(s, tokens, method).values())
                spl = ref["seconds_per_layer"] * f / f1
                mem = _memory_model(s, tokens, ref["batch_size"], seqlen, method)
                ref_mem = _memory_model(s1, ref["tokens"], ref["batch_size"], ref["seqlen"], method)
                key = f"{ref['path']}_mb"
                fit = ref["peak_rss_mb"] / ref_mem[key]  # measured / modelled on the reference row
                out.append(dict(model=shape, layers=s["num_hidden_layers"], params=params(s, s["num_hidden_layers"]),
                                method=method, tokens=tokens, seconds_per_layer=round(spl, 1),
                                hours=round(spl * s["num_hidden_layers"] / 3600, 2),
                                lazy_mb_model=round(mem["lazy_mb"]), eager_mb_model=round(mem["eager_mb"]),
                                fitted_mb=round(mem[key] * fit), fitted_path=ref["path"],
                                from_row=f"{ref['model']}/{ref['layers']}/{ref['path']}"))
    return out


def _memory_model(s: dict, tokens: int, batch: int, seqlen: int, method: str) -> dict:
    """The issue's bound, in MiB: 2 float32 layers + streams (+ ``X̂``) + one batch's activations + embeddings."""
    layer = sum(o * k for o, k in _linears(s)) * 4
    streams = (2 if method != "gptq" else 1) * tokens * s["hidden_size"] * 4 + tokens * s["intermediate_size"] * 4
    acts = batch * seqlen * (3 * s["intermediate_size"] + 4 * s["hidden_size"]) * 4 \
        + batch * s["num_attention_heads"] * seqlen * seqlen * 4
    emb = s["vocab_size"] * s["hidden_size"] * 4
    lazy = 2 * layer + streams + acts + emb
    eager = lazy + params(s, s["num_hidden_layers"]) * 4 - layer
    return dict(lazy_mb=lazy / 2**20, eager_mb=eager / 2**20)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--row", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--nsamples", type=int, default=8)
    ap.add_argument("--seqlen", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--max-layers", type=int, help="stop each row after this many layers (default: per case, "
                                                   "2 for SmolLM2 and 8B, 1 for the 1B shape)")
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--cases", default="cpu", help="'cpu' (the CPU cases) or 'all'")
    ap.add_argument("--only", help="run only these cases, e.g. llama-3.2-1b:4,llama-3.2-1b:16")
    ap.add_argument("--append", action="store_true", help="keep the rows already in --out's JSON (other cases)")
    ap.add_argument("--paths", help="load paths to measure, e.g. lazy (default: every path this tree has)")
    ap.add_argument("--out", default=os.path.join("benchmarks", "results", "scale"))
    a = ap.parse_args()
    if a.row:
        print(json.dumps(measure(json.loads(a.row))))
        return
    paths = [p for p in load_paths() if not a.paths or p in a.paths.split(",")]
    rows, t_start = [], time.time()
    only = set(a.only.split(",")) if a.only else None
    if a.append and os.path.exists(a.out + ".json"):  # keep every row this run does not measure again
        with open(a.out + ".json") as fh:
            rows = [r for r in json.load(fh)["rows"] if only is None or f"{r['model']}:{r['layers']}" not in only
                    or r["path"] not in paths or r["method"] not in a.methods.split(",")]
    with tempfile.TemporaryDirectory(prefix="loaq-scale-") as tmp:
        for shape, layers, devices, timed in CASES + EXTRA_CASES:
            if (shape, layers, devices, timed) in EXTRA_CASES and (only is None or f"{shape}:{layers}" not in only):
                continue
            if only is not None and f"{shape}:{layers}" not in only:
                continue
            s = SHAPES[shape]
            base = dict(model=shape, layers=layers, params=params(s, layers), tokens=a.nsamples * a.seqlen,
                        nsamples=a.nsamples, seqlen=a.seqlen, batch_size=a.batch_size)
            if a.device.split(":")[0] not in devices:
                for method in a.methods.split(","):
                    rows.append(dict(base, method=method, path="lazy", device="cuda", peak_rss_mb=None,
                                     peak_device_mb=None, seconds_per_layer=None, measured=False,
                                     note="GPU only: not measured (no GPU in this run)"))
                continue
            d = write_model(os.path.join(tmp, f"{shape}-{layers}"), shape, layers)
            for method in a.methods.split(","):
                for path in paths:
                    row = dict(base, method=method, path=path, device=a.device, dir=d,
                               max_layers=min(a.max_layers or timed, layers))
                    row |= run_row(row)
                    row.pop("dir")
                    row["measured"] = not row.get("failed")
                    rows.append(row)
                    print(json.dumps(row), flush=True)
                    _write(a, paths, rows, t_start)  # after every row: a cut-short run keeps what it measured
            import shutil

            shutil.rmtree(d)
    _write(a, paths, rows, t_start)


def _write(a, paths: list[str], rows: list[dict], t_start: float) -> None:
    from loaq.bench import command, machine, utc_date
    from loaq.plots import peak_memory_vs_params

    import torch

    doc = dict(command=command(), machine=machine(), date=utc_date(), minutes=round((time.time() - t_start) / 60, 1),
               threads=int(os.environ.get("OMP_NUM_THREADS") or torch.get_num_threads()), load_paths=paths, rows=rows,
               projection=projection(rows))
    with open(a.out + ".json", "w") as fh:
        json.dump(doc, fh, indent=2)
    with open(a.out + ".md", "w") as fh:
        fh.write(markdown(doc))
    peak_memory_vs_params(rows, a.out + ".peak_rss.png")


def markdown(doc: dict) -> str:
    lines = ["# Scale: peak memory and seconds per layer on real shapes (random weights)", "",
             f"`{doc['command']}` on {doc['machine']}, {doc['date']} ({doc['minutes']} min).", "",
             f"Load paths measured: {', '.join(doc['load_paths'])}. Peak RSS is above the subprocess's RSS after its "
             "imports; each row stops after `layers_timed` layers (seconds per layer are over those).", "",
             *[f"- {n}" for n in doc.get("notes", [])], *([""] if doc.get("notes") else []),
             "`bound MB`: the issue's goal for the lazy path, 1.5 × (two float32 copies of one decoder layer + the "
             "streams + one batch's largest activations + the float32 embeddings) (`_memory_model`).", "",
             "| model | layers | params (M) | method | path | device | peak RSS MB | bound MB | peak device MB | s/layer | layers timed | tokens |",
             "|---|---:|---:|---|---|---|---:|---:|---:|---:|---:|---:|"]
    for r in doc["rows"]:
        f = lambda k: (r.get("failed") or "not measured") if r.get(k) is None else r[k]  # noqa: E731
        bound = "-" if r["path"] != "lazy" or "seqlen" not in r else \
            round(1.5 * _memory_model(SHAPES[r["model"]], r["tokens"], r["batch_size"], r["seqlen"], r["method"])["lazy_mb"])
        lines.append(f"| {r['model']} | {r['layers']} | {r['params'] / 1e6:.0f} | {r['method']} | {r['path']} | "
                     f"{r['device']} | {f('peak_rss_mb')} | {bound} | {f('peak_device_mb') if r['device'] != 'cpu' else '-'} | "
                     f"{'-' if r.get('failed') else f('seconds_per_layer')} | {r.get('layers_timed', '-')} | {r['tokens']} |")
    lines += ["", "LoaQ ÷ GPTQ seconds per layer (same run), beside the FLOP ratio of :func:`layer_flops`:", ""]
    for r in doc["rows"]:
        if r["method"] == "loaq" and r.get("seconds_per_layer"):
            g = next((x for x in doc["rows"] if x["method"] == "gptq" and x.get("seconds_per_layer") and
                      all(x[k] == r[k] for k in ("model", "layers", "path", "device"))), None)
            if g:
                sh = dict(SHAPES[r["model"]], seqlen_for_flops=r.get("seqlen", 256))
                flops = sum(layer_flops(sh, r["tokens"], "loaq").values()) / sum(layer_flops(sh, r["tokens"], "gptq").values())
                lines.append(f"- {r['model']} × {r['layers']} ({r['path']}): {r['seconds_per_layer'] / g['seconds_per_layer']:.2f}"
                             f" (FLOPs {flops:.2f})")
    if doc["projection"]:
        lines += ["", "## Projection to 8B and 70B (see `benchmarks/scale.py: projection`)", "",
                  "| model | method | tokens | s/layer | hours | lazy MB (model) | eager MB (model) | MB fitted (path) | from |",
                  "|---|---|---:|---:|---:|---:|---:|---:|---|"]
        for p in doc["projection"]:
            lines.append(f"| {p['model']} | {p['method']} | {p['tokens']} | {p['seconds_per_layer']} | {p['hours']} | "
                         f"{p['lazy_mb_model']} | {p['eager_mb_model']} | {p['fitted_mb']} ({p['fitted_path']}) | "
                         f"{p['from_row']} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
