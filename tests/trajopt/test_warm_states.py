"""Warm starts with given states (``DDPSolver.solve(x0, us0, xs0=...)``, ``solve_ddp(...,
xs0=...)``, ``MPC``): the states are checked against the dynamics in one vectorized call,
the rollout runs only from the earliest stage an element fails, and the result equals the
solve without ``xs0``.

* consistent states (a plain rollout, a previous solve's result, a LinearDynamics solve
  whose states came from the compiled rollout): same us / xs / cost to 1e-12, same
  iterations and reasons, and the rollout is one batched call of the dynamics;
* states perturbed at stage k (hypothesis: the stage and the size of the error; a batch
  whose elements fail at different stages): the rollout resumes where the first element
  fails, the answer is unchanged;
* NaN / inf in xs0, xs0[0] != x0 by one ulp, a wrong guess on a problem scaled by 1e-100
  (a bound with an absolute part would accept it);
* control limits: the check uses the clamped controls, as the rollout does;
* time-varying dynamics: one ``vmap`` call with a stage per row once a derivative pass
  has verified it; a model that cannot take a tensor stage is checked stage by stage;
* the MPC shift on ``problems.cartpole`` (single and batched) rolls out only the last
  stage and equals the cold solve; ``trajopt.MPC`` hands its warm start's states over;
* ``solve_ddp`` forwards xs0 (plain and with constraints); spans / players refuse it;
* bad shapes, dtypes, devices raise ``ShapeError`` naming xs0.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from trajopt import problems
from trajopt.errors import InvalidArgumentError, ShapeError

F64 = dict(dtype=torch.float64)
EPS = torch.finfo(torch.float64).eps


class Log:
    """The dynamics calls made inside ``DDPSolver.rollout``: the rows of each call
    (``"vmap"`` for a call under ``vmap``, which sees one point)."""

    def __init__(self):
        self.on = False
        self.calls = []

    def wrap(self, f):
        def counted(x, u, t):
            if self.on:
                self.calls.append(x.shape[0] if x.ndim == 2 else "vmap")
            return f(x, u, t)
        return counted


class CountingSolver(trajopt.DDPSolver):
    """Records the dynamics calls of the initial rollout (and its check)."""

    def __init__(self, *args, log, **kw):
        super().__init__(*args, **kw)
        self.log = log

    def rollout(self, x0, us, xs0=None):
        self.log.on, self.log.calls = True, []
        try:
            return super().rollout(x0, us, xs0)
        finally:
            self.log.on = False


def cartpole_solver(T=30, limits=True, max_iter=20, **kw):
    p = problems.cartpole(T=T)
    log = Log()
    dyn = trajopt.Dynamics(log.wrap(p.dynamics), time_invariant=True)
    solver = CountingSolver(dyn, p.cost, control_limits=p.control_limits if limits else None,
                            max_iter=max_iter, log=log, **kw)
    return p, solver, log


def rolled(solver, x0, us):
    """States of ``us`` (B, T, m) from ``x0`` (B, n) by the solver's plain rollout, (B,
    T+1, n)."""
    inp = solver.prepare(x0, us)
    return torch.stack(solver.structure.simulate(
        inp.x0, len(inp.us), lambda t, xs: inp.us[t]).xs, -2).reshape(
            *inp.batch, len(inp.us) + 1, -1)


def assert_same(a, b, tol=1e-12):
    for name in ("us", "xs", "cost", "K", "k"):
        x, y = getattr(a, name), getattr(b, name)
        assert torch.allclose(x, y, rtol=tol, atol=tol), (name, float((x - y).abs().max()))
    assert torch.equal(a.iterations, b.iterations)
    assert np.array_equal(np.asarray(a.reason), np.asarray(b.reason))
    assert torch.equal(a.converged, b.converged)


def controls(B, T, seed=0, scale=4.0):
    g = torch.Generator().manual_seed(seed)
    return scale * torch.randn(B, T, 1, generator=g, **F64)


def start(p, B, seed=1):
    g = torch.Generator().manual_seed(seed)
    return p.x0 + 0.1 * torch.randn(B, 4, generator=g, **F64)


# ----------------------------------------------------------------------------- consistent
@pytest.mark.parametrize("source", ["rollout", "previous solve"])
def test_consistent_states_skip_the_rollout(source):
    T, B = 30, 3
    p, solver, log = cartpole_solver(T)
    x0 = start(p, B)
    if source == "rollout":
        us0 = controls(B, T)
        xs0 = rolled(solver, x0, us0)
    else:
        r0 = solver.solve(x0, controls(B, T))
        us0, xs0 = r0.us, r0.xs
    cold = solver.solve(x0, us0)
    assert log.calls == [B] * T  # the plain rollout: T sequential calls
    warm = solver.solve(x0, us0, xs0=xs0)
    assert log.calls == [T * B]  # the check only: one call over all stages and elements
    assert_same(warm, cold)


def test_linear_dynamics_states_from_the_compiled_rollout_pass_the_check():
    """LinearDynamics solves roll out by the compiled loop / the scan, whose states differ
    from the model's own transitions by rounding: within the bound, so accepted."""
    g = torch.Generator().manual_seed(3)
    n, m, T, B = 5, 2, 40, 4
    A = torch.eye(n, **F64) + 0.1 * torch.randn(n, n, generator=g, **F64)
    Bm = torch.randn(n, m, generator=g, **F64)
    dyn = trajopt.LinearDynamics(A, Bm)
    cost = trajopt.QuadraticCost(torch.eye(n, **F64), 0.1 * torch.eye(m, **F64),
                                 10 * torch.eye(n, **F64))
    solver = trajopt.DDPSolver(dyn, cost)
    x0 = torch.randn(B, n, generator=g, **F64)
    r0 = solver.solve(x0, torch.randn(B, T, m, generator=g, **F64))
    seen = []
    check = solver.structure.consistent_prefix
    solver.structure.consistent_prefix = lambda *a: seen.append(check(*a)) or seen[-1]
    warm = solver.solve(x0, r0.us, xs0=r0.xs)
    assert torch.equal(seen[0], torch.full((B,), T))
    assert_same(warm, solver.solve(x0, r0.us))


