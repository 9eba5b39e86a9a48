"""The two-stream pipeline on tiny random models of every supported architecture."""

import copy
import inspect

import pytest
import torch

import loaq.pipeline as pipeline
from loaq.arch import arch_of
from loaq.checkpoint import LayerStore, load_native, save_native
from loaq.shards import quantized_tensors
from loaq.stats import Projected
from loaq.config import Method, QuantConfig
from loaq.metrics import hidden_mse, layer_outputs
from loaq.grids import GridSpec
from loaq.pipeline import quantize_model
from tests.tiny import CONFIGS, tiny_model, tokens

SPEC = GridSpec(3, 0, False)


def run(kind, method, model=None, **kw):
    m = model or tiny_model(kind)
    res = quantize_model(m, arch_of(m.config), tokens(), QuantConfig(spec=SPEC, method=method), batch_size=4, progress=False, **kw)
    return m, res


def codes_equal(a, b, names=None):
    return all(torch.equal(a[n].codes, b[n].codes) for n in (names or a))


@pytest.mark.parametrize("kind", list(CONFIGS))
def test_every_architecture_orders_methods(kind):
    """RTN > GPTQ > LoaQ in final-layer normalized hidden-state error on the calibration data, per architecture."""
    ref = tiny_model(kind)
    arch = arch_of(ref.config)
    X = tokens()
    base = layer_outputs(ref, arch, X)
    err = {}
    for name in ("rtn", "gptq", "loaq"):
        m, res = run(kind, Method(name))
        assert len(res) == 2 * len(arch.linear_names())
        err[name] = hidden_mse(base, layer_outputs(m, arch, X), 1e-6)["mse_normed"][-1]
    assert err["loaq"] < err["gptq"] < err["rtn"], err


def test_zero_alpha_lloa_and_plain_loaq_are_bit_identical_to_gptq():
    _, g = run("llama", Method("gptq"))
    _, l0 = run("llama", Method("lloa", alpha=0.0))
    _, q0 = run("llama", Method("loaq", alpha=0.0, beta=0.0, rescale=False))
    assert codes_equal(g, l0) and codes_equal(g, q0)


def test_rescaling_changes_only_w_out_of_the_first_sublayer():
    """With NOA on, α = β = 0 is not GPTQ: H of W_out is built from the rescaled X̂' (Algorithm 1 line 14)."""
    _, g = run("llama", Method("gptq"))
    _, r = run("llama", Method("loaq", alpha=0.0, beta=0.0, rescale=True))
    first_in = [f"model.layers.0.self_attn.{n}" for n in ("q_proj", "k_proj", "v_proj")]
    assert codes_equal(g, r, first_in)
    assert not torch.equal(g["model.layers.0.self_attn.o_proj"].codes, r["model.layers.0.self_attn.o_proj"].codes)


@pytest.mark.parametrize("every", [1, 0])
def test_resume_after_interruption_is_bit_identical(tmp_path, every):
    """Streams saved after layer 0 (every=1) are reloaded; none saved (every=0): layer 0 is replayed
    forward from the captured inputs with its stored codes. Both give the uninterrupted run's codes."""
    _, full = run("qwen3", Method("loaq", alpha=0.5, beta=0.5))

    class Killed(Exception):
        pass

    store = LayerStore(str(tmp_path / "w"), "d", SPEC, stream_every=every)
    real_save = store.save_layer

    def save_then_die(i, res, streams, *extra):
        real_save(i, res, streams, *extra)
        if i == 0:
            raise Killed

    store.save_layer = save_then_die
    with pytest.raises(Killed):
        run("qwen3", Method("loaq", alpha=0.5, beta=0.5), store=store)
    assert store.finished() == 1 and store._saved_streams() == ([1] if every else [])
    resumed_store = LayerStore(str(tmp_path / "w"), "d", SPEC, stream_every=every)
    _, resumed = run("qwen3", Method("loaq", alpha=0.5, beta=0.5), store=resumed_store)
    assert sorted(resumed) == sorted(full) and codes_equal(full, resumed)
    assert all(torch.equal(full[n].scales, resumed[n].scales) for n in full)


