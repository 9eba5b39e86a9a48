import pytest
import torch

from loaq.errors import LoaQError
from loaq.grids import GridSpec, dequantize, expand, fit_groups, representable, rtn
from loaq.solver import SolverOptions, factorize, gptq_solve, qronos_solve
from loaq.stats import Stats
from loaq.targets import output_target


def correlated(T, N, seed=0):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(N, N, generator=g) / N**0.5 + torch.eye(N)
    scales = torch.logspace(-1, 1, N)
    return (torch.randn(T, N, generator=g) @ A) * scales


def out_err(X, W, Q):
    return torch.linalg.norm(X.double() @ (Q.double() - W.double()).T).item()


def test_gptq_beats_rtn_on_correlated_inputs():
    X = correlated(2048, 64)
    W = torch.randn(32, 64, generator=torch.Generator().manual_seed(1))
    spec = GridSpec(bits=3, group_size=0, symmetric=False)
    st = Stats(64)
    st.add(X)
    res = gptq_solve(W, factorize(st.H, 0.01), spec)
    codes, s, z = rtn(W, spec)
    Q_rtn = dequantize(codes.float(), expand(s, spec, 64), expand(z, spec, 64))
    e_gptq, e_rtn = out_err(X, W, res.Q), out_err(X, W, Q_rtn)
    assert e_gptq < 0.8 * e_rtn, (e_gptq, e_rtn)


def test_codes_reproduce_Q_and_stay_on_grid():
    X = correlated(512, 96, seed=3)
    W = torch.randn(16, 96)
    for spec in (GridSpec(2, 32, False), GridSpec(4, 0, True), GridSpec(3, 48, True), GridSpec(2, 32, scale_dtype="float16")):
        st = Stats(96)
        st.add(X)
        res = gptq_solve(W, factorize(st.H, 0.01), spec, SolverOptions(blocksize=32))
        assert res.codes.dtype == torch.uint8 and int(res.codes.max()) <= spec.maxq
        Q = dequantize(res.codes.float(), expand(res.scales, spec, 96), expand(res.zeros, spec, 96))
        assert torch.equal(Q, res.Q)
        assert torch.equal(res.scales.to(spec.scale_torch_dtype).float(), res.scales)  # solved on the written scales


def test_float16_scales_round_to_nearest_and_never_to_zero():
    spec = GridSpec(2, 32, scale_dtype="float16")
    s = torch.tensor([0.0123456789, 1e-9, 0.0, 3.3e-5])
    got = representable(s, spec)
    want = torch.cat([torch.tensor([0.0123456789]).half().float(), torch.full((2,), 2.0**-24),
                      torch.tensor([3.3e-5]).half().float()])
    assert torch.equal(got, want)
    assert (got > 0).all() and torch.equal(representable(s, GridSpec(2, 32)), s)
    W = torch.randn(8, 64, generator=torch.Generator().manual_seed(0)) * 1e-3
    s32, z32 = fit_groups(W, GridSpec(4, 32))
    s16, z16 = fit_groups(W, GridSpec(4, 32, scale_dtype="float16"))
    assert torch.allclose(s16, s32, rtol=2.0**-11, atol=0) and not torch.equal(s16, s32)
    with pytest.raises(LoaQError, match="--scale-dtype"):
        GridSpec(4, scale_dtype="bfloat16")


def test_blocksize_changes_only_the_order_of_work():
    X = correlated(512, 64, seed=5)
    W = torch.randn(8, 64)
    st = Stats(64)
    st.add(X)
    f = factorize(st.H, 0.01)
    spec = GridSpec(4, 0, False)
    for act_order in (False, True):
        a = gptq_solve(W, f, spec, SolverOptions(blocksize=128, act_order=act_order))
        b = gptq_solve(W, f, spec, SolverOptions(blocksize=16, act_order=act_order))
        assert (a.codes != b.codes).float().mean() < 0.01  # lazy blocks are exact up to float rounding


def reference_gptq(W, H, perm, spec, percdamp=0.01):
    """Textbook GPTQ in float64, written out here: permute ``W`` and ``H`` by ``perm``, quantize column by column
    (no lazy blocks) on the grid fitted to the original column groups, un-permute. Returns codes [out, in]."""
    n = W.shape[1]
    H = H.double() + percdamp * torch.diag(H.double()).mean() * torch.eye(n, dtype=torch.float64)
    s, z = fit_groups(W.float(), spec)
    S, Z = expand(s, spec, n).double()[:, perm], expand(z, spec, n).double()[:, perm]
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H[perm][:, perm])), upper=True)
    Wp = W.double()[:, perm].clone()
    codes = torch.zeros_like(Wp)
    for i in range(n):
        w = Wp[:, i]
        codes[:, i] = torch.clamp(torch.round(w / S[:, i]) + Z[:, i], 0, spec.maxq)
        err = (w - S[:, i] * (codes[:, i] - Z[:, i])) / U[i, i]
        Wp[:, i:] -= err[:, None] * U[i, i:][None, :]
    return codes[:, torch.argsort(perm)].to(torch.uint8)


