"""The two ``pack-quantized`` bit layouts of compressed-tensors, read and written in pure torch.

Every code is stored unsigned, ``u = q + 2**(bits-1)``, little end first, and ``weight_zero_point`` of
an asymmetric channel/group grid is packed the same way along the *output* dim (dim 0, one column per
group). The versions differ in where code ``i`` of a row goes:

``words`` (compressed-tensors <= 0.17.x; every LoaQ export)
    ``pf = 32 // bits`` codes per int32 word: code ``i`` at bit ``(i % pf) * bits`` of word ``i // pf``.
    No code straddles two words; ``32 - pf * bits`` high bits of every word stay zero (3 bits: 10 codes
    per word, 2 bits unused). ``n`` codes take ``ceil(n / pf)`` words.
``dense`` (compressed-tensors 0.18.0 to 0.20.x; llm-compressor 0.14 writes it)
    One bit stream: code ``i`` at bit ``i * bits`` of the row, i.e. bit ``(i * bits) % 32`` of word
    ``(i * bits) // 32``, its high bits spilling into the next word when it straddles. ``n`` codes take
    ``ceil(n * bits / 32)`` words; only the last word has unused (zero) high bits.

For 1, 2, 4 and 8 bits (``bits`` divides 32) the two are the same bits. For 3 (and 5, 6, 7) bits they
differ in the word count and in every word after the first straddle: an [N, K] 3-bit asymmetric per
channel layer has ``weight_packed`` [N, ceil(K/10)] and ``weight_zero_point`` [ceil(N/10), 1] in the
``words`` layout but [N, ceil(3K/32)] and [ceil(3N/32), 1] in the ``dense`` one (N = 576: 58 against
54 zero-point rows; 0.17 reads 54 rows as 540 zero points). Both record ``format: pack-quantized``;
only ``quantization_config.version`` (the compressed-tensors version that saved it) tells them apart,
so :func:`layout_of` maps it and refuses a version it does not know, or a missing one, when it matters.

Eleven 3-bit codes all 7 (``u = 0b111``), one row::

    words: [0b00111111111111111111111111111111, 0b111]  = [1073741823, 7]   codes 0-9 | code 10
    dense: [0b11111111111111111111111111111111, 0b1]    = [-1, 1]           codes 0-9 and 2 bits of 10 | its top bit

    >>> pack(torch.full((1, 11), 3, dtype=torch.int8), 3, WORDS)
    tensor([[1073741823,          7]], dtype=torch.int32)
    >>> pack(torch.full((1, 11), 3, dtype=torch.int8), 3, DENSE)
    tensor([[-1,  1]], dtype=torch.int32)
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

import torch

from loaq.errors import LoaQError

__all__ = ["WORDS", "DENSE", "SUPPORTED", "layout_of", "library_layout", "packed_length", "pack", "unpack",
           "repack", "dequantize"]

WORDS, DENSE = "words", "dense"
# (first version, first version after) of each layout, compressed-tensors (major, minor).
_RANGES = {WORDS: ((0, 0), (0, 18)), DENSE: ((0, 18), (0, 21))}
SUPPORTED = "compressed-tensors <= 0.17.x (32 // bits codes per word) or 0.18.0-0.20.x (dense bit stream)"


def _minor(version: str | None) -> tuple[int, int] | None:
    m = re.match(r"(\d+)\.(\d+)", version or "")
    return (int(m[1]), int(m[2])) if m else None


def layout_of(version: str | None, bits: Iterable[int]) -> str:
    """The layout of a checkpoint saved by compressed-tensors ``version`` (``quantization_config.version``)
    whose groups use these code widths; the version matters only when a width does not divide 32."""
    odd = sorted({b for b in bits if 32 % b})
    if not odd:
        return WORDS  # the same bits as DENSE
    v = _minor(version)
    for layout, (lo, hi) in _RANGES.items():
        if v is not None and lo <= v < hi:
            return layout
    found = f"version {version}" if v else "no version" if version is None else f"version {version!r}"
    raise LoaQError(f"quantization_config records compressed-tensors {found}, so its {odd[0]}-bit packing is "
                    f"unknown; supported: {SUPPORTED} (re-save it with one of those)")


def library_layout() -> str:
    """The layout the installed compressed-tensors reads and writes."""
    from importlib.metadata import version

    return layout_of(version("compressed-tensors"), [3])


def _positions(n: int, bits: int, layout: str) -> tuple[torch.Tensor, torch.Tensor, int]:
    """(word, bit offset) of each of ``n`` codes, and the number of words."""
    i = torch.arange(n, dtype=torch.int64)
    if layout == WORDS:
        pf = 32 // bits
        return i // pf, (i % pf) * bits, math.ceil(n / pf)
    if layout == DENSE:
        return i * bits // 32, i * bits % 32, math.ceil(n * bits / 32)
    raise ValueError(f"unknown layout {layout!r}")


def packed_length(n: int, bits: int, layout: str) -> int:
    """int32 words that ``n`` codes take."""
    return _positions(n, bits, layout)[2]


def pack(q: torch.Tensor, bits: int, layout: str, dim: int = 1) -> torch.Tensor:
    """Signed int8 codes ``q`` [rows, n] -> int32 [rows, words], packed along ``dim`` (0: zero points)."""
    u = q.to(torch.int64) + 2 ** (bits - 1)
    u = u.t() if dim == 0 else u
    word, off, n_words = _positions(u.shape[1], bits, layout)
    acc = torch.zeros(u.shape[0], n_words + 1, dtype=torch.int64)
    acc.index_add_(1, word, u << off)  # disjoint bits: the sum is the bitwise or
    words = acc[:, :n_words] & 0xFFFFFFFF
    words[:, 1:] |= acc[:, :n_words - 1] >> 32  # a straddling code's high bits belong to the next word
    words = torch.where(words >= 2 ** 31, words - 2 ** 32, words).to(torch.int32)
    return words.t().contiguous() if dim == 0 else words


def unpack(packed: torch.Tensor, bits: int, n: int, layout: str, dim: int = 1) -> torch.Tensor:
    """The inverse of :func:`pack`: int32 words -> ``n`` signed int8 codes per row (per column for ``dim`` 0).
    Raises a one-line :class:`LoaQError` when ``packed`` does not have the layout's word count."""
    w = packed.t() if dim == 0 else packed
    word, off, n_words = _positions(n, bits, layout)
    if w.shape[1] != n_words:
        raise LoaQError(f"{n} {bits}-bit codes take {n_words} words in the {layout} layout, the tensor has "
                        f"{w.shape[1]}: its compressed-tensors version does not match its packing")
    w = torch.cat([w.to(torch.int64) & 0xFFFFFFFF, torch.zeros(w.shape[0], 1, dtype=torch.int64)], 1)
    u = ((w[:, word] | (w[:, word + 1] << 32)) >> off) & (2 ** bits - 1)
    q = (u - 2 ** (bits - 1)).to(torch.int8)
    return q.t().contiguous() if dim == 0 else q


