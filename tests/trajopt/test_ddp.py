"""DDP / iLQR against a slow numpy reference, solve_lqr, autograd and scipy L-BFGS."""

import math

import numpy as np
import pytest
import scipy.optimize
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from tests.reference.ddp_numpy import ReferenceDDP
from trajopt import problems
from trajopt.errors import ConvergenceWarning, InvalidArgumentError, NonFiniteError, ShapeError

DT, G, BDAMP = 0.1, 9.81, 0.3
F64 = dict(dtype=torch.float64)
Qs, Rs, QTs = np.diag([1.0, 0.1]), np.array([[0.05]]), np.diag([50.0, 5.0])
GOAL = np.array([math.pi, 0.0])


class NumpyPendulum:
    """Euler pendulum with hand-written derivatives (independent of torch.func)."""

    def f(self, x, u):
        return np.array([x[0] + DT * x[1], x[1] + DT * (u[0] - BDAMP * x[1] - G * np.sin(x[0]))])

    def derivs(self, x, u):
        fx = np.array([[1.0, DT], [-DT * G * np.cos(x[0]), 1 - DT * BDAMP]])
        fu = np.array([[0.0], [DT]])
        fxx = np.zeros((2, 2, 2))
        fxx[1, 0, 0] = DT * G * np.sin(x[0])
        return fx, fu, fxx, np.zeros((2, 1, 2)), np.zeros((2, 1, 1))

    def l(self, x, u):
        d = x - GOAL
        return 0.5 * d @ Qs @ d + 0.5 * u @ Rs @ u

    def lderivs(self, x, u):
        return Qs @ (x - GOAL), Rs @ u, Qs, Rs, np.zeros((1, 2))

    def lT(self, x):
        d = x - GOAL
        return 0.5 * d @ QTs @ d

    def lTderivs(self, x):
        return QTs @ (x - GOAL), QTs


def torch_pendulum():
    def f(x, u, t):
        th, w = x[..., 0], x[..., 1]
        return torch.stack([th + DT * w, w + DT * (u[..., 0] - BDAMP * w - G * torch.sin(th))],
                           -1)
    goal = torch.tensor(GOAL)

    def running(x, u, t):
        d = x - goal
        return 0.5 * ((d @ torch.tensor(Qs)) * d).sum(-1) + 0.5 * 0.05 * (u * u).sum(-1)

    def terminal(x):
        d = x - goal
        return 0.5 * ((d @ torch.tensor(QTs)) * d).sum(-1)
    return trajopt.Dynamics(f, time_invariant=True), trajopt.Cost(running, terminal,
                                                                  time_invariant=True)


