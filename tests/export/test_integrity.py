"""``loaq-export`` on damaged inputs and outputs: one-line refusals of a damaged native checkpoint,
``--check`` against the SHA-256 manifest and the ``loaq_format`` packing marker, Ctrl-C and SIGKILL
mid-export, and the modes of the output."""

import json
import os
import signal
import socket
import subprocess
import sys

import pytest
from safetensors.torch import load_file, save_file

from loaq.export.cli import main
from loaq.export.manifest import MANIFEST, write_manifest
from loaq.grids import GridSpec
from tests.export.test_export import bases, make_native, one_line_error  # noqa: F401

INDEX = os.path.join("weights", "index.json")
LAYER0 = os.path.join("weights", "layer-00000.safetensors")
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture(scope="module")
def native_dir(bases, tmp_path_factory):
    return make_native(bases, "llama", GridSpec(3, 32, False), tmp_path_factory.mktemp("n") / "native")


@pytest.fixture(scope="module")
def sharded(native_dir, tmp_path_factory):
    """A 3-bit export in several shards (read-only: copy to change)."""
    out = tmp_path_factory.mktemp("x") / "export"
    assert main([native_dir, str(out), "--max-shard-size", "40KB"]) == 0
    return out


def copy_of(src, dst):
    """A writable copy of a directory: symlinks but for the files the test will change."""
    os.makedirs(dst)
    for f in os.listdir(src):
        if os.path.isdir(os.path.join(src, f)):
            copy_of(os.path.join(src, f), os.path.join(dst, f))
        else:
            os.symlink(os.path.join(src, f), os.path.join(dst, f))
    return dst


def own(path):
    """Replace a symlink of :func:`copy_of` by a private copy of its target."""
    data = open(path, "rb").read()
    os.unlink(path)
    open(path, "wb").write(data)


def truncate(path, keep=0.5):
    own(path)
    data = open(path, "rb").read()
    open(path, "wb").write(data[: int(len(data) * keep)])


@pytest.mark.parametrize("case", ["missing_tensor", "json_truncated", "no_spec", "quantized_truncated",
                                  "model_truncated", "quantized_header", "config_truncated", "bad_layer_spec"])
def test_damaged_native_gives_one_line_and_writes_nothing(native_dir, tmp_path, capsys, case):
    src = copy_of(native_dir, tmp_path / "n")
    if case == "missing_tensor":  # gone from its shard and the index
        index = json.load(open(src / INDEX))
        del index["weight_map"]["model.layers.0.self_attn.q_proj.codes"]
        os.unlink(src / INDEX)
        json.dump(index, open(src / INDEX, "w"))
        q = load_file(src / LAYER0)
        del q["model.layers.0.self_attn.q_proj.codes"]
        os.unlink(src / LAYER0)
        save_file(q, src / LAYER0)
    elif case == "json_truncated":
        truncate(src / "loaq.json")
    elif case in ("no_spec", "bad_layer_spec"):
        meta = json.load(open(src / "loaq.json"))
        if case == "no_spec":
            del meta["config"]["spec"]
        else:
            meta["layer_specs"] = {"model.layers.1.mlp.up_proj": {"bits": 5}}
        os.unlink(src / "loaq.json")
        json.dump(meta, open(src / "loaq.json", "w"))
    elif case == "quantized_truncated":
        truncate(src / LAYER0)
    elif case == "model_truncated":
        truncate(src / "weights" / "rest.safetensors", keep=0.9)
    elif case == "quantized_header":
        own(src / LAYER0)
        with open(src / LAYER0, "r+b") as fh:
            fh.seek(9)
            fh.write(b"\xff\x00{")
    else:
        truncate(src / "config.json")
    before = sorted(os.listdir(tmp_path))
    err = one_line_error(capsys, main([str(src), str(tmp_path / "out")]))
    expect = {"missing_tensor": "lacks tensor model.layers.0.self_attn.q_proj.codes",
              "json_truncated": "loaq.json is not valid JSON", "no_spec": "loaq.json has no valid config.spec",
              "quantized_truncated": "layer-00000.safetensors is truncated or corrupted",
              "model_truncated": "rest.safetensors is truncated or corrupted",
              "quantized_header": "layer-00000.safetensors is truncated or corrupted",
              "config_truncated": "config.json does not load",
              "bad_layer_spec": "loaq.json layer_specs.model.layers.1.mlp.up_proj is not a grid"}[case]
    assert expect in err, err
    assert sorted(os.listdir(tmp_path)) == before


def test_manifest_lists_every_file_and_marker_names_the_layout(sharded, capsys):
    manifest = json.load(open(sharded / MANIFEST))
    assert manifest["format"] == "loaq-export-manifest/1"
    assert set(manifest["files"]) == set(os.listdir(sharded)) - {MANIFEST, "README.md"}
    assert len([f for f in manifest["files"] if f.endswith(".safetensors")]) > 1
    import compressed_tensors

    config = json.load(open(sharded / "config.json"))
    assert "loaq_format" not in config  # inside quantization_config: the LoaQ export marker
    assert config["quantization_config"]["loaq_format"] == {"format_version": 1, "compressed_tensors": compressed_tensors.__version__,
                                                            "packing": {"group_0": "int32-10x3bit"}}
    capsys.readouterr()
    assert main(["--check", str(sharded)]) == 0
    out = capsys.readouterr().out
    assert out.startswith("ok: 14 packed linears") and f"{len(manifest['files'])} files match {MANIFEST}" in out


