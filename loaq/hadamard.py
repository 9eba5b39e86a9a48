"""Hadamard matrices of every order the supported models need, computed (no literal tables).

A Hadamard matrix ``H`` of order ``n`` has entries ±1 and ``H Hᵀ = n I``. Orders are built as
``had_k ⊗ H_{2^m}`` with ``H_{2^m}`` Sylvester's (natural order) and ``had_k`` the smallest factor
``K = n / 2^m`` that one of these constructions reaches:

- Sylvester: ``H_{2n} = [[H, H], [H, -H]]``;
- Paley I (order ``q + 1``, ``q`` prime, ``q ≡ 3 mod 4``): ``I + [[0, 1ᵀ], [-1, Q]]`` with ``Q`` the
  Jacobsthal matrix ``Q_ij = χ(j - i)`` (quadratic character mod ``q``), e.g. 12, 20, 24, 44, 48, 60;
- Paley II (order ``2(q + 1)``, ``q`` prime, ``q ≡ 1 mod 4``): the symmetric conference matrix
  ``C = [[0, 1ᵀ], [1, Q]]`` with ±1 entries replaced by ``±[[1, 1], [1, -1]]`` and zeros by
  ``[[1, -1], [-1, -1]]``, e.g. 28 (q = 13), 36 (17), 76 (37), 148 (73);
- Kronecker products of two known orders (e.g. 144 = 12 · 12).

So SmolLM2's 576 = 36·16 and 1536 = 12·128, Qwen2.5-0.5B's 896 = 28·32 and 4864 = 76·64. An order
with no known factor (e.g. 172 for LLaMA-2-7B's 11008 = 172·64, a Williamson matrix not built here)
falls back to ``had_k = √K · Q`` with ``Q`` a seeded random orthogonal matrix (:func:`factor`
reports ``kind = "random-orthogonal"``; the checkpoint metadata says so): the transform stays
orthogonal and runs the same way, only ``had_k`` is no longer ±1.

The fast transform is the kernels' reference :func:`loaq.kernels.hadamard_ref.hadamard_transform_ref`
(``x @ (had_k ⊗ H_{2^m})ᵀ / √n``, O(n log n) butterflies plus a K×K product, fed ``factor(n).had_k``);
:func:`multiply` applies the same map in float64 Kronecker-factored (O(n (K + 2^m)) per row), for fusing
into weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

import torch

from loaq.errors import LoaQError


def sylvester(n: int) -> torch.Tensor:
    """Sylvester's Hadamard matrix of order ``n`` (a power of two), float64."""
    if n < 1 or n & (n - 1):
        raise ValueError(f"Sylvester order {n} is not a power of two")
    H = torch.ones(1, 1, dtype=torch.float64)
    while H.shape[0] < n:
        H = torch.cat([torch.cat([H, H], 1), torch.cat([H, -H], 1)])
    return H


def _is_prime(q: int) -> bool:
    return q >= 2 and all(q % d for d in range(2, math.isqrt(q) + 1))


def _jacobsthal(q: int) -> torch.Tensor:
    """``Q_ij = χ(j - i)`` for the quadratic character ``χ`` mod prime ``q`` (``χ(0) = 0``)."""
    squares = {(i * i) % q for i in range(1, q)}
    chi = torch.tensor([0.0] + [1.0 if r in squares else -1.0 for r in range(1, q)], dtype=torch.float64)
    idx = torch.arange(q)
    return chi[(idx[None, :] - idx[:, None]) % q]


def paley1(q: int) -> torch.Tensor:
    """Paley I Hadamard matrix of order ``q + 1`` for a prime ``q ≡ 3 (mod 4)``."""
    if not (_is_prime(q) and q % 4 == 3):
        raise ValueError(f"Paley I needs a prime q = 3 mod 4, got {q}")
    S = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    S[0, 1:], S[1:, 0], S[1:, 1:] = 1, -1, _jacobsthal(q)
    return S + torch.eye(q + 1, dtype=torch.float64)


def paley2(q: int) -> torch.Tensor:
    """Paley II Hadamard matrix of order ``2(q + 1)`` for a prime ``q ≡ 1 (mod 4)``."""
    if not (_is_prime(q) and q % 4 == 1):
        raise ValueError(f"Paley II needs a prime q = 1 mod 4, got {q}")
    C = torch.zeros(q + 1, q + 1, dtype=torch.float64)
    C[0, 1:], C[1:, 0], C[1:, 1:] = 1, 1, _jacobsthal(q)
    plus = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
    zero = torch.tensor([[1.0, -1.0], [-1.0, -1.0]], dtype=torch.float64)
    return torch.kron(C, plus) + torch.kron(torch.eye(q + 1, dtype=torch.float64), zero)


