"""Hadamard constructions (loaq.hadamard): orthogonality for every order the supported configs need,
and the fast transform against the dense product."""

import pytest
import torch

from loaq import hadamard
from loaq.kernels.hadamard_ref import hadamard_transform_ref

# K factors of SmolLM2 (576 = 36·16, 1536 = 12·128), Qwen2.5-0.5B (896 = 28·32, 4864 = 76·64),
# Qwen2.5-7B (18944 = 148·128), Mistral/LLaMA-3 (14336 = 28·512), 40 = 20·2 and a few more.
ORDERS = [2, 4, 12, 20, 24, 28, 36, 40, 44, 48, 60, 76, 108, 148]
MODEL_WIDTHS = {576: 36, 1536: 12, 896: 28, 4864: 76, 14336: 28, 18944: 148, 3072: 12, 1024: 1, 64: 1}


@pytest.mark.parametrize("k", ORDERS)
def test_every_constructor_gives_a_hadamard_matrix(k):
    H = hadamard.hadamard(k)
    assert H is not None and set(H.unique().tolist()) == {-1.0, 1.0}
    assert torch.equal(H @ H.T, k * torch.eye(k, dtype=torch.float64))


@pytest.mark.parametrize("ctor,q", [(hadamard.paley1, 11), (hadamard.paley1, 19), (hadamard.paley1, 43),
                                    (hadamard.paley2, 13), (hadamard.paley2, 17), (hadamard.paley2, 37)])
def test_paley_constructions(ctor, q):
    H = ctor(q)
    n = H.shape[0]
    assert n == (q + 1 if ctor is hadamard.paley1 else 2 * (q + 1))
    assert torch.equal(H @ H.T, n * torch.eye(n, dtype=torch.float64))


@pytest.mark.parametrize("n,K", sorted(MODEL_WIDTHS.items()))
def test_model_widths_factor_into_known_hadamards(n, K):
    f = hadamard.factor(n)
    assert (f.K, f.kind) == (K, "hadamard")
    if f.had_k is not None:
        assert torch.equal(f.had_k.double() @ f.had_k.double().T, K * torch.eye(K, dtype=torch.float64))


def test_unknown_order_falls_back_to_a_seeded_orthogonal_factor():
    f = hadamard.factor(11008, seed=5)  # LLaMA-2-7B: 172 · 64, no construction here
    assert (f.K, f.kind) == (172, "random-orthogonal")
    assert torch.allclose(f.had_k.double() @ f.had_k.double().T, 172 * torch.eye(172, dtype=torch.float64), atol=1e-4)
    assert torch.equal(f.had_k, hadamard.factor(11008, seed=5).had_k)
    assert not torch.equal(f.had_k, hadamard.factor(11008, seed=6).had_k)


@pytest.mark.parametrize("n", [64, 576, 896, 1536, 172 * 4])
def test_fast_transform_equals_dense_product(n):
    """The weight-side product (float64) and the kernels' runtime reference (float32) both equal ``x Mᵀ``
    with the dense orthonormal ``M = (had_k ⊗ H_{2^m}) / √n`` built here."""
    f = hadamard.factor(n)
    had_k = torch.ones(1, 1, dtype=torch.float64) if f.had_k is None else f.had_k.double()
    M = torch.kron(had_k, hadamard.sylvester(n // f.K)) / n**0.5
    assert torch.allclose(M @ M.T, torch.eye(n, dtype=torch.float64), atol=1e-6)
    x = torch.randn(7, n, generator=torch.Generator().manual_seed(n))
    assert torch.allclose(hadamard.multiply(x.double(), f), x.double() @ M.T, atol=1e-10, rtol=0)
    assert torch.allclose(hadamard_transform_ref(x, f.had_k), (x.double() @ M.T).float(), atol=2e-6, rtol=0)
