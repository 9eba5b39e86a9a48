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


def test_projected_C_gives_the_target_of_C():
    """``project=Wᵀ`` keeps ``C Wᵀ`` (an [n, out] matrix) instead of the n × n ``C``: the same product as the
    float64 reference ``C Wᵀ`` within float32 batch rounding, and LoaQ's target (α, β ≠ 0, a dead input
    column included) moves by < 1e-4 relative against the target built from ``C``."""
    from loaq.stats import Projected

    g = torch.Generator().manual_seed(5)
    N, M = 96, 32
    A = torch.randn(N, N, generator=g) / N**0.5 + torch.eye(N)
    W = torch.randn(M, N, generator=g)
    full, proj = Stats(N, cross=True, n_res=M), Stats(N, cross=True, n_res=M, project=W.T)
    assert proj.C is None and proj.CW.shape == (N, M) and full.CW is None
    ref = Stats(N, cross=True, batch_dtype=torch.float64)
    for _ in range(8):
        X = torch.randn(512, N, generator=g) @ A
        X[:, 7] = 0
        X_hat = X + 0.05 * torch.randn(512, N, generator=g)
        X_hat[:, 7] = 0
        R = torch.randn(512, M, generator=g)
        for st in (full, proj):
            st.add(X_hat, X, R)
        ref.add(X_hat, X)
    rel = lambda a, b: ((a - b).norm() / b.norm()).item()
    assert rel(proj.CW, ref.C @ W.double().T) < 1e-5
    assert torch.equal(proj.H, full.H) and torch.equal(proj.B, full.B)
    f = factorize(full.H, 0.01)
    assert bool(f.dead[7])
    t_full = output_target(W, f, full.C, 0.5, full.B, 0.25)
    t_proj = output_target(W, f, Projected(proj.CW), 0.5, proj.B, 0.25)
    assert rel(t_proj - W, t_full - W) < 1e-4 and rel(t_full - W, W) > 1e-3
