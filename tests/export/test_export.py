"""``loaq-export``: bit-exact round trip through compressed-tensors' own decompressor, transformers
loading, the packed layout, refusals and ``--check``."""

import copy
import json
import math
import os
import shutil

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loaq.arch import arch_of
from loaq.checkpoint import dequantized, load_native, save_native, tensors_to_results
from loaq.config import Method, QuantConfig
from loaq.export.check import decompress_export, round_trip
from loaq.export.cli import main
from loaq.export.manifest import write_manifest
from loaq.export.pack import pack_layer, packed_shapes
from loaq.export.scheme import quantization_config
from loaq.export.writer import layer_specs
from loaq.grids import GridSpec, rtn
from loaq.pipeline import quantize_model
from loaq.shards import quantized_tensors
from loaq.solver import QuantResult
from tests.tiny import tiny_model, tiny_tokenizer

SPECS = [GridSpec(b, g, s) for b in (2, 3, 4) for g in (0, 32) for s in (False, True)]
SPECS += [GridSpec(2, 32, False, scale_dtype="float16"), GridSpec(3, 0, True, scale_dtype="float16")]


@pytest.fixture(scope="module")
def bases():
    tok = tiny_tokenizer()
    return {kind: (tiny_model(kind, vocab=320), tok) for kind in ("llama", "qwen3")}


def make_native(bases, kind, spec, path, layer_specs=None):
    """A native checkpoint of the tiny ``kind`` model quantized with RTN on ``spec``."""
    base, tok = bases[kind]
    model = copy.deepcopy(base)
    cfg = QuantConfig(spec=spec, method=Method("rtn"))
    results = quantize_model(model, arch_of(model.config), torch.zeros(1, 1, dtype=torch.long), cfg, progress=False)
    meta = {"config": cfg.to_dict(), "calibration": {"source": "none"}, "source_model": f"tiny-{kind}",
            "arch": model.config.architectures[0]}
    if layer_specs:  # re-quantize some layers on their own grid (a per-layer allocation)
        for name, s in layer_specs.items():
            w = base.get_submodule(name).weight.detach()
            results[name] = QuantResult(*rtn(w, s))
        meta["layer_specs"] = {n: vars(s) for n, s in layer_specs.items()}
    save_native(str(path), model, tok, results, meta, force=False)
    return str(path)


def decompressed(out_dir):
    return decompress_export(str(out_dir))


def one_line_error(capsys, rc):
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("kind", ["llama", "qwen3"])
@pytest.mark.parametrize("spec", SPECS, ids=str)
def test_round_trip_is_bit_exact(bases, kind, spec, tmp_path):
    native = make_native(bases, kind, spec, tmp_path / "n")
    assert main([native, str(tmp_path / "x"), "--dtype", "float32"]) == 0
    results = tensors_to_results(quantized_tensors(native))
    got = decompressed(tmp_path / "x")
    assert got.keys() == results.keys() and len(got) == 14
    for name, r in results.items():
        assert got[name].dtype == torch.float32 and torch.equal(got[name], dequantized(r, spec)), name
        assert torch.equal(r.scales.to(spec.scale_torch_dtype).float(), r.scales), name  # solved on written scales


def test_float16_scales_are_written_smaller_and_load_like_the_native_model(bases, tmp_path):
    """``scale_dtype="float16"``: the export stores F16 scales (half the bytes of float32 ones, nothing else moves),
    ``--check`` passes, and :func:`loaq.export.load.load_export` computes the native model's logits exactly: it
    multiplies in float32, where compressed-tensors' own float16 product would round the weights."""
    from loaq.export.load import load_export

    spec16 = GridSpec(4, 32, False, scale_dtype="float16")
    native = make_native(bases, "qwen3", spec16, tmp_path / "n")
    assert main([native, str(tmp_path / "x"), "--dtype", "float32"]) == 0
    assert main(["--check", str(tmp_path / "x")]) == 0
    with safe_open(str(tmp_path / "x" / "model.safetensors"), "pt") as f:
        scales = {k: f.get_tensor(k) for k in f.keys() if k.endswith(".weight_scale")}
    assert len(scales) == 14 and {t.dtype for t in scales.values()} == {torch.float16}
    b16, b32 = (sum(math.prod(s) * d.itemsize for s, d in packed_shapes(64, 128, g).values())
                for g in (spec16, GridSpec(4, 32, False)))
    assert b32 - b16 == 64 * 4 * 2  # 64 rows × 4 groups × 2 bytes saved
    ref, _, _ = load_native(native)
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(load_export(str(tmp_path / "x"))[0](ids).logits, ref(ids).logits)
    r = QuantResult(*rtn(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)), spec16))
    groups = torch.arange(128) // 32
    library = ((r.codes.float() - r.zeros[:, groups]).half() * r.scales.half()[:, groups]).float()
    assert not torch.equal(library, dequantized(r, spec16))  # what a float16 product would have rounded


