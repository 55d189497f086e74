"""Control limits per stage (T, m), per element (B, m) and both (T, B, m)
(trajopt/ddp/limits.py), float64:

* limits of those shapes holding one (m,) bound give the (m,) solve bit for bit (the
  compiled loop and the torch recursion, iLQR and DDP, multiple shooting, players);
* the pendulum swing-up with a weaker actuator over its last stages and a zero final
  control: every stage within its own bound, and the optimum of casadi + IPOPT on the same
  problem (tests/reference/casadi_ocp.py, typed independently of trajopt);
* a batch with per-element or per-stage-and-element limits: each element equals its solve
  alone with its own limits (also under the line-search strategies, constraints and
  gradients through the solve);
* shapes that are wrong or ambiguous (T == B), lo > hi at one stage, NaN: the project's
  errors naming ``control_limits``;
* MPC: per-stage limits belong to the window (stage t of every plan gets limit t).
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import trajopt
from trajopt import problems
from trajopt.errors import InvalidArgumentError, NonFiniteError, ShapeError

from ._differences import central_differences

F64 = dict(dtype=torch.float64)


def _same(a, b, atol=0.0):
    """Two results equal: bitwise (atol 0) or to ``atol``; iterations and reasons alike."""
    for name in ("xs", "us", "K", "k", "Vx", "Vxx", "cost"):
        x, y = torch.as_tensor(getattr(a, name)), torch.as_tensor(getattr(b, name))
        assert x.shape == y.shape, name
        if atol == 0.0:
            assert torch.equal(x, y), f"{name}: {float((x - y).abs().max())}"
        else:
            torch.testing.assert_close(x, y, rtol=0, atol=atol, msg=name)
    assert torch.equal(torch.as_tensor(a.iterations), torch.as_tensor(b.iterations))
    assert np.array_equal(np.asarray(a.reason), np.asarray(b.reason))


def _pendulum_batch(T=60):
    p = problems.pendulum(T=T)
    x0 = torch.tensor([[0.0, 0.0], [0.3, -0.5], [-0.2, 1.0]], **F64)
    return p, x0


# ---------------------------------------------------------------- (a) one bound, any shape
@pytest.mark.parametrize("compiled", [True, False])
@pytest.mark.parametrize("mode", ["ilqr", "ddp"])
def test_repeated_limits_equal_the_uniform_solve_bitwise(compiled, mode, monkeypatch):
    """(T, m), (T, 1, m), (1, B, m), (B, m) and (T, B, m) limits that hold the (m,) bound
    everywhere give the (m,) solve bit for bit (the bound is active on the swing-up)."""
    if not compiled:
        monkeypatch.setenv("TRAJOPT_COMPILED", "0")
    p, x0 = _pendulum_batch()
    T, B = p.T, x0.shape[0]
    lo, hi = p.control_limits
    kw = dict(mode=mode, max_iter=60)
    ref = trajopt.solve_ddp(p.dynamics, p.cost, x0, p.us0, control_limits=(lo, hi), **kw)
    assert bool((ref.us.abs() == 5.0).any())          # the bound is active
    for shape in [(T, 1), (T, 1, 1), (1, B, 1), (B, 1), (T, B, 1), (1, 1, 1), (1, 1)]:
        res = trajopt.solve_ddp(p.dynamics, p.cost, x0, p.us0, **kw, control_limits=(
            lo.expand(shape).clone(), hi.expand(shape).clone()))
        _same(res, ref)
    # a number on one side, (T, m) on the other
    res = trajopt.solve_ddp(p.dynamics, p.cost, x0, p.us0, control_limits=(
        -5.0, hi.expand(T, 1).clone()), **kw)
    _same(res, ref)


def test_repeated_limits_multiple_shooting_and_players_bitwise():
    """Multiple shooting (defects, gapped forward pass) and GT-DDP's players (the box
    gains of the players' plug) with (T, m) limits holding the (m,) bound: bit for bit."""
    p = problems.pendulum(T=60)
    T = p.T
    goal = torch.tensor([math.pi, 0.0], **F64)
    guess = p.x0 + torch.linspace(0, 1, T + 1, **F64)[:, None] * (goal - p.x0)
    lo, hi = p.control_limits
    kw = dict(xs0=guess, shooting="multiple", max_iter=80)
    ref = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, control_limits=(lo, hi), **kw)
    res = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, **kw, control_limits=(
        lo.expand(T, 1).clone(), hi.expand(T, 1).clone()))
    _same(res, ref)
    assert ref.max_gap is not None and torch.equal(res.max_gap, ref.max_gap)
    u = problems.unicycle(T=30)
    lo, hi = (torch.tensor([-0.5, -2.0], **F64), torch.tensor([2.0, 0.7], **F64))
    kw = dict(players=[1, 1], max_iter=40)
    ref = trajopt.solve_ddp(u.dynamics, u.cost, u.x0, u.us0, control_limits=(lo, hi), **kw)
    res = trajopt.solve_ddp(u.dynamics, u.cost, u.x0, u.us0, **kw, control_limits=(
        lo.expand(30, 2).clone(), hi.expand(30, 2).clone()))
    _same(res, ref)


