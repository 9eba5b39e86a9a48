"""Calibration and evaluation text: sources, tokenization (cached), and token windows.

Sources: a plain text file, a directory of ``*.txt`` files, or a JSONL file with a ``text`` field.
The default corpus is the Wikipedia sample shipped in gensim's test data (DATA.md §2): its first 80
articles are the calibration split, the last 26 the evaluation split. ``loaq search`` holds out the
tail of the calibration split, so α/β are never chosen on evaluation text.
"""

from __future__ import annotations

import bz2
import glob
import hashlib
import importlib.util
import json
import os
import re

import torch

from loaq.cache import cache_dir
from loaq.errors import LoaQError

WIKI = "enwiki-latest-pages-articles1.xml-p000000010p000030302-shortened.bz2"
N_CALIB_ARTICLES = 80
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


def read_text(path: str) -> str:
    """Text of a file, a directory of ``*.txt`` files, or a ``.jsonl`` file with a ``text`` field."""
    if not os.path.exists(path):
        raise LoaQError(f"calibration path {path!r} does not exist; pass a .txt file, a directory of .txt files or a .jsonl file")
    if os.path.isdir(path):
        files = sorted(glob.glob(os.path.join(path, "**", "*.txt"), recursive=True))
        if not files:
            raise LoaQError(f"directory {path!r} holds no .txt files; put the calibration text in *.txt files")
        text = "\n\n".join(open(f, encoding="utf-8").read() for f in files)
    elif path.endswith(".jsonl"):
        docs = []
        with open(path, encoding="utf-8") as fh:
            for i, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    docs.append(json.loads(line)["text"])
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise LoaQError(f"{path}:{i} is not a JSON object with a 'text' field; fix that line") from None
        text = "\n\n".join(docs)
    else:
        text = open(path, encoding="utf-8").read()
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


# --- TEMPORARY until the inputs branch lands ---
from dataclasses import dataclass as _dc


@_dc(frozen=True)
class CalibSource:
    path: str | None = None
    split: str = "train"
    field: str | None = None
    chat: bool | None = None


def check_source(path: str) -> None:
    if not os.path.exists(path):
        raise LoaQError(f"calibration path {path!r} does not exist; pass a .txt file, a directory of .txt files or a .jsonl file")


def calibration_ids(source: CalibSource, tokenizer) -> torch.Tensor:
    return tokenize(tokenizer, read_text(source.path) if source.path else default_split("calib"))
