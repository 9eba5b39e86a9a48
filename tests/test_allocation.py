"""Mixed-precision allocation (issue #19): the knapsack, the budget as written, the export round trip
through the CPU kernels, and the sensitivity pass's data path (held-out calibration windows only)."""

import dataclasses
import itertools
import json
import os
import random

import pytest
import torch
from safetensors import safe_open

from loaq import allocation, api
from loaq.shards import quantized_tensors
from loaq.allocation import Allocation, knapsack
from loaq.arch import arch_of
from loaq.checkpoint import dequantized, layer_specs, tensors_to_results
from loaq.config import Calibration, Method, QuantConfig
from loaq.errors import LoaQError
from loaq.grids import GridSpec


def brute_force(costs, values, cap):
    best = None
    for choice in itertools.product(*[range(len(c)) for c in costs]):
        if sum(c[j] for c, j in zip(costs, choice)) <= cap:
            v = sum(vs[j] for vs, j in zip(values, choice))
            best = v if best is None or v < best else best
    return best


@pytest.mark.parametrize("seed", range(30))
def test_knapsack_matches_brute_force(seed):
    rng = random.Random(seed)
    n, k = rng.randint(1, 6), rng.randint(1, 3)
    costs = [[rng.randint(0, 9) for _ in range(k)] for _ in range(n)]
    values = [[rng.uniform(-1, 5) for _ in range(k)] for _ in range(n)]
    cap = rng.randint(sum(map(min, costs)), 9 * n)
    choice = knapsack(costs, values, cap)
    assert sum(c[j] for c, j in zip(costs, choice)) <= cap
    assert sum(v[j] for v, j in zip(values, choice)) == pytest.approx(brute_force(costs, values, cap), abs=1e-9)


def test_knapsack_refuses_an_impossible_budget():
    with pytest.raises(LoaQError, match="no allocation fits"):
        knapsack([[3, 5], [4]], [[1, 0], [0]], 6)


@pytest.mark.parametrize("resolution", [100_000, 7])
def test_a_budget_of_a_uniform_grids_own_size_can_choose_it_everywhere(resolution):
    """At a budget equal to a uniform grid's size as written the knapsack may pick that grid for every unit
    (the benchmark's same-size rows, and the narrowest candidate's own size, which cost rounding used to refuse
    with "no allocation fits"); every other choice spends no more than the budget in exact bytes."""
    shapes = {f"l{i}.{n}": s for i in range(5) for n, s in (("a", (96, 576)), ("b", (576, 1536)))}
    groups = [[n] for n in shapes]
    labels = ("2g96", "2g64", "3g192", "4")
    spec = GridSpec(3, 0, False, scale_dtype="float16")
    size = lambda g: allocation.avg_bits(shapes, {n: allocation.grid_of(g, spec) for n in shapes})  # noqa: E731
    rng = random.Random(0)
    for g in labels[:3]:  # below g: costly; g and wider: free, so the exact-size budget must put g everywhere
        errors = {tuple(u): {c: (0.0 if labels.index(c) >= labels.index(g) else 1 + rng.random()) for c in labels}
                  for u in groups}
        specs = allocation.solve(shapes, groups, errors, spec, labels, size(g), resolution)
        assert set(specs.values()) == {allocation.grid_of(g, spec)}, g
    errors = {tuple(u): {c: rng.random() / (1 + i) for i, c in enumerate(labels)} for u in groups}
    for budget in (size("2g96"), 2.4, 3.0, size("3g192"), 3.7):
        specs = allocation.solve(shapes, groups, errors, spec, labels, budget, resolution)
        assert allocation.avg_bits(shapes, specs) <= budget
    with pytest.raises(LoaQError, match="no allocation fits"):
        allocation.solve(shapes, groups, errors, spec, labels, size("2g96") - 1e-3, resolution)