# ------------------------------------------------------- (b) per-stage limits vs IPOPT
def _weak_end_limits(T):
    """|u| <= 5 at first, <= 1 over the last 30 stages, 0 at the last one."""
    hi = torch.full((T, 1), 5.0, **F64)
    hi[-30:] = 1.0
    hi[-1] = 0.0
    return -hi, hi


def test_per_stage_limits_hold_and_match_ipopt():
    """The pendulum swing-up (T = 100) with a weaker actuator over its last 30 stages and
    a zero last control: each stage keeps its own bound exactly, the tight bound is active
    (the (m,)-limited optimum leaves it), and IPOPT on the same NLP -- started at our
    solution (it stays: a KKT point) and from the rollout of zero controls -- finds the
    same optimum (cost 1e-9 relative, controls 1e-6)."""
    casadi_ocp = pytest.importorskip("tests.reference.casadi_ocp")
    pytest.importorskip("casadi")
    p = problems.pendulum(T=100)
    lo, hi = _weak_end_limits(p.T)
    res = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, control_limits=(lo, hi),
                            mode="ddp", tol=1e-12, max_iter=500)
    assert res.reason == "converged"
    assert bool(((res.us >= lo) & (res.us <= hi)).all())
    assert bool((res.us[-30:] == 1.0).sum() >= 5) and float(res.us[-1, 0]) == 0.0
    free = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, control_limits=p.control_limits,
                             mode="ddp", tol=1e-12, max_iter=500)
    assert float(free.us[-30:].abs().max()) > 1.5          # the tighter bound matters
    ocp = casadi_ocp.pendulum_goal(T=p.T, dt=p.dt, reach_goal=False)
    bounds = (lo.numpy(), hi.numpy())
    near = casadi_ocp.solve(ocp, p.x0.numpy(), res.xs.numpy(), res.us.numpy(), near=True,
                            u_bounds=bounds)
    assert near["status"] == "Solve_Succeeded" and near["iterations"] <= 10
    xs0 = [p.x0]
    for t in range(p.T):
        xs0.append(p.dynamics(xs0[-1], p.us0[t], t))
    cold = casadi_ocp.solve(ocp, p.x0.numpy(), torch.stack(xs0).numpy(), p.us0.numpy(),
                            u_bounds=bounds)
    assert cold["status"] == "Solve_Succeeded"
    for ref in (near, cold):
        assert abs(float(res.cost) - ref["cost"]) <= 1e-9 * abs(ref["cost"])
        np.testing.assert_allclose(res.us.numpy(), ref["us"], atol=1e-6)
        np.testing.assert_allclose(res.xs.numpy(), ref["xs"], atol=1e-6)


