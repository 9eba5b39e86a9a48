"""Phi-3 and Gemma 3 (issue #17): registration, per-layer kwargs, streams through sandwich norms, rotation,
export ↔ native logits. Served by vLLM: tests/serve/test_families_served.py (in-process engines);
benchmarks/families.py serves each family through a real OpenAI server."""

import copy

import pytest
import torch

from loaq import api
from loaq.arch import GEMMA3, PHI3, arch_of
from loaq.config import Calibration, Method, QuantConfig
from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.pipeline import capture_inputs, quantize_layer
from loaq.streams import StreamOptions, Streams
from loaq.rotation import RotationSpec, fuse_norm, rotate_model
from tests.tiny import tiny_model, tiny_model_dir, tokens


@pytest.mark.parametrize("kind, arch, linears", [
    ("phi3", PHI3, ["self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj"]),
    ("gemma3", GEMMA3, ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                        "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]),
])
def test_registered_by_architecture_and_model_type(kind, arch, linears):
    m = tiny_model(kind)
    assert arch_of(m.config) is arch
    cfg = copy.deepcopy(m.config)
    cfg.architectures = None  # GGUF-style configs carry only model_type
    assert arch_of(cfg) is arch
    assert arch.linear_names() == linears
    assert all(isinstance(m.model.layers[0].get_submodule(n), torch.nn.Linear) for n in linears)


def test_an_unsupported_family_is_refused_naming_the_new_ones():
    from transformers import GPT2Config

    with pytest.raises(LoaQError, match="unsupported architecture GPT2LMHeadModel; supported: .*Phi3ForCausalLM, "
                                        "Gemma3ForCausalLM"):
        arch_of(GPT2Config(architectures=["GPT2LMHeadModel"]))


def _layer_outputs(model, x):
    outs = []
    hooks = [l.register_forward_hook(lambda _m, _a, o: outs.append(o[0] if isinstance(o, tuple) else o))
             for l in model.model.layers]
    with torch.no_grad():
        logits = model(x).logits
    for h in hooks:
        h.remove()
    return outs, logits


def test_gemma3_capture_gives_each_layer_its_own_kwargs_and_scaled_embeddings():
    """Layer 0 is sliding-window (window 8), layer 1 global: their masks and rotary tables differ; the captured
    inputs carry the embedding scale √hidden and each layer re-run on its own kwargs reproduces the model."""
    m = tiny_model("gemma3")
    assert m.config.layer_types == ["sliding_attention", "full_attention"]
    x = tokens(4, 32)
    outs, _ = _layer_outputs(m, x)
    hs, kws = capture_inputs(m, GEMMA3, x, 2, "cpu")
    emb = m.model.embed_tokens.weight[x] * m.config.hidden_size ** 0.5
    assert torch.allclose(torch.cat(hs), emb, atol=1e-5)
    with torch.no_grad():
        h1 = torch.cat([m.model.layers[0](h, **kws[0][b]) for b, h in enumerate(hs)])
        assert torch.allclose(h1, outs[0], atol=1e-5)
        h2 = torch.cat([m.model.layers[1](h, **kws[1][b]) for b, h in enumerate(h1.split(2))])
        assert torch.allclose(h2, outs[1], atol=1e-5)
        wrong = torch.cat([m.model.layers[1](h, **kws[0][b]) for b, h in enumerate(h1.split(2))])
    assert (wrong - outs[1]).abs().max() > 1e-2  # layer 0's kwargs would be wrong for the global layer
    assert all(l.forward.__func__ is type(l).forward for l in m.model.layers)  # the pass-through is removed


def test_gemma3_float_stream_follows_the_model_through_the_post_norms():
    """After quantize_layer with LoaQ the float stream h is the float model's layer output (post-norms included),
    and ĥ is what the quantized layer computes."""
    m = tiny_model("gemma3")
    x = tokens(4, 32)
    outs, _ = _layer_outputs(m, x)
    hs, kws = capture_inputs(m, GEMMA3, x, 2, "cpu")
    streams = Streams(len(hs), True, StreamOptions(), "cpu")
    for b, h in enumerate(hs):
        streams.h.set(b, h)
        streams.h_hat.set(b, h)
        streams.set_kwargs(b, [kw[b] for kw in kws])
    cfg = QuantConfig(spec=GridSpec(3, 0, False), method=Method("loaq", alpha=0.25, beta=0.5))
    layer = m.model.layers[0]
    quantize_layer(layer, GEMMA3, streams, cfg, m.config.rms_norm_eps, "model.layers.0.")
    assert torch.allclose(torch.cat(list(streams.h)), outs[0], atol=1e-5)
    with torch.no_grad():
        q = torch.cat([layer(h, **kws[0][b]) for b, h in enumerate(hs)])
    assert torch.allclose(torch.cat(list(streams.h_hat)), q, atol=1e-4)
    assert (q - outs[0]).abs().max() > 1e-3  # really quantized


def test_one_plus_g_norm_fuses_exactly():
    """A Gemma-style ``1 + g`` norm fused into its reader: the norm keeps g = 0 and the function is unchanged."""
    m = tiny_model("gemma3")
    norm, q = m.model.layers[0].input_layernorm, m.model.layers[0].self_attn.q_proj
    x = torch.randn(5, m.config.hidden_size)
    with torch.no_grad():
        ref = q(norm(x))
        fuse_norm(norm, [q], offset=1.0)
        assert norm.weight.abs().max() == 0
        assert torch.allclose(q(norm(x)), ref, atol=1e-5)


def test_gemma3_rotation_is_refused_in_one_line_before_loading(tmp_path, calib):
    d = tiny_model_dir(str(tmp_path / "g"), "gemma3")
    cfg = QuantConfig(spec=GridSpec(4, 0, False), method=Method("gptq"), rotation=RotationSpec("hadamard"))
    with pytest.raises(LoaQError, match=r"^--rotate hadamard: Gemma 3 normalizes each sub-layer's output .*"
                                        r"quantize Gemma 3 without --rotate$"):
        api.check_model(d, cfg)
    with pytest.raises(LoaQError, match="Gemma 3"):
        rotate_model(tiny_model("gemma3"), GEMMA3)


@pytest.mark.parametrize("kind, config", [
    ("phi3", QuantConfig(spec=GridSpec(4, 0, False), method=Method("loaq"), rotation=RotationSpec("hadamard"))),
    ("gemma3", QuantConfig(spec=GridSpec(4, 0, False), method=Method("loaq"))),
])
def test_export_logits_equal_the_native_checkpoint(tmp_path, calib, kind, config):
    """quantize → float32 export → ``--check``; loaq.load(export) gives the native checkpoint's logits exactly,
    and (unrotated) so does transformers' own loader."""
    from transformers import AutoModelForCausalLM

    from loaq.checkpoint import load_native
    from loaq.export.check import check_export

    src = tiny_model_dir(str(tmp_path / kind), kind)
    native, export = str(tmp_path / "n"), str(tmp_path / "e")
    api.quantize(src, config, Calibration(source=calib, nsamples=4, seqlen=32), out=native, export=export,
                 export_dtype="float32", progress=False)
    assert check_export(export).startswith("ok")
    x = tokens(2, 16, vocab=320)
    with torch.no_grad():
        ref = load_native(native)[0](x).logits
        assert torch.equal(api.load(export).model(x).logits, ref)
        if config.rotation.kind == "none":
            assert torch.equal(AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)(x).logits, ref)
        fp = api.load(src).model(x).logits
    assert (fp - ref).abs().max() > 1e-3  # quantized, not the float model