@pytest.mark.parametrize("spec", [GridSpec(4, 0, False), GridSpec(3, 16, False), GridSpec(3, 16, True)],
                         ids=["w4-channel", "w3-g16", "w3-g16-sym"])
def test_act_order_is_gptq_on_columns_sorted_by_descending_diag_H(spec):
    """act_order=True equals the reference run on columns sorted by descending diag(H), with each column still
    quantized on the grid of its original group (static groups); act_order=False equals the unpermuted reference.
    The two orders differ on ~40 % of the codes, rounding between solver and reference on well under 2 %."""
    N = 64
    X = correlated(1024, N)
    X = X[:, torch.randperm(N, generator=torch.Generator().manual_seed(1))]  # uneven diag(H), in no order
    W = torch.randn(16, N, generator=torch.Generator().manual_seed(2))
    st = Stats(N)
    st.add(X)
    f = factorize(st.H, 0.01)
    perm = torch.argsort(torch.diag(st.H), descending=True)
    ordered = gptq_solve(W, f, spec, SolverOptions(blocksize=16, act_order=True))
    plain = gptq_solve(W, f, spec, SolverOptions(blocksize=16, act_order=False))
    ref_ordered, ref_plain = reference_gptq(W, st.H, perm, spec), reference_gptq(W, st.H, torch.arange(N), spec)
    assert (ordered.codes != ref_ordered).float().mean() < 0.02
    assert (plain.codes != ref_plain).float().mean() < 0.02
    assert (ordered.codes != plain.codes).float().mean() > 0.2  # act-order really changed the result
    s, z = fit_groups(W, spec)
    assert torch.equal(ordered.scales, s) and torch.equal(ordered.zeros, z)
    assert torch.equal(ordered.Q, dequantize(ordered.codes.float(), expand(s, spec, N), expand(z, spec, N)))


def proxy_loss(W, Q, H):
    """GPTQ's objective ``tr((Q - W) H (Q - W)ᵀ)``."""
    D = Q.double() - W.double()
    return torch.trace(D @ H.double() @ D.T).item()


@pytest.mark.parametrize("spec", [GridSpec(3, 0, False), GridSpec(4, 0, True), GridSpec(3, 16, False)],
                         ids=["w3-channel", "w4-sym", "w3-g16"])
def test_act_order_helps_when_the_largest_inputs_come_last(spec):
    """correlated() scales its columns by 0.1 .. 10 in increasing order, so without act-order the columns that
    matter most are quantized last, with nothing left to absorb their error. Act-order halves the proxy loss
    here (ratio 0.49-0.64 over seeds 0-7 and these grids); a reversed or missing permutation does not."""
    X = correlated(1024, 64)
    W = torch.randn(16, 64, generator=torch.Generator().manual_seed(3))
    st = Stats(64)
    st.add(X)
    f = factorize(st.H, 0.01)
    with_ao = proxy_loss(W, gptq_solve(W, f, spec, SolverOptions(act_order=True)).Q, st.H)
    without = proxy_loss(W, gptq_solve(W, f, spec, SolverOptions(act_order=False)).Q, st.H)
    assert with_ao < 0.75 * without, (with_ao, without)


def test_dead_columns_and_singular_H_are_handled():
    X = correlated(256, 32)
    X[:, 5] = 0
    X[:, 7] = X[:, 6]  # rank deficient
    st = Stats(32)
    st.add(X)
    f = factorize(st.H, 0.0)  # no damping: the first Cholesky fails and damping escalates
    assert bool(f.dead[5]) and f.damp > 0
    res = gptq_solve(torch.randn(4, 32), f, GridSpec(4, 0, False))
    assert torch.all(res.Q[:, 5] == dequantize(res.codes[:, 5].float(), res.scales[:, 0], res.zeros[:, 0]))


def mismatched(seed=7, T=4096, N=64, M=32):
    """A full-precision input X and a quantized-stream input X̂ carrying a correlated error."""
    X = correlated(T, N, seed)
    g = torch.Generator().manual_seed(seed + 1)
    X_hat = X + 0.3 * correlated(T, N, seed + 2) * X.std(0) / 3 + 0.05 * torch.randn(T, N, generator=g)
    W = torch.randn(M, N, generator=g)
    st = Stats(N, cross=True)
    st.add(X_hat, X)
    return X, X_hat, W, st


def fp_err(X, X_hat, W, Q):
    """|| X̂ Qᵀ - X Wᵀ ||: error of the quantized layer's output to the full-precision output."""
    return torch.linalg.norm(X_hat.double() @ Q.double().T - X.double() @ W.double().T).item()


