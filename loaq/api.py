"""The Python API: one typed function per job. The CLI, ``loaq search`` and the benchmarks call these.

    import loaq
    from loaq import Calibration, QuantConfig, Method, GridSpec

    run = loaq.quantize("path/to/model", QuantConfig(spec=GridSpec(4, 64), method=Method("loaq")),
                        Calibration(nsamples=32, seqlen=512), out="runs/w4", export="runs/w4-ct")
    m = loaq.load("runs/w4-ct")                      # runs as the vLLM plugin serves it
    print(loaq.evaluate(m)["ppl"])

:func:`quantize` owns resolve → architecture check → load → rotate (``config.rotation``) → calibration
windows → the two-stream pipeline (:mod:`loaq.pipeline`) → native checkpoint (:mod:`loaq.checkpoint`)
→ export (:mod:`loaq.export`). Every user mistake it can see before the heavy work (paths, settings,
group sizes, an existing output) is refused first, with one line, and nothing is written.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from loaq.config import Calibration, QuantConfig
from loaq.errors import LoaQError
from loaq.recipe import Recipe, build, from_mapping, load_recipe
from loaq.streams import StreamOptions


@dataclass(frozen=True)
class Evaluation:
    """Perplexity text: ``text`` (``None``: the default corpus's evaluation split; or a file like
    calibration's), the first ``tokens`` tokens in windows of ``seqlen`` (DATA.md's ppl16k)."""

    text: str | None = None
    tokens: int = 16384
    seqlen: int = 512

    def __post_init__(self):
        if self.tokens < 1 or self.seqlen < 2:
            raise LoaQError(f"evaluation needs --eval-tokens ≥ 1 and --eval-seqlen ≥ 2, got {self.tokens} and "
                            f"{self.seqlen}")


@dataclass
class QuantizeResult:
    """What :func:`quantize` did: the quantized model (simulating the deployed one), its per-linear codes,
    the metadata written to ``loaq.json``, the paths written and the seconds per step.

    After a lazy load (``load="lazy"``) nothing whole was ever in memory: ``results`` reads each linear's
    codes from ``out`` when asked (in memory without ``out``), and ``model`` is built on first access
    (the native checkpoint loaded, or the source model with the codes written in)."""

    _model: nn.Module | None
    tokenizer: object
    results: dict
    meta: dict
    recipe: Recipe
    out: str | None = None
    export: str | None = None
    rotation: object = None
    timings: dict = field(default_factory=dict)
    _build: object = None  # () -> model, for a lazy run

    @property
    def model(self) -> nn.Module:
        if self._model is None and self._build is not None:
            self._model = self._build()
        return self._model

    @property
    def ppl(self) -> float | None:
        return (self.meta.get("eval") or {}).get("ppl")

    @property
    def fp_ppl(self) -> float | None:
        return (self.meta.get("eval") or {}).get("fp_ppl")


@dataclass
class Loaded:
    """A model :func:`load` made runnable: ``kind`` is ``fp``, ``native`` (dequantized, with its online
    R4 and W4A4 hooks) or ``export`` (compressed-tensors, decompressed, the same hooks); ``label`` names
    method/bits/group for tables; ``meta`` is the native ``loaq.json`` (empty otherwise)."""

    model: nn.Module
    tokenizer: object
    arch: object
    kind: str
    source: str
    label: dict
    meta: dict = field(default_factory=dict)


def as_recipe(config: QuantConfig | Recipe | str | dict | None, calibration: Calibration | None = None) -> Recipe:
    """A :class:`Recipe` from a config, a recipe, a recipe file or a recipe-shaped dict; ``calibration``
    replaces the recipe's."""
    if isinstance(config, Recipe):
        rec = config
    elif isinstance(config, QuantConfig):
        rec = Recipe(config, Calibration())
    elif isinstance(config, str):
        rec = load_recipe(config)
    elif isinstance(config, dict):
        rec = build(from_mapping(config))
    elif config is None:
        rec = build()
    else:
        raise LoaQError(f"config must be a QuantConfig, a Recipe, a recipe path or dict, got {type(config).__name__}")
    if calibration is not None and not isinstance(calibration, torch.Tensor):
        rec = Recipe(rec.config, calibration, rec.model, None)
    return rec


