"""Both ``pack-quantized`` bit layouts (:mod:`loaq.export.layouts`) against the libraries that write them.

The ``dense`` layout is checked against fixtures written by compressed-tensors 0.19.0 itself
(``fixtures/make_ct019.py``): its packed tensors decode to exactly the codes, zero points and dequantized
weights the library computed, and packing those codes gives back its words. The ``words`` layout is
checked against the installed compressed-tensors 0.17 (bits 1-8, odd shapes). A whole 0.19 checkpoint
(tiny Llama, 3-bit asymmetric per channel) loads through :func:`loaq.api.load` to the library's weights
(``tests/serve/test_plugin.py`` serves the same checkpoint through the vLLM plugin).
"""

import json
import os
import shutil

import pytest
import torch
from compressed_tensors.compressors.pack_quantized.base import PackedQuantizationCompressor
from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
from safetensors.torch import load_file

from loaq.errors import LoaQError
from loaq.export import layouts
from loaq.export.check import dequantize_layer

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "ct019")
META = json.load(open(os.path.join(FIXTURES, "layers.json")))
TENSORS = load_file(os.path.join(FIXTURES, "layers.safetensors"))
LOCAL = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")


def case(name: str) -> tuple[QuantizationArgs, dict[str, torch.Tensor]]:
    return (QuantizationArgs.model_validate(META["cases"][name]),
            {k: TENSORS[f"{name}.{k}"] for k in LOCAL + ("codes", "zeros", "dequantized") if f"{name}.{k}" in TENSORS})


def test_fixtures_cover_every_width_and_grid():
    assert META["compressed_tensors"] == "0.19.0"
    args = [QuantizationArgs.model_validate(a) for a in META["cases"].values()]
    assert {(a.num_bits, a.symmetric, a.group_size) for a in args} >= {
        (b, s, g) for b in (2, 3, 4, 8) for s in (True, False) for g in (None, 16, 32)}


@pytest.mark.parametrize("name", sorted(META["cases"]))
def test_dense_fixture_decodes_to_the_library_values(name):
    args, t = case(name)
    layout = layouts.layout_of(META["compressed_tensors"], [args.num_bits])
    n, k = t["weight_shape"].tolist()
    assert torch.equal(layouts.unpack(t["weight_packed"], args.num_bits, k, layout), t["codes"])
    assert torch.equal(layouts.pack(t["codes"], args.num_bits, layout), t["weight_packed"])
    if not args.symmetric:
        assert torch.equal(layouts.unpack(t["weight_zero_point"], args.num_bits, n, layout, dim=0), t["zeros"])
        assert torch.equal(layouts.pack(t["zeros"], args.num_bits, layout, dim=0), t["weight_zero_point"])
    local = {k_: v for k_, v in t.items() if k_ in LOCAL}
    assert torch.equal(dequantize_layer(local, args, layout), t["dequantized"])


def test_3bit_fixture_is_not_the_words_layout():
    """The reason for this module: 0.17's layout reads 0.19's 3-bit words as other codes (or refuses the count)."""
    args, t = case("n8_k64_b3_asym_g0")
    assert layouts.layout_of("0.19.0", [3]) == layouts.DENSE
    assert t["weight_packed"].shape == (8, 6) and t["weight_zero_point"].shape == (1, 1)  # words: (8, 7), (1, 1)
    with pytest.raises(LoaQError, match="7 words in the words layout, the tensor has 6"):
        layouts.unpack(t["weight_packed"], 3, 64, layouts.WORDS)
    args, t = case("n16_k48_b3_asym_g0")  # same word counts (5 and 2), other bits from code 10 on
    assert not torch.equal(layouts.unpack(t["weight_packed"], 3, 48, layouts.WORDS), t["codes"])
    assert not torch.equal(layouts.unpack(t["weight_zero_point"], 3, 16, layouts.WORDS, dim=0), t["zeros"])


