"""Every supported family end to end on a random-weight model: quantize, export, check, load, serve.

    nice -n 5 python -m benchmarks.families [--families phi3,gemma3] [--no-serve]

(each vLLM server starts under an exclusive ``flock`` of ``/tmp/loaq-vllm.lock``, ``--lock``: one vLLM at a time
on a shared machine, as ``flock /tmp/loaq-vllm.lock`` would, held only while the server runs).

No Gemma 3, Phi-3 or Qwen3-MoE checkpoint is available offline (``../shared/DATA.md``), so each family is a small random
model built from its config (``tests/tiny.py``, sized for vLLM's CPU attention: head_dim 32) with the tests'
BPE tokenizer and a chat template. For every method (RTN, GPTQ, GPTAQ, Qronos, LLOA, LoaQ; W4 per channel),
± Hadamard where the family allows it, and W4A4 (LoaQ, ± Hadamard), through :func:`loaq.api.quantize`
(native checkpoint + float32 export):

- ``--check``: :func:`loaq.export.check.check_export` on the export;
- export vs native: max |logit difference| of ``loaq.load(export)`` and of
  ``AutoModelForCausalLM.from_pretrained(export)`` (weight-only, unrotated: what transformers can apply)
  against ``load_native`` in float32 (0 means bit-identical logits);
- served vs native (one vLLM start per family, ``--dtype float32``): one chat completion, then the greedy
  16-token continuations of four token prompts; "greedy equal" counts prompts whose continuation equals the
  native model's own greedy continuation, and "max |Δ logprob|" compares every served token's logprob with the
  native model's (teacher-forced on the served tokens).

Then the Gemma 3 target ablation (:func:`sandwich_ablation`): GPTQ, LoaQ with :mod:`loaq.sandwich`'s target,
and LoaQ with the pre-norm target misapplied, on held-out tokens. Writes
``benchmarks/results/families.{md,json}`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import os
import sys
import tempfile
import time

import torch

from loaq.actquant import ActSpec
from loaq.arch import arch_of
from loaq.bench import command, machine, utc_date
from loaq.config import METHODS, Calibration, Method, QuantConfig
from loaq.grids import GridSpec
from loaq.rotation import RotationSpec

FAMILIES = {  # tests/tiny.py kind: config overrides for a model vLLM's CPU attention takes (head_dim 32)
    "phi3": dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2),
    "gemma3": dict(hidden_size=128, intermediate_size=192, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                   query_pre_attn_scalar=32),
    # 4 experts, top-2, expert width 64 (the CPU kernels' groups of 32): tests/serve/moe_checkpoint.py's shape
    "qwen3_moe": dict(hidden_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=32,
                      moe_intermediate_size=64, bos_token_id=None),
}
PROMPTS = [[5, 17, 42, 99, 7], [200, 3, 64, 12, 150, 31], [9, 9, 80, 250], [100, 101, 102, 103, 104, 105, 106]]


def variants(rotatable: bool) -> list[tuple[str, QuantConfig]]:
    """(label, config) of every method at W4 per channel, ± Hadamard, and LoaQ W4A4 ± Hadamard."""
    rots = ("none", "hadamard") if rotatable else ("none",)
    out = []
    for rot in rots:
        for m in METHODS:
            out.append((f"{m} W4" + (" + Hadamard" if rot != "none" else ""),
                        QuantConfig(spec=GridSpec(4, 0, False), method=Method(m), rotation=RotationSpec(rot))))
        out.append(("loaq W4A4" + (" + Hadamard" if rot != "none" else ""),
                    QuantConfig(spec=GridSpec(4, 0, False), method=Method("loaq"), act=ActSpec(4, False),
                                rotation=RotationSpec(rot))))
    return out


def make_model(kind: str, path: str) -> str:
    from tests.serve.checkpoints import CHAT_TEMPLATE
    from tests.tiny import tiny_model, tiny_tokenizer

    model = tiny_model(kind, vocab=320, max_position_embeddings=512, **FAMILIES[kind])
    model.config.eos_token_id = 1  # the tiny tokenizer's <eos>
    model.save_pretrained(path)
    tok = tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(path)
    return path


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return (a.float() - b.float()).abs().max().item()


def measure(src: str, label: str, cfg: QuantConfig, calib: str, work: str, hf: bool = True) -> dict:
    """One variant: quantize + export, --check, export-vs-native logits (``hf``: also through transformers'
    loader where it can apply the export)."""
    from transformers import AutoModelForCausalLM

    from loaq.api import load, quantize
    from loaq.checkpoint import load_native
    from loaq.export.check import check_export

    native, export = os.path.join(work, "native"), os.path.join(work, "export")
    t0 = time.time()
    quantize(src, cfg, Calibration(source=calib, nsamples=16, seqlen=64), out=native, export=export,
             export_dtype="float32", force=True, progress=False)
    secs = time.time() - t0
    x = torch.tensor([p + p[:1] * (8 - len(p)) for p in PROMPTS])[:, :8]
    with torch.no_grad():
        ref = load_native(native)[0](x).logits
        d_load = max_diff(load(export).model(x).logits, ref)
        plain = hf and cfg.rotation.kind == "none" and not cfg.act.enabled
        d_hf = max_diff(AutoModelForCausalLM.from_pretrained(export, dtype=torch.float32)(x).logits, ref) if plain else None
    return {"variant": label, "seconds": round(secs, 1), "check": check_export(export).split(":")[0],
            "loaq_load_max_abs": d_load, "transformers_max_abs": d_hf}


@contextlib.contextmanager
def exclusive(path: str):
    """Hold an exclusive ``flock`` of ``path`` (created if missing) for the block."""
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def serve(export: str, native: str, lock: str = "/tmp/loaq-vllm.lock") -> dict:
    """One vLLM server on ``export`` (started under ``lock``): a chat completion, and the served greedy
    continuations against the native model's."""
    import openai

    from loaq.checkpoint import load_native
    from loaq.serve.server import Server

    ref = load_native(native)[0]
    with exclusive(lock), Server(export, name="tiny", max_model_len=512, max_num_seqs=8,
                                 extra=["--dtype", "float32", "--kv-cache-memory-bytes", str(256 << 20)]) as srv:
        # a 256 MiB KV cache is plenty for the tiny model and starts where a shared machine has little memory
        # free; vLLM's CPU platform lets VLLM_CPU_KVCACHE_SPACE (whole GiB) override it, so that goes
        srv.env.pop("VLLM_CPU_KVCACHE_SPACE", None)
        t0 = time.time()
        srv.start(timeout=900)
        start = time.time() - t0
        c = openai.OpenAI(base_url=srv.url + "/v1", api_key="none", timeout=120, max_retries=0)
        chat = c.chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Quantize the dog."}],
                                         max_tokens=12, temperature=0)
        outs = [c.completions.create(model="tiny", prompt=p, max_tokens=16, temperature=0, logprobs=1,
                                     extra_body={"ignore_eos": True, "return_tokens_as_token_ids": True}).choices[0]
                for p in PROMPTS]
    equal, worst = 0, 0.0
    for p, out in zip(PROMPTS, outs):
        served = [int(t.split(":")[1]) for t in out.logprobs.tokens]
        with torch.no_grad():
            logp = ref(torch.tensor([p + served])).logits[0, len(p) - 1:-1].log_softmax(-1)
            mine = logp.gather(1, torch.tensor(served)[:, None])[:, 0]
            greedy = list(p)
            for _ in range(16):
                greedy.append(int(ref(torch.tensor([greedy])).logits[0, -1].argmax()))
        worst = max(worst, max(abs(a - b) for a, b in zip(out.logprobs.token_logprobs, mine.tolist())))
        equal += greedy[len(p):] == served
    return {"start_s": round(start, 1), "chat": chat.choices[0].message.content,
            "greedy_equal": f"{equal}/{len(PROMPTS)}", "max_abs_logprob": worst}


