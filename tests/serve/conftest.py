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
