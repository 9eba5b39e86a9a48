"""Layouts: round trips, the documented 3-bit planes, and agreement with compressed-tensors."""

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme

from loaq.kernels.layout import (
    PackedLinear, pack_codes, pack_kmajor, pack_lanes, unpack_codes, unpack_kmajor, unpack_lanes,
)
from loaq.kernels.wna16_ref import dequantize_ref


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("shape", [(5, 33), (64, 256), (3, 1000)])
def test_kernel_layouts_round_trip_bit_exactly(bits, shape):
    codes = torch.randint(0, 1 << bits, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(bits))
    assert torch.equal(unpack_kmajor(pack_kmajor(codes, bits), bits, shape[1]), codes)
    assert torch.equal(unpack_lanes(pack_lanes(codes, bits), bits, shape[1]), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_pack_codes_equals_compressed_tensors_packing(bits):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32

    q = torch.randint(-(1 << (bits - 1)), 1 << (bits - 1), (7, 45), dtype=torch.int8)
    packed = pack_to_int32(q, bits)
    assert torch.equal(pack_codes(q.int() + (1 << (bits - 1)), bits), packed)
    assert torch.equal(unpack_codes(packed, bits, 45), q.int() + (1 << (bits - 1)))


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_cpu_lanes_put_32_consecutive_k_in_16_pairs_per_shift(bits):
    h = 16 // bits  # values per 16-bit half
    block, t, lane, half = 1, h - 1, 5, 1
    k = block * 32 * h + 32 * t + 2 * lane + half
    codes = torch.zeros(1, 2 * 32 * h, dtype=torch.int32)
    codes[0, k] = (1 << bits) - 1
    packed = pack_lanes(codes, bits)
    expected = torch.zeros_like(packed)
    word = ((1 << bits) - 1) << (16 * half + bits * t)
    expected[0, 16 * block + lane] = word - (1 << 32) if word >= 1 << 31 else word  # as int32
    assert torch.equal(packed, expected)


def test_3bit_layout_is_two_low_planes_and_one_high_plane():
    codes = torch.zeros(2, 64, dtype=torch.int32)
    codes[1, 32 + 17] = 0b101  # second 32-block, position 17
    packed = pack_kmajor(codes, 3)
    assert packed.shape == (6, 2)
    expected = torch.zeros(6, 2, dtype=torch.int32)
    expected[3 + 1, 1] = 0b01 << 2  # low 2 bits: row 1 of the block, field 17 - 16 = 1
    expected[3 + 2, 1] = 1 << 17  # high bit: row 2 of the block, bit 17
    assert torch.equal(packed, expected)


@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("strategy,group", [("channel", None), ("group", 32), ("group", 128)])
@pytest.mark.parametrize("symmetric", [True, False])
def test_reference_dequant_equals_compressed_tensors(bits, strategy, group, symmetric):
    """Compress with the library's own compressor, decompress both ways: identical."""
    n, k = 24, 256
    gen = torch.Generator().manual_seed(bits * 7 + (group or 0))
    weight = torch.randn(n, k, generator=gen, dtype=torch.float16)
    g = 1 if group is None else k // group
    scale = (torch.rand(n, g, generator=gen) * 0.1 + 0.01).half()
    lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    zp = None if symmetric else torch.randint(lo, hi + 1, (n, g), generator=gen, dtype=torch.int8)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy=strategy, group_size=group)
    scheme = QuantizationScheme(targets=["Linear"], weights=args)
    state = {"weight": weight, "weight_scale": scale}
    if zp is not None:
        state["weight_zero_point"] = zp
    packed = PackedQuantizationCompressor.compress(state, scheme)
    expected = PackedQuantizationCompressor.decompress(packed, scheme)["weight"]
    w = PackedLinear(packed["weight_packed"], packed["weight_scale"],
                     packed.get("weight_zero_point"), bits, (n, k), group)
    assert torch.equal(dequantize_ref(w), expected)
    assert w.group_size == group
    assert unpack_codes(packed["weight_packed"], bits, k).max() < 1 << bits
