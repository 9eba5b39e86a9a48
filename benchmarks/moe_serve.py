"""Served-vs-native agreement of a Qwen3-MoE export with 2-, 3- and 4-bit experts (tiny random model; no MoE
checkpoint is offline), through ``loaq serve``'s server and the plugin's fused-MoE method.

    flock /tmp/loaq-vllm.lock python -m benchmarks.moe_serve [--out benchmarks/results/moe_serve]

Builds ``tests/serve/moe_checkpoint.py``'s export (layer 0 experts W2 g32 asym, layer 1 W3 per-channel sym,
layer 2 W4 g32 asym; attention W4 per channel; float32), checks it (``loaq-export --check``), compares
``loaq.load`` of the export with the native checkpoint (float32 logits, exact), then starts one vLLM server
(float32) and compares its greedy completion (token ids and log-probabilities) with the native model's greedy
generation, and sends one chat completion, through the OpenAI server. The test suite serves the same export
in process (``tests/serve/test_families_served.py``: in-process engines start in seconds).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time

import torch

from loaq.bench import command, machine, utc_date

PROMPTS = ["The quick brown fox", "Layer-wise methods calibrate", "Quantization maps weights"]
TOKENS = 12


def native_greedy(model, tok, prompt: str) -> tuple[list[int], list[float]]:
    ids = tok(prompt, return_tensors="pt").input_ids
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=TOKENS, do_sample=False)
        logp = torch.log_softmax(model(out).logits[0, ids.shape[1] - 1:-1].float(), -1)
    new = out[0, ids.shape[1]:]
    return new.tolist(), logp.gather(1, new[:, None])[:, 0].tolist()


def main(argv: list[str] | None = None) -> None:
    from openai import OpenAI

    import loaq
    from loaq.checkpoint import load_native
    from loaq.export.check import check_export
    from loaq.serve.server import Server
    from tests.serve.moe_checkpoint import EXPERT_SPECS, build_moe

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/moe_serve")
    a = p.parse_args(argv)
    rec: dict = {"date": utc_date(), "machine": machine(), "command": command(),
                 "experts": [str(s) for s in EXPERT_SPECS]}
    with tempfile.TemporaryDirectory() as tmp:
        export_dir, native_dir = build_moe(tmp)
        rec["check"] = check_export(export_dir)
        native, tok, _ = load_native(native_dir)
        exported = loaq.load(export_dir).model
        ids = tok(PROMPTS[0], return_tensors="pt").input_ids
        with torch.no_grad():
            rec["export_equals_native"] = torch.equal(exported(ids).logits, native(ids).logits)
        refs = {q: native_greedy(native, tok, q) for q in PROMPTS}
        t0 = time.time()
        srv = Server(export_dir, name="moe", max_model_len=256, max_num_seqs=4, extra=["--dtype", "float32"])
        try:
            srv.start(timeout=900)
            rec["server_start_s"] = round(time.time() - t0, 1)
            c = OpenAI(base_url=f"{srv.url}/v1", api_key="none")
            rows = []
            for q in PROMPTS:
                r = c.completions.create(model="moe", prompt=q, max_tokens=TOKENS, temperature=0, logprobs=1,
                                         extra_body={"return_tokens_as_token_ids": True})
                lp = r.choices[0].logprobs
                got = [int(t.split(":")[1]) for t in lp.tokens]
                want, want_lp = refs[q]
                rows.append({"prompt": q, "tokens_equal": got == want,
                             "max_logprob_diff": max(abs(x - y) for x, y in zip(lp.token_logprobs, want_lp))})
            rec["completions"] = rows
            chat = c.chat.completions.create(model="moe", messages=[{"role": "user", "content": "Quantize the dog."}],
                                             max_tokens=TOKENS, temperature=0)
            rec["chat"] = {"role": chat.choices[0].message.role, "completion_tokens": chat.usage.completion_tokens,
                           "content": chat.choices[0].message.content}
        finally:
            srv.stop()
    lines = [f"# Served vs native: tiny Qwen3-MoE with 2/3/4-bit experts ({rec['date']})", "",
             f"`{rec['command']}` on {rec['machine']}", "", __doc__.split("\n\n")[2].strip(), "",
             f"- experts per layer: {', '.join(rec['experts'])}",
             f"- `loaq-export --check`: {rec['check']}",
             f"- `loaq.load(export)` logits equal to the native checkpoint (float32): {rec['export_equals_native']}",
             f"- vLLM server start: {rec['server_start_s']} s",
             f"- chat completion: role {rec['chat']['role']}, {rec['chat']['completion_tokens']} tokens", "",
             "| prompt | served greedy tokens = native | max abs log-prob difference |", "|---|---|---|"]
    lines += [f"| {r['prompt']} | {r['tokens_equal']} | {r['max_logprob_diff']:.2e} |" for r in rec["completions"]]
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(lines) + "\n")
    with open(a.out + ".json", "w") as fh:
        json.dump(rec, fh, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
