"""``LQR.time_invariant`` and ``QuadraticCost`` with a trajectory reference."""

import numpy as np
import pytest
import torch

import trajopt
from trajopt.errors import InvalidArgumentError, ShapeError

DT = torch.float64


@pytest.mark.parametrize("as_numpy", [True, False])
def test_time_invariant_lqr_equals_the_stacked_problem(as_numpy):
    rng = np.random.default_rng(0)
    n, m, T = 4, 2, 25
    A = rng.normal(size=(n, n)) / 2
    B = rng.normal(size=(n, m))
    Q, R = np.eye(n), 0.5 * np.eye(m)
    q, M = rng.normal(size=n), 0.1 * rng.normal(size=(m, n))
    x0 = rng.normal(size=n)
    conv = (lambda v: v) if as_numpy else torch.as_tensor
    prob = trajopt.LQR.time_invariant(*(conv(v) for v in (A, B, Q, R)), T, q=conv(q),
                                      M=conv(M))
    ref = trajopt.LQR(A=np.stack([A] * T), B=np.stack([B] * T), Q=np.stack([Q] * T),
                      R=np.stack([R] * T), q=np.stack([q] * T), M=np.stack([M] * T), QT=Q)
    a, b = trajopt.solve_lqr(prob, conv(x0)), trajopt.solve_lqr(ref, x0)
    assert isinstance(a.K, np.ndarray) == as_numpy
    np.testing.assert_array_equal(np.asarray(a.K), b.K)
    np.testing.assert_array_equal(np.asarray(a.xs), b.xs)


def test_time_invariant_lqr_with_the_dare_terminal_has_the_stationary_gain():
    rng = np.random.default_rng(1)
    A, B = rng.normal(size=(3, 3)), rng.normal(size=(3, 1))
    Q, R = np.eye(3), np.eye(1)
    dare = trajopt.solve_dare(A, B, Q, R)
    sol = trajopt.solve_lqr(trajopt.LQR.time_invariant(A, B, Q, R, 40, QT=dare.P))
    np.testing.assert_allclose(sol.K, np.broadcast_to(dare.K, sol.K.shape), atol=1e-10)


def test_time_invariant_lqr_bad_input():
    A, B = np.eye(2), np.ones((2, 1))
    with pytest.raises(InvalidArgumentError, match="T must be"):
        trajopt.LQR.time_invariant(A, B, np.eye(2), np.eye(1), 0)
    with pytest.raises(InvalidArgumentError, match="A: LQR.time_invariant"):
        trajopt.LQR.time_invariant([A, A], B, np.eye(2), np.eye(1), 2)
    with pytest.raises(ShapeError, match="B"):
        trajopt.LQR.time_invariant(A, np.ones((3, 1)), np.eye(2), np.eye(1), 2)


def _double_integrator(x, u, t):
    return torch.stack([x[..., 0] + 0.1 * x[..., 1], x[..., 1] + 0.1 * u[..., 0]], -1)


def test_quadratic_cost_tracks_a_trajectory_reference():
    """x_ref (T+1, n) and u_ref (T, m): the same DDP solution as the cost written stage
    by stage (rows indexed by t), and the derivatives taken in one vectorized call."""
    T = 30
    ts = torch.arange(T + 1, dtype=DT)
    xref = torch.stack([torch.sin(0.2 * ts), 0.2 * torch.cos(0.2 * ts)], -1)
    uref = 0.01 * torch.arange(T, dtype=DT)[:, None]
    Q, R, QT = torch.eye(2, dtype=DT), 0.01 * torch.eye(1, dtype=DT), 10 * torch.eye(2, dtype=DT)
    cost = trajopt.QuadraticCost(Q, R, QT, x_ref=xref, u_ref=uref)
    assert not cost.time_invariant
    x0 = torch.tensor([[0.0, 0.0], [0.3, -0.1]], dtype=DT)
    us0 = torch.zeros(2, T, 1, dtype=DT)
    res = trajopt.solve_ddp(_double_integrator, cost, x0, us0)

    def running(x, u, t):
        dx, du = x - xref[t], u - uref[t]
        return 0.5 * (dx * dx).sum(-1) + 0.005 * (du * du).sum(-1)

    def terminal(x):
        d = x - xref[T]
        return 5 * (d * d).sum(-1)
    ref = trajopt.solve_ddp(_double_integrator, trajopt.Cost(running, terminal), x0, us0)
    assert bool(res.converged.all())
    torch.testing.assert_close(res.us, ref.us, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(res.cost, ref.cost, rtol=1e-12, atol=1e-12)
    # the derivatives of all stages in one call: rows selected by the stage index
    stages = torch.arange(T).repeat_interleave(2)
    d = cost.derivatives(res.xs[:, :T].transpose(0, 1).reshape(-1, 2),
                         res.us.transpose(0, 1).reshape(-1, 1), stages)
    lx = (res.xs[:, :T].transpose(0, 1).reshape(-1, 2) - xref[stages]) @ Q
    torch.testing.assert_close(d.lx, lx)


def test_quadratic_cost_reference_shorter_than_the_horizon():
    xref = torch.zeros(11, 2, dtype=DT)
    cost = trajopt.QuadraticCost(torch.eye(2, dtype=DT), torch.eye(1, dtype=DT),
                                 torch.eye(2, dtype=DT), x_ref=xref)
    with pytest.raises(ShapeError, match="x_ref has 11 rows"):
        trajopt.solve_ddp(_double_integrator, cost, torch.zeros(2, dtype=DT),
                          torch.zeros(15, 1, dtype=DT))
    with pytest.raises(ShapeError, match=r"x_ref must have shape \(2,\) or \(T\+1, 2\)"):
        trajopt.QuadraticCost(torch.eye(2), torch.eye(1), torch.eye(2), x_ref=torch.zeros(3))