def test_settings_are_checked():
    with pytest.raises(LoaQError, match="--candidates"):
        Allocation(2.5, "2,5")
    with pytest.raises(LoaQError, match="--target-bits"):
        Allocation(-1.0)
    with pytest.raises(LoaQError, match="calibrated weight-only"):
        QuantConfig(method=Method("rtn"), allocation=Allocation(2.5))
    assert "allocation" not in QuantConfig().to_dict()  # uniform runs keep their digest
    assert "scale_dtype" not in QuantConfig().to_dict()["spec"]  # and so do float32 scales
    d = QuantConfig(allocation=Allocation(2.5, "2,3")).to_dict()
    assert QuantConfig.from_dict(d).allocation == Allocation(2.5, "2,3")


@pytest.fixture(scope="module")
def mixed_run(model_dir, calib, tmp_path_factory):
    """A tiny model quantized by LoaQ to 3.3 bits per weight as written, with its native checkpoint and export."""
    d = tmp_path_factory.mktemp("mixed")
    cfg = QuantConfig(spec=GridSpec(3, 0), allocation=Allocation(3.3, holdout=0.25))
    run = api.quantize(model_dir, cfg, Calibration(calib, nsamples=8, seqlen=32), out=str(d / "n"),
                       export=str(d / "x"), export_dtype="float32", batch_size=2, progress=False)
    return run


@pytest.fixture(scope="module")
def grouped_run(model_dir, calib, tmp_path_factory):
    """A tiny model quantized to 3.6 bits from the candidates 2 bits in groups of 32 and 4 bits per channel, with
    float16 scales (``GridSpec.scale_dtype``; what makes small groups cheap)."""
    d = tmp_path_factory.mktemp("grouped")
    cfg = QuantConfig(spec=GridSpec(3, 0, scale_dtype="float16"), allocation=Allocation(3.6, "2g32,4"))
    return api.quantize(model_dir, cfg, Calibration(calib, nsamples=8, seqlen=32), out=str(d / "n"),
                        export=str(d / "x"), export_dtype="float32", batch_size=2, progress=False)


def test_group_size_candidates(grouped_run):
    """A candidate's group size and the run's scale dtype reach the linears, the export's config groups and
    ``loaq.json``; the budget holds as written; the reused sensitivity is keyed by the candidates' labels."""
    a = grouped_run.meta["allocation"]
    assert a["candidates"] == ["2g32", "4"] and {u["grid"] for u in a["units"]} == {"2g32", "4"}
    specs = layer_specs(grouped_run.meta, sorted(grouped_run.results))
    assert {(s.bits, s.group_size, s.scale_dtype) for s in specs.values()} == {(2, 32, "float16"), (4, 0, "float16")}
    got, nbytes = allocation.written_bits(grouped_run.export)
    assert nbytes == a["bytes"] and got <= 3.6
    qc = json.load(open(os.path.join(grouped_run.export, "config.json")))["quantization_config"]
    assert sorted((g["weights"]["num_bits"], g["weights"]["group_size"], g["weights"]["scale_dtype"])
                  for g in qc["config_groups"].values()) == [(2, 32, "torch.float16"), (4, None, "torch.float16")]
    assert all(set(u["error"]) == {"2g32", "4"} and u["error"]["2g32"] > u["error"]["4"] for u in a["units"])
    assert allocation.specs_from_meta(a, GridSpec(3, 0, scale_dtype="float16")) == specs
    with pytest.raises(LoaQError, match="candidates"):
        allocation.errors_from_meta(a, ("2", "4"), a["criterion"])


def test_candidate_grids_are_parsed_and_checked():
    assert Allocation(2.5, "4, 2g64,3").grids == ("2g64", "3", "4")
    assert allocation.grid_of("2g64", GridSpec(3, 0, True)) == GridSpec(2, 64, True)
    assert allocation.grid_of("4", GridSpec(3, 32)) == GridSpec(4, 32)
    assert allocation.widest(("2g16", "2", "3g128", "3"), GridSpec(3, 0)) == "3g128"
    with pytest.raises(LoaQError, match="--candidates"):
        Allocation(2.5, "2g,x")
    with pytest.raises(LoaQError, match="do not divide"):
        allocation.check_budget({"a": (8, 96)}, GridSpec(3, 0), ("2g64", "4"), 3.0)


