"""The compiled SDA loop of ``method="doubling"`` (``trajopt/dare/_kernels.py``): the same
iterates as the torch loop, the same answers as scipy, and the rule that picks it."""

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from trajopt.dare import doubling

pytestmark = pytest.mark.skipif(not doubling.compiled_pays(
    1, torch.zeros(1, dtype=torch.float64)), reason="numba not available")


def sda_data(rng, batch, n, m, decay=0.9):
    """SDA's starting triple (A, G = B B', H = Q) of random stabilizable systems; A's
    spectral radius is about ``decay / 0.9`` (above 1: unstable open loop)."""
    A = rng.normal(size=(batch, n, n)) * decay / np.sqrt(n)
    B = rng.normal(size=(batch, n, m))
    C = rng.normal(size=(batch, n, n)) / np.sqrt(n)
    Q = C @ C.transpose(0, 2, 1) + 0.1 * np.eye(n)
    return (torch.tensor(A), torch.tensor(B @ B.transpose(0, 2, 1)), torch.tensor(Q),
            B, Q)


@settings(max_examples=examples(30), deadline=None)
@given(n=st.integers(1, 9), m=st.integers(1, 4), batch=st.integers(1, 6),
       decay=st.sampled_from([0.3, 0.9, 1.5]), seed=st.integers(0, 2**31 - 1))
def test_compiled_iterates_equal_the_torch_loop(n, m, batch, decay, seed):
    """Per element the same answer and the same verdict as the torch loop (which keeps
    converged elements iterating until a quarter of the batch is done: differences at
    rounding level -- 100 eps times ``|X| / |Q|``, a proxy for the problem's condition:
    an element with ``|X| = 2,700 |Q|`` differed by 1.8e-12 of ``|X|``), and scipy's
    answer to the same tolerance."""
    rng = np.random.default_rng(seed)
    A, G, H, B, Q = sda_data(rng, batch, n, m, decay)
    tol = 10 * n * torch.finfo(torch.float64).eps
    X, done = doubling._iterate_compiled(A, G, H, tol, 100)
    Xt, done_t = doubling._iterate(A, G, H, tol, 100)
    assert torch.equal(done, done_t) and bool(done.all())
    scale = Xt.abs().amax((-1, -2), keepdim=True)
    cond = (scale / H.abs().amax((-1, -2), keepdim=True)).clamp_min(1.0)
    eps = torch.finfo(torch.float64).eps
    assert bool(((X - Xt).abs() / scale <= 100 * eps * cond).all())
    for b in range(batch):
        ref = scipy.linalg.solve_discrete_are(A[b].numpy(), B[b], Q[b], np.eye(m))
        np.testing.assert_allclose(X[b].numpy(), ref, rtol=0,
                                   atol=100 * eps * float(cond[b]) * np.abs(ref).max())


def test_slices_on_threads_equal_one_slice(monkeypatch):
    """The batch cut between threads gives the one-thread result bitwise."""
    A, G, H, _, _ = sda_data(np.random.default_rng(1), 200, 6, 2)
    tol = 60 * torch.finfo(torch.float64).eps
    monkeypatch.setattr(doubling, "MIN_WORK_PER_THREAD", 10 ** 12)
    one, done_one = doubling._iterate_compiled(A, G, H, tol, 100)
    monkeypatch.setattr(doubling, "MIN_WORK_PER_THREAD", 1)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        many, done_many = doubling._iterate_compiled(A, G, H, tol, 100)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, many) and torch.equal(done_one, done_many)


def test_each_element_stops_by_itself():
    """A non-finite element and one that cannot converge in ``max_iter`` steps are
    flagged; the others are solved as alone."""
    A, G, H, _, _ = sda_data(np.random.default_rng(2), 3, 4, 2)
    A[1, 0, 0] = float("nan")
    tol = 40 * torch.finfo(torch.float64).eps
    X, done = doubling._iterate_compiled(A, G, H, tol, 100)
    assert done.tolist() == [True, False, True]
    assert not bool(torch.isfinite(X[1]).all())
    for b in (0, 2):
        alone, _ = doubling._iterate_compiled(A[b:b + 1], G[b:b + 1], H[b:b + 1], tol, 100)
        assert torch.equal(alone[0], X[b])
    # one step: not converged, and the torch loop's first iterate
    X1, done1 = doubling._iterate_compiled(A[:1], G[:1], H[:1], tol, 1)
    Xt1, _ = doubling._iterate(A[:1], G[:1], H[:1], tol, 1)
    assert not bool(done1.any())
    torch.testing.assert_close(X1, Xt1, rtol=1e-14, atol=0)


