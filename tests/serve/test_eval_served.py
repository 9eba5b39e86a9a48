"""Path (d): the model a vLLM server serves, scored through lm-eval's OpenAI-compatible completions
backend, agrees with the same checkpoint scored in-process (path a) within a stated tolerance.

It uses the serving tests' one session server (``tests/serve/conftest.py``: the tiny all-variant
export — 2/3/4-bit, W4A4, online R4 — served by vLLM with the LoaQ plugin); the local side loads the
same directory the way ``loaq eval --model EXPORT_DIR`` does (:func:`loaq.export.load.load_export`).

Tolerance: vLLM computes in the served dtype with its own kernels, so summed continuation log-probs
may differ from transformers' float32 by rounding: per choice |Δ| <= 0.25 nats and mean |Δ| <= 0.05;
accuracy within one example per task (the argmax may flip only on near-ties).
"""

import torch

from loaq.export.load import load_export
from loaq.tasks import names
from loaq.zeroshot import evaluate_tasks, hf_lm, served_lm
from tests.test_zeroshot import data_dir, write_bigbench  # noqa: F401  (the module fixture and its generator)

MAX_ABS, MEAN_ABS = 0.25, 0.05


def test_served_model_scores_as_the_local_checkpoint(server, data_dir):  # noqa: F811
    served = evaluate_tasks(served_lm(server.url + "/v1", server.name, server.model_dir), names(), data_dir=data_dir)
    model, tok = load_export(server.model_dir)
    local = evaluate_tasks(hf_lm(model, tok), names(), data_dir=data_dir)
    for t in names():
        s, l = torch.tensor(served["loglikelihoods"][t]), torch.tensor(local["loglikelihoods"][t])
        assert (s - l).abs().max() <= MAX_ABS and (s - l).abs().mean() <= MEAN_ABS, t
        n = local["tasks"][t]["n"]
        assert abs(served["tasks"][t]["acc"] - local["tasks"][t]["acc"]) <= 1 / n + 1e-9, t
