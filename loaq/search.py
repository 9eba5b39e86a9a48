"""``loaq search``: the paper's α-then-β grid (Appendix C.2) scored on held-out calibration text.

The calibration source's tail (``holdout``) is never used for calibration and is the only text scored,
so the choice never sees the evaluation split. Each grid point is one :func:`loaq.api.quantize` of a
fresh copy of the float model on the same windows.
"""

from __future__ import annotations

import copy
import dataclasses

from loaq.errors import LoaQError
from loaq.recipe import Recipe


def floats(s: str) -> list[float]:
    """``"0,0.5,1"`` -> ``[0.0, 0.5, 1.0]``, or one line saying how to write a grid."""
    try:
        return [float(x) for x in s.split(",") if x.strip()]
    except ValueError:
        raise LoaQError(f"grid {s!r} is not a comma-separated list of numbers; e.g. --alphas 0,0.5,1") from None


def search(model: str | None, recipe: Recipe, alphas: list[float], betas: list[float], *, holdout: float = 0.1,
           holdout_tokens: int = 16384, batch_size: int = 8, device: str = "cpu") -> dict:
    """Best ``α`` (at ``β = 0``), then best ``β`` at that ``α`` (LoaQ only), by held-out perplexity."""
    from loaq import api, data
    from loaq.metrics import perplexity

    cfg, cal = recipe.config, recipe.calibration
    if "alpha" not in cfg.method.rule.settings:
        raise LoaQError(f"--method {cfg.method.name} has no α/β to search; use loaq, lloa or gptaq")
    if not alphas or not betas:
        raise LoaQError("--alphas and --betas need at least one value each")
    if not 0 < holdout < 1:
        raise LoaQError(f"--holdout {holdout} is not a fraction strictly between 0 and 1; e.g. 0.1 scores the last 10 %")
    if holdout_tokens < cal.seqlen:
        raise LoaQError(f"--holdout-tokens {holdout_tokens} is fewer than one window of --seqlen {cal.seqlen}; raise it")
    api.check_batch_size(batch_size)
    api.check_model(model, cfg)  # a bad model or group size fails before any weight loads
    loaded = api.load(model)
    fp, tok = loaded.model, loaded.tokenizer
    ids = data.calibration_ids(data.CalibSource(cal.source, cal.split, cal.field, cal.chat), tok)
    train, held = data.split_tokens(ids, holdout)
    calib = data.random_windows(train, cal.nsamples, cal.seqlen, cal.seed)
    windows = data.eval_windows(held, cal.seqlen, holdout_tokens)
    grid = []

    def score(alpha: float, beta: float) -> float:
        m = dataclasses.replace(cfg.method, alpha=alpha, beta=beta)
        run = api.quantize(copy.deepcopy(fp), dataclasses.replace(cfg, method=m), calib, tokenizer=tok,
                           device=device, batch_size=batch_size, progress=False)
        ppl = perplexity(run.model, windows, batch_size)
        grid.append({"alpha": alpha, "beta": beta, "ppl": ppl})
        print(f"alpha={alpha:<5g} beta={beta:<5g} held-out ppl={ppl:.3f}", flush=True)
        return ppl

    best_alpha = min(alphas, key=lambda al: score(al, 0.0))
    best_beta = 0.0
    if "beta" in cfg.method.rule.settings:
        done = {0.0: next(g["ppl"] for g in grid if g["alpha"] == best_alpha and g["beta"] == 0.0)}
        best_beta = min(betas, key=lambda b: done[b] if b in done else score(best_alpha, b))
    best = min((g for g in grid if g["alpha"] == best_alpha and g["beta"] == best_beta), key=lambda g: g["ppl"])
    print(f"best: alpha={best_alpha:g} beta={best_beta:g} held-out ppl={best['ppl']:.3f}")
    return {"method": cfg.method.name, "spec": dataclasses.asdict(cfg.spec), "nsamples": cal.nsamples,
            "seqlen": cal.seqlen, "holdout": holdout, "grid": grid, "alpha": best_alpha, "beta": best_beta,
            "ppl": best["ppl"]}