def test_native_checkpoint_round_trip(tmp_path):
    m, res = run("qwen2", Method("gptq"))
    save_native(str(tmp_path / "ck"), m, None, res, {"config": QuantConfig(spec=SPEC).to_dict()}, force=False)
    stored = quantized_tensors(str(tmp_path / "ck"))
    n = "model.layers.1.mlp.down_proj"
    assert stored[f"{n}.codes"].dtype == torch.uint8 and torch.equal(stored[f"{n}.codes"], res[n].codes)
    loaded, _, meta = _load_without_tokenizer(str(tmp_path / "ck"))
    X = tokens(seed=3)
    with torch.no_grad():
        assert torch.equal(m(X).logits, loaded(X).logits)


def _load_without_tokenizer(path):
    import loaq.checkpoint as ck
    from transformers import AutoTokenizer

    orig = AutoTokenizer.from_pretrained
    AutoTokenizer.from_pretrained = staticmethod(lambda *a, **k: None)
    try:
        return ck.load_native(path)
    finally:
        AutoTokenizer.from_pretrained = orig


# --- What the pipeline feeds the solver for W_out, recomputed from scratch ---------------------------------------

def spy_solver(monkeypatch):
    """{label: (H, C, B)} of every group the pipeline solves; the real solver still runs. ``C`` is a
    :class:`loaq.stats.Projected` ``C Wᵀ`` where the pipeline kept that product (LLOA/LoaQ's ``down_proj``)."""
    seen, real = {}, pipeline.solve_group
    sig = inspect.signature(real)

    def spy(*args, **kwargs):
        a = sig.bind(*args, **kwargs).arguments
        st, B = a["stats"], a.get("B")
        C = Projected(st.CW.clone()) if st.CW is not None else None if st.C is None else st.C.clone()
        seen[a["label"]] = (st.H.clone(), C, None if B is None else B.clone())
        return real(*args, **kwargs)

    monkeypatch.setattr(pipeline, "solve_group", spy)
    return seen


def layer0_inputs(fp_model, q_model, X, sublayer):
    """(h, ĥ, X, X̂) of layer 0's ``sublayer`` ("attn" or "mlp") from two plain forwards over ``X``: the float
    model, and the float model with the layer-0 linears that come before this W_out set to their quantized
    weights (taken from ``q_model``); h, ĥ are the sub-layer's norm inputs, X, X̂ the W_out inputs."""
    norm, w_out, before = {"attn": ("input_layernorm", "self_attn.o_proj", ["self_attn.q_proj", "self_attn.k_proj",
                                                                             "self_attn.v_proj"]),
                           "mlp": ("post_attention_layernorm", "mlp.down_proj",
                                   ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                                    "mlp.gate_proj", "mlp.up_proj"])}[sublayer]
    partial = copy.deepcopy(fp_model)
    for n in before:
        partial.model.layers[0].get_submodule(n).weight.data.copy_(q_model.model.layers[0].get_submodule(n).weight)

    def inputs(model):
        box = {}
        layer = model.model.layers[0]
        hooks = [layer.get_submodule(norm).register_forward_pre_hook(lambda _m, a: box.setdefault("h", a[0])),
                 layer.get_submodule(w_out).register_forward_pre_hook(lambda _m, a: box.setdefault("X", a[0]))]
        with torch.no_grad():
            model(X)
        for k in hooks:
            k.remove()
        return box["h"].reshape(-1, box["h"].shape[-1]), box["X"].reshape(-1, box["X"].shape[-1])

    (h, x), (h_hat, x_hat) = inputs(fp_model), inputs(partial)
    return h, h_hat, x, x_hat


def loaq_stats(h, h_hat, X, X_hat, W, eps, shat, rescale=True):
    """H, C, B of Algorithm 1 lines 10-16 in float64 from float32 activations (no bias on o/down_proj here):
    s = R(h + XWᵀ), ŝ = R(ĥ + X̂Wᵀ) ("text") or R(h + X̂Wᵀ) ("alg"), X' = sX, X̂' = ŝX̂,
    H = X̂'ᵀX̂', C = X̂'ᵀ(X' - X̂'), B = X̂'ᵀ(s h - ŝ ĥ)."""
    h, h_hat, X, X_hat, W = (t.double() for t in (h, h_hat, X, X_hat, W))

    def R(v):
        return 1 / torch.sqrt(v.pow(2).mean(-1, keepdim=True) + eps)

    if rescale:
        s, s_hat = R(h + X @ W.T), R((h_hat if shat == "text" else h) + X_hat @ W.T)
    else:
        s = s_hat = torch.ones(h.shape[0], 1, dtype=torch.float64)
    Xp, Xhp = s * X, s_hat * X_hat
    return Xhp.T @ Xhp, Xhp.T @ (Xp - Xhp), Xhp.T @ (s * h - s_hat * h_hat)


