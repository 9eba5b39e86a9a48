"""The main job (README Quick start, command 1): quantize SmolLM2 with LoaQ, export, serve with vLLM, ask it
one chat question through the ``openai`` client, and print the answer, fp vs quantized perplexity and the
measured tokens/s. Every step prints its label; a failure prints the step and why, and exits non-zero.

``python -m loaq.serve.mainjob [--out DIR] [-- extra loaq quantize flags]`` (scripts/quickstart.sh runs it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time

from loaq.errors import LoaQError

# Default setting from benchmarks/results/quality.md: W4 g64 asym is within 1.3 ppl of fp32 (LoaQ 15.15 vs
# 13.90) where W3 is 27.0; 32 x 512 calibration tokens keep the whole job under 15 minutes on 2 cores.
QUANTIZE = ["--method", "loaq", "--bits", "4", "--group-size", "64", "--nsamples", "32", "--seqlen", "512"]
QUESTION = "What is the capital of France? Answer in one sentence."


class StepFailed(Exception):
    pass


def step(n: int, total: int, label: str) -> None:
    print(f"\n== [{n}/{total}] {label}", flush=True)


def run(cmd: list[str]) -> None:
    print("$ " + " ".join(cmd), flush=True)
    rc = subprocess.call(cmd)
    if rc != 0:
        raise StepFailed(f"`{' '.join(cmd)}` exited with status {rc} (its error is printed above)")


def decode_rate(client, model: str, tokens: int = 128) -> tuple[float, float]:
    """(decode tokens/s after the first token, time to first token in s) of one streamed greedy request."""
    t0 = time.perf_counter()
    first = None
    n = 0
    stream = client.completions.create(model=model, prompt="The history of the city of Paris", max_tokens=tokens,
                                       temperature=0, stream=True, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            n += 1
            first = first or time.perf_counter()
    end = time.perf_counter()
    if first is None or n < 2:
        raise StepFailed("the server streamed no tokens")
    return (n - 1) / (end - first), first - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m loaq.serve.mainjob", description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/smollm2-loaq-w4g64", help="native checkpoint dir (export: OUT-ct)")
    p.add_argument("--port", type=int, help="server port (default: a free one)")
    p.add_argument("quantize_args", nargs=argparse.REMAINDER, help="after --: extra `loaq quantize` flags")
    a = p.parse_args(argv)
    extra = a.quantize_args[1:] if a.quantize_args[:1] == ["--"] else a.quantize_args
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    bindir = os.path.dirname(sys.executable)
    native, export = a.out, a.out.rstrip("/") + "-ct"
    total, n, label = 5, 0, ""
    server = None
    t_start = time.time()
    try:
        n, label = 1, "quantize SmolLM2-135M with LoaQ (W4 g64 asym) and export compressed-tensors"
        step(n, total, label)
        run([os.path.join(bindir, "loaq"), "quantize", *QUANTIZE, "--out", native, "--export", export, "--force",
             "--eval", *extra])
        meta = json.load(open(os.path.join(native, "loaq.json")))
        ppl = meta.get("eval", {})

        n, label = 2, "check the export"
        step(n, total, label)
        run([os.path.join(bindir, "loaq-export"), "--check", export])

        n, label = 3, "start vLLM's OpenAI server (loaq serve)"
        step(n, total, label)
        from loaq.serve.server import Server

        server = Server(export, port=a.port, name="smollm2-loaq")
        print(f"log: {server.log_path}", flush=True)
        t0 = time.time()
        server.start(timeout=900, progress=lambda m: print(m, flush=True))
        print(f"serving {server.name!r} at {server.url}/v1 (started in {time.time() - t0:.0f}s)", flush=True)

        n, label = 4, "chat completion through the openai client"
        step(n, total, label)
        import openai

        client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=300, max_retries=0)
        print(f"user: {QUESTION}", flush=True)
        r = client.chat.completions.create(model=server.name, messages=[{"role": "user", "content": QUESTION}],
                                           max_tokens=64, temperature=0)
        answer = (r.choices[0].message.content or "").strip()
        print(f"assistant: {answer}", flush=True)

        n, label = 5, "measure decode tokens/s (128 tokens, one request)"
        step(n, total, label)
        rate, ttft = decode_rate(client, server.name)
        print(f"{rate:.1f} tokens/s after a {ttft * 1000:.0f} ms first token", flush=True)
    except (StepFailed, LoaQError, OSError, ImportError) as exc:
        print(f"\nFAILED at step {n}/{total} ({label}): {exc}", file=sys.stderr, flush=True)
        return 1
    except Exception as exc:  # the openai client's errors and anything unforeseen: still name the step
        print(f"\nFAILED at step {n}/{total} ({label}): {type(exc).__name__}: {exc}", file=sys.stderr, flush=True)
        return 1
    except KeyboardInterrupt:
        print(f"\ninterrupted at step {n}/{total} ({label})", file=sys.stderr, flush=True)
        return 130
    finally:
        if server is not None:
            server.stop()
    print("\n== summary")
    print(f"answer:          {answer}")
    if ppl:
        print(f"perplexity:      fp32 {ppl['fp_ppl']:.2f} -> LoaQ W4 g64 {ppl['ppl']:.2f} "
              f"({ppl['tokens']} held-out tokens)")
    print(f"decode speed:    {rate:.1f} tokens/s (vLLM on {os.cpu_count()} CPU cores, one request)")
    print(f"checkpoint:      {export}   (serve it again: loaq serve {export})")
    print(f"total time:      {time.time() - t_start:.0f}s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
