"""The paper's Appendix A equivalences, checked against torch.linalg.lstsq."""

import torch

from loaq.solver import factorize
from loaq.stats import Stats
from loaq.targets import output_target

torch.manual_seed(0)


def streams(T=4096, N=48, M=24, noise=0.3):
    X = torch.randn(T, N, dtype=torch.float64) @ (torch.eye(N, dtype=torch.float64) + 0.2 * torch.randn(N, N, dtype=torch.float64))
    X_hat = X + noise * torch.randn(T, N, dtype=torch.float64)
    W = torch.randn(M, N, dtype=torch.float64)
    return X, X_hat, W


def test_lloa_alpha1_is_least_squares_output_match():
    X, X_hat, W = streams()
    st = Stats(X.shape[1], cross=True, batch_dtype=torch.float64)
    st.add(X_hat, X)
    Wt = output_target(W, factorize(st.H, 0.0), st.C, alpha=1.0).double()
    ref = torch.linalg.lstsq(X_hat, X @ W.T).solution.T  # argmin ||X̂ W̃ᵀ - X Wᵀ||
    assert torch.allclose(Wt, ref, rtol=1e-4, atol=1e-4), (Wt - ref).abs().max()


def test_alpha_interpolates_linearly():
    X, X_hat, W = streams()
    st = Stats(X.shape[1], cross=True, batch_dtype=torch.float64)
    st.add(X_hat, X)
    f = factorize(st.H, 0.0)
    W0, W1, Wh = (output_target(W, f, st.C, a).double() for a in (0.0, 1.0, 0.5))
    assert torch.allclose(W0, W.float().double())
    assert torch.allclose(Wh, (W0 + W1) / 2, atol=1e-5)


def test_wout_closed_form_is_least_squares_of_soa_noa_objective():
    X, X_hat, W = streams()
    T, N = X.shape
    M = W.shape[0]
    h = torch.randn(T, M, dtype=torch.float64) * 3
    h_hat = h + 0.5 * torch.randn(T, M, dtype=torch.float64)

    def R(v):
        return (v.pow(2).mean(-1, keepdim=True) + 1e-6).rsqrt()

    s, s_hat = R(h + X @ W.T), R(h_hat + X_hat @ W.T)
    Xp, Xhp = s * X, s_hat * X_hat
    st = Stats(N, cross=True, n_res=M, batch_dtype=torch.float64)
    st.add(Xhp, Xp, s * h - s_hat * h_hat)
    Wt = output_target(W, factorize(st.H, 0.0), st.C, alpha=1.0, B=st.B, beta=1.0).double()
    # eq. 12: argmin_Q || ŝĥ + ŝX̂Qᵀ - (s h + s X Wᵀ) ||
    ref = torch.linalg.lstsq(Xhp, s * h + Xp @ W.T - s_hat * h_hat).solution.T
    assert torch.allclose(Wt, ref, rtol=1e-4, atol=1e-4), (Wt - ref).abs().max()
