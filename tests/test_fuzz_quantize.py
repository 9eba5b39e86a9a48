"""Fuzzing `loaq quantize` (issue #20): random and truncated input files, random flag combinations.

Every run must end with exit 0 and a loadable checkpoint, or exit 2 with exactly one `error:` line and no
traceback, and must never leave an output or a `.partial` a later run trips on. The examples are
derandomized (CI sees the same ones every time) and few, on the tiny model with a tiny budget; inputs the
fuzzer found failing are kept below as explicit ``@example`` regressions.
"""

import contextlib
import io
import json
import os
import shutil
import struct
import tempfile

import pytest

import hypothesis  # noqa: E402,F401  (the test extra installs it; never skip the fuzz suite)
from hypothesis import HealthCheck, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import loaq  # noqa: E402
from loaq.cli import main  # noqa: E402
from loaq.methods import METHODS  # noqa: E402

FUZZ = settings(max_examples=8, deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
BUDGET = ["--nsamples", "1", "--seqlen", "8", "--batch-size", "1"]


def run(argv: list[str], out: str) -> int:
    """``main(argv)`` checked: exit 0 with a loadable checkpoint at ``out``, or exit 2 with one ``error:``
    line; either way no ``.partial`` is left, and after a refusal no ``out`` either."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(["-q", *argv, "--out", out])  # an exception escaping here is a failure, with its traceback
    text = err.getvalue()
    assert "Traceback" not in text, text
    assert not os.path.exists(out + ".partial"), (argv, text)
    if rc == 0:
        loaded = loaq.load(out)
        assert loaded.kind == "native" and loaded.meta["quantized"], argv
    else:
        errors = [line for line in text.strip().splitlines() if line.startswith("error: ")]
        assert rc == 2 and len(errors) == 1, (rc, argv, text)
        assert not os.path.exists(out), (argv, text)
    return rc


def _bytes_like(valid: bytes, cut: int = 4096):
    """Random bytes, truncations of ``valid`` and ``valid`` with a few bytes changed."""
    valid = valid[:cut]
    flips = st.lists(st.tuples(st.integers(0, max(0, len(valid) - 1)), st.integers(0, 255)), min_size=1, max_size=4)

    def flip(changes):
        b = bytearray(valid)
        for i, v in changes:
            if b:
                b[i] = v
        return bytes(b)

    return st.one_of(st.binary(max_size=512), st.integers(0, len(valid)).map(lambda n: valid[:n]), flips.map(flip))


GGUF_HEADER = b"GGUF" + struct.pack("<IQQ", 3, 2, 3)


def _gguf_sample() -> bytes:
    """The first 64 KiB of the bundled SmolLM2 GGUF (header and part of its metadata), else a bare header."""
    from loaq.errors import LoaQError
    from loaq.models import default_model_path

    try:
        with open(default_model_path(), "rb") as fh:
            return fh.read(1 << 16)
    except (LoaQError, OSError):
        return GGUF_HEADER


# (a) files

@FUZZ
@given(data=_bytes_like(_gguf_sample(), cut=1 << 16))
@example(data=b"")
@example(data=GGUF_HEADER)  # claims tensors and metadata it does not hold: struct.error in the reader
@example(data=b"GGUF" + struct.pack("<IQQ", 1, 0, 0))  # a GGUF version the reader cannot read
def test_fuzz_gguf_model_file(calib, data):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "m.gguf")
        open(path, "wb").write(data)
        assert run(["quantize", "--model", path, "--calib", calib, "--method", "rtn"], os.path.join(d, "q")) == 2


def _tiny_config() -> bytes:
    """The tiny model's config.json, as :func:`tests.tiny.tiny_model_dir` writes it."""
    from tests.tiny import CONFIGS

    cfg = CONFIGS["llama"]()
    cfg.architectures = ["LlamaForCausalLM"]
    return cfg.to_json_string().encode()


@FUZZ
@given(data=_bytes_like(_tiny_config()))
@example(data=b"{")
@example(data=b"\xff\xfe")
@example(data=b"[]")
@example(data=b'{"model_type": "no-such-arch"}')
def test_fuzz_config_json(model_dir, calib, data):
    with tempfile.TemporaryDirectory() as d:
        m = shutil.copytree(model_dir, os.path.join(d, "m"))
        open(os.path.join(m, "config.json"), "wb").write(data)
        run(["quantize", "--model", m, "--calib", calib, "--method", "rtn"], os.path.join(d, "q"))


_TEXT = st.one_of(st.binary(max_size=300), st.text(max_size=300).map(str.encode))


@FUZZ
@given(data=_TEXT, ext=st.sampled_from(["txt", "jsonl"]))
@example(data=bytes(range(256)), ext="txt")
@example(data=b'{"text": 1}\n', ext="jsonl")
@example(data=b'{"text": "\xff"}\n', ext="jsonl")
def test_fuzz_calibration_file(model_dir, data, ext):
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"c.{ext}")
        open(path, "wb").write(data)
        run(["quantize", "--model", model_dir, "--calib", path, "--method", "gptq", *BUDGET], os.path.join(d, "q"))


