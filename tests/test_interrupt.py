"""Interrupting the real command lines and recovering (issue #20).

Each case starts ``loaq quantize``, ``loaq-export`` or ``loaq serve`` as a subprocess, waits for a point
(a line on stderr or a file on disk, polled, never a fixed sleep), stops the process there with SIGSTOP,
checks it is still at that point, sends SIGINT, SIGTERM or SIGKILL and resumes it. Then: exit status 130
for SIGINT and SIGTERM with no traceback, only the documented leftovers, and the documented recovery
(``--resume``, or a plain rerun) writes files byte-identical to an uninterrupted run's.
"""

import glob
import os
import signal
import subprocess
import sys
import time

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ENV = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", TOKENIZERS_PARALLELISM="false")
TIMEOUT = 120  # seconds any one wait may take
LAYERS = 4
NATIVE_FILES = ("weights/index.json", "weights/rest.safetensors", *(f"weights/layer-{i:05d}.safetensors" for i in range(LAYERS)))


@pytest.fixture(scope="module")
def model4(tmp_path_factory):
    """A 4-layer tiny Llama, wide enough (128/512) that one layer takes a fraction of a second."""
    from tests.tiny import tiny_model_dir

    return tiny_model_dir(str(tmp_path_factory.mktemp("m4") / "tiny4"), num_hidden_layers=LAYERS, hidden_size=128,
                          intermediate_size=512)


def quantize_cmd(model, calib, out, *extra):
    # progress bars on: their lines on stderr are the points of the interruptions
    return [sys.executable, "-m", "loaq.cli", "quantize", "--model", model, "--calib", calib, "--method", "loaq",
            "--nsamples", "4", "--seqlen", "32", "--batch-size", "2", "--out", str(out), *extra]


def export_cmd(native, out):
    return [sys.executable, "-m", "loaq.export.cli", str(native), str(out)]


def run(cmd):
    r = subprocess.run(cmd, env=ENV, capture_output=True, text=True, timeout=TIMEOUT)
    assert r.returncode == 0 and "Traceback" not in r.stderr, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module")
def reference(model4, calib, tmp_path_factory):
    """(native checkpoint, its export) of one uninterrupted run."""
    root = tmp_path_factory.mktemp("ref")
    run(quantize_cmd(model4, calib, root / "q"))
    run(export_cmd(root / "q", root / "ct"))
    return root / "q", root / "ct"


def interrupt(cmd, sig, ready, still, reset, workdir, attempts=3):
    """Run ``cmd`` until ``ready(stderr)``, stop it, and if ``still(stderr)`` holds (it has not moved past
    the point) send ``sig``; returns (exit status, stderr). A missed point kills the run, ``reset()``s and retries."""
    for attempt in range(attempts):
        err_path = workdir / f"stderr-{attempt}"
        with open(err_path, "w") as err:
            proc = subprocess.Popen(cmd, env=ENV, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                    start_new_session=True)
        try:
            deadline = time.monotonic() + TIMEOUT
            while not ready(err_path.read_text(errors="replace")):
                assert proc.poll() is None, f"exited ({proc.returncode}) before the point: {err_path.read_text()[-2000:]}"
                assert time.monotonic() < deadline, "the point was not reached in time"
                time.sleep(0.002)
            os.kill(proc.pid, signal.SIGSTOP)
            if still(err_path.read_text(errors="replace")):
                os.kill(proc.pid, sig)
                os.kill(proc.pid, signal.SIGCONT)
                return proc.wait(TIMEOUT), err_path.read_text(errors="replace")
        finally:
            if proc.poll() is None:  # a missed point or a failed wait: SIGKILL ends a stopped process too
                proc.kill()
                proc.wait(TIMEOUT)
        reset()
    raise AssertionError(f"the process moved past the point {attempts} times")


def assert_interrupted(rc, err, sig, *words):
    """SIGKILL: killed. SIGINT, SIGTERM: status 130, no traceback, the last line says so (and names ``words``)."""
    if sig == signal.SIGKILL:
        assert rc == -signal.SIGKILL
        return
    assert rc == 130 and "Traceback" not in err, err[-3000:]
    last = err.rstrip().rsplit("\n", 1)[-1]  # a progress bar may share it: it ends with no newline
    assert all(w in last for w in ("interrupted", *words)), err[-500:]


def assert_same_files(a, b, names):
    for name in names:
        assert open(os.path.join(a, name), "rb").read() == open(os.path.join(b, name), "rb").read(), name


def hidden(parent):
    return sorted(glob.glob(os.path.join(parent, ".loaq-*")))


# point: (ready(stderr, out), still(stderr, out): not past the point yet, what the interruption leaves)
def _layer0_file(out):
    """Layer 0 is finished (resumable) once its codes are saved (the streams only every N layers: resume
    replays the layers after the last saved streams)."""
    return os.path.join(f"{out}.partial", "layers", "0000.safetensors")


