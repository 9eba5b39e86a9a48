"""Lazy, layer-at-a-time weights (issue #14): the same codes, checkpoint and perplexity as the eager path,
and memory that does not grow with depth; the native checkpoint in per-layer shards and the shard-streamed
export, tensor for tensor what the in-memory export makes."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import loaq
from loaq.actquant import ActSpec
from loaq.api import Evaluation
from loaq.arch import arch_of
from loaq.config import Calibration, Method, QuantConfig
from loaq.grids import GridSpec
from loaq.lazy import LazyWeights, skeleton
from loaq.models import resolve, skeleton_config
from loaq.pipeline import quantize_model
from loaq.rotation import RotationSpec
from tests.tiny import TEXT, tiny_model, tiny_tokenizer, tokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def sharded_dir(tmp_path_factory):
    """A 3-layer tiny Llama saved in many safetensors shards (with an index), and a calibration text."""
    d = tmp_path_factory.mktemp("lz")
    tiny_model("llama", vocab=320, num_hidden_layers=3).save_pretrained(d / "m", max_shard_size="60KB")
    tiny_tokenizer().save_pretrained(d / "m")
    (d / "c.txt").write_text(TEXT * 4)
    assert len([f for f in os.listdir(d / "m") if f.endswith(".safetensors")]) > 3
    return str(d / "m"), str(d / "c.txt")


CONFIGS = {
    "loaq-w3g32": QuantConfig(spec=GridSpec(3, 32), method=Method("loaq", alpha=0.5, beta=0.25)),
    "loaq-w4a4-hadamard": QuantConfig(spec=GridSpec(4, 0), method=Method("loaq"), rotation=RotationSpec("hadamard", 1),
                                      act=ActSpec(4)),
    "rtn-hadamard": QuantConfig(spec=GridSpec(4, 32), method=Method("rtn"), rotation=RotationSpec("hadamard", 2)),
    # α/β auto reads only the embeddings, head and first layers (rotated) for its search, lazily too
    "loaq-auto-hadamard": QuantConfig(spec=GridSpec(2, 0), method=Method("loaq", alpha="auto", beta="auto"),
                                      rotation=RotationSpec("hadamard", 1)),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_lazy_equals_eager_codes_checkpoint_and_ppl(sharded_dir, tmp_path, name):
    model, calib = sharded_dir
    cfg = CONFIGS[name]
    evaluation = Evaluation(calib, tokens=256, seqlen=32) if name == "loaq-w4a4-hadamard" else None  # the hardest
    runs = {load: loaq.quantize(model, cfg, Calibration(calib, nsamples=4, seqlen=32), out=str(tmp_path / load),
                                batch_size=2, progress=False, load=load, evaluation=evaluation)
            for load in ("eager", "lazy")}
    eager, lazy = runs["eager"], runs["lazy"]
    assert len(lazy.results) == len(eager.results) == 21
    for n, r in eager.results.items():
        q = lazy.results[n]
        assert torch.equal(r.codes, q.codes) and torch.equal(r.scales, q.scales) and torch.equal(r.zeros, q.zeros), n
    # the same bytes in every shard, the same perplexities (streamed layer by layer vs the whole model)
    files = sorted(os.listdir(tmp_path / "eager" / "weights"))
    assert files == sorted(os.listdir(tmp_path / "lazy" / "weights")) and len(files) == 3 + 2
    for f in files:
        assert open(tmp_path / "eager" / "weights" / f, "rb").read() == open(tmp_path / "lazy" / "weights" / f, "rb").read(), f
    if evaluation:
        assert lazy.ppl == eager.ppl and lazy.fp_ppl == eager.fp_ppl and lazy.ppl != lazy.fp_ppl
    a, b = (json.load(open(tmp_path / d / "loaq.json")) for d in ("eager", "lazy"))
    a.pop("quant_seconds"), b.pop("quant_seconds")
    if "auto" in a:
        assert a["auto"].pop("seconds") >= 0 and b["auto"].pop("seconds") >= 0 and len(a["auto"]["candidates"]) == 4
    assert a == b
    # the lazy run's model, built on demand, computes what the eager run's does
    ids = tokens(2, 16, vocab=320)
    with torch.no_grad():
        assert torch.equal(lazy.model(ids).logits, eager.model(ids).logits)


def test_lazy_without_out_keeps_codes_and_builds_the_model(sharded_dir):
    model, calib = sharded_dir
    cfg = CONFIGS["loaq-w4a4-hadamard"]
    cal = Calibration(calib, nsamples=4, seqlen=32)
    eager, lazy = (loaq.quantize(model, cfg, cal, batch_size=2, progress=False, load=load) for load in ("eager", "lazy"))
    assert all(torch.equal(eager.results[n].codes, lazy.results[n].codes) for n in eager.results)
    ids = tokens(2, 16, vocab=320)
    with torch.no_grad():
        assert torch.equal(lazy.model(ids).logits, eager.model(ids).logits)
    with pytest.raises(loaq.LoaQError, match="--load 'later' is unknown"):
        loaq.quantize(model, cfg, cal, load="later")


def write_tiny_gguf(path: str, layers: int = 2):
    """A tiny Llama as llama.cpp writes it: q/k rows permuted, 2-D weights in Q8_0, norms float32."""
    import gguf

    m = tiny_model("llama", vocab=96, num_hidden_layers=layers)
    c = m.config
    w = gguf.GGUFWriter(path, "llama")
    w.add_block_count(layers)
    w.add_context_length(256)
    w.add_embedding_length(c.hidden_size)
    w.add_feed_forward_length(c.intermediate_size)
    w.add_head_count(c.num_attention_heads)
    w.add_head_count_kv(c.num_key_value_heads)
    w.add_layer_norm_rms_eps(c.rms_norm_eps)
    w.add_vocab_size(c.vocab_size)
    names = gguf.get_tensor_name_map(gguf.MODEL_ARCH.LLAMA, layers)

    def permute(a, heads):  # convert_hf_to_gguf's q/k permutation
        return a.reshape(heads, 2, a.shape[0] // heads // 2, *a.shape[1:]).swapaxes(1, 2).reshape(a.shape)

    for k, v in m.state_dict().items():
        base, suffix = k.rsplit(".", 1)
        a = v.numpy()
        if k.endswith(("q_proj.weight", "k_proj.weight")):
            a = permute(a, c.num_attention_heads if "q_proj" in k else c.num_key_value_heads)
        q8 = gguf.GGMLQuantizationType.Q8_0
        if a.ndim == 2:
            w.add_tensor(f"{names.get_name(base)}.{suffix}", gguf.quants.quantize(a, q8), raw_dtype=q8)
        else:
            w.add_tensor(f"{names.get_name(base)}.{suffix}", a.astype(np.float32))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


def test_gguf_layers_read_lazily_as_transformers_loads_them(tmp_path):
    from transformers import AutoModelForCausalLM

    write_tiny_gguf(str(tmp_path / "t.gguf"))
    eager = AutoModelForCausalLM.from_pretrained(str(tmp_path), gguf_file="t.gguf", dtype=torch.float32).eval()
    src = resolve(str(tmp_path / "t.gguf"))
    m = skeleton(skeleton_config(src))
    arch = arch_of(m.config)
    weights = LazyWeights(src, m, arch)
    sd = eager.state_dict()
    for i in range(2):
        with weights.layer(i) as layer:
            for k, v in layer.state_dict().items():
                assert torch.equal(v, sd[f"model.layers.{i}.{k}"]), k  # dequantized Q8_0, q/k un-permuted
        assert m.model.layers[i].mlp.up_proj.weight.is_meta  # released
    with weights.rest() as whole:
        for k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
            assert torch.equal(whole.state_dict()[k], sd[k]), k
    # and the pipeline gives the eager model's codes (GPTQ, with W4A4 and Hadamard)
    cfg = QuantConfig(spec=GridSpec(4, 0), method=Method("gptq"), act=ActSpec(4))
    windows = tokens(4, 16, vocab=96)
    from loaq.rotation import rotate_model

    rotate_model(eager, arch, 3)
    want = quantize_model(eager, arch, windows, cfg, batch_size=2, progress=False)
    lazy = skeleton(skeleton_config(src))
    got = quantize_model(lazy, arch, windows, cfg, batch_size=2, progress=False,
                         weights=LazyWeights(src, lazy, arch, rotation_seed=3))
    assert got.keys() == want.keys() and all(torch.equal(got[n].codes, want[n].codes) for n in want)


PEAK = """
import os, sys
import loaq, loaq.api, loaq.lazy, loaq.pipeline, torch, transformers  # noqa: F401
from loaq.config import Calibration, Method, QuantConfig
from loaq.grids import GridSpec
torch.set_num_threads(1)
def status(key):  # VmHWM, unlike ru_maxrss, starts anew at exec: the pytest parent's size does not count
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(key + ":")) / 1024
base = status("VmRSS")
loaq.quantize(sys.argv[1], QuantConfig(spec=GridSpec(4, 0), method=Method("rtn")),
              Calibration(sys.argv[2], nsamples=2, seqlen=32), out=sys.argv[3], batch_size=2, progress=False,
              load=sys.argv[4])
