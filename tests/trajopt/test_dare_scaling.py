"""issue "Nothing silent" #7: solve_dare at extreme scales of the cost.

``X(cQ, cR, cS) = c X(Q, R, S)`` and ``K`` does not change, so every method must return
``c`` times scipy's unit-scale solution, with a finite, small residual and no warning.
"""

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from trajopt.dare.backends import slycot_available
from trajopt.errors import NotStabilizableError, NumericalError, TrajoptError

METHODS = ["scipy", "doubling", "auto"] + (["slycot"] if slycot_available() else [])


def unstable_system(seed, n=4, m=2, with_s=False):
    """Random A with spectral radius 1.3 (open-loop unstable), random B, Q = I, R = I."""
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n))
    A *= 1.3 / np.abs(np.linalg.eigvals(A)).max()
    B = rng.normal(size=(n, m))
    S = 0.1 * rng.normal(size=(n, m)) if with_s else None
    return A, B, np.eye(n), np.eye(m), S


def solve_all(A, B, Q, R, S):
    """Every way of calling solve_dare: each method, Newton refinement, and batches."""
    out = {m: trajopt.solve_dare(A, B, Q, R, S=S, method=m) for m in METHODS}
    out["scipy+refine"] = trajopt.solve_dare(A, B, Q, R, S=S, method="scipy", refine=2)
    out["doubling+refine"] = trajopt.solve_dare(A, B, Q, R, S=S, method="doubling",
                                                refine=2)
    for m in ("auto", "doubling"):
        sol = trajopt.solve_dare(np.stack([A, A, A]), B, Q, R, S=S, method=m)
        out[f"batched {m}"] = sol
    t = [None if v is None else torch.tensor(v) for v in (A, B, Q, R, S)]
    out["auto torch"] = trajopt.solve_dare(t[0], t[1], t[2], t[3], S=t[4])
    return out


def refined_reference(A, B, Q, R, S, steps=3):
    """scipy's solution refined by Newton's method on the DARE (Hewer's iteration: the
    closed-loop Lyapunov equation of the current gain, by scipy): scipy's own answer can
    be ~10 kappa eps off (seed 31550: 3e-12 with cond(P) = 1.5e3)."""
    P = scipy.linalg.solve_discrete_are(A, B, Q, R, s=S)
    Sm = np.zeros(B.shape) if S is None else S
    for _ in range(steps):
        K = -np.linalg.solve(R + B.T @ P @ B, B.T @ P @ A + Sm.T)
        P = scipy.linalg.solve_discrete_lyapunov((A + B @ K).T,
                                                 Q + K.T @ R @ K + Sm @ K + K.T @ Sm.T)
        P = 0.5 * (P + P.T)
    return P


# unrefined LAPACK back ends: their backward error, measured up to 1.2e-13 (scipy, seed
# 31550); every other way is refined or checked against them ("auto")
RAW_BACK_ENDS = ("scipy", "slycot")


@settings(max_examples=examples(20), deadline=None)
@given(exponent=st.integers(-250, 250), seed=st.integers(0, 2**31 - 1),
       with_s=st.booleans())
def test_every_method_is_exact_at_any_scale_of_the_cost(exponent, seed, with_s):
    A, B, Q, R, S = unstable_system(seed, with_s=with_s)
    P1 = refined_reference(A, B, Q, R, S)
    # the forward error a backward-stable solver may make: measured <= 9 kappa eps over
    # 400 draws for every method (refined reference), so 64 kappa eps
    bound = 64 * np.linalg.cond(P1) * np.finfo(float).eps
    K1 = -np.linalg.solve(R + B.T @ P1 @ B, B.T @ P1 @ A + (0 if S is None else S.T))
    c = 10.0 ** exponent
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no ConvergenceWarning, no numpy RuntimeWarning
        sols = solve_all(A, B, c * Q, c * R, None if S is None else c * S)
    for name, sol in sols.items():
        P = np.asarray(sol.P)
        P = P if P.ndim == 2 else P[1]
        assert np.isfinite(P).all(), name
        err = np.abs(P / c - P1).max() / np.abs(P1).max()
        assert err <= bound, (name, exponent, err, bound)
        # normwise, as P's bound: seed 19828 (random profile) gave scipy's K an entry
        # -0.0805 off by 2.2e-11 = 3e-12 of max |K| (the same before session 31)
        np.testing.assert_allclose(np.asarray(sol.K).reshape(-1, *K1.shape)[-1], K1,
                                   rtol=1e-10, atol=1e-11 * np.abs(K1).max(), err_msg=name)
        res = np.asarray(sol.residual)
        limit = 1e-12 if name in RAW_BACK_ENDS else 1e-13
        assert np.isfinite(res).all() and res.max() <= limit, (name, res)