@pytest.mark.parametrize("mode", ["ilqr", "ddp"])
@pytest.mark.parametrize("iterations", [1, 2, 4])
def test_agrees_with_numpy_reference(mode, iterations):
    T = 30
    rng = np.random.default_rng(0)
    us0 = 0.5 * rng.normal(size=(T, 1))
    x0 = np.array([0.3, 0.0])
    ref = ReferenceDDP(NumpyPendulum(), full=mode == "ddp")
    xs_r, us_r, J_r, _ = ref.iterate(x0, list(us0), iterations)
    bw_r = ref.backward_at(xs_r, us_r)  # at the returned trajectory, with ref's final mu
    dyn, cost = torch_pendulum()
    res = trajopt.solve_ddp(dyn, cost, torch.tensor(x0), torch.tensor(us0), mode=mode,
                            max_iter=iterations)
    assert res.iterations.item() == iterations
    np.testing.assert_allclose(res.us.numpy(), np.array(us_r), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(res.xs.numpy(), np.array(xs_r), rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(res.cost.item(), J_r, rtol=1e-11)
    # gains and value derivatives at the returned trajectory (same regularization)
    assert float(res.history[-1].regularization) == pytest.approx(ref.mu, abs=0)
    for t in range(T):
        np.testing.assert_allclose(res.K[t].numpy(), bw_r["K"][t], rtol=1e-8, atol=1e-9)
        np.testing.assert_allclose(res.k[t].numpy(), bw_r["k"][t], rtol=1e-8, atol=1e-9)
    for t in range(T + 1):
        np.testing.assert_allclose(res.Vx[t].numpy(), bw_r["Vx"][t], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(res.Vxx[t].numpy(), bw_r["Vxx"][t], rtol=1e-8, atol=1e-8)


def test_torch_func_derivatives_equal_analytic():
    dyn, cost = torch_pendulum()
    rng = np.random.default_rng(1)
    X, U = rng.normal(size=(7, 2)), rng.normal(size=(7, 1))
    d = dyn.derivatives(torch.tensor(X), torch.tensor(U), 0, second_order=True)
    npd = NumpyPendulum()
    for i in range(7):
        fx, fu, fxx, fux, fuu = npd.derivs(X[i], U[i])
        np.testing.assert_allclose(d.fx[i].numpy(), fx, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(d.fu[i].numpy(), fu, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(d.fxx[i].numpy(), fxx, rtol=1e-14, atol=1e-15)
        np.testing.assert_allclose(d.fux[i].numpy(), fux, atol=1e-15)
        np.testing.assert_allclose(d.fuu[i].numpy(), fuu, atol=1e-15)
    c = cost.derivatives(torch.tensor(X), torch.tensor(U), 0)
    for i in range(7):
        lx, lu, lxx, luu, lux = npd.lderivs(X[i], U[i])
        np.testing.assert_allclose(c.lx[i].numpy(), lx, rtol=1e-14)
        np.testing.assert_allclose(c.lxx[i].numpy(), lxx, rtol=1e-14)
        np.testing.assert_allclose(c.luu[i].numpy(), luu, rtol=1e-14)


def _lq(rng, n=4, m=2, T=25):
    A = rng.normal(size=(n, n)) / 2
    B = rng.normal(size=(n, m))
    Q, R, QT = np.eye(n), 0.1 * np.eye(m), 10 * np.eye(n)
    At, Bt = torch.tensor(A), torch.tensor(B)
    dyn = trajopt.Dynamics(lambda x, u, t: x @ At.T + u @ Bt.T, time_invariant=True)
    cost = trajopt.QuadraticCost(Q, R, QT)
    lqr = trajopt.LQR(A=np.broadcast_to(A, (T, n, n)), B=np.broadcast_to(B, (T, n, m)),
                      Q=np.broadcast_to(Q, (T, n, n)), R=np.broadcast_to(R, (T, m, m)), QT=QT)
    return dyn, cost, lqr


@pytest.mark.parametrize("mode", ["ilqr", "ddp"])
def test_lq_problem_one_iteration_equals_solve_lqr(mode):
    rng = np.random.default_rng(2)
    dyn, cost, lqr = _lq(rng)
    x0 = rng.normal(size=(5, 4))
    res = trajopt.solve_ddp(dyn, cost, torch.tensor(x0), torch.zeros(5, 25, 2), mode=mode)
    ref = trajopt.solve_lqr(lqr, x0)
    assert res.iterations.tolist() == [1] * 5 and bool(res.converged.all())
    assert set(res.reason.tolist()) == {"converged"}
    np.testing.assert_allclose(res.us.numpy(), ref.us, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(res.cost.numpy(), ref.cost, rtol=1e-12)
    np.testing.assert_allclose(res.K[0].numpy(), ref.K, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(res.Vxx[0].numpy(), ref.P, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(res.k.numpy(), 0 * res.k.numpy(), atol=1e-10)


def test_box_limits_hold_exactly_and_match_bounded_shooting():
    rng = np.random.default_rng(3)
    dyn, cost, lqr = _lq(rng, n=3, m=2, T=15)
    lo, hi = torch.tensor([-0.4, -0.2]), torch.tensor([0.3, 0.2])
    x0 = torch.tensor(rng.normal(size=3) * 2)
    res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(15, 2), control_limits=(lo, hi),
                            tol=1e-12)
    assert res.converged.item()
    us = res.us.numpy()
    assert (us >= lo.numpy()).all() and (us <= hi.numpy()).all()
    assert np.isclose(us, lo.numpy()).any() or np.isclose(us, hi.numpy()).any()

    def J(z):
        return float(trajopt.rollout(lqr, x0.numpy(), z.reshape(15, 2)).cost)

    def dJ(z):
        zt = torch.tensor(z.reshape(15, 2), requires_grad=True)
        c = _torch_rollout_cost(dyn, cost, x0, zt)
        c.backward()
        return zt.grad.numpy().ravel()
    bounds = [(float(lo[i % 2]), float(hi[i % 2])) for i in range(30)]
    opt = scipy.optimize.minimize(J, np.zeros(30), jac=dJ, method="L-BFGS-B", bounds=bounds,
                                  options=dict(ftol=1e-15, gtol=1e-12, maxiter=10_000))
    assert res.cost.item() <= opt.fun + 1e-9
    np.testing.assert_allclose(us.ravel(), opt.x, atol=1e-5)


def _torch_rollout_cost(dyn, cost, x0, us):
    x, c = x0, 0.0
    for t in range(us.shape[-2]):
        c = c + cost.running(x, us[..., t, :], t)
        x = dyn(x, us[..., t, :], t)
    return c + cost.terminal(x)


def test_optimum_is_stationary_and_no_worse_than_lbfgs():
    dyn, cost = torch_pendulum()
    T = 40
    x0 = torch.zeros(2, dtype=torch.float64)
    res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(T, 1, dtype=torch.float64), mode="ddp",
                            tol=1e-12,
                            max_iter=500)
    assert res.converged.item()
    us = res.us.clone().requires_grad_(True)
    _torch_rollout_cost(dyn, cost, x0, us).backward()
    assert us.grad.abs().max().item() < 1e-6

    def fun(z):
        zt = torch.tensor(z.reshape(T, 1), requires_grad=True)
        c = _torch_rollout_cost(dyn, cost, x0, zt)
        c.backward()
        return c.item(), zt.grad.numpy().ravel()
    opt = scipy.optimize.minimize(fun, np.zeros(T), jac=True, method="L-BFGS-B",
                                  options=dict(ftol=1e-15, gtol=1e-9, maxiter=3000))
    print(f"DDP cost {res.cost.item():.12f}, L-BFGS cost {opt.fun:.12f} ({opt.nit} its)")
    assert res.cost.item() <= opt.fun + 1e-9, (res.cost.item(), opt.fun)


def test_full_ddp_needs_no_more_iterations_than_ilqr_on_curved_problem():
    p = problems.pendulum(T=60)
    runs = {mode: trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, mode=mode,
                                    control_limits=p.control_limits, max_iter=300)
            for mode in ("ilqr", "ddp")}
    it = {mode: r.iterations.item() for mode, r in runs.items()}
    print(f"pendulum swing-up iterations: {it}")
    assert all(r.converged.item() for r in runs.values())
    assert it["ddp"] <= it["ilqr"]
    np.testing.assert_allclose(runs["ddp"].cost.item(), runs["ilqr"].cost.item(), rtol=1e-6)


def test_batch_equals_each_alone():
    p = problems.pendulum(T=30, u_max=3.0)
    gen = torch.Generator().manual_seed(0)
    x0 = torch.rand(64, 2, generator=gen, dtype=torch.float64) * torch.tensor([2.0, 1.0])
    res = trajopt.solve_ddp(p.dynamics, p.cost, x0, torch.zeros(30, 1),
                            control_limits=p.control_limits, max_iter=200)
    assert res.xs.shape == (64, 31, 2) and res.reason.shape == (64,)
    for i in [0, 5, 17, 33, 48, 63]:  # a subset alone, to keep the suite fast
        one = trajopt.solve_ddp(p.dynamics, p.cost, x0[i], torch.zeros(30, 1),
                                control_limits=p.control_limits, max_iter=200)
        assert one.iterations.item() == res.iterations[i].item()
        assert one.reason.item() == res.reason[i]
        np.testing.assert_allclose(one.us.numpy(), res.us[i].numpy(), rtol=1e-9, atol=1e-10)


def test_bad_input():
    dyn, cost = torch_pendulum()
    with pytest.raises(NonFiniteError, match="x0 contains NaN"):
        trajopt.solve_ddp(dyn, cost, torch.tensor([math.nan, 0.0]), torch.zeros(5, 1))
    with pytest.raises(ShapeError, match="us0 must have shape"):
        trajopt.solve_ddp(dyn, cost, torch.zeros(2), torch.zeros(5))
    with pytest.raises(ShapeError, match="do not broadcast"):
        trajopt.solve_ddp(dyn, cost, torch.zeros(3, 2), torch.zeros(4, 5, 1))
    with pytest.raises(ShapeError, match="dynamics or cost failed"):
        trajopt.solve_ddp(dyn, cost, torch.zeros(5), torch.zeros(5, 1))
    with pytest.raises(InvalidArgumentError, match="lo > hi for control 0"):
        trajopt.solve_ddp(dyn, cost, torch.zeros(2), torch.zeros(5, 1),
                          control_limits=(torch.ones(1), -torch.ones(1)))
    with pytest.raises(ShapeError, match=r"control_limits must be \(lo, hi\) of shape \(1,\)"):
        trajopt.solve_ddp(dyn, cost, torch.zeros(2), torch.zeros(5, 1),
                          control_limits=(torch.ones(2), torch.ones(2)))
    with pytest.raises(InvalidArgumentError, match="mode must be"):
        trajopt.solve_ddp(dyn, cost, torch.zeros(2), torch.zeros(5, 1), mode="newton")


def test_nan_dynamics_recorded_never_silent():
    def f(x, u, t):
        x1 = x + 0.1 * torch.cat([x[..., 1:], u], -1)
        bad = (x[..., :1] > 5.0)  # the model "breaks" past x = 5
        return torch.where(bad, torch.full_like(x1, math.nan), x1)
    dyn = trajopt.Dynamics(f, time_invariant=True)
    cost = trajopt.QuadraticCost(np.eye(2), 0.01 * np.eye(1), 100 * np.eye(2),
                                 x_ref=np.array([8.0, 0.0]))
    x0 = torch.tensor([[0.0, 0.0], [6.0, 0.0]])  # the second starts in the broken region
    with pytest.warns(ConvergenceWarning, match=r"1 of 2 batch elements \(flat index 1\)"):
        res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(2, 20, 1), max_iter=50)
    assert res.reason[1] == "diverged" and not res.converged[1]
    assert res.cost[1] == math.inf and all(h.cost[1] == math.inf for h in res.history)
    assert torch.isfinite(res.xs[0]).all() and torch.isfinite(res.cost[0])
    assert res.reason[0] in ("converged", "line_search_failed", "max_iter")
    assert (res.xs[0][:-1, 0] <= 5.0 + 1e-9).all()  # past 5 the next state is NaN
    with pytest.raises(NonFiniteError, match="not finite for any batch element"):
        trajopt.solve_ddp(dyn, cost, x0[1], torch.zeros(20, 1))


def test_plain_callable_dynamics_and_numpy_input():
    dyn, cost = torch_pendulum()
    res = trajopt.solve_ddp(dyn._f, cost, np.zeros(2), np.zeros((10, 1)), max_iter=5)
    assert isinstance(res.us, np.ndarray) and res.us.shape == (10, 1)


def test_stage_dimensions_may_differ():
    # 2 -> 3 -> 2 states, controls 1 then 2: a "network-like" chain
    f64 = dict(dtype=torch.float64)
    W0 = torch.tensor([[1.0, 0.5], [0.0, 1.0], [0.3, -0.2]], **f64)
    W1 = torch.tensor([[1.0, 0.0, 0.5], [0.0, 1.0, -0.5]], **f64)
    B0, B1 = torch.tensor([[1.0], [0.0], [0.5]], **f64), torch.eye(2, **f64)

    def f(x, u, t):
        return torch.tanh(x @ W0.T + u @ B0.T) if t == 0 else x @ W1.T + u @ B1.T

    def running(x, u, t):
        return 0.5 * (u * u).sum(-1) + 0.05 * (x * x).sum(-1)

    cost = trajopt.Cost(running, lambda x: 0.5 * ((x - 1.0) ** 2).sum(-1))
    res = trajopt.solve_ddp(f, cost, torch.tensor([0.2, -0.1], **f64),
                            [torch.zeros(1, **f64), torch.zeros(2, **f64)], tol=1e-14,
                            max_iter=100)
    assert isinstance(res.xs, list) and [x.shape[-1] for x in res.xs] == [2, 3, 2]
    assert res.converged.item()
    us = [u.clone().requires_grad_(True) for u in res.us]
    x, c = torch.tensor([0.2, -0.1], **f64), 0.0
    for t, u in enumerate(us):
        c = c + running(x, u, t)
        x = f(x, u, t)
    (c + 0.5 * ((x - 1.0) ** 2).sum()).backward()
    assert max(u.grad.abs().max().item() for u in us) < 1e-6


class AnalyticPendulum(trajopt.Dynamics):
    """The test pendulum with hand-written derivatives instead of torch.func."""

    def __init__(self):
        super().__init__(time_invariant=True)
        self.f = torch_pendulum()[0]

    def forward(self, x, u, t):
        return self.f(x, u, t)

    def derivatives(self, x, u, t, *, second_order=False):
        N = x.shape[0]
        fx = torch.zeros(N, 2, 2, dtype=x.dtype)
        fx[:, 0, 0], fx[:, 0, 1] = 1.0, DT
        fx[:, 1, 0], fx[:, 1, 1] = -DT * G * torch.cos(x[:, 0]), 1 - DT * BDAMP
        fu = torch.zeros(N, 2, 1, dtype=x.dtype)
        fu[:, 1, 0] = DT
        if not second_order:
            return trajopt.ddp.DynamicsDerivatives(fx=fx, fu=fu)
        fxx = torch.zeros(N, 2, 2, 2, dtype=x.dtype)
        fxx[:, 1, 0, 0] = DT * G * torch.sin(x[:, 0])
        return trajopt.ddp.DynamicsDerivatives(
            fx=fx, fu=fu, fxx=fxx, fux=torch.zeros(N, 2, 1, 2, dtype=x.dtype),
            fuu=torch.zeros(N, 2, 1, 1, dtype=x.dtype))


@pytest.mark.parametrize("mode", ["ilqr", "ddp"])
def test_analytic_derivatives_plug_in(mode):
    _, cost = torch_pendulum()
    auto, _ = torch_pendulum()
    x0, us0 = torch.tensor([0.2, 0.0], **F64), torch.zeros(30, 1, **F64)
    a = trajopt.solve_ddp(AnalyticPendulum(), cost, x0, us0, mode=mode, max_iter=20)
    b = trajopt.solve_ddp(auto, cost, x0, us0, mode=mode, max_iter=20)
    assert a.iterations.item() == b.iterations.item()
    np.testing.assert_allclose(a.us.numpy(), b.us.numpy(), rtol=1e-12, atol=1e-13)


def test_line_search_strategies_agree():
    p = problems.mpc_pendulum(T=40)
    th = math.pi - 0.2 + 0.5 * torch.randn(8, generator=torch.Generator().manual_seed(1), **F64)
    x0 = torch.stack([torch.cos(th), torch.sin(th), torch.zeros_like(th)], 1)
    runs = [trajopt.solve_ddp(p.dynamics, p.cost, x0, torch.zeros(40, 1, **F64),
                              control_limits=p.control_limits, max_iter=40,
                              line_search=trajopt.LineSearch(strategy=strategy))
            for strategy in ("sequential", "parallel", "hybrid")]
    for other in runs[1:]:
        assert runs[0].iterations.tolist() == other.iterations.tolist()
        assert runs[0].reason.tolist() == other.reason.tolist()
        np.testing.assert_allclose(runs[0].us.numpy(), other.us.numpy(), rtol=1e-12,
                                   atol=1e-13)
    steps = torch.stack([h.step for h in runs[0].history])
    assert ((steps > 0) & (steps < 1)).any()  # some backtracking happened
    with pytest.raises(InvalidArgumentError, match="decreasing"):
        trajopt.LineSearch(alphas=(0.5, 1.0))
    with pytest.raises(InvalidArgumentError, match="strategy"):
        trajopt.LineSearch(strategy="golden")


def test_float32_and_multi_dimensional_batch():
    p = problems.pendulum(T=20)
    x0 = torch.zeros(2, 3, 2, dtype=torch.float32)
    res = trajopt.solve_ddp(p.dynamics, p.cost, x0, torch.zeros(20, 1, dtype=torch.float32),
                            control_limits=p.control_limits, max_iter=5)
    assert res.xs.dtype == torch.float32 and res.xs.shape == (2, 3, 21, 2)
    assert res.K.shape == (2, 3, 20, 1, 2) and res.Vxx.shape == (2, 3, 21, 2, 2)
    assert res.cost.shape == (2, 3) and res.reason.shape == (2, 3)
    r64 = trajopt.solve_ddp(p.dynamics, p.cost, x0[0, 0].double(),
                            torch.zeros(20, 1, **F64), control_limits=p.control_limits,
                            max_iter=5)
    # single precision against double: agreement at the float32 level
    np.testing.assert_allclose(res.us[1, 2].double().numpy(), r64.us.numpy(), atol=2e-3)


@settings(max_examples=examples(15), deadline=None)
@given(n=st.integers(1, 4), m=st.integers(1, 3), T=st.integers(1, 8),
       seed=st.integers(0, 2**31 - 1), limits=st.booleans(), mode=st.sampled_from(["ilqr",
                                                                                 "ddp"]))
def test_batched_equals_looped_property(n, m, T, seed, limits, mode):
    """Random tanh dynamics: a batch of 3 solved at once equals each solved alone."""
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n, generator=g, **F64) / max(1, n) ** 0.5
    Bm = torch.randn(n, m, generator=g, **F64)
    dyn = trajopt.Dynamics(lambda x, u, t: torch.tanh(x @ W.T + u @ Bm.T) + 0.5 * x,
                           time_invariant=True)
    cost = trajopt.QuadraticCost(torch.eye(n, **F64), 0.1 * torch.eye(m, **F64),
                                 10 * torch.eye(n, **F64), x_goal=torch.full((n,), 0.3, **F64))
    x0 = torch.randn(3, n, generator=g, **F64)
    lim = (-0.5 * torch.ones(m, **F64), 0.5 * torch.ones(m, **F64)) if limits else None
    kw = dict(mode=mode, control_limits=lim, max_iter=30)
    both = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(T, m, **F64), **kw)
    for i in range(3):
        one = trajopt.solve_ddp(dyn, cost, x0[i], torch.zeros(T, m, **F64), **kw)
        assert one.reason.item() == both.reason[i]
        assert one.iterations.item() == both.iterations[i].item()
        # the batched and the single solve round differently (other kernel shapes); a
        # fast (quadratic) convergence keeps that at the rounding level, a slow one (DDP
        # mode, ~30 regularized iterations) lets it grow: seed 457, n=3, m=1, T=8 ends
        # 2.9e-7 apart, within the stopping test's sqrt(tol) = 1e-4 (also before the
        # session that found it); a batch-mixing bug gives O(1) differences
        slow = one.iterations.item() >= 25
        np.testing.assert_allclose(one.us.numpy(), both.us[i].numpy(), rtol=1e-10,
                                   atol=1e-6 * float(one.us.abs().max()) if slow else 1e-12)
        np.testing.assert_allclose(one.K.numpy(), both.K[i].numpy(), rtol=1e-9,
                                   atol=1e-5 * float(one.K.abs().max()) if slow else 1e-10)


def test_regularization_limit_returns_finite_fields():
    """issue "Nothing silent" #6: an element whose Q_uu no regularization up to the limit
    makes positive definite (a strongly concave control cost) used to return NaN K, k,
    Vx, Vxx; it returns its last successful (here: none, so zero) policy, finite, and the
    other element of the batch is unaffected.  The state's second entry is a constant
    flag that makes the control cost concave."""
    def running(x, u, t):
        w = 1.0 - (1e9 + 1.0) * x[..., 1]
        return 0.5 * x[..., 0] ** 2 + 0.5 * w * (u * u).sum(-1)

    def terminal(x):
        return 0.5 * x[..., 0] ** 2

    cost = trajopt.Cost(running, terminal)
    dyn = trajopt.Dynamics(lambda x, u, t: x + 0.1 * torch.cat([u, torch.zeros_like(u)], -1),
                           time_invariant=True)
    x0 = torch.tensor([[1.0, 0.0], [1.0, 1.0]], dtype=torch.float64)
    res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(2, 5, 1, dtype=torch.float64),
                            max_iter=20, regularization=trajopt.Regularization(maximum=1e3))
    assert res.reason[1] == "regularization_limit"
    for field in (res.K, res.k, res.Vx, res.Vxx, res.xs, res.cost):
        assert bool(torch.isfinite(field).all())
    assert res.reason[0] == "converged"


# ---------------------------------------------------------------- scale-free stopping
def _double_integrator(scale_cost=1.0):
    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    Bm = torch.tensor([[0.005], [0.1]], dtype=torch.float64)
    dyn = trajopt.Dynamics(lambda x, u, t: x @ A.T + u @ Bm.T, time_invariant=True)
    eye = torch.eye(2, dtype=torch.float64)
    cost = trajopt.QuadraticCost(scale_cost * eye, scale_cost * 0.1 * torch.eye(1).double(),
                                 scale_cost * 10 * eye)
    return dyn, cost


@settings(max_examples=examples(12), deadline=None)
@given(st.integers(-150, 150))
def test_stopping_does_not_depend_on_the_scale_of_x0(e):
    """From x0 scaled by 10^e the LQ optimum is the unit one scaled (us / c equal to
    1e-10) in the same number of iterations: Tassa's absolute tests called the zero
    control converged from x0 = [1e-5, 0] after 0 iterations."""
    dyn, cost = _double_integrator()
    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    us0 = torch.zeros(20, 1, dtype=torch.float64)
    ref = trajopt.solve_ddp(dyn, cost, x0, us0)
    c = 10.0 ** e
    res = trajopt.solve_ddp(dyn, cost, c * x0, us0)
    assert ref.converged.item() and res.converged.item()
    assert res.iterations.item() == ref.iterations.item() >= 1
    torch.testing.assert_close(res.us / c, ref.us, rtol=1e-10, atol=0)
    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    Bm = torch.tensor([[0.005], [0.1]], dtype=torch.float64)
    eye = torch.eye(2, dtype=torch.float64)
    lqr = trajopt.solve_lqr(trajopt.LQR(A=A.expand(20, 2, 2), B=Bm.expand(20, 2, 1),
                                        Q=eye.expand(20, 2, 2),
                                        R=0.1 * torch.eye(1).double().expand(20, 1, 1),
                                        QT=10 * eye), x0)
    torch.testing.assert_close(ref.us, lqr.us, rtol=1e-9, atol=1e-12)


@settings(max_examples=examples(8), deadline=None)
@given(st.integers(-100, 100))
def test_stopping_does_not_depend_on_the_scale_of_the_cost(e):
    dyn, cost = _double_integrator()
    x0 = torch.tensor([1.0, -0.5], dtype=torch.float64)
    us0 = torch.zeros(20, 1, dtype=torch.float64)
    ref = trajopt.solve_ddp(dyn, cost, x0, us0)
    dyn, scaled = _double_integrator(10.0 ** e)
    res = trajopt.solve_ddp(dyn, scaled, x0, us0)
    assert res.converged.item() and res.iterations.item() == ref.iterations.item()
    torch.testing.assert_close(res.us, ref.us, rtol=1e-10, atol=1e-14)


def test_converged_result_is_polished_to_tol():
    """The step that passes the sqrt(tol) test is taken: the DDP pendulum optimum is
    stationary to the rounding level of its cost, not to sqrt(tol)."""
    dyn, cost = torch_pendulum()
    x0 = torch.zeros(2, dtype=torch.float64)
    res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(30, 1, dtype=torch.float64),
                            mode="ddp", max_iter=200)
    assert res.converged.item()
    us = res.us.clone().requires_grad_(True)
    _torch_rollout_cost(dyn, cost, x0, us).backward()
    assert us.grad.abs().max().item() < 1e-6 * res.us.abs().max().item()