# --------------------------------------------- (c), (d) per element: each alone equal
@pytest.mark.parametrize("strategy", ["hybrid", "parallel", "sequential"])
def test_per_element_limits_equal_lone_solves(strategy):
    """(B, m) limits: each element of the batch equals its solve alone with its own (m,)
    bound (the elements converge after different iterations: the loop's subsets and the
    line search's repeated rows carry their own limits)."""
    p, x0 = _pendulum_batch()
    bound = torch.tensor([[5.0], [3.0], [4.0]], **F64)
    kw = dict(max_iter=300, line_search=trajopt.LineSearch(strategy=strategy))
    res = trajopt.solve_ddp(p.dynamics, p.cost, x0, p.us0, control_limits=(-bound, bound),
                            **kw)
    assert len(set(res.iterations.tolist())) > 1
    for b in range(3):
        one = trajopt.solve_ddp(p.dynamics, p.cost, x0[b], p.us0,
                                control_limits=(-bound[b], bound[b]), **kw)
        assert bool((res.us[b].abs() <= bound[b]).all())
        _same(one, _row(res, b), atol=1e-12)


def _row(res, b):
    """Element ``b`` of a batched result, as a lone solve returns it."""
    class Row:
        pass
    r = Row()
    for name in ("xs", "us", "K", "k", "Vx", "Vxx", "cost", "iterations"):
        setattr(r, name, getattr(res, name)[b])
    r.reason = np.asarray(res.reason)[b]
    return r


@pytest.mark.parametrize("mode", ["ilqr", "ddp"])
def test_per_stage_and_element_limits_equal_lone_solves(mode):
    """(T, B, m) limits (mpc.pytorch's layout): each element equals its solve alone with
    its own (T, m) limits; a batch of shape (2, 2) takes (T, 2, 2, m)."""
    p, x0 = _pendulum_batch()
    T = p.T
    hi = torch.tensor([5.0, 3.0, 4.0], **F64)[None, :, None].expand(T, 3, 1).clone()
    hi[-20:, 1] = 1.0
    hi[30:40, 2] = 0.5
    hi[-1] = 0.0
    lo = -hi
    lo[:10, 0] = -1.0
    kw = dict(mode=mode, max_iter=300)
    res = trajopt.solve_ddp(p.dynamics, p.cost, x0, p.us0, control_limits=(lo, hi), **kw)
    assert bool(((res.us >= lo.transpose(0, 1)) & (res.us <= hi.transpose(0, 1))).all())
    assert bool((res.us[2, 30:40].abs() == 0.5).any()) and bool((res.us[0, :10] == -1).any())
    for b in range(3):
        one = trajopt.solve_ddp(p.dynamics, p.cost, x0[b], p.us0,
                                control_limits=(lo[:, b], hi[:, b]), **kw)
        _same(one, _row(res, b), atol=1e-12)
    # a (2, 2) batch: elements 0, 1, 2, 0 of the above
    x4 = x0[[0, 1, 2, 0]].reshape(2, 2, 2)
    lo4, hi4 = (v[:, [0, 1, 2, 0]].reshape(T, 2, 2, 1) for v in (lo, hi))
    res4 = trajopt.solve_ddp(p.dynamics, p.cost, x4, p.us0, control_limits=(lo4, hi4), **kw)
    torch.testing.assert_close(res4.us.reshape(4, T, 1), res.us[[0, 1, 2, 0]], rtol=0,
                               atol=1e-12)


def test_per_element_limits_with_constraints_equal_lone_solves():
    """The augmented-Lagrangian loop solves subsets of the batch: per-element limits
    follow them (and a batch of shape (2,) handed on flat)."""
    p = problems.pendulum(T=50, reach_goal=True)
    x0 = torch.tensor([[0.0, 0.0], [0.4, 0.0]], **F64)
    bound = torch.tensor([[5.0], [4.0]], **F64)
    kw = dict(constraints=p.constraints, max_iter=300, tol=1e-10)
    res = trajopt.solve_ddp(p.dynamics, p.cost, x0, p.us0, control_limits=(-bound, bound),
                            **kw)
    for b in range(2):
        one = trajopt.solve_ddp(p.dynamics, p.cost, x0[b], p.us0,
                                control_limits=(-bound[b], bound[b]), **kw)
        assert one.reason == res.reason[b]
        torch.testing.assert_close(res.us[b], one.us, rtol=0, atol=1e-12)
        torch.testing.assert_close(res.cost[b], one.cost, rtol=1e-12, atol=0)
        assert bool((res.us[b].abs() <= bound[b]).all())


