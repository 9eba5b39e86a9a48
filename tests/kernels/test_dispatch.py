"""The dispatcher: right kernel per device / bits, one-line errors, end-to-end numerics."""

import re

import pytest
import torch

from loaq.kernels.dispatch import apply_linear, check_linear, prepare_linear
from loaq.kernels.hadamard_ref import hadamard_transform_ref
from loaq.kernels.w4a4_ref import quantize_activations_ref, w4a4_matmul_ref
from loaq.kernels.wna16_ref import wna16_matmul_ref
from tests.kernels.helpers import DEVICE, make_packed, rel_err


@pytest.mark.parametrize("device", sorted({"cpu", DEVICE}))
def test_wna16_end_to_end_with_hadamard(device):
    w = make_packed(3, 24, 128, 64, True, torch.bfloat16, device="cpu")
    layer = prepare_linear(w, device, hadamard=True)
    assert layer.kernel == ("wna16" if device == "cuda" else "cpu_wna16")
    x = torch.randn(2, 3, 128).bfloat16()
    y = apply_linear(x.to(device), layer)
    ref = wna16_matmul_ref(hadamard_transform_ref(x), w)
    assert y.shape == (2, 3, 24) and rel_err(y.cpu(), ref) < 3e-2


@pytest.mark.parametrize("device", sorted({"cpu", DEVICE}))
@pytest.mark.parametrize("sym", [True, False])
def test_w4a4_end_to_end(device, sym):
    w = make_packed(4, 24, 96, None, False, torch.float16, device="cpu")
    layer = prepare_linear(w, device, act_bits=4, act_sym=sym)
    x = torch.randn(5, 96).half() if device == "cuda" else torch.randn(5, 96)
    y = apply_linear(x.to(device), layer)
    ref = w4a4_matmul_ref(quantize_activations_ref(x, sym), w, x.dtype)
    assert rel_err(y.cpu(), ref) < 1e-3


@pytest.mark.parametrize("kwargs,message", [
    (dict(bits=8), "8-bit weights have no kernel"),
    (dict(group=16), "group_size 16 is not a multiple of 32"),
    (dict(group=32, act_bits=4), "W4A4 needs 4-bit per-channel weights"),
    (dict(act_bits=8), "activations of 8 bits are not supported"),
    (dict(device="meta"), "no quantized-linear kernel for device 'meta'"),
    (dict(hadamard=True, k=96), "online Hadamard needs in_features = K * 2**m"),
])
def test_unsupported_configurations_raise_one_line(kwargs, message):
    bits = kwargs.get("bits", 4)
    w = make_packed(min(bits, 8), 8, kwargs.get("k", 64), kwargs.get("group"), False, torch.float16, device="cpu")
    args = dict(act_bits=kwargs.get("act_bits", 16), hadamard=kwargs.get("hadamard", False))
    with pytest.raises(ValueError, match=re.escape(message)) as info:
        prepare_linear(w, kwargs.get("device", "cpu"), **args)
    assert "\n" not in str(info.value)
    assert check_linear(w, kwargs.get("device", "cpu"), **args).startswith(message.split(" ")[0])