# ---------------------------------------------------------------- the user's functions
def _user_lq(f=None, running=None, terminal=None):
    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=torch.float64)
    Bm = torch.tensor([[0.0], [0.1]], dtype=torch.float64)

    def lin(x, u, t):
        return x @ A.T + u @ Bm.T
    run = running or (lambda x, u, t: (x ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1))
    term = terminal or (lambda x: 10 * (x ** 2).sum(-1))
    return trajopt.Dynamics(f or lin), trajopt.Cost(run, term), lin


X0 = torch.tensor([1.0, 0.0], dtype=torch.float64)
US0 = torch.zeros(15, 1, dtype=torch.float64)


@pytest.mark.parametrize("part", ["dynamics", "running", "terminal"])
def test_derivatives_hidden_from_torch_func_raise(part):
    _, _, lin = _user_lq()
    dyn, cost, _ = _user_lq(
        f=(lambda x, u, t: lin(x, u, t).detach()) if part == "dynamics" else None,
        running=(lambda x, u, t: ((x ** 2).sum(-1) + (u ** 2).sum(-1)).detach())
        if part == "running" else None,
        terminal=(lambda x: 10 * (x.detach() ** 2).sum(-1))
        if part == "terminal" else None)
    with pytest.raises(InvalidArgumentError, match="exactly zero.*hidden from torch.func"):
        trajopt.solve_ddp(dyn, cost, X0, US0)