def rel(a, b):
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("shat", ["text", "alg"])
def test_w_out_statistics_match_an_independent_computation(monkeypatch, shat):
    """LoaQ (α, β ≠ 0, NOA on): the H, C, B the pipeline hands the solver for layer 0's o_proj and down_proj
    equal Algorithm 1 lines 10-16 recomputed from two plain forwards of the float and the partly quantized
    model (float32 batches summed in float64: H, C within 4e-7 relative, B within 3e-6 measured)."""
    seen = spy_solver(monkeypatch)
    q_model, _ = run("llama", Method("loaq", alpha=0.5, beta=0.5, rescale=True, shat=shat))
    fp_model = tiny_model("llama")
    eps = fp_model.config.rms_norm_eps
    for sublayer, w_out in (("attn", "self_attn.o_proj"), ("mlp", "mlp.down_proj")):
        h, h_hat, X, X_hat = layer0_inputs(fp_model, q_model, tokens(), sublayer)
        assert fp_model.model.layers[0].get_submodule(w_out).bias is None
        W = fp_model.model.layers[0].get_submodule(w_out).weight
        H, C, B = loaq_stats(h, h_hat, X, X_hat, W, eps, shat)
        got = seen[f"model.layers.0.{w_out}"]
        # down_proj (out ≤ in/2) keeps C Wᵀ instead of C (loaq.stats.Projected); o_proj keeps C
        assert isinstance(got[1], Projected) == (sublayer == "mlp")
        C_got, C_ref = (got[1].CW, C @ W.double().T) if sublayer == "mlp" else (got[1], C)
        assert rel(got[0], H) < 1e-5 and rel(C_got, C_ref) < 1e-5 and rel(got[2], B) < 1e-5, \
            (w_out, rel(got[0], H), rel(C_got, C_ref), rel(got[2], B))
        if sublayer == "mlp":  # the streams entering the MLP differ (the quantized attention), so ŝ does too
            assert rel(h_hat, h) > 1e-3
            other = loaq_stats(h, h_hat, X, X_hat, W, eps, "alg" if shat == "text" else "text")
            assert rel(other[0], H) > 1e-4 and rel(got[0], other[0]) > 1e-4


def test_noa_rescales_h_of_w_out_even_at_zero_alpha_and_beta(monkeypatch):
    """α = β = 0 is GPTQ only on W_in: with NOA on, W_out's H is Σ (ŝx̂)(ŝx̂)ᵀ, not GPTQ's Σ x̂x̂ᵀ."""
    seen = spy_solver(monkeypatch)
    _, g = run("llama", Method("gptq"))
    gptq_H = {k: v[0] for k, v in seen.items()}
    seen.clear()
    q_model, r = run("llama", Method("loaq", alpha=0.0, beta=0.0, rescale=True))
    fp_model = tiny_model("llama")
    h, h_hat, X, X_hat = layer0_inputs(fp_model, q_model, tokens(), "attn")
    W = fp_model.model.layers[0].self_attn.o_proj.weight
    H_noa = loaq_stats(h, h_hat, X, X_hat, W, fp_model.config.rms_norm_eps, "text")[0]
    H_plain = loaq_stats(h, h_hat, X, X_hat, W, fp_model.config.rms_norm_eps, "text", rescale=False)[0]
    label = "model.layers.0.self_attn.o_proj"
    assert rel(seen[label][0], H_noa) < 1e-5 and rel(gptq_H[label], H_plain) < 1e-5
    assert rel(H_noa, H_plain) > 0.1
    assert not torch.equal(g[label].codes, r[label].codes)
