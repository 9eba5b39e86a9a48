"""The two-stream layer-wise pipeline (LoaQ Algorithm 1).

1. Catch the decoder's layer-0 inputs (and attention kwargs) for every calibration batch: ``h = ĥ``.
2. For each decoder layer, only it on the compute device, for each sub-layer (attention, then MLP):
   a. ``W_in`` (q,k,v / gate,up): accumulate ``H`` (and ``C``) from ``x̂ = Norm(ĥ)`` (and ``x = Norm(h)``),
      solve the group once (its members share ``H``), write the quantized weights into the layer;
   b. ``W_out`` (o / down): run the partly quantized sub-layer on ``ĥ`` and the float one on ``h``,
      catching ``X̂``, ``X``; LoaQ rescales tokens by ``s = R(h + XW)``, ``ŝ = R(ĥ + X̂W)`` and adds the
      residual target ``s h - ŝ ĥ``; solve and write back;
   c. advance the streams: ``h += X W_outᵀ`` (kept from b), ``ĥ += X̂ Qᵀ`` (``X̂`` kept from b, so the
      sub-layer is not run again).
3. After each layer, hand its results and both streams to the checkpoint store, so ``--resume``
   continues bit-identically.
Single-stream methods (RTN, GPTQ) never build or carry the float stream.

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
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from loaq import actquant
from loaq.arch import Arch, SubLayer, rms_factor
from loaq.config import QuantConfig
from loaq.errors import check_interrupted
from loaq.grids import rtn as rtn_quantize, dequantize, expand
from loaq.solver import QuantResult, factorize
from loaq.stats import Stats

log = logging.getLogger(__name__)


class _Stop(Exception):
    pass


@dataclass
class Streams:
    """Per-batch residual streams entering the current layer: float ``h`` (or None) and quantized ``h_hat``."""

    h: list[torch.Tensor] | None
    h_hat: list[torch.Tensor]
    kwargs: list[dict]


def capture_inputs(model: nn.Module, arch: Arch, calib: torch.Tensor, batch_size: int, device) -> tuple[list, list]:
    """Layer-0 hidden states and the keyword arguments the decoder passes its layers, per batch."""
    layers = arch.decoder_layers(model)
    hs, kws = [], []

    def catch(_mod, args, kwargs):
        h = args[0] if args else kwargs.pop("hidden_states")
        hs.append(h.detach())
        kws.append({k: v for k, v in kwargs.items() if k not in ("hidden_states", "past_key_values", "use_cache")})
        raise _Stop

    handle = layers[0].register_forward_pre_hook(catch, with_kwargs=True)
    try:
        with torch.no_grad():
            for batch in calib.split(batch_size):
                try:
                    model(batch.to(device), use_cache=False)
                except _Stop:
                    pass
    finally:
        handle.remove()
    return hs, kws


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


def solve_group(names: list[str], linears: list[nn.Linear], stats: Stats, cfg: QuantConfig,
                label: str, B: torch.Tensor | None = None) -> dict[str, QuantResult]:
    """Quantize linears sharing one input (their rows stacked) with the method's registry rule (:mod:`loaq.methods`)."""
    m = cfg.method
    W = torch.cat([lin.weight.detach().float() for lin in linears])
    factor = factorize(stats.H, cfg.solver.percdamp, label)
    res = m.rule.solve(W, factor, stats.C, B, m, cfg.spec, cfg.solver)
    out, row = {}, 0
    for name, lin in zip(names, linears):
        n = lin.out_features
        _set_weight(lin, res.Q[row : row + n])
        out[name] = QuantResult(res.codes[row : row + n].clone(), res.scales[row : row + n].clone(),
                                res.zeros[row : row + n].clone())
        row += n
    return out