def test_legitimately_zero_derivatives_are_accepted():
    """A kink at the nominal point (|u| at u = 0), a saturated clamp and a zero running
    cost have exactly zero derivatives too, and are not refused."""
    _, _, lin = _user_lq()
    dyn, cost, _ = _user_lq(f=lambda x, u, t: lin(x, u.clamp(min=1.0, max=2.0) - 5.0, t),
                       running=lambda x, u, t: u.abs().sum(-1) + 0 * x.sum(-1))
    res = trajopt.solve_ddp(dyn, cost, X0, US0, max_iter=3)
    assert np.isin(res.reason, ["converged", "max_iter", "line_search_failed"]).all()


@pytest.mark.parametrize("where", ["dynamics", "running"])
@pytest.mark.parametrize("how", ["item", "if"])
def test_item_and_data_dependent_branches_are_named(where, how):
    _, _, lin = _user_lq()

    def branchy(x):
        if how == "item":
            return x[..., 0].sum().item() > 1e6
        return bool(x[..., 0].sum() > 1e6)
    f = (lambda x, u, t: x if branchy(x) else lin(x, u, t)) if where == "dynamics" else None
    run = (lambda x, u, t: (x ** 2).sum(-1) * (2.0 if branchy(x) else 1.0)) \
        if where == "running" else None
    dyn, cost, _ = _user_lq(f=f, running=run)
    if run is not None:
        # the message is the time-varying path's (torch.func under vmap): this running
        # cost never reads t, so by default it is found time invariant and differentiated
        # on its rows, where .item() runs (test_time_invariance_is_inferred)
        cost = trajopt.Cost(run, cost.terminal, time_invariant=False)
    name = "the dynamics" if where == "dynamics" else "the running cost"
    with pytest.raises(InvalidArgumentError, match=rf"{name} at stage 0 calls \.item\(\) or "
                                                   r"branches on a tensor's value"):
        trajopt.solve_ddp(dyn, cost, X0, US0)


