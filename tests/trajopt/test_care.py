"""The CARE (``solve_care``), ZOH discretization (``c2d``) and the python-control layer
(``trajopt.compat``) against scipy and python-control."""

import warnings

import numpy as np
import pytest
import scipy.linalg
import scipy.signal
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from trajopt import compat
from trajopt.dare.backends import slycot_available
from trajopt.errors import (
    ConvergenceWarning,
    InvalidArgumentError,
    NotStabilizableError,
    ShapeError,
)


def _system(seed, n, m, with_e, with_s):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    B = rng.normal(size=(n, m))
    L = rng.normal(size=(n, n))
    Q = L @ L.T / n + 0.1 * np.eye(n)
    R = np.eye(m) + 0.1 * np.diag(rng.uniform(size=m))
    E = np.eye(n) + 0.05 * rng.normal(size=(n, n)) if with_e else None
    S = 0.05 * rng.normal(size=(n, m)) if with_s else None
    return A, B, Q, R, E, S


def _ric(A, B, Q, R, E, S, X):
    E = np.eye(len(A)) if E is None else E
    H = B.T @ X @ E + (0 if S is None else S.T)
    return A.T @ X @ E + E.T @ X @ A - H.T @ np.linalg.solve(R, H) + Q


def _rel_res(A, B, Q, R, E, S, X):
    """The residual over the sum of the norms of the equation's terms (numpy, written
    out: shares nothing with trajopt.care)."""
    E = np.eye(len(A)) if E is None else E
    H = B.T @ X @ E + (0 if S is None else S.T)
    AXE, corr = A.T @ X @ E, H.T @ np.linalg.solve(R, H)
    res = AXE + AXE.T - corr + Q
    nrm = np.linalg.norm
    return nrm(res) / (2 * nrm(AXE) + nrm(corr) + nrm(Q))


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 6), m=st.integers(1, 3),
       with_e=st.booleans(), with_s=st.booleans(),
       method=st.sampled_from(["auto", "scipy", "sign"]))