# ----------------------------------------------------------------------------- perturbed
@pytest.mark.parametrize("k", [1, 2, 17, 30])
def test_perturbed_stage_resumes_the_rollout_there(k):
    T, B = 30, 2
    p, solver, log = cartpole_solver(T)
    x0, us0 = start(p, B), controls(B, T)
    xs0 = rolled(solver, x0, us0)
    xs0[..., k, 1] += 1e-9
    cold = solver.solve(x0, us0)
    warm = solver.solve(x0, us0, xs0=xs0)
    # the check, then x_k .. x_T again: stages k-1 .. T-1
    assert log.calls == [T * B] + [B] * (T - k + 1)
    assert_same(warm, cold)


@settings(max_examples=examples(15), deadline=None)
@given(ks=st.lists(st.integers(1, 21), min_size=1, max_size=4),
       size=st.floats(-12, 0), component=st.integers(0, 3))
def test_random_prefixes_of_a_batch(ks, size, component):
    """Elements perturbed at stages ``ks`` (21 = not at all) by a relative error of
    10^size: the accepted prefixes are per element, the rollout resumes at the earliest
    failure, the result equals the cold solve."""
    T, B = 20, len(ks)
    p, solver, log = cartpole_solver(T, max_iter=5)
    x0, us0 = start(p, B, seed=B), controls(B, T, seed=len(ks) + 7)
    xs0 = rolled(solver, x0, us0)
    for b, k in enumerate(ks):
        if k <= T:
            xs0[b, k, component] += 10.0 ** size * (1 + xs0[b, k].abs().max())
    inp = solver.prepare(x0, us0)
    xsf = list(xs0.transpose(0, 1).unbind(0))
    prefix = solver.structure.consistent_prefix(inp.x0, xsf, inp.us, 16 * EPS)
    assert prefix.tolist() == [min(k - 1, T) for k in ks]
    cold = solver.solve(x0, us0)
    warm = solver.solve(x0, us0, xs0=xs0)
    first = min(min(k - 1, T) for k in ks)
    assert log.calls == [T * B] + [B] * (T - first)
    assert_same(warm, cold)


