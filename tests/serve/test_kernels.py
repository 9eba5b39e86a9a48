"""The plugin's kernel classes exercised directly, as vLLM drives them: ``create_weights``, the checkpoint's
per-shard tensors through each parameter's weight loader (a fused qkv of three shards), then
``process_weights_after_loading`` and ``apply_weights`` against the torch references. The CUDA class
(Triton) runs on CPU tensors under ``TRITON_INTERPRET=1``; the config routing is checked without an engine."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from loaq.kernels.hadamard_ref import hadamard_transform_ref
from loaq.kernels.w4a4_ref import quantize_activations_ref, w4a4_matmul_ref
from loaq.kernels.wna16_ref import wna16_matmul_ref
from loaq.serve import scheme as S
from loaq.serve.kernels import LoaQCPULinearKernel, LoaQTritonLinearKernel
from tests.kernels.helpers import make_packed, rel_err
from tests.serve.checkpoints import hadamard_12

PARTS = [32, 16, 16]  # q, k, v rows: the fused layer's shards
SHARDS = ["q", "k", "v"]

# (bits, group, asym, act_sym or None, hadamard)
CASES = [(2, 32, True, None, False), (3, None, True, None, False), (3, 32, False, None, True),
         (4, None, False, None, False), (4, 64, True, None, True), (4, None, True, True, True),
         (4, None, False, False, False), (4, None, True, False, True)]


def weight_args(bits, group, asym):
    kw = dict(num_bits=bits, type="int", symmetric=not asym, dynamic=False)
    return QuantizationArgs(**kw, strategy="group", group_size=group) if group else QuantizationArgs(**kw, strategy="channel")


def build_layer(kernel_cls, bits, group, asym, act_sym, had_k, k, dtype, monkeypatch):
    """A fused layer as vLLM builds it, loaded shard by shard; returns (layer, scheme, shards)."""
    monkeypatch.setattr(S, "kernel_class", lambda: kernel_cls)
    scheme = S.LoaQLinearScheme(weight_args(bits, group, asym), act_sym, had_k, "model.layers.0.self_attn.qkv_proj")
    layer = torch.nn.Module()
    scheme.create_weights(layer, output_size=sum(PARTS), input_size=k, output_partition_sizes=PARTS,
                          input_size_per_partition=k, params_dtype=dtype, weight_loader=None)
    shards = [make_packed(bits, n, k, group, asym, torch.float32, seed=i, device="cpu") for i, n in enumerate(PARTS)]
    for sid, w in zip(SHARDS, shards):
        tensors = {"weight_packed": w.weight_packed, "weight_scale": w.weight_scale,
                   "weight_shape": torch.tensor(w.shape, dtype=torch.int64)}
        if asym:
            tensors["weight_zero_point"] = w.weight_zero_point
        for name, t in tensors.items():
            p = getattr(layer, name)
            p.weight_loader(p, t, sid)
    layer.bias = None
    scheme.process_weights_after_loading(layer)
    return layer, scheme, shards


def reference(x, shards, act_sym, had_k):
    if had_k is not False:
        x = hadamard_transform_ref(x, had_k)
    if act_sym is None:
        return torch.cat([wna16_matmul_ref(x, w) for w in shards], -1)
    return torch.cat([w4a4_matmul_ref(quantize_activations_ref(x, act_sym), w, x.dtype) for w in shards], -1)


@pytest.mark.parametrize("kernel_cls,dtype", [(LoaQCPULinearKernel, torch.float32), (LoaQTritonLinearKernel, torch.bfloat16)],
                         ids=["cpu", "triton"])
@pytest.mark.parametrize("bits,group,asym,act_sym,hadamard", CASES)
def test_kernel_class_gives_the_reference(kernel_cls, dtype, bits, group, asym, act_sym, hadamard, monkeypatch):
    k = 192 if hadamard else 128
    had_k = hadamard_12() if hadamard else False
    if hadamard and group == 64:
        group = 32  # 192 = 6 * 32
    layer, scheme, shards = build_layer(kernel_cls, bits, group, asym, act_sym, had_k, k, dtype, monkeypatch)
    assert type(scheme.kernel) is kernel_cls and layer.weight_packed is None  # the kernel holds its own copy
    x = torch.randn(5, k, generator=torch.Generator().manual_seed(7)).to(dtype)
    bias = torch.randn(sum(PARTS)).to(dtype)
    y = scheme.apply_weights(layer, x, bias)
    ref = reference(x.float(), shards, act_sym, had_k) + bias.float()  # fp32 reference of the same inputs
    assert y.shape == (5, sum(PARTS)) and y.dtype == dtype
    assert rel_err(y, ref) < (1e-5 if dtype == torch.float32 else 1e-2)


def test_loader_refuses_a_wrong_shape(monkeypatch):
    monkeypatch.setattr(S, "kernel_class", lambda: LoaQCPULinearKernel)
    scheme = S.LoaQLinearScheme(weight_args(3, None, False), None, False, "m.qkv_proj")
    layer = torch.nn.Module()
    scheme.create_weights(layer, output_size=64, input_size=128, output_partition_sizes=PARTS,
                          input_size_per_partition=128, params_dtype=torch.float32, weight_loader=None)
    dense_3bit = torch.zeros(32, 12, dtype=torch.int32)  # 128 * 3 / 32 words: stock vLLM's 3-bit allocation
    with pytest.raises(ValueError, match=r"expected \(32, 13\).*loaq-export"):
        layer.weight_packed.weight_loader(layer.weight_packed, dense_3bit, "q")


def act(bits=4, strategy="token", sym=True):
    return QuantizationArgs(num_bits=bits, type="int", symmetric=sym, dynamic=True, strategy=strategy)


@pytest.mark.parametrize("weights,inputs,fmt,kind", [
    (weight_args(2, 32, True), None, "pack-quantized", "wna16"),
    (weight_args(3, None, False), None, "pack-quantized", "wna16"),
    (weight_args(4, None, True), act(sym=False), "pack-quantized", "w4a4"),
    (weight_args(4, None, False), act(), "pack-quantized", "w4a4"),
    (weight_args(8, None, False), None, "pack-quantized", None),
    (weight_args(4, None, False), act(bits=8), "pack-quantized", None),
    (weight_args(4, None, False), None, "int-quantized", None),
])
def test_which_groups_the_plugin_owns(weights, inputs, fmt, kind):
    assert S.loaq_kind(weights, inputs, fmt) == kind


def config(groups: dict, transform=None):
    """A plugin config as vLLM builds it from an export's ``quantization_config`` (which records the version of
    compressed-tensors that packed it: 3-bit layouts differ between versions)."""
    return S.LoaQCompressedTensorsConfig.from_config(
        {"quant_method": "compressed-tensors", "format": "pack-quantized", "ignore": ["lm_head"], "version": "0.17.0",
         "config_groups": {name: {"targets": t, "weights": w.model_dump(), "input_activations": a and a.model_dump()}
                           for name, (t, w, a) in groups.items()}})


def test_config_routes_and_refuses_w4a4_it_cannot_run():
    from vllm.model_executor.layers.linear import LinearBase

    layer = LinearBase.__new__(LinearBase)
    c = config({"a": (["x.a"], weight_args(3, 32, True), None), "b": (["x.b"], weight_args(4, 32, False), act()),
                "c": (["x.c"], weight_args(8, None, True), None)})
    s = c._loaq_scheme(layer, "x.a")
    assert isinstance(s, S.LoaQLinearScheme) and (s.bits, s.group_size, s.symmetric, s.act_bits) == (3, 32, False, 16)
    assert c._loaq_scheme(layer, "x.c") is None  # 8-bit: vLLM's own scheme
    with pytest.raises(ValueError, match="W4A4 with 4-bit group weights .* has no LoaQ kernel"):
        c._loaq_scheme(layer, "x.b")


def test_plugin_refuses_another_vllm_and_registers_once():
    import vllm
    from vllm.model_executor.layers.quantization import get_quantization_config

    from loaq.errors import LoaQError
    from loaq.serve.plugin import check_vllm_version, register

    check_vllm_version(vllm.__version__)
    with pytest.raises(LoaQError, match=r"built for vLLM 0\.32\.x, found 0\.33\.0; install loaq\[serve\]"):
        check_vllm_version("0.33.0")
    register()
    register()
    assert get_quantization_config("compressed-tensors") is S.LoaQCompressedTensorsConfig