def test_a_flipped_byte_in_any_shard_is_named(sharded, tmp_path, capsys):
    x = copy_of(sharded, tmp_path / "x")
    files = sorted(f for f in os.listdir(sharded) if f.endswith(".safetensors")) + ["config.json"]
    for f in files:
        own(x / f)
        data = open(x / f, "rb").read()
        data_start = 8 + int.from_bytes(data[:8], "little") if f.endswith(".safetensors") else 1
        for offset in (0, 3, data_start, len(data) - 1):
            flipped = bytearray(data)
            flipped[offset] ^= 0x01
            open(x / f, "wb").write(flipped)
            err = one_line_error(capsys, main(["--check", str(x)]))
            assert f"{x / f} is corrupted" in err, (f, offset, err)
        open(x / f, "wb").write(data)
        assert main(["--check", str(x)]) == 0
    truncate(x / files[0])
    assert f"{x / files[0]} is " in one_line_error(capsys, main(["--check", str(x)]))


@pytest.mark.parametrize("where", ["header", "truncated"])
def test_check_without_manifest_names_a_damaged_shard(sharded, tmp_path, capsys, where):
    x = copy_of(sharded, tmp_path / "x")
    os.unlink(x / MANIFEST)  # an export written before manifests: safetensors' own parse must fail cleanly
    capsys.readouterr()
    assert main(["--check", str(x)]) == 0
    assert f"no {MANIFEST}: files not verified" in capsys.readouterr().out
    shard = sorted(f for f in os.listdir(x) if f.endswith(".safetensors"))[1]
    if where == "header":
        own(x / shard)
        with open(x / shard, "r+b") as fh:
            fh.write(b"\xff" * 8)  # header length beyond the file
    else:
        truncate(x / shard)
    err = one_line_error(capsys, main(["--check", str(x)]))
    assert f"{x / shard} is truncated or corrupted" in err, err


@pytest.mark.parametrize("marker", ["dense", "version", "missing_group"])
def test_check_validates_the_packing_marker(sharded, tmp_path, capsys, marker):
    x = copy_of(sharded, tmp_path / "x")
    config = json.load(open(x / "config.json"))
    block = config["quantization_config"]["loaq_format"]
    if marker == "dense":
        block["packing"]["group_0"] = "int32-dense3bit"  # compressed-tensors 0.19's 3-bit layout
    elif marker == "version":
        block["format_version"] = 2
    else:
        block["packing"] = {}
    os.unlink(x / "config.json")
    json.dump(config, open(x / "config.json", "w"))
    write_manifest(str(x))
    err = one_line_error(capsys, main(["--check", str(x)]))
    expect = {"dense": "loaq_format.packing.group_0 is 'int32-dense3bit', but LoaQ packs 3-bit weights as 'int32-10x3bit'",
              "version": "loaq_format.format_version 2 is not 1",
              "missing_group": "loaq_format.packing.group_0 is None"}[marker]
    assert expect in err, err


@pytest.mark.parametrize("where", ["none", "top"])
def test_without_marker_check_passes_and_says_so(sharded, tmp_path, capsys, where):
    x = copy_of(sharded, tmp_path / "x")
    config = json.load(open(x / "config.json"))
    block = config["quantization_config"].pop("loaq_format")
    if where == "top":  # where exports before the marker moved into quantization_config held it
        config["loaq_format"] = block
    os.unlink(x / "config.json")
    json.dump(config, open(x / "config.json", "w"))
    write_manifest(str(x))
    capsys.readouterr()
    assert main(["--check", str(x)]) == 0
    out = capsys.readouterr().out
    assert ("no loaq_format marker" if where == "none" else "loaq_format at the top level of config.json") in out, out
    assert "the vLLM plugin serves it as a stock checkpoint" in out


def test_output_modes_follow_the_umask(native_dir, tmp_path):
    old = os.umask(0o022)
    try:
        assert main([native_dir, str(tmp_path / "x")]) == 0
    finally:
        os.umask(old)
    x = tmp_path / "x"
    assert os.stat(x).st_mode & 0o777 == 0o755
    assert {f: os.stat(x / f).st_mode & 0o777 for f in os.listdir(x)} == dict.fromkeys(os.listdir(x), 0o644)


STALLED_EXPORT = """
import sys, time
import loaq.export.writer as w
def stall(*a, **k):
    print("ready", flush=True)
    time.sleep(120)
w.model_card = stall
from loaq.export.cli import main
sys.exit(main(sys.argv[1:]))
"""


def stalled_export(native_dir, out):
    """A ``loaq-export`` subprocess stopped inside its temporary directory (shards written, card pending)."""
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1")
    p = subprocess.Popen([sys.executable, "-c", STALLED_EXPORT, native_dir, str(out)], stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)
    assert p.stdout.readline() == "ready\n", p.communicate()
    return p


def hidden(path):
    return sorted(f for f in os.listdir(path) if f.startswith("."))


def test_sigint_mid_export_says_so_and_leaves_nothing(native_dir, tmp_path):
    p = stalled_export(native_dir, tmp_path / "x")
    assert len(hidden(tmp_path)) == 1
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=60)
    assert (p.returncode, err) == (130, "interrupted; nothing was written\n")
    assert os.listdir(tmp_path) == []


def test_sigkilled_export_is_cleaned_by_the_next_run(native_dir, tmp_path):
    p = stalled_export(native_dir, tmp_path / "x")
    p.kill()
    p.communicate(timeout=60)
    stale = hidden(tmp_path)
    assert len(stale) == 1 and stale[0].startswith(".loaq-export-")
    live = tmp_path / ".loaq-export-live"  # a running export's directory (this process owns it): kept
    live.mkdir()
    (live / ".loaq-owner").write_text(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
    assert main([native_dir, str(tmp_path / "y")]) == 0
    assert hidden(tmp_path) == [".loaq-export-live"] and sorted(os.listdir(tmp_path)) == [".loaq-export-live", "y"]