def test_nan_inf_and_a_wrong_first_state_are_inconsistent():
    T, B = 25, 3
    p, solver, log = cartpole_solver(T)
    x0, us0 = start(p, B), controls(B, T)
    cold = solver.solve(x0, us0)
    xs0 = rolled(solver, x0, us0)
    for bad in (math.nan, math.inf, -math.inf):
        xs = xs0.clone()
        xs[1, 10, 2] = bad
        assert_same(solver.solve(x0, us0, xs0=xs), cold)
        assert log.calls == [T * B] + [B] * (T - 9)
    xs = xs0.clone()
    xs[:, 7:] = math.nan
    assert_same(solver.solve(x0, us0, xs0=xs), cold)
    assert log.calls == [T * B] + [B] * (T - 6)
    # xs0[0] one ulp away from x0 (element 2 only): that element has no prefix, so the
    # whole batch is rolled out (the plain rollout)
    xs = xs0.clone()
    xs[2, 0, 0] = torch.nextafter(xs[2, 0, 0], torch.tensor(math.inf, **F64))
    assert_same(solver.solve(x0, us0, xs0=xs), cold)
    assert log.calls == [T * B] + [B] * T
    xs = xs0.clone()
    xs[0, 0, 1] = math.nan
    assert_same(solver.solve(x0, us0, xs0=xs), cold)
    assert log.calls == [T * B] + [B] * T


def test_the_bound_is_relative_a_wrong_guess_on_a_tiny_problem_is_refused():
    """x0 ~ 1e-100: an all-zero guess is within 16 eps (1 + |x|) of every state, but not
    within 16 eps of the states' own size."""
    p = problems.double_integrator(T=20)
    log = Log()
    dyn = trajopt.Dynamics(log.wrap(p.dynamics), time_invariant=True)
    solver = CountingSolver(dyn, p.cost, log=log)
    x0 = 1e-100 * torch.tensor([1.0, -2.0], **F64)
    us0 = torch.zeros(20, 1, **F64)
    xs0 = torch.zeros(21, 2, **F64)
    xs0[0] = x0
    cold = solver.solve(x0, us0)
    warm = solver.solve(x0, us0, xs0=xs0)
    assert log.calls == [20] + [1] * 20
    assert_same(warm, cold, tol=0.0)


# ----------------------------------------------------------------------------- limits
def test_control_limits_are_applied_before_the_check():
    T, B = 30, 2
    p, solver, log = cartpole_solver(T)
    x0, us0 = start(p, B), controls(B, T, scale=20.0)  # beyond |u| <= 10 at many stages
    lo, hi = p.control_limits
    clamped = torch.minimum(torch.maximum(us0, lo), hi)
    assert not torch.equal(clamped, us0)
    cold = solver.solve(x0, us0)
    # the states of the clamped controls (what the rollout applies): fully consistent
    warm = solver.solve(x0, us0, xs0=rolled(solver, x0, clamped))
    assert log.calls == [T * B]
    assert_same(warm, cold)
    # the states of the unclamped controls: wrong from the first clamped stage on
    free = trajopt.DDPSolver(solver.dynamics, p.cost)
    xs_free = torch.stack(free.structure.simulate(
        x0, T, lambda t, xs: us0[:, t]).xs, 1)
    first = int(torch.nonzero((clamped != us0).any(0).any(-1)).min())
    warm = solver.solve(x0, us0, xs0=xs_free)
    assert log.calls == [T * B] + [B] * (T - first)
    assert_same(warm, cold)


# ----------------------------------------------------------------------------- time-varying
def time_varying(log):
    def f(x, u, t):
        w = 1 + 0.05 * torch.as_tensor(t, dtype=x.dtype)
        th, om = x[..., 0], x[..., 1]
        return torch.stack([th + 0.1 * om, om + 0.1 * (w * u[..., 0] - 9.81 * torch.sin(th))],
                           -1)
    return trajopt.Dynamics(log.wrap(f))


def pendulum_cost():
    goal = torch.tensor([math.pi, 0.0], **F64)
    return trajopt.QuadraticCost(torch.diag(torch.tensor([1.0, 0.1], **F64)),
                                 0.05 * torch.eye(1, **F64),
                                 torch.diag(torch.tensor([50.0, 5.0], **F64)), x_ref=goal)


def test_time_varying_dynamics_checked_in_one_vmapped_call():
    T, B = 25, 3
    log = Log()
    solver = CountingSolver(time_varying(log), pendulum_cost(), max_iter=10, log=log)
    x0 = 0.1 * torch.randn(B, 2, generator=torch.Generator().manual_seed(0), **F64)
    us0 = controls(B, T, seed=4, scale=1.0)
    r0 = solver.solve(x0, us0)  # its derivative pass verifies the vmapped call
    cold = solver.solve(x0, r0.us)
    warm = solver.solve(x0, r0.us, xs0=r0.xs)
    assert log.calls == ["vmap"]
    assert_same(warm, cold)
    xs = r0.xs.clone()
    xs[0, 12, 0] += 1e-8
    assert_same(solver.solve(x0, r0.us, xs0=xs), cold)
    assert log.calls == ["vmap"] + [B] * (T - 11)


