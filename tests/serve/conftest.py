"""Fixtures of the serving tests: the tiny all-variant export, one in-process vLLM engine, one real server."""

import os

import pytest

from tests.serve.checkpoints import build


@pytest.fixture(scope="session")
def tiny_exports(tmp_path_factory):
    """{w4a4: (export dir, native dir)} of the tiny float32 checkpoints: every variant (True), weight-only (False)."""
    out = {}
    for w4a4 in (True, False):
        root = str(tmp_path_factory.mktemp("serve"))
        out[w4a4] = (build(root, w4a4), os.path.join(root, "native"))
    return out


@pytest.fixture(scope="session")
def server(tiny_exports):
    """One real vLLM OpenAI server on 127.0.0.1 (free port) serving the all-variant export; always stopped."""
    from loaq.serve.server import Server

    # float32 like the tiny checkpoint (vLLM on CPU would otherwise pick bf16): the served model can then be
    # compared with the local references closely
    srv = Server(tiny_exports[True][0], name="tiny", max_model_len=512, max_num_seqs=32, extra=["--dtype", "float32"])
    try:
        srv.start(timeout=600)
        yield srv
    finally:
        rc = srv.stop()
        assert srv.proc.poll() is not None, f"server still running after stop (status {rc})"
