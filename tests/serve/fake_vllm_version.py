"""Run in a subprocess by ``test_plugin.py``: vLLM with the LoaQ plugin installed but ``vllm.__version__`` faked.

argv: a LoaQ export that needs the plugin, a bf16 model. Prints ``REFUSED <message>`` (or ``LOADED``) for the
export, then ``GENERATED <n>`` after greedy decoding with the bf16 model.
"""

import os
import sys

os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

import vllm  # noqa: E402

vllm.__version__ = "0.99.0"  # what the plugin's register() reads
from vllm import LLM, SamplingParams  # noqa: E402

export_dir, bf16_dir = sys.argv[1:3]
try:
    LLM(model=export_dir, dtype="float32", max_model_len=64, max_num_seqs=4, enforce_eager=True)
    print("LOADED", flush=True)
except Exception as exc:  # noqa: BLE001
    print("REFUSED", type(exc).__name__, str(exc).replace("\n", "\\n"), flush=True)
llm = LLM(model=bf16_dir, dtype="bfloat16", max_model_len=64, max_num_seqs=4, enforce_eager=True)
out = llm.generate([{"prompt_token_ids": [5, 17, 33]}], SamplingParams(max_tokens=8, temperature=0, ignore_eos=True))
print("GENERATED", len(out[0].outputs[0].token_ids), flush=True)