_VALUE = st.one_of(st.none(), st.booleans(), st.integers(-3, 300), st.floats(allow_nan=True), st.text(max_size=6),
                   st.sampled_from(["loaq", "gptq", "hadamard", "minmax", "neuqi", "alg"]), st.lists(st.integers(), max_size=2))
_FIELDS = {"spec": ["bits", "group_size", "symmetric", "init"], "method": ["name", "alpha", "beta", "rescale", "soa", "shat"],
           "solver": ["blocksize", "act_order", "percdamp"], "act": ["bits", "symmetric"], "rotation": ["kind", "seed"],
           "calibration": ["nsamples", "seqlen", "seed", "source", "split", "field", "chat"]}
_RECIPE = st.dictionaries(
    st.sampled_from([*_FIELDS, "model", "junk"]),
    st.one_of(_VALUE, st.dictionaries(st.sampled_from(sorted({f for fs in _FIELDS.values() for f in fs} | {"junk"})),
                                      _VALUE, max_size=4)),
    max_size=4)


@settings(FUZZ, max_examples=6)
@given(recipe=st.one_of(_RECIPE.map(lambda r: ("json", json.dumps(r).encode())), _RECIPE.map(lambda r: ("yaml", _yaml(r))),
                        st.tuples(st.sampled_from(["json", "yaml"]), st.binary(max_size=200))))
@example(recipe=("yaml", b"\xff\xfe: 1"))  # not UTF-8: was a UnicodeDecodeError outside the parser's try
@example(recipe=("yaml", b"spec: {bits: '4'}"))  # wrong types: were TypeErrors deep in the settings
@example(recipe=("json", b'{"calibration": {"nsamples": true}}'))
@example(recipe=("json", b'{"model": 5}'))
@example(recipe=("json", b'{"method": {"alpha": NaN}}'))
def test_fuzz_recipe_file(model_dir, calib, recipe):
    ext, data = recipe
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, f"r.{ext}")
        open(path, "wb").write(data)
        run(["quantize", "--recipe", path, "--model", model_dir, "--calib", calib, *BUDGET], os.path.join(d, "q"))


def _yaml(r) -> bytes:
    import yaml

    return yaml.safe_dump(r, allow_unicode=True).encode()


# (b) flag combinations

@st.composite
def _flags(draw) -> list[str]:
    """Mostly combinations the method and grid accept (so most runs quantize); in about a quarter of the
    draws ("sloppy") any flag may be added, so refusals are exercised too."""
    method = draw(st.sampled_from(tuple(METHODS)))
    takes = METHODS[method].settings
    sloppy = draw(st.integers(0, 3)) == 0
    w4a4 = draw(st.integers(0, 3)) == 0
    bits = 4 if w4a4 and not sloppy else draw(st.sampled_from([2, 3, 4, 8]))
    group = 0 if w4a4 and not sloppy else draw(st.sampled_from([0, 16, 32, 48]))
    f = ["--method", method, "--bits", str(bits), "--group-size", str(group), "--nsamples", str(draw(st.integers(1, 3))),
         "--seqlen", str(draw(st.integers(8, 32))), "--batch-size", str(draw(st.integers(1, 3)))]

    def maybe(flag, values, allowed=True):
        if (allowed or sloppy) and draw(st.booleans()):
            f.extend([flag, draw(st.sampled_from(values))] if values else [flag])

    floats = ["0", "0.25", "1", "-0.5", "2"] + (["nan", "inf"] if sloppy else [])
    maybe("--alpha", floats, "alpha" in takes)
    maybe("--beta", floats, "beta" in takes)
    maybe("--no-rescale", None, "rescale" in takes)
    maybe("--no-soa", None, "soa" in takes and "--beta" not in f)
    maybe("--shat", ["text", "alg"], "shat" in takes and "--no-rescale" not in f)
    maybe("--percdamp", ["0", "0.01", "1"])
    maybe("--blocksize", ["1", "7", "128"])
    maybe("--no-act-order", None)
    maybe("--sym", None)
    maybe("--rotate", ["none", "hadamard"])
    maybe("--init", ["minmax", "neuqi"])
    maybe("--neuqi-continuous", None, "neuqi" in f)
    if w4a4 or sloppy:
        maybe("--act-bits", ["4"])
        maybe("--act-sym", None, "--act-bits" in f)
    return f


@settings(FUZZ, max_examples=10)
@given(flags=_flags())
@example(flags=["--method", "gptq", "--percdamp", "-1"])  # a negative damping used to run (and could never factor)
@example(flags=["--method", "gptq", "--blocksize", "0"])  # range() step 0 after loading, leaving OUT.partial
@example(flags=["--method", "loaq", "--alpha", "nan"])
@example(flags=["--method", "gptq", "--bits", "4", "--group-size", "16", "--sym", "--act-bits", "4"])
def test_fuzz_quantize_flags(model_dir, calib, flags):
    with tempfile.TemporaryDirectory() as d:
        run(["quantize", "--model", model_dir, "--calib", calib, *flags], os.path.join(d, "q"))
