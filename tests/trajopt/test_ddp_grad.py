"""Gradients through solve_ddp (trajopt.ddp.sensitivity), float64: against a dense
reduced-space implicit-function reference at an exact optimum, and against central
finite differences of re-solved problems with controls at their limits."""

import math
import warnings

import pytest
import torch

import trajopt
from trajopt.errors import ConvergenceWarning, InvalidArgumentError

from ._differences import central_differences

DT = torch.float64
T = 20


def _problem():
    mass = torch.tensor(1.0, dtype=DT, requires_grad=True)
    damp = torch.tensor(0.1, dtype=DT, requires_grad=True)
    target = torch.tensor([math.pi, 0.0], dtype=DT, requires_grad=True)

    def f(x, u, t):
        th, dth = x[..., 0], x[..., 1]
        return torch.stack([th + 0.05 * dth, dth + 0.05 * (
            u[..., 0] / mass - damp * dth - 9.81 * torch.sin(th))], -1)

    def running(x, u, t):
        d = x - target
        return 0.01 * (d * d).sum(-1) + 0.1 * (u * u).sum(-1)

    def terminal(x):
        d = x - target
        return 50 * (d * d).sum(-1)
    return f, trajopt.Cost(running, terminal), (mass, damp, target)


def _rollout_cost(f, cost, x0, u):
    """The states and total cost of the controls u (T, 1) from x0 (n,), plainly."""
    xs, J = [x0], 0
    for t in range(T):
        J = J + cost.running(xs[-1][None], u[t][None], t)[0]
        xs.append(f(xs[-1][None], u[t][None], t)[0])
    return torch.stack(xs), J + cost.terminal(xs[-1][None])[0]


def test_gradients_equal_the_dense_reduced_space_reference():
    """At an exact optimum (the DDP started from the Newton-polished controls of the
    reduced problem), the gradients of a loss of xs, us and the cost with respect to the
    model's tensors and x0 equal the dense implicit-function-theorem reference
    (tests/reference/ddp_sensitivity_dense.py) to 1e-9."""
    from tests.reference.ddp_sensitivity_dense import implicit_gradient, polish
    f, cost, params = _problem()
    x0 = torch.tensor([[0.2, 0.0], [-0.1, 0.3]], dtype=DT, requires_grad=True)
    first = trajopt.solve_ddp(f, cost, x0.detach(), torch.zeros(2, T, 1, dtype=DT),
                              tol=1e-12)
    g = torch.Generator().manual_seed(0)
    w_x = torch.randn(first.xs.shape, generator=g, dtype=DT)
    w_u = torch.randn(first.us.shape, generator=g, dtype=DT)
    us_star, refs = [], []
    for b in range(2):
        def phi(u, b=b):
            return _rollout_cost(f, cost, x0[b], u.reshape(T, 1))[1]

        def loss(u, b=b):
            xs, J = _rollout_cost(f, cost, x0[b], u.reshape(T, 1))
            return (xs * w_x[b]).sum() + (u.reshape(T, 1) * w_u[b]).sum() + 0.3 * J
        u, gnorm = polish(phi, first.us[b].reshape(-1).detach())
        assert gnorm < 1e-10
        us_star.append(u.reshape(T, 1))
        refs.append(implicit_gradient(phi, loss, u, (*params, x0)))
    res = trajopt.solve_ddp(f, cost, x0, torch.stack(us_star), params=params, tol=1e-12)
    torch.testing.assert_close(res.us.detach(), torch.stack(us_star), rtol=0, atol=1e-10)
    total = (res.xs * w_x).sum() + (res.us * w_u).sum() + 0.3 * res.cost.sum()
    ours = torch.autograd.grad(total, (*params, x0))
    for k, o in enumerate(ours):
        ref = sum(r[k] for r in refs if r[k] is not None)
        torch.testing.assert_close(o, ref, rtol=1e-9, atol=1e-9)


