"""Qwen3-MoE: registration and refusals, per-expert linears, per-expert statistics against a direct computation
with an explicit router (weight-only and W4A4), every method end to end, export ↔ native logits equality
(weight-only and W4A4), and a killed run resumed."""

import copy
import os

import pytest
import torch
import torch.nn.functional as F

from loaq import actquant, moe
from loaq.actquant import ActSpec
from loaq.arch import QWEN3_MOE, arch_of, input_widths
from loaq.config import Method, QuantConfig
from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.pipeline import quantize_model
from loaq.streams import StreamOptions, Streams
from tests.tiny import tiny_model, tokens

E, K, D, I_E = 4, 2, 64, 32  # tests/tiny.py's MoE: experts, top k, hidden, expert width


@pytest.fixture(scope="module")
def fp():
    """The tiny random Qwen3-MoE with per-expert linears (read-only: copy to change)."""
    m = tiny_model("qwen3_moe")
    return moe.unfuse(m, arch_of(m.config))


def test_registration_and_names(fp):
    cfg = fp.config
    assert arch_of(cfg) is QWEN3_MOE
    cfg2 = copy.deepcopy(cfg)
    cfg2.architectures = None
    assert arch_of(cfg2) is QWEN3_MOE  # GGUF-style configs carry model_type only
    names = QWEN3_MOE.linear_names(QWEN3_MOE.num_experts(cfg))
    assert len(names) == 4 + 3 * E and names[4:7] == ["mlp.experts.0.gate_proj", "mlp.experts.0.up_proj",
                                                      "mlp.experts.0.down_proj"]
    assert QWEN3_MOE.layer_linears(fp.model.layers[0]) == names
    assert all(isinstance(fp.get_submodule(f"model.layers.1.{n}"), torch.nn.Linear) for n in names)
    assert input_widths(cfg)["experts' down_proj"] == I_E


@pytest.mark.parametrize("change, message", [
    (dict(rotation="hadamard"), "--rotate hadamard is not supported for Qwen3MoeForCausalLM"),
    (dict(mlp_only_layers=[1]), "with dense MLP layers"),
    (dict(group_size=64), r"--group-size 64 does not divide input width\(s\) \[32\]"),
])
def test_refusals(fp, change, message):
    from loaq.api import check_model
    from loaq.rotation import RotationSpec

    model = copy.deepcopy(fp) if "mlp_only_layers" in change else fp
    if "mlp_only_layers" in change:
        model.config.mlp_only_layers = change["mlp_only_layers"]
    cfg = QuantConfig(spec=GridSpec(4, change.get("group_size", 0)), method=Method("gptq"),
                      rotation=RotationSpec("hadamard") if "rotation" in change else RotationSpec())
    with pytest.raises(LoaQError, match=message) as e:
        check_model(model, cfg)
    assert "\n" not in str(e.value)


def test_w4a4_is_accepted(fp):
    """W4A4 (4-bit per-channel weights, 4-bit per-token activations) is no longer refused for the MoE."""
    from loaq.api import check_model

    check_model(fp, QuantConfig(spec=GridSpec(4, 0), method=Method("gptq"), act=ActSpec(4)))


def test_unfuse_keeps_the_function():
    m = tiny_model("qwen3_moe")
    ids = tokens(2, 16)
    with torch.no_grad():
        ref = m(ids).logits
        got = moe.unfuse(m, arch_of(m.config))(ids).logits
    assert isinstance(m.model.layers[0].mlp.experts, moe.Experts)
    torch.testing.assert_close(got, ref, rtol=0, atol=1e-6)


def _rms(x, w, eps):
    return w * x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps)


def _route(x, Wr):
    """The explicit router: softmax, top k, renormalized (norm_topk_prob); dense [T, E] weights."""
    v, i = torch.topk(F.softmax(x @ Wr.T, dim=-1), K, dim=-1)
    return torch.zeros(x.shape[0], E).scatter(1, i, v / v.sum(-1, keepdim=True))


def _record(monkeypatch):
    """Stats of every solve_group call: name -> (H, C, B) as the solver received them."""
    import loaq.pipeline as pipeline

    seen, solve = {}, pipeline.solve_group

    def spy(names, linears, stats, cfg, label, B=None):
        seen[names[0]] = (stats.H.clone(), stats.C.clone() if stats.C is not None else None,
                          None if B is None else B.clone(), stats.tokens)
        return solve(names, linears, stats, cfg, label, B)

    monkeypatch.setattr(pipeline, "solve_group", spy)
    return seen


