"""W4A4 ``input_activations`` and the online R4 ``transform_config``: they validate with compressed-tensors'
own models, and the transform written is the one the engine applies (both applied to the same vectors)."""

import copy
import json
import os

import pytest
import torch
from safetensors.torch import save_file

from loaq.shards import layer_file
from loaq.export.cli import main
from loaq.export.manifest import write_manifest
from loaq.export.transform import EXTENSION_KEY, EXTENSION_TYPE, online_hadamard
from loaq.grids import GridSpec
from loaq.kernels.hadamard_ref import hadamard_transform_ref
from tests.export.test_export import bases, decompressed, make_native, one_line_error  # noqa: F401
from tests.tiny import tiny_model, tiny_tokenizer


def hadamard_12() -> torch.Tensor:
    from loaq.hadamard import hadamard

    return hadamard(12).float()


@pytest.fixture(scope="module")
def wide_bases():
    """Tiny Llama whose MLP width 192 = 12 * 16 is not a power of two."""
    model = tiny_model("llama", vocab=320)
    cfg = copy.deepcopy(model.config)
    cfg.intermediate_size = 192
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    wide = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32, attn_implementation="sdpa").eval()
    return {"llama": (wide, tiny_tokenizer())}


def with_meta(native: str, **extra) -> str:
    """Add native ``loaq.json`` keys (the engine's rotation / activations contract) to a checkpoint."""
    p = os.path.join(native, "loaq.json")
    meta = json.load(open(p))
    meta.update(extra)
    json.dump(meta, open(p, "w"))
    return native


def rotated(native: str, n: int, had_k: torch.Tensor | None) -> str:
    k = 1 if had_k is None else had_k.shape[0]
    if had_k is not None:
        save_file({"r4.had_k": had_k.float().contiguous()}, os.path.join(native, "rotation.safetensors"))
    return with_meta(native, rotation={"kind": "hadamard", "seed": 0, "r4": {"order": n, "had_k_order": k}})


@pytest.mark.parametrize("sym", [False, True])
def test_w4a4_config_validates_and_round_trips(bases, tmp_path, sym, capsys):
    from compressed_tensors.quantization import QuantizationConfig

    spec = GridSpec(4, 0, sym)
    native = with_meta(make_native(bases, "llama", spec, tmp_path / "n"), activations={"bits": 4, "symmetric": sym})
    out = tmp_path / "x"
    assert main([native, str(out), "--dtype", "float32"]) == 0
    qc = json.load(open(out / "config.json"))["quantization_config"]
    qc = QuantizationConfig.model_validate({k: v for k, v in qc.items() if k in QuantizationConfig.model_fields})
    (group,) = qc.config_groups.values()
    a = group.input_activations
    assert (a.num_bits, a.type, a.strategy, a.dynamic, a.symmetric) == (4, "int", "token", True, sym)
    assert (group.weights.num_bits, group.weights.strategy, group.weights.symmetric) == (4, "channel", sym)
    assert len(decompressed(out)) == 14
    capsys.readouterr()
    assert main(["--check", str(out)]) == 0
    assert capsys.readouterr().out.strip().endswith("; W4A4")
    assert "4-bit per token" in (out / "README.md").read_text()


def test_w4a4_with_grouped_weights_is_refused(bases, tmp_path, capsys):
    native = with_meta(make_native(bases, "llama", GridSpec(4, 32, False), tmp_path / "n"),
                       activations={"bits": 4, "symmetric": False})
    err = one_line_error(capsys, main([native, str(tmp_path / "x")]))
    assert "W4A4 needs 4-bit per-channel weights" in err and "--group-size 0" in err
    assert not (tmp_path / "x").exists()


def library_r4(model, transform_config: dict, x: torch.Tensor, name: str) -> torch.Tensor:
    """The input ``name`` sees after compressed-tensors' own transform hooks, for module input ``x``."""
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    model = copy.deepcopy(model)
    apply_transform_config(model, TransformConfig.model_validate(transform_config))
    seen = []
    mod = model.get_submodule(name)
    mod.register_forward_pre_hook(lambda _m, args: seen.append(args[0]))
    with torch.no_grad():
        mod(x)
    return seen[0]