def test_care_matches_scipy(seed, n, m, with_e, with_s, method):
    """The backward error (relative residual) no worse than scipy's (unbalanced with E,
    see the next test) and at rounding level; P equal to scipy's where the problem is
    well conditioned (||P|| < 1e4: random systems with a nearly uncontrollable unstable
    mode give ||P|| ~ 1e8, where both solutions differ by ~1e-7 relative); K the gain of
    u = K x and the closed loop stable."""
    A, B, Q, R, E, S = _system(seed, n, m, with_e, with_s)
    ref = scipy.linalg.solve_continuous_are(A, B, Q, R, e=E, s=S, balanced=E is None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # the ill-conditioned ones
        sol = trajopt.solve_care(A, B, Q, R, E, S, method=method)
        # the explicit back ends are not polished unless asked (3.7x scipy's own residual
        # measured for "scipy" on the power-of-two-scaled cost, 4x for "sign", on an
        # ill-conditioned system); "auto" is
        polished = sol if method == "auto" else trajopt.solve_care(
            A, B, Q, R, E, S, method=method, refine=2)
    assert isinstance(sol.P, np.ndarray)
    scale = np.abs(ref).max()
    assert _rel_res(A, B, Q, R, E, S, polished.P) <= max(
        2 * _rel_res(A, B, Q, R, E, S, ref), 1e3 * n * np.finfo(float).eps)
    if scale < 1e4:
        np.testing.assert_allclose(sol.P, ref, rtol=0, atol=1e-9 * scale)
    Ee = np.eye(n) if E is None else E
    K = -np.linalg.solve(R, B.T @ sol.P @ Ee + (0 if S is None else S.T))
    np.testing.assert_allclose(sol.K, K, rtol=0, atol=1e-9 * max(np.abs(K).max(), 1.0))
    eig = np.asarray(sol.closed_loop_eigvals)
    assert (eig.real < 0).all()
    # each an eigenvalue of the closed loop by its backward error (sigma_min(Acl - l I)),
    # and all of them by their sum: a nearly double eigenvalue moves by ~sqrt(eps |Acl|)
    # between two LAPACK calls (6e-7 measured, seed 329, n 5, m 1), so the values
    # themselves are compared to that
    Acl = np.linalg.solve(Ee, A + B @ sol.K)
    size = max(np.abs(Acl).max(), 1.0)
    for lam in eig:
        smin = np.linalg.svd(Acl - lam * np.eye(n), compute_uv=False)[-1]
        assert smin <= 1e-10 * size, (lam, smin)
    assert abs(eig.sum() - np.trace(Acl)) <= 1e-10 * n * size
    np.testing.assert_allclose(np.sort_complex(eig), np.sort_complex(np.linalg.eigvals(Acl)),
                               atol=1e-8 + 10 * np.sqrt(np.finfo(float).eps * size))


def test_care_with_e_avoids_scipys_balancing():
    """scipy's balancing with E != I returns a wrong solution on this system (residual
    0.4); solve_care's scipy path does not balance with E and the sign path is exact."""
    A, B, Q, R, E, S = _system(0, 4, 2, True, True)
    bad = scipy.linalg.solve_continuous_are(A, B, Q, R, e=E, s=S)
    for method in ("scipy", "sign"):
        sol = trajopt.solve_care(A, B, Q, R, E, S, method=method)
        assert np.abs(_ric(A, B, Q, R, E, S, sol.P)).max() < 1e-12
    if np.abs(_ric(A, B, Q, R, E, S, bad)).max() < 1e-6:
        pytest.skip("this scipy balances E correctly")


def test_batched_sign_equals_loop():
    g = torch.Generator().manual_seed(0)
    A = torch.randn(64, 6, 6, generator=g, dtype=torch.float64)
    B = torch.randn(64, 6, 2, generator=g, dtype=torch.float64)
    Q, R = torch.eye(6, dtype=torch.float64), torch.eye(2, dtype=torch.float64)
    sol = trajopt.solve_care(A, B, Q, R)
    assert sol.method == "sign+newton" and sol.P.shape == (64, 6, 6)
    ref = np.stack([scipy.linalg.solve_continuous_are(A[i].numpy(), B[i].numpy(),
                                                      np.eye(6), np.eye(2))
                    for i in range(64)])
    torch.testing.assert_close(sol.P, torch.as_tensor(ref), rtol=1e-10, atol=1e-10)
    assert float(sol.residual.max()) < 1e-13


def test_float32_and_torch_out():
    A, B, Q, R, _, _ = _system(3, 5, 2, False, False)
    t = [torch.as_tensor(v, dtype=torch.float32) for v in (A, B, Q, R)]
    sol = trajopt.solve_care(*t, method="sign")
    assert sol.P.dtype == torch.float32
    ref = scipy.linalg.solve_continuous_are(A, B, Q, R)
    np.testing.assert_allclose(sol.P.numpy(), ref, rtol=0, atol=1e-4 * np.abs(ref).max())


def test_unstabilizable_names_the_mode():
    """An unstable mode (lambda = 1) that B cannot reach: no stabilizing solution."""
    A = np.diag([1.0, -2.0])
    B = np.array([[0.0], [1.0]])
    for method in ("auto", "scipy", "sign"):
        with pytest.raises(NotStabilizableError, match="lambda = 1"):
            trajopt.solve_care(A, B, np.eye(2), np.eye(1), method=method)


def test_the_unstabilizable_element_of_a_batch_is_named():
    """Every method names the failing element of the caller's batch ("auto" named its
    position among the elements it handed to scipy)."""
    good = torch.tensor([[0.1, 0.0], [0.0, -0.5]], dtype=torch.float64)
    bad = torch.tensor([[-0.5, 0.0], [0.0, 0.3]], dtype=torch.float64)
    B, Q, R = torch.tensor([[1.0], [0.0]], dtype=torch.float64), torch.eye(2), torch.eye(1)
    for where in range(3):
        A = torch.stack([bad if i == where else good for i in range(3)])
        for method in ("auto", "sign", "scipy"):
            with pytest.raises(NotStabilizableError, match=rf"batch element \({where},\)"):
                trajopt.solve_care(A, B, Q.double(), R.double(), method=method)


def test_hamiltonian_eigenvalue_on_the_axis_is_refused_not_crashed():
    """A double integrator with Q = 0: the Hamiltonian has eigenvalues on the imaginary
    axis, the sign iteration breaks down (NaN); the least-squares solve after it failed
    torch's internal assert (MKL DGELSY) under "sign" and the batched "auto" (a user
    trial, session 30) instead of naming the element."""
    A = np.array([[0.0, 1.0], [0.0, 0.0]])
    B, R = np.array([[0.0], [1.0]]), np.eye(1)
    with pytest.raises(NotStabilizableError, match="did not converge"):
        trajopt.solve_care(A, B, np.zeros((2, 2)), R, method="sign")
    Qs = np.stack([np.eye(2), np.zeros((2, 2))])
    for method in ("auto", "sign"):
        with pytest.raises(NotStabilizableError, match=r"batch element \(1,\)"):
            trajopt.solve_care(np.stack([A, A]), B, Qs, R, method=method)


def test_bad_input_names_the_argument():
    A, B, Q, R, _, _ = _system(0, 3, 1, False, False)
    with pytest.raises(ShapeError, match="B"):
        trajopt.solve_care(A, B[:2], Q, R)
    with pytest.raises(InvalidArgumentError, match="R must be invertible"):
        trajopt.solve_care(A, B, Q, np.zeros((1, 1)))
    with pytest.raises(InvalidArgumentError, match="method"):
        trajopt.solve_care(A, B, Q, R, method="newton")


@pytest.mark.parametrize("batch", [(), (3,)])
def test_c2d_matches_scipy_cont2discrete(batch):
    rng = np.random.default_rng(5)
    A = rng.normal(size=(*batch, 4, 4))
    B = rng.normal(size=(*batch, 4, 2))
    Ad, Bd = trajopt.c2d(A, B, 0.1)
    for idx in np.ndindex(*batch):
        r = scipy.signal.cont2discrete((A[idx], B[idx], np.eye(4), np.zeros((4, 2))), 0.1,
                                       method="zoh")
        np.testing.assert_allclose(Ad[idx], r[0], rtol=1e-13, atol=1e-14)
        np.testing.assert_allclose(Bd[idx], r[1], rtol=1e-13, atol=1e-14)
    with pytest.raises(InvalidArgumentError, match="dt"):
        trajopt.c2d(A, B, 0.0)


def test_discretize_of_a_matrix_pair_points_to_c2d():
    with pytest.raises(InvalidArgumentError, match="c2d"):
        trajopt.discretize((np.eye(2), np.ones((2, 1))), 0.1)


# --------------------------------------------------------------------- python-control


def _close(ours, theirs, eig_atol=1e-10):
    for a, b in zip(ours, theirs):
        a, b = np.asarray(a), np.asarray(b)
        if a.ndim == 1:   # eigenvalues: as sets
            np.testing.assert_allclose(np.sort_complex(a), np.sort_complex(b), atol=eig_atol)
        else:
            np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("with_n", [False, True])
def test_compat_matches_python_control(with_n):
    control = pytest.importorskip("control")
    A, B, Q, R, _, S = _system(7, 4, 2, False, True)
    N = S if with_n else None
    extra = (N,) if with_n else ()
    _close(compat.dlqr(A, B, Q, R, *extra), control.dlqr(A, B, Q, R, *extra))
    _close(compat.lqr(A, B, Q, R, *extra), control.lqr(A, B, Q, R, *extra))
    _close(compat.dare(A, B, Q, R, N), control.dare(A, B, Q, R, N, method="scipy"))
    _close(compat.care(A, B, Q, R, N), control.care(A, B, Q, R, N, method="scipy"))


def test_compat_estimators_and_state_space_objects():
    """dlqe / lqe (gain, covariance; eigenvalues against eig(A - L C) tightly and against
    python-control's, which come from a QZ of the pencil, to 1e-6) and StateSpace
    arguments, scalar weights included."""
    control = pytest.importorskip("control")
    rng = np.random.default_rng(8)
    A, G, C = rng.normal(size=(4, 4)), np.eye(4), rng.normal(size=(2, 4))
    QN, RN = 0.1 * np.eye(4), np.eye(2)
    for ours, theirs in ((compat.dlqe(A, G, C, QN, RN), control.dlqe(A, G, C, QN, RN)),
                         (compat.lqe(A, G, C, QN, RN), control.lqe(A, G, C, QN, RN))):
        _close(ours, theirs, eig_atol=1e-6)
        L, _, E = ours
        np.testing.assert_allclose(np.sort_complex(E),
                                   np.sort_complex(np.linalg.eigvals(A - L @ C)), atol=1e-10)
    B1 = rng.normal(size=(4, 1))
    sys = control.ss(A, B1, C, 0)
    _close(compat.lqr(sys, np.eye(4), 1), control.lqr(sys, np.eye(4), 1))
    dsys = control.ss(A / 3, B1, C, 0, 0.1)
    _close(compat.dlqr(dsys, np.eye(4), 1), control.dlqr(dsys, np.eye(4), 1))
    _close(compat.lqr(dsys, np.eye(4), 1), control.lqr(dsys, np.eye(4), 1))
    _close(compat.dlqe(dsys, QN[:1, :1], RN), control.dlqe(dsys, QN[:1, :1], RN),
           eig_atol=1e-6)
    with pytest.raises(InvalidArgumentError, match="dlqr"):
        compat.dlqr(A)


def test_compat_dispatches_on_the_sampling_time_as_python_control():
    """lqe on a discrete-time system is dlqe (it returned the continuous filter's gain);
    dlqr / dlqe refuse a continuous-time system (they returned a zero gain, treating A as
    discrete); python-control's keywords method= / stabilizing= / integral_action= are
    taken or refused by name; a QN of the wrong size is named."""
    control = pytest.importorskip("control")
    A = np.array([[0.5, 1.0], [0.0, 0.5]])
    B, C = np.array([[0.0], [1.0]]), np.array([[1.0, 0.0]])
    dsys = control.ss(A, B, C, 0, 0.1)
    _close(compat.lqe(dsys, np.eye(1), np.eye(1)), control.lqe(dsys, np.eye(1), np.eye(1)),
           eig_atol=1e-6)
    _close(compat.lqe(dsys, np.eye(1), np.eye(1)), compat.dlqe(dsys, np.eye(1), np.eye(1)))
    csys = control.ss(A - np.eye(2), B, C, 0)
    for fn, args in ((compat.dlqr, (csys, np.eye(2), np.eye(1))),
                     (compat.dlqe, (csys, np.eye(1), np.eye(1)))):
        with pytest.raises(InvalidArgumentError, match="continuous time"):
            fn(*args)
        with pytest.raises(control.ControlArgument):
            getattr(control, fn.__name__)(*args)
    for method in ("scipy", "slycot") if slycot_available() else ("scipy",):
        _close(compat.dlqr(A, B, np.eye(2), np.eye(1), method=method),
               control.dlqr(A, B, np.eye(2), np.eye(1), method=method))
        _close(compat.dare(A, B, np.eye(2), np.eye(1), method=method),
               control.dare(A, B, np.eye(2), np.eye(1), method=method))
    _close(compat.lqr(A - np.eye(2), B, np.eye(2), np.eye(1), method="scipy"),
           control.lqr(A - np.eye(2), B, np.eye(2), np.eye(1), method="scipy"))
    with pytest.raises(InvalidArgumentError, match="stabilizing=False"):
        compat.dare(A, B, np.eye(2), np.eye(1), stabilizing=False)
    with pytest.raises(InvalidArgumentError, match="integral_action"):
        compat.lqr(A, B, np.eye(2), np.eye(1), integral_action=np.eye(2))
    with pytest.raises(InvalidArgumentError, match="method"):
        compat.dlqr(A, B, np.eye(2), np.eye(1), method="newton")
    with pytest.raises(ShapeError, match="QN"):
        compat.dlqe(A, B, C, np.eye(2), np.eye(1))


def test_continuous_infinite_lqr_is_the_limit_of_fine_discretizations():
    """time="continuous": P, K, p, k equal the dt -> 0 limit of the discrete problem with
    A_d = I + dt A, B_d = dt B and the cost times dt (Richardson-extrapolated from dt and
    dt / 2: the error is O(dt^2)), and K equals python-control's lqr (sign flipped)."""
    rng = np.random.default_rng(11)
    n, m = 3, 2
    A, B = rng.normal(size=(n, n)), rng.normal(size=(n, m))
    Q, R = np.eye(n), np.eye(m)
    M, q, r = 0.1 * rng.normal(size=(m, n)), rng.normal(size=n), rng.normal(size=m)
    sol = trajopt.solve_infinite_lqr(A, B, Q, R, M, q, r, time="continuous")
    assert isinstance(sol.riccati, trajopt.CARESolution) and sol.dare is sol.riccati

    def discrete(dt):
        s = trajopt.solve_infinite_lqr(np.eye(n) + dt * A, dt * B, dt * Q, dt * R, dt * M,
                                       dt * q, dt * r)
        return np.concatenate([s.P.ravel(), s.K.ravel(), s.p.ravel(), s.k.ravel()])
    dt = 1e-3
    limit = 2 * discrete(dt / 2) - discrete(dt)
    ours = np.concatenate([sol.P.ravel(), sol.K.ravel(), sol.p.ravel(), sol.k.ravel()])
    # measured: 7.7e-4 at dt = 1e-3 without extrapolation, 3.2e-7 with it (O(dt^2))
    np.testing.assert_allclose(ours, limit, rtol=0, atol=1e-6 * np.abs(ours).max())
    control = pytest.importorskip("control")
    np.testing.assert_allclose(-sol.K, control.lqr(A, B, Q, R, M.T)[0], atol=1e-12)
    with pytest.raises(InvalidArgumentError, match="time"):
        trajopt.solve_infinite_lqr(A, B, Q, R, time="hybrid")
