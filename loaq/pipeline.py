"""The two-stream layer-wise pipeline (LoaQ Algorithm 1).

1. Catch the decoder's layer-0 inputs (and every layer's attention kwargs) for every calibration batch: ``h = ĥ``.
2. For each decoder layer, only it on the compute device, for each sub-layer (attention, then MLP):
   a. ``W_in`` (q,k,v / gate,up): accumulate ``H`` (and ``C``) from ``x̂ = Norm(ĥ)`` (and ``x = Norm(h)``),
      solve the group once (its members share ``H``), write the quantized weights into the layer;
   b. ``W_out`` (o / down): run the partly quantized sub-layer on ``ĥ`` and the float one on ``h``,
      catching ``X̂``, ``X``; LoaQ rescales tokens by ``s = R(h + XW)``, ``ŝ = R(ĥ + X̂W)`` and adds the
      residual target ``s h - ŝ ĥ``; solve and write back (a sub-layer with a post-norm, Gemma 3's
      sandwich: the terms of :mod:`loaq.sandwich`);
   c. advance the streams: ``h += X W_outᵀ`` (kept from b), ``ĥ += X̂ Qᵀ`` (``X̂`` kept from b, so the
      sub-layer is not run again), each through the post-norm where there is one.
3. After each layer, hand its results to the checkpoint store (and the streams every
   ``checkpoint_every`` layers); ``--resume`` reloads the finished layers, the last saved streams, and
   replays the layers between them forward only (:func:`replay_layer`), so it continues bit-identically.
Single-stream methods (RTN, GPTQ) never build or carry the float stream. Where the streams live
(device, CPU, disk; float32 or bfloat16) is :mod:`loaq.streams`' business: the pipeline only calls
``get(b)``/``set(b, x)``. The layer being quantized runs on ``device``; with a ``compute_dtype`` other
than float32 its forward passes run on a cast copy while the solver reads the float32 weights.

W4A4 (``cfg.act``): once its float copy is taken, each layer's linears get the activation fake
quantizer (:mod:`loaq.actquant`) as input pre-hooks and keep it, so ``X̂``, ``ŝ`` and ``ĥ`` are what the
deployed model computes (``x̂ = Q_a(Norm(ĥ))`` for ``W_in``; ``X̂`` caught after the hooks, behind the
online R4 of a rotated model) while the float stream stays unquantized; the returned model simulates W4A4.
"""

from __future__ import annotations

import copy
import logging
import time
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from loaq import actquant, sandwich
from loaq.arch import Arch, SubLayer, rms_factor
from loaq.checkpoint import dequantized
from loaq.config import QuantConfig
from loaq.errors import LoaQError, check_interrupted
from loaq.grids import rtn as rtn_quantize, dequantize, expand
from loaq.solver import QuantResult, factorize
from loaq.stats import Projected, Stats
from loaq.streams import StreamOptions, Streams

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


def _pass_through(_hidden_states, *_args, **_kwargs):
    return _hidden_states


