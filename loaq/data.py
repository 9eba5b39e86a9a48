"""Calibration and evaluation text: sources, tokenization (cached), and token windows.

Plain sources: a text file, a directory of ``*.txt`` files, or a JSONL file with a ``text`` field
(:func:`read_text`). Row sources, for calibration (:class:`CalibSource`, :func:`calibration_ids`): a ``.jsonl``
file with any field, a data file read by ``datasets`` (``.parquet``, ``.csv``, ``.json``, ``.arrow``) or a
dataset directory written by ``save_to_disk``; a field of chat messages is rendered with the tokenizer's
chat template. The default corpus is the Wikipedia sample shipped in gensim's test data (DATA.md §2): its first 80
articles are the calibration split, the last 26 the evaluation split. ``loaq search`` holds out the
tail of the calibration split, so α/β are never chosen on evaluation text.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import importlib.util
import io
import json
import os
import re
from collections.abc import Callable
from dataclasses import dataclass

import torch

from loaq.cache import cache_dir
from loaq.errors import LoaQError

WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
N_CALIB_ARTICLES = 80
BUILDERS = {".parquet": "parquet", ".csv": "csv", ".json": "json", ".arrow": "arrow"}  # data file -> datasets builder
ROW_SOURCES = ".jsonl, .parquet, .csv, .json, .arrow or a dataset saved with save_to_disk"
_TAIL = re.compile(r"^==\s*(See also|References|Notes|Footnotes|Citations|Further reading|External links"
                   r"|Bibliography|Sources)\s*==\s*$", re.M | re.I)


def _clean(raw: str) -> str:
    from gensim.corpora.wikicorpus import filter_wiki

    t = filter_wiki(raw).replace("'''", "").replace("''", "")
    m = _TAIL.search(t)
    t = t[: m.start()] if m else t
    lines = [ln.strip() for ln in t.splitlines() if not ln.strip().startswith(("File:", "Image:"))]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def wiki_articles() -> list[str]:
    """The 106 non-redirect articles of gensim's Wikipedia test dump, in file order."""
    spec = importlib.util.find_spec("gensim")
    if spec is None:
        raise LoaQError("default corpus missing: run `pip install gensim==4.4.0` or pass --calib PATH")
    from gensim.corpora.wikicorpus import extract_pages

    path = os.path.join(spec.submodule_search_locations[0], "test", "test_data", WIKI)
    with bz2.open(path) as fh:
        return [_clean(r) for _, r, _ in extract_pages(fh) if not r.lstrip().lower().startswith("#redirect")]


def default_split(split: str) -> str:
    arts = wiki_articles()
    return "\n\n".join(arts[:N_CALIB_ARTICLES] if split == "calib" else arts[N_CALIB_ARTICLES:])


def read_utf8(path: str) -> str:
    """The text of file ``path``; a file that is not UTF-8 text (binary, another encoding) is refused in one line."""
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except UnicodeDecodeError as e:
        raise LoaQError(f"{path!r} is not UTF-8 text (byte {e.start}: {e.reason}); convert it to UTF-8 or pass "
                        "another text file") from None
    except OSError as e:
        raise LoaQError(f"cannot read {path!r} ({e.strerror}); check the file and its permissions") from None


def _lines(path: str):
    """(line number, line) of a UTF-8 text file, lines split as a text-mode file splits them."""
    return enumerate(io.StringIO(read_utf8(path), newline=None), 1)


def read_text(path: str) -> str:
    """Text of a file, a directory of ``*.txt`` files, or a ``.jsonl`` file with a ``text`` field."""
    if not os.path.exists(path):
        raise LoaQError(f"calibration path {path!r} does not exist; pass a .txt file, a directory of .txt files or a .jsonl file")
    if os.path.isdir(path):
        files = sorted(f for f in glob.glob(os.path.join(path, "**", "*.txt"), recursive=True) if os.path.isfile(f))
        if not files:
            raise LoaQError(f"directory {path!r} holds no .txt files; put the calibration text in *.txt files")
        text = "\n\n".join(read_utf8(f) for f in files)
    elif path.endswith(".jsonl"):
        docs = []
        for i, line in _lines(path):
            if not line.strip():
                continue
            try:
                docs.append(json.loads(line)["text"])
            except (json.JSONDecodeError, KeyError, TypeError):
                raise LoaQError(f"{path}:{i} is not a JSON object with a 'text' field; fix that line") from None
            if not isinstance(docs[-1], str):
                raise LoaQError(f"{path}:{i} has a 'text' field that is not a string; fix that line")
        text = "\n\n".join(docs)
    else:
        text = read_utf8(path)
    if not text.strip():
        raise LoaQError(f"calibration source {path!r} is empty; give it some text")
    return text


