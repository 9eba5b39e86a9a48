"""End-to-end greedy decode speed: fp16 vs LoaQ's quantized linears in one Llama, in one run.

    python -m benchmarks.decode                                   # CUDA: Llama-3-8B shapes, batch 1 and 16
    python -m benchmarks.decode --layers 8                        # fewer decoder layers (memory / time)
    python -m benchmarks.decode --device cpu --tiny --tokens 16   # smoke run on the CPU kernels, writes nothing

Run it from the repository root, as a module: that imports loaq from this checkout where it is not
installed (a GPU machine with a copy of the repository), and keeps ``benchmarks/kernels.py`` from
shadowing the ``kernels`` package transformers looks for.

vLLM cannot be installed on the GPU machines, so this is the project's own minimal runner: a
transformers ``LlamaForCausalLM`` (Llama-3-8B shapes: hidden 4096, intermediate 14336, 32 layers,
32 heads, 8 KV heads, vocab 128256) whose decoder linears are swapped for :class:`QuantLinear`
(the kernels of :mod:`loaq.kernels.dispatch` behind the opaque op ``torch.ops.loaq.linear``), a
static KV cache (transformers ``StaticCache``) and, on CUDA, the decode step under
``torch.compile(mode="reduce-overhead")`` (CUDA graphs). q/k/v and gate/up stay separate
projections (as in transformers), for the dense baseline and the quantized model alike;
``lm_head`` and the embeddings stay dense.

All weights are random (the kernels' speed does not depend on the values). Per variant
(fp16, W4/W3/W2 A16 g128, W4A4 per-channel) and batch: prefill a fixed random prompt (eager,
not timed), decode ``--warmup`` tokens (compilation and graph capture, not timed), then time
``--tokens`` greedy steps. tokens/s = batch · tokens / time; the speedup is over the dense
model at the same batch, measured in the same process. Results are merged by device type into
``<out>/decode.json`` and rendered to ``decode.md``; a ``--tiny`` run is a smoke run and writes nothing.
"""

from __future__ import annotations

import argparse
import gc
import json
import platform
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM, StaticCache
from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

from loaq.bench import command, cpu_model, utc_date
from loaq.errors import LoaQError
from loaq.kernels.op import QuantLinear
from loaq.kernels.synthetic import random_linear

LLAMA3_8B = dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8, vocab_size=128256, max_position_embeddings=8192)
# head_dim 64, widths with several groups of 128 (CPU smoke run and tests)
TINY = dict(hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, vocab_size=512, max_position_embeddings=1024)
DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
GOALS = {("W4A16 g128", 1): 2.3, ("W2A16 g128", 1): 3.5}  # issue #6: speedup over fp16 at batch 1


@dataclass(frozen=True)
class Variant:
    """One model variant; ``bits=None`` is the dense model."""

    name: str
    bits: int | None = None
    group_size: int | None = None
    act_bits: int = 16


QUANTIZED = [Variant("W4A16 g128", 4, 128), Variant("W3A16 g128", 3, 128), Variant("W2A16 g128", 2, 128),
             Variant("W4A4", 4, None, 4)]


def llama_config(tiny: bool = False, layers: int | None = None) -> LlamaConfig:
    shapes = dict(TINY if tiny else LLAMA3_8B)
    if layers is not None:
        shapes["num_hidden_layers"] = layers
    return LlamaConfig(**shapes, rms_norm_eps=1e-5, tie_word_embeddings=False, attn_implementation="sdpa")


def build_model(config: LlamaConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0) -> LlamaForCausalLM:
    """The model on ``device`` in ``dtype`` with random weights: built on ``meta`` (no init),
    materialized with ``to_empty``, then filled (matrices N(0, 0.02²), norms 1)."""
    torch.manual_seed(seed)
    with torch.device("meta"):
        model = LlamaForCausalLM(config).to(dtype)
    model = model.to_empty(device=device).eval()
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 1:
                p.fill_(1.0)
            else:
                p.normal_(0, 0.02)
    # inv_freq is a computed, non-persistent fp32 buffer that to_empty leaves uninitialized
    model.model.rotary_emb = LlamaRotaryEmbedding(config).to(device)
    return model


def swap_linears(model: LlamaForCausalLM, bits: int, group_size: int | None, act_bits: int = 16) -> dict:
    """Replace every linear of the decoder layers (``nn.Linear`` or an earlier :class:`QuantLinear`;
    not ``lm_head``) by a :class:`QuantLinear` of the same shape with random ``bits``-bit weights.

    Returns ``{name: PackedLinear}``, the checkpoint tensors each layer was prepared from.
    """
    packed = {}
    dtype, device = model.lm_head.weight.dtype, model.lm_head.weight.device
    for name, module in list(model.model.layers.named_modules()):
        if not isinstance(module, (torch.nn.Linear, QuantLinear)):
            continue
        w = random_linear(bits, module.out_features, module.in_features, group_size, device, dtype)
        bias = None if module.bias is None else module.bias.data
        if isinstance(module, QuantLinear):
            module.release()
        model.model.layers.set_submodule(name, QuantLinear(w, act_bits, bias=bias))
        packed[f"model.layers.{name}"] = w
    return packed