def test_gradients_with_active_limits_match_finite_differences():
    """Controls at their limits (the active set held fixed): central finite differences
    of re-solved problems, eps = 1e-4 (smaller steps drown in the solver's stopping
    error), 2e-5 relative."""
    f, cost, params = _problem()
    x0 = torch.tensor([[0.2, 0.0], [-0.1, 0.3]], dtype=DT, requires_grad=True)
    us0 = torch.zeros(2, T, 1, dtype=DT)
    limits = (torch.tensor([-4.0], dtype=DT), torch.tensor([4.0], dtype=DT))
    kw = dict(max_iter=300, tol=1e-14, control_limits=limits)
    res = trajopt.solve_ddp(f, cost, x0, us0, params=params, **kw)
    assert bool(res.converged.all())
    assert int(((res.us.abs() - 4).abs() < 1e-9).sum()) > 0   # the active set is used
    g = torch.Generator().manual_seed(0)
    w_x = torch.randn(res.xs.shape, generator=g, dtype=DT)
    w_u = torch.randn(res.us.shape, generator=g, dtype=DT)

    def loss(r):
        return (r.xs * w_x).sum() + (r.us * w_u).sum() + 0.3 * r.cost.sum()
    ours = torch.cat([v.reshape(-1) for v in torch.autograd.grad(loss(res),
                                                                 (*params, x0))])
    fd = central_differences((*params, x0), lambda: loss(
        trajopt.solve_ddp(f, cost, x0.detach(), us0, **kw))).to(DT)
    torch.testing.assert_close(ours, fd, rtol=2e-5, atol=2e-5 * float(fd.abs().max()))


def test_x0_alone_and_no_grad():
    f, cost, params = _problem()
    x0 = torch.tensor([0.2, 0.0], dtype=DT, requires_grad=True)
    res = trajopt.solve_ddp(f, cost, x0, torch.zeros(T, 1, dtype=DT), tol=1e-12)
    (gx,) = torch.autograd.grad(res.cost, x0)
    # the envelope theorem: d cost*/d x0 is the value gradient at the first stage
    torch.testing.assert_close(gx, res.Vx[0], rtol=1e-6, atol=1e-8)
    with torch.no_grad():
        r = trajopt.solve_ddp(f, cost, x0, torch.zeros(T, 1, dtype=DT), params=params)
    assert not r.us.requires_grad


def test_bad_params_and_unsupported_combinations():
    f, cost, params = _problem()
    x0 = torch.zeros(2, dtype=DT)
    us0 = torch.zeros(T, 1, dtype=DT)
    with pytest.raises(InvalidArgumentError, match=r"params\[0\]"):
        trajopt.solve_ddp(f, cost, x0, us0, params=(1.0,))
    with pytest.raises(InvalidArgumentError, match="spans or players"):
        trajopt.solve_ddp(f, cost, x0, us0, params=params, players=[1])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trajopt.solve_ddp(f, cost, x0, us0, params=params, max_iter=1)
    assert any(issubclass(w.category, ConvergenceWarning) and "gradients" in str(w.message)
               for w in caught)