def test_error_compensation_methods_beat_gptq_on_mismatched_streams():
    X, X_hat, W, st = mismatched()
    spec = GridSpec(4, 0, False)
    f = factorize(st.H, 0.01)
    e_gptq = fp_err(X, X_hat, W, gptq_solve(W, f, spec).Q)
    e_lloa = fp_err(X, X_hat, W, gptq_solve(output_target(W, f, st.C, 1.0), f, spec).Q)
    e_gptaq = fp_err(X, X_hat, W, gptq_solve(W, f, spec, dXXT=st.C.T, gptaq_alpha=1.0).Q)
    e_qronos = fp_err(X, X_hat, W, qronos_solve(W, f, st.C, spec).Q)
    assert e_lloa < 0.9 * e_gptq, (e_lloa, e_gptq)
    assert e_gptaq < 0.98 * e_gptq, (e_gptaq, e_gptq)  # GPTAQ only feeds the correction forward (triu)
    assert e_qronos < 0.9 * e_gptq, (e_qronos, e_gptq)


def test_gptaq_is_blocksize_invariant_and_zero_alpha_is_gptq():
    _, _, W, st = mismatched()
    f = factorize(st.H, 0.01)
    spec = GridSpec(3, 0, False)
    a = gptq_solve(W, f, spec, SolverOptions(blocksize=128), dXXT=st.C.T)
    b = gptq_solve(W, f, spec, SolverOptions(blocksize=8), dXXT=st.C.T)
    assert (a.codes != b.codes).float().mean() < 0.01
    assert torch.equal(gptq_solve(W, f, spec, dXXT=st.C.T, gptaq_alpha=0.0).codes, gptq_solve(W, f, spec).codes)


def test_qronos_without_mismatch_is_gptq():
    """With X = X̂ (C = 0) Qronos' first-column least squares is GPTQ's own first step."""
    X = correlated(2048, 64, seed=11)
    W = torch.randn(16, 64)
    st = Stats(64, cross=True)
    st.add(X, X)
    f = factorize(st.H, 0.01)
    spec = GridSpec(4, 0, False)
    a, b = qronos_solve(W, f, st.C, spec), gptq_solve(W, f, spec)
    assert (a.codes != b.codes).float().mean() < 0.01


def test_failed_cholesky_warns_with_the_layer_name(caplog):
    X = correlated(64, 32)
    X[:, 3] = X[:, 2]
    st = Stats(32)
    st.add(X)
    with caplog.at_level("WARNING"):
        f = factorize(st.H, 0.0, "model.layers.7.mlp.down_proj")
    assert f.damp > 0 and "model.layers.7.mlp.down_proj" in caplog.text and "damping raised" in caplog.text


def test_factorize_in_place_is_the_same_factor_without_a_copy():
    """``inplace=True`` damps the caller's float64 ``H`` itself (no n × n copy at the solve's peak) and gives
    bit for bit the factor of the copying path, retries (a non-PD ``H``) included."""
    g = torch.Generator().manual_seed(0)
    X = torch.randn(40, 12, generator=g, dtype=torch.float64)
    for H, pd in ((X.T @ X, 0.01), (X[:5].T @ X[:5], 0.0)):  # the second (rank 5, undamped) needs a retry
        H[3, :] = H[:, 3] = 0  # a dead column
        ref = factorize(H, pd)
        work = H.clone()
        f = factorize(work, pd, inplace=True)
        assert f.H.data_ptr() == work.data_ptr()
        assert torch.equal(f.H, ref.H) and torch.equal(f.L, ref.L) and f.damp == ref.damp
        assert torch.equal(f.dead, ref.dead)


def test_loaq_solve_releases_C_before_the_gptq_solve(monkeypatch):
    """Without a probe the pipeline hands ``C`` to the rule, and LLOA/LoaQ drop it once the target is formed:
    by the time GPTQ factors ``H⁻¹`` no ``n × n`` ``C`` is alive (a weak reference to it is dead)."""
    import weakref

    from loaq import methods, pipeline
    from loaq.config import Method, QuantConfig
    from loaq.stats import Stats

    g = torch.Generator().manual_seed(1)
    st = Stats(16, cross=True)
    x = torch.randn(64, 16, generator=g)
    st.add(x, x + 0.1 * torch.randn(64, 16, generator=g))
    ref = weakref.ref(st.C)
    seen = {}
    real = methods.gptq_solve
    monkeypatch.setattr(methods, "gptq_solve", lambda *a, **k: seen.setdefault("alive", ref() is not None) or real(*a, **k))
    lin = torch.nn.Linear(16, 8, bias=False)
    pipeline.solve_group(["l"], [lin], st, QuantConfig(spec=GridSpec(3, 0), method=Method("loaq", alpha=0.5)), "l")
    assert seen == {"alive": False} and st.C is None