class Decoder:
    """Greedy decoding with a static KV cache of ``max_len`` tokens.

    ``prefill`` runs eagerly; ``step`` (one token per sequence) runs under
    ``torch.compile(mode="reduce-overhead", fullgraph=True)`` when ``compile`` is set, which on
    CUDA replays the step as a CUDA graph. Both return (logits [B, V], next ids [B, 1]).
    """

    def __init__(self, model: LlamaForCausalLM, max_len: int, compile: bool) -> None:
        self.model = model
        self.cache = StaticCache(config=model.config, max_cache_len=max_len)
        self.compiled = compile
        if compile:
            torch._dynamo.reset()  # drop earlier models' graphs (else the recompile limit falls back to eager)
            self._step = torch.compile(self._forward, mode="reduce-overhead", fullgraph=True)
        else:
            self._step = self._forward

    def _forward(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids=ids, past_key_values=self.cache, use_cache=True, logits_to_keep=1)
        logits = out.logits[:, -1]
        return logits, logits.argmax(-1, keepdim=True)

    def prefill(self, prompt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self._forward(prompt)

    def step(self, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if self.compiled:
            torch.compiler.cudagraph_mark_step_begin()  # outputs of the last replay are consumed
        logits, ids = self._step(ids)
        return logits, ids.clone()


@torch.no_grad()
def generate(model: LlamaForCausalLM, prompt: torch.Tensor, new_tokens: int,
             compile: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy continuation of ``prompt`` [B, L]: (token ids [B, new_tokens], logits [B, new_tokens, V])."""
    dec = Decoder(model, prompt.shape[1] + new_tokens, compile)
    logits, ids = dec.prefill(prompt)
    out = [(logits.clone(), ids)]
    for _ in range(new_tokens - 1):
        logits, ids = dec.step(ids)
        out.append((logits.clone(), ids))
    return torch.cat([i for _, i in out], 1), torch.stack([lg for lg, _ in out], 1)


@torch.no_grad()
def time_decode(model: LlamaForCausalLM, prompt: torch.Tensor, tokens: int, warmup: int,
                compile: bool) -> tuple[float, float]:
    """Seconds for ``tokens`` greedy steps after the prefill and ``warmup`` untimed steps,
    and seconds spent before them (prefill, warmup, compilation)."""
    sync = torch.cuda.synchronize if prompt.device.type == "cuda" else (lambda: None)
    t0 = time.perf_counter()
    dec = Decoder(model, prompt.shape[1] + warmup + tokens, compile)
    _, ids = dec.prefill(prompt)
    for _ in range(warmup):
        _, ids = dec.step(ids)
    sync()
    t = time.perf_counter()
    for _ in range(tokens):
        _, ids = dec.step(ids)
    sync()
    return time.perf_counter() - t, t - t0


def bench(config: LlamaConfig, device: str, dtype: torch.dtype, batches: list[int], tokens: int,
          prompt_len: int, warmup: int, compile: bool, variants: list[Variant] | None = None) -> list[dict]:
    """Decode speed of the dense model, then of each quantized variant swapped into the same model."""
    variants = [Variant(DTYPE_NAMES[dtype])] + (
        QUANTIZED if variants is None else variants)
    gen = torch.Generator().manual_seed(1)
    prompt = torch.randint(0, config.vocab_size, (max(batches), prompt_len), generator=gen).to(device)
    model = build_model(config, device, dtype)
    rows, dense = [], {}
    total = len(variants) * len(batches)
    for variant in variants:
        if variant.bits is not None:
            torch._dynamo.reset()  # the last variant's graphs hold its weights
            swap_linears(model, variant.bits, variant.group_size, variant.act_bits)
            gc.collect()
            if device == "cuda":
                torch.cuda.empty_cache()
        for batch in batches:
            if device == "cuda":
                torch.cuda.reset_peak_memory_stats()
            t, t_setup = time_decode(model, prompt[:batch], tokens, warmup, compile)
            r = dict(variant=variant.name, batch=batch, tokens_per_s=batch * tokens / t, ms_per_step=1e3 * t / tokens)
            if device == "cuda":
                r["peak_gib"] = torch.cuda.max_memory_allocated() / 2**30
            dense.setdefault(batch, r["tokens_per_s"])
            r["speedup"] = r["tokens_per_s"] / dense[batch]
            rows.append(r)
            print(f"[{len(rows)}/{total}] {variant.name:11s} batch {batch:3d}: {r['tokens_per_s']:10.1f} tokens/s "
                  f"{r['ms_per_step']:8.2f} ms/step  x{r['speedup']:.2f} vs dense  (prefill+warmup {t_setup:.0f} s)", flush=True)
    return rows


def versions() -> dict:
    import transformers

    v = dict(torch=torch.__version__, transformers=transformers.__version__, cuda=torch.version.cuda)
    try:
        import triton

        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def render(results: dict) -> str:
    lines = ["# Decode benchmark", "",
             "Generated by `benchmarks/decode.py`: greedy decode of a transformers Llama with Llama-3-8B shapes "
             "and random weights (static KV cache; on CUDA the decode step under torch.compile reduce-overhead, "
             "i.e. CUDA graphs), decoder linears swapped for LoaQ's kernels; lm_head and embeddings dense. "
             "Speedup: over the dense model at the same batch, measured in the same run. Goals (issue #6): "
             "W4 ≥ 2.3× and W2 ≥ 3.5× fp16 at batch 1.", ""]
    for device, sec in sorted(results.items()):
        meta = sec["meta"]
        lines += [f"## {device}: {meta['device_name']}", "", f"- command: `{sec['command']}`",
                  f"- date: {sec['date']}", f"- host: {sec['host']}"]
        lines += [f"- {key}: {val}" for key, val in meta.items() if key != "device_name"]
        peak = all("peak_gib" in r for r in sec["rows"])
        lines += ["", "| variant | batch | tokens/s | ms/step | speedup |" + (" peak GiB |" if peak else "") + " goal |",
                  "|---|---:|---:|---:|---:|" + ("---:|" if peak else "") + "---|"]
        for r in sec["rows"]:
            goal = GOALS.get((r["variant"], r["batch"]))
            cell = "" if goal is None else f"≥ {goal} ({'met' if r['speedup'] >= goal else 'missed'})"
            lines.append(f"| {r['variant']} | {r['batch']} | {r['tokens_per_s']:.1f} | {r['ms_per_step']:.2f} | "
                         f"{r['speedup']:.2f} |" + (f" {r['peak_gib']:.1f} |" if peak else "") + f" {cell} |")
        lines.append("")
    return "\n".join(lines)


def write_results(out: Path, device: str, meta: dict, rows: list[dict]) -> None:
    """Merge this run into ``<out>/decode.json`` under ``device`` and re-render ``decode.md``.

    A run with the same settings (``meta``) on the same device name keeps the earlier run's rows
    for the batch sizes it did not measure (e.g. ``--batch 1`` and ``--batch 16`` as two calls,
    each with its own dense baseline); any other earlier section for ``device`` is replaced.
    """
    date, cmd = utc_date(), command()
    out.mkdir(parents=True, exist_ok=True)
    path = out / "decode.json"
    results = json.loads(path.read_text()) if path.exists() else {}
    old = results.get(device)
    if old and old["meta"] == meta:
        batches = {r["batch"] for r in rows}
        kept = [r for r in old["rows"] if r["batch"] not in batches]
        if kept:
            names = list(dict.fromkeys(r["variant"] for r in rows + kept))
            rows = sorted(kept + rows, key=lambda r: (names.index(r["variant"]), r["batch"]))
            date, cmd = f"{old['date']}; {date}", f"{old['command']}; {cmd}"
    results[device] = dict(meta=meta, rows=rows, date=date, host=platform.node(), command=cmd)
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(results, indent=1) + "\n")
    tmp.replace(path)
    (out / "decode.md").write_text(render(results))
    print(f"wrote {path} and {out / 'decode.md'}")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", choices=["cuda", "cpu"], default="cuda")
    parser.add_argument("--tiny", action="store_true", help="a small config (smoke run, tests); writes nothing")
    parser.add_argument("--layers", type=int, default=None, help="decoder layers (default: the config's, 32)")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--tokens", type=int, default=128, help="timed decode steps per variant and batch")
    parser.add_argument("--prompt", type=int, default=128, help="prompt length (prefill, not timed)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed decode steps (compile, graph capture)")
    parser.add_argument("--compile", action=argparse.BooleanOptionalAction, default=None,
                        help="torch.compile the decode step (default: on for cuda, off for cpu)")
    parser.add_argument("--threads", type=int, default=None, help="CPU threads (default: torch's)")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    args = parser.parse_args(argv)
    try:
        if args.device == "cuda" and not torch.cuda.is_available():
            raise LoaQError("CUDA is not available here; run on a GPU machine, or `--device cpu --tiny` for a smoke run")
        if min(args.batch) < 1 or args.tokens < 1 or args.prompt < 1 or args.warmup < 0:
            raise LoaQError("--batch, --tokens and --prompt must be positive and --warmup non-negative")
        if args.layers is not None and args.layers < 1:
            raise LoaQError(f"--layers {args.layers}: need at least one decoder layer")
    except LoaQError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
    if args.threads:
        torch.set_num_threads(args.threads)
    compile = args.device == "cuda" if args.compile is None else args.compile
    dtype = torch.float16 if args.device == "cuda" else torch.bfloat16  # the CPU kernels' native dtype
    config = llama_config(args.tiny, args.layers)
    rows = bench(config, args.device, dtype, args.batch, args.tokens, args.prompt, args.warmup, compile)
    if args.tiny:
        print("tiny config: smoke run, nothing written")
        return
    name = torch.cuda.get_device_name() if args.device == "cuda" else cpu_model()
    meta = dict(device_name=name, dtype=DTYPE_NAMES[dtype], compile=compile,
                layers=config.num_hidden_layers, prompt=args.prompt, tokens=args.tokens, warmup=args.warmup,
                weights="random", **versions())
    write_results(args.out, args.device, meta, rows)


if __name__ == "__main__":
    main()
