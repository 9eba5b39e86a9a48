"""Experts that see few calibration tokens: shrink their ``H`` towards the layer's, damping alone, or RTN
(:class:`loaq.moe.FewTokens`), measured on tiny random Qwen3-MoE models (no MoE checkpoint is offline).

    python benchmarks/moe_few_tokens.py [--out benchmarks/results/moe_few_tokens]

16 experts, top 2, 2 layers, hidden 64, expert width 32; 256 calibration tokens (16 per expert on average,
a quarter of the hidden width), so most experts are under-determined. Metric: the quantized model's logits
error on 512 held-out tokens relative to the float model's, ``mean((z_q − z)²) / mean(z²)``, averaged over
three random models. ``m`` is the threshold of :class:`loaq.moe.FewTokens` in tokens per input column
(``width`` = 64 for ``W_in``, 32 for ``W_out``).
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
from unittest import mock

import torch

from loaq import moe
from loaq.arch import arch_of
from loaq.bench import command, machine, utc_date
from loaq.config import Method, QuantConfig
from loaq.grids import GridSpec
from loaq.pipeline import quantize_model
from tests.tiny import tiny_model, tokens

POLICIES = {"damp (GPTQ damping alone)": moe.FewTokens("damp"), "rtn, m = width": moe.FewTokens("rtn", 1),
            "shrink, m = width / 4": moe.FewTokens("shrink", 0.25), "shrink, m = width (default)": moe.FewTokens(),
            "shrink, m = 4 × width": moe.FewTokens("shrink", 4)}
METHODS = {"gptq": Method("gptq"), "loaq": Method("loaq")}
CONFIG = dict(num_experts=16, num_experts_per_tok=2, moe_intermediate_size=32)


def rel_error(model, ref: torch.Tensor, held: torch.Tensor) -> float:
    with torch.no_grad():
        z = model(held).logits
    return ((z - ref) ** 2).mean().item() / (ref ** 2).mean().item()


def routed_counts(model, calib: torch.Tensor) -> list[int]:
    """Tokens each expert of each layer receives on ``calib`` in the float model."""
    counts = []
    hooks = [layer.mlp.gate.register_forward_hook(lambda _m, _a, out: counts.append(torch.bincount(
        out[2].flatten(), minlength=CONFIG["num_experts"]).tolist())) for layer in model.model.layers]
    with torch.no_grad():
        model(calib)
    for h in hooks:
        h.remove()
    return [c for layer in counts for c in layer]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="benchmarks/results/moe_few_tokens")
    p.add_argument("--bits", type=int, default=3)
    p.add_argument("--seeds", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for seed in range(a.seeds):
        fp = tiny_model("qwen3_moe", seed=seed, **CONFIG)
        arch = arch_of(fp.config)
        moe.unfuse(fp, arch)
        calib, held = tokens(8, 32, seed=100 + seed), tokens(16, 32, seed=200 + seed)
        with torch.no_grad():
            ref = fp(held).logits
        counts = routed_counts(fp, calib)
        for mname, method in METHODS.items():
            cfg = QuantConfig(spec=GridSpec(a.bits), method=method)
            for pname, few in POLICIES.items():
                model = copy.deepcopy(fp)
                with mock.patch.object(moe, "FEW_TOKENS", few):
                    quantize_model(model, arch, calib, cfg, batch_size=8, progress=False)
                rows.append({"seed": seed, "method": mname, "policy": pname, "rel_error": rel_error(model, ref, held),
                             "experts_lt_16": sum(c < 16 for c in counts), "experts_lt_64": sum(c < 64 for c in counts)})
                print(rows[-1], flush=True)
    table = ["| method | policy | rel. logits error (mean of seeds) | per seed |", "|---|---|---|---|"]
    for mname in METHODS:
        for pname in POLICIES:
            errs = [r["rel_error"] for r in rows if r["method"] == mname and r["policy"] == pname]
            table.append(f"| {mname} W{a.bits} | {pname} | {statistics.mean(errs):.4f} | "
                         + ", ".join(f"{e:.4f}" for e in errs) + " |")
    few = [(r["experts_lt_16"], r["experts_lt_64"]) for r in rows if r["method"] == "gptq" and r["policy"].startswith("damp")]
    head = [f"# MoE experts with few calibration tokens ({utc_date()})", "", f"`{command()}` on {machine()}", "",
            (__doc__.split("\n\n")[2]).strip(), "",
            "Expert-layers under 16 / 64 routed tokens per seed: " + ", ".join(f"{x} / {y}" for x, y in few) + " (of 32).", ""]
    with open(a.out + ".md", "w") as fh:
        fh.write("\n".join(head + table) + "\n")
    with open(a.out + ".json", "w") as fh:
        json.dump({"date": utc_date(), "machine": machine(), "rows": rows}, fh, indent=2)


if __name__ == "__main__":
    main()
