"""Zero-shot accuracy through lm-evaluation-harness on the local tasks: the converter, offline task
loading, the scoring wiring (a model built to prefer the right / a wrong answer scores 100 % / 0 %,
a random model matches a direct log-prob computation), and exact agreement of the fp, native and
compressed-tensors paths of one checkpoint."""

import copy
import json
import os
import random

import pytest
import torch

from loaq.cli import main
from loaq.errors import LoaQError
from loaq.tasks import names, task_config
from loaq.tasks.prepare import SOURCES, prepare
from loaq.zeroshot import evaluate_tasks, hf_lm
from tests.tiny import tiny_model, tiny_tokenizer

GOOD, BAD = ["quick", "brown", "fox"], ["lazy", "dog", "jumps"]  # whole tokens of tiny_tokenizer()
N_CHOICES = {"bb_social_iqa": 3, "bb_step_inference": 4, "bb_goal_inference": 4}
N = 9


def write_bigbench(root, n=N, seed=0):
    """A BIG-bench-shaped ``benchmark_tasks`` tree: right answers use GOOD words, wrong ones BAD words."""
    rng = random.Random(seed)
    for name, rel in SOURCES.items():
        examples = []
        for i in range(n):
            k = N_CHOICES[name]
            gold = i % k
            wrong = rng.sample([" ".join(p) for p in ([b] for b in BAD)] + ["lazy dog", "dog jumps", "jumps lazy"], k - 1)
            choices = wrong[:gold] + [" ".join(rng.sample(GOOD, rng.randint(1, 2))) + " "] + wrong[gold:]
            examples.append({"input": f"  The {rng.choice(GOOD + BAD)} number {i}\n",
                             "target_scores": {c: int(j == gold) for j, c in enumerate(choices)}})
        path = os.path.join(root, rel)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as fh:
            json.dump({"name": name, "examples": examples}, fh)
    return str(root)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("bb")
    return prepare(str(root / "tasks"), write_bigbench(root / "benchmark_tasks"))


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


def test_prepare_writes_the_datamd_format(data_dir, tmp_path):
    assert sorted(SOURCES) == names() == ["bb_goal_inference", "bb_social_iqa", "bb_step_inference"]
    rows = [json.loads(l) for l in open(os.path.join(data_dir, "bb_step_inference.jsonl"))]
    src = json.load(open(os.path.join(os.path.dirname(data_dir), "benchmark_tasks", SOURCES["bb_step_inference"])))
    assert len(rows) == N
    for row, ex in zip(rows, src["examples"]):
        assert row["input"] == ex["input"].strip() and not row["input"].startswith(" ")
        assert row["choices"] == [" " + c.strip() for c in ex["target_scores"]]
        assert [c.strip() for c in ex["target_scores"]][row["gold"]].split()[0] in GOOD
    with pytest.raises(LoaQError, match="already exists"):
        prepare(data_dir, os.path.join(os.path.dirname(data_dir), "benchmark_tasks"))


def test_prepared_yaml_loads_in_lm_eval_offline(data_dir):
    from lm_eval.tasks import TaskManager

    loaded = TaskManager(include_path=data_dir, include_defaults=False).load(["bb_social_iqa"])
    task = loaded["tasks"]["bb_social_iqa"]
    doc = task.test_docs()[4]
    assert task.doc_to_text(doc) == f"Question: {doc['input']}\nAnswer:" and doc["input"].endswith("number 4")
    assert task.doc_to_target(doc) == 4 % 3 and task.doc_to_choice(doc)[1 if 4 % 3 != 1 else 0].startswith(" ")


def test_missing_task_data_says_how_to_install(tmp_path, capsys):
    with pytest.raises(LoaQError, match="loaq tasks prepare"):
        task_config("bb_social_iqa", str(tmp_path))
    assert main(["eval", "--tasks", "bb_social_iqa", "--tasks-dir", str(tmp_path)]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: task 'bb_social_iqa': data file") and "\n" not in err
    assert main(["eval", "--tasks", "hellaswag"]) == 2
    assert "choose from bb_goal_inference, bb_social_iqa, bb_step_inference" in capsys.readouterr().err


def reference_loglikelihoods(model, tok, data_dir, name):
    """DATA.md §4 by hand: continuation tokens = tail of tok(context + continuation) after tok(context)."""
    text = {"bb_social_iqa": "Question: {}\nAnswer:"}.get(name, "{}")
    out = []
    for row in map(json.loads, open(os.path.join(data_dir, f"{name}.jsonl"))):
        ctx = text.format(row["input"])
        lls = []
        for cont in row["choices"]:
            c, w = tok(ctx)["input_ids"], tok(ctx + cont)["input_ids"]
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([w])).logits[0].float(), -1)
            lls.append(sum(logp[i - 1, w[i]].item() for i in range(len(c), len(w))))
        out.append(lls)
    return out


