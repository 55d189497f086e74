"""Constraints in DDP (``solve_ddp(..., constraints=...)``): the augmented cost against
torch.autograd, equality-constrained LQ problems against a dense KKT solve, the outer
loop per batch element, box limits and spans together with constraints, and bad input.

The comparisons with casadi + IPOPT on the nonlinear problems are in
``test_constraints_ipopt.py``."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trajopt
from tests.reference.lqr_kkt import NpStage, kkt_solve
from trajopt import AugmentedLagrangian, Constraint
from trajopt.ddp.augmented import AugmentedCost, check_constraints
from trajopt.errors import InvalidArgumentError, NonFiniteError, ShapeError

D = torch.float64


def _double_integrator(T=20, dt=0.1):
    A = torch.tensor([[1.0, dt], [0.0, 1.0]], dtype=D)
    B = torch.tensor([[0.5 * dt * dt], [dt]], dtype=D)
    Q, R, QT = 0.1 * torch.eye(2, dtype=D), 0.01 * torch.eye(1, dtype=D), torch.eye(2, dtype=D)
    dyn = trajopt.Dynamics(lambda x, u: x @ A.T + u @ B.T)
    return A, B, Q, R, QT, dyn, trajopt.QuadraticCost(Q, R, QT), T


# ---------------------------------------------------------------- the augmented cost
@pytest.mark.parametrize("kind", ["inequality", "equality"])
def test_augmented_derivatives_match_autograd(kind):
    """Gradient exact and Hessian Gauss-Newton: against torch.func of the augmented
    running cost, for a constraint linear in (x, u) (where Gauss-Newton is exact) and the
    gradient of a nonlinear one."""
    torch.manual_seed(0)
    n, m, T, B = 3, 2, 4, 5
    base = trajopt.Cost(
        lambda x, u: (x * x).sum(-1) + 0.3 * (u * u).sum(-1) + x[..., 0] * u[..., 1],
        lambda x: (x ** 4).sum(-1))
    W = torch.randn(2, n + m, dtype=D)
    lin = Constraint(lambda x, u: torch.cat([x, u], -1) @ W.T - 0.1, kind=kind)
    nonlin = Constraint(lambda x, u: torch.sin(x[..., :1]) * u[..., :1] + x[..., 1:2] ** 2 - 0.2,
                        kind=kind)
    term = Constraint(lambda x: x[..., :2] ** 2 - 0.5, kind=kind, where="terminal")
    cons = check_constraints([lin, nonlin, term])
    aug = AugmentedCost(base, cons)
    lam = [torch.randn(T, B, 2, dtype=D).abs(), torch.randn(T, B, 1, dtype=D).abs(),
           torch.randn(B, 2, dtype=D).abs()]
    aug.reset(lam, torch.rand(B, dtype=D) * 5 + 0.5)
    x, u = torch.randn(B, n, dtype=D), torch.randn(B, m, dtype=D)
    t = 2
    d = aug.derivatives(x, u, t)

    def f(xu):
        return aug.running(xu[:, :n], xu[:, n:], t).sum()
    xu = torch.cat([x, u], -1)
    g = torch.func.grad(f)(xu)
    torch.testing.assert_close(torch.cat([d.lx, d.lu], -1), g, rtol=1e-12, atol=1e-12)
    # the Hessian of the linear constraint's terms alone is exact
    aug_lin = AugmentedCost(trajopt.Cost(lambda x, u: 0 * x.sum(-1)), cons[:1])
    aug_lin.reset(lam[:1], aug.rho)
    dl = aug_lin.derivatives(x, u, t)
    H = torch.func.hessian(lambda z: aug_lin.running(z[:, :n], z[:, n:], t).sum())(xu)
    Hb = torch.stack([H[i, :, i, :] for i in range(B)])
    torch.testing.assert_close(dl.lxx, Hb[:, :n, :n], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dl.luu, Hb[:, n:, n:], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dl.lux, Hb[:, n:, :n], rtol=1e-12, atol=1e-12)
    # terminal gradient
    gT, _ = aug.terminal_derivatives(x)
    torch.testing.assert_close(gT, torch.func.grad(lambda z: aug.terminal(z).sum())(x),
                               rtol=1e-12, atol=1e-12)
    # all stages in one call (t a tensor of stages) == stage by stage
    xs, us = torch.randn(T * B, n, dtype=D), torch.randn(T * B, m, dtype=D)
    stages = torch.arange(T).repeat_interleave(B)
    full = aug.derivatives(xs, us, stages)
    for s in range(T):
        one = aug.derivatives(xs[s * B:(s + 1) * B], us[s * B:(s + 1) * B], s)
        torch.testing.assert_close(full.lxx[s * B:(s + 1) * B], one.lxx, rtol=1e-13, atol=1e-13)
        torch.testing.assert_close(full.lx[s * B:(s + 1) * B], one.lx, rtol=1e-13, atol=1e-13)


# ---------------------------------------------------------------- against a KKT solve
def test_equality_constrained_lq_matches_dense_kkt():
    """A double integrator that must reach x_T = (1, 0) exactly and pass x_10[0] = 0.5:
    the optimum of the dense KKT system with those rows, to the AL tolerance."""
    A, B, Q, R, QT, dyn, cost, T = _double_integrator()
    goal = torch.tensor([1.0, 0.0], dtype=D)
    cons = [Constraint(lambda x: x - goal, kind="equality", where="terminal"),
            Constraint(lambda x, u, t: torch.where(torch.as_tensor(t) == 10, x[..., 0] - 0.5,
                                                   torch.zeros_like(x[..., 0])),
                       kind="equality")]
    x0 = torch.zeros(2, dtype=D)
    res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(T, 1, dtype=D), constraints=cons,
                            tol=1e-12, augmented_lagrangian=AugmentedLagrangian(tol=1e-10))
    assert res.reason == "converged" and float(res.max_violation) <= 1e-10
    st = [NpStage(A.numpy(), B.numpy(), Q.numpy(), R.numpy()) for _ in range(T)]
    xs, us, J = kkt_solve(st, QT.numpy(), None, x0.numpy(), equalities=[
        (T, np.eye(2), None, goal.numpy()), (10, np.array([[1.0, 0.0]]), None, np.array([0.5]))])
    np.testing.assert_allclose(res.us.numpy(), np.stack(us), atol=1e-7)
    np.testing.assert_allclose(res.xs.numpy(), np.stack(xs), atol=1e-8)
    assert abs(float(res.cost) - J) <= 1e-8 * abs(J)
    # the multiplier of the terminal equality is the KKT multiplier: at the optimum,
    # grad_x_T of cost + lam'c = the costate, checked through the stationarity in us
    us_t = res.us.clone().requires_grad_(True)
    x, L = x0, 0.0
    lam_T, lam_run = res.multipliers
    for t in range(T):
        L = L + cost.running(x, us_t[t], t) + lam_run[t, 0] * (x[0] - 0.5) * (t == 10)
        x = dyn(x, us_t[t], t)
    L = L + cost.terminal(x) + (lam_T * (x - goal)).sum()
    assert float(torch.autograd.grad(L, us_t)[0].abs().max()) <= 1e-7


def test_inactive_inequality_changes_nothing():
    """A constraint the unconstrained optimum satisfies: the same solution, zero
    multipliers, one outer iteration."""
    _, _, _, _, _, dyn, cost, T = _double_integrator()
    x0 = torch.tensor([1.0, 0.0], dtype=D)
    free = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(T, 1, dtype=D), tol=1e-12)
    res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(T, 1, dtype=D), tol=1e-12,
                            constraints=[Constraint(lambda x: x[..., 0] - 5.0)])
    torch.testing.assert_close(res.us, free.us, rtol=0, atol=1e-12)
    assert float(res.multipliers[0].abs().max()) == 0.0
    assert int(res.iterations) == int(free.iterations)
    assert float(res.max_violation) == 0.0


def test_state_bound_is_met_with_complementarity():
    """|u| <= 1 by a box and x_1 >= -0.3 (velocity) by a path inequality: feasible to
    1e-6, multipliers >= 0 and zero where the constraint is inactive, and the
    Lagrangian stationary in the free controls."""
    A, B, Q, R, QT, dyn, cost, T = _double_integrator(T=30)
    x0 = torch.tensor([1.0, 0.0], dtype=D)
    lo, hi = -torch.ones(1, dtype=D), torch.ones(1, dtype=D)
    con = Constraint(lambda x: -x[..., 1] - 0.3)
    res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(T, 1, dtype=D), tol=1e-12,
                            control_limits=(lo, hi), constraints=[con])
    assert res.reason == "converged"
    c = -res.xs[:-1, 1] - 0.3
    assert float(c.max()) <= 1e-6 and float(res.max_violation) <= 1e-6
    free = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(T, 1, dtype=D), tol=1e-12,
                             control_limits=(lo, hi))
    assert float((-free.xs[:-1, 1] - 0.3).max()) > 0.05  # the constraint is needed
    lam = res.multipliers[0][:, 0]
    assert float(lam.min()) >= 0 and float(lam.max()) > 0
    assert float((lam * c).abs().max()) <= 1e-6
    us = res.us.clone().requires_grad_(True)
    x, L = x0, 0.0
    for t in range(T):
        L = L + cost.running(x, us[t], t) + lam[t] * (-x[1] - 0.3)
        x = dyn(x, us[t], t)
    g = torch.autograd.grad(L + cost.terminal(x), us)[0][:, 0]
    interior = (res.us[:, 0].abs() < 1 - 1e-9)
    assert float(g[interior].abs().max()) <= 1e-6


# ---------------------------------------------------------------- batching
def test_batch_elements_are_independent():
    """A batch of four initial states (one whose constraint is inactive) gives what each
    gives alone: multipliers, penalties and stopping per element."""
    _, _, _, _, _, dyn, cost, T = _double_integrator()
    goal = torch.tensor([1.0, 0.0], dtype=D)
    cons = [Constraint(lambda x: x - goal, kind="equality", where="terminal"),
            Constraint(lambda x: x[..., 0] - 1.05)]
    x0 = torch.tensor([[0.0, 0.0], [0.5, 1.0], [-1.0, 0.3], [1.0, 0.0]], dtype=D)
    us0 = torch.zeros(4, T, 1, dtype=D)
    res = trajopt.solve_ddp(dyn, cost, x0, us0, constraints=cons, tol=1e-12)
    assert res.max_violation.shape == (4,) and res.multipliers[0].shape == (4, 2)
    assert res.multipliers[1].shape == (4, T, 1)
    for i in range(4):
        one = trajopt.solve_ddp(dyn, cost, x0[i], us0[i], constraints=cons, tol=1e-12)
        assert res.reason[i] == one.reason
        torch.testing.assert_close(res.us[i], one.us, rtol=0, atol=1e-10)
        torch.testing.assert_close(res.multipliers[0][i], one.multipliers[0], rtol=0,
                                   atol=1e-8)
        assert int(res.iterations[i]) == int(one.iterations)


def test_per_element_cost_data_follows_the_rows():
    """A cost holding one reference per batch element (Cost.bind_rows) is evaluated on
    the right rows through the loop's subsets and line-search replicas."""
    _, _, _, _, _, dyn, _, T = _double_integrator()
    refs = torch.tensor([[1.0, 0.0], [-2.0, 0.0], [0.5, 0.0]], dtype=D)

    class PerElement(trajopt.Cost):
        def __init__(self):
            super().__init__(time_invariant=True)
            self.rows = None

        def bind_rows(self, rows):
            self.rows = rows

        def ref(self, x):
            r = refs if self.rows is None else refs[self.rows]
            return r if r.shape[0] == x.shape[0] else r.repeat(x.shape[0] // r.shape[0], 1)

        def running(self, x, u, t):
            return 0.01 * (u * u).sum(-1)

        def terminal(self, x):
            return 10 * ((x - self.ref(x)) ** 2).sum(-1)

        def derivatives(self, x, u, t):
            N = x.shape[0]
            return trajopt.ddp.CostDerivatives(
                x.new_zeros(N, 2), 0.02 * u, x.new_zeros(N, 2, 2),
                0.02 * torch.eye(1, dtype=D).expand(N, 1, 1), x.new_zeros(N, 1, 2))

        def terminal_derivatives(self, x):
            return 20 * (x - self.ref(x)), 20 * torch.eye(2, dtype=D).expand(x.shape[0], 2, 2)

    x0 = torch.zeros(3, 2, dtype=D)
    res = trajopt.solve_ddp(dyn, PerElement(), x0, torch.zeros(3, T, 1, dtype=D),
                            constraints=[Constraint(lambda x: x[..., 0] - 0.8),
                                         Constraint(lambda x: x[..., 0] - 0.8,
                                                    where="terminal")], tol=1e-12)
    # element 0 stops at the bound 0.8, element 1 heads for -2, element 2 reaches ~0.5
    assert abs(float(res.xs[0, -1, 0]) - 0.8) <= 1e-5
    assert float(res.xs[1, -1, 0]) < -1.5
    assert abs(float(res.xs[2, -1, 0]) - 0.5) <= 0.01
    assert list(res.reason) == ["converged"] * 3


# ---------------------------------------------------------------- what cannot be met
def test_infeasible_constraint_is_reported():
    """x_0 violates a state constraint no control can change: reason
    "constraint_violation", max_violation the violation, finite result."""
    _, _, _, _, _, dyn, cost, T = _double_integrator(T=5)
    res = trajopt.solve_ddp(dyn, cost, torch.tensor([[2.0, 0.0], [0.0, 0.0]], dtype=D),
                            torch.zeros(2, T, 1, dtype=D),
                            constraints=[Constraint(lambda x: x[..., 0] - 1.0)],
                            augmented_lagrangian=AugmentedLagrangian(max_penalty=1e4))
    assert list(res.reason) == ["constraint_violation", "converged"]
    assert abs(float(res.max_violation[0]) - 1.0) <= 1e-12
    assert bool(torch.isfinite(res.xs).all()) and bool(torch.isfinite(res.cost).all())
    assert not bool(res.converged[0]) and bool(res.converged[1])


# ---------------------------------------------------------------- with spans
def test_constraints_with_residual_spans():
    """GT-DDP structure (a residual span) with a terminal equality: met, and the
    Lagrangian stationary (the inner solver is the span solver, unchanged)."""
    torch.manual_seed(1)
    n, T = 2, 6
    W = [0.5 * torch.randn(n, n, dtype=D) for _ in range(T)]
    dyn = trajopt.Dynamics(lambda x, u, t: torch.tanh(x @ W[t].T + u))
    cost = trajopt.Cost(lambda x, u: 0.5 * (u * u).sum(-1), lambda x: 0.5 * (x * x).sum(-1))
    target = torch.tensor([0.3, -0.2], dtype=D)
    con = Constraint(lambda x: x - target, kind="equality", where="terminal")
    span = trajopt.Span(1, 3)
    x0 = torch.tensor([0.5, 0.1], dtype=D)
    res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(T, n, dtype=D), spans=[span],
                            constraints=[con], tol=1e-12)
    assert res.reason == "converged" and float(res.max_violation) <= 1e-6
    torch.testing.assert_close(res.xs[-1], target, rtol=0, atol=1e-6)
    us = res.us.clone().requires_grad_(True)
    xs = [x0]
    L = 0.0
    for t in range(T):
        x = dyn(xs[-1], us[t], t) + (xs[span.start] if t == span.end else 0)
        L = L + cost.running(xs[-1], us[t], 0)
        xs.append(x)
    L = L + cost.terminal(xs[-1]) + (res.multipliers[0] * (xs[-1] - target)).sum()
    assert float(torch.autograd.grad(L, us)[0].abs().max()) <= 1e-6


