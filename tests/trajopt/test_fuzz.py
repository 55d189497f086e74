"""Fuzzing the public solvers with corrupted problems: every call raises a trajopt error or
returns a finite result that an independent check verifies; nothing else.

Each example starts from a valid random problem (seeded) and applies one fault: a NaN or
inf entry, a scale of 10^k on the cost matrices (k in [-100, 100]), a zero, singular or
indefinite R, a non-symmetric Q, a dropped row, nested lists, float32 or integer data.
The verdict:

* a :class:`~trajopt.errors.TrajoptError` (any other exception fails the test);
* or a result with every field finite, checked without trajopt's code: the DARE residual
  and closed-loop spectral radius in numpy (on the problem divided by its scale, so that
  the check itself cannot overflow), the finite LQR against the dense KKT solve of
  ``tests/reference/lqr_kkt.py``, DDP's cost no worse than its initial rollout's and, when
  converged on an LQ problem, equal to the KKT optimum;
* a result that comes with a :class:`~trajopt.errors.ConvergenceWarning` must still be
  finite (the warning is what keeps it from being silent).
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from tests.reference.lqr_kkt import NpStage, kkt_solve
from trajopt.errors import ConvergenceWarning, TrajoptError

FAULTS = ["none", "nan", "inf", "scale", "zero_R", "singular_R", "indefinite_R",
          "asymmetric_Q", "drop_row", "lists", "float32", "int"]
SOLVABLE = ("none", "scale", "lists")  # valid problems: they must be solved


def _problem(seed, n, m):
    rng = np.random.default_rng(seed)
    A = rng.normal(size=(n, n)) / np.sqrt(n) * 1.2
    B = rng.normal(size=(n, m))
    L = rng.normal(size=(n, n))
    Q = L @ L.T / n + 0.1 * np.eye(n)
    R = np.eye(m) + 0.1 * np.diag(rng.random(m))
    return rng, {"A": A, "B": B, "Q": Q, "R": R}


def _corrupt(rng, p, fault, k):
    """Apply ``fault`` to the problem ``p`` (a dict of arrays); returns the new dict and
    the factor the cost was scaled by."""
    p = dict(p)
    scale = 1.0
    name = ["A", "B", "Q", "R"][int(rng.integers(4))]
    if fault in ("nan", "inf"):
        v = p[name].copy()
        v.flat[int(rng.integers(v.size))] = math.nan if fault == "nan" else math.inf
        p[name] = v
    elif fault == "scale":
        scale = 10.0 ** k
        p["Q"], p["R"] = p["Q"] * scale, p["R"] * scale
    elif fault == "zero_R":
        p["R"] = np.zeros_like(p["R"])
    elif fault == "singular_R":
        p["R"] = p["R"].copy()
        p["R"][0], p["R"][:, 0] = 0.0, 0.0
    elif fault == "indefinite_R":
        p["R"] = -p["R"]
    elif fault == "asymmetric_Q":
        p["Q"] = p["Q"] + np.triu(np.ones_like(p["Q"]), 1)
    elif fault == "drop_row":
        p[name] = p[name][1:]
    elif fault == "lists":
        p = {key: v.tolist() for key, v in p.items()}
    elif fault == "float32":
        p = {key: torch.tensor(v, dtype=torch.float32) for key, v in p.items()}
    elif fault == "int":
        p = {key: np.rint(v * 3).astype(np.int64) for key, v in p.items()}
    return p, scale


def _call(fn):
    """Run ``fn``: ("error", exc), ("warned", result) or ("ok", result); any exception
    that is not a trajopt error propagates and fails the test."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            out = fn()
        except TrajoptError as exc:
            return "error", exc
    if any(issubclass(w.category, ConvergenceWarning) for w in caught):
        return "warned", out
    return "ok", out


def _np(v):
    return v.detach().cpu().double().numpy() if torch.is_tensor(v) else np.asarray(v, float)


def _all_finite(*values):
    return all(np.isfinite(_np(v)).all() for v in values)


def _dare_check(p, P, scale):
    """Relative residual of the DARE and closed-loop spectral radius, in numpy, on the
    problem divided by ``scale`` (P / scale solves it)."""
    A, B, Q, R = (_np(p[k]) for k in "ABQR")
    Q, R, X = Q / scale, R / scale, _np(P) / scale
    G = R + B.T @ X @ B
    K = np.linalg.solve(G, B.T @ X @ A)
    res = A.T @ X @ A - X - A.T @ X @ B @ K + Q
    size = max(np.abs(Q).max(), np.abs(X).max(), np.abs(A.T @ X @ A).max())
    rho = np.abs(np.linalg.eigvals(A - B @ K)).max()
    return np.abs(res).max() / max(size, np.finfo(float).tiny), rho  # P = 0 for Q = 0


@settings(max_examples=examples(60), deadline=None)
@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 5), m=st.integers(1, 3),
       fault=st.sampled_from(FAULTS), k=st.integers(-100, 100),
       method=st.sampled_from(["auto", "scipy", "doubling"]))
