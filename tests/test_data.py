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


# --- calibration sources: CalibSource -> calibration_ids ---

CHAT_TEMPLATE = "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<eos>\n{% endfor %}"
CHATS = [[{"role": "user", "content": "The quick brown fox?"}, {"role": "assistant", "content": "Jumps over the dog."}],
         [{"role": "user", "content": "Quantization maps weights"}, {"role": "assistant", "content": "to a grid."}]]


@pytest.fixture
def tok(tmp_path, monkeypatch):
    """The tiny tokenizer with a chat template; loaq's and datasets' caches in tmp_path."""
    import datasets

    from tests.tiny import tiny_tokenizer

    monkeypatch.setenv("LOAQ_CACHE", str(tmp_path / "loaq-cache"))
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "ds-cache"))
    t = tiny_tokenizer()
    t.chat_template = CHAT_TEMPLATE
    return t


def _ids(tok, text):
    """The independent reference: the tokenizer itself, no special tokens added."""
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def _by_hand(chat):
    return "".join(f"<|{m['role']}|>{m['content']}<eos>\n" for m in chat)


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_calibration_ids_of_plain_sources_are_todays_ids(tmp_path, tok):
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_text("The quick brown fox.")
    (tmp_path / "d" / "b.txt").write_text("Layer-wise methods calibrate.")
    j = _jsonl(tmp_path / "t.jsonl", [{"text": "one grid"}, {"text": "two grids", "id": 2}])
    cases = {str(tmp_path / "d" / "a.txt"): "The quick brown fox.",
             str(tmp_path / "d"): "The quick brown fox.\n\nLayer-wise methods calibrate.",
             j: "one grid\n\ntwo grids"}
    for path, text in cases.items():
        ids = data.calibration_ids(data.CalibSource(path), tok)
        assert ids.dtype == torch.long and torch.equal(ids, _ids(tok, text)), path
        assert torch.equal(ids, data.tokenize(tok, data.read_text(path)))


def test_calibration_ids_of_the_default_corpus(tok, monkeypatch):
    asked = []
    monkeypatch.setattr(data, "default_split", lambda split: asked.append(split) or "Quantization maps weights.")
    assert torch.equal(data.calibration_ids(data.CalibSource(), tok), _ids(tok, "Quantization maps weights."))
    assert asked == ["calib"]


def test_chat_jsonl_is_rendered_with_the_chat_template(tmp_path, tok):
    j = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    want = _by_hand(CHATS[0]) + "\n\n" + _by_hand(CHATS[1])
    assert data.calibration_text(data.CalibSource(j), tok) == want
    assert torch.equal(data.calibration_ids(data.CalibSource(j), tok), _ids(tok, want))
    plain = data.calibration_text(data.CalibSource(j, chat=False), tok)
    assert plain == "The quick brown fox?\nJumps over the dog.\n\nQuantization maps weights\nto a grid."


def test_saved_dataset_split_and_field(tmp_path, tok):
    import datasets

    dd = datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": ["The quick fox.", "A small grid."], "conv": CHATS}),
        "test": datasets.Dataset.from_dict({"body": ["Held out."], "conv": CHATS[:1]})})
    dd.save_to_disk(str(tmp_path / "dd"))
    src = data.CalibSource(str(tmp_path / "dd"), split="test", field="body")
    assert torch.equal(data.calibration_ids(src, tok), _ids(tok, "Held out."))
    src = data.CalibSource(str(tmp_path / "dd"), field="conv")
    assert torch.equal(data.calibration_ids(src, tok), _ids(tok, _by_hand(CHATS[0]) + "\n\n" + _by_hand(CHATS[1])))
    datasets.Dataset.from_dict({"text": ["Alone."]}).save_to_disk(str(tmp_path / "one"))
    assert torch.equal(data.calibration_ids(data.CalibSource(str(tmp_path / "one")), tok), _ids(tok, "Alone."))


def test_parquet_and_csv_data_files(tmp_path, tok):
    import datasets

    ds = datasets.Dataset.from_dict({"id": [1, 2], "content": ["Weights to a grid.", "One layer at a time."]})
    ds.to_parquet(str(tmp_path / "c.parquet"))
    ds.to_csv(str(tmp_path / "c.csv"), index=False)
    for name in ("c.parquet", "c.csv"):
        src = data.CalibSource(str(tmp_path / name), field="content")
        assert torch.equal(data.calibration_ids(src, tok), _ids(tok, "Weights to a grid.\n\nOne layer at a time.")), name


def test_calibration_source_errors_are_one_line(tmp_path, tok):
    import datasets

    datasets.DatasetDict({"train": datasets.Dataset.from_dict({"body": ["x"]}),
                          "validation": datasets.Dataset.from_dict({"body": ["y"]})}).save_to_disk(str(tmp_path / "dd"))
    datasets.Dataset.from_dict({"text": []}, features=datasets.Features({"text": datasets.Value("string")})) \
        .to_parquet(str(tmp_path / "empty.parquet"))
    (tmp_path / "bad.csv").write_bytes(b"a,b\n1,2,3,4\n\x00\xff\n")
    (tmp_path / "a.txt").write_text("text")
    (tmp_path / "blank.jsonl").write_text("\n")
    chat = _jsonl(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    cases = [
        (data.CalibSource(str(tmp_path / "dd"), split="test"), r"split 'test' is not in .*available: train, validation"),
        (data.CalibSource(str(tmp_path / "dd")), r"no 'text' or 'messages' column; columns: body; .*--calib-field"),
        (data.CalibSource(str(tmp_path / "dd"), field="txt"), r"field 'txt' is not in .*columns: body"),
        (data.CalibSource(chat, split="validation"), r"split 'validation' is not in .*available: train"),
        (data.CalibSource(str(tmp_path / "empty.parquet")), r"datasets could not read .*empty.parquet.*no data"),
        (data.CalibSource(_jsonl(tmp_path / "e.jsonl", [{"text": ""}])), r"holds no text in split 'train'"),
        (data.CalibSource(str(tmp_path / "bad.csv")), r"datasets could not read .*bad.csv"),
        (data.CalibSource(str(tmp_path / "blank.jsonl")), r"is empty"),
        (data.CalibSource(str(tmp_path / "a.txt"), field="text"), r"--calib-field apply only to row sources"),
        (data.CalibSource(split="test"), r"--calib-split apply only to row sources .*the default corpus"),
        (data.CalibSource(str(tmp_path / "nope.parquet")), r"does not exist"),
        (data.CalibSource(chat, field="messages", chat=True), None),
    ]
    for src, pattern in cases[:-1]:
        with pytest.raises(LoaQError, match=pattern) as e:
            data.calibration_ids(src, tok)
        assert "\n" not in str(e.value), pattern
    _jsonl(tmp_path / "mixed.jsonl", [{"messages": CHATS[0]}, {"messages": "plain"}])
    with pytest.raises(LoaQError, match=r"mixed.jsonl:2: field 'messages' is not a list of \{role, content\}"):
        data.calibration_ids(data.CalibSource(str(tmp_path / "mixed.jsonl")), tok)
    tok.chat_template = None
    with pytest.raises(LoaQError, match=r"tokenizer has no chat template.*chat=False"):
        data.calibration_ids(data.CalibSource(chat), tok)
