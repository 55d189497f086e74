"""Conjugate gradients (trajopt.krylov) against a dense solve, and its stopping reasons."""

from __future__ import annotations

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._hypothesis import examples
from trajopt.krylov import conjugate_gradient


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 10_000), D=st.integers(1, 40), shift=st.floats(1e-3, 10.0),
       rank=st.integers(0, 40))
def test_cg_solves_an_spd_system_like_a_dense_solve(seed, D, shift, rank):
    """A = M M' + shift I (a low-rank part plus a shift: the structure of the damped
    Gramian) against torch.linalg.solve, float64; cond(A) <= ~1e5 here, so 1e-9."""
    g = torch.Generator().manual_seed(seed)
    M = torch.randn(D, min(rank, D), generator=g, dtype=torch.float64)
    A = M @ M.T + shift * torch.eye(D, dtype=torch.float64)
    b = torch.randn(D, generator=g, dtype=torch.float64)
    res = conjugate_gradient(lambda v: A @ v, b, tol=1e-13, max_iter=10 * D)
    assert res.converged and res.reason == "converged"
    assert res.residual <= 1e-13
    assert float((A @ res.x - b).norm() / b.norm()) < 1e-11   # the true residual too
    ref = torch.linalg.solve(A, b)
    assert float((res.x - ref).norm() / ref.norm()) < 1e-9


def test_low_rank_plus_shift_converges_in_about_rank_iterations():
    """CG needs about one iteration per distinct eigenvalue: rank 5 plus a shift of a
    400 x 400 system takes at most 6 (+ a few for rounding), not 400."""
    g = torch.Generator().manual_seed(0)
    M = torch.randn(400, 5, generator=g, dtype=torch.float64)
    A = M @ M.T + 1e-2 * torch.eye(400, dtype=torch.float64)
    res = conjugate_gradient(lambda v: A @ v, torch.randn(400, generator=g,
                                                          dtype=torch.float64),
                             tol=1e-12, max_iter=400)
    assert res.converged and res.iterations <= 9


def test_stopping_reasons():
    A = torch.diag(torch.tensor([1.0, 2.0, 3.0, 4.0], dtype=torch.float64))
    b = torch.ones(4, dtype=torch.float64)
    zero = conjugate_gradient(lambda v: A @ v, torch.zeros(4, dtype=torch.float64),
                              tol=1e-12, max_iter=10)
    assert zero.converged and zero.iterations == 0 and bool((zero.x == 0).all())
    short = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=2)
    assert (short.converged, short.reason, short.iterations) == (False, "max_iter", 2)
    assert short.residual > 1e-12
    none = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=0)
    assert (none.converged, none.reason, none.iterations) == (False, "max_iter", 0)
    indefinite = torch.diag(torch.tensor([1.0, -1.0], dtype=torch.float64))
    bad = conjugate_gradient(lambda v: indefinite @ v, torch.ones(2, dtype=torch.float64),
                             tol=1e-12, max_iter=5)
    assert (bad.converged, bad.reason) == (False, "not_positive_definite")
    nan = conjugate_gradient(lambda v: v * float("nan"), b, tol=1e-12, max_iter=5)
    assert (nan.converged, nan.reason) == (False, "non_finite")
    inf = conjugate_gradient(lambda v: A @ v, b * float("inf"), tol=1e-12, max_iter=5)
    assert (inf.converged, inf.reason) == (False, "non_finite")
    asked = []
    stopped = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=10,
                                 stop=lambda k, rel: asked.append((k, rel)) or k == 2)
    assert (stopped.converged, stopped.reason, stopped.iterations) == (False, "stopped", 2)
    assert [k for k, _ in asked] == [1, 2] and asked[-1][1] == stopped.residual
    done = conjugate_gradient(lambda v: A @ v, b, tol=1e-12, max_iter=10,
                              stop=lambda k, rel: False)
    assert done.converged and done.iterations == 4   # 4 distinct eigenvalues
