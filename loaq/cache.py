"""The one on-disk cache directory of loaq: ``$LOAQ_CACHE`` (default ``~/.cache/loaq``).

Tokenized calibration text (:mod:`loaq.data`) and the built CPU kernel library (:mod:`loaq.kernels.cpu`)
live here; both are keyed by a content hash, so deleting the directory only costs a rebuild.
"""

from __future__ import annotations

import os

ENV = "LOAQ_CACHE"


def cache_dir() -> str:
    """``$LOAQ_CACHE`` or ``~/.cache/loaq``, created on first use."""
    d = os.environ.get(ENV) or os.path.join(os.path.expanduser("~"), ".cache", "loaq")
    os.makedirs(d, exist_ok=True)
    return d