def test_gradients_through_constraints_equal_the_dense_kkt_reference():
    """With a terminal equality (the target a parameter) and a path inequality whose
    bound is a parameter and which is active at some stages, the gradients of a loss of
    xs, us and the cost equal the dense reduced-space KKT reference
    (tests/reference/ddp_sensitivity_dense.py, active set from our multipliers) to 1e-6
    (the solution itself is accurate to the augmented Lagrangian's tolerance, 1e-10)."""
    from tests.reference.ddp_sensitivity_dense import (
        implicit_gradient_constrained,
        polish_constrained,
    )
    f, cost, (mass, damp, _) = _problem()
    goal = torch.tensor([2.5, 0.0], dtype=DT, requires_grad=True)
    vmax = torch.tensor(3.5, dtype=DT, requires_grad=True)  # the free peak is 3.70
    cons = [trajopt.Constraint(lambda x: x - goal, kind="equality", where="terminal"),
            trajopt.Constraint(lambda x: x[..., 1] - vmax)]
    x0 = torch.tensor([0.2, 0.0], dtype=DT, requires_grad=True)
    params = (mass, damp, goal, vmax)
    al = trajopt.AugmentedLagrangian(tol=1e-11)
    res = trajopt.solve_ddp(f, cost, x0, torch.zeros(T, 1, dtype=DT), params=params,
                            constraints=cons, tol=1e-13, augmented_lagrangian=al)
    assert res.reason == "converged"
    nu_path = res.multipliers[1][:, 0]
    active = torch.nonzero(nu_path > 1e-8).flatten()
    assert 0 < active.numel() < T  # the path constraint binds at some stages only
    g_w = torch.Generator().manual_seed(1)
    w_x = torch.randn(res.xs.shape, generator=g_w, dtype=DT)
    w_u = torch.randn(res.us.shape, generator=g_w, dtype=DT)
    total = (res.xs * w_x).sum() + (res.us * w_u).sum() + 0.3 * res.cost
    ours = torch.autograd.grad(total, (*params, x0))

    def phi(u):
        return _rollout_cost(f, cost, x0, u.reshape(T, 1))[1]

    def g(u):
        xs, _ = _rollout_cost(f, cost, x0, u.reshape(T, 1))
        return torch.cat([xs[-1] - goal, xs[active, 1] - vmax])

    def loss(u):
        xs, J = _rollout_cost(f, cost, x0, u.reshape(T, 1))
        return (xs * w_x).sum() + (u.reshape(T, 1) * w_u).sum() + 0.3 * J
    u, nu, stat, feas = polish_constrained(phi, g, res.us.detach().reshape(-1))
    assert stat < 1e-9 and feas < 1e-12
    torch.testing.assert_close(u.reshape(T, 1), res.us.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(nu[2:], nu_path[active], rtol=1e-5, atol=1e-6)
    refs = implicit_gradient_constrained(phi, g, loss, u, nu, (*params, x0))
    for o, r in zip(ours, refs):
        torch.testing.assert_close(o, r, rtol=1e-6, atol=1e-6)


def test_gradients_through_constraints_match_finite_differences():
    """A batch of two, the obstacle radius a parameter: the derivative of the cost and
    of a state in the middle of the path, by central differences of re-solved problems
    (h = 1e-5).  (The cost alone would not test the adjoint: its derivative is the
    multiplier times the constraint's, by the envelope theorem.)"""
    radius = torch.tensor(0.3, dtype=DT, requires_grad=True)
    center = torch.tensor([0.5, 0.05], dtype=DT)

    def f(x, u):
        return x + 0.1 * u

    cost = trajopt.Cost(lambda x, u: 0.5 * (u * u).sum(-1),
                        lambda x: 50 * ((x - torch.tensor([1.0, 0.0], dtype=DT)) ** 2).sum(-1))

    def solve(r, grad=False):
        con = trajopt.Constraint(lambda x: r ** 2 - ((x - center) ** 2).sum(-1))
        x0 = torch.tensor([[0.0, 0.0], [0.0, -0.1]], dtype=DT)
        return trajopt.solve_ddp(f, cost, x0, torch.full((2, 20, 2), 0.01, dtype=DT),
                                 constraints=[con], tol=1e-13, params=(r,) if grad else (),
                                 augmented_lagrangian=trajopt.AugmentedLagrangian(tol=1e-11))
    def loss(res):
        return res.cost.sum() + 3 * res.xs[:, 8, 1].sum() - res.us[:, 4].sum()
    res = solve(radius, grad=True)
    assert list(res.reason) == ["converged", "converged"]
    ours = torch.autograd.grad(loss(res), radius)[0]
    h = 1e-5
    with torch.no_grad():
        fd = (loss(solve(radius + h)) - loss(solve(radius - h))) / (2 * h)
    assert abs(float(ours) - float(fd)) <= 1e-5 * abs(float(fd)), (float(ours), float(fd))


def test_gradients_equal_autograd_through_an_unrolled_newton_solve():
    """Autograd through an unrolled solve of the same problem (Newton iterations on the
    reduced objective, the graph kept through every step, started 1e-3 off the optimum)
    gives the implicit gradient of solve_ddp at the exact optimum (started from the
    Newton-polished controls, as above): 1e-8."""
    from tests.reference.ddp_sensitivity_dense import polish
    f, cost, params = _problem()
    x0 = torch.tensor([0.2, 0.0], dtype=DT)

    def phi(u):
        return _rollout_cost(f, cost, x0, u.reshape(T, 1))[1]
    first = trajopt.solve_ddp(f, cost, x0, torch.zeros(T, 1, dtype=DT), tol=1e-12)
    u_star, gnorm = polish(phi, first.us.reshape(-1))
    assert gnorm < 1e-10
    res = trajopt.solve_ddp(f, cost, x0, u_star.reshape(T, 1), params=params, tol=1e-13)
    w = torch.linspace(-1, 1, T, dtype=DT).reshape(T, 1)
    ours = torch.autograd.grad((res.us * w).sum() + res.xs[-1, 0], params)
    # start off the optimum: the steps matter
    u = (res.us.detach().reshape(-1) + 1e-3).requires_grad_()
    for _ in range(6):
        g = torch.autograd.grad(phi(u), u, create_graph=True)[0]
        H = torch.stack([torch.autograd.grad(g[i], u, create_graph=True)[0]
                         for i in range(T)])
        u = u - torch.linalg.solve(H, g)
    xs, _ = _rollout_cost(f, cost, x0, u.reshape(T, 1))
    unrolled = torch.autograd.grad((u.reshape(T, 1) * w).sum() + xs[-1, 0], params)
    for a, b in zip(ours, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)
