"""``loaq_manifest.json``: the SHA-256 and size of every file an export writes, verified by ``--check``.

Written last, into the temporary output, so it describes exactly the files renamed into place::

    {"format": "loaq-export-manifest/1",
     "files": {"config.json": {"bytes": 2071, "sha256": "9f2c…"}, "model.safetensors": {...}, ...}}

Every file is listed except the manifest itself and ``README.md`` (the model card, which Hub users edit).
A flipped byte anywhere in a listed file changes its SHA-256; a truncated file changes its size. Decompressing
the layers cannot find more: the weights are a function of the hashed bytes, so rehashing is the deep check.
"""

from __future__ import annotations

import hashlib
import json
import os

from loaq.checkpoint import OWNER
from loaq.errors import LoaQError

MANIFEST = "loaq_manifest.json"
FORMAT = "loaq-export-manifest/1"
UNLISTED = {MANIFEST, "README.md", OWNER}


def sha256(path: str) -> str:
    with open(path, "rb") as fh:
        return hashlib.file_digest(fh, "sha256").hexdigest()


def write_manifest(out_dir: str) -> dict:
    """Hash every file under ``out_dir`` (but :data:`UNLISTED`) into ``out_dir/loaq_manifest.json``."""
    files = {}
    for dirpath, _, names in os.walk(out_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(dirpath, name), out_dir)
            if rel not in UNLISTED:
                p = os.path.join(out_dir, rel)
                files[rel] = {"bytes": os.path.getsize(p), "sha256": sha256(p)}
    manifest = {"format": FORMAT, "files": dict(sorted(files.items()))}
    with open(os.path.join(out_dir, MANIFEST), "w") as fh:
        json.dump(manifest, fh, indent=2)
    return manifest


def verify_manifest(out_dir: str) -> int | None:
    """Number of files that match ``out_dir``'s manifest (None: the export has none); a mismatch is a one-line
    :class:`LoaQError` naming the file."""
    path = os.path.join(out_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        manifest = json.load(open(path))
        files = manifest["files"]
        entries = [(rel, int(e["bytes"]), str(e["sha256"])) for rel, e in files.items()]
    except (ValueError, OSError, KeyError, TypeError, AttributeError):
        raise LoaQError(f"{path} is damaged (not a {FORMAT} manifest); export again or copy the export again") from None
    if manifest.get("format") != FORMAT:
        raise LoaQError(f"{path} is {manifest.get('format')!r}, not {FORMAT!r}; check it with the LoaQ that wrote it")
    for rel, size, digest in entries:
        p = os.path.join(out_dir, rel)
        if not os.path.isfile(p):
            raise LoaQError(f"{p} is missing (listed in {MANIFEST}); copy the export again")
        if os.path.getsize(p) != size:
            raise LoaQError(f"{p} is {os.path.getsize(p)} bytes, {MANIFEST} says {size}: truncated or damaged; "
                            "copy the export again")
        if sha256(p) != digest:
            raise LoaQError(f"{p} is corrupted (its SHA-256 differs from {MANIFEST}); copy the export again")
    return len(entries)