def test_symmetric_permutation_in_place_is_indexing():
    """``_permute_symmetric_`` writes ``A[perm][:, perm]`` into ``A`` (chunked columns, row cycles), bit for bit,
    for permutations with fixed points, one long cycle and several cycles."""
    from loaq.solver import _permute_symmetric_

    g = torch.Generator().manual_seed(3)
    A = torch.randn(37, 37, generator=g, dtype=torch.float64)
    A = A + A.T
    for perm in (torch.randperm(37, generator=g), torch.arange(37), torch.roll(torch.arange(37), 5),
                 torch.tensor([1, 0] + list(range(2, 37)))):
        assert torch.equal(_permute_symmetric_(A.clone(), perm, rows=8), A[perm][:, perm])


@pytest.mark.parametrize("method", ["gptq", "gptaq", "qronos", "loaq"])
def test_disposable_factor_gives_the_same_codes_and_frees_H_and_L(method, monkeypatch):
    """The pipeline marks a probe-less factor disposable: the solve frees ``H`` and ``L`` once it has ``H⁻¹``
    and factors ``H⁻¹`` in its own memory. Codes, scales and ``Q`` equal a kept factor's bit for bit;
    ``H``/``L`` are gone (a weak reference is dead) by the column loop, except for Qronos (reads ``H`` after)."""
    import weakref

    from loaq import methods, solver
    from loaq.config import Method, QuantConfig

    g = torch.Generator().manual_seed(2)
    X = correlated(512, 48, seed=4)
    W = torch.randn(24, 48, generator=g)
    spec = GridSpec(3, 16, False)
    m = Method(method, **({"alpha": 0.5, "beta": 0.0} if method == "loaq" else {}))
    st = Stats(48, cross=True)
    st.add(X, X + 0.05 * torch.randn(X.shape, generator=g))
    rule = methods.rule(method)
    C = st.C.clone()
    ref = rule.solve(W, factorize(st.H, 0.01), C.clone(), None, m, spec, SolverOptions())
    f = factorize(st.H, 0.01)
    f.disposable = True
    H_ref, L_ref = weakref.ref(f.H), weakref.ref(f.L)
    seen = {}
    real = solver._columns

    def spy(*a, **k):
        seen.setdefault("alive", H_ref() is not None)
        return real(*a, **k)

    monkeypatch.setattr(solver, "_columns", spy)
    res = rule.solve(W, f, C.clone(), None, m, spec, SolverOptions())
    for a, b in ((res.codes, ref.codes), (res.scales, ref.scales), (res.zeros, ref.zeros), (res.Q, ref.Q)):
        assert torch.equal(a, b)
    assert res.codes.dtype == torch.uint8
    if method == "qronos":
        assert seen == {"alive": True}
    else:
        assert seen == {"alive": False} and L_ref() is None and f.H is None and f.L is None
        with pytest.raises(RuntimeError, match="released"):
            f.solve(torch.zeros(48, 1))
    # the pipeline marks it: nothing holds the statistics' H after a probe-less solve_group
    from loaq import pipeline

    st2 = Stats(48, cross=True)
    st2.add(X, X)
    lin = torch.nn.Linear(48, 24, bias=False)
    lin.weight.data.copy_(W)
    pipeline.solve_group(["l"], [lin], st2, QuantConfig(spec=spec, method=Method("gptq")), "l")
    assert st2.H is None


@pytest.mark.parametrize("act_order", [True, False])
def test_grids_in_one_column_loop_equal_one_solve_per_grid(act_order):
    """``gptq_solve_grids``: every grid's codes, scales, zero points and Q equal :func:`gptq_solve` on that grid
    bit for bit (rows are independent given U; a dead column and NeUQI init included), solved after it from
    the same factor."""
    from loaq.solver import gptq_solve_grids

    X = correlated(512, 96, seed=7)
    X[:, 5] = 0  # a dead input column
    W = torch.randn(24, 96, generator=torch.Generator().manual_seed(8))
    specs = [GridSpec(2, 32, False), GridSpec(2, 0, False), GridSpec(3, 48, True), GridSpec(4, 0, False, init="neuqi")]
    st = Stats(96)
    st.add(X)
    factor = factorize(st.H, 0.01)
    opts = SolverOptions(blocksize=32, act_order=act_order)
    together = gptq_solve_grids(W, factor, specs, opts)
    for spec, got in zip(specs, together):
        want = gptq_solve(W, factor, spec, opts)
        assert int(got.codes.max()) <= spec.maxq
        assert torch.equal(got.scales, want.scales) and torch.equal(got.zeros, want.zeros), spec
        assert torch.equal(got.codes, want.codes) and torch.equal(got.Q, want.Q), spec
