"""Path (d): the model a vLLM server serves, scored through lm-eval's OpenAI-compatible completions
backend, agrees with the same checkpoint scored in-process (path a) within a stated tolerance.

Needs the serving helper's session fixture ``vllm_server`` (defined with the serving tests, not here),
expected to yield an object with ``base_url`` (e.g. ``http://127.0.0.1:8000/v1``), ``served_model``
(the name the server was started with) and ``model_dir`` (the local directory it serves).

Tolerance: vLLM computes in the served dtype with its own kernels, so summed continuation log-probs
may differ from transformers' float32 by rounding: per choice |Δ| <= 0.25 nats and mean |Δ| <= 0.05;
accuracy within one example per task (the argmax may flip only on near-ties).
"""

import torch

from loaq.models import load_model
from loaq.tasks import names
from loaq.zeroshot import evaluate_tasks, hf_lm, served_lm
from tests.test_zeroshot import data_dir, write_bigbench  # noqa: F401  (the module fixture and its generator)

MAX_ABS, MEAN_ABS = 0.25, 0.05


def test_served_model_scores_as_the_local_checkpoint(vllm_server, data_dir):  # noqa: F811
    served = evaluate_tasks(served_lm(vllm_server.base_url, vllm_server.served_model, vllm_server.model_dir),
                            names(), data_dir=data_dir)
    model, tok = load_model(vllm_server.model_dir)[:2]
    local = evaluate_tasks(hf_lm(model, tok), names(), data_dir=data_dir)
    for t in names():
        s, l = torch.tensor(served["loglikelihoods"][t]), torch.tensor(local["loglikelihoods"][t])
        assert (s - l).abs().max() <= MAX_ABS and (s - l).abs().mean() <= MEAN_ABS, t
        n = local["tasks"][t]["n"]
        assert abs(served["tasks"][t]["acc"] - local["tasks"][t]["acc"]) <= 1 / n + 1e-9, t