# ---------------------------------------------------------------- bad input
def test_bad_constraints_are_named():
    _, _, _, _, _, dyn, cost, T = _double_integrator(T=3)
    x0, us0 = torch.zeros(2, dtype=D), torch.zeros(T, 1, dtype=D)
    with pytest.raises(InvalidArgumentError, match="kind must be"):
        Constraint(lambda x: x, kind="less")
    with pytest.raises(InvalidArgumentError, match="where must be"):
        Constraint(lambda x: x, where="initial")
    with pytest.raises(InvalidArgumentError, match="fn must be a callable"):
        Constraint(3.0)
    with pytest.raises(InvalidArgumentError, match=r"constraints\[1\] must be a trajopt"):
        trajopt.solve_ddp(dyn, cost, x0, us0,
                          constraints=[Constraint(lambda x: x), lambda x: x])
    with pytest.raises(ShapeError, match=r"the constraint wall must return shape"):
        trajopt.solve_ddp(dyn, cost, x0, us0, constraints=[
            Constraint(lambda x: x.sum(), name="wall")])
    with pytest.raises(NonFiniteError, match=r"constraints\[0\] is not finite"):
        trajopt.solve_ddp(dyn, cost, x0, us0, constraints=[
            Constraint(lambda x: torch.log(x[..., 0] - 1))])
    with pytest.raises(InvalidArgumentError, match="augmented_lagrangian must be"):
        trajopt.solve_ddp(dyn, cost, x0, us0, constraints=[Constraint(lambda x: x)],
                          augmented_lagrangian={"tol": 1e-3})
    with pytest.raises(InvalidArgumentError, match="invalid augmented-Lagrangian"):
        AugmentedLagrangian(factor=1.0)
    with pytest.raises(InvalidArgumentError, match="max_outer"):
        AugmentedLagrangian(max_outer=0)