def test_time_varying_dynamics_that_cannot_take_a_tensor_stage():
    """``gains[t]`` with a Python list: not vectorizable over stages; the check is then
    stage by stage (from the given states, T calls) and the answer is unchanged; a fresh
    solver, before any derivative pass, does the same (a guess never decides whether the
    vectorized call is trusted)."""
    T, B = 15, 2
    gains = [1.0 + 0.03 * t for t in range(T)]
    log = Log()

    def f(x, u, t):
        return torch.stack([x[..., 0] + 0.1 * x[..., 1],
                            x[..., 1] + 0.1 * (gains[t] * u[..., 0] - torch.sin(x[..., 0]))],
                           -1)
    solver = CountingSolver(trajopt.Dynamics(log.wrap(f)), pendulum_cost(), log=log,
                            max_iter=10)
    x0 = torch.tensor([[0.1, 0.0], [-0.2, 0.3]], **F64)
    us0 = controls(B, T, seed=5, scale=1.0)
    xs0 = rolled(solver, x0, us0)
    warm = solver.solve(x0, us0, xs0=xs0)  # fresh: stage by stage
    assert log.calls == [B] * T
    cold = solver.solve(x0, us0)
    assert_same(warm, cold)
    assert_same(solver.solve(x0, us0, xs0=xs0), cold)
    assert log.calls == [B] * T


# ----------------------------------------------------------------------------- MPC shift
@pytest.mark.parametrize("B", [None, 3])
def test_mpc_shift_rolls_out_only_the_last_stage(B):
    T = 50
    p, solver, log = cartpole_solver(T, max_iter=3)
    x0 = p.x0 if B is None else start(p, B)
    shape = (T, 1) if B is None else (B, T, 1)
    r = solver.solve(x0, torch.zeros(shape, **F64))
    for _ in range(3):  # a few closed-loop steps on the nominal plant
        x = r.xs[..., 1, :].clone()
        us = torch.cat([r.us[..., 1:, :], r.us[..., -1:, :]], -2)
        xs = torch.cat([r.xs[..., 1:, :], r.xs[..., -1:, :]], -2)
        cold = solver.solve(x, us)
        warm = solver.solve(x, us, xs0=xs)
        rows = 1 if B is None else B
        assert log.calls == [T * rows, rows]  # the check and the last stage
        assert_same(warm, cold)
        r = warm


def test_mpc_class_hands_its_warm_start_states_to_the_solver():
    p = problems.cartpole(T=30)
    runs, accepted = [], []
    for use_states in (True, False):
        mpc = trajopt.MPC(p.dynamics, p.cost, horizon=30, iterations=3,
                          control_limits=p.control_limits)
        solve, check = mpc.solver.solve, mpc.solver.structure.consistent_prefix
        if not use_states:
            mpc.solver.solve = lambda x, plan, xs0=None, solve=solve: solve(x, plan)

        def spy(*a, check=check):
            k = check(*a)
            accepted.append(int(k.min()))
            return k
        mpc.solver.structure.consistent_prefix = spy
        runs.append(mpc.simulate(p.dynamics, p.x0 + 0.05, 6))
    assert accepted == [30] * 5  # steps 2..6: the whole warm start passes the check
    a, b = runs
    assert torch.allclose(a.xs, b.xs, rtol=1e-12, atol=1e-12)
    assert torch.allclose(a.us, b.us, rtol=1e-12, atol=1e-12)
    assert np.array_equal(a.reasons, b.reasons)


# ----------------------------------------------------------------------------- entry points
def test_solve_ddp_forwards_xs0():
    p = problems.pendulum(T=30)
    x0 = p.x0
    us0 = 0.5 * torch.ones(30, 1, **F64)
    r0 = trajopt.solve_ddp(p.dynamics, p.cost, x0, us0, control_limits=p.control_limits,
                           max_iter=4)
    kw = dict(control_limits=p.control_limits, max_iter=50)
    assert_same(trajopt.solve_ddp(p.dynamics, p.cost, x0, r0.us, xs0=r0.xs, **kw),
                trajopt.solve_ddp(p.dynamics, p.cost, x0, r0.us, **kw))
    # numpy in, numpy out, xs0 as numpy too
    a = trajopt.solve_ddp(p.dynamics, p.cost, x0.numpy(), r0.us.numpy(),
                          xs0=r0.xs.numpy(), **kw)
    assert isinstance(a.us, np.ndarray)