@pytest.mark.parametrize("fixture", ["mixed_run", "grouped_run"])
def test_budget_is_met_as_written(fixture, request):
    mixed_run = request.getfixturevalue(fixture)
    a = mixed_run.meta["allocation"]
    budget = a["target_bits"]
    got, nbytes = allocation.written_bits(mixed_run.export)
    assert nbytes == a["bytes"] and got == pytest.approx(a["avg_bits"], rel=1e-12) and got <= budget
    assert got > budget - 0.1  # the budget is used, not left idle
    specs = layer_specs(json.load(open(os.path.join(mixed_run.out, "loaq.json"))), sorted(mixed_run.results))
    assert len({s for s in specs.values()}) >= 2
    for u in allocation.units(arch_of(mixed_run.model.config), 2):
        assert len({specs[n] for n in u}) == 1, u  # q/k/v and gate/up share a width (vLLM fuses them)
    # a fused group's widths in the export's config groups
    qc = json.load(open(os.path.join(mixed_run.export, "config.json")))["quantization_config"]
    assert len(qc["config_groups"]) == len(set(specs.values()))


@pytest.mark.parametrize("fixture", ["mixed_run", "grouped_run"])
def test_mixed_export_round_trips_through_the_cpu_kernels(fixture, request):
    mixed_run = request.getfixturevalue(fixture)
    from loaq.export.pack import pack_layer
    from loaq.kernels.cpu import _dequantize, cpu_wna16_matmul, prepare_cpu
    from loaq.kernels.layout import PackedLinear, unpack_lanes

    native = tensors_to_results(quantized_tensors(mixed_run.out))
    specs = layer_specs(mixed_run.meta, sorted(native))
    with safe_open(os.path.join(mixed_run.export, "model.safetensors"), "pt") as f:
        for name, r in native.items():
            s = specs[name]
            t = {k: f.get_tensor(f"{name}.{k}") for k in ("weight_packed", "weight_scale", "weight_zero_point")}
            assert all(torch.equal(t[k], v) for k, v in pack_layer(r, s).items() if k in t), name
            w = PackedLinear(t["weight_packed"], t["weight_scale"], t["weight_zero_point"], s.bits,
                             tuple(r.codes.shape), s.group_size or None)
            ref = dequantized(r, s)
            cw = prepare_cpu(w)  # the CPU kernels' own layout: codes, zero points and scales bit-exact
            assert torch.equal(unpack_lanes(cw.packed, s.bits, cw.k), r.codes.int()), name
            assert torch.equal(cw.uz, r.zeros.int()) and torch.equal(cw.scales, r.scales), name
            # the kernel dequantizes as q·s − z·s (fp32): within rounding of scale·(q − z)
            torch.testing.assert_close(_dequantize(cw, torch.float32), ref, rtol=0, atol=1e-6 * ref.abs().max().item())
            x = torch.randn(3, cw.k, generator=torch.Generator().manual_seed(0))
            torch.testing.assert_close(cpu_wna16_matmul(x, cw), x @ ref.T, rtol=1e-5, atol=1e-5)
            w_model = mixed_run.model.get_submodule(name).weight
            assert torch.equal(w_model, ref), name  # what the pipeline wrote is what was exported
    loaded = api.load(mixed_run.out)  # the native reader dequantizes every linear on its own grid
    assert loaded.label["bits"] == round(mixed_run.meta["allocation"]["avg_bits"], 3)
    assert all(torch.equal(loaded.model.get_submodule(n).weight, mixed_run.model.get_submodule(n).weight) for n in native)


