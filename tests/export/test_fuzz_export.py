"""Fuzzing ``loaq-export`` and ``loaq-export --check`` (issue #20): random, truncated and byte-flipped
native checkpoint files (``loaq.json``, ``config.json``, ``quantized.safetensors``, ``model.safetensors``),
and single flipped bytes anywhere in an export.

An export must end with exit 0 and an export ``--check`` accepts, or exit 2 with exactly one ``error:`` line,
no traceback, no output and no hidden temporary directory. ``--check`` must refuse every single flipped byte
in any file the manifest lists, naming the file. Examples are derandomized (CI sees the same ones).
"""

import contextlib
import io
import os
import shutil

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loaq.export.cli import main
from loaq.export.manifest import MANIFEST
from tests.export.test_export import bases  # noqa: F401  (fixture)
from tests.export.test_integrity import native_dir, sharded  # noqa: F401  (fixtures)

FUZZ = settings(max_examples=12, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])
NATIVE_FILES = ["loaq.json", "config.json", "weights/index.json", "weights/layer-00000.safetensors",
                "weights/rest.safetensors"]


def run(argv: list[str]) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        rc = main(argv)  # an exception escaping here is a failure, with its traceback
    text = err.getvalue().strip()
    assert "Traceback" not in text, text
    if rc != 0:
        assert rc == 2 and text.startswith("error: ") and "\n" not in text, (rc, text)
    return rc, text


def damage(path: str, kind: str, where: float, junk: bytes) -> None:
    data = bytearray(open(path, "rb").read())
    at = min(int(where * len(data)), len(data) - 1)
    if kind == "truncate":
        data = data[:at]
    elif kind == "flip":
        data[at] ^= 0xFF
    else:  # random bytes
        data = bytearray(junk)
    open(path, "wb").write(bytes(data))


@FUZZ
@given(name=st.sampled_from(NATIVE_FILES), kind=st.sampled_from(["truncate", "flip", "random"]),
       where=st.floats(0, 1), junk=st.binary(max_size=256))
def test_export_of_a_damaged_native_is_ok_or_one_line(native_dir, tmp_path_factory, name, kind, where, junk):
    work = tmp_path_factory.mktemp("fz")
    src = work / "n"
    shutil.copytree(native_dir, src)
    damage(str(src / name), kind, where, junk)
    out = work / "x"
    rc, text = run([str(src), str(out)])
    assert [f for f in os.listdir(work) if f.startswith(".")] == [], "a hidden temporary directory was left"
    if rc == 0:  # e.g. a flipped byte inside a tensor's data: still a well-formed export
        assert run(["--check", str(out)])[0] == 0
    else:
        assert not out.exists(), text


@FUZZ
@given(index=st.integers(0, 10**6), where=st.floats(0, 1))
def test_check_refuses_every_single_flipped_byte(sharded, tmp_path_factory, index, where):
    listed = sorted(f for f in os.listdir(sharded) if f not in (MANIFEST, "README.md"))
    name = listed[index % len(listed)]
    copy = tmp_path_factory.mktemp("ck") / "x"
    shutil.copytree(sharded, copy)
    damage(str(copy / name), "flip", where, b"")
    rc, text = run(["--check", str(copy)])
    assert rc == 2 and name in text, text
