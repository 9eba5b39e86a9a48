"""Path (d): the model a vLLM server serves, scored through lm-eval's OpenAI-compatible completions
backend, agrees with the same checkpoint scored in-process (path a) within a stated tolerance.

It uses the serving tests' one session server (``tests/serve/conftest.py``: the tiny all-variant
export — 2/3/4-bit, W4A4, online R4 — served by vLLM with the LoaQ plugin); the local side loads the
same directory the way ``loaq eval --model EXPORT_DIR`` does (:func:`loaq.export.load.load_export`).

Tolerance: the server runs in float32 (tests/serve/conftest.py) but with vLLM's attention instead of
transformers' sdpa. The served model quantizes activations to 4 bits (W4A4 layers): a float32 rounding
difference that moves one activation across a rounding boundary changes that value by a whole step, so
summed continuation log-probs differ by more than rounding. Measured: mean |Δ| 0.09 nats, max 0.52 over
36 choices. Bounds: per choice |Δ| <= 1.0 nats, mean |Δ| <= 0.25, accuracy within one example per task;
a missing R4 or activation quantizer moves them by several nats.
"""

import torch

from loaq.export.load import load_export
from loaq.tasks import names
from loaq.zeroshot import evaluate_tasks, hf_lm, served_lm
from tests.test_zeroshot import data_dir, write_bigbench  # noqa: F401  (the module fixture and its generator)

MAX_ABS, MEAN_ABS = 1.0, 0.25


def test_served_model_scores_as_the_local_checkpoint(server, data_dir):  # noqa: F811
    served = evaluate_tasks(served_lm(server.url + "/v1", server.name, server.model_dir), names(), data_dir=data_dir)
    model, tok = load_export(server.model_dir)
    local = evaluate_tasks(hf_lm(model, tok), names(), data_dir=data_dir)
    for t in names():
        s, l = torch.tensor(served["loglikelihoods"][t]), torch.tensor(local["loglikelihoods"][t])
        assert (s - l).abs().max() <= MAX_ABS and (s - l).abs().mean() <= MEAN_ABS, t
        n = local["tasks"][t]["n"]
        assert abs(served["tasks"][t]["acc"] - local["tasks"][t]["acc"]) <= 1 / n + 1e-9, t