def test_sensitivity_reads_only_held_out_calibration_windows(model_dir, monkeypatch):
    """The pass splits the calibration windows (held-out ⊂ calibration), scores each width on the held-out
    ``H`` alone, and never touches the evaluation text."""
    from loaq import data, holdout
    from loaq.models import load_model, resolve
    from tests.tiny import tokens

    def no_eval(*a, **k):
        raise AssertionError("the evaluation text was read")

    default_split = data.default_split
    monkeypatch.setattr(data, "default_split", lambda split: no_eval() if split == "eval" else default_split(split))
    monkeypatch.setattr(api, "eval_windows", no_eval)
    seen = {}
    split = holdout.split_windows

    def spy(calib, fraction):
        fit, held = split(calib, fraction)
        seen.update(calib=calib, fit=fit, held=held)
        return fit, held

    monkeypatch.setattr(holdout, "split_windows", spy)
    model, _, arch, _ = load_model(resolve(model_dir))
    calib = tokens(8, 32, vocab=320)
    cfg = QuantConfig(spec=GridSpec(3, 32), allocation=Allocation(3.0, "2,4", holdout=0.25, windows=1.0))
    errors, windows = allocation.measure(model, arch, calib, cfg, batch_size=2, progress=False)
    assert windows == {"fit": 6, "held": 2}
    rows = {tuple(r.tolist()) for r in calib}
    assert all(tuple(r.tolist()) in rows for r in seen["held"])  # held-out ⊂ calibration windows
    assert not {tuple(r.tolist()) for r in seen["held"]} & {tuple(r.tolist()) for r in seen["fit"]}
    assert len(errors) == 4 * 2 and all(e["2"] > e["4"] >= 0 for e in errors.values())
    # the held-out windows matter: other held-out windows give other errors
    cal2 = torch.cat([calib[:6], tokens(2, 32, vocab=320, seed=9)])
    errors2, _ = allocation.measure(model, arch, cal2, cfg, batch_size=2, progress=False)
    assert all(errors2[u]["4"] != errors[u]["4"] for u in errors)


def test_a_budget_below_the_narrowest_width_is_refused(model_dir, calib, tmp_path):
    cfg = QuantConfig(spec=GridSpec(3, 32), allocation=Allocation(1.5))
    with pytest.raises(LoaQError, match="below"):
        api.quantize(model_dir, cfg, Calibration(calib, nsamples=4, seqlen=32), out=str(tmp_path / "o"),
                     progress=False)
    assert not os.path.exists(tmp_path / "o")


def test_export_check_and_sensitivity_reuse(mixed_run, model_dir, calib):
    from loaq.export.cli import main

    assert main(["--check", mixed_run.export]) == 0
    a = mixed_run.meta["allocation"]
    cfg = QuantConfig(spec=GridSpec(3, 0), allocation=Allocation(2.9))
    run = api.quantize(model_dir, cfg, Calibration(calib, nsamples=8, seqlen=32), batch_size=2, progress=False,
                       sensitivity=a)
    b = run.meta["allocation"]
    assert b["reused"] and [u["error"] for u in b["units"]] == [u["error"] for u in a["units"]]
    assert b["avg_bits"] <= 2.9 < a["avg_bits"]
    assert sum(u["bits"] for u in b["units"]) < sum(u["bits"] for u in a["units"])


def test_cli_target_bits_and_recipe(model_dir, calib, tmp_path, capsys):
    from loaq.cli import main
    from loaq.recipe import load_recipe

    out = tmp_path / "m"
    assert main(["-q", "quantize", "--model", model_dir, "--calib", calib, "--nsamples", "4", "--seqlen", "32",
                 "--batch-size", "2", "--target-bits", "3.0", "--candidates", "2,4", "--out", str(out)]) == 0
    assert "allocated" in capsys.readouterr().out
    meta = json.load(open(out / "loaq.json"))
    assert meta["config"]["allocation"]["target_bits"] == 3.0 and meta["allocation"]["avg_bits"] <= 3.0
    assert {s["bits"] for s in meta["layer_specs"].values()} <= {2, 4}
    assert load_recipe(str(out)).config.allocation == Allocation(3.0, "2,4")  # the run is its own recipe


