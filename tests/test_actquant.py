"""W4A4 (loaq.actquant): the fake quantizer against a plain-torch reference, the quantized stream X̂
carrying quantized activations, and native checkpoints that simulate W4A4 (with the online R4)."""

import copy
import json

import pytest
import torch
from safetensors.torch import load_file

from loaq import actquant
from loaq.actquant import ActSpec
from loaq.arch import arch_of
from loaq.checkpoint import LayerStore, save_native
from loaq.config import Method, QuantConfig
from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.pipeline import capture_inputs, quantize_model
from loaq.rotation import RotationSpec, rotate_model
from loaq.solver import factorize, gptq_solve
from loaq.stats import Stats
from tests.test_pipeline import _load_without_tokenizer
from tests.tiny import tiny_model, tokens

W4 = GridSpec(4, 0, False)


def plain_fake_quant(x, sym):
    """Per-row 4-bit min-max fake quantization written out in plain torch (the formulas of loaq.kernels.w4a4_ref)."""
    x = x.float()
    if sym:
        s = x.abs().amax(-1, keepdim=True) / torch.full_like(x[..., :1], 7.0)
        s = torch.where(s == 0, torch.ones_like(s), s)
        return torch.clamp(torch.round(x / s), -8, 7) * s
    lo, hi = x.amin(-1, keepdim=True).clamp(max=0), x.amax(-1, keepdim=True).clamp(min=0)
    s = (hi - lo) / torch.full_like(lo, 15.0)
    s = torch.where(s == 0, torch.ones_like(s), s)
    z = torch.round(-lo / s)
    return (torch.clamp(torch.round(x / s) + z, 0, 15) - z) * s


@pytest.mark.parametrize("sym", [False, True])
def test_fake_quantizer_matches_plain_torch_bit_for_bit(sym):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 17, 96, generator=g) * torch.rand(3, 17, 1, generator=g) * 4
    x[0, 0] = 0  # an all-zero token
    x[1, 2] = x[1, 2].abs()  # one-signed tokens
    y = actquant.fake_quantize(x, sym)
    assert torch.equal(y, plain_fake_quant(x, sym))
    assert (y[2].unsqueeze(-1) == y[2].unsqueeze(-2)).sum() > 0 and not torch.equal(y, x)
    assert torch.equal(actquant.fake_quantize(x.bfloat16(), sym), plain_fake_quant(x.bfloat16(), sym).bfloat16())


def test_w4a4_needs_4_bit_per_channel_weights():
    with pytest.raises(LoaQError, match="needs 4-bit per-channel weights"):
        QuantConfig(spec=GridSpec(3, 0, False), act=ActSpec(4))
    with pytest.raises(LoaQError, match="--group-size 0"):
        QuantConfig(spec=GridSpec(4, 32, False), act=ActSpec(4))
    with pytest.raises(LoaQError, match="--act-bits 8"):
        ActSpec(8)


def test_quantized_stream_carries_quantized_activations():
    """GPTQ W4A4's q/k/v of layer 0 are GPTQ on H = Σ x̂x̂ᵀ with x̂ = Q_a(Norm(h)); W16's are not."""
    model = tiny_model("llama")
    arch = arch_of(model.config)
    X = tokens()
    hs, _ = capture_inputs(model, arch, X, 4, "cpu")
    norm = model.model.layers[0].input_layernorm
    cfg = QuantConfig(spec=W4, method=Method("gptq"), act=ActSpec(4))
    st = Stats(64)
    with torch.no_grad():
        for h in hs:
            st.add(actquant.fake_quantize(norm(h), False))
    attn = model.model.layers[0].self_attn
    W = torch.cat([attn.q_proj.weight, attn.k_proj.weight, attn.v_proj.weight]).detach()
    ref = gptq_solve(W, factorize(st.H, 0.01), W4, cfg.solver)
    res = quantize_model(copy.deepcopy(model), arch, X, cfg, batch_size=4, progress=False)
    w16 = quantize_model(copy.deepcopy(model), arch, X, QuantConfig(spec=W4, method=Method("gptq")), batch_size=4,
                         progress=False)
    got = torch.cat([res[f"model.layers.0.self_attn.{n}"].codes for n in ("q_proj", "k_proj", "v_proj")])
    assert torch.equal(got, ref.codes)
    assert not torch.equal(res["model.layers.1.mlp.down_proj"].codes, w16["model.layers.1.mlp.down_proj"].codes)


