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


def test_target_is_w_plus_alpha_and_beta_times_independently_solved_terms():
    """W̃ - W = α (H⁻¹ C Wᵀ)ᵀ + β (H⁻¹ B)ᵀ (Algorithm 1 lines 16, 18), each term solved here with
    torch.linalg.solve, at points where neither α nor β is 0 as well as on each axis."""
    X, X_hat, W = streams()
    r = torch.randn(X.shape[0], W.shape[0], dtype=torch.float64)
    st = Stats(X.shape[1], cross=True, n_res=W.shape[0], batch_dtype=torch.float64)
    st.add(X_hat, X, r)
    f = factorize(st.H, 0.0)
    d_alpha = torch.linalg.solve(st.H, st.C @ W.T).T
    d_beta = torch.linalg.solve(st.H, st.B).T
    assert d_alpha.norm() > 0.1 * W.norm() and d_beta.norm() > 0.01 * W.norm()
    for alpha, beta in ((0.5, 0.0), (0.0, 0.5), (0.3, 0.7), (1.0, 1.0)):
        Wt = output_target(W, f, st.C, alpha, B=st.B, beta=beta).double()
        ref = W.float().double() + alpha * d_alpha + beta * d_beta
        assert torch.allclose(Wt, ref, rtol=1e-5, atol=1e-5), (alpha, beta, (Wt - ref).abs().max())


def test_dead_columns_keep_their_weights_and_the_rest_is_least_squares():
    """A column the quantized stream never feeds (x̂_j = 0, as a 4-bit activation rounding to 0 everywhere) keeps
    W[:, j]; the live columns are the least-squares fit of X Wᵀ + β r (B = X̂ᵀr) from X̂'s live columns,
    although x_j ≠ 0 in X."""
    X, X_hat, W = streams()
    dead = [3, 17]
    X_hat[:, dead] = 0
    st = Stats(X.shape[1], cross=True, n_res=W.shape[0], batch_dtype=torch.float64)
    r = torch.randn(X.shape[0], W.shape[0], dtype=torch.float64)
    st.add(X_hat, X, r)
    f = factorize(st.H, 0.0)
    assert f.dead.nonzero().flatten().tolist() == dead
    Wt = output_target(W, f, st.C, alpha=1.0, B=st.B, beta=0.5).double()
    assert torch.equal(Wt[:, dead], W[:, dead].float().double())
    live = [j for j in range(X.shape[1]) if j not in dead]
    ref = torch.linalg.lstsq(X_hat[:, live], X @ W.T + 0.5 * r).solution.T
    assert torch.allclose(Wt[:, live], ref, rtol=1e-4, atol=1e-4), (Wt[:, live] - ref).abs().max()


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


def test_damped_target_is_ridge_least_squares_towards_w():
    """With the solver's damping λ the target is ``argmin ||X̂W̃ᵀ − X_α Wᵀ||² + λ||W̃ − W||²``,
    ``X_α = X̂ + α(X − X̂)`` (normal equations ``(H + λI)W̃ᵀ = X̂ᵀX_α Wᵀ + λWᵀ``): at α = 1 the ridge fit that
    Qronos' step 2 solves for the not-yet-quantized weights (issue #18). Checked against an augmented lstsq."""
    X, X_hat, W = streams(T=512, noise=0.6)
    st = Stats(X.shape[1], cross=True, batch_dtype=torch.float64)
    st.add(X_hat, X)
    f = factorize(st.H, 0.05)
    lam = f.damp
    assert lam > 0.01 * torch.diag(st.H).mean()
    for alpha in (0.25, 1.0):
        Wt = output_target(W, f, st.C, alpha).double()
        X_a = X_hat + alpha * (X - X_hat)
        A = torch.cat([X_hat, lam ** 0.5 * torch.eye(X.shape[1], dtype=torch.float64)])
        b = torch.cat([X_a @ W.T, lam ** 0.5 * W.T])
        ref = torch.linalg.lstsq(A, b).solution.T
        undamped = output_target(W, factorize(st.H, 0.0), st.C, alpha).double()
        assert (undamped - ref).abs().max() > 1e-3  # the damping matters here, so the check can fail
        assert torch.allclose(Wt, ref, rtol=1e-5, atol=1e-5), (Wt - ref).abs().max()