def test_gradients_with_per_stage_limits_match_finite_differences():
    """Gradients through a solve with (T, B, m) limits: the controls held at their own
    stage's bound (the active set of the sensitivity) -- against central differences."""
    T = 20
    mass = torch.tensor(1.0, **F64, requires_grad=True)
    target = torch.tensor([math.pi, 0.0], **F64, requires_grad=True)

    def f(x, u, t):
        th, dth = x[..., 0], x[..., 1]
        return torch.stack([th + 0.05 * dth, dth + 0.05 * (
            u[..., 0] / mass - 0.1 * dth - 9.81 * torch.sin(th))], -1)
    cost = trajopt.Cost(lambda x, u, t: 0.01 * ((x - target) ** 2).sum(-1)
                        + 0.1 * (u * u).sum(-1), lambda x: 50 * ((x - target) ** 2).sum(-1))
    x0 = torch.tensor([[0.2, 0.0], [-0.1, 0.3]], **F64, requires_grad=True)
    hi = torch.full((T, 2, 1), 4.0, **F64)
    hi[12:16, 1] = 2.0
    kw = dict(max_iter=300, tol=1e-14, control_limits=(-hi, hi))
    res = trajopt.solve_ddp(f, cost, x0, torch.zeros(2, T, 1, **F64),
                            params=(mass, target), **kw)
    assert bool(res.converged.all())
    assert bool(((res.us[1, 12:16].abs() - 2).abs() < 1e-9).any())   # the stage's bound
    g = torch.Generator().manual_seed(0)
    w_x, w_u = (torch.randn(v.shape, generator=g, **F64) for v in (res.xs, res.us))

    def loss(r):
        return (r.xs * w_x).sum() + (r.us * w_u).sum() + 0.3 * r.cost.sum()
    ours = torch.cat([v.reshape(-1) for v in torch.autograd.grad(loss(res),
                                                                 (mass, target, x0))])
    fd = central_differences((mass, target, x0), lambda: loss(trajopt.solve_ddp(
        f, cost, x0.detach(), torch.zeros(2, T, 1, **F64), **kw)))
    torch.testing.assert_close(ours, fd, rtol=2e-5, atol=2e-5 * float(fd.abs().max()))


# ------------------------------------------------------------------ (e) bad input
def _solve(limits, x0=None, us0=None, T=4):
    def f(x, u, t):
        return torch.stack([x[..., 0] + 0.1 * x[..., 1], x[..., 1] + 0.1 * u[..., 0]], -1)
    cost = trajopt.Cost(lambda x, u, t: (x * x).sum(-1) + 0.1 * (u * u).sum(-1),
                        lambda x: 10 * (x * x).sum(-1))
    x0 = torch.ones(4, 2, **F64) if x0 is None else x0
    us0 = torch.zeros(T, 1, **F64) if us0 is None else us0
    return trajopt.solve_ddp(f, cost, x0, us0, control_limits=limits, max_iter=50)


def test_ambiguous_shape_is_refused_and_the_explicit_forms_work():
    """T == B == 4: a (4, 1) limit could be per stage or per element: ShapeError naming
    control_limits and the two explicit forms; (T, 1, m) and (1, B, m) say which, and
    differ."""
    lim = torch.tensor([[0.1], [0.2], [0.3], [0.4]], **F64)
    with pytest.raises(ShapeError, match=r"control_limits.*ambiguous.*\(4, 1, 1\).*"
                                         r"\(1, 4, 1\)"):
        _solve((-lim, lim))
    with pytest.raises(ShapeError, match="ambiguous"):
        _solve((-1.0, lim))
    stage = _solve((-lim[:, None], lim[:, None]))
    element = _solve((-lim[None], lim[None]))
    assert bool((stage.us[:, :, 0].abs() <= lim[:, 0]).all())          # (B, T) vs (T,)
    assert bool((element.us[:, :, 0].abs() <= lim).all())
    assert not torch.equal(stage.us, element.us)
    # T != B: read by size
    for limits in [(-lim[:3], lim[:3])]:
        res = _solve(limits, x0=torch.ones(3, 2, **F64))                 # B = 3: per element
        assert bool((res.us[:, :, 0].abs() <= lim[:3]).all())
        res = _solve(limits, x0=torch.ones(5, 2, **F64), T=3,
                     us0=torch.zeros(3, 1, **F64))                         # T = 3: per stage
        assert bool((res.us[:, :, 0].abs() <= lim[:3, 0]).all())