def capture_inputs(model: nn.Module, arch: Arch, calib: torch.Tensor, batch_size: int, device,
                   sink: Callable[[int, torch.Tensor, list[dict]], None] | None = None) -> tuple[list, list]:
    """Layer-0 hidden states per batch, and the keyword arguments the decoder passes each layer per batch
    (``kwargs[i][b]``): families that mix layer types (Gemma 3's sliding-window and global attention) give
    layers different masks and rotary tables. The layers' own forwards are skipped (each passes its input
    through) and the model stops at the last layer's call, so this costs the embeddings only. With ``sink``
    each batch goes to ``sink(b, h, [kwargs of layer i])`` instead (nothing accumulates on the device)."""
    layers = arch.decoder_layers(model)
    hs, kws = [], [[] for _ in layers]

    def catcher(i):
        def catch(_mod, args, kwargs):
            if i == 0:
                hs.append((args[0] if args else kwargs["hidden_states"]).detach())
            kws[i].append({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")})
            if i == len(layers) - 1:
                raise _Stop
        return catch

    handles = [layer.register_forward_pre_hook(catcher(i), with_kwargs=True) for i, layer in enumerate(layers)]
    for layer in layers[:-1]:
        layer.forward = _pass_through  # an instance attribute over the class method, removed below
    try:
        with torch.no_grad():
            for batch in calib.split(batch_size):
                try:
                    model(batch.to(device), use_cache=False)
                except _Stop:
                    pass
                if sink is not None:
                    b = len(hs) - 1
                    sink(b, hs[b], [kw[b] for kw in kws])
                    hs[b] = None
                    for kw in kws:
                        kw[b] = None
    finally:
        for layer, handle in zip(layers, handles):
            handle.remove()
            layer.__dict__.pop("forward", None)
    return (hs, kws) if sink is None else ([], [])


def _catch_input(linear: nn.Linear, run: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(input of ``linear``, output of ``run()``) for one forward."""
    box = []
    handle = linear.register_forward_pre_hook(lambda _m, args: box.append(args[0].detach()))
    try:
        out = run()
    finally:
        handle.remove()
    return box[0], out


def _set_weight(linear: nn.Linear, Q: torch.Tensor) -> None:
    linear.weight.data.copy_(Q.to(linear.weight.dtype))


def _take_C(stats: Stats) -> torch.Tensor | Projected | None:
    if stats.CW is not None:
        CW, stats.CW = stats.CW, None
        return Projected(CW)
    C, stats.C = stats.C, None
    return C


def _projection(w_out: nn.Linear, master: nn.Linear, m, probe) -> torch.Tensor | None:
    """``Wᵀ`` when ``W_out``'s statistics should keep ``C Wᵀ`` instead of ``C`` (:class:`loaq.stats.Stats`):
    the rule reads only that product, no probe reads ``C``, ``α ≠ 0``, and ``2·out ≤ in`` (``down_proj``)."""
    if not (m.rule.reads_CW and probe is None and m.alpha and 2 * w_out.out_features <= w_out.in_features):
        return None
    return master.weight.detach().T


def solve_group(names: list[str], linears: list[nn.Linear], stats: Stats, cfg: QuantConfig,
                label: str, B: torch.Tensor | None = None, masters: list[nn.Linear] | None = None,
                specs: dict | None = None, probe=None, held: Stats | None = None) -> dict[str, QuantResult]:
    """Quantize linears sharing one input (their rows stacked) with the method's registry rule (:mod:`loaq.methods`),
    on ``specs[names[0]]`` (a per-linear allocation, shared by the group) or ``cfg.spec``.

    ``masters``: the float32 linears of the model when ``linears`` are a cast working copy; the solver
    reads their weights and both get ``Q``. ``probe`` (the allocation's sensitivity measurement) is given the
    group's problem and the held-out ``H`` and solves it (:class:`loaq.allocation.Probe`). Results come back on CPU."""
    m = cfg.method
    spec = (specs or {}).get(names[0], cfg.spec)
    masters = masters or linears
    device = stats.H.device
    W = torch.cat([lin.weight.detach().to(device).float() for lin in masters])
    factor = factorize(stats.H, cfg.solver.percdamp, label, inplace=True)  # stats.H becomes the damped H
    if probe is None:  # nothing reads H after the solve: it may free H and L once it has H⁻¹ (loaq.solver.Factor)
        stats.H, factor.disposable = None, True
    if probe is not None:  # the probe solves every candidate and hands back the one at ``spec``
        res = probe(names, W, factor, stats, B, spec, held)
    else:  # the rule holds the only reference to C, and LLOA/LoaQ free it once the target is formed
        res = m.rule.solve(W, factor, _take_C(stats), B, m, spec, cfg.solver)
    out, row = {}, 0
    for name, lin, master in zip(names, linears, masters):
        n = lin.out_features
        _set_weight(lin, res.Q[row : row + n])
        if master is not lin:
            master.weight.data.copy_(res.Q[row : row + n].to(master.weight.device, master.weight.dtype))
        out[name] = QuantResult(*(t[row : row + n].to("cpu", copy=True) for t in (res.codes, res.scales, res.zeros)))
        row += n
    return out


def _quantize_sublayer(layer: nn.Module, fp_layer: nn.Module | None, sl: SubLayer, streams: Streams,
                       cfg: QuantConfig, eps: float, prefix: str, master: nn.Module, specs: dict | None = None,
                       probe=None, norm_offset: float = 0.0) -> dict[str, QuantResult]:
    m = cfg.method
    two = streams.h is not None
    cdt = streams.opts.torch_compute_dtype
    device = streams.device
    n_fit = len(streams) - streams.held

    def stats_of(b: int, st: Stats, held: Stats | None):
        """``st.add`` for a calibration batch; a held-out one adds only its ``H`` input to ``held``."""
        return st.add if b < n_fit else (lambda x_hat, *_: held.add(x_hat))
    norm = layer.get_submodule(sl.norm)
    mod = layer.get_submodule(sl.module)
    masters = lambda names: [master.get_submodule(sl.module).get_submodule(n) for n in names]  # noqa: E731
    results = {}

    # (a) W_in: inputs are Q_a(Norm(ĥ)) (Q_a = identity unless W4A4) and Norm(h)
    w_in = [mod.get_submodule(n) for n in sl.w_in]
    st = Stats(w_in[0].in_features, cross=two, device=device)
    held = Stats(w_in[0].in_features, device=device) if streams.held else None
    with torch.no_grad():
        for b in range(len(streams)):
            x_hat = cfg.act.quantize(norm(streams.h_hat.get(b).to(cdt)))
            stats_of(b, st, held)(x_hat, norm(streams.h.get(b).to(cdt)) if two else None)
    results |= solve_group([f"{prefix}{sl.module}.{n}" for n in sl.w_in], w_in, st, cfg,
                           f"{prefix}{sl.module}.{','.join(sl.w_in)}", masters=masters(sl.w_in), specs=specs,
                           probe=probe, held=held)
    del st, held

    # (b) W_out: inputs X̂ (quantized W_in on ĥ) and X (float sub-layer on h); the float stream advances
    # here (h += y: y needs nothing quantized), X̂ is kept to advance ĥ once W_out is solved
    w_out = mod.get_submodule(sl.w_out)
    fp_out = fp_layer.get_submodule(sl.module).get_submodule(sl.w_out) if two else None
    use_B = m.rule.output_stats and m.soa and m.beta != 0
    st = Stats(w_out.in_features, cross=two, n_res=w_out.out_features if use_B else 0, device=device,
               project=_projection(w_out, masters([sl.w_out])[0], m, probe))
    held = Stats(w_out.in_features, device=device) if streams.held else None
    with torch.no_grad():
        for b in range(len(streams)):
            h_hat, kw = streams.h_hat.get(b), streams.kwargs(b, cdt)
            # W_out still holds its float weights here, so y_hat = X̂Wᵀ + b (what ŝ needs)
            X_hat, y_hat = _catch_input(w_out, lambda: sl.run(layer, h_hat.to(cdt), kw))
            streams.x_hat.set(b, X_hat)
            add = stats_of(b, st, held)
            if not two:
                add(X_hat)
                continue
            h = streams.h.get(b)
            X, y = _catch_input(fp_out, lambda: sl.run(fp_layer, h.to(cdt), kw))
            h_next = h + sl.finish(fp_layer, y)
            streams.at_layer = None
            streams.h.set(b, h_next)
            if not m.rule.output_stats:
                add(X_hat, X)
                continue
            bias = fp_out.bias if fp_out.bias is not None else 0
            if sl.post_norm is not None:  # sandwich norm: the target of loaq.sandwich
                add(*sandwich.w_out_terms(X_hat, X, h_hat, h, y_hat, y, bias, layer.get_submodule(sl.post_norm),
                                          norm_offset, eps, m.rescale, m.shat != "text"))
                continue
            if use_B:
                h_b, hh_b = h + bias, h_hat + bias
            if m.rescale:
                s = rms_factor(h_next, eps)  # y = XWᵀ + b
                base = h_hat if m.shat == "text" else h
                s_hat = rms_factor(base + y_hat, eps)
                add(s_hat * X_hat, s * X, (s * h_b - s_hat * hh_b) if use_B else None)
            else:
                add(X_hat, X, (h_b - hh_b) if use_B else None)
    if two:  # the float stream is past this sub-layer: its float copy is not read again
        fp_layer.get_submodule(sl.module).to("meta")
    name = f"{prefix}{sl.module}.{sl.w_out}"
    results |= solve_group([name], [w_out], st, cfg, name, st.B, masters=masters([sl.w_out]), specs=specs,
                           probe=probe, held=held)
    del st, held
    _advance_quantized(streams, w_out, cdt, sl, layer)
    return results


def _advance_quantized(streams: Streams, w_out: nn.Linear, cdt: torch.dtype, sl: SubLayer, layer: nn.Module) -> None:
    """(c) ``ĥ += X̂ Qᵀ (+ b)`` with the kept ``X̂`` (it already went through ``W_out``'s input hooks:
    apply the weights only; ``X̂`` does not depend on ``W_out``, so the sub-layer is not run again), through
    the sub-layer's post-norm where it has one."""
    streams.at_layer = None
    with torch.no_grad():
        for b in range(len(streams)):
            X_hat = streams.x_hat.get(b).to(cdt)
            streams.h_hat.set(b, streams.h_hat.get(b) + sl.finish(layer, F.linear(X_hat, w_out.weight, w_out.bias)))


def _working_layer(layer: nn.Module, device, dtype: torch.dtype) -> nn.Module:
    """The module the forward passes run: ``layer`` itself moved to ``device`` (float32), else a copy cast
    to ``dtype`` on ``device`` (``layer`` keeps the float32 weights the solver reads)."""
    if dtype == torch.float32:
        return layer.to(device)
    return copy.deepcopy(layer).to(device, dtype)


def _release(layer: nn.Module, work: nn.Module) -> None:
    if work is layer:
        layer.to("cpu")


def quantize_layer(layer: nn.Module, arch: Arch, streams: Streams, cfg: QuantConfig, eps: float,
                   prefix: str, specs: dict | None = None, probe=None) -> dict[str, QuantResult]:
    """Quantize one decoder layer in place and advance ``streams`` past it (Algorithm 1 lines 3-21);
    ``specs``: per-linear grids (qualified names; others take ``cfg.spec``)."""
    if cfg.method.auto:
        raise LoaQError("alpha/beta 'auto' is chosen over whole runs (loaq.auto.choose, loaq.quantize), not per layer; "
                        "pass numbers to quantize_layer")
    if cfg.method.resets_fp_stream:
        streams.h.copy_from(streams.h_hat)
    work = _working_layer(layer, streams.device, streams.opts.torch_compute_dtype)
    fp_layer = copy.deepcopy(work) if streams.h is not None else None
    _attach_act(work, arch, cfg)
    if work is not layer:
        _attach_act(layer, arch, cfg)
    results = {}
    for sl in arch.sublayers:
        if sl.experts:
            from loaq.moe import quantize_moe  # imports this module's solve_group

            if work is not layer:
                raise LoaQError("--compute-dtype other than float32 is not supported for mixture-of-experts "
                                "layers; drop --compute-dtype")
            results |= quantize_moe(work, fp_layer, sl, streams, cfg, eps, prefix, streams.device)
        else:
            results |= _quantize_sublayer(work, fp_layer, sl, streams, cfg, eps, prefix, layer, specs, probe,
                                          arch.norm_offset)
    _release(layer, work)
    return results


def replay_layer(layer: nn.Module, arch: Arch, streams: Streams, cfg: QuantConfig, results: dict[str, QuantResult],
                 prefix: str, specs: dict | None = None) -> None:
    """Write a finished layer's stored codes into ``layer`` and advance ``streams`` past it, forward only,
    with the same operations as :func:`quantize_layer` (``--resume`` from streams saved before this layer)."""
    if cfg.method.resets_fp_stream:
        streams.h.copy_from(streams.h_hat)
    cdt = streams.opts.torch_compute_dtype
    work = _working_layer(layer, streams.device, cdt)
    fp_layer = copy.deepcopy(work) if streams.h is not None else None
    for n in arch.layer_linears(layer):
        Q = dequantized(results[prefix + n], (specs or {}).get(prefix + n, cfg.spec))
        _set_weight(work.get_submodule(n), Q.to(streams.device))
        if work is not layer:
            _set_weight(layer.get_submodule(n), Q)
    _attach_act(work, arch, cfg)
    if work is not layer:
        _attach_act(layer, arch, cfg)
    with torch.no_grad():
        for sl in arch.sublayers:
            if sl.experts:
                from loaq.moe import advance_moe

                advance_moe(work, fp_layer, sl, streams)
                continue
            w_out = work.get_submodule(sl.module).get_submodule(sl.w_out)
            for b in range(len(streams)):
                kw = streams.kwargs(b, cdt)
                h_hat = streams.h_hat.get(b)
                X_hat, _ = _catch_input(w_out, lambda: sl.run(work, h_hat.to(cdt), kw))
                streams.x_hat.set(b, X_hat)
                if streams.h is not None:
                    h = streams.h.get(b)
                    streams.h.set(b, h + sl.finish(fp_layer, sl.run(fp_layer, h.to(cdt), kw)))
            _advance_quantized(streams, w_out, cdt, sl, work)
    _release(layer, work)


def _attach_act(layer: nn.Module, arch: Arch, cfg: QuantConfig) -> None:
    """Give the linears of ``layer`` the activation fake quantizer (nothing unless W4A4)."""
    actquant.attach([layer.get_submodule(n) for n in arch.layer_linears(layer)], cfg.act)


def rtn_layer(layer: nn.Module, arch: Arch, cfg: QuantConfig, prefix: str,
              specs: dict | None = None) -> dict[str, QuantResult]:
    """Round-to-nearest every linear of ``layer`` in place (no calibration data)."""
    results = {prefix + n: rtn_linear(layer.get_submodule(n), (specs or {}).get(prefix + n, cfg.spec))
               for n in arch.layer_linears(layer)}
    _attach_act(layer, arch, cfg)
    return results


def rtn_linear(lin: nn.Linear, spec) -> QuantResult:
    """Round ``lin``'s weight to nearest on ``spec`` in place."""
    codes, s, z = rtn_quantize(lin.weight.detach().float(), spec)
    _set_weight(lin, dequantize(codes.float(), expand(s, spec, lin.in_features), expand(z, spec, lin.in_features)))
    return QuantResult(codes, s, z)


def _embeddings_to(model: nn.Module, arch: Arch, device) -> None:
    """Move what runs before the first decoder layer (embeddings, rotary tables) to ``device``."""
    parent_name, _, list_name = arch.layers.rpartition(".")
    for name, child in model.get_submodule(parent_name).named_children():
        if name != list_name:
            child.to(device)


def _capture(model: nn.Module, arch: Arch, calib: torch.Tensor, batch_size: int, streams: Streams,
             offset: int = 0) -> None:
    """Fill ``streams`` (from batch ``offset`` on) with the layer-0 inputs (``h = ĥ``) and every layer's kwargs
    of each calibration batch."""

    def sink(b, h, kw):
        b += offset
        streams.h_hat.set(b, h)
        if streams.h is not None:
            streams.h.set(b, h)
        streams.set_kwargs(b, kw)

    _embeddings_to(model, arch, streams.device)
    try:
        capture_inputs(model, arch, calib, batch_size, streams.device, sink)
    finally:
        _embeddings_to(model, arch, "cpu")


class _Resident:
    """The weights of a loaded model: every part is already there."""

    @contextmanager
    def layer(self, i: int):
        yield None

    @contextmanager
    def rest(self):
        yield None


def _resume(model: nn.Module, arch: Arch, streams: Streams, cfg: QuantConfig, store, specs: dict | None,
            weights, keep: bool) -> tuple[int, dict]:
    """(first layer to quantize, results so far) from ``store``: the finished layers' codes are written
    back (``keep``: and returned); the layers after the last saved streams are replayed to bring ``streams``
    up to date, each loaded by ``weights`` for the replay."""
    layers = arch.decoder_layers(model)
    done = store.finished()
    if not done:
        return 0, {}
    saved = store.load_streams(streams, done)
    results = {}
    for j in range(done):
        prefix = f"{arch.layers}.{j}."
        if j < saved and not keep:  # a lazy skeleton: nothing to write back, nothing to return
            continue
        mine = store.layer_results(j)
        if keep:
            results |= mine
        if j >= saved:
            streams.kw_layer = j
            with weights.layer(j):
                replay_layer(layers[j], arch, streams, cfg, mine, prefix, specs)
            continue
        for n in arch.layer_linears(layers[j]):
            spec = (specs or {}).get(prefix + n, cfg.spec)
            _set_weight(layers[j].get_submodule(n), dequantized(mine[prefix + n], spec))
        _attach_act(layers[j], arch, cfg)
    streams.at_layer = done
    log.info("resuming at layer %d of %d (streams saved at layer %d, %d replayed)", done, len(layers), saved,
             done - saved)
    return done, results


def quantize_model(model: nn.Module, arch: Arch, calib: torch.Tensor, cfg: QuantConfig, *, batch_size: int = 8,
                   device: str = "cpu", store=None, progress: bool = True, specs: dict | None = None,
                   streams: StreamOptions = StreamOptions(), weights=None) -> dict[str, QuantResult]:
    """Quantize every decoder linear of ``model`` in place; returns the results by qualified name.
    ``specs`` gives linears their own grids (a per-linear allocation, :mod:`loaq.allocation`).

    ``store`` (a :class:`loaq.checkpoint.LayerStore`) receives each finished layer (its shard: codes and the
    layer's other tensors; the streams every ``streams.checkpoint_every`` layers, and when interrupted at a
    layer boundary), and on resume supplies the finished prefix so the run continues where it stopped.
    ``streams``: where the calibration streams live and in which dtype (:mod:`loaq.streams`); the model stays
    on CPU, one layer at a time on ``device``. ``weights`` (a :class:`loaq.lazy.LazyWeights`) loads each layer
    only while it is quantized (``model`` is then a skeleton); with a ``store`` the results are then left on
    disk (not returned), so memory does not grow with depth.
    """
    from tqdm.auto import tqdm

    from loaq.checkpoint import layer_tensors

    if cfg.method.auto:  # chosen here for direct calls (deterministic: a resumed run chooses the same numbers);
        from loaq.auto import choose  # loaq.api.quantize chooses first and records the choice in loaq.json

        cfg, _ = choose(model, arch, calib, cfg, batch_size=batch_size, device=device, weights=weights)
    layers = arch.decoder_layers(model)
    results: dict[str, QuantResult] = {}
    keep = weights is None or store is None
    weights = weights or _Resident()
    if cfg.method.rule.solve is None:  # round to nearest: no calibration
        for i, layer in enumerate(layers):
            prefix = f"{arch.layers}.{i}."
            with weights.layer(i):
                res = rtn_layer(layer, arch, cfg, prefix, specs)
                if store is not None:
                    store.save_results(i, res, layer_tensors(layer, prefix, res))
            if keep:
                results |= res
        return results
    n_batches = len(calib.split(batch_size))
    workdir = store.workdir if store is not None and streams.offload == "disk" else None
    st = Streams(n_batches, cfg.method.two_stream, streams, device, workdir)
    try:
        with weights.rest():
            _capture(model, arch, calib, batch_size, st)
        start = 0
        if store is not None:
            start, done = _resume(model, arch, st, cfg, store, specs, weights, keep)
            results |= done
        eps = model.config.rms_norm_eps
        bar = tqdm(range(start, len(layers)), desc=f"{cfg.method.name} layers", initial=start, total=len(layers),
                   disable=not progress, unit="layer")
        for i in bar:
            t0 = time.time()
            prefix = f"{arch.layers}.{i}."
            st.at_layer = st.kw_layer = i
            with weights.layer(i):
                res = quantize_layer(layers[i], arch, st, cfg, eps, prefix, specs)
                st.at_layer = i + 1
                check_interrupted()  # a Ctrl-C Python swallowed stops the run before this layer is kept
                if store is not None:
                    store.save_layer(i, res, st, layer_tensors(layers[i], prefix, res))
            if keep:
                results |= res
            log.debug("layer %d done in %.1fs", i, time.time() - t0)
    except KeyboardInterrupt:
        if store is not None:
            store.save_interrupted(st)
        raise
    finally:
        st.close()
    return results