def _streams(h, h_hat) -> Streams:
    """One batch of streams on CPU (``h`` None: single stream)."""
    st = Streams(1, h is not None, StreamOptions(), "cpu")
    st.h_hat.set(0, h_hat.clone())
    if h is not None:
        st.h.set(0, h.clone())
    st.set_kwargs(0, {})
    return st


def _sublayer_inputs(fp, seed=3, T=(2, 24), noise=0.3):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(*T, D, generator=g)
    return h, h + noise * torch.randn(*T, D, generator=g)


@pytest.mark.parametrize("act", [ActSpec(), ActSpec(4)], ids=["weight-only", "w4a4"])
def test_expert_statistics_match_a_direct_computation(fp, monkeypatch, act):
    """H, C, B of every expert's W_in and W_out (LoaQ NOA + SOA) equal the module docstring's formulas, computed
    here from the weights with an explicit router; the streams advance by the quantized and the float block.
    W4A4: the quantized stream's expert inputs are ``Q_a(x̂)`` and ``Q_a(X̂)`` (the layer's input hooks, as
    :func:`loaq.pipeline.quantize_layer` attaches them), the router reads ``x̂`` and the float stream is unquantized."""
    seen = _record(monkeypatch)
    layer, sl, eps = copy.deepcopy(fp.model.layers[0]), QWEN3_MOE.sublayers[1], fp.config.rms_norm_eps
    fp_layer = copy.deepcopy(layer)
    actquant.attach([layer.get_submodule(n) for n in QWEN3_MOE.layer_linears(layer)], act)
    h, h_hat = _sublayer_inputs(fp)
    streams = _streams(h, h_hat)
    cfg = QuantConfig(spec=GridSpec(4 if act.enabled else 3), method=Method("loaq", alpha=0.25, beta=0.5), act=act)
    moe.quantize_moe(layer, fp_layer, sl, streams, cfg, eps, "", "cpu", few=moe.FewTokens("damp"))

    g, Wr = fp_layer.post_attention_layernorm.weight, fp_layer.mlp.gate.weight
    hf, hhf = h.reshape(-1, D), h_hat.reshape(-1, D)
    x, xh = _rms(hf, g, eps), _rms(hhf, g, eps)
    R, Rh = _route(x, Wr), _route(xh, Wr)
    assert ((R > 0) != (Rh > 0)).any(), "the test needs tokens the two streams route differently"
    fpx, qx = fp_layer.mlp.experts, layer.mlp.experts

    def inner(ex, t):
        return F.silu(t @ ex.gate_proj.weight.T) * (t @ ex.up_proj.weight.T)

    qa = act.quantize  # identity unless W4A4
    Xh = [qa(inner(qx[e], qa(xh))) for e in range(E)]  # down's input: quantized W_in on Q_a(x̂), then Q_a
    X = [inner(fpx[e], x) for e in range(E)]
    out = [fpx[e].down_proj.weight for e in range(E)]
    y_hat = sum(Rh[:, e, None] * Xh[e] @ out[e].T for e in range(E))  # float W_out
    y = sum(R[:, e, None] * X[e] @ out[e].T for e in range(E))
    s, s_hat = torch.rsqrt((hf + y).pow(2).mean(-1, keepdim=True) + eps), \
        torch.rsqrt((hhf + y_hat).pow(2).mean(-1, keepdim=True) + eps)
    U = sum(((R[:, e] > 0) & (Rh[:, e] == 0)).float()[:, None] * R[:, e, None] * X[e] @ out[e].T for e in range(E))
    res = s * hf - s_hat * hhf + s * U
    d = torch.float64
    for e in range(E):
        rows = Rh[:, e] > 0
        H, C, _, n = seen[f"mlp.experts.{e}.gate_proj"]
        a = qa(xh)[rows].to(d)
        assert n == int(rows.sum())
        torch.testing.assert_close(H, a.T @ a, rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(C, a.T @ (x[rows].to(d) - a), rtol=1e-4, atol=1e-4)
        H, C, B, _ = seen[f"mlp.experts.{e}.down_proj"]
        Xq = (s_hat * Rh[:, e, None] * Xh[e])[rows].to(d)
        Xf = (s * R[:, e, None] * X[e])[rows].to(d)
        share = (Rh[:, e] / Rh.sum(-1))[rows, None]
        torch.testing.assert_close(H, Xq.T @ Xq, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(C, Xq.T @ (Xf - Xq), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(B, Xq.T @ (share * res[rows]).to(d), rtol=1e-4, atol=1e-5)
    # streams: ĥ + the fully quantized block on x̂, h + the float block on x
    y_q = sum(Rh[:, e, None] * Xh[e] @ qx[e].down_proj.weight.T for e in range(E))
    torch.testing.assert_close(streams.h_hat[0].reshape(-1, D), hhf + y_q, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(streams.h[0].reshape(-1, D), hf + y, rtol=1e-5, atol=1e-5)


def test_few_tokens_shrink_towards_the_layer(fp, monkeypatch):
    """Fewer routed tokens than input columns: H_e + (width − n_e)/N · Σ_all x̂x̂ᵀ, and no expert loses its weights."""
    seen = _record(monkeypatch)
    layer, sl, eps = copy.deepcopy(fp.model.layers[0]), QWEN3_MOE.sublayers[1], fp.config.rms_norm_eps
    _, h_hat = _sublayer_inputs(fp, T=(1, 12))
    cfg = QuantConfig(spec=GridSpec(3), method=Method("gptq"))
    moe.quantize_moe(layer, None, sl, _streams(None, h_hat), cfg, eps, "", "cpu")
    xh = _rms(h_hat.reshape(-1, D), fp.model.layers[0].post_attention_layernorm.weight, eps).to(torch.float64)
    Rh = _route(xh.float(), fp.model.layers[0].mlp.gate.weight)
    for e in range(E):
        rows = Rh[:, e] > 0
        H, _, _, n = seen[f"mlp.experts.{e}.gate_proj"]
        a = xh[rows]
        torch.testing.assert_close(H, a.T @ a + (D - n) / xh.shape[0] * xh.T @ xh, rtol=1e-4, atol=1e-4)
        for name in ("gate_proj", "up_proj", "down_proj"):
            w = layer.mlp.experts[e].get_submodule(name).weight
            assert (w.abs().sum(1) > 0).all()  # dead columns would have zeroed them


@pytest.fixture(scope="module")
def rtn_error(fp):
    return _logits_error(fp, "rtn")


def _logits_error(fp, name):
    model = copy.deepcopy(fp)
    cfg = QuantConfig(spec=GridSpec(3), method=Method(name))
    res = quantize_model(model, QWEN3_MOE, tokens(4, 32, seed=2), cfg, batch_size=4, progress=False)
    assert sorted(res) == sorted(f"model.layers.{i}.{n}" for i in range(2) for n in QWEN3_MOE.linear_names(E))
    ids = tokens(4, 32, seed=5)
    with torch.no_grad():
        return ((model(ids).logits - fp(ids).logits) ** 2).mean().item()


@pytest.mark.parametrize("name", ["gptq", "gptaq", "qronos", "lloa", "loaq"])
def test_every_method_beats_rtn(fp, rtn_error, name):
    assert _logits_error(fp, name) < rtn_error


@pytest.mark.parametrize("spec, act", [(GridSpec(4, 16), ActSpec()), (GridSpec(4, 0), ActSpec(4))],
                         ids=["w4g16", "w4a4"])
def test_export_loads_to_the_native_logits(tmp_path, calib, spec, act):
    """loaq.quantize → native + float32 export; --check passes; the export (per-expert packed names, router unpacked)
    loads to the native checkpoint's logits exactly, through loaq.load too. W4A4: every expert's config group
    carries the per-token dynamic int4 ``input_activations``, and both loads fake-quantize the experts' inputs."""
    import json

    from safetensors import safe_open

    import loaq
    from loaq import Calibration
    from loaq.checkpoint import load_native
    from loaq.export.check import check_export
    from loaq.export.load import load_export
    from tests.tiny import tiny_model_dir

    src = tiny_model_dir(str(tmp_path / "m"), "qwen3_moe")
    cfg = QuantConfig(spec=spec, method=Method("loaq", beta=0.25), act=act)
    loaq.quantize(src, cfg, Calibration(source=calib, nsamples=4, seqlen=32), out=str(tmp_path / "n"),
                  export=str(tmp_path / "ct"), export_dtype="float32", progress=False)
    summary = check_export(str(tmp_path / "ct"))
    assert summary.startswith("ok: 32 packed linears") and ("; W4A4" in summary) == act.enabled, summary
    groups = json.load(open(tmp_path / "ct" / "config.json"))["quantization_config"]["config_groups"].values()
    [expert_group] = [g for g in groups if "model.layers.1.mlp.experts.3.down_proj" in g["targets"]]
    a = expert_group["input_activations"]
    assert (a is not None) == act.enabled
    if act.enabled:
        assert (a["num_bits"], a["type"], a["strategy"], a["dynamic"], a["symmetric"]) == (4, "int", "token", True, False)
    with safe_open(str(tmp_path / "ct" / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
    assert {"model.layers.1.mlp.experts.3.down_proj.weight_packed", "model.layers.0.mlp.gate.weight"} <= keys
    native, _, _ = load_native(str(tmp_path / "n"))
    exported, _ = load_export(str(tmp_path / "ct"))
    ids = tokens(2, 16, vocab=300)
    with torch.no_grad():
        ref = native(ids).logits
        assert torch.equal(exported(ids).logits, ref)
        assert torch.equal(loaq.load(str(tmp_path / "ct")).model(ids).logits, ref)
    if act.enabled:  # the experts' inputs are quantized: dropping the hooks changes the logits
        for mod in native.modules():
            mod._forward_pre_hooks.clear()
        with torch.no_grad():
            assert not torch.allclose(native(ids).logits, ref, atol=1e-4)



@pytest.fixture(scope="module")
def moe_run(tmp_path_factory, calib):
    """(model dir, native checkpoint) of a 4-layer Qwen3-MoE (hidden 128, expert width 64) and of its uninterrupted
    `loaq quantize` (LoaQ W3, 4 x 32 tokens), which loads it eagerly (its experts are split in memory)."""
    from tests.test_interrupt import quantize_cmd, run
    from tests.tiny import tiny_model_dir

    root = tmp_path_factory.mktemp("moe-resume")
    src = tiny_model_dir(str(root / "m"), "qwen3_moe", num_hidden_layers=4, hidden_size=128, moe_intermediate_size=64)
    r = run(quantize_cmd(src, calib, root / "ref"))
    assert "Loading weights" in r.stderr, r.stderr[-2000:]  # transformers' whole-model load: eager, not lazy
    return src, root / "ref"


@pytest.mark.parametrize("every", ["8", "1"], ids=["replayed", "saved-streams"])
def test_killed_then_resumed_is_bit_identical(moe_run, calib, tmp_path, every):
    """`loaq quantize` of the MoE SIGKILLed after layer 0's checkpoint, then ``--resume``: every weight file
    (codes, scales, zero points of the 4 x 16 linears, the rest) is byte-identical to the uninterrupted run's.
    ``--stream-checkpoint-every`` 8: no streams were saved, the resumed run replays layer 0 (routing included)
    from the captured inputs with its stored codes; 1: it reloads the streams saved after a finished layer
    (the setting does not change the codes)."""
    import re
    import shutil
    import signal

    from tests.test_interrupt import QUANT_POINTS, assert_same_files, interrupt, quantize_cmd, run

    src, ref = moe_run
    out = tmp_path / "runs" / "q"
    out.parent.mkdir()
    ready, still, _ = QUANT_POINTS["checkpoint"]

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.partial", ignore_errors=True)

    cmd = quantize_cmd(src, calib, out, "--stream-checkpoint-every", every)

    def saved(e):  # layer 0 finished, and with --stream-checkpoint-every 1 its streams written after it too
        return ready(e, out) and (every != "1" or any(d.startswith("streams-") for d in os.listdir(f"{out}.partial")))

    rc, _ = interrupt(cmd, signal.SIGKILL, saved, lambda e: still(e, out), reset, tmp_path)
    assert rc == -signal.SIGKILL and os.listdir(out.parent) == ["q.partial"]
    layers = sorted(os.listdir(f"{out}.partial/layers"))
    assert layers[0] == "0000.safetensors" and len(layers) < 4, layers  # stopped after layer 0, before the end
    streams = [d for d in os.listdir(f"{out}.partial") if d.startswith("streams-")]
    assert bool(streams) == (every == "1"), streams
    resumed = run(cmd + ["--resume"]).stderr
    # it continued after the finished layers (its progress bar starts there), not from scratch
    assert int(re.search(r"loaq layers:[^|]*\|[^|]*\| (\d+)/4", resumed).group(1)) == len(layers), resumed[-2000:]
    assert not os.path.exists(f"{out}.partial")
    weights = sorted(os.listdir(ref / "weights"))
    assert weights == ["index.json", *(f"layer-{i:05d}.safetensors" for i in range(4)), "rest.safetensors"]
    assert sorted(os.listdir(out / "weights")) == weights
    assert_same_files(out / "weights", ref / "weights", weights)