@pytest.mark.parametrize("limits, error, match", [
    ((-torch.ones(5, 1), torch.ones(5, 1)), ShapeError,
     r"^control_limits must be \(lo, hi\) of shape \(1,\).*got control_limits\[0\] \(lo\) "
     r"of shape \(5, 1\)"),
    ((-1.0, torch.ones(4, 4, 2)), ShapeError,
     r"^control_limits must be .*got control_limits\[1\] \(hi\) of shape \(4, 4, 2\)"),
    ((-1.0, torch.ones(3, 4, 1)), ShapeError,
     r"^control_limits must be .*\(4, 1\) per stage.*\(4, 4, 1\) per stage and element; "
     r"got control_limits\[1\] \(hi\) of shape \(3, 4, 1\)"),
    ((-1.0, torch.ones(4, 3, 1)), ShapeError, r"^control_limits must be .*per element.*"
                                              r"of shape \(4, 3, 1\)"),
    ((-1.0, torch.ones(2, 4, 4, 1)), ShapeError, r"^control_limits must be .*per stage.*"
                                                 r"of shape \(2, 4, 4, 1\)"),
    ((torch.zeros(4, 1, 1), torch.tensor([1.0, 1.0, -0.5, 1.0]).reshape(4, 1, 1)),
     InvalidArgumentError, r"^control_limits: lo > hi at stage 2, flat batch element 0, "
                           r"control 0 \(0\.0 > -0\.5\)"),
    ((torch.zeros(1, 4, 1), torch.tensor([1.0, 1.0, 1.0, -2.0]).reshape(1, 4, 1)),
     InvalidArgumentError, r"^control_limits: lo > hi at stage 0, flat batch element 3"),
    ((torch.tensor([0.0, math.nan, 0.0, 0.0]).reshape(4, 1, 1), 1.0), NonFiniteError,
     r"^control_limits\[0\] \(lo\) contains NaN"),
])
def test_bad_limits_are_named(limits, error, match):
    with pytest.raises(error, match=match):
        _solve(tuple(v.to(torch.float64) if torch.is_tensor(v) else v for v in limits))


def test_infinite_per_stage_limits_and_listed_controls():
    """+-inf bounds at some stages are no bound there; controls given as a list take
    per-stage limits (same stage sizes); sizes that differ refuse them, named."""
    hi = torch.tensor([0.2, math.inf, 0.3, math.inf], **F64).reshape(4, 1)
    res = _solve((-hi, hi), x0=torch.ones(2, 2, **F64))
    listed = _solve((-hi, hi), x0=torch.ones(2, 2, **F64),
                    us0=[torch.zeros(1, **F64) for _ in range(4)])
    torch.testing.assert_close(torch.stack(listed.us, 1), res.us, rtol=0, atol=0)
    assert bool((res.us[:, [0, 2], 0].abs() <= hi[[0, 2], 0]).all())
    with pytest.raises(ShapeError, match="control_limits need every stage to have the same"):
        _solve((-hi, hi), us0=[torch.zeros(1, **F64)] * 3 + [torch.zeros(2, **F64)])


# ----------------------------------------------------------------------- (f) MPC
def _mpc(limits, iterations=3, horizon=20):
    p = problems.pendulum(T=horizon)
    return p, trajopt.MPC(p.dynamics, p.cost, horizon=horizon, iterations=iterations,
                          control_limits=limits)


