"""Stream storage (loaq.streams): offload policies, storage and compute dtypes, and the resume policy."""

import os

import pytest
import torch

from loaq.shards import quantized_tensors
from loaq.arch import arch_of
from loaq.checkpoint import LayerStore
from loaq.config import Method, QuantConfig
from loaq.errors import LoaQError
from loaq.grids import GridSpec
from loaq.metrics import hidden_mse, layer_outputs
from loaq.pipeline import quantize_model
from loaq.streams import StreamOptions
from tests.tiny import tiny_model, tokens

SPEC = GridSpec(3, 0, False)
LOAQ = Method("loaq", alpha=0.5, beta=0.5)  # both streams, C and B


def run(method=LOAQ, kind="llama", layers=2, store=None, **opts):
    m = tiny_model(kind, num_hidden_layers=layers)
    res = quantize_model(m, arch_of(m.config), tokens(n=6), QuantConfig(spec=SPEC, method=method), batch_size=4,
                         progress=False, store=store, streams=StreamOptions(**opts))
    return m, res


def same_codes(a, b):
    return sorted(a) == sorted(b) and all(torch.equal(a[n].codes, b[n].codes) and torch.equal(a[n].scales, b[n].scales)
                                          for n in a)


@pytest.mark.parametrize("method", [LOAQ, Method("qronos"), Method("gptq")], ids=["loaq", "qronos", "gptq"])
def test_offload_policies_give_bit_identical_codes(method, tmp_path, monkeypatch):
    """device, cpu and disk storage of h, ĥ and X̂ in float32: the same codes and the same model."""
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    ref_m, ref = run(method)
    for offload in ("cpu", "disk"):
        m, res = run(method, offload=offload)
        assert same_codes(ref, res), offload
        assert all(torch.equal(p, q) for p, q in zip(ref_m.parameters(), m.parameters()))
    assert os.listdir(tmp_path) == [], "the disk scratch directory outlived the run"


def _last_layer_errors(*models) -> list[float]:
    """Normalized output error after the last layer of each quantized model against the float tiny Llama."""
    fp = tiny_model("llama")
    arch = arch_of(fp.config)
    X = tokens(n=6)
    base = layer_outputs(fp, arch, X)
    return [hidden_mse(base, layer_outputs(m, arch, X), 1e-6)["mse_normed"][-1] for m in models]


def test_bfloat16_storage_changes_codes_slightly():
    """bf16 storage is really used (codes differ from float32) and costs little accuracy on the calibration data."""
    ref_m, ref = run()
    m, res = run(dtype="bfloat16", offload="disk")
    assert not same_codes(ref, res)  # (GPTQ's error feedback flips many codes for a small change of H)
    e32, e16 = _last_layer_errors(ref_m, m)
    assert e16 < 1.1 * e32, (e16, e32)


def test_bfloat16_compute_runs_and_keeps_float32_weights():
    """--compute-dtype bfloat16: forwards on a cast copy; the model keeps float32 weights equal to the
    dequantized codes, and its error is close to the float32 run's."""
    from loaq.checkpoint import dequantized

    ref_m, ref = run()
    m, res = run(compute_dtype="bfloat16")
    w = m.model.layers[1].mlp.down_proj.weight
    assert w.dtype == torch.float32
    assert torch.equal(w, dequantized(res["model.layers.1.mlp.down_proj"], SPEC))
    assert m.model.layers[0].input_layernorm.weight.dtype == torch.float32
    e32, e16 = _last_layer_errors(ref_m, m)
    assert e16 < 1.2 * e32, (e16, e32)


class Killed(Exception):
    pass


def _die_after(store, layer, exc=Killed):
    real = store.save_layer

    def save_then_die(i, res, streams, extra=None):
        real(i, res, streams, extra)
        if i == layer:
            raise exc

    store.save_layer = save_then_die
    return store


@pytest.mark.parametrize("opts", [dict(offload="disk", checkpoint_every=2), dict(dtype="bfloat16", checkpoint_every=0)],
                         ids=["disk-every2", "bf16-never"])
