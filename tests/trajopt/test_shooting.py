"""Multiple shooting (``shooting="multiple"``, :mod:`trajopt.ddp.shooting`): DDP from given
states whose defects close over the iterations.

Checked against: crocoddyl's FDDP iterate by iterate (same model, same start, same step
lengths), the exact LQ optimum (a full step from any guess reaches it), the quadratic
model's exactness on an LQ problem (expected == actual change for a partial step, the
defects shrink by exactly ``1 - alpha``) and the single-shooting solver where there are no
defects.
"""

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from trajopt import problems
from trajopt.errors import InvalidArgumentError, NonFiniteError

from .._hypothesis import examples

F64 = dict(dtype=torch.float64)
BENCH = Path(__file__).resolve().parents[2] / "benchmarks" / "bench_ddp.py"


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ddp", BENCH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _lq(seed=0, n=4, m=2, T=12):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, **F64) + 0.2 * torch.randn(n, n, generator=g, **F64)
    B = 0.3 * torch.randn(n, m, generator=g, **F64)
    Q = torch.eye(n, **F64)
    cost = trajopt.QuadraticCost(Q, 0.1 * torch.eye(m, **F64), 5 * Q)
    dyn = trajopt.Dynamics(lambda x, u, t: x @ A.T + u @ B.T, time_invariant=True)
    x0 = torch.randn(n, generator=g, **F64)
    guess = torch.randn(T + 1, n, generator=g, **F64)
    return dyn, cost, x0, torch.zeros(T, m, **F64), guess


def test_pendulum_equals_crocoddyl_fddp_iterate_by_iterate():
    """The benchmark's pendulum from crocoddyl's usual start (``[x0] * (T + 1)``, zero
    controls), with crocoddyl's step lengths 2^-k: every accepted iterate's cost equals
    crocoddyl SolverFDDP's (its numpy action model; ours a torch function)."""
    crocoddyl = pytest.importorskip("crocoddyl")
    bench = _bench()
    x0n = np.array([0.3 * np.random.default_rng(0).normal(), 0.0])
    T = 100
    Pendulum, _, _ = bench.crocoddyl_models()
    prob = crocoddyl.ShootingProblem(x0n, [Pendulum()] * T, Pendulum(True))
    solver = crocoddyl.SolverFDDP(prob)
    solver.reg_min = 0.0
    costs = []

    class Log(crocoddyl.CallbackAbstract):
        def __call__(self, s):
            costs.append(s.cost)
    solver.setCallbacks([Log()])
    solver.solve([x0n] * (T + 1), [np.zeros(1)] * T, 200)

    f, cost = bench.user_pendulum()
    x0 = torch.tensor(x0n)
    ls = trajopt.LineSearch(alphas=tuple(2.0 ** -k for k in range(10)))
    res = trajopt.DDPSolver(f, cost, shooting="multiple", line_search=ls).solve(
        x0, torch.zeros(T, 1, **F64), xs0=x0.expand(T + 1, 2))
    ours = [float(h.cost) for h in res.history if float(h.step) > 0]
    assert res.reason == "converged" and float(res.max_gap) == 0.0
    assert len(ours) == 18 and len(costs) >= len(ours)
    # the first iterate closes the defects: the guess's cost is not a rollout's
    np.testing.assert_allclose(ours, costs[:len(ours)], rtol=1e-11, atol=0)
    # from the rollout (single shooting) the same problem takes 20 iterations
    single = trajopt.DDPSolver(f, cost, line_search=ls).solve(x0, torch.zeros(T, 1, **F64))
    assert int(single.iterations) == 20
    assert abs(float(single.cost) - float(res.cost)) <= 1e-10 * float(res.cost)


def test_lq_full_step_from_any_guess_reaches_the_optimum():
    """For an LQ problem the linearization is exact: the first full step from any guess
    of the states is the optimum (the single-shooting solve's) and a rollout."""
    dyn, cost, x0, us0, guess = _lq()
    ref = trajopt.solve_ddp(dyn, cost, x0, us0, tol=1e-12)
    res = trajopt.solve_ddp(dyn, cost, x0, us0, xs0=guess, shooting="multiple", max_iter=1)
    assert float(res.max_gap) == 0.0
    assert torch.equal(res.xs[0], x0)   # the guess's first state is x0's place
    np.testing.assert_allclose(res.us, ref.us, rtol=0, atol=1e-12)
    np.testing.assert_allclose(res.xs, ref.xs, rtol=0, atol=1e-12)
    # a rollout of its controls
    xs = [x0]
    for t in range(us0.shape[0]):
        xs.append(dyn(xs[-1], res.us[t], t))
    np.testing.assert_allclose(torch.stack(xs), res.xs, rtol=0, atol=1e-13)