def test_mpc_per_stage_limits_belong_to_the_window():
    """MPC with (horizon, m) limits: n_controls is m; (horizon, m) limits holding one
    bound run as the (m,) ones bit for bit; with a tighter bound over the window's last
    stages every plan keeps stage t within limit t (the applied control: stage 0's), and
    the first step is the solve of the window from zero controls."""
    H = 20
    ref_p, ref = _mpc((-5.0 * torch.ones(1, **F64), 5.0 * torch.ones(1, **F64)))
    _, same = _mpc((-5.0 * torch.ones(H, 1, **F64), 5.0 * torch.ones(H, 1, **F64)))
    assert same.n_controls == 1
    a = ref.simulate(ref_p.dynamics, ref_p.x0, 6)
    b = same.simulate(ref_p.dynamics, ref_p.x0, 6)
    assert torch.equal(a.xs, b.xs) and torch.equal(a.us, b.us)
    hi = torch.full((H, 1), 5.0, **F64)
    hi[-8:] = 0.5
    p, mpc = _mpc((-hi, hi))
    plans = []
    run = mpc.simulate(p.dynamics, p.x0, 8, callback=lambda k, x, r: plans.append(r.us))
    for us in plans:
        assert bool((us.abs() <= hi).all())
        assert bool((us[-8:].abs() == 0.5).any())      # the window's tight stages bind
    assert bool((run.us.abs() <= 5.0).all()) and bool((run.us.abs() > 0.5).any())
    first = trajopt.DDPSolver(p.dynamics, p.cost, max_iter=3, control_limits=(-hi, hi)
                              ).solve(p.x0, torch.zeros(H, 1, **F64))
    assert torch.equal(plans[0], first.us)


def test_mpc_per_element_limits_equal_lone_controllers():
    """A batch of controllers with (B, m) limits: each runs as a controller alone with its
    (m,) bound (1e-12); a (horizon + 1, m) limit is refused, named."""
    p = problems.pendulum(T=15)
    x0 = torch.tensor([[0.0, 0.0], [0.5, 0.0]], **F64)
    bound = torch.tensor([[5.0], [2.0]], **F64)
    mpc = trajopt.MPC(p.dynamics, p.cost, horizon=15, control_limits=(-bound, bound))
    run = mpc.simulate(p.dynamics, x0, 5)
    for b in range(2):
        one = trajopt.MPC(p.dynamics, p.cost, horizon=15,
                          control_limits=(-bound[b], bound[b])).simulate(p.dynamics, x0[b], 5)
        torch.testing.assert_close(run.us[b], one.us, rtol=0, atol=1e-12)
        torch.testing.assert_close(run.xs[b], one.xs, rtol=0, atol=1e-12)
    bad = trajopt.MPC(p.dynamics, p.cost, horizon=15,
                      control_limits=(-torch.ones(16, 1, **F64), torch.ones(16, 1, **F64)))
    with pytest.raises(ShapeError, match=r"^control_limits must be .*\(15, 1\) per stage"):
        bad.step(p.x0)


def test_a_stage_shape_with_a_two_dimensional_batch():
    """T followed by ones is per stage whatever the batch's rank; where it is also a
    per-element shape (batch (T, B2)) it is refused (the session's review: (4, 1, 1) was
    read per element over a (4, 3) batch, per stage over a (4,) one)."""
    lim = torch.tensor([0.1, 0.2, 0.3, 0.4], **F64).reshape(4, 1, 1)
    with pytest.raises(ShapeError, match=r"ambiguous.*\(4, 1, 1, 1\).*\(1, 4, 3, 1\)"):
        _solve((-lim, lim), x0=torch.ones(4, 3, 2, **F64))
    x0 = torch.ones(2, 3, 2, **F64)
    res = _solve((-lim, lim), x0=x0)                    # (2, 3) batch: per stage
    explicit = _solve((-lim[..., None], lim[..., None]), x0=x0)
    assert torch.equal(res.us, explicit.us)
    assert bool((res.us[..., 0].abs() <= lim[:, 0, 0]).all())
    assert bool((res.us[..., 0].abs() == lim[:, 0, 0]).any())


def test_the_unbatched_shape_message_names_each_form_once():
    with pytest.raises(ShapeError) as err:
        _solve((-1.0, torch.ones(3, 1, **F64)), x0=torch.ones(2, **F64))
    assert str(err.value).count("per stage") == 1, str(err.value)
