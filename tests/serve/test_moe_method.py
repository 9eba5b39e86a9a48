"""The plugin's fused-MoE method (:mod:`loaq.serve.moe`) without an engine: vLLM's expert mapping names load through its
weight loader, and its ``loaq::moe`` forward equals the dequantized experts, for 2/3/4-bit, per channel and grouped."""

import copy
import types

import pytest
import torch

from loaq import moe
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


@pytest.mark.parametrize("spec", [GridSpec(2, 0, False), GridSpec(3, 32, True), GridSpec(4, 32, False)],
                         ids=lambda s: f"w{s.bits}g{s.group_size}{'sym' if s.symmetric else 'asym'}")
def test_moe_method_loads_and_runs_the_experts(fp, spec):
    from loaq.serve.moe import LoaQMoEMethod

    q = copy.deepcopy(fp)
    res = quantize_model(q, arch_of(q.config), None, QuantConfig(spec=spec, method=Method("rtn")), progress=False)
    method = LoaQMoEMethod(weight_args(spec), types.SimpleNamespace(activation=None), "model.layers.1.mlp.experts")
    layer = torch.nn.Module()
    method.create_weights(layer, 4, 64, 32, torch.float32)
    for e in range(4):
        for proj, shard in SHARDS.items():
            for k, v in pack_layer(res[f"model.layers.1.mlp.experts.{e}.{proj}"], spec).items():
                p = getattr(layer, f"{'w2' if shard == 'w2' else 'w13'}_{k}")
                assert p.weight_loader(p, v, f"experts.{e}.{proj}.{k}", shard, e, True)
    method.process_weights_after_loading(layer)
    assert not [n for n, _ in layer.named_parameters()]  # the kernels keep the weights
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