@pytest.mark.parametrize("alpha", [0.5, 0.25])
def test_lq_partial_step_model_is_exact_and_gaps_shrink(alpha):
    """A step alpha on an LQ problem: the expected change is the actual change (the
    quadratic model is exact, its cost rise from closing defects included) and every
    defect shrinks by exactly 1 - alpha."""
    dyn, cost, x0, us0, guess = _lq(seed=1)
    solver = trajopt.DDPSolver(dyn, cost, shooting="multiple", max_iter=1,
                               line_search=trajopt.LineSearch(alphas=(alpha,)))
    res = solver.solve(x0, us0, xs0=guess)
    h = res.history[0]
    assert float(h.step) == alpha
    assert abs(float(h.expected) - float(h.actual)) <= 1e-12 * abs(float(h.actual))
    gap0 = torch.stack([dyn(guess[t], us0[t], t) - guess[t + 1] for t in range(len(us0))])
    gap0[0] = dyn(x0, us0[0], 0) - guess[1]
    gap1 = torch.stack([dyn(res.xs[t], res.us[t], t) - res.xs[t + 1]
                        for t in range(len(us0))])
    np.testing.assert_allclose(gap1, (1 - alpha) * gap0, rtol=0, atol=1e-13)
    assert float(res.max_gap) == pytest.approx(float(gap1.abs().max()), rel=1e-12)
    assert res.reason == "max_iter"   # not converged while defects remain


@settings(max_examples=examples(20), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), T=st.integers(1, 9),
       alpha=st.floats(0.05, 1.0), limits=st.booleans())
def test_lq_step_property(seed, B, T, alpha, limits):
    """Random LQ problems, batches of random guesses, a step alpha: the defects left are
    (1 - alpha) times the guess's, to rounding; without limits the expected change is the
    actual one (the quadratic model is exact; with limits the forward pass clamps, so only
    the defects' rule holds)."""
    g = torch.Generator().manual_seed(seed)
    n, m = 3, 2
    A = torch.eye(n, **F64) + 0.3 * torch.randn(n, n, generator=g, **F64)
    Bm = 0.5 * torch.randn(n, m, generator=g, **F64)
    dyn = trajopt.Dynamics(lambda x, u, t: x @ A.T + u @ Bm.T, time_invariant=True)
    cost = trajopt.QuadraticCost(torch.eye(n, **F64), 0.1 * torch.eye(m, **F64),
                                 3 * torch.eye(n, **F64))
    x0 = torch.randn(B, n, generator=g, **F64)
    guess = torch.randn(B, T + 1, n, generator=g, **F64)
    us0 = 0.1 * torch.randn(B, T, m, generator=g, **F64)
    lims = (-0.5 * torch.ones(m, **F64), 0.5 * torch.ones(m, **F64)) if limits else None
    if limits:
        us0 = us0.clamp(-0.5, 0.5)
    solver = trajopt.DDPSolver(dyn, cost, shooting="multiple", max_iter=1,
                               control_limits=lims,
                               line_search=trajopt.LineSearch(alphas=(alpha,)))
    res = solver.solve(x0, us0, xs0=guess)
    h = res.history[0]
    taken = h.step > 0
    states = torch.cat([x0.unsqueeze(1), guess[:, 1:]], 1)

    def defects(xs, us):
        return torch.stack([dyn(xs[:, t], us[:, t], t) - xs[:, t + 1] for t in range(T)], 1)
    before, after = defects(states, us0), defects(res.xs, res.us)
    scale = 1 + states.abs().amax() + res.xs.abs().amax()
    for b in range(B):
        if bool(taken[b]):
            assert float((after[b] - (1 - alpha) * before[b]).abs().max()) <= 1e-12 * scale
            if not limits:
                assert abs(float(h.expected[b] - h.actual[b])) <= \
                    1e-9 * (1 + abs(float(h.actual[b])))
        else:   # rejected: the guess is returned as it was
            assert torch.equal(after[b], before[b])


def test_without_defects_it_is_single_shooting():
    """No xs0, or states the controls do reach: the same solve as single shooting."""
    p = problems.pendulum(T=40)
    single = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0)
    multi = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, shooting="multiple")
    assert torch.equal(multi.us, single.us) and torch.equal(multi.xs, single.xs)
    assert float(multi.max_gap) == 0.0 and single.max_gap is None
    rolled = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, max_iter=0)
    again = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, shooting="multiple",
                              xs0=rolled.xs)
    torch.testing.assert_close(again.us, single.us, rtol=0, atol=1e-12)


