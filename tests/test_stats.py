import torch

from loaq.solver import factorize
from loaq.stats import Stats
from loaq.targets import output_target


def test_float32_batches_match_float64_accumulation():
    """Batch products in float32 move the LLOA target by < 1e-4 relative, on inputs whose streams differ by 1 %."""
    g = torch.Generator().manual_seed(0)
    N, M = 256, 64
    A = torch.randn(N, N, generator=g) / N**0.5 + torch.eye(N)
    W = torch.randn(M, N, generator=g)
    st32, st64 = Stats(N, cross=True, n_res=M), Stats(N, cross=True, n_res=M, batch_dtype=torch.float64)
    for _ in range(16):
        X = torch.randn(1024, N, generator=g) @ A * 10
        X_hat = X + 0.01 * torch.randn(1024, N, generator=g)
        R = torch.randn(1024, M, generator=g)
        st32.add(X_hat, X, R)
        st64.add(X_hat, X, R)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(st32.H, st64.H) < 1e-6 and rel(st32.C, st64.C) < 1e-5 and rel(st32.B, st64.B) < 1e-5
    f32, f64 = factorize(st32.H, 0.01), factorize(st64.H, 0.01)
    t32 = output_target(W, f32, st32.C, 1.0, st32.B, 1.0)
    t64 = output_target(W, f64, st64.C, 1.0, st64.B, 1.0)
    assert rel(t32 - W, t64 - W) < 1e-4
