"""``--alpha auto --beta auto`` (loaq.auto) and the held-out calibration slice (loaq.holdout).

The choice must be the minimum of its held-out criterion over the candidate grid (recomputed here
independently, on the full model), be recorded in ``loaq.json`` with fixed values that ``--recipe``
reproduces, and never read evaluation text.
"""

import copy
import dataclasses
import json
import os

import pytest
import torch

import loaq
from loaq import api, auto, data
from loaq.shards import quantized_tensors
from loaq.arch import arch_of
from loaq.cli import main
from loaq.config import Calibration, Method, QuantConfig
from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.holdout import split_windows
from loaq.metrics import hidden_mse, layer_outputs
from loaq.pipeline import quantize_model
from tests.tiny import tiny_model, tokens


def test_split_windows_holds_out_the_tail():
    w = tokens(8, 16)
    fit, held = split_windows(w, 0.25)
    assert torch.equal(fit, w[:6]) and torch.equal(held, w[6:])
    assert split_windows(w[:3], 0.25)[1].shape[0] == 1  # ceil: at least one held-out window
    with pytest.raises(LoaQError, match="nsamples ≥ 2"):
        split_windows(w[:1], 0.25)


def test_auto_picks_the_minimum_of_an_explicit_grid():
    model = tiny_model(num_hidden_layers=4)
    arch = arch_of(model.config)
    calib = tokens(8, 32)
    cfg = QuantConfig(spec=GridSpec(2, 0, False), method=Method("loaq", alpha="auto", beta="auto"))
    fixed, rec = auto.choose(model, arch, calib, cfg, batch_size=4, layers=2)
    assert rec["layers"] == 2 and rec["fit_windows"] == 6 and rec["holdout_windows"] == 2

    # the criterion recomputed independently: the FULL model quantized at fixed α, β on the first 6 windows,
    # normalized output error after layer 2 on the last 2 (layer-wise: later layers do not change it)
    def err(a, b):
        q = copy.deepcopy(model)
        c = dataclasses.replace(cfg, method=Method("loaq", alpha=a, beta=b))
        quantize_model(q, arch, calib[:6], c, batch_size=4, progress=False)
        ref, out = (layer_outputs(m, arch, calib[6:]) for m in (model, q))
        return hidden_mse(ref, out, model.config.rms_norm_eps)["mse_normed"][1]

    grid_a = {a: err(a, 0.0) for a in auto.ALPHAS}
    best_a = min(grid_a, key=grid_a.get)
    grid_b = {b: err(best_a, b) for b in auto.BETAS}
    best_b = min(grid_b, key=grid_b.get)
    assert len(set(round(v, 9) for v in grid_a.values())) == len(grid_a)  # the candidates differ: the test can fail
    assert (fixed.method.alpha, fixed.method.beta) == (rec["alpha"], rec["beta"]) == (best_a, best_b)
    got = {(c["alpha"], c["beta"]): c["error"] for c in rec["candidates"]}
    want = {(a, 0.0): e for a, e in grid_a.items()} | {(best_a, b): e for b, e in grid_b.items()}
    assert got.keys() == want.keys()
    assert all(abs(got[k] - want[k]) <= 1e-5 * want[k] for k in want), (got, want)
    # a fixed α with β auto searches β only
    fixed, rec = auto.choose(model, arch, calib, dataclasses.replace(cfg, method=Method("loaq", alpha=0.5, beta="auto")),
                             batch_size=4, layers=2)
    assert rec["searched"] == ["beta"] and fixed.method.alpha == 0.5 and {c["alpha"] for c in rec["candidates"]} == {0.5}


def test_search_layers_fit_the_budget():
    assert auto.search_layers(30, 4) == 4  # 4 candidates x 4 layers x 0.75 = 12 <= 0.45 x 30
    assert auto.search_layers(24, 4) * 4 * 0.75 <= 0.45 * 24
    assert auto.search_layers(2, 4) == 1
    assert auto.search_layers(80, 4) == auto.MAX_LAYERS == 4  # a 70B's 80 layers would allow 12: memory caps it