@pytest.mark.parametrize("exponent", [-300, -200, -150, 0, 150, 200, 300])
@pytest.mark.parametrize("method", METHODS)
def test_not_stabilizable_raises_at_any_scale(method, exponent):
    A = np.diag([1.5, 0.5])
    B = np.array([[0.0], [1.0]])
    c = 10.0 ** exponent
    with pytest.raises(NotStabilizableError):
        trajopt.solve_dare(A, B, c * np.eye(2), c * np.eye(1), method=method)
    with pytest.raises(NotStabilizableError):
        trajopt.solve_dare(np.stack([A, A]), B, c * np.eye(2), c * np.eye(1), method=method)


@pytest.mark.parametrize("method", METHODS)
def test_an_overflowing_solution_raises_instead_of_returning_inf(method):
    """The scaled problem is solved fine, but P = 1e300 * P_unit (~1e310) is not a
    float64: a trajopt error naming Q and R, never inf."""
    A, B, Q, R, _ = unstable_system(0)
    with pytest.raises(NumericalError, match="overflows float64.*Q, R"):
        trajopt.solve_dare(1e5 * A, B, 1e300 * Q, 1e300 * R, method=method)


@pytest.mark.parametrize("scales", [(1e200, 1.0), (1.0, 1e200), (1e-300, 1e-300),
                                    (1e-320, 1e-320), (1e307, 1e307)])
@pytest.mark.parametrize("method", METHODS)
def test_nothing_non_finite_or_inaccurate_is_returned_silently(method, scales):
    """Unbalanced or subnormal costs: each method answers accurately, warns with the
    residual, or raises a trajopt error; it never returns NaN/inf."""
    A, B, Q, R, _ = unstable_system(1)
    qs, rs = scales
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            sol = trajopt.solve_dare(A, B, qs * Q, rs * R, method=method)
        except TrajoptError:
            return
    P, res = np.asarray(sol.P), float(np.max(sol.residual))
    assert np.isfinite(P).all() and np.isfinite(res)
    assert res <= 1e-13 or any("relative residual" in str(w.message) for w in caught)


@pytest.mark.parametrize("exponent", [0, 4, 6, 7, 8, 8.5, 9])
@pytest.mark.parametrize("method", METHODS + ["batched auto"])
def test_a_large_a_never_returns_a_destabilizing_gain(exponent, method):
    """``A = 10^e [[1, .1], [0, 1]]``: where ``|A'XA|`` dwarfs Q the DARE's residual says
    nothing about the closed loop (at 1e8, doubling's answer had relative residual 2e-16
    and closed-loop radius 1.414 and passed a certificate formed from Q, R and K).  Every
    answer returned is stabilizing, or a trajopt error is raised."""
    A = 10.0 ** exponent * np.array([[1.0, 0.1], [0.0, 1.0]])
    B = np.array([[0.0], [0.1]])
    batched = method.startswith("batched")
    if batched:
        A, method = np.stack([A, np.eye(2)]), "auto"
    with warnings.catch_warnings():
        warnings.simplefilter("error", RuntimeWarning)   # numpy's overflow warnings
        warnings.simplefilter("ignore", trajopt.errors.ConvergenceWarning)
        try:
            sol = trajopt.solve_dare(A, B, np.eye(2), np.eye(1), method=method)
        except TrajoptError:
            return
    K = np.asarray(sol.K)
    rho = np.abs(np.linalg.eigvals(A + B @ K)).max()
    assert rho < 1, (method, exponent, rho)