def test_solve_ddp_with_constraints_and_xs0():
    p = problems.cartpole(T=30, track=0.4)
    kw = dict(control_limits=p.control_limits, constraints=p.constraints, max_iter=20)
    r0 = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, torch.zeros(30, 1, **F64), max_iter=3,
                           control_limits=p.control_limits)
    cold = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, r0.us, **kw)
    warm = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, r0.us, xs0=r0.xs, **kw)
    assert_same(warm, cold)
    for a, b in zip(warm.multipliers, cold.multipliers):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    bad = r0.xs.clone()
    bad[5:] = math.nan
    assert_same(trajopt.solve_ddp(p.dynamics, p.cost, p.x0, r0.us, xs0=bad, **kw), cold)


def test_listed_states():
    T, B = 12, 2
    p, solver, log = cartpole_solver(T)
    x0, us0 = start(p, B), controls(B, T)
    xs0 = rolled(solver, x0, us0)
    cold = solver.solve(x0, list(us0.unbind(1)))
    warm = solver.solve(x0, list(us0.unbind(1)), xs0=list(xs0.unbind(1)))
    assert log.calls == [T * B]
    assert isinstance(warm.xs, list)
    for a, b in zip(warm.xs + warm.us + [warm.cost], cold.xs + cold.us + [cold.cost]):
        assert torch.allclose(a, b, rtol=1e-12, atol=1e-12)
    assert torch.equal(warm.iterations, cold.iterations)
    # a broadcast batch: one state sequence for a batch of controls from one x0
    one = rolled(solver, x0[:1], us0[:1])[0]
    warm = solver.solve(x0[0], us0[:1], xs0=one)
    assert log.calls == [T]


def test_spans_and_players_refuse_xs0():
    p = problems.pendulum(T=10)
    us0 = torch.zeros(10, 1, **F64)
    xs0 = torch.zeros(11, 2, **F64)
    with pytest.raises(InvalidArgumentError, match="xs0"):
        trajopt.solve_ddp(p.dynamics, p.cost, p.x0, us0, xs0=xs0, spans=[trajopt.Span(1, 4)])
    solver = trajopt.GTDDPSolver(p.dynamics, p.cost, spans=[trajopt.Span(1, 4)])
    with pytest.raises(InvalidArgumentError, match="xs0"):
        solver.solve(p.x0, us0, xs0=xs0)


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize("bad, match", [
    (torch.zeros(11, 4, **F64), r"xs0 must have shape \(\.\.\., T\+1, n\) = \(\.\.\., 13, 4\)"),
    (torch.zeros(13, 3, **F64), r"xs0 must have shape"),
    (torch.zeros(13, **F64), r"xs0 must have shape"),
    (torch.zeros(3, 13, 4, **F64), r"batch dimensions of xs0"),
    (torch.zeros(2, 2, 13, 4, **F64), r"batch dimensions of xs0"),
    (torch.zeros(2, 13, 4, dtype=torch.float32), r"xs0 must have the dtype"),
    (torch.zeros(2, 13, 4, dtype=torch.float64, device="meta"), r"xs0 must have the dtype"),
    ([torch.zeros(2, 4, **F64)] * 12, r"xs0 must hold T\+1 = 13 states"),
    ([torch.zeros(2, 3, **F64)] + [torch.zeros(2, 4, **F64)] * 12, r"xs0\[0\]"),
    ([torch.zeros(2, 4, **F64)] * 12 + [torch.zeros(3, 4, **F64)], r"xs0\[12\]"),
    ([torch.zeros(2, 4, **F64)] * 12 + [torch.zeros(2, 4, dtype=torch.float32)],
     r"xs0\[12\] must have the dtype"),
    (np.zeros((2, 13, 5)), r"xs0 must have shape"),
    ([[1, "a"]], r"xs0"),
])
def test_bad_states_raise_shape_error_naming_xs0(bad, match):
    p, solver, _ = cartpole_solver(12)
    with pytest.raises(ShapeError, match=match):
        solver.solve(start(p, 2), controls(2, 12), xs0=bad)


def test_given_states_are_copied_not_written():
    T, B = 20, 2
    p, solver, _ = cartpole_solver(T)
    x0, us0 = start(p, B), controls(B, T)
    xs0 = rolled(solver, x0, us0)
    keep = xs0.clone()
    solver.solve(x0, us0, xs0=xs0)
    assert torch.equal(xs0, keep)