def test_auto_is_recorded_reproduced_and_reads_only_calibration(model_dir, calib, tmp_path, monkeypatch):
    read, seen = [], []
    monkeypatch.setattr(data, "read_text", lambda p, f=data.read_text: read.append(p) or f(p))
    monkeypatch.setattr(data, "default_split", lambda s: pytest.fail(f"read the default corpus's {s} split"))
    real_ref = auto.reference_outputs
    monkeypatch.setattr(auto, "reference_outputs", lambda m, a, w, b=4: seen.append(w) or real_ref(m, a, w, b))
    calib_w = api.calibration_windows(loaq.load(model_dir).tokenizer, Calibration(calib, nsamples=8, seqlen=32))
    read.clear()
    assert main(["-q", "quantize", "--model", model_dir, "--batch-size", "2", "--out", str(tmp_path / "a"),
                 "--calib", calib, "--nsamples", "8", "--seqlen", "32", "--bits", "2", "--alpha", "auto",
                 "--beta", "auto"]) == 0
    # the data path: the calibration file only, and the scored windows are the calibration windows' tail
    assert read == [calib] and len(seen) == 1 and torch.equal(seen[0], calib_w[6:])
    meta = json.load(open(tmp_path / "a" / "loaq.json"))
    m, a = meta["config"]["method"], meta["auto"]
    assert isinstance(m["alpha"], float) and isinstance(m["beta"], float)
    assert (m["alpha"], m["beta"]) == (a["alpha"], a["beta"]) and a["searched"] == ["alpha", "beta"]
    assert min(a["candidates"], key=lambda c: c["error"])["error"] == min(
        c["error"] for c in a["candidates"] if c["alpha"] == m["alpha"])
    # the finished run as a recipe: fixed values, no search, the same codes
    assert main(["-q", "quantize", "--recipe", str(tmp_path / "a"), "--batch-size", "2",
                 "--out", str(tmp_path / "b")]) == 0
    again = json.load(open(tmp_path / "b" / "loaq.json"))
    assert "auto" not in again and again["config"] == meta["config"]
    ca, cb = (quantized_tensors(os.path.join(tmp_path, d)) for d in "ab")
    assert ca.keys() == cb.keys() and all(torch.equal(ca[k], cb[k]) for k in ca)


@pytest.mark.parametrize("kw, words", [
    (dict(name="gptaq", alpha="auto"), "gptaq has no automatic choice"),
    (dict(name="loaq", alpha="best"), "'best' is not a number"),
    (dict(name="loaq", beta="auto", soa=False), "--beta auto chooses the weight of the SOA term"),
])
def test_bad_auto_settings_are_refused(kw, words):
    with pytest.raises(LoaQError, match=words):
        Method(**kw)


def test_the_search_shares_the_embeddings_instead_of_copying_them():
    """The prefix and each candidate's copy own their decoder layers but share the embeddings, norm and head
    (a 128k vocabulary is not held three times)."""
    from loaq.arch import arch_of
    from tests.tiny import tiny_model

    model = tiny_model("llama", num_hidden_layers=3)
    arch = arch_of(model.config)
    p = auto._prefix(model, arch, 2)
    q = auto.copy_layers(p, arch)
    assert len(p.model.layers) == 2 and len(model.model.layers) == 3
    for m in (p, q):
        assert m.model.embed_tokens.weight is model.model.embed_tokens.weight
        assert m.lm_head.weight is model.lm_head.weight and m.model.norm.weight is model.model.norm.weight
        assert m.model.layers[0].self_attn.q_proj.weight is not model.model.layers[0].self_attn.q_proj.weight
    assert q.model.layers[1].mlp.down_proj.weight is not p.model.layers[1].mlp.down_proj.weight
    assert torch.equal(q.model.layers[1].mlp.down_proj.weight, model.model.layers[1].mlp.down_proj.weight)
