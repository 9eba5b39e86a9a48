"""The dispatcher: right kernel class per device / bits, each kernel's refusal reasons, one-line errors,
end-to-end numerics."""

import re

import pytest
import torch

from loaq.errors import LoaQError
from loaq.kernels.dispatch import (
    KERNELS, CpuW4A4Kernel, CpuWNA16Kernel, TritonW4A4Kernel, TritonWNA16Kernel, apply_linear, check_linear,
    choose_kernel, prepare_linear,
)
from loaq.kernels.hadamard_ref import hadamard_transform_ref
from loaq.kernels.kernel import LinearConfig
from loaq.kernels.w4a4_ref import quantize_activations_ref, w4a4_matmul_ref
from loaq.kernels.wna16_ref import wna16_matmul_ref
from tests.kernels.helpers import DEVICE, make_packed, rel_err

WNA16 = {"cpu": CpuWNA16Kernel, "cuda": TritonWNA16Kernel}
W4A4 = {"cpu": CpuW4A4Kernel, "cuda": TritonW4A4Kernel}


@pytest.mark.parametrize("device", sorted({"cpu", DEVICE}))
def test_wna16_end_to_end_with_hadamard(device):
    w = make_packed(3, 24, 128, 64, True, torch.bfloat16, device="cpu")
    layer = prepare_linear(w, device, hadamard=True)
    assert type(layer) is WNA16[device]
    x = torch.randn(2, 3, 128).bfloat16()
    y = apply_linear(x.to(device), layer)
    ref = wna16_matmul_ref(hadamard_transform_ref(x), w)
    assert y.shape == (2, 3, 24) and rel_err(y.cpu(), ref) < 3e-2


@pytest.mark.parametrize("device", sorted({"cpu", DEVICE}))
@pytest.mark.parametrize("sym", [True, False])
def test_w4a4_end_to_end(device, sym):
    w = make_packed(4, 24, 96, None, False, torch.float16, device="cpu")
    layer = prepare_linear(w, device, act_bits=4, act_sym=sym)
    assert type(layer) is W4A4[device]
    x = torch.randn(5, 96).half() if device == "cuda" else torch.randn(5, 96)
    y = apply_linear(x.to(device), layer)
    ref = w4a4_matmul_ref(quantize_activations_ref(x, sym), w, x.dtype)
    assert rel_err(y.cpu(), ref) < 1e-3


def config(device="cpu", bits=4, group=None, act_bits=16, k=128, hadamard=False, had_k=1):
    return LinearConfig(device, bits, (24, k), group, act_bits, True, hadamard, had_k)


@pytest.mark.parametrize("kwargs,kernel", [
    (dict(device="cpu", bits=2, group=32), CpuWNA16Kernel),
    (dict(device="cpu", bits=3, hadamard=True, k=192, had_k=12), CpuWNA16Kernel),
    (dict(device="cpu", act_bits=4), CpuW4A4Kernel),
    (dict(device="cuda", bits=3, group=128), TritonWNA16Kernel),
    (dict(device="cuda", act_bits=4, hadamard=True), TritonW4A4Kernel),
])
def test_dispatch_picks_by_device_and_bits(kwargs, kernel):
    """Checking needs no GPU: the CUDA configurations pick the Triton kernels here too."""
    assert choose_kernel(config(**kwargs)) is kernel


