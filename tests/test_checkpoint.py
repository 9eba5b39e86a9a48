"""Native checkpoint writes (:func:`loaq.checkpoint.atomic_dir`): umask-derived modes, stale temporary
directories of killed runs removed by the next write, live ones kept."""

import json
import os
import socket
import subprocess

from loaq.checkpoint import OWNER, atomic_dir, save_native


def write(out, marker="x"):
    with atomic_dir(str(out), force=False) as tmp:
        os.makedirs(os.path.join(tmp, "sub"))
        open(os.path.join(tmp, "sub", "f"), "w").write(marker)
        open(os.path.join(tmp, "g"), "w").write(marker)


def modes(root):
    out = {".": os.stat(root).st_mode & 0o777}
    for dirpath, dirs, files in os.walk(root):
        for f in dirs + files:
            p = os.path.join(dirpath, f)
            out[os.path.relpath(p, root)] = os.stat(p).st_mode & 0o777
    return out


def test_modes_follow_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        write(tmp_path / "a")
    finally:
        os.umask(old)
    assert modes(tmp_path / "a") == {".": 0o750, "sub": 0o750, "sub/f": 0o640, "g": 0o640}


def test_native_checkpoint_is_readable_by_others(tmp_path):
    from tests.tiny import tiny_model, tiny_tokenizer

    model = tiny_model("llama", vocab=320)
    old = os.umask(0o022)
    try:
        save_native(str(tmp_path / "n"), model, tiny_tokenizer(), {}, {"config": {"spec": {"bits": 4}}}, force=False)
    finally:
        os.umask(old)
    got = modes(tmp_path / "n")
    assert got.pop(".") == got.pop("weights") == 0o755 and set(got.values()) == {0o644} and OWNER not in got
    assert {"loaq.json", "weights/index.json", "weights/rest.safetensors", "weights/layer-00000.safetensors",
            "config.json"} <= set(got)


def fake_temp(parent, name, pid, host=None):
    d = parent / name
    d.mkdir()
    (d / "part").write_text("x")
    (d / OWNER).write_text(json.dumps({"pid": pid, "host": host or socket.gethostname()}))
    return d


def test_stale_temporaries_are_removed_live_ones_kept(tmp_path):
    dead = subprocess.Popen(["true"])
    dead.wait()
    fake_temp(tmp_path, ".loaq-dead", dead.pid)
    fake_temp(tmp_path, ".loaq-live", os.getpid())
    fake_temp(tmp_path, ".loaq-elsewhere", dead.pid, host="another-host")  # another machine's run on a shared disk
    (tmp_path / ".loaq-unowned").mkdir()  # no owner file (yet): may be a write just starting
    (tmp_path / ".loaq-notes").write_text("a file, not ours")
    write(tmp_path / "a")
    assert sorted(os.listdir(tmp_path)) == [".loaq-elsewhere", ".loaq-live", ".loaq-notes", ".loaq-unowned", "a"]
    assert sorted(os.listdir(tmp_path / "a")) == ["g", "sub"]
