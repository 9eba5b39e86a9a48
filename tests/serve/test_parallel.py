"""Tensor- and pipeline-parallel serving of a LoaQ export on CPU: TP=2 and PP=2 against TP=1.

One tiny checkpoint (:func:`tests.serve.checkpoints.build` with ``group=64, r4_blocks=2``) holds every variant:
2/3/4-bit weights sym/asym per channel and in groups of 64 (g32 on the 3-bit down_proj: 96 inputs a rank),
W4A4 with sym and asym activations (also on o_proj and down_proj, which TP splits along their inputs) and the
block-diagonal online R4 of ``--r4-blocks 2`` on every down_proj; 4 heads and 2 KV heads split over two ranks.
The module fixture launches one TP=2 server and one PP=2 server (``loaq.serve.server.Server``) at once and runs
the TP=1 in-process engine while they start (the starts overlap: the servers wait on each other's processes
and on I/O for part of theirs), 16 greedy tokens per prompt.

Tolerances. PP=2 runs every layer as TP=1 does, on another process: same tokens, logprobs within TOL[False]
(1e-4, fp32 rounding). TP=2 sums the row-parallel layers' partial products across ranks (fp32 rounding), and
its W4A4 layers o_proj/down_proj quantize activations per token *per rank* (over the rank's half of the
inputs, no communication: :mod:`loaq.serve.shard`), a finer grid than TP=1's, so TP=2 is checked against its
own contract, the reference with per-shard activation fake-quant, with test_plugin's W4A4 tolerances (every
token within TOL[True] = 0.3, mean within MEAN_TOL_W4A4 = 0.1 and below half the gap to the model without
activation quantization; measured max 8.5e-6), and its first tokens against TP=1's within TOL[True] (measured
max 0.11). Suite cost on the 2-core AMD EPYC (2026-12-01, pytest --durations of two whole-suite runs): the
fixture took 152 s with the TP=1 engine and the two servers one after the other, 139 s launched together (in a run
whose other tests were 5-20 % slower, a noisier machine).
"""

import gc
import json
import os
import time
import urllib.request

import pytest
import torch

from tests.serve.checkpoints import build, reference_model
from tests.serve.test_plugin import MEAN_TOL_W4A4, PROMPTS, TOL, logprob_gaps

STEPS = 16