def _vmap_indexes(refs) -> bool:
    """Whether this torch's vmap indexes a tensor with a 0-d batched tensor."""
    try:
        torch.vmap(lambda t: refs[t])(torch.arange(3))
    except RuntimeError:
        return False
    return True


def test_time_varying_models_are_differentiated_in_one_call():
    """A time-varying dynamics / cost gets all its stages in one vectorized call with t a
    tensor when it can take one, stage by stage when it cannot (a list indexed by t, a
    branch on t) or answers differently; the results agree."""
    _, _, lin = _user_lq()
    refs = torch.linspace(0, 1, 15, dtype=torch.float64)
    ref_list = [float(r) for r in refs]
    def as_t(t, x):  # t as a tensor works for an int t and a 0-d tensor t alike
        return torch.as_tensor(t, dtype=x.dtype)

    def plain(x, u, t):
        return (x ** 2).sum(-1) + (u ** 2).sum(-1)
    # name: (dynamics, running cost, dynamics vectorized, cost vectorized)
    cases = {
        "tensor": (lambda x, u, t: lin(x, u, t) * (1 + 0.01 * as_t(t, x)),
                   lambda x, u, t: ((x[..., 0] - refs.index_select(
                       0, torch.as_tensor(t).reshape(1))[0]) ** 2) + (u ** 2).sum(-1),
                   True, True),
        # refs[t] with a 0-d stage tensor: plain vmap indexes with it (the cost's
        # derivatives are taken by reverse mode under vmap, trajopt.ddp.reverse), where
        # vmap(jacfwd) could not; the answer is checked against the int stage. Before
        # torch 2.13 (2.1 and 2.6 checked) vmap calls .item() there: stage by stage
        "indexed": (lin, lambda x, u, t: ((x[..., 0] - refs[t]) ** 2) + (u ** 2).sum(-1),
                    True, _vmap_indexes(refs)),
        "list": (lambda x, u, t: lin(x, u, t) * (1 + 0.01 * ref_list[t]),
                 lambda x, u, t: ((x[..., 0] - ref_list[t]) ** 2) + (u ** 2).sum(-1),
                 False, False),
        "branch": (lambda x, u, t: lin(x, u, t) * (1.01 if t == 14 else 1.0),
                   lambda x, u, t: (x ** 2).sum(-1) * (3.0 if t == 3 else 1.0)
                   + (u ** 2).sum(-1), False, False),
        # int64 tensor * float is float32 in torch: caught, evaluated per stage
        "float32": (lambda x, u, t: lin(x, u, t) * (1 + 0.01 * t), plain, False, True),
        "differs": (lambda x, u, t: lin(x, u, t) * (1.0 if isinstance(t, int) else 2.0),
                    plain, False, True),
    }
    for name, (f, run, vec_f, vec_l) in cases.items():
        # declared time varying: lin and plain never read t, and would be found time
        # invariant (test_time_invariance_is_inferred)
        solver = trajopt.DDPSolver(trajopt.Dynamics(f, time_invariant=False),
                                   trajopt.Cost(run, lambda x: (x ** 2).sum(-1),
                                                time_invariant=False), max_iter=30)
        res = solver.solve(X0, US0)
        assert res.converged.item(), name
        chain = solver.structure
        assert chain._dynamics_derivatives.tensor_t is vec_f, name
        assert chain._cost_derivatives.tensor_t is vec_l, name
        # independent check: the returned policy is stationary for the rollout cost
        us = res.us.clone().requires_grad_(True)
        x, c = X0, 0.0
        for t in range(15):
            c = c + run(x, us[t], t)
            x = f(x, us[t], t)
        (c + (x ** 2).sum(-1)).backward()
        assert us.grad.abs().max() < 1e-12, name