def test_mixed_specs_export_as_groups(bases, tmp_path):
    over = {"model.layers.0.mlp.down_proj": GridSpec(2, 32, False), "model.layers.1.self_attn.q_proj": GridSpec(8, 0, True)}
    native = make_native(bases, "llama", GridSpec(4, 32, False), tmp_path / "n", over)
    assert main([native, str(tmp_path / "x"), "--dtype", "float32"]) == 0
    qc = json.load(open(tmp_path / "x" / "config.json"))["quantization_config"]
    assert [(g["weights"]["num_bits"], len(g["targets"])) for g in qc["config_groups"].values()] == [(2, 1), (4, 12), (8, 1)]
    meta = json.load(open(os.path.join(native, "loaq.json")))
    specs = layer_specs(meta, meta["quantized"])
    results = tensors_to_results(quantized_tensors(native))
    got = decompressed(tmp_path / "x")
    assert all(torch.equal(got[n], dequantized(r, specs[n])) for n, r in results.items())
    assert main(["--check", str(tmp_path / "x")]) == 0


def test_config_groups_from_a_spec_map():
    a, b = GridSpec(3, 0, False), GridSpec(4, 64, True)
    qc = quantization_config({"l.2": b, "l.0": a, "l.1": a})
    assert qc.format == "pack-quantized" and qc.ignore == ["lm_head"]
    g = qc.config_groups
    assert g["group_0"].targets == ["l.0", "l.1"] and g["group_0"].weights.strategy == "channel"
    assert g["group_1"].targets == ["l.2"] and g["group_1"].weights.group_size == 64 and g["group_1"].weights.symmetric


# weight_packed [64, 128] and weight_zero_point of [64, 2] groups (group 64): compressed-tensors 0.17.0's layout
PACKED = {2: ((64, 8), (4, 2)), 3: ((64, 13), (7, 2)), 4: ((64, 16), (8, 2)), 8: ((64, 32), (16, 2))}


@pytest.mark.parametrize("bits", sorted(PACKED))
def test_packed_shapes_per_bit_width(bits):
    spec = GridSpec(bits, 64, False)
    W = torch.randn(64, 128, generator=torch.Generator().manual_seed(bits))
    t = pack_layer(QuantResult(*rtn(W, spec)), spec)
    assert (tuple(t["weight_packed"].shape), tuple(t["weight_zero_point"].shape)) == PACKED[bits]
    assert t["weight_packed"].dtype == t["weight_zero_point"].dtype == torch.int32
    assert {k: (tuple(v.shape), v.dtype) for k, v in t.items()} == packed_shapes(64, 128, spec)


