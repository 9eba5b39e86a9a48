"""A real vLLM OpenAI server (``loaq serve``'s :class:`Server`) on the tiny all-variant export: completions,
chat, streaming, 32 concurrent requests, malformed requests answered 4xx with the server staying up."""

import json
import os
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import pytest

from loaq.errors import LoaQError


def client(server):
    import openai

    return openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)


def post(server, path, body: bytes):
    req = urllib.request.Request(server.url + path, data=body, headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=60) as r:
            return r.status, json.loads(r.read())
    except urllib.error.HTTPError as e:
        return e.code, e.read().decode(errors="replace")


GREEDY = dict(max_tokens=12, temperature=0, extra_body={"ignore_eos": True})


def test_models_lists_the_served_name(server):
    assert [m.id for m in client(server).models.list().data] == ["tiny"]


def test_completion_is_deterministic_and_full_length(server):
    c = client(server)
    a = c.completions.create(model="tiny", prompt="The quick brown fox", **GREEDY)
    b = c.completions.create(model="tiny", prompt="The quick brown fox", **GREEDY)
    assert a.usage.completion_tokens == 12 and a.choices[0].text and a.choices[0].text == b.choices[0].text


def test_chat_completion(server):
    r = client(server).chat.completions.create(model="tiny", messages=[{"role": "user", "content": "Quantize the dog."}],
                                               **GREEDY)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens == 12
    assert r.choices[0].message.content


def test_streaming_equals_the_whole_answer(server):
    c = client(server)
    whole = c.completions.create(model="tiny", prompt="Layer-wise methods", **GREEDY).choices[0].text
    chunks = [ch.choices[0].text for ch in c.completions.create(model="tiny", prompt="Layer-wise methods", stream=True,
                                                                 **GREEDY) if ch.choices]
    assert len(chunks) > 1 and "".join(chunks) == whole
    parts = [ch.choices[0].delta.content or "" for ch in c.chat.completions.create(
        model="tiny", messages=[{"role": "user", "content": "hi"}], stream=True, **GREEDY) if ch.choices]
    assert len(parts) > 1 and "".join(parts)


def test_32_concurrent_requests_all_answered(server):
    c = client(server)
    prompts = [f"The quick brown fox number {i}" for i in range(32)]
    with ThreadPoolExecutor(32) as pool:
        outs = list(pool.map(lambda p: c.completions.create(model="tiny", prompt=p, **GREEDY), prompts))
    assert [o.usage.completion_tokens for o in outs] == [12] * 32 and all(o.choices[0].text for o in outs)
    # Batching must not mix requests up: the first token's log-probability of a prompt alone matches its value
    # inside the batch of 32. Not exactly: M = 1 and M = 32 take different kernel paths, whose rounding can flip
    # a 4-bit activation code of the W4A4 layers (up to 0.3 nats measured in test_plugin), so greedy texts are
    # not compared; another request's row would be off by whole nats.
    one = dict(GREEDY, max_tokens=1, logprobs=1)
    solo = c.completions.create(model="tiny", prompt=prompts[5], **one).choices[0].logprobs.token_logprobs[0]
    with ThreadPoolExecutor(32) as pool:
        batch = list(pool.map(lambda p: c.completions.create(model="tiny", prompt=p, **one), prompts))
    assert abs(batch[5].choices[0].logprobs.token_logprobs[0] - solo) < 0.5


@pytest.mark.parametrize("path,body", [
    ("/v1/completions", b"{not json"),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "x", "max_tokens": -3}).encode()),
    ("/v1/completions", json.dumps({"model": "no-such-model", "prompt": "x"}).encode()),
    ("/v1/completions", json.dumps({"model": "tiny", "prompt": "fox " * 600, "max_tokens": 4}).encode()),
    ("/v1/chat/completions", json.dumps({"model": "tiny", "messages": "not a list"}).encode()),
])
def test_malformed_requests_get_4xx_and_the_server_stays_up(server, path, body):
    status, _ = post(server, path, body)
    assert 400 <= status < 500
    assert server.healthy() and server.proc.poll() is None
    ok, out = post(server, "/v1/completions", json.dumps({"model": "tiny", "prompt": "fox", "max_tokens": 2}).encode())
    assert ok == 200 and out["usage"]["completion_tokens"] >= 1


def test_a_server_that_cannot_start_reports_the_log(tmp_path):
    from loaq.serve.server import Server

    (tmp_path / "config.json").write_text("{}")
    srv = Server(str(tmp_path), max_model_len=64)
    with pytest.raises(LoaQError, match=r"exited with status 1 while starting \(.*model_type.*\); full log: "):
        srv.start(timeout=300)
    assert srv.proc.poll() is not None


def test_native_checkpoint_is_refused_with_the_fix(tiny_exports):
    from loaq.serve.server import check_model_dir

    with pytest.raises(LoaQError, match="export it first: loaq-export"):
        check_model_dir(tiny_exports[True][1])


def test_cli_serve_flags_and_vllm_args(tiny_exports, monkeypatch):
    import loaq.serve.server as srv
    from loaq.cli import main

    seen = {}
    monkeypatch.setattr(srv, "serve", lambda *args: seen.setdefault("args", args) and 0)
    assert main(["serve", tiny_exports[True][0], "--port", "8123", "--name", "t", "--", "--enforce-eager", "--port", "9"]) == 0
    model_dir, host, port, name, *_, extra = seen["args"]
    assert (model_dir, host, port, name, extra) == (tiny_exports[True][0], "127.0.0.1", 8123, "t",
                                                    ["--enforce-eager", "--port", "9"])


def test_cli_serve_refuses_a_missing_directory(tmp_path, capsys):
    from loaq.cli import main

    assert main(["serve", str(tmp_path / "nope")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "does not exist" in err and "\n" not in err


def test_serve_prints_the_url_and_stops_on_ctrl_c(monkeypatch, capsys):
    import loaq.serve.server as srv

    events = []

    class Proc:
        pid = 0

        def poll(self):
            raise KeyboardInterrupt  # Ctrl-C while serving

    class FakeServer:
        def __init__(self, *args):
            self.name, self.url, self.log_path, self.proc = "m", "http://127.0.0.1:1", "log", Proc()

        def start(self, timeout, progress):
            events.append("start")

        def stop(self):
            events.append("stop")
            return 0

    monkeypatch.setattr(srv, "Server", FakeServer)
    assert srv.serve("d", "127.0.0.1", 1, None, None, None, None, 10, []) == 0
    out = capsys.readouterr().out
    assert "serving 'm' at http://127.0.0.1:1/v1" in out and "server stopped" in out
    assert events[0] == "start" and "stop" in events


def test_an_interruption_while_launching_leaves_a_process_stop_can_stop(tmp_path, monkeypatch):
    """Ctrl-C landing while Popen returns (the child already runs): the KeyboardInterrupt comes once ``proc`` holds
    the child, so the caller's stop() stops it instead of leaving an orphan server."""
    import signal
    import subprocess

    import loaq.serve.server as server

    real = subprocess.Popen

    def popen(cmd, **kw):
        p = real(["sleep", "600"], **kw)
        os.kill(os.getpid(), signal.SIGINT)  # the interruption, before Popen's result is assigned
        return p

    (tmp_path / "config.json").write_text('{"max_position_embeddings": 64}')
    srv = server.Server(str(tmp_path), name="t")
    monkeypatch.setattr(server.subprocess, "Popen", popen)
    with pytest.raises(KeyboardInterrupt):
        srv.launch()
    monkeypatch.undo()
    assert srv.proc is not None
    srv.stop(timeout=5)
    assert srv.proc.poll() is not None