def test_two_argument_callables_are_time_invariant():
    """``f(x, u)`` and ``running(x, u)`` (no t) are accepted as time-invariant models and
    give the same solution as their three-argument forms."""
    dyn3, cost3, lin = _user_lq()
    dyn3 = trajopt.Dynamics(lin, time_invariant=False)   # lin never reads t
    res3 = trajopt.solve_ddp(dyn3, cost3, X0, US0)
    dyn2 = trajopt.Dynamics(lambda x, u: lin(x, u, 0))
    cost2 = trajopt.Cost(lambda x, u: (x ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1),
                         lambda x: 10 * (x ** 2).sum(-1))
    assert dyn2.time_invariant and cost2.time_invariant and not dyn3.time_invariant
    res2 = trajopt.solve_ddp(lambda x, u: lin(x, u, 0), cost2, X0, US0)
    torch.testing.assert_close(res2.us, res3.us, rtol=1e-12, atol=1e-14)
    assert trajopt.Dynamics(lambda x, u, t=0: x * t).time_invariant is False


def test_numbers_as_control_limits_bound_every_control():
    """``control_limits=(-1.0, 1.0)`` (mpc.pytorch's scalar u_lower / u_upper habit) is
    the box [-1, 1] on every control: the same solve, bit for bit, as the (m,) limits;
    the MPC does not take m = 1 from it (it was refused: "got (1) and (1)")."""
    def f(x, u, t):
        return x + 0.1 * u
    cost = trajopt.QuadraticCost(torch.eye(2, **F64), torch.eye(2, **F64), torch.eye(2, **F64))
    x0, us0 = 5 * torch.ones(2, **F64), torch.zeros(20, 2, **F64)
    ones = torch.ones(2, **F64)
    ref = trajopt.solve_ddp(f, cost, x0, us0, control_limits=(-ones, ones))
    assert float(ref.us.min()) == -1.0
    for lims in ((-1.0, 1.0), (-1, np.float64(1.0)), (torch.tensor(-1.0, **F64), 1.0)):
        got = trajopt.solve_ddp(f, cost, x0, us0, control_limits=lims)
        assert torch.equal(got.us, ref.us)
    mpc = trajopt.MPC(f, cost, horizon=20, control_limits=(-1.0, 1.0))
    assert torch.equal(mpc.step(x0), ref.us[0])