def test_numpy_in_numpy_out():
    _, _, _, _, _, dyn, cost, T = _double_integrator(T=5)
    goal = torch.tensor([0.5, 0.0], dtype=D)  # the functions always see torch tensors
    res = trajopt.solve_ddp(dyn, cost, np.zeros(2), np.zeros((T, 1)), constraints=[
        Constraint(lambda x: x - goal, kind="equality", where="terminal")])
    assert isinstance(res.us, np.ndarray) and isinstance(res.multipliers[0], np.ndarray)
    assert isinstance(res.max_violation, np.ndarray) and float(res.max_violation) <= 1e-6
    assert math.isclose(float(res.xs[-1, 0]), 0.5, abs_tol=1e-6)


def test_nonconvex_batch_elements_are_independent():
    """Unicycles around obstacles (nonconvex; each element's inner tolerance follows its
    own violation): two elements solved together give what each gives alone."""
    from trajopt import problems
    p = problems.unicycle(T=30, dt=0.27, obstacles=((1.0, 0.1, 0.25), (1.7, 0.6, 0.2)))
    x0 = torch.tensor([[0.0, 0.0, 0.0], [0.0, 0.12, 0.0]], dtype=D)
    us0 = torch.zeros(2, p.T, p.m, dtype=D)
    both = trajopt.solve_ddp(p.dynamics, p.cost, x0, us0, control_limits=p.control_limits,
                             constraints=p.constraints)
    for i in range(2):
        one = trajopt.solve_ddp(p.dynamics, p.cost, x0[i], us0[i],
                                control_limits=p.control_limits, constraints=p.constraints)
        assert both.reason[i] == one.reason and int(both.iterations[i]) == int(
            one.iterations)
        torch.testing.assert_close(both.us[i], one.us, rtol=0, atol=1e-12)