def test_random_model_scores_as_the_reference_and_deterministically(data_dir, tok):
    model = tiny_model(vocab=320)
    tasks = ["bb_social_iqa", "bb_step_inference"]
    first = evaluate_tasks(hf_lm(model, tok), tasks, data_dir=data_dir)
    again = evaluate_tasks(hf_lm(model, tok), tasks, data_dir=data_dir)
    assert first == again
    for t in tasks:
        ref = reference_loglikelihoods(model, tok, data_dir, t)
        assert torch.allclose(torch.tensor(first["loglikelihoods"][t]), torch.tensor(ref), atol=1e-4)
        gold = [json.loads(l)["gold"] for l in open(os.path.join(data_dir, f"{t}.jsonl"))]
        acc = sum(max(range(len(r)), key=r.__getitem__) == g for r, g in zip(ref, gold)) / len(gold)
        assert first["tasks"][t]["acc"] == acc and first["tasks"][t]["n"] == N
    assert 0 < first["average"]["acc"] < 1  # the random model is neither always right nor always wrong


def preferring(tok, words, avoid):
    """A tiny Llama whose next-token distribution is the same everywhere: ``words`` likely, ``avoid`` unlikely.
    Attention and MLP write nothing (o_proj, down_proj = 0) and every embedding is the same vector, so the
    logits are lm_head's row sums."""
    model = tiny_model(vocab=320)
    ids = lambda ws: [tok(" " + w)["input_ids"][0] for w in ws]  # noqa: E731
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.fill_(1.0)
        model.model.norm.weight.fill_(1.0)
        head = model.lm_head.weight
        head.zero_()
        head[ids(words)] = 20.0 / head.shape[1]
        head[ids(avoid)] = -20.0 / head.shape[1]
    return model


def test_a_model_preferring_the_right_answer_scores_100_and_a_wrong_one_0(data_dir, tok):
    right = evaluate_tasks(hf_lm(preferring(tok, GOOD, BAD), tok), names(), data_dir=data_dir)
    wrong = evaluate_tasks(hf_lm(preferring(tok, BAD, GOOD), tok), names(), data_dir=data_dir)
    for t in names():
        assert right["tasks"][t]["acc"] == right["tasks"][t]["acc_norm"] == 1.0
        assert wrong["tasks"][t]["acc"] == wrong["tasks"][t]["acc_norm"] == 0.0
    assert right["average"] == {"acc": 1.0, "acc_norm": 1.0} and wrong["average"] == {"acc": 0.0, "acc_norm": 0.0}


@pytest.fixture(scope="module")
def three_paths(data_dir, tok, tmp_path_factory):
    """One RTN W3 g32 checkpoint as (a) a plain HF dir of its dequantized weights, (b) the native
    checkpoint, (c) its float32 compressed-tensors export."""
    from loaq.export.cli import main as export_main
    from tests.export.test_export import make_native

    d = tmp_path_factory.mktemp("paths")
    from loaq.grids import GridSpec

    native = make_native({"llama": (tiny_model(vocab=320), tok)}, "llama", GridSpec(3, 32, False), d / "native")
    from loaq.checkpoint import load_native

    model, _, _ = load_native(native)
    model.save_pretrained(d / "fp")
    tok.save_pretrained(d / "fp")
    assert export_main([native, str(d / "ct"), "--dtype", "float32"]) == 0
    (d / "eval.txt").write_text(open(os.path.join(os.path.dirname(__file__), "tiny.py")).read() * 4)
    return {"a": ["--model", str(d / "fp")], "b": ["--quantized", native], "c": ["--model", str(d / "ct")]}, d


