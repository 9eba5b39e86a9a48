"""``loaq search``: the paper's α-then-β grid (Appendix C.2) scored on held-out calibration text.

The calibration split's tail (``--holdout``) is never used for calibration and is the only text
scored, so the choice never sees the evaluation split.
"""

from __future__ import annotations

import copy
import dataclasses

from loaq.errors import LoaQError


def _floats(s: str) -> list[float]:
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise LoaQError(f"grid {s!r} is not a comma-separated list of numbers; e.g. --alphas 0,0.5,1") from None


def search(a) -> dict:
    from loaq import data
    from loaq.arch import input_widths
    from loaq.cli import _calib_text, _quant_config
    from loaq.evaluate import perplexity
    from loaq.grids import check_group_size
    from loaq.models import load_model
    from loaq.pipeline import quantize_model

    cfg = _quant_config(a)
    if cfg.method.name not in ("lloa", "loaq", "gptaq"):
        raise LoaQError(f"--method {cfg.method.name} has no α/β to search; use loaq, lloa or gptaq")
    alphas, betas = _floats(a.alphas), _floats(a.betas)
    text = _calib_text(a.calib)
    model, tok, arch, _ = load_model(a.model)
    check_group_size(cfg.spec, input_widths(model.config))
    train, held = data.split_tokens(data.tokenize(tok, text), a.holdout)
    calib = data.random_windows(train, a.nsamples, a.seqlen, a.seed)
    windows = data.eval_windows(held, a.seqlen, a.holdout_tokens)
    if cfg.rotation.kind == "hadamard":
        from loaq.rotation import rotate_model

        rotate_model(model, arch, cfg.rotation.seed)
    grid = []

    def score(alpha: float, beta: float) -> float:
        q = copy.deepcopy(model)  # a fresh copy: quantize_model adds W4A4 hooks to the model it quantizes
        m = dataclasses.replace(cfg.method, alpha=alpha, beta=beta)
        quantize_model(q, arch, calib, dataclasses.replace(cfg, method=m), batch_size=a.batch_size,
                       device=a.device, progress=False)
        ppl = perplexity(q, windows, a.batch_size)
        grid.append({"alpha": alpha, "beta": beta, "ppl": ppl})
        print(f"alpha={alpha:<5g} beta={beta:<5g} held-out ppl={ppl:.3f}", flush=True)
        return ppl

    best_alpha = min(alphas, key=lambda al: score(al, 0.0))
    best_beta = 0.0
    if cfg.method.name == "loaq":
        done = {0.0: next(g["ppl"] for g in grid if g["alpha"] == best_alpha and g["beta"] == 0.0)}
        best_beta = min(betas, key=lambda b: done[b] if b in done else score(best_alpha, b))
    best = min((g for g in grid if g["alpha"] == best_alpha and g["beta"] == best_beta), key=lambda g: g["ppl"])
    print(f"best: alpha={best_alpha:g} beta={best_beta:g} held-out ppl={best['ppl']:.3f}")
    return {"method": cfg.method.name, "spec": dataclasses.asdict(cfg.spec), "nsamples": a.nsamples,
            "seqlen": a.seqlen, "holdout": a.holdout, "grid": grid, "alpha": best_alpha, "beta": best_beta,
            "ppl": best["ppl"]}
