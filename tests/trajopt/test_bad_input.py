"""Bad input and degenerate problems: each case must raise a trajopt error of the stated
type whose message names the argument or the cause (never NaN or a wrong answer).

One table row per (function, bad input); the defects of the issue "Nothing silent" that
are fixed carry their number there.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch

import trajopt
import trajopt.problems
from trajopt.errors import (
    InvalidArgumentError,
    NonFiniteError,
    NotStabilizableError,
    NotSymmetricError,
    ShapeError,
    TrajoptError,
)


def _cyclic_not_stabilizable():        # issue 15 #1: returned P with inf, no warning
    trajopt.solve_cyclic_lqr([np.diag([3., .5])] * 2, [np.array([[0.], [1.]])] * 2,
                             [np.eye(2)] * 2, [np.eye(1)] * 2, method="sweep")


def _cyclic_not_detectable():          # issue 15 #1: returned a non-stabilizing P
    trajopt.solve_cyclic_lqr([np.diag([2., .5])] * 2, [np.array([[1.], [1.]])] * 2,
                             [np.diag([0., 1.])] * 2, [np.eye(1)] * 2, method="sweep")


def _quadratic_cost_asymmetric():      # issue 15 #3: wrong derivatives silently
    trajopt.QuadraticCost(np.array([[1.0, 2.0], [1.0, 1.0]]), np.eye(1), np.eye(2))


def _quadratic_cost_nan():
    trajopt.QuadraticCost(np.eye(2), np.array([[np.nan]]), np.eye(2))


def _quadratic_cost_shape():
    trajopt.QuadraticCost(np.eye(2), np.eye(1), np.eye(3))


def _quadratic_cost_ref_shape():
    trajopt.QuadraticCost(np.eye(2), np.eye(1), np.eye(2), x_ref=np.zeros(3))


def _rollout_nan_controls():           # issue 15 #9: NaN states and cost unchecked
    T = 3
    prob = trajopt.LQR(A=np.broadcast_to(np.eye(2), (T, 2, 2)),
                       B=np.broadcast_to(np.ones((2, 1)), (T, 2, 1)),
                       Q=np.broadcast_to(np.eye(2), (T, 2, 2)),
                       R=np.broadcast_to(np.eye(1), (T, 1, 1)), QT=np.eye(2))
    us = np.zeros((T, 1))
    us[1, 0] = np.inf
    trajopt.rollout(prob, np.zeros(2), us)


def _tiny_asymmetric_q():              # issue 15: an absolute symmetry test let it pass
    T = 2
    trajopt.LQR(A=np.broadcast_to(np.eye(2), (T, 2, 2)),
                B=np.broadcast_to(np.ones((2, 1)), (T, 2, 1)),
                Q=np.broadcast_to(np.array([[1.0, 1.0], [0.0, 1.0]]) * 1e-150, (T, 2, 2)),
                R=np.broadcast_to(np.eye(1), (T, 1, 1)), QT=np.eye(2))


def _two_phase():
    return [np.eye(2)] * 2, [np.ones((2, 1))] * 2, [np.eye(2)] * 2, [np.eye(1)] * 2


def _line_search(c1):
    return lambda: trajopt.LineSearch(c1=c1)


def _ddp(limits, m=1):
    from trajopt import problems
    p = problems.get("double_integrator")
    us0 = np.zeros((5, m))
    return lambda: trajopt.solve_ddp(p.dynamics, p.cost, p.x0, us0, control_limits=limits,
                                     max_iter=1)


def _ddp_shapes(x0, us0):
    from trajopt import problems
    p = problems.get("double_integrator")
    return lambda: trajopt.solve_ddp(p.dynamics, p.cost, x0, us0, max_iter=1)


def _ddp_user_functions(dynamics, running):
    cost = trajopt.Cost(running, lambda x: (x * x).sum(-1))
    return lambda: trajopt.solve_ddp(dynamics, cost, np.ones((3, 2)), np.zeros((3, 4, 1)),
                                     max_iter=1)


def _lin(x, u, t):
    return x + 0.1 * u


def _rotation_dare(method, batch):
    """issue "Nothing silent" #2: an undamped rotation that Q does not weigh; doubling's
    certificate (A_k -> 0 under rounding) accepted a P with radius 1 - 1e-16."""
    c, s = np.cos(0.3), np.sin(0.3)
    A = np.zeros((4, 4))
    A[:2, :2] = [[c, -s], [s, c]]
    A[2:, 2:] = [[1.0, 1.0], [0.0, 1.0]]
    B, Q, R = np.array([[0.0], [0.0], [0.0], [1.0]]), np.diag([0.0, 0.0, 1.0, 1.0]), np.eye(1)
    if batch:
        A, B, Q, R = (np.stack([v, v]) for v in (A, B, Q, R))
    return lambda: trajopt.solve_dare(A, B, Q, R, method=method)


CASES = [
    (_rotation_dare("doubling", False), NotStabilizableError, "no stabilizing solution"),
    (_rotation_dare("auto", True), NotStabilizableError, "no stabilizing solution"),
    (_rotation_dare("doubling", True), NotStabilizableError, "no stabilizing solution"),
    (lambda: trajopt.solve_dare(np.eye(2), np.eye(2), np.eye(2), np.eye(2), refine=1.5),
     InvalidArgumentError, "^refine must be an integer"),
    (_ddp_user_functions(_lin, lambda x, u, t: (x * x).sum(-1, keepdim=True)), ShapeError,
     r"^cost.running must return one value per batch element, shape \(3,\); got \(3, 1\)"),
    (_ddp_user_functions(_lin, lambda x, u, t: 1.0), ShapeError,
     r"^cost.running must return one value per batch element.*got float"),
    (_ddp_user_functions(lambda x, u, t: (x, u), lambda x, u, t: (u * u).sum(-1)),
     ShapeError, "^the dynamics"),
    (_ddp_shapes(np.zeros((0, 2)), np.zeros((0, 5, 1))), ShapeError, "^the batch of x0"),
    (_ddp_shapes(np.zeros(2), np.zeros((0, 1))), ShapeError, r"^us0 must have shape .* T >= 1"),
    (_ddp_shapes(np.zeros(0), np.zeros((5, 1))), ShapeError, r"^x0 must have at least one"),
    (lambda: trajopt.solve_infinite_lqr(np.eye(2), np.ones((2, 1)), np.eye(2), np.eye(1),
                                        M=np.ones((2, 1))), ShapeError,
     r"^M must have shape \(\.\.\., 1, 2\)"),
    (_ddp(([-1.0], [1.0], [0.0])), InvalidArgumentError, "^control_limits must be a pair"),
    (_ddp(([np.nan], [1.0])), NonFiniteError, r"^control_limits\[0\] \(lo\) contains NaN"),
    (_ddp(([-1.0, -1.0], [1.0, 1.0])), ShapeError, r"must be \(lo, hi\) of shape \(1,\)"),
    (lambda: trajopt.solve_cyclic_lqr(*_two_phase(), method="newton"),
     InvalidArgumentError, "^method must be one of"),
    (lambda: trajopt.solve_cyclic_lqr(*_two_phase(), method="sweep", max_sweeps=0),
     InvalidArgumentError, "^max_sweeps must be an integer >= 1"),
    (lambda: trajopt.solve_cyclic_lqr(*_two_phase(), method="sweep", tol=float("nan")),
     InvalidArgumentError, "^tol must lie in"),
    (lambda: trajopt.solve_dare(np.eye(2), np.ones((2, 1)), np.eye(2), np.eye(1),
                                method="qz"), InvalidArgumentError, "^method must be one of"),
    (lambda: trajopt.discretize(lambda x, u: x, float("inf")), InvalidArgumentError,
     "^dt must be positive and finite"),
    (lambda: trajopt.discretize(lambda x, u: x, 0.1, "midpoint"), InvalidArgumentError,
     "^method must be 'rk4' or 'euler'"),
    (_line_search(float("nan")), InvalidArgumentError, "^line-search c1"),
    (_line_search(-5.0), InvalidArgumentError, "^line-search c1"),
    (_line_search(2.0), InvalidArgumentError, "^line-search c1"),
    (lambda: trajopt.Span(1.5, 2), InvalidArgumentError, "^span start must be an integer"),
    (lambda: trajopt.Span(0, 2, n_params=2.0), InvalidArgumentError,
     "^span n_params must be an integer"),
    (lambda: trajopt.problems.get("no_such"), InvalidArgumentError, "^unknown problem"),

    (_cyclic_not_stabilizable, NotStabilizableError, "diverged"),
    (_cyclic_not_detectable, NotStabilizableError, "non-stabilizing"),
    (_quadratic_cost_asymmetric, NotSymmetricError, "^Q must be symmetric"),
    (_quadratic_cost_nan, NonFiniteError, "^R contains NaN"),
    (_quadratic_cost_shape, ShapeError, "^QT must have shape"),
    (_quadratic_cost_ref_shape, ShapeError, "^x_ref must have shape"),
    (_rollout_nan_controls, NonFiniteError, r"^us\[1\] contains NaN"),
    (_tiny_asymmetric_q, NotSymmetricError, "^Q must be symmetric"),
    # half precision and meta tensors: named, not a raw "not implemented for 'Half'"
    (lambda: trajopt.solve_dare(*(torch.as_tensor(v, dtype=torch.float16) for v in
                                  (np.eye(2), np.ones((2, 1)), np.eye(2), np.eye(1)))),
     InvalidArgumentError, "^A has dtype torch.float16: trajopt solves in float32"),
    (lambda: trajopt.solve_dare(np.eye(2), torch.ones(2, 1, dtype=torch.bfloat16),
                                np.eye(2), np.eye(1)),
     InvalidArgumentError, "has dtype torch.bfloat16"),
    (lambda: trajopt.solve_lqr(trajopt.LQR(A=torch.eye(2, device="meta").expand(3, 2, 2),
                                           B=torch.ones(3, 2, 1), Q=torch.eye(2).expand(
                                               3, 2, 2), R=torch.eye(1).expand(3, 1, 1),
                                           QT=torch.eye(2)), torch.zeros(2)),
     InvalidArgumentError, "^A is a meta tensor"),
    # stacked A with another stage argument as a list (a TypeError from isfinite before)
    (lambda: trajopt.LQR(A=torch.eye(2).expand(3, 2, 2), B=torch.ones(3, 2, 1),
                         Q=torch.eye(2).expand(3, 2, 2), R=torch.eye(1).expand(3, 1, 1),
                         c=[torch.zeros(2)] * 3, QT=torch.eye(2)),
     ShapeError, "A is a stacked array but c given as sequences"),
    (lambda: trajopt.LinearDynamics(torch.eye(2), torch.ones(3, 1)),
     ShapeError, r"B must be \(2, m\)"),
    # session 30's user trial: raw torch / numpy / AttributeError before
    (lambda: trajopt.solve_lqr(_batch3(), np.ones((4, 2))), ShapeError,
     r"batch dimensions do not broadcast: A\[0\] batch \(3,\).*x0 batch \(4,\)"),
    (lambda: trajopt.rollout(_batch3(), np.ones((4, 2)), np.zeros((5, 1))), ShapeError,
     r"do not broadcast.*x0 batch \(4,\)"),
    (lambda: trajopt.rollout(_batch3(), np.ones(2), np.zeros((4, 5, 1))), ShapeError,
     r"do not broadcast.*us\[0\] batch \(4,\)"),
    (lambda: trajopt.solve_infinite_lqr(np.stack([np.eye(2)] * 3), np.ones((2, 1)),
                                        np.eye(2), np.eye(1), q=np.ones((4, 2))),
     ShapeError, r"do not broadcast: A batch \(3,\).*q batch \(4,\)"),
    (lambda: trajopt.solve_dare(np.eye(2), np.ones((2, 1)), None, np.eye(1)),
     InvalidArgumentError, "^Q is required; got None"),
    (lambda: trajopt.solve_care(-np.eye(2), None, np.eye(2), np.eye(1)),
     InvalidArgumentError, "^B is required; got None"),
    (lambda: trajopt.solve_dare("abc", np.ones((2, 1)), np.eye(2), np.eye(1)),
     ShapeError, "^A could not be read as a numeric array"),
    (lambda: trajopt.solve_dare([[1, 0.1], [0]], np.ones((2, 1)), np.eye(2), np.eye(1)),
     ShapeError, "^A could not be read as a numeric array"),
    (lambda: trajopt.compat.dlqr(np.eye(2), np.ones((2, 1)), np.eye(2), np.eye(1),
                                 np.ones((1, 2))), ShapeError, r"^N must have shape"),
]


def _batch3():
    return trajopt.LQR.time_invariant(np.stack([np.eye(2), 0.5 * np.eye(2), np.eye(2)]),
                                      np.ones((2, 1)), np.eye(2), np.eye(1), 5)


@pytest.mark.parametrize("case,error,match", CASES,
                         ids=[c[0].__name__.lstrip("_") if c[0].__name__ != "<lambda>"
                              else f"{c[2].lstrip('^')[:30]}-{i}"
                              for i, c in enumerate(CASES)])
def test_bad_input_raises_a_named_trajopt_error(case, error, match):
    with pytest.raises(error, match=match) as info:
        case()
    assert isinstance(info.value, TrajoptError)


def test_cyclic_sweep_still_solves_a_detectable_cycle():
    """The new checks of the sweep do not reject a good cycle: it agrees with "lift"."""
    g = np.random.default_rng(0)
    As = [g.standard_normal((3, 3)) for _ in range(3)]
    Bs = [g.standard_normal((3, 1)) for _ in range(3)]
    Qs, Rs = [np.eye(3)] * 3, [np.eye(1)] * 3
    a = trajopt.solve_cyclic_lqr(As, Bs, Qs, Rs, method="sweep")
    b = trajopt.solve_cyclic_lqr(As, Bs, Qs, Rs, method="lift")
    for Pa, Pb in zip(a.P, b.P):
        np.testing.assert_allclose(Pa, Pb, rtol=1e-9, atol=1e-10)


def test_symmetry_check_is_relative_in_both_directions():
    """A tiny symmetric matrix passes, a large one with rounding-level asymmetry passes."""
    from trajopt._checks import check_symmetric
    check_symmetric(torch.eye(2, dtype=torch.float64) * 1e-150, "Q")
    big = torch.tensor([[1e10, 1.0], [1.0 + 1e-6, 1e10]], dtype=torch.float64)
    check_symmetric(big, "Q")


def test_nested_lists_are_arrays_for_the_dare_as_in_scipy():
    """issue "Nothing silent": lists gave "'list' object has no attribute 'ndim'"."""
    A, B = [[1.0, 0.1], [0.0, 1.0]], [[0.0], [0.1]]
    a = trajopt.solve_dare(A, B, [[1.0, 0.0], [0.0, 1.0]], [[1.0]])
    b = trajopt.solve_dare(np.array(A), np.array(B), np.eye(2), np.eye(1))
    assert isinstance(a.P, np.ndarray)
    np.testing.assert_array_equal(a.P, b.P)
    c = trajopt.solve_infinite_lqr(A, B, np.eye(2), [[1.0]], q=[1.0, 0.0])
    d = trajopt.solve_infinite_lqr(np.array(A), np.array(B), np.eye(2), np.eye(1),
                                   q=np.array([1.0, 0.0]))
    np.testing.assert_array_equal(c.p, d.p)


def _pendulum2(x, u, t):
    th, om = x[..., 0], x[..., 1]
    om2 = om + 0.05 * (-9.81 * torch.sin(th) + u[..., 0])
    return torch.stack([th + 0.05 * om2, om2], -1)


_COST2 = trajopt.Cost(lambda x, u, t: 0.5 * (x[..., 0] ** 2 + 0.01 * u[..., 0] ** 2),
                      lambda x: 0.5 * 10 * x[..., 0] ** 2)


def test_an_x0_of_the_wrong_size_warns():
    """A 2-state model given a 3-entry x0 with one tensor of controls: the state size
    changes at the first stage only, which warns naming x0 (it solved silently); the
    controls as a per-stage list declare stage sizes that differ (no warning), and an x0
    of the right size gives none."""
    us0 = torch.zeros(20, 1, dtype=torch.float64)
    with pytest.warns(UserWarning, match="x0 has 3 entries .* return 2"):
        trajopt.solve_ddp(_pendulum2, _COST2, torch.tensor([0.1, 0.0, 5.0],
                                                           dtype=torch.float64), us0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trajopt.solve_ddp(_pendulum2, _COST2, torch.tensor([0.1, 0.0, 5.0],
                                                           dtype=torch.float64), list(us0))
        trajopt.solve_ddp(_pendulum2, _COST2, torch.tensor([0.1, 0.0], dtype=torch.float64),
                          us0)


@pytest.mark.parametrize("method", ["auto", "scipy", "doubling"])
def test_dare_with_a_singular_e_names_e(method):
    """A singular descriptor matrix: InvalidArgumentError naming E, as the CARE does (it
    was NotStabilizableError from scipy: "Matrix e is numerically singular")."""
    A, B = np.diag([0.9, 0.5]), np.eye(2)
    with pytest.raises(InvalidArgumentError, match="^E must be invertible for the DARE"):
        trajopt.solve_dare(A, B, np.eye(2), np.eye(2), E=np.diag([1.0, 0.0]), method=method)
    with pytest.raises(InvalidArgumentError, match="^E must be invertible"):
        trajopt.solve_dare(torch.tensor(A)[None], torch.tensor(B)[None], torch.eye(2,
                           dtype=torch.float64), torch.eye(2, dtype=torch.float64),
                           E=torch.diag(torch.tensor([1.0, 0.0], dtype=torch.float64)),
                           method=method)


def test_doubling_names_what_it_cannot_solve():
    """An unstable mode Q does not see (stabilizable: scipy and "auto" solve it): the
    doubling's failure says so and points to them (it blamed the unit circle)."""
    A, B, Q, R = np.diag([1.2, 0.5]), np.eye(2), np.diag([0.0, 1.0]), np.eye(2)
    P = trajopt.solve_dare(A, B, Q, R).P
    np.testing.assert_allclose(P, scipy.linalg.solve_discrete_are(A, B, Q, R), atol=1e-12)
    with pytest.raises(NotStabilizableError, match="not seen by Q.*'auto' or 'scipy'"):
        trajopt.solve_dare(A, B, Q, R, method="doubling")


