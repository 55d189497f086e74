"""The descriptor DARE with a nearly singular E, against a 1,200-digit reference
(``tests/reference/dare_mpmath.py``).

The pencil solvers' X carried errors of ~``cond(E)^2 eps`` (3e-5 at ``cond(E) = 1e4``)
with residuals below 1e-12, "auto" returned them silently (at ``cond(E) = 1e6``: 20 times
the solution's norm off) and its residual-driven Newton step made the gains worse
(session 31).  Now Newton steps in Hewer's form refine every descriptor solution of
"auto" (``trajopt.dare.newton.hewer_refine``), and the size of the last one is the
forward-error estimate that warns (docs/dare.md, "A nearly singular E").
"""

from __future__ import annotations

import re
import warnings

import numpy as np
import pytest
import torch

import trajopt
from tests.reference.dare_mpmath import descriptor_dare
from trajopt.errors import ConvergenceWarning, NumericalError


def family(seed: int, log_cond: int):
    """n = 4, m = 2, Q = I, R = I and E = U diag(1 .. 10^-log_cond) V' (U, V random
    orthogonal): A unstable through E^{-1}."""
    rng = np.random.default_rng(seed)
    A = 0.6 * rng.standard_normal((4, 4))
    B = rng.standard_normal((4, 2))
    U = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    V = np.linalg.qr(rng.standard_normal((4, 4)))[0]
    E = U @ np.diag(np.logspace(0, -log_cond, 4)) @ V.T
    return A, B, np.eye(4), np.eye(2), E


def error(P, X):
    return float(np.linalg.norm(np.asarray(P) - X) / np.linalg.norm(X))


def estimate(caught) -> float:
    """The forward-error estimate a ConvergenceWarning states."""
    (w,) = [w for w in caught if issubclass(w.category, ConvergenceWarning)]
    return float(re.search(r"accurate to about (\S+) ", str(w.message)).group(1))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auto_is_accurate_with_cond_e_1e4(seed):
    """Measured: 4e-14 / 1e-15 / 6e-14 (before: 5e-5 / 3e-6 / 5e-6, no warning)."""
    A, B, Q, R, E = family(seed, 4)
    X = descriptor_dare(A, B, Q, R, E)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = trajopt.solve_dare(A, B, Q, R, E=E)
    assert error(sol.P, X) <= 1e-11, (sol.method, error(sol.P, X))


def test_an_explicit_back_end_warns_and_refine_repairs_it():
    """scipy's own answer is 3e-5 off with a residual of 6e-13: a warning stating that
    (not an error: the caller chose the back end); ``refine=3`` takes Hewer's steps."""
    A, B, Q, R, E = family(0, 4)
    X = descriptor_dare(A, B, Q, R, E)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        raw = trajopt.solve_dare(A, B, Q, R, E=E, method="scipy")
    assert float(raw.residual) <= 1e-12       # 5.7e-13: the residual does not show it
    err = error(raw.P, X)
    assert err >= 1e-7
    assert err / 10 <= estimate(caught) <= 10 * err
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        refined = trajopt.solve_dare(A, B, Q, R, E=E, method="scipy", refine=3)
    assert refined.method == "scipy+newton"
    assert error(refined.P, X) <= 1e-11


def test_a_batch_on_the_doubling_path():
    """torch, batched: doubling, then Hewer's steps per element (measured 9e-13, 7e-16,
    2e-13, 5e-16; doubling alone 2e-6 .. 4e-16)."""
    systems = [family(s, c) for s, c in [(0, 4), (1, 2), (2, 4), (3, 0)]]
    A, B, _, _, E = (torch.tensor(np.stack(v)) for v in zip(*systems))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = trajopt.solve_dare(A, B, torch.eye(4), torch.eye(2), E=E)
    assert sol.method.startswith("doubling")
    for i, (a, b, q, r, e) in enumerate(systems):
        assert error(sol.P[i], descriptor_dare(a, b, q, r, e)) <= 1e-11, i


def test_where_it_stays_inaccurate_it_says_so():
    """cond(E) = 1e6: "auto" (scipy refuses, doubling) returned X 20 times its norm off
    without a warning; now 9e-6 off, and the warning's estimate says about as much."""
    A, B, Q, R, E = family(0, 6)
    X = descriptor_dare(A, B, Q, R, E)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = trajopt.solve_dare(A, B, Q, R, E=E)
    err = error(sol.P, X)
    assert err <= 1e-4
    assert err / 10 <= estimate(caught) <= 10 * err