@pytest.mark.parametrize("bits", [4, 3, 2, 8])
def test_transformers_loads_the_export(bases, bits, tmp_path):
    from transformers import AutoModelForCausalLM

    native = make_native(bases, "qwen3", GridSpec(bits, 32, False), tmp_path / "n")
    assert main([native, str(tmp_path / "x"), "--dtype", "float32"]) == 0
    ref, _, _ = load_native(native)
    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "x"), dtype=torch.float32).eval()
    ids = torch.randint(0, 320, (2, 16), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got, want = model(ids).logits, ref(ids).logits
    assert torch.equal(got, want)  # transformers decompresses with the same library code: exact in float32


@pytest.fixture(scope="module")
def native_dir(bases, tmp_path_factory):
    return make_native(bases, "llama", GridSpec(4, 32, False), tmp_path_factory.mktemp("n") / "native")


def test_shards_index_card_and_check(native_dir, tmp_path, capsys):
    out = tmp_path / "x"
    assert main([native_dir, str(out), "--max-shard-size", "40KB"]) == 0
    index = json.load(open(out / "model.safetensors.index.json"))
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and all((out / f).is_file() for f in shards)
    assert round_trip(native_dir, str(out)) == (14, 14)  # bit-exact through the library, read across shards
    assert {"tokenizer.json", "generation_config.json", "README.md", "config.json"} <= set(os.listdir(out))
    assert json.load(open(out / "config.json"))["dtype"] == "bfloat16"
    assert "α = 0.0" in (out / "README.md").read_text()
    capsys.readouterr()
    assert main(["--check", str(out)]) == 0
    assert capsys.readouterr().out.startswith("ok: 14 packed linears in 1 config group(s)")


@pytest.mark.parametrize("tamper", ["deleted", "dtype", "shape", "config"])
def test_check_fails_on_a_tampered_export(native_dir, tmp_path, capsys, tamper):
    out = tmp_path / "x"
    assert main([native_dir, str(out)]) == 0
    st = out / "model.safetensors"
    sd = load_file(st)
    key = "model.layers.1.mlp.up_proj.weight_packed"
    if tamper == "deleted":
        del sd[key]
    elif tamper == "dtype":
        sd[key] = sd[key].to(torch.int64)
    elif tamper == "shape":
        sd["model.layers.1.mlp.up_proj.weight_scale"] = sd["model.layers.1.mlp.up_proj.weight_scale"][:, :1].clone()
    else:
        cfg = json.load(open(out / "config.json"))
        cfg["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = "four"
        json.dump(cfg, open(out / "config.json", "w"))
    save_file(sd, st)
    write_manifest(str(out))  # a consistent export with a wrong tensor, not a damaged file (test_integrity)
    capsys.readouterr()
    err = one_line_error(capsys, main(["--check", str(out)]))
    expect = {"deleted": f"tensor {key} is missing", "dtype": "torch.int64", "shape": "weight_scale is",
              "config": "does not parse"}[tamper]
    assert expect in err, err


@pytest.mark.parametrize("case", ["exists", "partial", "missing_layers", "group", "no_native"])
def test_refusals_give_one_line_and_leave_nothing(native_dir, tmp_path, capsys, case):
    src, out = native_dir, tmp_path / "out"
    if case == "exists":
        out.mkdir()
        (out / "keep").write_text("x")
    elif case == "partial":
        src = tmp_path / "run.partial"
        (src / "layers").mkdir(parents=True)
        (src / "run.json").write_text("{}")
    elif case in ("missing_layers", "group"):
        src = tmp_path / "n"
        os.makedirs(src)
        for f in os.listdir(native_dir):
            os.symlink(os.path.join(native_dir, f), src / f)
        if case == "missing_layers":  # layer 1's MLP linears gone from the shard index
            os.unlink(src / "weights")
            shutil.copytree(os.path.join(native_dir, "weights"), src / "weights")
            index = json.load(open(src / "weights" / "index.json"))
            index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith("model.layers.1.mlp.")}
            json.dump(index, open(src / "weights" / "index.json", "w"))
        else:
            meta = json.load(open(os.path.join(native_dir, "loaq.json")))
            meta["config"]["spec"]["group_size"] = 48
            os.unlink(src / "loaq.json")
            json.dump(meta, open(src / "loaq.json", "w"))
    elif case == "no_native":
        src = tmp_path / "nope"
    before = set(os.listdir(tmp_path))
    err = one_line_error(capsys, main([str(src), str(out)]))
    expect = {"exists": "--force", "partial": "loaq quantize --resume",
              "missing_layers": "lacks 3 quantized linear(s): model.layers.1.mlp.gate_proj, model.layers.1.mlp.up_proj",
              "group": "group size 48 does not divide the input width 128 of model.layers.0.mlp.down_proj",
              "no_native": "does not exist"}[case]
    assert expect in err, err
    assert set(os.listdir(tmp_path)) == before
    if case == "exists":
        assert os.listdir(out) == ["keep"]


@pytest.mark.parametrize("surfaces_as", ["KeyboardInterrupt", "LoaQError"])
def test_interrupted_export_leaves_nothing(native_dir, tmp_path, monkeypatch, capsys, surfaces_as):
    """Interrupted; also when the signal lands inside a C call and surfaces as that call's error (CI saw a
    SIGINT during safetensors' read reported as a corrupted input file, exit 2): the interruption wins."""
    import loaq.export.writer as w
    from loaq.errors import INTERRUPTED, LoaQError

    def boom(*a, **k):
        if surfaces_as == "KeyboardInterrupt":
            raise KeyboardInterrupt
        INTERRUPTED.set()  # what the CLI's signal handler does before the exception is swallowed
        raise LoaQError("layer-00000.safetensors is truncated or corrupted (could not determine the shape)")

    monkeypatch.setattr(w, "model_card", boom)
    assert main([native_dir, str(tmp_path / "out")]) == 130
    assert capsys.readouterr().err == "interrupted; nothing was written\n"
    assert os.listdir(tmp_path) == []


def test_scale_dtypes_read_back_and_foreign_ones_are_refused_in_one_line():
    from loaq.errors import LoaQError
    from loaq.export import scheme

    specs = {"l.0": GridSpec(3, 0, False), "l.1": GridSpec(2, 64, False, scale_dtype="float16")}
    qc = quantization_config(specs)
    assert scheme.layer_specs(qc) == specs
    qc.config_groups["group_0"].weights.scale_dtype = torch.bfloat16  # a checkpoint LoaQ did not write
    with pytest.raises(LoaQError, match=r"^weight scales in torch.bfloat16 are not LoaQ's; export again") as e:
        scheme.layer_specs(qc)
    assert "\n" not in str(e.value)