def test_fp_native_and_export_paths_agree_exactly(three_paths, data_dir):
    paths, d = three_paths
    got = {}
    for k, args in paths.items():
        out = d / f"{k}.json"
        assert main(["-q", "eval", *args, "--tasks", "all", "--tasks-dir", data_dir, "--eval-text", str(d / "eval.txt"),
                     "--eval-tokens", "512", "--eval-seqlen", "64", "--batch-size", "4", "--json", str(out)]) == 0
        got[k] = json.load(open(out))
    assert [got[k]["label"] for k in "abc"] == ["fp32", "quantized", "export"]
    assert got["a"]["zero_shot"] == got["b"]["zero_shot"] == got["c"]["zero_shot"]
    assert got["a"]["ppl"] == got["b"]["ppl"] == got["c"]["ppl"] and got["a"]["eval_tokens"] == 512
    assert set(got["a"]["zero_shot"]["tasks"]) == set(names())


def test_fp_native_and_export_loglikelihoods_are_identical(three_paths, data_dir):
    from loaq.checkpoint import load_native
    from loaq.export.load import load_export
    from loaq.models import load_model

    paths, d = three_paths
    models = {"a": load_model(str(d / "fp"))[:2], "b": load_native(paths["b"][1])[:2], "c": load_export(str(d / "ct"))}
    lls = {k: evaluate_tasks(hf_lm(m, t), ["bb_step_inference"], data_dir=data_dir)["loglikelihoods"] for k, (m, t) in models.items()}
    assert lls["a"] == lls["b"] == lls["c"]
    assert lls["a"] != evaluate_tasks(hf_lm(tiny_model(vocab=320), models["a"][1]), ["bb_step_inference"],
                                      data_dir=data_dir)["loglikelihoods"]  # the checkpoint, not the unquantized model


class _Stub:
    """A minimal OpenAI ``/v1/completions`` endpoint over an HF model (echo + prompt log-probs, as vLLM
    returns them): checks the request/score wiring of path (d) without vLLM. The agreement with a real
    server is tests/test_eval_served.py."""

    def __init__(self, model):
        import threading
        from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                stub.requests.append(body)
                out = json.dumps({"choices": [stub.choice(i, p) for i, p in enumerate(body["prompt"])]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

            def log_message(self, *args):
                pass

        self.model, self.requests = model, []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"

    @torch.no_grad()
    def choice(self, index, ids):
        logp = torch.log_softmax(self.model(torch.tensor([ids])).logits[0].float(), -1)
        lps = [None] + [logp[i - 1, ids[i]].item() for i in range(1, len(ids))] + [logp[-1].max().item()]
        top = [None] + [{"t": logp[i - 1].max().item()} for i in range(1, len(ids) + 1)]
        return {"index": index, "text": "", "logprobs": {"token_logprobs": lps, "top_logprobs": top}}

    def close(self):
        self.server.shutdown()
        self.server.server_close()


def test_served_path_sends_token_ids_and_scores_their_logprobs(three_paths, data_dir):
    from loaq.models import load_model
    from loaq.zeroshot import served_lm

    paths, d = three_paths
    model, tok = load_model(str(d / "fp"))[:2]
    stub = _Stub(model)
    try:
        out = d / "served.json"
        assert main(["-q", "eval", "--server", stub.url, "--served-model", "tiny", "--tokenizer", str(d / "fp"),
                     "--tasks", "bb_goal_inference", "--tasks-dir", data_dir, "--json", str(out)]) == 0
        served = evaluate_tasks(served_lm(stub.url, "tiny", str(d / "fp")), ["bb_goal_inference"], data_dir=data_dir)
    finally:
        stub.close()
    local = evaluate_tasks(hf_lm(model, tok), ["bb_goal_inference"], data_dir=data_dir)
    req = stub.requests[0]
    assert req["model"] == "tiny" and req["echo"] is True and isinstance(req["prompt"][0][0], int)
    assert torch.allclose(torch.tensor(served["loglikelihoods"]["bb_goal_inference"]),
                          torch.tensor(local["loglikelihoods"]["bb_goal_inference"]), atol=1e-4)
    assert json.load(open(out))["zero_shot"]["tasks"] == served["tasks"] == local["tasks"]
    assert json.load(open(out))["ppl"] is None