def test_resume_reuses_the_allocation_bit_identically(mixed_run, model_dir, calib, tmp_path, monkeypatch):
    from loaq.checkpoint import LayerStore

    class Killed(Exception):
        pass

    real_save = LayerStore.save_layer

    def save_then_die(self, i, res, streams, extra=None):
        real_save(self, i, res, streams, extra)
        if i == 0:
            raise Killed

    cfg = QuantConfig(spec=GridSpec(3, 0), allocation=Allocation(3.3, holdout=0.25))
    kw = dict(out=str(tmp_path / "n"), batch_size=2, progress=False)
    cal = Calibration(calib, nsamples=8, seqlen=32)
    monkeypatch.setattr(LayerStore, "save_layer", save_then_die)
    with pytest.raises(Killed):
        api.quantize(model_dir, cfg, cal, **kw)
    monkeypatch.setattr(LayerStore, "save_layer", real_save)
    monkeypatch.setattr(allocation, "measure", lambda *a, **k: pytest.fail("measured again on resume"))
    run = api.quantize(model_dir, cfg, cal, resume=True, **kw)
    assert run.meta["layer_specs"] == mixed_run.meta["layer_specs"]
    assert all(torch.equal(run.results[n].codes, r.codes) for n, r in mixed_run.results.items())


def test_loss_criterion_weighs_each_output_rows_error_by_its_channel_gain(model_dir, monkeypatch):
    """``criterion="output"``: a unit's value is its held-out normalized output error ``Σ num / Σ den`` over its
    rows; ``criterion="loss"``: every row's own normalized error weighted by its channel's loss gain on the
    held-out windows (gains recomputed here), ``Σ_j num_j / den_j · gain_j``, which is not the output error
    times one gain per unit; a reused sensitivity scored by the other criterion is refused."""
    from loaq.fisher import output_gains
    from loaq.holdout import split_windows
    from loaq.models import load_model, resolve
    from tests.tiny import tokens

    probes = []
    real = allocation.Probe

    class Spy(real):
        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            probes.append(self)

    monkeypatch.setattr(allocation, "Probe", Spy)
    model, _, arch, _ = load_model(resolve(model_dir))
    calib = tokens(8, 32, vocab=320)
    cfg = QuantConfig(spec=GridSpec(3, 32), allocation=Allocation(3.0, "2,4", windows=1.0, criterion="output"))
    out, _ = allocation.measure(model, arch, calib, cfg, batch_size=2, progress=False)
    cfg = dataclasses.replace(cfg, allocation=dataclasses.replace(cfg.allocation, criterion="loss"))
    loss, _ = allocation.measure(model, arch, calib, cfg, batch_size=2, progress=False)
    gains = output_gains(model, [n for u in out for n in u], split_windows(calib, 0.25)[1])
    rows = probes[1].rows
    for u in out:
        gain = torch.cat([gains[n] for n in u])
        for b in ("2", "4"):
            num, den = rows[u][b]
            assert num.shape == den.shape == gain.shape and bool((den > 0).all())
            assert out[u][b] == pytest.approx(float(num.sum() / den.sum()), rel=1e-9), (u, b)
            assert loss[u][b] == pytest.approx(float((num / den * gain).sum()), rel=1e-9), (u, b)
    isotropic = {u: out[u]["2"] * float(torch.cat([gains[n] for n in u]).sum()) for u in out}
    assert any(abs(loss[u]["2"] / isotropic[u] - 1) > 0.05 for u in out)
    with pytest.raises(LoaQError, match="criterion"):
        allocation.errors_from_meta({"criterion": "output", "units": []}, ("2", "4"), "loss")
    with pytest.raises(LoaQError, match="--alloc-criterion"):
        Allocation(2.5, criterion="kl")