def tokenize(tokenizer, text: str) -> torch.Tensor:
    """Token ids of ``text`` (1-D LongTensor), cached by text and tokenizer vocabulary."""
    vocab = json.dumps(sorted(tokenizer.get_vocab().items())[:: max(1, len(tokenizer) // 4096)])
    key = hashlib.sha256((vocab + "\0" + text).encode()).hexdigest()[:24]
    path = os.path.join(cache_dir(), f"tokens-{key}.pt")
    if os.path.exists(path):
        return torch.load(path)
    ids = torch.tensor(tokenizer(text, add_special_tokens=False)["input_ids"], dtype=torch.long)
    tmp = f"{path}.{os.getpid()}.tmp"
    torch.save(ids, tmp)
    os.replace(tmp, path)
    return ids


def split_tokens(ids: torch.Tensor, holdout: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration part, held-out tail) of a token stream; ``holdout`` is the tail's fraction."""
    cut = int(len(ids) * (1 - holdout))
    return ids[:cut], ids[cut:]


def random_windows(ids: torch.Tensor, nsamples: int, seqlen: int, seed: int = 0) -> torch.Tensor:
    """``nsamples`` windows of ``seqlen`` tokens at random offsets drawn with a fixed seed -> [n, L]."""
    if len(ids) <= seqlen:
        raise LoaQError(f"calibration text has {len(ids)} tokens, fewer than --seqlen {seqlen}; give more text or lower --seqlen")
    g = torch.Generator().manual_seed(seed)
    starts = torch.randint(0, len(ids) - seqlen, (nsamples,), generator=g)
    return torch.stack([ids[s : s + seqlen] for s in starts.tolist()])


def eval_windows(ids: torch.Tensor, seqlen: int, max_tokens: int | None) -> torch.Tensor:
    """Non-overlapping windows over the first ``max_tokens`` tokens (GPTQ's perplexity protocol) -> [n, L]."""
    if max_tokens:
        ids = ids[:max_tokens]
    n = len(ids) // seqlen
    if n == 0:
        raise LoaQError(f"evaluation text has {len(ids)} tokens, fewer than one window of {seqlen}")
    return ids[: n * seqlen].reshape(n, seqlen)


@dataclass(frozen=True)
class CalibSource:
    """Where calibration text comes from.

    ``path``: None for the default corpus's calibration split, a plain source (see :func:`read_text`) or a
    row source (``.jsonl``, ``.parquet``, ``.csv``, ``.json``, ``.arrow``, a ``save_to_disk`` directory).
    ``split``: the dataset split (a data file has only ``train``). ``field``: the column holding text or chat
    messages; None takes ``text``, else ``messages``. ``chat``: None renders a column of messages (lists of
    ``{role, content}``) with the tokenizer's chat template; False joins their contents as plain text instead.
    ``split``, ``field`` and ``chat`` apply to row sources only.
    """

    path: str | None = None
    split: str = "train"
    field: str | None = None
    chat: bool | None = None


def calibration_ids(source: CalibSource, tokenizer) -> torch.Tensor:
    """Token ids (1-D LongTensor) of ``source``: :func:`tokenize` of :func:`calibration_text`.

    Plain sources and the default corpus give exactly the ids of ``tokenize(tokenizer, read_text(path))`` and
    ``tokenize(tokenizer, default_split("calib"))``; a ``.jsonl`` of ``text`` lines joins them as read_text does.
    """
    return tokenize(tokenizer, calibration_text(source, tokenizer))


def calibration_text(source: CalibSource, tokenizer) -> str:
    r"""The calibration text of ``source``, before tokenization.

    1. No path: the default corpus's calibration split; a plain source: :func:`read_text`.
    2. A row source: the rows of ``source.split``, then the values of ``source.field``.
    3. Text values are joined with a blank line (``"\n\n"``).
    4. Chat values (lists of ``{role, content}``): each conversation is rendered by
       ``tokenizer.apply_chat_template(messages, tokenize=False)`` and the renderings are joined with ``"\n\n"``;
       :func:`tokenize` adds no special tokens, since the template writes its own. With ``chat=False`` each
       conversation is its message contents joined with ``"\n"``.
    """
    path = source.path
    if path is not None:
        check_source(path)
    if path is None or not _is_row_source(path):
        _refuse_row_options(source)
        return default_split("calib") if path is None else read_text(path)
    field, values, where = _column(source)
    chat = source.chat if source.chat is not None else _is_messages(values[0])
    if chat and not getattr(tokenizer, "chat_template", None):
        raise LoaQError(f"the tokenizer has no chat template, so the chat messages in {path!r} cannot be rendered; "
                        "use a model with a chat template, or pass --no-chat (chat=False) to calibrate on the message contents "
                        "as plain text")
    if chat:
        text = _render_chats(tokenizer, values, where, field)
    else:
        text = "\n\n".join(_plain(v, where(i), field) for i, v in enumerate(values))
    if not text.strip():
        raise LoaQError(f"calibration source {path!r} holds no text in split {source.split!r}; give it some text")
    return text


def check_source(path: str) -> None:
    """Refuse a calibration path that does not exist (before any weight loads)."""
    if not os.path.exists(path):
        raise LoaQError(f"calibration path {path!r} does not exist; pass a .txt file, a directory of .txt files "
                        f"or a {ROW_SOURCES}")


def _is_row_source(path: str) -> bool:
    ext = os.path.splitext(path)[1].lower()
    if os.path.isdir(path):
        return any(os.path.isfile(os.path.join(path, f)) for f in ("dataset_dict.json", "state.json"))
    return ext == ".jsonl" or ext in BUILDERS


def _refuse_row_options(source: CalibSource) -> None:
    given = [n for n, on in (("--calib-split", source.split != "train"), ("--calib-field", source.field is not None),
                             ("chat", source.chat is not None)) if on]
    if given:
        what = repr(source.path) if source.path else "the default corpus"
        raise LoaQError(f"{'/'.join(given)} apply only to row sources ({ROW_SOURCES}); {what} is plain text, so "
                        "drop them")


def _column(source: CalibSource) -> tuple[str, list, Callable[[int], str]]:
    """(chosen field, its values, row index -> the row's place for messages) of a row source."""
    path = source.path
    if path.lower().endswith(".jsonl"):
        _check_split(path, source.split, ["train"])
        rows = _jsonl_rows(path)
        if not rows:
            raise LoaQError(f"calibration source {path!r} is empty; give it some rows")
        field = _field(source, list(dict.fromkeys(k for _, r in rows for k in r)))
        missing = next((line for line, r in rows if field not in r), None)
        if missing is not None:
            raise LoaQError(f"{path}:{missing} has no {field!r} field; fix that line or pick another --calib-field")
        values, where = [r[field] for _, r in rows], lambda i: f"{path}:{rows[i][0]}"
    else:
        ds = _dataset(path, source.split)
        field = _field(source, ds.column_names)
        values, where = ds.select_columns([field]).to_dict()[field], lambda i: f"{path} ({source.split} row {i})"
    if not values:
        raise LoaQError(f"calibration source {path!r} has no rows in split {source.split!r}; give it some rows")
    return field, values, where


def _jsonl_rows(path: str) -> list[tuple[int, dict]]:
    """(line number, object) of each non-blank line of a JSONL file."""
    rows = []
    for i, line in _lines(path):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if not isinstance(row, dict):
            raise LoaQError(f"{path}:{i} is not a JSON object; fix that line")
        rows.append((i, row))
    return rows


def _dataset(path: str, split: str):
    """Split ``split`` of a ``save_to_disk`` directory or of a data file, read by ``datasets``."""
    try:
        import datasets
    except ImportError:
        raise LoaQError(f"reading {path!r} needs the datasets package; run `pip install datasets`") from None
    try:
        if os.path.isdir(path):
            ds = datasets.load_from_disk(path)
        else:
            ds = datasets.load_dataset(BUILDERS[os.path.splitext(path)[1].lower()], data_files=path)
    except Exception as e:  # whatever datasets raises on a file it cannot read: the file is the problem
        first = (str(e).strip().splitlines() or [""])[0][:200]
        raise LoaQError(f"datasets could not read {path!r} ({type(e).__name__}: {first}); check the file, or pass "
                        f"another {ROW_SOURCES}") from None
    if isinstance(ds, datasets.DatasetDict):
        _check_split(path, split, list(ds))
        return ds[split]
    _check_split(path, split, [str(ds.split) if ds.split is not None else "train"])
    return ds


def _check_split(path: str, split: str, available: list[str]) -> None:
    if split not in available:
        raise LoaQError(f"split {split!r} is not in {path!r}; available: {', '.join(available)}; pass one with "
                        "--calib-split")


def _field(source: CalibSource, columns: list[str]) -> str:
    if source.field is not None:
        if source.field not in columns:
            raise LoaQError(f"field {source.field!r} is not in {source.path!r}; columns: {', '.join(columns)}; pass "
                            "one with --calib-field")
        return source.field
    for name in ("text", "messages"):
        if name in columns:
            return name
    raise LoaQError(f"{source.path!r} has no 'text' or 'messages' column; columns: {', '.join(columns)}; pass the "
                    "one to calibrate on with --calib-field")


def _is_messages(value) -> bool:
    return (isinstance(value, list) and len(value) > 0
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in value))


def _plain(value, where: str, field: str) -> str:
    if isinstance(value, str):
        return value
    if _is_messages(value):
        return "\n".join(m["content"] for m in value)
    raise LoaQError(f"{where}: field {field!r} holds a {type(value).__name__}, not text or a list of "
                    "{role, content} messages; fix that row or pick another --calib-field")


def _render_chats(tokenizer, values: list, where: Callable[[int], str], field: str) -> str:
    """Each conversation rendered by the tokenizer's chat template, joined with a blank line."""
    from jinja2 import TemplateError

    texts = []
    for i, messages in enumerate(values):
        if not _is_messages(messages):
            raise LoaQError(f"{where(i)}: field {field!r} is not a list of {{role, content}} "
                            "messages; fix that row, or pick a text field with --calib-field")
        try:
            texts.append(tokenizer.apply_chat_template(messages, tokenize=False))
        except TemplateError as e:
            raise LoaQError(f"{where(i)}: the chat template rejects this conversation ({e}); fix that row") from None
    return "\n\n".join(texts)
