"""benchmarks/decode.py on the CPU kernels, tiny config: the swapped model decodes what the
dequantized reference decodes, and the benchmark yields a row for every variant and batch."""

import importlib.util
import json
import math
import sys
from pathlib import Path

import pytest
import torch

from loaq.kernels.op import QuantLinear
from loaq.kernels.w4a4_ref import quantize_activations_ref, w4a4_matmul_ref
from loaq.kernels.wna16_ref import dequantize_ref

_spec = importlib.util.spec_from_file_location("decode_bench", Path(__file__).parents[1] / "benchmarks" / "decode.py")
decode = sys.modules["decode_bench"] = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(decode)

NEW_TOKENS = 8


@pytest.fixture(autouse=True)
def one_thread():
    """One thread: OpenMP barriers on the shared 2-core host cost a scheduler tick per call."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


class RefW4A4(torch.nn.Module):
    """W4A4 by the kernels' reference: per-token 4-bit activations, exact integer GEMM."""

    def __init__(self, w):
        super().__init__()
        self.w = w

    def forward(self, x):
        act = quantize_activations_ref(x.reshape(-1, x.shape[-1]), sym=True)
        return w4a4_matmul_ref(act, self.w, torch.float32).reshape(*x.shape[:-1], -1)


def reference_linear(w, act_bits):
    """nn.Linear holding the dequantized weight (float32), or the W4A4 reference."""
    if act_bits == 4:
        return RefW4A4(w)
    lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
    lin.weight.data = dequantize_ref(w).float()
    return lin


@pytest.fixture
def prompt():
    return torch.randint(0, decode.TINY["vocab_size"], (2, 6), generator=torch.Generator().manual_seed(3))


def test_built_model_equals_a_normally_constructed_one(prompt):
    """meta + to_empty + fill leaves no buffer uninitialized (inv_freq is recomputed)."""
    from transformers import LlamaForCausalLM

    config = decode.llama_config(tiny=True)
    model = decode.build_model(config, "cpu", torch.float32)
    plain = LlamaForCausalLM(config).eval()
    plain.load_state_dict(model.state_dict())
    with torch.no_grad():
        logits = model(prompt).logits
        assert torch.isfinite(logits).all() and logits.std() > 0
        assert torch.equal(logits, plain(prompt).logits)


@pytest.mark.parametrize("variant", decode.QUANTIZED, ids=lambda v: v.name)
def test_quantized_decode_matches_dequantized_reference(variant, prompt):
    """Greedy tokens equal, logits within 1e-4 of max |logit| (float32; the GEMVs sum in another order)."""
    model = decode.build_model(decode.llama_config(tiny=True), "cpu", torch.float32)
    dense_ids, _ = decode.generate(model, prompt, NEW_TOKENS)
    packed = decode.swap_linears(model, variant.bits, variant.group_size, variant.act_bits)
    assert len(packed) == 7 * decode.TINY["num_hidden_layers"]
    assert sum(isinstance(m, QuantLinear) for m in model.modules()) == len(packed)
    ids, logits = decode.generate(model, prompt, NEW_TOKENS)
    for name, w in packed.items():
        model.get_submodule(name).release()
        model.set_submodule(name, reference_linear(w, variant.act_bits))
    ref_ids, ref_logits = decode.generate(model, prompt, NEW_TOKENS)
    assert torch.equal(ids, ref_ids)
    assert (logits - ref_logits).abs().max() <= 1e-4 * ref_logits.abs().max()
    assert not torch.equal(ids, dense_ids)  # the swap changed the model


def test_compiled_step_decodes_the_same_tokens(prompt, monkeypatch):
    """torch.compile(fullgraph) traces the step (StaticCache, masks) around the opaque loaq::linear op
    and runs it: same tokens as eager. The aot_eager backend: the same tracing and fake-tensor
    propagation as inductor, without its C++ codegen (40 s on the shared 2-core host)."""
    compile_ = torch.compile
    monkeypatch.setattr(decode.torch, "compile",
                        lambda fn, mode, fullgraph: compile_(fn, backend="aot_eager", fullgraph=fullgraph))
    model = decode.build_model(decode.llama_config(tiny=True), "cpu", torch.float32)
    decode.swap_linears(model, 4, 128)
    eager, eager_logits = decode.generate(model, prompt, NEW_TOKENS)
    compiled, compiled_logits = decode.generate(model, prompt, NEW_TOKENS, compile=True)
    torch._dynamo.reset()
    assert torch.equal(eager, compiled)
    assert (eager_logits - compiled_logits).abs().max() <= 1e-4 * eager_logits.abs().max()