def calibration_windows(tokenizer, cal: Calibration) -> torch.Tensor:
    """``[nsamples, seqlen]`` token windows of ``cal`` (random offsets drawn with ``cal.seed``)."""
    from loaq import data

    ids = data.calibration_ids(data.CalibSource(cal.source, cal.split, cal.field, cal.chat), tokenizer)
    return data.random_windows(ids, cal.nsamples, cal.seqlen, cal.seed)


def eval_windows(tokenizer, ev: Evaluation) -> torch.Tensor:
    """Non-overlapping perplexity windows of ``ev`` (GPTQ's protocol)."""
    from loaq import data

    text = data.read_text(ev.text) if ev.text else data.default_split("eval")
    return data.eval_windows(data.tokenize(tokenizer, text), ev.seqlen, ev.tokens)


def work_dir(out: str) -> str:
    """The per-layer store of an unfinished run writing ``out`` (what ``resume`` continues)."""
    return out.rstrip("/") + ".partial"


def _check_outputs(out: str | None, export: str | None, force: bool, resume: bool) -> str | None:
    """The per-layer work directory of ``out`` after refusing outputs that exist (unless ``force``) or
    cannot be written."""
    from loaq.checkpoint import check_output

    if out is None:
        if export or resume:
            raise LoaQError("export and resume need out=DIR (the native checkpoint they read and write)")
        return None
    work = work_dir(out)
    for path in (out, export) if export else (out,):
        _check_writable(path)
        if force and os.path.exists(path) and not os.path.isdir(path):
            raise LoaQError(f"output {path!r} is a file, not a directory; remove it or choose another path")
    if export and os.path.abspath(export) == os.path.abspath(out):
        raise LoaQError(f"out and export are the same directory {out!r}; give the export its own directory")
    if not force:
        check_output(out, False)
        if export:
            check_output(export, False)
        if os.path.exists(work) and not resume:
            raise LoaQError(f"an interrupted run is in {work!r}; pass --resume to continue it or --force to start over")
    elif os.path.exists(work) and not resume:
        shutil.rmtree(work)
    return work


def _existing_parent(path: str) -> str:
    """The nearest ancestor of output ``path`` that exists (its parents are created when it is written)."""
    parent = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(parent):
        parent = os.path.dirname(parent)
    return parent


def _check_writable(path: str) -> None:
    """Refuse output ``path`` when the directory it would be created in is a file or cannot be written
    (a probe directory is created there and removed)."""
    parent = _existing_parent(path)
    if not os.path.isdir(parent):
        raise LoaQError(f"output {path!r} cannot be created: {parent!r} is a file, not a directory; choose another path")
    try:
        os.rmdir(tempfile.mkdtemp(prefix=".loaq-probe-", dir=parent))
    except OSError as e:
        raise LoaQError(f"output {path!r} cannot be written: {parent!r} is not writable ({e.strerror}); choose "
                        "another path or fix its permissions") from None