@pytest.mark.parametrize("method", ["loaq", "gptq"])
def test_probe_forms_the_target_once_with_the_rules_own_result(model_dir, method, monkeypatch):
    """A rule that is GPTQ towards ``output_target`` (``towards_target``) is probed on every grid from one
    target: the errors equal those of calling the rule's own solve per grid."""
    from loaq import methods
    from loaq.config import Method
    from loaq.models import load_model, resolve
    from tests.tiny import tokens

    model, _, arch, _ = load_model(resolve(model_dir))
    calib = tokens(8, 32, vocab=320)
    m = Method(method, alpha=0.5, beta=0.25) if method == "loaq" else Method(method)
    cfg = QuantConfig(spec=GridSpec(3, 32), method=m, allocation=Allocation(3.0, "2,2g16,4", windows=1.0))
    real, handed = allocation.Probe.__call__, []

    def spy(self, names, W, factor, stats, B, spec, held):  # the solution the pass advances with is the rule's own
        res = real(self, names, W, factor, stats, B, spec, held)
        own = self.cfg.method.rule.solve(W, factor, stats.C, B, self.cfg.method, spec, self.cfg.solver)
        handed.append(torch.equal(res.codes, own.codes) and torch.allclose(res.Q, own.Q, rtol=0, atol=1e-6))
        return res

    monkeypatch.setattr(allocation.Probe, "__call__", spy)
    once, _ = allocation.measure(model, arch, calib, cfg, batch_size=2, progress=False)
    assert len(handed) == 8 and all(handed)
    monkeypatch.setattr(allocation.Probe, "__call__", real)
    assert methods.METHODS[method].towards_target
    monkeypatch.setitem(methods.METHODS, method, dataclasses.replace(methods.METHODS[method], towards_target=False))
    per_grid, _ = allocation.measure(model, arch, calib, cfg, batch_size=2, progress=False)
    assert once.keys() == per_grid.keys()
    for u in once:
        for c in once[u]:
            assert once[u][c] == pytest.approx(per_grid[u][c], rel=1e-12, abs=1e-300), (u, c)


def test_kept_solutions_are_the_probed_ones(model_dir, monkeypatch):
    """``measure(kept=...)`` keeps each unit's solution on the asked grids (the diagnostics put them into the
    float model): on the widest grid the very codes the pass advanced with, on a narrower one its own codes."""
    from loaq.models import load_model, resolve
    from tests.tiny import tokens

    model, _, arch, _ = load_model(resolve(model_dir))
    cfg = QuantConfig(spec=GridSpec(3, 32), allocation=Allocation(3.0, "2,4", windows=1.0))
    real, handed = allocation.Probe.__call__, {}

    def spy(self, names, W, factor, stats, B, spec, held):
        handed[tuple(names)] = res = real(self, names, W, factor, stats, B, spec, held)
        return res

    monkeypatch.setattr(allocation.Probe, "__call__", spy)
    kept = {"2": {}, "4": {}}
    allocation.measure(model, arch, tokens(8, 32, vocab=320), cfg, batch_size=2, progress=False, kept=kept)
    assert kept["2"].keys() == kept["4"].keys() == handed.keys() and len(handed) == 8
    for u, res in handed.items():
        rows = sum(model.get_submodule(n).weight.shape[0] for n in u)
        assert torch.equal(kept["4"][u].codes, res.codes) and torch.equal(kept["4"][u].scales, res.scales)
        assert kept["2"][u].codes.shape == (rows, res.codes.shape[1]) and int(kept["2"][u].codes.max()) <= 3
        assert kept["2"][u].Q is None and not torch.equal(dequantized(kept["2"][u], GridSpec(2, 32)), res.Q)