def test_e_a_multiple_of_the_identity():
    """E = 1e-6 I (a user trial's case): A / 1e-6 has eigenvalues 1e6, the value is
    ~1e16 times Q and accurate to ~5e-6 -- said by the warning (the trial's own
    reference, scipy on the standard form, was 100 % off). At this conditioning the
    estimate (the last Newton step's size, ~4e-6) bounds the answer's error but does not
    track it from above: where the rounding of the doubling lets that step land closer,
    the answer is better than said (session 32: the compiled SDA loop's answer 7.3e-8
    off with an estimate of 3.9e-6; the torch loop's 9.3e-6 off with 5.2e-6)."""
    A = np.array([[1.0, 0.1], [0.0, 1.0]])
    B = np.array([[0.0], [0.1]])
    E = 1e-6 * np.eye(2)
    X = descriptor_dare(A, B, np.eye(2), np.eye(1), E)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        sol = trajopt.solve_dare(A, B, np.eye(2), np.eye(1), E=E)
    err = error(sol.P, X)
    assert err <= 1e-4
    assert err / 10 <= estimate(caught) <= 1e-4


def test_auto_refuses_an_answer_off_by_more_than_1e_3(monkeypatch):
    """The rule itself: a forward-error estimate above 1e-3 is no solution for "auto"
    (a NumericalError), a warning for an explicit method."""
    import trajopt.dare.solve as dsolve
    A, B, Q, R, E = family(1, 2)

    def far(d, X, steps):
        return X, 0.5 + 0 * X.sum()
    monkeypatch.setattr(dsolve, "hewer_refine", far)
    with pytest.raises(NumericalError, match="accurate to about 5.0e-01"):
        trajopt.solve_dare(A, B, Q, R, E=E)
    with pytest.warns(ConvergenceWarning, match="accurate to about 5.0e-01"):
        trajopt.solve_dare(A, B, Q, R, E=E, method="doubling")


def test_a_zero_solution_is_a_fixed_point():
    """Q = 0 and a stable A: X = 0, whose Hewer step has size 0/0 (the session's review:
    "auto" raised 'accurate to about inf', also for a batch holding one such element)."""
    rng = np.random.default_rng(3)
    A = rng.standard_normal((4, 4))
    A = 0.5 * A / np.abs(np.linalg.eigvals(A)).max()
    B, E = rng.standard_normal((4, 2)), np.eye(4) + 0.1 * rng.standard_normal((4, 4))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for args in [(A, B, np.zeros((4, 4)), np.eye(2), E),
                     tuple(torch.tensor(v) for v in (A, B, np.zeros((4, 4)), np.eye(2), E))]:
            sol = trajopt.solve_dare(*args[:4], E=args[4])
            assert float(np.abs(np.asarray(sol.P)).max()) == 0.0
        Qs = torch.tensor(np.stack([np.zeros((4, 4)), np.eye(4)]))
        sol = trajopt.solve_dare(torch.tensor(A), torch.tensor(B), Qs, torch.eye(2, dtype=Qs.dtype),
                                 E=torch.tensor(E))
        assert float(sol.P[0].abs().max()) == 0.0
        X = descriptor_dare(A, B, np.eye(4), np.eye(2), E)
        assert error(sol.P[1], X) <= 1e-13


@pytest.mark.parametrize("seed", [1, 3, 4])
def test_float32_data_keep_the_float64_back_ends_accuracy(seed):
    """float32 data, cond(E) = 1e3: Hewer's steps run in float64 and the answer is the
    float64 one rounded (a float32 step took 2e-8 to 2-7e-6, the session's review); the
    float32 residual, rounding noise of ~1e-3 there, is not held against it (at the
    session's start seeds 1 and 4 were refused as 'no back end found a solution', seed 3
    warned of an inaccurate solution)."""
    rng = np.random.default_rng(seed)
    A = rng.standard_normal((6, 6))
    A = 0.9 * A / np.abs(np.linalg.eigvals(A)).max()
    B = rng.standard_normal((6, 2))
    U, _, Vt = np.linalg.svd(rng.standard_normal((6, 6)))
    E = U @ np.diag(np.geomspace(1, 1e3, 6)) @ Vt
    data = [v.astype(np.float32).astype(np.float64) for v in (A, B, np.eye(6), np.eye(2), E)]
    X = descriptor_dare(*data)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = trajopt.solve_dare(*(torch.tensor(v, dtype=torch.float32) for v in data[:4]),
                                 E=torch.tensor(data[4], dtype=torch.float32))
    assert sol.P.dtype == torch.float32
    assert error(sol.P.double(), X) <= 1e-7
