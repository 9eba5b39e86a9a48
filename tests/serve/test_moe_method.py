"""The plugin's fused-MoE method (:mod:`loaq.serve.moe`) without an engine: vLLM's expert mapping names load through its
weight loader, and its ``loaq::moe`` forward equals the dequantized experts, for 2/3/4-bit, per channel and grouped,
float32 or float16 scales, and for W4A4 experts (int4 per-token inputs, the CPU W4A4 kernel) the experts with the activation fake quantizer."""

import copy
import types

import pytest
import torch

from loaq import moe
from loaq.actquant import ActSpec
from loaq.arch import arch_of
from loaq.config import Method, QuantConfig
from loaq.export.pack import pack_layer
from loaq.export.scheme import weight_args
from loaq.grids import GridSpec
from loaq.pipeline import quantize_model
from tests.tiny import tiny_model

SHARDS = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}


@pytest.fixture(scope="module")
def fp():
    m = tiny_model("qwen3_moe")
    return moe.unfuse(m, arch_of(m.config))


def _name(spec: GridSpec, act: ActSpec = ActSpec()) -> str:
    grid = f"w{spec.bits}g{spec.group_size}{'sym' if spec.symmetric else 'asym'}"
    grid += "-f16" if spec.scale_dtype == "float16" else ""
    return grid + (f"-a4{'sym' if act.symmetric else 'asym'}" if act.enabled else "")


CASES = [(GridSpec(2, 0, False), ActSpec()), (GridSpec(3, 32, True), ActSpec()), (GridSpec(4, 32, False), ActSpec()),
         (GridSpec(2, 32, False, scale_dtype="float16"), ActSpec()),  # float16 scales widen exactly into float32
         (GridSpec(4, 0, False), ActSpec(4)), (GridSpec(4, 0, True), ActSpec(4, True))]


@pytest.mark.parametrize("spec, act", CASES, ids=[_name(*c) for c in CASES])
def test_moe_method_loads_and_runs_the_experts(fp, spec, act):
    """The reference is the RTN model's experts, with the activation fake quantizer on every expert linear for W4A4
    (:func:`loaq.pipeline.rtn_layer` attaches it); the method prepares those experts with the W4A4 kernel
    (``CpuW4A4Kernel``: int4 per-token input codes, integer GEMM)."""
    from loaq.kernels.dispatch import CpuW4A4Kernel, CpuWNA16Kernel
    from loaq.kernels.moe import _EXPERTS
    from loaq.serve.moe import LoaQMoEMethod

    q = copy.deepcopy(fp)
    res = quantize_model(q, arch_of(q.config), None, QuantConfig(spec=spec, method=Method("rtn"), act=act),
                         progress=False)
    method = LoaQMoEMethod(weight_args(spec), types.SimpleNamespace(activation=None), "model.layers.1.mlp.experts",
                           act_sym=act.symmetric if act.enabled else None)
    layer = torch.nn.Module()
    method.create_weights(layer, 4, 64, 32, torch.float32)
    for e in range(4):
        for proj, shard in SHARDS.items():
            for k, v in pack_layer(res[f"model.layers.1.mlp.experts.{e}.{proj}"], spec).items():
                p = getattr(layer, f"{'w2' if shard == 'w2' else 'w13'}_{k}")
                assert p.weight_loader(p, v, f"experts.{e}.{proj}.{k}", shard, e, True)
    method.process_weights_after_loading(layer)
    assert not [n for n, _ in layer.named_parameters()]  # the kernels keep the weights
    kernels = {type(k) for ks in _EXPERTS[layer.loaq_moe_handle] for k in ks}
    assert kernels == {CpuW4A4Kernel if act.enabled else CpuWNA16Kernel}
    x = torch.randn(40, 64, generator=torch.Generator().manual_seed(0))
    block = q.model.layers[1].mlp
    _, w, ids = block.gate(x)
    torch.testing.assert_close(method.apply(layer, x, w, ids), block.experts(x, ids, w), rtol=1e-5, atol=1e-5)


def test_moe_method_refuses_a_wrong_shape(fp):
    from loaq.serve.moe import LoaQMoEMethod

    spec = GridSpec(4, 0, True)
    method = LoaQMoEMethod(weight_args(spec), types.SimpleNamespace(activation=None), "m.experts")
    layer = torch.nn.Module()
    method.create_weights(layer, 4, 64, 32, torch.float32)
    with pytest.raises(ValueError, match=r"m.experts.w2_weight_packed\[0\] \(w2\): checkpoint tensor has shape"):
        layer.w2_weight_packed.weight_loader(layer.w2_weight_packed, torch.zeros(3, 3, dtype=torch.int32), "", "w2", 0)


@pytest.mark.parametrize("spec", [GridSpec(4, 0, False), GridSpec(4, 32, False)], ids=_name)
def test_w4a4_experts_get_the_method_or_one_line(spec):
    """A LoaQ export's expert group with int4 per-token ``input_activations`` gets :class:`LoaQMoEMethod` with 4-bit
    activations when its weights are 4-bit per channel; grouped weights are refused as for linears."""
    from loaq.export.scheme import FORMAT, act_args
    from loaq.serve.moe import loaq_moe_method

    d = {"weights": weight_args(spec), "input_activations": act_args(ActSpec(4).meta()), "format": FORMAT}
    config = types.SimpleNamespace(get_scheme_dict=lambda _layer, _name: d, config={"loaq_format": {}},
                                   kernels_mode=lambda: "auto")
    layer = types.SimpleNamespace(ckpt_gate_proj_name="gate_proj", ckpt_up_proj_name="up_proj",
                                  ckpt_down_proj_name="down_proj", moe_config=types.SimpleNamespace(activation=None))
    if spec.group_size:
        with pytest.raises(ValueError, match="m.experts: W4A4 with 4-bit group weights .* has no LoaQ kernel"):
            loaq_moe_method(config, layer, "m.experts")
        return
    method = loaq_moe_method(config, layer, "m.experts")
    assert (type(method).__name__, method.act_bits, method.act_sym) == ("LoaQMoEMethod", 4, False)