@pytest.mark.parametrize("players", [None, (1, 1)])
def test_dynamics_that_add_a_dimension_to_one_point_are_named(players):
    """f broadcasts one point x (2,) against a (1, 2) row and returns (1, 2): a ShapeError
    naming the dynamics and the Jacobian's shape (it was a raw IndexError in the line
    search, or a Cholesky error with players)."""
    A = torch.tensor([[0.9, 0.3], [-0.2, 0.8]], dtype=torch.float64)
    Bt = torch.tensor([[0.5, 1.0]], dtype=torch.float64)

    def f(x, u, t):
        return x + 0.3 * torch.tanh(x @ A.T + u.sum(-1, keepdim=True) * Bt)
    with pytest.raises(ShapeError, match="^the dynamics must map one point"):
        trajopt.solve_ddp(f, _COST2, torch.tensor([0.5, 0.2], dtype=torch.float64),
                          torch.zeros(10, 2, dtype=torch.float64), players=players)


def test_a_span_shortcut_of_the_wrong_size_is_named():
    """A shortcut returning 1 entry for a 2-state system broadcast silently into the state
    and failed later with a raw torch error: now a ShapeError naming the span."""
    dyn = trajopt.Dynamics(lambda x, u, t: x + 0.1 * torch.tanh(x + u))
    cost = trajopt.Cost(lambda x, u, t: (x * x).sum(-1) + (u * u).sum(-1),
                        lambda x: ((x - 1) ** 2).sum(-1))
    with pytest.raises(ShapeError, match=r"^the span \(2, 5\) adds .* shape of x_6"):
        trajopt.solve_ddp(dyn, cost, torch.tensor([0.5, 0.2], dtype=torch.float64),
                          torch.zeros(10, 1, dtype=torch.float64),
                          spans=[trajopt.Span(2, 5, shortcut=lambda xr: xr[..., :1])])