def test_bench_rows_for_every_variant_and_batch():
    rows = decode.bench(decode.llama_config(tiny=True), "cpu", torch.bfloat16, [1, 16], tokens=2, prompt_len=4,
                        warmup=1, compile=False)
    names = ["bf16"] + [v.name for v in decode.QUANTIZED]
    assert [(r["variant"], r["batch"]) for r in rows] == [(n, b) for n in names for b in (1, 16)]
    assert all(math.isfinite(r["tokens_per_s"]) and r["tokens_per_s"] > 0 for r in rows)
    text = decode.render({"cpu": dict(meta=dict(device_name="test"), rows=rows, date="d", host="h", command="c")})
    assert text.count("\n| ") == len(rows) + 1 and "W2A16 g128 | 1 |" in text


def test_bench_rates_come_from_the_timed_steps_only(monkeypatch):
    """On a fake clock that advances only inside decode steps, by a cost per variant plus 0.5 ms per sequence,
    each row reports batch / step cost as tokens/s, the step cost as ms/step and the dense step cost over the
    variant's at the same batch as speedup; prefill and warmup steps stay out of the timed span."""
    base = {None: 10e-3, (4, 128, 16): 4e-3, (3, 128, 16): 5e-3, (2, 128, 16): 6e-3, (4, None, 4): 3e-3}
    state, clock = {"variant": None}, [0.0]
    swap, step = decode.swap_linears, decode.Decoder.step

    def swap_and_note(model, bits, group_size, act_bits=16):
        state["variant"] = (bits, group_size, act_bits)
        return swap(model, bits, group_size, act_bits)

    def cost(variant, batch):
        return base[variant] + 0.5e-3 * batch

    def timed_step(self, ids):
        clock[0] += cost(state["variant"], ids.shape[0])
        return step(self, ids)

    monkeypatch.setattr(decode, "swap_linears", swap_and_note)
    monkeypatch.setattr(decode.Decoder, "step", timed_step)
    monkeypatch.setattr(decode, "time", type("FakeTime", (), {"perf_counter": staticmethod(lambda: clock[0])}))
    rows = decode.bench(decode.llama_config(tiny=True), "cpu", torch.float32, [1, 16], tokens=3, prompt_len=4,
                        warmup=2, compile=False)
    keys = [None] + [(v.bits, v.group_size, v.act_bits) for v in decode.QUANTIZED]
    assert len(rows) == 2 * len(keys)
    for r, (key, batch) in zip(rows, [(k, b) for k in keys for b in (1, 16)]):
        assert r["batch"] == batch
        assert r["tokens_per_s"] == pytest.approx(batch / cost(key, batch))
        assert r["ms_per_step"] == pytest.approx(1e3 * cost(key, batch))
        assert r["speedup"] == pytest.approx(cost(None, batch) / cost(key, batch))


def test_cuda_without_a_gpu_is_one_line(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(SystemExit) as e:
        decode.main(["--device", "cuda"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip().count("\n") == 0


def test_runs_of_other_batches_merge_into_one_table(tmp_path):
    def row(variant, batch, tps):
        return dict(variant=variant, batch=batch, tokens_per_s=tps, ms_per_step=1.0, speedup=1.0)

    meta = dict(device_name="GPU", layers=32)
    decode.write_results(tmp_path, "cuda", meta, [row("fp16", 1, 10.0), row("W4A16 g128", 1, 25.0)])
    decode.write_results(tmp_path, "cuda", meta, [row("fp16", 16, 100.0), row("W4A16 g128", 16, 200.0)])
    rows = json.loads((tmp_path / "decode.json").read_text())["cuda"]["rows"]
    assert [(r["variant"], r["batch"], r["tokens_per_s"]) for r in rows] == [
        ("fp16", 1, 10.0), ("fp16", 16, 100.0), ("W4A16 g128", 1, 25.0), ("W4A16 g128", 16, 200.0)]
    decode.write_results(tmp_path, "cuda", dict(meta, layers=8), [row("fp16", 1, 11.0)])  # other settings: replaced
    assert len(json.loads((tmp_path / "decode.json").read_text())["cuda"]["rows"]) == 1
    assert "| fp16 | 1 | 11.0 |" in (tmp_path / "decode.md").read_text()