QUANT_POINTS = {
    # model weights loading: nothing is written yet
    "loading": (lambda err, out: "Loading weights" in err, lambda err, out: "layers:" not in err, "nothing"),
    # inside layer 0: its progress bar is on screen, its checkpoint is not on disk
    "layer0": (lambda err, out: "layers:" in err, lambda err, out: not os.path.exists(_layer0_file(out)), "nothing"),
    # after the first per-layer checkpoint (codes and streams) was saved, before the run finished
    "checkpoint": (lambda err, out: os.path.exists(_layer0_file(out)), lambda err, out: not os.path.exists(out),
                   "partial"),
}
SIGNALS = {"SIGINT": signal.SIGINT, "SIGTERM": signal.SIGTERM, "SIGKILL": signal.SIGKILL}


@pytest.mark.parametrize("sig, point", [("SIGINT", "loading"), ("SIGINT", "layer0"), ("SIGINT", "checkpoint"),
                                        ("SIGTERM", "checkpoint"), ("SIGKILL", "checkpoint")])
def test_quantize_interrupted_then_recovered_is_bit_identical(model4, calib, reference, tmp_path, sig, point):
    import shutil

    (tmp_path / "runs").mkdir()
    out = tmp_path / "runs" / "q"
    ready, still, leaves = QUANT_POINTS[point]

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        shutil.rmtree(f"{out}.partial", ignore_errors=True)

    # the "loading" point is transformers' whole-model load (--load eager); lazy runs read a layer at a time
    cmd = quantize_cmd(model4, calib, out, *(["--load", "eager"] if point == "loading" else []))
    rc, err = interrupt(cmd, SIGNALS[sig], lambda e: ready(e, out), lambda e: still(e, out), reset, tmp_path)
    if leaves == "partial":
        assert_interrupted(rc, err, SIGNALS[sig], "--resume")
        assert os.path.exists(_layer0_file(out)) and not os.path.exists(out)
        assert os.listdir(out.parent) == ["q.partial"]
        run(cmd + ["--resume"])
    else:
        assert_interrupted(rc, err, SIGNALS[sig])
        assert os.listdir(out.parent) == [], "an interruption before the first finished layer leaves nothing"
        if point == "loading":
            return  # nothing on disk: a rerun is the uninterrupted run
        run(cmd)
    assert not os.path.exists(f"{out}.partial") and hidden(out.parent) == []
    assert_same_files(out, reference[0], NATIVE_FILES)


def _writing(parent):
    """Whether a hidden temporary output in ``parent`` holds a file (other than hx's owner file)."""
    return any(f != ".loaq-owner" for d in hidden(parent) for f in os.listdir(d))


@pytest.mark.parametrize("sig", ["SIGINT", "SIGKILL"])
def test_export_interrupted_then_rerun_is_bit_identical(reference, tmp_path, sig):
    """Interrupted while it writes into its hidden temporary output; a plain rerun then writes the same
    export and leaves no hidden temporary directory (after SIGKILL too: the next run removes the dead one's)."""
    import shutil

    native, ref_export = reference
    parent = tmp_path / "runs"
    parent.mkdir()
    out = parent / "ct"

    def reset():
        shutil.rmtree(out, ignore_errors=True)
        for d in hidden(parent):
            shutil.rmtree(d, ignore_errors=True)

    rc, err = interrupt(export_cmd(native, out), SIGNALS[sig], lambda e: _writing(parent),
                        lambda e: _writing(parent) and not out.exists(), reset, tmp_path, attempts=5)
    assert_interrupted(rc, err, SIGNALS[sig])
    assert not out.exists()
    if sig != "SIGKILL":
        lines = [ln for ln in err.splitlines() if ln.strip() and "%|" not in ln]  # progress bars aside
        assert len(lines) == 1 and lines[0].startswith("interrupted"), err[-3000:]
        assert hidden(parent) == []
    run(export_cmd(native, out))
    shards = sorted(f for f in os.listdir(ref_export) if f.endswith(".safetensors"))
    assert shards and sorted(f for f in os.listdir(out) if f.endswith(".safetensors")) == shards
    assert_same_files(out, ref_export, shards)
    assert hidden(parent) == [], "a killed export's temporary directory outlived the next run"


FAKE_SERVE = """
import sys
import loaq.serve.server as server
from loaq.cli import main

# a fake vLLM: records its PID and never answers /health
server.server_command = lambda *args, **kwargs: ["sh", "-c", "echo $$ > {pidfile}; exec sleep 600"]
sys.exit(main(["serve", {model_dir!r}, "--timeout", "120"]))
"""


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_serve_interrupted_while_starting_stops_the_server(tmp_path, sig):
    """`loaq serve` interrupted while the (fake) server starts stops the server's process group: no orphan."""
    model_dir = tmp_path / "export"
    model_dir.mkdir()
    (model_dir / "config.json").write_text('{"max_position_embeddings": 64}')
    pidfile = tmp_path / "server.pid"
    script = FAKE_SERVE.format(pidfile=pidfile, model_dir=str(model_dir))

    def started(err):
        return pidfile.exists() and pidfile.read_text().strip().isdigit()

    rc, err = interrupt([sys.executable, "-c", script], SIGNALS[sig], started, lambda e: True,
                        lambda: pytest.fail("unreachable"), tmp_path, attempts=1)
    pid = int(pidfile.read_text())
    assert rc == 0 and "Traceback" not in err, err  # stopping the server on Ctrl-C is the normal end
    deadline = time.monotonic() + 10
    while _alive(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pid), f"the server process {pid} outlived `loaq serve`"