@lru_cache(maxsize=None)
def _known(k: int) -> torch.Tensor | None:
    if k in (1, 2) or k & (k - 1) == 0:
        return sylvester(k)
    if k % 4:
        return None
    if _is_prime(k - 1) and (k - 1) % 4 == 3:
        return paley1(k - 1)
    if _is_prime(k // 2 - 1) and (k // 2 - 1) % 4 == 1:
        return paley2(k // 2 - 1)
    for a in range(2, math.isqrt(k) + 1):
        if k % a == 0 and (A := _known(a)) is not None and (B := _known(k // a)) is not None:
            return torch.kron(A, B)
    return None


def hadamard(k: int) -> torch.Tensor | None:
    """A Hadamard matrix of order ``k`` (float64, ±1) from the constructions above, or None."""
    H = _known(k)
    return None if H is None else H.clone()


@dataclass(frozen=True)
class Factor:
    """``n = K · 2^m``: ``had_k`` (K×K, None when K = 1) and how it was made."""

    n: int
    K: int
    had_k: torch.Tensor | None
    kind: str  # "hadamard" or "random-orthogonal"


MAX_K = 256  # the K×K product costs O(n K): larger factors take the fallback


def factor(n: int, seed: int = 0) -> Factor:
    """The smallest ``K ≤ MAX_K`` with ``n = K · 2^m`` that has a known Hadamard matrix; else
    ``K`` = 4 × the odd part of ``n`` (or less when ``n`` has fewer factors of two) with a seeded
    random orthogonal ``had_k = √K Q`` (see the module docstring)."""
    m = (n & -n).bit_length() - 1  # 2^m = largest power of two dividing n
    for j in range(m, -1, -1):
        K = n >> j
        H = hadamard(K) if K <= MAX_K else None
        if H is not None:
            return Factor(n, K, None if K == 1 else H.float(), "hadamard")
    K = n >> max(m - 2, 0)
    g = torch.Generator().manual_seed(seed)
    Q, R = torch.linalg.qr(torch.randn(K, K, generator=g, dtype=torch.float64))
    Q = Q * torch.sign(torch.diagonal(R))[None, :]
    return Factor(n, K, (math.sqrt(K) * Q).float().contiguous(), "random-orthogonal")


def block_diagonal(n: int, blocks: int, seed: int = 0) -> Factor:
    """``I_N ⊗ M_{n/N}`` (``N = blocks`` copies of :func:`factor`'s map of order ``n/N`` on the diagonal, the
    R4 of ``--r4-blocks``) in the same form ``(had_k ⊗ H_{2^m}) / √n``: ``had_k = √N (I_N ⊗ had_k_b)`` of
    order ``N K_b`` (still ``had_k had_kᵀ = K I``), so every consumer of ``had_k`` runs it unchanged and a
    tensor-parallel rank holding ``n/t`` inputs (``t | N``) applies its own block (:mod:`loaq.serve.shard`)."""
    if blocks == 1:
        return factor(n, seed)
    if blocks < 1 or n % blocks:
        raise LoaQError(f"--r4-blocks {blocks} does not divide the R4 width (intermediate_size) {n}; "
                        f"use a divisor of {n} (e.g. the tensor-parallel size)")
    f = factor(n // blocks, seed)
    hb = torch.ones(1, 1, dtype=torch.float64) if f.had_k is None else f.had_k.double()
    had_k = math.sqrt(blocks) * torch.kron(torch.eye(blocks, dtype=torch.float64), hb)
    return Factor(n, blocks * f.K, had_k.float().contiguous(), f.kind)


def blocks_of(had_k: torch.Tensor | None) -> int:
    """The largest number of equal diagonal blocks ``had_k`` splits into (1: None or a full ``had_k``)."""
    if had_k is None:
        return 1
    K, nz, best = had_k.shape[0], had_k != 0, 1
    for t in range(2, K + 1):
        if K % t == 0 and not (nz & ~torch.block_diag(*[torch.ones(K // t, K // t, dtype=torch.bool)] * t)).any():
            best = t
    return best


def multiply(x: torch.Tensor, f: Factor) -> torch.Tensor:
    """``x @ Mᵀ`` with ``M = (had_k ⊗ H_{2^m}) / √n`` in ``x``'s dtype (float64 to fuse into weights) without forming the n×n matrix:
    the last dim viewed as [K, 2^m] gets ``had_k`` on the left and ``H_{2^m}ᵀ`` on the right."""
    P = f.n // f.K
    had_k = torch.ones(1, 1, dtype=x.dtype) if f.had_k is None else f.had_k.to(x.dtype)
    y = had_k @ (x.reshape(-1, f.K, P) @ sylvester(P).to(x.dtype).T)
    return y.reshape(x.shape) / math.sqrt(f.n)