def _quantize_sublayer(layer: nn.Module, fp_layer: nn.Module | None, sl: SubLayer, streams: Streams,
                       cfg: QuantConfig, eps: float, prefix: str, device) -> dict[str, QuantResult]:
    m = cfg.method
    two = streams.h is not None
    norm = layer.get_submodule(sl.norm)
    mod = layer.get_submodule(sl.module)
    results = {}

    # (a) W_in: inputs are Q_a(Norm(ĥ)) (Q_a = identity unless W4A4) and Norm(h)
    w_in = [mod.get_submodule(n) for n in sl.w_in]
    st = Stats(w_in[0].in_features, cross=two, device=device)
    with torch.no_grad():
        for b, h_hat in enumerate(streams.h_hat):
            x_hat = norm(h_hat)
            if cfg.act.enabled:
                x_hat = actquant.fake_quantize(x_hat, cfg.act.symmetric)
            st.add(x_hat, norm(streams.h[b]) if two else None)
    results |= solve_group([f"{prefix}{sl.module}.{n}" for n in sl.w_in], w_in, st, cfg,
                           f"{prefix}{sl.module}.{','.join(sl.w_in)}")
    del st

    # (b) W_out: inputs X̂ (quantized W_in on ĥ) and X (float sub-layer on h)
    w_out = mod.get_submodule(sl.w_out)
    fp_out = fp_layer.get_submodule(sl.module).get_submodule(sl.w_out) if two else None
    use_B = m.rule.output_stats and m.soa and m.beta != 0
    st = Stats(w_out.in_features, cross=two, n_res=w_out.out_features if use_B else 0, device=device)
    y_fp, X_hats = [], []
    with torch.no_grad():
        for b, h_hat in enumerate(streams.h_hat):
            # W_out still holds its float weights here, so y_hat = X̂Wᵀ + b (what ŝ needs)
            X_hat, y_hat = _catch_input(w_out, lambda: sl.run(layer, h_hat, streams.kwargs[b]))
            X_hats.append(X_hat)
            if not two:
                st.add(X_hat)
                continue
            h = streams.h[b]
            X, y = _catch_input(fp_out, lambda: sl.run(fp_layer, h, streams.kwargs[b]))
            y_fp.append(y)
            if not m.rule.output_stats:
                st.add(X_hat, X)
                continue
            bias = fp_out.bias if fp_out.bias is not None else 0
            h_b, hh_b = h + bias, h_hat + bias
            if m.rescale:
                s = rms_factor(h + y, eps)  # y = XWᵀ + b
                base = h_hat if m.shat == "text" else h
                s_hat = rms_factor(base + y_hat, eps)
                st.add(s_hat * X_hat, s * X, (s * h_b - s_hat * hh_b) if use_B else None)
            else:
                st.add(X_hat, X, (h_b - hh_b) if use_B else None)
    name = f"{prefix}{sl.module}.{sl.w_out}"
    results |= solve_group([name], [w_out], st, cfg, name, st.B)
    del st

    # (c) advance both streams past this sub-layer; X̂ does not depend on W_out, so reuse it (it already
    # went through W_out's input hooks: apply the weights only)
    with torch.no_grad():
        for b, h_hat in enumerate(streams.h_hat):
            streams.h_hat[b] = h_hat + F.linear(X_hats[b], w_out.weight, w_out.bias)
            if two:
                streams.h[b] = streams.h[b] + y_fp[b]
    return results


def quantize_layer(layer: nn.Module, arch: Arch, streams: Streams, cfg: QuantConfig, eps: float,
                   prefix: str, device) -> dict[str, QuantResult]:
    """Quantize one decoder layer in place and advance ``streams`` past it (Algorithm 1 lines 3-21)."""
    if cfg.method.resets_fp_stream:
        streams.h = [h.clone() for h in streams.h_hat]
    fp_layer = copy.deepcopy(layer) if streams.h is not None else None
    _attach_act(layer, arch, cfg)
    results = {}
    for sl in arch.sublayers:
        results |= _quantize_sublayer(layer, fp_layer, sl, streams, cfg, eps, prefix, device)
    return results


def _attach_act(layer: nn.Module, arch: Arch, cfg: QuantConfig) -> None:
    """Give the linears of ``layer`` the activation fake quantizer (nothing unless W4A4)."""
    actquant.attach([layer.get_submodule(n) for n in arch.linear_names()], cfg.act)