print(status("VmHWM") - base)
"""


def test_peak_memory_of_a_lazy_run_does_not_grow_with_depth(tmp_path):
    """Wide tiny layers (16 MB of float32 each), round to nearest (the weights are what grows): 8 layers cost a
    lazy run less than half a layer more than 2 layers do (measured: < 1 MB), while the eager run of the same 8
    layers holds them all (the measurement sees the model). glibc's mmap threshold is fixed as it is for real
    layers' tensors (> 32 MB, always mmapped and returned): below that its dynamic threshold keeps freed
    tensors of a few MB in the heap, which reads as growth (about one layer here) that is no live memory."""
    (tmp_path / "c.txt").write_text(TEXT * 4)
    wide = dict(vocab=320, hidden_size=512, intermediate_size=2048, num_attention_heads=8, num_key_value_heads=8)
    layer_mb = 4 * (4 * 512 * 512 + 3 * 512 * 2048) / 2**20
    env = dict(os.environ, PYTHONPATH=ROOT, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", MALLOC_ARENA_MAX="1",
               MALLOC_MMAP_THRESHOLD_="262144")
    procs = {}
    for layers, load in ((2, "lazy"), (8, "lazy"), (8, "eager")):  # one process each, run side by side (own peaks)
        d = tmp_path / f"m{layers}"
        if not d.exists():
            tiny_model("llama", num_hidden_layers=layers, **wide).save_pretrained(d)
            tiny_tokenizer().save_pretrained(d)
        procs[layers, load] = subprocess.Popen([sys.executable, "-c", PEAK, str(d), str(tmp_path / "c.txt"),
                                                str(tmp_path / f"o{layers}{load}"), load],
                                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    peaks = {}
    try:
        for key, proc in procs.items():
            out, err = proc.communicate(timeout=300)
            assert proc.returncode == 0, err[-2000:]
            peaks[key] = float(out.split()[-1])
    finally:
        for proc in procs.values():
            proc.kill()
    assert peaks[8, "lazy"] - peaks[2, "lazy"] < layer_mb / 2, (peaks, layer_mb)
    assert peaks[8, "eager"] - peaks[8, "lazy"] > 4 * layer_mb, (peaks, layer_mb)


def test_shard_streamed_export_equals_the_in_memory_export(tmp_path):
    """Per tensor name the same bytes as the whole state dict :func:`export_tensors` builds in memory (today's
    export), for any shard size, from the sharded native layout and from the old two-file one; the same config."""
    from loaq.checkpoint import save_native
    from loaq.export.writer import export, export_tensors, read_native
    from loaq.shards import other_tensors, quantized_tensors

    model, tok = tiny_model("qwen3", vocab=320, num_hidden_layers=3), tiny_tokenizer()
    arch = arch_of(model.config)
    cfg = QuantConfig(spec=GridSpec(3, 32), method=Method("rtn"), rotation=RotationSpec("hadamard"))
    from loaq.rotation import rotate_model

    rotation = rotate_model(model, arch, 0)
    results = quantize_model(model, arch, torch.zeros(1, 1, dtype=torch.long), cfg, progress=False)
    meta = {"config": cfg.to_dict(), "calibration": None, "source_model": "tiny", "arch": "Qwen3ForCausalLM"}
    save_native(str(tmp_path / "n2"), model, tok, results, meta, force=False, rotation=rotation)
    old = tmp_path / "n1"  # the loaq-native/1 layout of the same checkpoint
    os.makedirs(old)
    for f in os.listdir(tmp_path / "n2"):
        if f != "weights":
            os.symlink(tmp_path / "n2" / f, old / f)
    save_file(quantized_tensors(str(tmp_path / "n2")), old / "quantized.safetensors")
    save_file(other_tensors(str(tmp_path / "n2")), old / "model.safetensors")
    for dtype in (torch.bfloat16, torch.float32):
        want = export_tensors(read_native(str(old)), dtype)
        configs = []
        for native, size in (("n2", "2GB"), ("n2", "50KB"), ("n1", "2GB"), ("n1", "50KB")):
            out = tmp_path / f"x-{native}-{size}-{dtype}"
            files = len(export(str(tmp_path / native), str(out), dtype=dtype, max_shard_size=size))
            assert (files == 1) if size == "2GB" else (files > 1)
            got = {}
            for f in sorted(os.listdir(out)):
                if f.endswith(".safetensors"):
                    got |= load_file(out / f)
            assert got.keys() == want.keys()
            for k, v in want.items():
                assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
                assert got[k].contiguous().view(torch.uint8).numpy().tobytes() == v.contiguous().view(torch.uint8).numpy().tobytes(), k
            if files > 1:
                index = json.load(open(out / "model.safetensors.index.json"))["weight_map"]
                assert set(index) == set(want) and all(k in load_file(out / f) for k, f in index.items())
            configs.append(json.load(open(out / "config.json")))
            assert {"loaq_transforms", "quantization_config"} & set(configs[-1])
        assert all(c == configs[0] for c in configs)


def test_lazy_resume_is_bit_identical_with_w4a4_hadamard_and_eval(sharded_dir, tmp_path, monkeypatch):
    """Killed after layer 0, resumed lazily: the same shards and perplexity (R4 before the activation quantizer
    on the finished layers too) as one uninterrupted lazy run."""
    import loaq.checkpoint as ck

    model, calib = sharded_dir
    kw = dict(config=CONFIGS["loaq-w4a4-hadamard"], calibration=Calibration(calib, nsamples=4, seqlen=32),
              batch_size=2, progress=False, evaluation=Evaluation(calib, tokens=256, seqlen=32))
    full = loaq.quantize(model, out=str(tmp_path / "full"), **kw)
    real = ck.LayerStore.save_layer

    class Killed(Exception):
        pass

    def die_after_first(self, i, *rest):
        real(self, i, *rest)
        if i == 0:
            raise Killed

    monkeypatch.setattr(ck.LayerStore, "save_layer", die_after_first)
    with pytest.raises(Killed):
        loaq.quantize(model, out=str(tmp_path / "r"), **kw)
    monkeypatch.setattr(ck.LayerStore, "save_layer", real)
    resumed = loaq.quantize(model, out=str(tmp_path / "r"), resume=True, **kw)
    assert resumed.ppl == full.ppl
    for f in sorted(os.listdir(tmp_path / "full" / "weights")):
        assert open(tmp_path / "full" / "weights" / f, "rb").read() == open(tmp_path / "r" / "weights" / f, "rb").read(), f


def test_parts_load_again_after_release(tmp_path):
    """A part released back to ``meta`` loads again (the α/β search reads the first layers and the embeddings
    before the run does): buffers the checkpoint does not hold (Gemma 3's embedding scale, rotary
    frequencies) are kept, checkpoint tensors are released."""
    tiny_model("gemma3").save_pretrained(tmp_path / "g")
    tiny_tokenizer().save_pretrained(tmp_path / "g")
    src = resolve(str(tmp_path / "g"))
    m = skeleton(skeleton_config(src))
    arch = arch_of(m.config)
    w = LazyWeights(src, m, arch)
    ids = tokens(1, 8)
    outs = []
    for _ in range(2):
        with w.rest() as model, w.layer(0) as layer, torch.no_grad():
            outs.append((model.get_input_embeddings()(ids).clone(), layer.self_attn.q_proj.weight.clone()))
        assert model.get_input_embeddings().weight.is_meta and layer.self_attn.q_proj.weight.is_meta
    assert all(torch.equal(a, b) for a, b in zip(*outs))
    assert not any(b.is_meta for b in m.get_input_embeddings().buffers())