def prenorm_terms(X_hat, X, h_hat, h, y_hat, y, bias, post_norm, offset, eps, rescale, shat_from_h):
    """The pre-norm family's W_out terms applied as if the post-norm were not there (the ablation's wrong target:
    ``s = R(h + y)``, ``X' = sX``, ``R = s h − ŝ ĥ``)."""
    from loaq.arch import rms_factor

    s = rms_factor(h + y, eps) if rescale else 1.0
    s_hat = rms_factor((h if shat_from_h else h_hat) + y_hat, eps) if rescale else 1.0
    return s_hat * X_hat, s * X, s * (h + bias) - s_hat * (h_hat + bias)


def sandwich_ablation(seeds=(0, 1, 2)) -> list[dict]:
    """Gemma 3 (4 layers, W3 per channel, held-out tokens): final-layer normalized hidden-state MSE and logit
    error of GPTQ, LoaQ with the sandwich target (loaq.sandwich) and LoaQ with the pre-norm target misapplied."""
    from unittest import mock

    from loaq import sandwich
    from loaq.metrics import hidden_mse, layer_outputs
    from loaq.pipeline import quantize_model
    from tests.tiny import tiny_model, tokens

    rows = []
    for seed in seeds:
        ref = tiny_model("gemma3", seed=seed, num_hidden_layers=4)
        arch = arch_of(ref.config)
        calib, held = tokens(16, 64, seed=seed + 10), tokens(8, 64, seed=seed + 20)
        with torch.no_grad():
            base, fp = layer_outputs(ref, arch, held), ref(held).logits
        for label, method, terms in (("gptq", Method("gptq"), None), ("loaq, sandwich target", Method("loaq", beta=0.5), None),
                                     ("loaq, pre-norm target misapplied", Method("loaq", beta=0.5), prenorm_terms)):
            m = tiny_model("gemma3", seed=seed, num_hidden_layers=4)
            cfg = QuantConfig(spec=GridSpec(3, 0, False), method=method)
            with mock.patch.object(sandwich, "w_out_terms", terms or sandwich.w_out_terms):
                quantize_model(m, arch, calib, cfg, batch_size=8, progress=False)
            with torch.no_grad():
                err = ((m(held).logits - fp).norm() / fp.norm()).item()
            rows.append({"seed": seed, "target": label,
                         "mse_normed_last": hidden_mse(base, layer_outputs(m, arch, held), 1e-6)["mse_normed"][-1],
                         "logit_rel_err": err})
            print(rows[-1], flush=True)
    return rows


