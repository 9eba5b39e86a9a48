"""Zero-shot accuracy through lm-evaluation-harness (pinned in the ``eval`` extra).

The same harness code scores every path: an in-memory Hugging Face model (the fp model, a native
checkpoint as :func:`loaq.checkpoint.load_native` simulates it, or a compressed-tensors export loaded
by transformers) is wrapped in lm-eval's ``HFLM``; a running vLLM server is reached through lm-eval's
OpenAI-compatible ``local-completions`` backend. Accuracy is the harness's own ``acc`` / ``acc_norm``
on the local tasks of :mod:`loaq.tasks`; the average over tasks is the paper's "average zero-shot
accuracy" (of ``acc``; the ``acc_norm`` average is reported beside it).
"""

from __future__ import annotations

import logging
import os

from loaq.errors import LoaQError
from loaq.tasks import task_config


def _lm_eval():
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import lm_eval
    except ImportError:
        raise LoaQError("lm-evaluation-harness is not installed; run `pip install -e '.[eval]'`") from None
    for name in ("lm-eval", "lm_eval"):  # the harness logs every request batch at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    return lm_eval


def hf_lm(model, tokenizer, batch_size: int = 8):
    """lm-eval's ``HFLM`` around an already-loaded causal LM (no loading, no device move)."""
    _lm_eval()
    from lm_eval.models.huggingface import HFLM

    device = str(next(model.parameters()).device)
    return HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size, device=device)


def served_lm(base_url: str, served_model: str, tokenizer: str, batch_size: int = 8):
    """lm-eval's ``local-completions`` client of an OpenAI-compatible server (e.g. ``vllm serve``).

    Requests carry token ids from ``tokenizer`` (a local directory), so the context/continuation split
    is the same as :func:`hf_lm`'s; the server echoes the prompt's log-probs.
    """
    _lm_eval()
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    if not os.path.isdir(tokenizer):
        raise LoaQError(f"tokenizer {tokenizer!r} is not a local directory; pass --tokenizer DIR (the served checkpoint)")
    url = base_url.rstrip("/")
    url = url if url.endswith("/completions") else url + ("/completions" if url.endswith("/v1") else "/v1/completions")
    return LocalCompletionsAPI(base_url=url, model=served_model, tokenizer=tokenizer, tokenizer_backend="huggingface",
                               tokenized_requests=True, batch_size=batch_size, max_retries=3)


def evaluate_tasks(lm, tasks: list[str], limit: int | None = None, data_dir: str | None = None) -> dict:
    """Score ``lm`` on ``tasks`` (zero-shot, first ``limit`` examples in file order).

    Returns ``{"tasks": {name: {acc, acc_stderr, acc_norm, acc_norm_stderr, n}}, "average": {acc, acc_norm},
    "loglikelihoods": {name: [[summed log-prob of each choice] per example]}}``.
    """
    _lm_eval()
    from lm_eval import simple_evaluate
    from lm_eval.tasks import TaskManager

    configs = [task_config(t, data_dir) for t in tasks]  # fails fast on missing data, before any scoring
    out = simple_evaluate(model=lm, tasks=configs, task_manager=TaskManager(include_defaults=False), num_fewshot=0,
                          limit=limit, log_samples=True, bootstrap_iters=1000, verbosity="WARNING")
    per_task, lls = {}, {}
    for t in tasks:
        r = out["results"][t]
        samples = sorted(out["samples"][t], key=lambda s: s["doc_id"])
        per_task[t] = {"acc": r["acc,none"], "acc_stderr": r.get("acc_stderr,none"), "acc_norm": r["acc_norm,none"],
                       "acc_norm_stderr": r.get("acc_norm_stderr,none"), "n": len(samples)}
        lls[t] = [[float(resp[0]) for resp in s["filtered_resps"]] for s in samples]
    average = {m: sum(per_task[t][m] for t in tasks) / len(tasks) for m in ("acc", "acc_norm")}
    return {"tasks": per_task, "average": average, "limit": limit, "loglikelihoods": lls}