def test_integer_cost_matrices_and_read_only_views_are_read_as_floats():
    """np.diag([1, 10]) is int64: QuadraticCost raised torch's finfo TypeError (its
    symmetry check), and an integer Q would have truncated a float reference; a
    broadcast (read-only) view made torch warn in LinearDynamics. Both solve as floats."""
    x0, us0 = torch.tensor([1.0, 0.0], dtype=torch.float64), torch.zeros(30, 1,
                                                                           dtype=torch.float64)
    A, B = np.array([[1, 1], [0, 1]]), np.array([[0], [1]])
    ref = trajopt.solve_ddp(trajopt.LinearDynamics(A.astype(float), B.astype(float)),
                            trajopt.QuadraticCost(np.diag([1.0, 10.0]), np.eye(1), np.eye(2),
                                                  x_ref=[0.7, 0.0]), x0, us0)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dyn = trajopt.LinearDynamics(np.broadcast_to(A, (30, 2, 2)), np.broadcast_to(B, (30, 2, 1)))
        cost = trajopt.QuadraticCost(np.diag([1, 10]), np.eye(1, dtype=int), np.eye(2, dtype=int),
                                     x_ref=[0.7, 0.0])
        assert cost.Q.dtype == torch.float64 and float(cost.x_ref[0]) == 0.7
        got = trajopt.solve_ddp(dyn, cost, x0, us0)
    torch.testing.assert_close(got.us, ref.us, rtol=1e-12, atol=1e-12)
    with pytest.raises(InvalidArgumentError, match="R is complex"):
        trajopt.QuadraticCost(np.eye(2), np.eye(1) * 1j, np.eye(2))
