"""Tensor-parallel shards of ``pack-quantized`` tensors and of the online R4, in pure torch.

vLLM splits a column-parallel linear (q/k/v, gate/up) along its outputs N and a row-parallel one (o, down)
along its inputs K; every rank allocates its slice and the weight loader hands it the whole checkpoint
tensor (one fused shard of it). These functions cut that slice (:mod:`loaq.export.layouts` for the bits):

- column-parallel: ``weight_packed`` and ``weight_scale`` rows ``[start, start + n)``; ``weight_zero_point``
  is packed along N too (``32 // bits`` outputs per word), so its words are split on word boundaries when
  the slice starts and ends on one, else unpacked, cut and re-packed (:func:`packed_slice`);
- row-parallel: ``weight_packed`` columns: codes ``[start, start + k)`` of every row, the same way (2/4-bit
  shards of real models fall on word boundaries; 3-bit's 10 codes per word rarely do, e.g. 1536 / 2 = 768,
  so those rows are re-packed once at load; a checkpoint in the dense layout always is); ``weight_scale``
  and ``weight_zero_point`` columns: the rank's groups, which must not straddle ranks (:func:`check_row_split`);
  per-channel ones are replicated.

The online R4 of ``down_proj`` reads ``x (had_k ⊗ H_{n/K})ᵀ / √n`` over the whole input; a rank holds
inputs ``[r n/t, (r + 1) n/t)``, i.e. rows ``[r K/t, (r + 1) K/t)`` of ``had_k``. When ``had_k`` is
block-diagonal with ``t`` blocks (``--r4-blocks``, :func:`loaq.hadamard.block_diagonal`), rank ``r`` applies
its block ``B_r / √t`` to its slice with no communication (:func:`local_had_k`); otherwise serving with TP
is refused. W4A4 activations are quantized per token over the rank's slice of K (one scale per token per
shard, a finer grid than TP=1's; see README: Serving).
"""

from __future__ import annotations

import math

import torch

from loaq.errors import LoaQError
from loaq.export import layouts
from loaq.hadamard import blocks_of

__all__ = ["packed_slice", "group_slice", "check_row_split", "valid_tp_sizes", "local_had_k"]


def packed_slice(packed: torch.Tensor, bits: int, n: int, start: int, size: int, layout: str,
                 dim: int = 1) -> torch.Tensor:
    """Codes ``[start, start + size)`` of ``packed`` (``n`` codes per row, or per column for ``dim`` 0),
    packed in ``layout``: whole words when the cut falls on word boundaries, else unpacked and re-packed."""
    pf = 32 // bits
    if layout == layouts.WORDS and start % pf == 0 and (size % pf == 0 or start + size == n):
        return packed.narrow(dim, start // pf, math.ceil(size / pf)).contiguous()
    codes = layouts.unpack(packed, bits, n, layout, dim).narrow(dim, start, size)
    return layouts.pack(codes, bits, layout, dim)


def group_slice(t: torch.Tensor, group_size: int | None, start: int, size: int) -> torch.Tensor:
    """Columns of a [rows, groups] scale/zero tensor that cover inputs ``[start, start + size)``
    (all of them for per-channel: replicated on every rank)."""
    if group_size is None:
        return t
    return t.narrow(1, start // group_size, math.ceil(size / group_size)).contiguous()


def valid_tp_sizes(k: int, group_size: int | None) -> list[int]:
    """Tensor-parallel sizes that split ``k`` inputs on group boundaries."""
    unit = group_size or 1
    return [t for t in range(1, k // unit + 1) if k % t == 0 and (k // t) % unit == 0]


def check_row_split(name: str, k: int, tp: int, group_size: int | None) -> None:
    """Refuse a row-parallel split of ``k`` inputs whose groups would straddle two ranks."""
    if k % tp or (group_size and (k // tp) % group_size):
        sizes = ", ".join(map(str, valid_tp_sizes(k, group_size)))
        raise LoaQError(f"{name}: {k} inputs in groups of {group_size} cannot be split over {tp} tensor-parallel "
                        f"ranks on group boundaries; use --tensor-parallel-size in {{{sizes}}}")


def local_had_k(name: str, had_k: torch.Tensor | None, tp: int, rank: int) -> torch.Tensor | None:
    """Rank ``rank``'s R4 factor on its ``n / tp`` inputs: ``B_r / √tp`` for a ``had_k`` block-diagonal in
    ``tp`` blocks (None when that is ``[[1]]``; inputs of rank ``r`` are rows ``[r K/tp, (r + 1) K/tp)`` of the
    ``[K, n/K]`` view); refuses, in one line, an R4 that mixes the ranks' inputs."""
    if tp == 1:
        return had_k
    blocks = blocks_of(had_k)
    if blocks % tp:
        raise LoaQError(f"{name}: the online R4 has {blocks} block(s), so it mixes inputs across {tp} "
                        f"tensor-parallel ranks; re-quantize with --r4-blocks N, N a multiple of {tp}, "
                        f"or serve with --tensor-parallel-size dividing {blocks}")
    K = had_k.shape[0]
    b = K // tp
    local = had_k[rank * b:(rank + 1) * b, rank * b:(rank + 1) * b] / math.sqrt(tp)
    if b == 1:
        if not torch.allclose(local, torch.ones(1, 1), atol=1e-5):
            raise LoaQError(f"{name}: R4 block {rank} is {local.item()}, not 1; re-export with `loaq-export`")
        return None
    return local.contiguous()