def test_batch_elements_with_and_without_defects():
    """A batch whose first element is given its own rollout and the second a guess: the
    first takes the single-shooting iterates, the second closes its defects; each ends
    at the single-shooting optimum."""
    p = problems.pendulum(T=40)
    x0 = torch.stack([p.x0, p.x0 + 0.1])
    us0 = p.us0.expand(2, *p.us0.shape)
    rolled = trajopt.solve_ddp(p.dynamics, p.cost, x0, us0, max_iter=0).xs
    guess = rolled.clone()
    guess[1] = x0[1]   # crocoddyl's start for the second element
    res = trajopt.solve_ddp(p.dynamics, p.cost, x0, us0, xs0=guess, shooting="multiple")
    ref = trajopt.solve_ddp(p.dynamics, p.cost, x0, us0)
    assert list(res.reason) == ["converged", "converged"]
    assert res.max_gap.tolist() == [0.0, 0.0]
    assert res.iterations[0] == ref.iterations[0]
    torch.testing.assert_close(res.us[0], ref.us[0], rtol=0, atol=1e-12)
    torch.testing.assert_close(res.cost, ref.cost, rtol=1e-9, atol=0)


def test_box_limits_hold_from_a_guess():
    p = problems.cartpole(T=50)
    lo, hi = p.control_limits
    guess = p.x0.expand(51, p.x0.shape[-1]).clone()
    guess[:, 1] = torch.linspace(0, float(torch.pi), 51, **F64)   # the pole swung up
    res = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, control_limits=p.control_limits,
                            xs0=guess, shooting="multiple", max_iter=300)
    assert res.reason == "converged" and float(res.max_gap) == 0.0
    assert bool((res.us >= lo).all() and (res.us <= hi).all())


def test_max_iter_zero_returns_the_guess_with_its_defects():
    dyn, cost, x0, us0, guess = _lq(seed=2)
    res = trajopt.solve_ddp(dyn, cost, x0, us0, xs0=guess, shooting="multiple", max_iter=0)
    assert res.reason == "max_iter" and float(res.max_gap) > 0
    assert torch.equal(res.xs[1:], guess[1:]) and torch.equal(res.xs[0], x0)


def test_bad_arguments_are_named():
    dyn, cost, x0, us0, guess = _lq()
    with pytest.raises(InvalidArgumentError, match="shooting must be"):
        trajopt.DDPSolver(dyn, cost, shooting="multi")
    with pytest.raises(InvalidArgumentError, match="mode='ilqr'"):
        trajopt.DDPSolver(dyn, cost, shooting="multiple", mode="ddp")
    guess[3, 1] = float("nan")
    with pytest.raises(NonFiniteError, match=r"xs0\[3\]"):
        trajopt.solve_ddp(dyn, cost, x0, us0, xs0=guess, shooting="multiple")


def test_constraints_take_the_guess_to_the_inner_solves():
    """With constraints the augmented-Lagrangian loop hands the guess to its first inner
    solve as it is (no rollout of us0 first): with no iteration allowed the result is the
    guess and its defects; with them, a converged, feasible constrained solve."""
    p = problems.cartpole(track=0.4, T=50)
    rolled = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, max_iter=0).xs
    g = torch.Generator().manual_seed(0)
    guess = rolled + 0.1 * torch.randn(rolled.shape, generator=g, **F64)   # defects 0.1
    args = (p.dynamics, p.cost, p.x0, p.us0)
    kw = dict(control_limits=p.control_limits, constraints=p.constraints, xs0=guess,
              shooting="multiple")
    res = trajopt.solve_ddp(*args, max_iter=0,
                            augmented_lagrangian=trajopt.AugmentedLagrangian(max_outer=1), **kw)
    assert torch.equal(res.xs[1:], guess[1:]) and float(res.max_gap) > 0
    res = trajopt.solve_ddp(*args, max_iter=300, **kw)
    assert res.reason == "converged" and float(res.max_gap) == 0.0
    assert float(res.max_violation) <= 1e-6
    ref = trajopt.solve_ddp(*args[:4], control_limits=p.control_limits,
                            constraints=p.constraints, max_iter=300)
    assert abs(float(res.cost) - float(ref.cost)) <= 1e-4 * float(ref.cost)


def test_model_change_stacked_and_listed_stages_agree():
    """The model's change over stacked stages (one product for all) equals the stage by
    stage sum (stages of different sizes, or unstacked ones)."""
    from trajopt.ddp import shooting
    from trajopt.riccati.expansion import DenseStage, DenseStages
    g = torch.Generator().manual_seed(0)
    T, B, n, m = 5, 3, 4, 2

    def r(*shape):
        return torch.randn(*shape, generator=g, **F64)
    stacked = DenseStages(DenseStage(r(T, B, n, n + m), r(T, B, n + m, 1 + n + m), n))
    K, k, gaps = [r(B, m, n) for _ in range(T)], [r(B, m) for _ in range(T)], \
        [r(B, n) for _ in range(T)]
    VxT, VxxT = r(B, n), r(B, n, n)
    a = shooting.model_change(stacked, VxT, VxxT, K, k, gaps)
    b = shooting.model_change([stacked[t] for t in range(T)], VxT, VxxT, K, k, gaps)
    torch.testing.assert_close(a, b, rtol=1e-13, atol=1e-12)