def output_bytes(config, cfg: QuantConfig, calib_tokens: int, export_dtype: str | None) -> tuple[int, int]:
    """(native checkpoint + per-layer store, compressed-tensors export) bytes a run writes, from the model
    config alone (``calib_tokens``: the calibration windows' size). Conservative: lm_head counted untied, the store's codes and both streams counted whole,
    unquantized tensors as float32 in the checkpoint."""
    from loaq.arch import input_widths

    h, i, n = config.hidden_size, config.intermediate_size, config.num_hidden_layers
    heads, kv = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    hd = input_widths(config)["o_proj"] // heads
    experts, mi = getattr(config, "num_experts", 0) or 0, getattr(config, "moe_intermediate_size", 0)
    mlp = [(mi, h), (mi, h), (h, mi)] * experts if experts else [(i, h), (i, h), (h, i)]  # MoE: every expert's
    shapes = [(heads * hd, h), (kv * hd, h), (kv * hd, h), (h, heads * hd), *mlp]  # [out, in]
    g = cfg.spec.group_size
    weights = n * sum(o * k for o, k in shapes)
    groups = n * sum(o * (k // g if g else 1) for o, k in shapes)  # scale + zero per (row, group)
    other = 2 * config.vocab_size * h + (2 * n + 1) * h  # embeddings, lm_head, norms
    streams = 2 * calib_tokens * h * 4  # the float and the quantized stream of the store
    native = 2 * (weights + 8 * groups) + 4 * other + streams  # codes (uint8) in the checkpoint and the store
    from loaq.export import DTYPES

    width = DTYPES[export_dtype].itemsize if export_dtype else 0
    export = (weights * cfg.spec.bits // 8 + 8 * groups + width * other) if width else 0
    return native, export


def _check_space(out: str | None, export: str | None, sizes: tuple[int, int]) -> None:
    """Refuse a run whose outputs do not fit in the free space of their filesystems."""
    need: dict[int, tuple[str, int]] = {}
    for path, size in ((out, sizes[0]), (export, sizes[1])):
        if path:
            parent = _existing_parent(path)
            dev = os.stat(parent).st_dev
            need[dev] = (need.get(dev, (parent, 0))[0], need.get(dev, (parent, 0))[1] + size)
    for parent, size in need.values():
        free = shutil.disk_usage(parent).free
        if free < size:
            raise LoaQError(f"{parent!r} has {free / 2**30:.2f} GiB free but this run writes about {size / 2**30:.2f} "
                            "GiB there (checkpoint, per-layer store, export); free some space or choose another path")


def check_batch_size(batch_size: int) -> None:
    if batch_size < 1:
        raise LoaQError(f"--batch-size {batch_size} is not positive; use ≥ 1 windows per forward (default 8)")


def check_model(model: str | nn.Module | None, cfg: QuantConfig):
    """Refuse a model ``cfg`` cannot quantize (path, architecture, group size) before any weight loads;
    returns (the resolved :class:`loaq.models.Source` of a path, or ``None`` for a loaded module; its config)."""
    from loaq.arch import arch_of, input_widths
    from loaq.grids import check_group_size
    from loaq.models import load_config, resolve

    if isinstance(model, nn.Module):
        config, src = model.config, None
    else:
        src = resolve(model)
        config = load_config(src)
    arch = arch_of(config)
    from loaq.moe import check_moe

    check_moe(arch, config, cfg)
    if cfg.rotation.kind != "none":
        from loaq.rotation import check_rotatable

        check_rotatable(arch)
    check_group_size(cfg.spec, input_widths(config))
    return src, config


def quantize(model: str | nn.Module | None = None, config: QuantConfig | Recipe | str | dict | None = None,
             calibration: Calibration | torch.Tensor | None = None, out: str | None = None, *, tokenizer=None,
             export: str | None = None, export_dtype: str = "bfloat16", device: str = "cpu", batch_size: int = 8,
             resume: bool = False, force: bool = False, evaluation: Evaluation | None = None,
             progress: bool = True, sensitivity: dict | None = None,
             streams: StreamOptions = StreamOptions(), load: str = "lazy") -> QuantizeResult:
    """Quantize ``model`` and (with ``out``) write its native checkpoint, (with ``export``) its
    compressed-tensors export.

    - ``model``: a local HF directory, a ``.gguf`` file, a hub id, ``None`` (the recipe's model, else the
      default SmolLM2-135M-Instruct), or a loaded causal LM (with ``tokenizer``; it is quantized in place);
    - ``config``: :class:`QuantConfig`, :class:`Recipe`, a recipe file / finished run, a recipe dict, or
      ``None`` (defaults: LoaQ W3 per channel);
    - ``calibration``: :class:`Calibration` (overrides the recipe's), or ready ``[n, L]`` token windows;
    - ``resume`` continues an interrupted run from its per-layer checkpoints in ``out + ".partial"``;
    - ``evaluation`` also measures fp and quantized perplexity (recorded in ``loaq.json``); after a lazy
      load both are measured one layer at a time (:func:`loaq.lazy.streamed_perplexity`, the same numbers);
    - ``sensitivity``: with ``config.allocation`` (``--target-bits``), an earlier run's ``meta["allocation"]``
      (same model, calibration and method) whose measured per-linear errors are reused for this budget;
    - ``streams`` (:class:`loaq.streams.StreamOptions`): where the calibration streams live (``offload``
      device/cpu/disk), their storage and compute dtypes, how often ``resume`` state saves them;
    - ``load``: ``"lazy"`` (default) reads each decoder layer of a model path only while it is quantized
      (:mod:`loaq.lazy`: memory does not grow with depth); ``"eager"`` loads the whole float32 model first.
      A loaded module is always eager, and so are runs that need the whole model before the pipeline
      (``alpha``/``beta`` ``auto``, ``--target-bits``) and mixture-of-experts models (logged).
    """
    import loaq
    from loaq.checkpoint import LayerStore
    from loaq.metrics import perplexity
    from loaq.lazy import check_load
    from loaq.pipeline import quantize_model

    t_start = time.time()
    rec = as_recipe(config, calibration)
    cfg = rec.config
    check_batch_size(batch_size)
    check_load(load)
    from loaq.export import DTYPES

    if export_dtype not in DTYPES:
        raise LoaQError(f"export dtype {export_dtype!r} is unknown; use {', '.join(DTYPES)}")
    work = _check_outputs(out, export, force, resume)
    model = model if model is not None else rec.model
    src, model_config = check_model(model, cfg)
    if out:
        tokens = calibration.numel() if isinstance(calibration, torch.Tensor) else \
            rec.calibration.nsamples * rec.calibration.seqlen
        _check_space(out, export, output_bytes(model_config, cfg, tokens, export_dtype if export else None))
    if isinstance(model, nn.Module) and tokenizer is None:
        raise LoaQError("quantize(<a loaded model>) needs tokenizer=<its tokenizer>")
    calibrated = cfg.method.rule.solve is not None
    if calibrated and not isinstance(calibration, torch.Tensor) and rec.calibration.source:
        from loaq import data

        data.check_source(rec.calibration.source)  # a bad path fails before the weights load
    timings = {}
    weights = None
    load = _eager_when_needed(load, cfg, model_config)
    if src is None:
        from loaq.arch import arch_of

        from loaq.moe import unfuse

        m, tok, arch, label = model, tokenizer, arch_of(model.config), getattr(model, "name_or_path", "")
        unfuse(m, arch)
    elif load == "lazy":
        from loaq.arch import arch_of
        from loaq.lazy import LazyWeights, skeleton
        from loaq.models import load_tokenizer, skeleton_config

        t0 = time.time()
        m = skeleton(skeleton_config(src))
        arch, tok, label = arch_of(m.config), load_tokenizer(src), src.label
        weights = LazyWeights(src, m, arch, cfg.rotation.seed if cfg.rotation.kind == "hadamard" else None,
                              cfg.rotation.r4_blocks)
        timings["load"] = time.time() - t0
    else:
        from loaq.models import load_model

        t0 = time.time()
        m, tok, arch, _ = load_model(src)
        timings["load"] = time.time() - t0
        label = src.label
    if isinstance(calibration, torch.Tensor):
        calib = calibration
    elif calibrated:
        calib = calibration_windows(tok, rec.calibration)
    else:
        calib = torch.zeros(1, 1, dtype=torch.long)  # round to nearest reads no data
    calib_hash = hashlib.sha256(calib.numpy().tobytes()).hexdigest()[:16] if calibrated else None
    if calibrated and rec.calib_hash and rec.calib_hash != calib_hash:
        import logging

        logging.getLogger(__name__).warning("the calibration tokens differ from the recipe's run (hash %s, now %s): "
                                            "the codes will not reproduce it", rec.calib_hash, calib_hash)
    if evaluation is not None:
        windows = eval_windows(tok, evaluation)
        if weights is None:
            fp_ppl = perplexity(m, windows, batch_size)
        else:  # the unrotated float model, as the eager path measures it
            from loaq.lazy import LazyWeights, skeleton, streamed_perplexity
            from loaq.models import skeleton_config

            fp = skeleton(skeleton_config(src))
            fp_ppl = streamed_perplexity(LazyWeights(src, fp, arch), windows, batch_size)
            del fp
    rotation = None
    if weights is not None:
        rotation = weights.rotation()
    elif cfg.rotation.kind == "hadamard":
        from loaq.rotation import rotate_model

        rotation = rotate_model(m, arch, cfg.rotation.seed, cfg.rotation.r4_blocks)
    auto = {}
    if cfg.method.auto:  # α/β chosen on held-out calibration windows; the run records the chosen numbers
        from loaq.auto import choose

        cfg, auto = choose(m, arch, calib, cfg, batch_size=batch_size, device=device, progress=progress,
                           weights=weights)
        timings["auto"] = auto["seconds"]
        rec = Recipe(cfg, rec.calibration, rec.model, rec.calib_hash)
    store = LayerStore(work, cfg.digest(calib_hash, streams.digest_fields()), cfg.spec,
                       stream_every=streams.checkpoint_every) if work else None
    specs, alloc_meta = None, None
    t0 = time.time()
    try:
        if cfg.allocation.enabled:
            specs, alloc_meta = _allocate(m, arch, calib, cfg, store, batch_size, device, progress, sensitivity)
            timings["allocate"] = time.time() - t0
            t0 = time.time()
        results = quantize_model(m, arch, calib, cfg, batch_size=batch_size, device=device, store=store,
                                 progress=progress, specs=specs, streams=streams, weights=weights)
    except BaseException:
        if store is not None and not store.finished():  # no layer finished: nothing to resume from
            shutil.rmtree(work, ignore_errors=True)
        raise
    timings["quantize"] = time.time() - t0
    cal_meta = None
    if calibrated:
        cal_meta = (rec.calibration.meta(calib_hash) if not isinstance(calibration, torch.Tensor) else
                    {"source": "token windows", "nsamples": calib.shape[0], "seqlen": calib.shape[1], "hash": calib_hash})
    meta = {
        "config": cfg.to_dict(),
        "calibration": cal_meta,
        "source_model": label,
        "arch": m.config.architectures[0],
        "versions": {"loaq": loaq.__version__, "torch": torch.__version__,
                     "transformers": __import__("transformers").__version__},
        "quant_seconds": round(timings["quantize"], 2),
        "activations": cfg.act.meta(),
        "streams": {"device": str(device), "offload": streams.offload, "dtype": streams.dtype,
                    "compute_dtype": streams.compute_dtype},
    }
    if specs is not None:
        meta["layer_specs"] = {n: dataclasses.asdict(s) for n, s in sorted(specs.items())}
        meta["allocation"] = alloc_meta | {"seconds": alloc_meta["seconds"] | {"total": round(timings["allocate"], 2)}}
    if auto:
        meta["auto"] = auto
    if evaluation is not None:
        if weights is None:
            q_ppl = perplexity(m, windows, batch_size)
        else:
            from loaq.lazy import streamed_perplexity

            q_ppl = streamed_perplexity(weights, windows, batch_size, _quantized_layers(store, results, cfg, arch))
        meta["eval"] = {"ppl": q_ppl, "fp_ppl": fp_ppl, "tokens": int(windows.numel()), "seqlen": evaluation.seqlen}
    if out:
        _write_outputs(out, export, export_dtype, force, m, tok, results, meta, rotation, timings, store,
                       weights.rest_tensors() if weights is not None else None)
        shutil.rmtree(work, ignore_errors=True)
    timings["total"] = time.time() - t_start
    build = None
    if weights is not None:
        m = None
        if out:
            from loaq.shards import NativeResults

            results = NativeResults(out)
            build = lambda: _native_model(out)  # noqa: E731
        else:
            build = lambda: _eager_quantized(src, arch, results, cfg)  # noqa: E731
    return QuantizeResult(m, tok, results, meta, rec, out, export, rotation, timings, build)


def _eager_when_needed(load: str, cfg: QuantConfig, config) -> str:
    """``"eager"`` for runs that need the whole float model before the pipeline (``--target-bits``)
    and for mixture-of-experts models (transformers fuses their experts in memory; :mod:`loaq.moe` splits them)."""
    from loaq.arch import arch_of

    why = ("--target-bits" if cfg.allocation.enabled else
           "a mixture-of-experts model" if arch_of(config).num_experts(config) else None)
    if load == "lazy" and why:
        import logging

        logging.getLogger(__name__).info("loading the whole model (--load eager) for %s", why)
        return "eager"
    return load


def _allocate(m, arch, calib, cfg, store, batch_size, device, progress, sensitivity):
    """Per-linear grids of ``cfg.allocation`` (:mod:`loaq.allocation`); a resumed run reuses the stored choice."""
    from loaq import allocation

    meta = store.load_json("allocation.json") if store is not None else None
    if meta is not None:
        specs = allocation.specs_from_meta(meta, cfg.spec)
    else:
        specs, meta = allocation.allocate(m, arch, calib, cfg, batch_size=batch_size, device=device, progress=progress,
                                          sensitivity=sensitivity)
    if store is not None:
        store.save_json("allocation.json", meta)
        store.specs = specs  # a resumed run's finished layers dequantize on their own grids
    return specs, meta


def _native_model(out: str) -> nn.Module:
    from loaq.checkpoint import load_native

    return load_native(out)[0]


def _quantized_layers(store, results, cfg: QuantConfig, arch):
    """``(i, layer) -> None``: write layer ``i``'s quantized weights (from ``store`` or ``results``) into ``layer``."""
    from loaq.checkpoint import dequantized

    def put(i: int, layer: nn.Module) -> None:
        prefix = f"{arch.layers}.{i}."
        mine = store.layer_results(i) if store is not None else {n: r for n, r in results.items() if n.startswith(prefix)}
        for name, r in mine.items():
            layer.get_submodule(name.removeprefix(prefix)).weight.data.copy_(dequantized(r, cfg.spec))

    return put


def _eager_quantized(src, arch, results: dict, cfg: QuantConfig) -> nn.Module:
    """The whole quantized model of a lazy run without ``out``: the source loaded (and rotated) with the codes in."""
    from loaq import actquant
    from loaq.checkpoint import dequantized
    from loaq.models import load_model

    model = load_model(src)[0]
    if cfg.rotation.kind == "hadamard":
        from loaq.rotation import rotate_model

        rotate_model(model, arch, cfg.rotation.seed, cfg.rotation.r4_blocks)
    for name, r in results.items():
        model.get_submodule(name).weight.data.copy_(dequantized(r, cfg.spec))
    for layer in arch.decoder_layers(model):
        actquant.attach([layer.get_submodule(n) for n in arch.layer_linears(layer)], cfg.act)
    return model


def _write_outputs(out, export, export_dtype, force, model, tok, results, meta, rotation, timings, store=None,
                   rest=None) -> None:
    """The native checkpoint, then the export; if either fails, no ``out`` is left (the finished per-layer
    store stays, so ``resume`` writes both again without quantizing)."""
    from loaq.checkpoint import save_native

    try:
        t0 = time.time()
        save_native(out, model, tok, results, meta, force=True, rotation=rotation, store=store, rest=rest)
        timings["save"] = time.time() - t0
        if export:
            from loaq.export import DTYPES
            from loaq.export.writer import export as write_export

            t0 = time.time()
            write_export(out, export, dtype=DTYPES[export_dtype], force=force)
            timings["export"] = time.time() - t0
    except BaseException:
        if "save" in timings:
            shutil.rmtree(out, ignore_errors=True)
        raise


def load(path: str | None = None, dtype: torch.dtype = torch.float32) -> Loaded:
    """A runnable model from ``path``: a native checkpoint (``loaq quantize --out``), a compressed-tensors
    export (with its online R4 and W4A4 activations as the plugin serves them), or a float model (HF
    directory, ``.gguf``, hub id; ``None`` = the default model)."""
    from loaq.arch import arch_of

    if path and os.path.isfile(os.path.join(path, "loaq.json")):
        from loaq.checkpoint import load_native

        model, tok, meta = load_native(path, dtype)
        c = meta["config"]
        bits = round(meta["allocation"]["avg_bits"], 3) if meta.get("allocation") else c["spec"]["bits"]
        label = dict(method=c["method"]["name"], bits=bits, group=c["spec"]["group_size"])
        return Loaded(model, tok, arch_of(model.config), "native", meta["source_model"], label, meta)
    from loaq.models import load_config, load_model, resolve

    src = resolve(path)
    if not src.gguf_file and getattr(load_config(src), "quantization_config", None) is not None:
        from loaq.export.check import parse_quantization_config
        from loaq.export.load import load_export

        model, tok = load_export(src.directory, dtype)
        w = next(iter(parse_quantization_config(src.directory).config_groups.values())).weights
        label = dict(method="-", bits=w.num_bits, group=w.group_size or 0)
        return Loaded(model, tok, arch_of(model.config), "export", src.label, label)
    model, tok, arch, src = load_model(src, dtype)
    return Loaded(model, tok, arch, "fp", src.label, dict(method="-", bits=32, group="-"))


def evaluate(model: Loaded | str | nn.Module | None = None, tokenizer=None, *,
             evaluation: Evaluation | None = Evaluation(), tasks: list[str] | None = None, limit: int | None = None,
             tasks_dir: str | None = None, batch_size: int = 8, progress: bool = False) -> dict:
    """Perplexity (``evaluation``; ``None`` skips it) and zero-shot accuracy (``tasks``, through
    lm-evaluation-harness) of a model: a :class:`Loaded`, a path :func:`load` takes, or a module with
    ``tokenizer``. Returns ``{"ppl", "eval_tokens", "eval_seqlen", "zero_shot"}`` (absent parts ``None``)."""
    from loaq.metrics import perplexity

    check_batch_size(batch_size)
    if tasks:
        check_tasks(tasks, tasks_dir)
    if model is None or isinstance(model, str):
        model = load(model)
    if isinstance(model, Loaded):
        model, tokenizer = model.model, model.tokenizer
    if tokenizer is None:
        raise LoaQError("evaluate(<a module>) needs tokenizer=<its tokenizer>")
    out = {"ppl": None, "eval_tokens": None, "eval_seqlen": None, "zero_shot": None}
    if evaluation is not None:
        windows = eval_windows(tokenizer, evaluation)
        out.update(ppl=perplexity(model, windows, batch_size, progress=progress), eval_tokens=int(windows.numel()),
                   eval_seqlen=evaluation.seqlen)
    if tasks:
        from loaq.zeroshot import evaluate_tasks, hf_lm

        z = evaluate_tasks(hf_lm(model, tokenizer, batch_size), tasks, limit, tasks_dir)
        out["zero_shot"] = {k: v for k, v in z.items() if k != "loglikelihoods"}
    return out


def evaluate_server(url: str, served_model: str, tasks: list[str], *, tokenizer: str | None = None,
                    limit: int | None = None, tasks_dir: str | None = None, batch_size: int = 8) -> dict:
    """Zero-shot accuracy of a running OpenAI-compatible server (vLLM) serving ``served_model``."""
    from loaq.zeroshot import evaluate_tasks, served_lm

    check_tasks(tasks, tasks_dir)
    z = evaluate_tasks(served_lm(url, served_model, tokenizer or served_model, batch_size), tasks, limit, tasks_dir)
    return {k: v for k, v in z.items() if k != "loglikelihoods"}


def check_tasks(tasks: list[str], tasks_dir: str | None) -> None:
    """Fail before any model loads when a task's prepared data is missing."""
    from loaq.tasks import task_config

    for t in tasks:
        task_config(t, tasks_dir)


def layer_mse(quantized: Loaded, calibration: Calibration = Calibration(nsamples=16, seqlen=512, seed=1234),
              batch_size: int = 4) -> dict:
    """Per-layer hidden-state MSE (the paper's Figures 3/4) of a native checkpoint against its source
    model, in the rotated basis when the checkpoint was rotated (R1 rebuilt from the seed)."""
    from loaq.metrics import hidden_mse, layer_outputs
    from loaq.models import load_model

    if quantized.kind != "native":
        raise LoaQError("the per-layer MSE compares a native checkpoint with its source model; pass --quantized DIR")
    ref, _, _, _ = load_model(quantized.source)
    rotation = quantized.meta.get("rotation")
    if rotation:
        from loaq.rotation import rotate_model

        rotate_model(ref, quantized.arch, rotation["seed"], rotation.get("r4", {}).get("blocks", 1))
    w = calibration_windows(quantized.tokenizer, calibration)
    eps = quantized.model.config.rms_norm_eps
    return hidden_mse(layer_outputs(ref, quantized.arch, w, batch_size),
                      layer_outputs(quantized.model, quantized.arch, w, batch_size), eps)