def rtn_layer(layer: nn.Module, arch: Arch, cfg: QuantConfig, prefix: str) -> dict[str, QuantResult]:
    """Round-to-nearest every linear of ``layer`` in place (no calibration data)."""
    results = {}
    for n in arch.linear_names():
        lin = layer.get_submodule(n)
        codes, s, z = rtn_quantize(lin.weight.detach().float(), cfg.spec)
        _set_weight(lin, dequantize(codes.float(), expand(s, cfg.spec, lin.in_features), expand(z, cfg.spec, lin.in_features)))
        results[prefix + n] = QuantResult(codes, s, z)
    _attach_act(layer, arch, cfg)
    return results


def _embeddings_to(model: nn.Module, arch: Arch, device) -> None:
    """Move what runs before the first decoder layer (embeddings, rotary tables) to ``device``."""
    parent_name, _, list_name = arch.layers.rpartition(".")
    for name, child in model.get_submodule(parent_name).named_children():
        if name != list_name:
            child.to(device)


class _Resident:
    """The weights of a loaded model: every part is already there."""

    @contextmanager
    def layer(self, i: int):
        yield None

    @contextmanager
    def rest(self):
        yield None


def quantize_model(model: nn.Module, arch: Arch, calib: torch.Tensor, cfg: QuantConfig, *, batch_size: int = 8,
                   device: str = "cpu", store=None, progress: bool = True, weights=None) -> dict[str, QuantResult]:
    """Quantize every decoder linear of ``model`` in place; returns the results by qualified name.

    ``store`` (a :class:`loaq.checkpoint.LayerStore`) receives each finished layer (its shard: codes and
    the layer's other tensors) and both streams, and on resume supplies the finished prefix so the run
    continues where it stopped. ``weights`` (a :class:`loaq.lazy.LazyWeights`) loads each layer only while
    it is quantized (``model`` is then a skeleton); with a ``store`` the results are then left on disk
    (not returned), so memory does not grow with depth.
    """
    from tqdm.auto import tqdm

    from loaq.checkpoint import layer_tensors

    layers = arch.decoder_layers(model)
    results: dict[str, QuantResult] = {}
    keep = weights is None or store is None
    weights = weights or _Resident()
    if cfg.method.rule.solve is None:  # round to nearest: no calibration
        for i, layer in enumerate(layers):
            prefix = f"{arch.layers}.{i}."
            with weights.layer(i):
                res = rtn_layer(layer, arch, cfg, prefix)
                if store is not None:
                    store.save_results(i, res, layer_tensors(layer, prefix, res))
            if keep:
                results |= res
        return results
    with weights.rest():
        _embeddings_to(model, arch, device)
        hs, kws = capture_inputs(model, arch, calib, batch_size, device)
        _embeddings_to(model, arch, "cpu")
    two = cfg.method.two_stream
    start = 0
    saved = store.load_streams() if store is not None else None
    if saved is not None:
        start, h, h_hat = saved
        if keep:
            results |= store.load_layers(model, start)
        for layer in layers[:start]:
            _attach_act(layer, arch, cfg)
        streams = Streams(h, h_hat, kws)
        log.info("resuming at layer %d of %d", start, len(layers))
    else:
        streams = Streams([x.clone() for x in hs] if two else None, hs, kws)
    eps = model.config.rms_norm_eps
    bar = tqdm(range(start, len(layers)), desc=f"{cfg.method.name} layers", initial=start, total=len(layers),
               disable=not progress, unit="layer")
    for i in bar:
        t0 = time.time()
        prefix = f"{arch.layers}.{i}."
        with weights.layer(i):
            layers[i].to(device)
            res = quantize_layer(layers[i], arch, streams, cfg, eps, prefix, device)
            layers[i].to("cpu")
            check_interrupted()  # a Ctrl-C Python swallowed stops the run before this layer is kept
            if store is not None:
                store.save_layer(i, res, streams, layer_tensors(layers[i], prefix, res))
        if keep:
            results |= res
        log.debug("layer %d done in %.1fs", i, time.time() - t0)
    return results