def test_norms_at_the_ends_of_the_float_range():
    """P ~ 1e156: squares of its entries overflow; the loop's norms are scaled (as
    LAPACK's), so it converges to the torch loop's answer instead of stopping."""
    A = torch.tensor([[[2.0]]], dtype=torch.float64)
    G = torch.full((1, 1, 1), 1e-156, dtype=torch.float64)
    H = torch.ones(1, 1, 1, dtype=torch.float64)
    tol = 10 * torch.finfo(torch.float64).eps
    X, done = doubling._iterate_compiled(A, G, H, tol, 100)
    Xt, done_t = doubling._iterate(A, G, H, tol, 100)
    assert bool(done.all()) and bool(done_t.all()) and float(X) > 1e155
    torch.testing.assert_close(X, Xt, rtol=1e-13, atol=0)


def test_the_rule(monkeypatch):
    """Float64 CPU data of n <= MAX_COMPILED_N without gradients take the compiled loop;
    float32 data, larger n, data that need a gradient and ``TRAJOPT_COMPILED=0`` the
    torch loop -- and ``solve_dare`` follows the rule."""
    x64 = torch.zeros(2, 2, dtype=torch.float64)
    n = doubling.MAX_COMPILED_N
    assert doubling.compiled_pays(n, x64)
    assert not doubling.compiled_pays(n + 1, x64)
    assert not doubling.compiled_pays(2, x64.float())
    assert not doubling.compiled_pays(2, x64.requires_grad_())
    monkeypatch.setenv("TRAJOPT_COMPILED", "0")
    assert not doubling.compiled_pays(2, torch.zeros(2, 2, dtype=torch.float64))
    monkeypatch.delenv("TRAJOPT_COMPILED")

    calls = []
    for name in ("_iterate", "_iterate_compiled"):
        real = getattr(doubling, name)
        monkeypatch.setattr(doubling, name,
                            lambda *a, _real=real, _name=name: calls.append(_name) or _real(*a))
    rng = np.random.default_rng(3)
    A, B = rng.normal(size=(4, 3, 3)) / 2, rng.normal(size=(4, 3, 1))
    ref = scipy.linalg.solve_discrete_are(A[0], B[0], np.eye(3), np.eye(1))
    for dtype, expected in ((torch.float64, "_iterate_compiled"), (torch.float32, "_iterate")):
        calls.clear()
        data = (torch.tensor(v, dtype=dtype) for v in (A, B, np.eye(3), np.eye(1)))
        sol = trajopt.solve_dare(*data, method="doubling")
        assert calls == [expected]
        tol = 1e-11 if dtype == torch.float64 else 1e-4
        np.testing.assert_allclose(sol.P[0].double().numpy(), ref, rtol=tol,
                                   atol=tol * np.abs(ref).max())


def test_a_converged_h_is_not_enough():
    """H settled but A_k not vanishing (a rotation that neither G nor H sees: G = H = 0)
    is no solution: not done, as in the torch loop."""
    c, s = np.cos(0.3), np.sin(0.3)
    A = torch.tensor([[[c, -s], [s, c]]], dtype=torch.float64)
    Z = torch.zeros(1, 2, 2, dtype=torch.float64)
    tol = 20 * torch.finfo(torch.float64).eps
    for iterate in (doubling._iterate_compiled, doubling._iterate):
        X, done = iterate(A, Z, Z, tol, 30)
        assert not bool(done.any()) and bool((X == 0).all())


def test_the_lu_pivots():
    """W = I + G H with a zero in its corner (G = v v', H = w w', v'w = -1): the first
    step needs a row exchange; it equals the torch loop's first step."""
    v, w = torch.tensor([1.0, 1.0], dtype=torch.float64), torch.tensor([1.0, -2.0],
                                                                       dtype=torch.float64)
    G, H = torch.outer(v, v)[None], torch.outer(w, w)[None]
    assert float((torch.eye(2, dtype=torch.float64) + G @ H)[0, 0, 0]) == 0.0
    A = torch.tensor([[[0.5, 0.2], [-0.1, 0.3]]], dtype=torch.float64)
    X1, _ = doubling._iterate_compiled(A, G, H, 0.0, 1)
    Xt1, _ = doubling._iterate(A, G, H, 0.0, 1)
    assert bool(torch.isfinite(X1).all())
    torch.testing.assert_close(X1, Xt1, rtol=1e-14, atol=1e-14)


def test_arguments_as_the_torch_loop_takes_them():
    """``max_iter`` beyond int64 runs (no numba typing error), a float ``max_iter`` is a
    TypeError as ``range`` makes it, and a tensor with the negative bit set is read."""
    A, G, H, _, _ = sda_data(np.random.default_rng(4), 2, 3, 1)
    tol = 30 * torch.finfo(torch.float64).eps
    X, done = doubling._iterate_compiled(A, G, H, tol, 10 ** 20)
    Xn, done_n = doubling._iterate_compiled(torch._neg_view(-A), G, H, tol, 100)
    assert bool(done.all()) and torch.equal(X, Xn) and torch.equal(done, done_n)
    with pytest.raises(TypeError):
        doubling._iterate_compiled(A, G, H, tol, 2.5)