def served_variant(kind: str) -> str:
    """The variant served for ``kind``: LoaQ W4, with Hadamard where the family allows it (R4 in the plugin)."""
    from loaq.arch import SUPPORTED
    from tests.tiny import ARCHITECTURES

    return "loaq W4" + (" + Hadamard" if rotatable(SUPPORTED[ARCHITECTURES[kind]]) else "")


def rotatable(arch) -> bool:
    """Whether ``--rotate hadamard`` is taken for ``arch``: not for Gemma 3 (``no_rotation``) nor a
    mixture of experts (refused by :mod:`loaq.moe`: no place for R4 in vLLM's fused-MoE path)."""
    return arch.no_rotation is None and not arch.moe


def _dir(work: str, kind: str, label: str) -> str:
    return os.path.join(work, kind + "-" + label.replace(" ", "_").replace("+", ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--families", default=",".join(FAMILIES))
    p.add_argument("--no-serve", action="store_true")
    p.add_argument("--serve-only", action="store_true",
                   help="only serve the exports an earlier run left in --work, adding to its results")
    p.add_argument("--work", help="keep the models and exports here (default: a temporary directory)")
    p.add_argument("--lock", default="/tmp/loaq-vllm.lock", help="file locked while a vLLM server runs")
    p.add_argument("--out", default="benchmarks/results/families")
    p.add_argument("--append", action="store_true", help="keep the other families (and the ablation) of --out's JSON")
    p.add_argument("--ablation-only", action="store_true",
                   help="only (re)measure the Gemma 3 target ablation, kept beside the families of an earlier run")
    a = p.parse_args(argv)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kinds = a.families.split(",")
    if a.ablation_only or a.serve_only:
        doc = json.load(open(a.out + ".json"))
        if a.ablation_only:
            doc["ablation"] = {"command": command(), "date": utc_date(), "rows": sandwich_ablation()}
        for kind in kinds if a.serve_only else ():
            doc["families"][kind]["served"] = serve_family(kind, a.work, a.lock)
            write(doc, a.out)
        write(doc, a.out)
        return 0
    doc = {"command": command(), "machine": machine(), "date": utc_date(), "families": {}}
    if a.append and os.path.exists(a.out + ".json"):
        old = json.load(open(a.out + ".json"))
        doc["families"] = {k: v | {"run": f"`{old['command']}` — {old['date']}"} if "run" not in v else v
                           for k, v in old["families"].items() if k not in kinds}
        doc["ablation"] = old.get("ablation")
    with contextlib.ExitStack() as stack:
        work = a.work or stack.enter_context(tempfile.TemporaryDirectory())
        os.makedirs(work, exist_ok=True)
        for kind in kinds:
            doc["families"][kind] = quantize_family(kind, work)
            write(doc, a.out)
        for kind in kinds if not a.no_serve else ():
            doc["families"][kind]["served"] = serve_family(kind, work, a.lock)
            write(doc, a.out)
    if "gemma3" in kinds or not doc.get("ablation"):
        doc["ablation"] = {"command": command(), "date": utc_date(), "rows": sandwich_ablation()}
    write(doc, a.out)
    return 0


def quantize_family(kind: str, work: str) -> dict:
    """Every variant of ``kind`` (:func:`variants`) measured, the models and exports left under ``work``."""
    from tests.tiny import TEXT

    calib = os.path.join(work, "calib.txt")
    open(calib, "w").write(TEXT * 4)
    src = make_model(kind, os.path.join(work, kind))
    arch = arch_of(_config(src))
    rows = []
    for label, cfg in variants(rotatable(arch)):
        # transformers 5 fuses a MoE's experts into 3-D parameters on load and cannot convert packed per-expert
        # weights to them (its loader stops on a CONVERSION report): loaq.load only
        rows.append(measure(src, label, cfg, calib, _dir(work, kind, label), hf=not arch.moe))
        print(kind, rows[-1], flush=True)
    return {"architecture": _config(src).architectures[0], "rotation": arch.no_rotation or ("exact" if rotatable(arch) else "refused for a mixture of experts (no place for R4 in vLLM's fused-MoE path)"), "rows": rows}


def serve_family(kind: str, work: str, lock: str) -> dict:
    """:func:`serve` on ``kind``'s :func:`served_variant`; a server that fails is recorded with its error line."""
    label = served_variant(kind)
    d = _dir(work, kind, label)
    try:
        out = {"variant": label, **serve(os.path.join(d, "export"), os.path.join(d, "native"), lock)}
    except Exception as e:  # noqa: BLE001 - one family's failure is a result, the others still run
        out = {"variant": label, "error": str(e).splitlines()[0]}
    print(kind, out, flush=True)
    return out


def _config(path: str):
    from transformers import AutoConfig

    return AutoConfig.from_pretrained(path, local_files_only=True)


def write(doc: dict, out: str) -> None:
    lines = ["# Families end to end (random-weight models: quantize → export → check → load → serve)", "",
             f"- command: `{doc['command']}` — {doc['date']}, {doc['machine']}",
             "- models: tests/tiny.py configs at hidden 128, intermediate 192, 2 layers, 4 heads (head_dim 32), "
             "vocab 320, random weights (Qwen3-MoE: 4 experts of width 64, top-2); calibration 16 × 64 tokens of tests/tiny.py's text; W4 per channel asym",
             "- export vs native: max |Δ logit| against `load_native` in float32 (0 = bit-identical); transformers "
             "cannot apply the online R4 or activation quantization, so only weight-only unrotated rows have it, and it cannot "
             "load a MoE export (it fuses experts into 3-D parameters on load and stops on the packed per-expert weights)", ""]
    for kind, fam in doc["families"].items():
        lines += [f"## {fam['architecture']}", ""] + ([f"Measured by {fam['run']}.", ""] if "run" in fam else [])
        lines += [f"Rotation: {fam['rotation']}.", "",
                  "| variant | quantize + export (s) | `--check` | loaq.load vs native | transformers vs native |",
                  "|---|---|---|---|---|"]
        for r in fam["rows"]:
            hf = "n/a" if r["transformers_max_abs"] is None else f"{r['transformers_max_abs']:.3g}"
            lines.append(f"| {r['variant']} | {r['seconds']} | {r['check']} | {r['loaq_load_max_abs']:.3g} | {hf} |")
        s = fam.get("served")
        if s and "error" in s:
            lines += ["", f"Served ({s['variant']}): **failed**: {s['error']}"]
        elif s:
            lines += ["", f"Served ({s['variant']}, vLLM float32, server start {s['start_s']} s): chat completion "
                      f"answered {json.dumps(s['chat'])}; greedy 16-token continuations equal to the native model's "
                      f"on {s['greedy_equal']} prompts; max |Δ logprob| of the served tokens {s['max_abs_logprob']:.2e}."]
        lines.append("")
    ab = doc.get("ablation")
    if ab:
        lines += ["## The Gemma 3 W_out target (loaq.sandwich) against the pre-norm one misapplied", "",
                  f"`{ab['command']}` — {ab['date']}. Random Gemma 3 of tests/tiny.py with 4 layers (hidden 64, "
                  "alternating sliding/global), W3 per channel asym, 16 × 64 calibration tokens, 8 × 64 held-out "
                  "tokens; LoaQ at α = 0.25, β = 0.5. \"Misapplied\" runs the pre-norm family's terms "
                  "(s = R(h + y), R = s h − ŝ ĥ) as if the post-norm were not there. Final-layer normalized "
                  "hidden-state MSE / logit relative error:", "",
                  "| seed | GPTQ | LoaQ, sandwich target | LoaQ, pre-norm target misapplied |", "|---|---|---|---|"]
        by = {}
        for r in ab["rows"]:
            by.setdefault(r["seed"], {})[r["target"]] = f"{r['mse_normed_last']:.4f} / {r['logit_rel_err']:.4f}"
        for seed, t in by.items():
            lines.append(f"| {seed} | {t['gptq']} | {t['loaq, sandwich target']} | "
                         f"{t['loaq, pre-norm target misapplied']} |")
        lines.append("")
    os.makedirs(os.path.dirname(out) or ".", exist_ok=True)
    with open(out + ".md", "w") as fh:
        fh.write("\n".join(lines))
    with open(out + ".json", "w") as fh:
        json.dump(doc, fh, indent=2)
    print("\n".join(lines))


if __name__ == "__main__":
    sys.exit(main())
