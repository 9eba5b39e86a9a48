"""A fused checkpoint linear (Phi-3's qkv_proj / gate_up_proj, loaded with shard_id None) into the scheme's
per-shard parameters: the same tensors as loading each shard on its own."""

import pytest
import torch
from compressed_tensors.quantization import QuantizationArgs

from loaq.export import layouts
from loaq.serve.scheme import LoaQLinearScheme, _rows_loader


@pytest.mark.parametrize("bits, layout", [(3, layouts.WORDS), (3, layouts.DENSE), (4, layouts.WORDS), (2, layouts.WORDS)])
def test_fused_zero_points_and_shape_load_as_their_shards(bits, layout):
    parts, k, g = [40, 15, 15], 64, 2  # qkv: q 40 rows, k and v 15: shard starts off the 32-bit words
    sch = LoaQLinearScheme(QuantizationArgs(num_bits=bits, symmetric=False, strategy="group", group_size=32),
                           None, False, "model.layers.0.self_attn.qkv_proj", layout)
    sch.parts = parts
    gen = torch.Generator().manual_seed(0)
    z = torch.randint(-2 ** (bits - 1), 2 ** (bits - 1), (sum(parts), g), generator=gen, dtype=torch.int8)
    zrows = [layouts.packed_length(p, bits, layout) for p in parts]
    by_shard = torch.zeros(sum(zrows), g, dtype=torch.int32)
    load = _rows_loader(zrows, "z", fused=sch._split_zero_points)
    for i, c in enumerate(z.split(parts)):
        load(torch.nn.Parameter(by_shard, requires_grad=False), layouts.pack(c, bits, layout, 0), i)
    fused = torch.zeros_like(by_shard)
    load(torch.nn.Parameter(fused, requires_grad=False), layouts.pack(z, bits, layout, 0))
    assert torch.equal(fused, by_shard)
    shape = torch.zeros(3, 2, dtype=torch.int64)
    _rows_loader([1, 1, 1], "s", fused=sch._split_shape)(torch.nn.Parameter(shape, requires_grad=False),
                                                     torch.tensor([sum(parts), k]))
    assert shape.tolist() == [[40, k], [15, k], [15, k]]
    with pytest.raises(ValueError, match="does not hold the fused shards"):
        _rows_loader([1, 1, 1], "s", fused=sch._split_shape)(torch.nn.Parameter(shape, requires_grad=False),
                                                         torch.tensor([sum(parts) + 1, k]))