@pytest.mark.parametrize("kernel,kwargs,reason", [
    (CpuWNA16Kernel, dict(device="cuda"), "needs CPU tensors, got cuda"),
    (CpuWNA16Kernel, dict(act_bits=4), "needs act_bits=16, got 4"),
    (CpuWNA16Kernel, dict(bits=8), "8-bit weights are not supported (use 2, 3 or 4 bits)"),
    (CpuWNA16Kernel, dict(group=48), "group size 48 is not a multiple of 32 (use 32, 64, 128 or per-channel)"),
    (CpuWNA16Kernel, dict(hadamard=True, k=96), "online Hadamard needs in_features = K * 2**m with had_k of size K, "
                                                "got 96 and K=1"),
    (CpuW4A4Kernel, dict(device="meta", act_bits=4), "needs CPU tensors, got meta"),
    (CpuW4A4Kernel, dict(), "needs act_bits=4, got 16"),
    (CpuW4A4Kernel, dict(act_bits=4, group=32), "needs 4-bit per-channel weights, got 4-bit with group size 32"),
    (CpuW4A4Kernel, dict(act_bits=4, bits=3), "needs 4-bit per-channel weights, got 3-bit with per-channel"),
    (CpuW4A4Kernel, dict(act_bits=4, hadamard=True, k=160, had_k=12), "online Hadamard needs in_features"),
    (TritonWNA16Kernel, dict(device="meta"), "needs CUDA tensors, got meta"),
    (TritonWNA16Kernel, dict(device="cuda", act_bits=8), "needs act_bits=16, got 8"),
    (TritonWNA16Kernel, dict(device="cuda", group=16), "group size 16 is not a multiple of 32"),
    (TritonW4A4Kernel, dict(device="cuda"), "needs act_bits=4, got 16"),
    (TritonW4A4Kernel, dict(device="cuda", act_bits=4, group=128), "needs 4-bit per-channel weights"),
])
def test_each_kernel_says_why_it_refuses(kernel, kwargs, reason):
    ok, got = kernel.can_implement(config(**kwargs))
    assert not ok and got.startswith(reason), got


def test_triton_kernels_need_cuda_unless_interpreted(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert TritonWNA16Kernel.can_implement(config()) == (False, "needs CUDA tensors, got cpu")
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert TritonWNA16Kernel.can_implement(config()) == (True, None)


def test_triton_kernels_need_triton(monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_triton(name, *args, **kwargs):
        if name == "triton":
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_triton)
    assert TritonW4A4Kernel.can_implement(config("cuda", act_bits=4)) == (False, "needs Triton (install loaq[kernels])")


def test_a_restricted_kernel_list_runs_the_triton_class_on_this_device():
    """The vLLM plugin's CUDA class passes only the Triton kernels (on CPU: under TRITON_INTERPRET=1)."""
    w = make_packed(4, 24, 128, 32, False, torch.float16, device="cpu")
    layer = prepare_linear(w, DEVICE, kernels=(TritonWNA16Kernel, TritonW4A4Kernel))
    assert type(layer) is TritonWNA16Kernel
    x = torch.randn(3, 128).half()
    assert rel_err(apply_linear(x.to(DEVICE), layer).cpu(), wna16_matmul_ref(x, w)) < 3e-3


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=8), "CpuWNA16Kernel: 8-bit weights are not supported"),
    (dict(group=16), "CpuWNA16Kernel: group size 16 is not a multiple of 32"),
    (dict(group=32, act_bits=4), "CpuW4A4Kernel: needs 4-bit per-channel weights"),
    (dict(act_bits=8), "CpuW4A4Kernel: needs act_bits=4, got 8"),
    (dict(device="meta"), "TritonWNA16Kernel: needs CUDA tensors, got meta"),
    (dict(hadamard=True, k=96), "CpuWNA16Kernel: online Hadamard needs in_features = K * 2**m"),
])
def test_unsupported_configurations_raise_one_line_with_every_reason(kwargs, message):
    bits = kwargs.get("bits", 4)
    w = make_packed(min(bits, 8), 8, kwargs.get("k", 64), kwargs.get("group"), False, torch.float16, device="cpu")
    args = dict(act_bits=kwargs.get("act_bits", 16), hadamard=kwargs.get("hadamard", False))
    with pytest.raises(LoaQError, match=re.escape(message)) as info:
        prepare_linear(w, kwargs.get("device", "cpu"), **args)
    line = str(info.value)
    assert "\n" not in line and line.startswith("no kernel runs ")
    assert all(f"{k.__name__}: " in line for k in KERNELS)
    assert check_linear(w, kwargs.get("device", "cpu"), **args) == line