def test_dynamics_not_finite_at_the_guess_is_named():
    dyn, cost, x0, us0, guess = _lq()
    guess[4, 0] = 1e308
    blow = trajopt.Dynamics(lambda x, u, t: dyn(x, u, t) * 1e10, time_invariant=True)
    with pytest.raises(NonFiniteError, match=r"xs0\[4\]"):
        trajopt.solve_ddp(blow, cost, x0, us0, xs0=guess, shooting="multiple")


def test_a_step_that_closes_defects_is_no_convergence_test():
    """A review's finding: from a straight-line guess to the goal, the full step that
    closed the defects raised the cost, and Tassa's "small change" test (a negative change
    passes it) declared the element converged at cost 130 (the optimum: 48.2). The result
    is now an optimum: single shooting from its controls does not move it."""
    import math
    bench = _bench()
    f, cost = bench.user_pendulum()
    T = 100
    x0 = torch.tensor([0.3, 0.0], **F64)
    goal = torch.tensor([math.pi, 0.0], **F64)
    guess = x0 + (goal - x0) * torch.linspace(0, 1, T + 1, **F64)[:, None]
    res = trajopt.DDPSolver(f, cost, shooting="multiple").solve(
        x0, torch.zeros(T, 1, **F64), xs0=guess)
    assert res.reason == "converged" and float(res.max_gap) == 0.0
    more = trajopt.DDPSolver(f, cost).solve(x0, res.us)
    assert abs(float(more.cost) - float(res.cost)) <= 1e-8 * float(res.cost)


def test_stage_sizes_that_differ():
    """Listed stages whose first and last state sizes differ (the model's change started
    its deviation at the terminal size: a review's finding)."""
    g = torch.Generator().manual_seed(5)
    sizes = [2, 3, 3, 2, 4]
    T = len(sizes) - 1
    As = [0.5 * torch.randn(sizes[t + 1], sizes[t], generator=g, **F64) for t in range(T)]
    Bs = [torch.randn(sizes[t + 1], 1, generator=g, **F64) for t in range(T)]
    cost = trajopt.Cost(lambda x, u, t: (x ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1),
                        lambda x: 3 * (x ** 2).sum(-1))
    x0 = torch.randn(sizes[0], generator=g, **F64)
    us0 = [torch.zeros(1, **F64) for _ in range(T)]
    guess = [torch.randn(s, generator=g, **F64) for s in sizes]

    def f(x, u, t):
        return x @ As[t].T + u @ Bs[t].T
    ref = trajopt.solve_ddp(f, cost, x0, us0)
    res = trajopt.solve_ddp(f, cost, x0, us0, xs0=guess, shooting="multiple", max_iter=1)
    assert float(res.max_gap) == 0.0
    for a, b in zip(res.us, ref.us):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_step_lengths_without_a_full_step_still_close_the_defects():
    """Without alpha = 1 the defects only shrink geometrically: those at rounding level
    (16 eps of the states, the test that accepts given states in single shooting) count
    as closed, so the solve converges (it ended "line_search_failed": a review)."""
    dyn, cost, x0, us0, guess = _lq(seed=3)
    ls = trajopt.LineSearch(alphas=(0.9, 0.5, 0.25))
    ref = trajopt.solve_ddp(dyn, cost, x0, us0, line_search=ls)
    res = trajopt.solve_ddp(dyn, cost, x0, us0, xs0=guess, shooting="multiple",
                            line_search=ls)
    assert res.reason == "converged" and float(res.max_gap) == 0.0
    # both stop within tol = 1e-8 of the optimum, at different iterates: controls to ~1e-7
    torch.testing.assert_close(res.us, ref.us, rtol=1e-6, atol=1e-9)


def test_the_first_given_state_is_not_used_and_a_bad_element_is_named():
    dyn, cost, x0, us0, guess = _lq(seed=4)
    ref = trajopt.solve_ddp(dyn, cost, x0, us0, xs0=guess, shooting="multiple")
    guess[0] = float("nan")   # x0's place
    res = trajopt.solve_ddp(dyn, cost, x0, us0, xs0=guess, shooting="multiple")
    assert torch.equal(res.us, ref.us)
    batch = torch.stack([guess, guess])
    batch[1, 5, 2] = float("inf")
    with pytest.raises(NonFiniteError, match=r"xs0\[5\].*element\(s\) \[1\]"):
        trajopt.solve_ddp(dyn, cost, x0, us0.expand(2, *us0.shape), xs0=batch,
                          shooting="multiple")