def repack(packed: torch.Tensor, bits: int, n: int, src: str, dst: str, dim: int = 1) -> torch.Tensor:
    """``packed`` (``n`` codes per row, or per column for ``dim`` 0) from layout ``src`` to layout ``dst``."""
    return packed if src == dst else pack(unpack(packed, bits, n, src, dim), bits, dst, dim)


def dequantize(local: dict[str, torch.Tensor], bits: int, group_size: int | None, symmetric: bool,
               layout: str) -> torch.Tensor:
    """One layer's dense weight from its ``weight_packed``/``weight_scale``/``weight_shape``[/
    ``weight_zero_point``], as compressed-tensors computes it, ``(q - z).to(scale.dtype) * scale``, but always in
    float32: float16 scales (``GridSpec.scale_dtype``) are read as the float32 numbers they are, so the product is
    exact and equals the native weight, where the library's float16 product would round it."""
    n, k = local["weight_shape"].tolist()
    scale = local["weight_scale"].float()
    q = unpack(local["weight_packed"], bits, k, layout)
    if symmetric:
        z = torch.zeros_like(scale, dtype=torch.int8)
    else:
        z = unpack(local["weight_zero_point"], bits, n, layout, dim=0)
    g = group_size or k
    idx = torch.arange(k) // g
    return (q.to(scale.dtype) - z[:, idx].to(scale.dtype)) * scale[:, idx]
