"""Peak CPU memory of lazy vs eager loading (issue #14 item 1) and of the shard-streamed export (item 3).

Each measurement runs in its own process: RSS after the imports (``VmRSS``), then the job, then the peak
(``VmHWM``); the table reports peak − post-import RSS. SmolLM2-135M (the offline GGUF) is quantized with
RTN and GPTQ (W4 per channel, a small calibration) eagerly and lazily; the lazy GPTQ checkpoint is then
exported by this tree (shard-streamed) and, when ``--old-tree`` names a checkout of the previous code, by it
too (it reads the ``loaq-native/1`` layout, made here from the same tensors) — the two exports are compared
tensor by tensor (bytes) and config by config.

    PYTHONPATH=$PWD python benchmarks/lazy_memory.py --old-tree /work/main --out benchmarks/results/lazy_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

PRELUDE = """
import os, sys, time, json
import torch, transformers, safetensors.torch, loaq, loaq.api, loaq.pipeline, loaq.checkpoint  # noqa: F401
from transformers.models.llama import modeling_llama  # noqa: F401
torch.set_num_threads(int(os.environ.get("THREADS", "2")))
def rss(key="VmRSS"):  # VmHWM: the peak since exec (ru_maxrss would count the parent's size at fork)
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
base = rss()
t0 = time.time()
"""
REPORT = """
print(json.dumps({"peak_above_import_mb": rss("VmHWM") - base,
                  "seconds": time.time() - t0}))
"""
QUANTIZE = """
from loaq.config import Calibration, Method, QuantConfig
from loaq.grids import GridSpec
loaq.quantize(None, QuantConfig(spec=GridSpec(4, 0), method=Method(sys.argv[1])),
              Calibration(nsamples=int(sys.argv[3]), seqlen=int(sys.argv[4])), out=sys.argv[5], batch_size=4,
              progress=False, load=sys.argv[2])
"""
EXPORT = """
import torch
from loaq.export.writer import export
export(sys.argv[1], sys.argv[2], dtype=torch.bfloat16)
"""


def start(code: str, args: list[str], pythonpath: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=pythonpath, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return subprocess.Popen([sys.executable, "-c", PRELUDE + code + REPORT, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def result(proc: subprocess.Popen) -> dict:
    out, err = proc.communicate()
    if proc.returncode:
        raise SystemExit(err[-3000:])
    return json.loads(out.strip().splitlines()[-1])


def run(code: str, args: list[str], pythonpath: str) -> dict:
    return result(start(code, args, pythonpath))


def v1_layout(native: str, dst: str) -> None:
    """The same checkpoint in the old two-file layout (for the old exporter)."""
    from safetensors.torch import save_file

    from loaq.shards import other_tensors, quantized_tensors

    os.makedirs(dst)
    for f in os.listdir(native):
        if f != "weights":
            os.symlink(os.path.join(native, f), os.path.join(dst, f))
    save_file(quantized_tensors(native), os.path.join(dst, "quantized.safetensors"))
    save_file(other_tensors(native), os.path.join(dst, "model.safetensors"))


def compare_exports(a: str, b: str) -> dict:
    import torch
    from safetensors.torch import load_file

    def tensors(d):
        out = {}
        for f in sorted(os.listdir(d)):
            if f.endswith(".safetensors"):
                out |= load_file(os.path.join(d, f))
        return out

    ta, tb = tensors(a), tensors(b)
    same = ta.keys() == tb.keys() and all(
        ta[k].dtype == tb[k].dtype and ta[k].shape == tb[k].shape
        and torch.equal(ta[k].contiguous().view(torch.uint8), tb[k].contiguous().view(torch.uint8)) for k in ta)
    ca, cb = (json.load(open(os.path.join(d, "config.json"))) for d in (a, b))
    files = [sorted(f for f in os.listdir(d) if f.endswith(".safetensors")) for d in (a, b)]
    return {"tensors": len(ta), "tensor_bytes_identical": same, "config_identical": ca == cb,
            "files_old": files[0], "files_new": files[1]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--old-tree", help="a checkout of the previous code (its export holds the whole state dict)")
    p.add_argument("--nsamples", type=int, default=8)
    p.add_argument("--seqlen", type=int, default=128)
    p.add_argument("--out", default=os.path.join(ROOT, "benchmarks", "results", "lazy_memory.json"))
    a = p.parse_args(argv)
    rows = []
    with tempfile.TemporaryDirectory(prefix="loaq-lazymem-") as tmp:
        jobs = {(method, load): start(QUANTIZE, [method, load, str(a.nsamples), str(a.seqlen),
                                                 os.path.join(tmp, f"{method}-{load}")], ROOT)
                for method in ("rtn", "gptq") for load in ("eager", "lazy")}  # side by side: peaks are per process
        for (method, load), proc in jobs.items():
            rows.append({"job": "quantize", "method": method, "load": load, **result(proc)})
            print(rows[-1], flush=True)
        native = os.path.join(tmp, "gptq-lazy")
        new = start(EXPORT, [native, os.path.join(tmp, "x-new")], ROOT)
        comparison = old = None
        if a.old_tree:
            v1_layout(native, os.path.join(tmp, "native-v1"))
            old = start(EXPORT, [os.path.join(tmp, "native-v1"), os.path.join(tmp, "x-old")], a.old_tree)
        rows.append({"job": "export", "code": "streamed (this tree)", **result(new)})
        print(rows[-1], flush=True)
        if old is not None:
            rows.append({"job": "export", "code": f"whole state dict ({a.old_tree})", **result(old)})
            print(rows[-1], flush=True)
            comparison = compare_exports(os.path.join(tmp, "x-old"), os.path.join(tmp, "x-new"))
            print(comparison, flush=True)
    report = {"command": " ".join([os.path.basename(sys.executable), *sys.argv]),
              "machine": f"{platform.node()} {platform.machine()}, {os.cpu_count()} CPUs (shared)",
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "model": "SmolLM2-135M-Instruct (GGUF Q4_1)",
              "calibration": f"{a.nsamples} x {a.seqlen} tokens",
              "note": "the jobs of each step run side by side (seconds are not comparable, peaks are per process)",
              "rows": rows, "export_comparison": comparison}
    os.makedirs(os.path.dirname(a.out), exist_ok=True)
    with open(a.out, "w") as fh:
        json.dump(report, fh, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