def complete(url: str, prompt: list[int]) -> tuple[list[int], list[float]]:
    """Greedy token ids and their logprobs from a server's completions API."""
    body = json.dumps({"model": "tiny", "prompt": prompt, "max_tokens": STEPS, "temperature": 0, "logprobs": 0,
                       "ignore_eos": True, "return_tokens_as_token_ids": True}).encode()
    req = urllib.request.Request(url + "/v1/completions", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as r:
        lp = json.loads(r.read())["choices"][0]["logprobs"]
    return [int(t.split(":")[1]) for t in lp["tokens"]], lp["token_logprobs"]


def tp1_runs(path: str) -> list:
    """(prompt, tokens, logprobs) per prompt from an in-process TP=1 engine, one prompt at a time as the servers get them."""
    from vllm import LLM, SamplingParams

    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    try:
        llm = LLM(model=path, dtype="float32", max_model_len=256, max_num_seqs=8, enforce_eager=True, seed=0)
        runs = []
        for p in PROMPTS:
            o = llm.generate([{"prompt_token_ids": p}], SamplingParams(max_tokens=STEPS, temperature=0, logprobs=0,
                                                                       ignore_eos=True), use_tqdm=False)[0].outputs[0]
            runs.append((p, list(o.token_ids), [o.logprobs[t][tok].logprob for t, tok in enumerate(o.token_ids)]))
        del llm
        gc.collect()
        return runs
    finally:
        for k, v in saved.items():
            os.environ.pop(k, None) if v is None else os.environ.__setitem__(k, v)


def parallel_servers(path: str, flags: dict[str, list[str]]) -> dict:
    """``{name: (runs, start seconds)}``: one vLLM server per entry of ``flags`` (e.g. ``--tensor-parallel-size
    2``), all launched at once, then the TP=1 engine's runs in this process while they start (``"tp1"``: its runs,
    no start time); the servers are always stopped."""
    from loaq.serve.server import Server

    servers = {name: Server(path, name="tiny", max_model_len=256, max_num_seqs=8, kv_cache_gib=1,
                            extra=["--dtype", "float32", *f]) for name, f in flags.items()}
    t0 = time.time()
    try:
        for srv in servers.values():
            srv.launch()
        out = {"tp1": (tp1_runs(path), None)}
        for name, srv in servers.items():
            srv.wait_healthy(600)
            start = time.time() - t0
            out[name] = ([(p, *complete(srv.url, p)) for p in PROMPTS], start)
        return out
    finally:
        for srv in servers.values():
            srv.stop()


@pytest.fixture(scope="module")
def parallel(tmp_path_factory):
    root = str(tmp_path_factory.mktemp("parallel"))
    path = build(root, True, group=64, r4_blocks=2)
    native = os.path.join(root, "native")
    # PP=2 not eager: vLLM 0.32's CPU runner allocates a later pipeline stage's input buffers only in the compile
    # warm-up, which --enforce-eager skips (the first request then fails on `self.intermediate_tensors`)
    got = parallel_servers(path, {"tp2": ["--tensor-parallel-size", "2", "--enforce-eager"],
                                  "pp2": ["--pipeline-parallel-size", "2"]})
    print("server starts (s, launched together):", {k: round(v[1]) for k, v in got.items() if v[1] is not None})
    return {"path": path, "native": native, **{k: v[0] for k, v in got.items()},
            "start_s": {k: v[1] for k, v in got.items() if v[1] is not None}}


def test_pp2_equals_tp1(parallel):
    for (p, tok1, lp1), (_, tok2, lp2) in zip(parallel["tp1"], parallel["pp2"]):
        assert tok2 == tok1, p
        assert max(abs(a - b) for a, b in zip(lp1, lp2)) < TOL[False], p


def test_tp2_computes_the_per_shard_contract(parallel):
    """TP=2 against the reference whose row-parallel W4A4 layers quantize activations per token per rank."""
    ref = reference_model(parallel["path"], parallel["native"], True, group=64, tp=2)
    gaps = logprob_gaps(ref, parallel["tp2"])
    no_act = reference_model(parallel["path"], parallel["native"], False, group=64)
    print("TP=2 vs its reference: max", gaps.max().item(), "mean", gaps.mean().item())
    assert gaps.max() < TOL[True] and gaps.mean() <= MEAN_TOL_W4A4, (gaps.max(), gaps.mean())
    assert gaps.mean() <= 0.5 * logprob_gaps(no_act, parallel["tp2"]).mean()


def test_tp2_against_tp1(parallel):
    """First-token logprobs (same prompt, no divergence yet) within the W4A4 tolerance TOL[True] of TP=1's.
    Measured (2026-11-30): 0.10, 0.011, 0.003, 0.11 nats, while TP=2 equals its per-shard reference within
    8.5e-6 (test above): the gap is the per-rank activation grid of the W4A4 o_proj/down_proj, not an error.
    (each the logprob of its own greedy token). Greedy continuations are not compared: on this random model
    two prompts' first tokens are near-ties that the finer grid flips (the 0.10 / 0.11 gaps) and the other two
    share 9 and 3 tokens with TP=1; weight-only layers are exact per rank (tests/serve/test_shard.py)."""
    firsts = [abs(a[2][0] - b[2][0]) for a, b in zip(parallel["tp1"], parallel["tp2"])]
    print("TP=2 vs TP=1 first-token gaps", firsts)
    assert max(firsts) < TOL[True], firsts