@pytest.mark.parametrize("bits", range(1, 9))
@pytest.mark.parametrize("shape", [(128, 33), (5, 64), (3, 1), (17, 31)])
def test_words_layout_is_the_installed_library(bits, shape):
    g = torch.Generator().manual_seed(bits)
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), shape, generator=g).to(torch.int8)
    for dim in (0, 1):
        packed = layouts.pack(q, bits, layouts.WORDS, dim)
        assert torch.equal(packed, pack_to_int32(q, bits, packed_dim=dim))
        assert torch.equal(layouts.unpack(packed, bits, shape[dim], layouts.WORDS, dim), q)
        dense = layouts.pack(q, bits, layouts.DENSE, dim)
        assert torch.equal(layouts.unpack(dense, bits, shape[dim], layouts.DENSE, dim), q)
        assert torch.equal(layouts.repack(dense, bits, shape[dim], layouts.DENSE, layouts.WORDS, dim), packed)
        assert torch.equal(dense, packed) == (32 % bits == 0 or shape[dim] <= 32 // bits)  # no code past word 0


@pytest.mark.parametrize("bits,group,symmetric", [(3, None, False), (3, 16, True), (2, 32, False), (4, 16, False)])
def test_words_dequantize_is_the_installed_library(bits, group, symmetric):
    g = torch.Generator().manual_seed(0)
    n, k = 24, 64
    q = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k), generator=g).to(torch.int8)
    z = torch.randint(-(2 ** (bits - 1)), 2 ** (bits - 1), (n, k // (group or k)), generator=g).to(torch.int8)
    local = {"weight_packed": pack_to_int32(q, bits), "weight_scale": torch.rand(z.shape, generator=g) / 10,
             "weight_shape": torch.tensor([n, k])}
    if not symmetric:
        local["weight_zero_point"] = pack_to_int32(z, bits, packed_dim=0)
    args = QuantizationArgs(num_bits=bits, symmetric=symmetric, strategy="group" if group else "channel",
                            group_size=group)
    want = PackedQuantizationCompressor.decompress(dict(local), QuantizationScheme(targets=["Linear"], weights=args))
    assert torch.equal(dequantize_layer(local, args, layouts.WORDS), want["weight"])


def test_layout_of_versions():
    assert layouts.layout_of("0.17.0", [3, 4]) == layouts.WORDS
    assert layouts.layout_of("0.12.2", [3]) == layouts.WORDS
    assert layouts.layout_of("0.18.0", [3]) == layouts.DENSE
    assert layouts.layout_of("0.20.1", [2, 3]) == layouts.DENSE
    assert layouts.layout_of(None, [2, 4, 8]) == layouts.WORDS  # the same bits in both
    assert layouts.layout_of("0.99.0", [4]) == layouts.WORDS
    assert layouts.library_layout() == layouts.WORDS  # the pinned 0.17


@pytest.mark.parametrize("version,found", [("0.21.0", "version 0.21.0"), (None, "no version"),
                                           ("main", "version 'main'")])
def test_unknown_version_refused_in_one_line(version, found):
    with pytest.raises(LoaQError) as e:
        layouts.layout_of(version, [4, 3])
    msg = str(e.value)
    assert "\n" not in msg and found in msg and "3-bit" in msg and layouts.SUPPORTED in msg


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """The 0.19 tiny Llama fixture with the tiny tokenizer added."""
    from tests.tiny import tiny_tokenizer

    path = str(tmp_path_factory.mktemp("ct019") / "llama_w3_asym")
    shutil.copytree(os.path.join(FIXTURES, "llama_w3_asym"), path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_api_load_of_a_019_checkpoint_gives_the_library_weights(checkpoint):
    from loaq.api import load

    loaded = load(checkpoint)
    state = loaded.model.state_dict()
    want = load_file(os.path.join(FIXTURES, "llama_w3_asym.dequantized.safetensors"))
    assert len(want) == 7 and all(torch.equal(state[k], v) for k, v in want.items())
    raw = load_file(os.path.join(checkpoint, "model.safetensors"))
    assert torch.equal(state["lm_head.weight"], raw["lm_head.weight"])
    assert torch.equal(state["model.norm.weight"], raw["model.norm.weight"])
    assert loaded.label["bits"] == 3
    assert torch.isfinite(loaded.model(torch.tensor([[1, 2, 3]])).logits).all()


def test_api_load_refuses_an_unknown_version(checkpoint, tmp_path):
    from loaq.api import load

    path = str(tmp_path / "ck")
    shutil.copytree(checkpoint, path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    cfg["quantization_config"]["version"] = "0.23.0"
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(LoaQError, match=r"compressed-tensors version 0\.23\.0.*supported: .*0\.18\.0-0\.20\.x"):
        load(path)
