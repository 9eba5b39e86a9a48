"""Scratch check of the activation quantizer on GPU (kept with the results for the record)."""
import sys

import torch
import triton
import triton.language as tl

sys.path[0] = "."
from loaq.kernels.w4a4 import quantize_activations  # noqa: E402
from loaq.kernels.w4a4_ref import quantize_activations_ref  # noqa: E402


@triton.jit
def _probe(x_ptr, o_ptr, BLOCK: tl.constexpr):
    x = tl.load(x_ptr + tl.arange(0, BLOCK))
    amax = tl.max(tl.abs(x), 0)
    tl.store(o_ptr, amax)
    tl.store(o_ptr + 1, tl.math.div_rn(amax, 7.0))
    tl.store(o_ptr + 2, amax / 7.0)
    tl.store(o_ptr + 3, tl.max(tl.max(tl.reshape(tl.abs(x), (1, BLOCK)), 1), 0))


x = (torch.randn(3, 128) * 3).cuda()
a, r = quantize_activations(x, True), quantize_activations_ref(x, True)
print("kernel", a.scale.tolist(), "\nref   ", r.scale.tolist(), "\namax  ", x.abs().amax(-1).tolist())
o = torch.zeros(4, device="cuda")
_probe[(1,)](x[1].contiguous(), o, BLOCK=128)
print("probe row1 amax, div_rn, /, reshaped", o.tolist())
print("codes equal", torch.equal(a.codes, r.codes), (a.codes.int() - r.codes.int()).abs().max().item())
