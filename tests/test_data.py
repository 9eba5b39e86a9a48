import json

import pytest
import torch

from loaq import data
from loaq.errors import LoaQError


def test_text_sources(tmp_path):
    (tmp_path / "a.txt").write_text("first file")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("second file")
    assert data.read_text(str(tmp_path)) == "first file\n\nsecond file"
    j = tmp_path / "c.jsonl"
    j.write_text(json.dumps({"text": "one"}) + "\n\n" + json.dumps({"text": "two", "id": 2}) + "\n")
    assert data.read_text(str(j)) == "one\n\ntwo"
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"body": "x"}\n')
    with pytest.raises(LoaQError, match="bad.jsonl:1 .*'text'"):
        data.read_text(str(bad))


def test_random_windows_are_seeded_and_in_range():
    ids = torch.arange(1000)
    a, b, c = data.random_windows(ids, 8, 64, 0), data.random_windows(ids, 8, 64, 0), data.random_windows(ids, 8, 64, 1)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert a.shape == (8, 64) and torch.all(a[:, 1:] - a[:, :-1] == 1)  # contiguous windows of the stream
    with pytest.raises(LoaQError, match="fewer than --seqlen"):
        data.random_windows(ids[:10], 2, 64)


def test_eval_windows_and_holdout_split():
    ids = torch.arange(1030)
    w = data.eval_windows(ids, 100, 512)
    assert w.shape == (5, 100) and torch.equal(w.flatten(), torch.arange(500))
    calib, held = data.split_tokens(ids, 0.1)
    assert len(held) == 103 and torch.equal(torch.cat([calib, held]), ids)


def test_tokenization_is_cached(tmp_path, monkeypatch):
    from tests.tiny import TEXT, tiny_tokenizer

    monkeypatch.setenv("LOAQ_CACHE", str(tmp_path))
    tok = tiny_tokenizer()
    ids = data.tokenize(tok, TEXT)
    assert len(list(tmp_path.glob("tokens-*.pt"))) == 1
    calls = []
    monkeypatch.setattr(type(tok), "__call__", lambda *a, **k: calls.append(1))
    assert torch.equal(data.tokenize(tok, TEXT), ids) and not calls


def test_default_corpus_splits_match_data_md():
    calib, ev = data.default_split("calib"), data.default_split("eval")
    assert len(calib) == 2_180_676 and len(ev) == 770_192