def test_inner_solver_is_left_as_it_was():
    """The outer loop neither keeps a loose tolerance on the inner solver nor swallows its
    callback, also when a solve raises."""
    from trajopt.ddp import ConstrainedSolver, DDPSolver
    _, _, _, _, _, dyn, cost, T = _double_integrator(T=5)
    calls = []

    def record(log):
        calls.append(log)
    con = Constraint(lambda x: x[..., 0] - 0.5, where="terminal")
    inner = DDPSolver(dyn, AugmentedCost(cost, check_constraints([con])), tol=1e-10,
                      callback=record)
    outer = ConstrainedSolver(inner)
    x0 = torch.tensor([1.0, 0.0], dtype=D)
    res = outer.solve(x0, torch.zeros(T, 1, dtype=D))
    assert res.reason == "converged" and calls and inner.tol == 1e-10
    assert inner.callback is record
    with pytest.raises(ShapeError):
        outer.solve(x0, torch.zeros(T, 3, dtype=D))
    assert inner.tol == 1e-10 and inner.callback is record


def test_more_bad_constraint_input():
    _, _, _, _, _, dyn, cost, T = _double_integrator(T=3)
    x0, us0 = torch.zeros(2, dtype=D), torch.zeros(T, 1, dtype=D)
    with pytest.raises(InvalidArgumentError, match="constraints must be a sequence"):
        trajopt.solve_ddp(dyn, cost, x0, us0, constraints=lambda x: x)
    with pytest.raises(InvalidArgumentError, match="terminal constraint is fn"):
        Constraint(lambda x, u: x, where="terminal")
    with pytest.raises(InvalidArgumentError, match="no constraints"):
        trajopt.solve_ddp(dyn, cost, x0, us0, augmented_lagrangian=AugmentedLagrangian())
    # a float32 constant in a float64 problem is cast, not an indexing error
    res = trajopt.solve_ddp(dyn, cost, x0, us0, constraints=[
        Constraint(lambda x: (x[..., 0] - 0.5).float(), kind="equality", where="terminal")])
    assert res.reason == "converged" and float(res.max_violation) <= 1e-6