def test_solve_dare_errs_or_is_verified(seed, n, m, fault, k, method):
    rng, base = _problem(seed, n, m)
    p, scale = _corrupt(rng, base, fault, k)
    verdict, out = _call(lambda: trajopt.solve_dare(p["A"], p["B"], p["Q"], p["R"],
                                                    method=method))
    if fault in SOLVABLE:
        assert verdict == "ok", (fault, out)
    if verdict == "error":
        return
    assert _all_finite(out.P, out.K, out.residual), (fault, verdict)
    if verdict == "ok":
        # float32: trajopt warns above sqrt(eps32) = 3.5e-4 of its own relative residual,
        # normalized by the sum of the terms' norms (up to ~3x this check's max-norm)
        tol = 1e-3 if fault == "float32" else 1e-8
        residual, rho = _dare_check(p, out.P, scale)
        assert residual < tol and rho < 1, (fault, residual, rho)


def _lqr_problem(p, T):
    return trajopt.LQR(A=[p["A"]] * T, B=[p["B"]] * T, Q=[p["Q"]] * T, R=[p["R"]] * T,
                       QT=p["Q"])


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 4), m=st.integers(1, 3),
       fault=st.sampled_from(FAULTS), k=st.integers(-100, 100), T=st.integers(1, 6))
def test_solve_lqr_errs_or_matches_kkt(seed, n, m, fault, k, T):
    rng, base = _problem(seed, n, m)
    p, scale = _corrupt(rng, base, fault, k)
    x0 = rng.normal(size=n)
    verdict, out = _call(lambda: trajopt.solve_lqr(_lqr_problem(p, T), x0))
    if fault in SOLVABLE + ("float32",):
        assert verdict == "ok", (fault, out)
    if verdict == "error":
        return
    assert _all_finite(out.K, out.k, out.P, out.xs, out.us), fault
    A, B, Q, R = (_np(p[key]) for key in "ABQR")
    if np.linalg.eigvalsh(R).min() <= 0:  # a nonconvex stage: no KKT reference
        return
    stages = [NpStage(A, B, Q / scale, R / scale) for _ in range(T)]
    _, us, _ = kkt_solve(stages, Q / scale, None, x0)
    tol = 1e-3 if fault == "float32" else 1e-7
    np.testing.assert_allclose(_np(out.us), np.stack(us), rtol=tol,
                               atol=tol * (1 + np.abs(np.stack(us)).max()))


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 2 ** 16), n=st.integers(1, 3), fault=st.sampled_from(
    ["none", "nan_x0", "inf_us0", "huge_x0", "tiny_x0", "scale", "asymmetric_Q",
     "float32"]), k=st.integers(-100, 100))
def test_solve_ddp_errs_or_improves(seed, n, fault, k):
    m = 1
    rng, p = _problem(seed, n, m)
    A, B = (torch.tensor(p[key]) for key in "AB")
    Q, R = p["Q"], p["R"]
    x0, us0 = rng.normal(size=n), np.zeros((8, m))
    dtype = torch.float64
    if fault == "nan_x0":
        x0[0] = math.nan
    elif fault == "inf_us0":
        us0[3, 0] = math.inf
    elif fault in ("huge_x0", "tiny_x0"):
        x0 = x0 * 10.0 ** (abs(k) if fault == "huge_x0" else -abs(k))
    elif fault == "scale":
        Q, R = Q * 10.0 ** k, R * 10.0 ** k
    elif fault == "asymmetric_Q":
        Q = Q + np.triu(np.ones_like(Q), 1)
    elif fault == "float32":
        dtype = torch.float32

    def run():
        cost = trajopt.QuadraticCost(torch.tensor(Q, dtype=dtype),
                                     torch.tensor(R, dtype=dtype),
                                     torch.tensor(Q, dtype=dtype))
        Ad, Bd = A.to(dtype), B.to(dtype)
        dyn = trajopt.Dynamics(lambda x, u, t: x @ Ad.T + u @ Bd.T, time_invariant=True)
        return trajopt.solve_ddp(dyn, cost, torch.tensor(x0, dtype=dtype),
                                 torch.tensor(us0, dtype=dtype), max_iter=20)
    verdict, out = _call(run)
    if fault in ("none", "scale", "huge_x0", "tiny_x0"):  # valid LQ problems
        assert verdict == "ok" and out.converged.item(), (fault, out)
    if verdict == "error":
        return
    assert _all_finite(out.xs, out.us, out.cost, out.K, out.k, out.Vx, out.Vxx), fault
    if out.converged.item() and dtype == torch.float64 and fault != "asymmetric_Q":
        # the LQ optimum is linear in x0 and invariant to the cost's scale
        x0s = np.abs(x0).max()
        stages = [NpStage(p["A"], p["B"], p["Q"], p["R"]) for _ in range(8)]
        _, us, _ = kkt_solve(stages, p["Q"], None, x0 / x0s)
        us = np.stack(us)
        np.testing.assert_allclose(_np(out.us) / x0s, us, rtol=1e-6,
                                   atol=1e-7 * (1 + np.abs(us).max()))


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_rollout_refuses_non_finite_controls(bad):
    _, p = _problem(0, 2, 1)
    us = np.zeros((4, 1))
    us[2, 0] = bad
    with pytest.raises(TrajoptError, match="us"):
        trajopt.rollout(_lqr_problem(p, 4), np.ones(2), us)