def test_r4_written_as_the_librarys_hadamard_is_the_engines(bases, tmp_path):
    base, _ = bases["llama"]
    n = base.config.intermediate_size  # 128
    had_k = None
    native = rotated(make_native(bases, "llama", GridSpec(4, 0, False), tmp_path / "n"), n, had_k)
    out = tmp_path / "x"
    assert main([native, str(out), "--dtype", "float32"]) == 0
    config = json.load(open(out / "config.json"))
    tc = config["quantization_config"]["transform_config"]
    scheme = tc["config_groups"]["R4"]
    assert scheme["type"] == "hadamard" and scheme["head_dim"] is None
    assert scheme["apply"][0]["targets"] == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert EXTENSION_KEY not in config
    x = torch.randn(5, n, generator=torch.Generator().manual_seed(3), dtype=torch.float64).float()
    engine = hadamard_transform_ref(x, had_k)
    lib = library_r4(base, tc, x, "model.layers.1.mlp.down_proj")
    # fp32 dense product (library) vs fp32 butterfly (engine): a few ulps of O(1) values apart
    torch.testing.assert_close(lib, engine, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(engine, x, atol=1e-2)  # it is a real transform
    got = online_hadamard(str(out))
    assert list(got) == scheme["apply"][0]["targets"]
    assert all(v is None for v in got.values())
    assert main(["--check", str(out)]) == 0


def test_r4_of_order_12_times_16_is_stored_exactly(wide_bases, tmp_path, capsys):
    had_k = hadamard_12()
    native = rotated(make_native(wide_bases, "llama", GridSpec(3, 0, False), tmp_path / "n"), 192, had_k)
    out = tmp_path / "x"
    assert main([native, str(out), "--dtype", "float32"]) == 0
    assert not (out / "rotation.safetensors").exists()  # vLLM would read every *.safetensors as weights
    config = json.load(open(out / "config.json"))
    scheme = config["quantization_config"]["transform_config"]["config_groups"]["R4"]
    assert scheme["type"] == EXTENSION_TYPE
    r4 = online_hadamard(str(out))
    assert len(r4) == 2
    x = torch.randn(7, 192, generator=torch.Generator().manual_seed(4))
    for got in r4.values():
        assert torch.equal(hadamard_transform_ref(x, got), hadamard_transform_ref(x, had_k))
    dense = hadamard_transform_ref(torch.eye(192), had_k)  # orthogonal: the written transform is invertible
    torch.testing.assert_close(dense @ dense.T, torch.eye(192), rtol=0, atol=1e-5)
    from compressed_tensors.transform import TransformConfig, apply_transform_config

    with pytest.raises(Exception):  # stock loaders stop at the unknown type instead of computing something else
        apply_transform_config(copy.deepcopy(wide_bases["llama"][0]),
                               TransformConfig.model_validate(config["quantization_config"]["transform_config"]))
    capsys.readouterr()
    assert main(["--check", str(out)]) == 0
    assert "online R4 on 2 linears" in capsys.readouterr().out
    assert "H_12 ⊗ H_16" in (out / "README.md").read_text()
    config[EXTENSION_KEY]["R4"]["had_k"][0][0] *= -1  # no longer a Hadamard matrix
    json.dump(config, open(out / "config.json", "w"))
    write_manifest(str(out))  # a consistent export with a bad matrix, not a damaged file
    err = one_line_error(capsys, main(["--check", str(out)]))
    assert "is not a Hadamard matrix" in err


@pytest.mark.parametrize("case", ["missing", "not_hadamard"])
def test_rotated_native_without_a_valid_matrix_is_refused(wide_bases, tmp_path, capsys, case):
    bad = hadamard_12() if case == "missing" else torch.eye(12)  # I_12 ⊗ H_16 / sqrt(192) is not orthogonal
    native = rotated(make_native(wide_bases, "llama", GridSpec(3, 0, False), tmp_path / "n"), 192, bad)
    if case == "missing":
        os.unlink(os.path.join(native, "rotation.safetensors"))
    err = one_line_error(capsys, main([native, str(tmp_path / "x")]))
    assert {"missing": "does not hold it", "not_hadamard": "is not a Hadamard matrix"}[case] in err
    assert not (tmp_path / "x").exists()


def without_hooks(model):
    for m in model.modules():
        m._forward_pre_hooks.clear()
    return model


@pytest.mark.parametrize("case", ["w4a4_asym", "w4a4_sym_r4"])
def test_load_export_computes_what_the_native_simulates(wide_bases, tmp_path, case):
    from loaq.checkpoint import load_native
    from loaq.export.load import load_export

    sym = case.endswith("r4")
    native = with_meta(make_native(wide_bases, "llama", GridSpec(4, 0, sym), tmp_path / "n"),
                       activations={"bits": 4, "symmetric": sym})
    if sym:
        rotated(native, 192, hadamard_12())
    assert main([native, str(tmp_path / "x"), "--dtype", "float32"]) == 0
    model, _ = load_export(str(tmp_path / "x"))
    ref = load_native(native)[0]  # the engine's simulation: R4 and the activation quantizer as pre-hooks
    plain = without_hooks(load_native(native)[0])
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got, want, w16 = model(ids).logits, ref(ids).logits, plain(ids).logits
    assert torch.equal(got, want)  # same library dequantization, same hooks: exact in float32
    assert not torch.allclose(got, w16, atol=1e-3)  # and the activation quantizer / R4 really ran


def test_engine_rotation_exports_the_r4_it_applied(wide_bases, tmp_path):
    """Rotate with the engine (192 = 12·16: a Paley factor), quantize W4A4, export: the R4 the export
    declares is the engine's, and the exported model computes the native one's logits exactly."""
    from loaq.actquant import ActSpec
    from loaq.arch import arch_of
    from loaq.checkpoint import load_native, save_native
    from loaq.config import Method, QuantConfig
    from loaq.export.load import load_export
    from loaq.pipeline import quantize_model
    from loaq.rotation import load_had_k, rotate_model

    base, tok = wide_bases["llama"]
    model = copy.deepcopy(base)
    arch = arch_of(model.config)
    rotation = rotate_model(model, arch, seed=3)
    cfg = QuantConfig(spec=GridSpec(4, 0, False), method=Method("rtn"), act=ActSpec(4, False))
    results = quantize_model(model, arch, torch.zeros(1, 1, dtype=torch.long), cfg, progress=False)
    native = str(tmp_path / "n")
    save_native(native, model, tok, results, {"config": cfg.to_dict(), "source_model": "tiny",
                                              "activations": cfg.act.meta()}, False, rotation=rotation)
    assert main([native, str(tmp_path / "x"), "--dtype", "float32"]) == 0
    r4 = online_hadamard(str(tmp_path / "x"))
    had_k = load_had_k(native)
    assert had_k is not None and had_k.shape == (12, 12)
    assert list(r4) == [f"model.layers.{i}.mlp.down_proj" for i in range(2)]
    assert all(torch.equal(v, had_k) for v in r4.values())
    exported, _ = load_export(str(tmp_path / "x"))
    ref, _, _ = load_native(native)
    ids = torch.randint(0, 320, (2, 12), generator=torch.Generator().manual_seed(6))
    with torch.no_grad():
        assert torch.equal(exported(ids).logits, ref(ids).logits)


def test_continuous_zero_points_are_refused(bases, tmp_path, capsys):
    native = make_native(bases, "llama", GridSpec(3, 0, False), tmp_path / "n")
    q = os.path.join(native, "weights", layer_file(0))  # layer 0's shard
    from safetensors.torch import load_file

    t = load_file(q)
    key = "model.layers.0.mlp.up_proj.zeros"
    t[key] = t[key].float() + 0.25
    save_file(t, q)
    err = one_line_error(capsys, main([native, str(tmp_path / "x")]))
    assert "real-valued zero points" in err and "--init neuqi" in err and not (tmp_path / "x").exists()


def test_block_diagonal_r4_is_exported_and_checked(wide_bases, tmp_path, capsys):
    """--r4-blocks 2: had_k = √2 (I_2 ⊗ H_12) of order 24, written with ``"blocks": 2``; --check reports the
    blocks and refuses a ``blocks`` the matrix does not have."""
    from loaq.hadamard import block_diagonal

    had_k = block_diagonal(192, 2).had_k
    native = rotated(make_native(wide_bases, "llama", GridSpec(3, 0, False), tmp_path / "n"), 192, had_k)
    out = tmp_path / "x"
    assert main([native, str(out), "--dtype", "float32"]) == 0
    config = json.load(open(out / "config.json"))
    assert config[EXTENSION_KEY]["R4"]["blocks"] == 2
    x = torch.randn(3, 192, generator=torch.Generator().manual_seed(4))
    for got in online_hadamard(str(out)).values():
        assert torch.equal(hadamard_transform_ref(x, got), hadamard_transform_ref(x, had_k))
    capsys.readouterr()
    assert main(["--check", str(out)]) == 0
    assert "online R4 on 2 linears in 2 diagonal blocks" in capsys.readouterr().out
    assert "2 diagonal blocks" in (out / "README.md").read_text()
    config[EXTENSION_KEY]["R4"]["blocks"] = 4
    json.dump(config, open(out / "config.json", "w"))
    write_manifest(str(out))
    assert "blocks is 4 but had_k is block-diagonal in 2" in one_line_error(capsys, main(["--check", str(out)]))