def _quantized_rotated(kind="qwen2", method="loaq", act=ActSpec(4), init="minmax", store=None, calib=None):
    m = tiny_model(kind)
    rot = rotate_model(m, arch_of(m.config), seed=3)
    cfg = QuantConfig(spec=GridSpec(4, 0, False, init), method=Method(method), act=act,
                      rotation=RotationSpec("hadamard", 3))
    calib = tokens() if calib is None else calib
    res = quantize_model(m, arch_of(m.config), calib, cfg, batch_size=4, progress=False, store=store)
    return m, res, rot, cfg


def test_native_checkpoint_simulates_w4a4_and_online_r4(tmp_path):
    m, res, rot, cfg = _quantized_rotated()
    out = str(tmp_path / "ck")
    save_native(out, m, None, res, {"config": cfg.to_dict(), "activations": cfg.act.meta()}, force=False,
                rotation=rot)
    meta = json.load(open(f"{out}/loaq.json"))
    assert meta["activations"] == {"bits": 4, "symmetric": False}
    assert meta["rotation"]["kind"] == "hadamard" and meta["rotation"]["seed"] == 3
    assert meta["rotation"]["r4"] == {"order": 128, "had_k_order": 1, "kind": "hadamard"}
    assert load_file(f"{out}/rotation.safetensors") == {}  # 128 is a power of two: no had_k
    X = tokens(seed=9)
    with torch.no_grad():
        w4a4 = m(X).logits
        loaded, _, _ = _load_without_tokenizer(out)
        assert torch.equal(loaded(X).logits, w4a4)
        # W16 evaluation of the same checkpoint: the same weights without the activation quantizer
        meta["activations"] = None
        json.dump(meta, open(f"{out}/loaq.json", "w"))
        w16, _, _ = _load_without_tokenizer(out)
        w16_logits = w16(X).logits
        for lin in (m.get_submodule(n) for n in res):
            for k, hook in list(lin._forward_pre_hooks.items()):
                if isinstance(hook, actquant.ActQuantizer):
                    del lin._forward_pre_hooks[k]
        assert torch.equal(w16_logits, m(X).logits)
        assert not torch.allclose(w16_logits, w4a4, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("kind", ["llama", "mistral", "qwen2", "qwen3"])  # Phi-3, Gemma 3: benchmarks/families.py
def test_every_method_with_rotation_neuqi_and_w4a4(kind):
    """All six methods on every architecture with Hadamard + NeUQI + W4A4: the quantized model stays
    close to the float one (0.4-0.65 here; without the online R4 it is above 1.1)."""
    ref = tiny_model(kind)
    X = tokens(seed=5)
    with torch.no_grad():
        fp = ref(X).logits
    for method in ("rtn", "gptq", "gptaq", "qronos", "lloa", "loaq"):
        m, res, _, _ = _quantized_rotated(kind, method, init="neuqi", calib=tokens(4, 16))
        assert len(res) == 14 and all(int(r.codes.max()) <= 15 for r in res.values())
        with torch.no_grad():
            err = ((m(X).logits - fp).norm() / fp.norm()).item()
        assert err < 0.8, (method, err)


def test_resume_with_rotation_neuqi_and_w4a4_is_bit_identical(tmp_path):
    _, full, _, cfg = _quantized_rotated("qwen3", init="neuqi")

    class Killed(Exception):
        pass

    store = LayerStore(str(tmp_path / "w"), cfg.digest("x"), cfg.spec)
    real = store.save_layer

    def save_then_die(i, res, streams, *extra):
        real(i, res, streams, *extra)
        if i == 0:
            raise Killed

    store.save_layer = save_then_die
    with pytest.raises(Killed):
        _quantized_rotated("qwen3", init="neuqi", store=store)
    m, resumed, _, _ = _quantized_rotated("qwen3", init="neuqi", store=LayerStore(str(tmp_path / "w"), cfg.digest("x"), cfg.spec))
    assert sorted(resumed) == sorted(full)
    assert all(torch.equal(full[n].codes, resumed[n].codes) and torch.equal(full[n].scales, resumed[n].scales)
               for n in full)
    # resumed layers carry the activation quantizer too
    assert any(isinstance(h, actquant.ActQuantizer) for h in m.model.layers[0].self_attn.q_proj._forward_pre_hooks.values())