def test_resume_replays_layers_after_the_saved_streams(tmp_path, opts):
    """4 layers, killed after layer 2: streams saved at layer 2 (every 2) or never; the resumed run
    replays the layers after them forward and ends with the uninterrupted run's codes."""
    _, full = run(layers=4, **opts)
    store = _die_after(LayerStore(str(tmp_path / "w"), "d", SPEC, opts["checkpoint_every"]), 2)
    with pytest.raises(Killed):
        run(layers=4, store=store, **opts)
    assert store.finished() == 3 and store._saved_streams() == ([2] if opts["checkpoint_every"] else [])
    _, resumed = run(layers=4, store=LayerStore(str(tmp_path / "w"), "d", SPEC, opts["checkpoint_every"]), **opts)
    assert same_codes(full, resumed)


def test_interrupt_at_a_layer_boundary_saves_the_streams(tmp_path, monkeypatch):
    """A Ctrl-C while layer 1's attention statistics are gathered (the streams still enter layer 1) saves
    them; mid-layer (after they started advancing) it does not."""
    import loaq.pipeline as pipeline

    _, full = run(layers=3, checkpoint_every=0)
    real, calls = pipeline.solve_group, []

    def interrupt_on(n):
        def solve(*args, **kwargs):
            calls.append(1)
            if len(calls) == n:
                raise KeyboardInterrupt
            return real(*args, **kwargs)
        return solve

    store = LayerStore(str(tmp_path / "w"), "d", SPEC, 0)
    monkeypatch.setattr(pipeline, "solve_group", interrupt_on(5))  # layer 1's q/k/v: 4 solves per layer
    with pytest.raises(KeyboardInterrupt):
        run(layers=3, store=store, checkpoint_every=0)
    assert store.finished() == 1 and store._saved_streams() == [1]
    calls.clear()
    monkeypatch.setattr(pipeline, "solve_group", interrupt_on(2))  # layer 1's o_proj: ĥ not advanced yet, h is
    with pytest.raises(KeyboardInterrupt):
        run(layers=3, store=LayerStore(str(tmp_path / "w"), "d", SPEC, 0), checkpoint_every=0)
    assert store._saved_streams() == [1]
    monkeypatch.setattr(pipeline, "solve_group", real)
    _, resumed = run(layers=3, store=LayerStore(str(tmp_path / "w"), "d", SPEC, 0), checkpoint_every=0)
    assert same_codes(full, resumed)


def test_stream_options_are_checked_and_only_dtypes_enter_the_digest():
    with pytest.raises(LoaQError, match="--offload-streams 'gpu'"):
        StreamOptions(offload="gpu")
    with pytest.raises(LoaQError, match="--stream-dtype"):
        StreamOptions(dtype="float16")
    with pytest.raises(LoaQError, match="--stream-checkpoint-every -1"):
        StreamOptions(checkpoint_every=-1)
    cfg = QuantConfig()
    base = cfg.digest("h")
    assert cfg.digest("h", StreamOptions(offload="disk", checkpoint_every=3).digest_fields()) == base
    assert cfg.digest("h", StreamOptions(dtype="bfloat16").digest_fields()) != base
    assert cfg.digest("h", StreamOptions(compute_dtype="float16").digest_fields()) != base


def test_cli_flags_reach_the_run_and_offload_keeps_the_codes(model_dir, calib, tmp_path):
    """`loaq quantize --offload-streams disk --stream-checkpoint-every 1` writes the same codes as the default
    run, records the stream settings in loaq.json and leaves no work directory."""
    import json


    from loaq.cli import main

    def quantize(out, *extra):
        return main(["-q", "quantize", "--model", model_dir, "--calib", calib, "--nsamples", "4", "--seqlen", "32",
                     "--batch-size", "2", "--out", str(out), *extra])

    assert quantize(tmp_path / "a") == 0
    assert quantize(tmp_path / "b", "--offload-streams", "disk", "--stream-checkpoint-every", "1") == 0
    a, b = (quantized_tensors(str(tmp_path / d)) for d in ("a", "b"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    meta = json.load(open(tmp_path / "b" / "loaq.json"))
    assert meta["streams"] == {"device": "cpu", "offload": "disk", "dtype": "float32", "compute_dtype": "float32"}
    assert not os.path.exists(tmp_path / "b.partial")
