"""The two-stream pipeline on tiny random models of every supported architecture."""

import copy

import pytest
import torch
from safetensors.torch import load_file

from loaq.arch import arch_of
from loaq.checkpoint import LayerStore, load_native, save_native
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
        assert len(res) == 14
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


def test_resume_after_interruption_is_bit_identical(tmp_path):
    _, full = run("qwen3", Method("loaq", alpha=0.5, beta=0.5))

    class Killed(Exception):
        pass

    store = LayerStore(str(tmp_path / "w"), "d", SPEC)
    real_save = store.save_layer

    def save_then_die(i, res, streams):
        real_save(i, res, streams)
        if i == 0:
            raise Killed

    store.save_layer = save_then_die
    with pytest.raises(Killed):
        run("qwen3", Method("loaq", alpha=0.5, beta=0.5), store=store)
    assert store.load_streams()[0] == 1
    resumed_store = LayerStore(str(tmp_path / "w"), "d", SPEC)
    _, resumed = run("qwen3", Method("loaq", alpha=0.5, beta=0.5), store=resumed_store)
    assert sorted(resumed) == sorted(full) and codes_equal(full, resumed)
    assert all(torch.equal(full[n].scales, resumed[n].scales) for n in full)


def test_native_checkpoint_round_trip(tmp_path):
    m, res = run("qwen2", Method("gptq"))
    save_native(str(tmp_path / "ck"), m, None, res, {"config": QuantConfig(spec=SPEC).to_dict()}, force=False)
    stored = load_file(str(tmp_path / "ck" / "quantized.safetensors"))
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
