"""trajopt.MPC: receding-horizon control around a warm-started DDPSolver."""

import numpy as np
import pytest
import torch

import trajopt
from trajopt.errors import InvalidArgumentError, ShapeError

DT = torch.float64


def _lq():
    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=DT)
    B = torch.tensor([[0.005], [0.1]], dtype=DT)
    Q, R = torch.eye(2, dtype=DT), 0.1 * torch.eye(1, dtype=DT)
    P = trajopt.solve_dare(A, B, Q, R).P
    return A, B, Q, R, P


def test_lq_mpc_with_the_dare_terminal_is_the_stationary_lqr():
    """On a linear system with a quadratic cost whose terminal weight is the DARE
    solution, every MPC step's first control is the infinite-horizon gain's: the closed
    loop equals x_{k+1} = (A + BK) x_k (batched, 10 steps)."""
    A, B, Q, R, P = _lq()
    cost = trajopt.QuadraticCost(Q, R, P)
    mpc = trajopt.MPC(lambda x, u, t: x @ A.T + u @ B.T, cost, horizon=15, n_controls=1,
                      iterations=2)
    x0 = torch.tensor([[1.0, 0.0], [-0.5, 0.3]], dtype=DT)
    run = mpc.simulate(lambda x, u, k: x @ A.T + u @ B.T, x0, 10)
    K = trajopt.solve_dare(A, B, Q, R).K
    x, ref = x0, [x0]
    for _ in range(10):
        x = x @ (A + B @ K).T
        ref.append(x)
    torch.testing.assert_close(run.xs, torch.stack(ref, 1), rtol=1e-9, atol=1e-10)
    assert run.us.shape == (2, 10, 1) and run.plan_costs.shape == (2, 10)
    assert run.reasons.shape == (2, 10) and run.solve_times.shape == (10,)


def test_a_numpy_plant_runs_the_same_loop():
    """A plant written with numpy (a scipy integrator, ``A @ np.asarray(x)``) and a numpy
    x0: the same run as the torch plant (the message contradicted itself: "shape (2,);
    got (2,)")."""
    A, B, Q, R, P = _lq()
    cost = trajopt.QuadraticCost(Q, R, P)
    An, Bn = A.numpy(), B.numpy()
    runs = []
    for plant, x0 in ((lambda x, u, k: x @ A.T + u @ B.T, torch.tensor([1.0, 0.0], dtype=DT)),
                      (lambda x, u, k: An @ np.asarray(x) + Bn @ np.asarray(u),
                       np.array([1.0, 0.0]))):
        mpc = trajopt.MPC(lambda x, u, t: x @ A.T + u @ B.T, cost, horizon=15, n_controls=1)
        runs.append(mpc.simulate(plant, x0, 5))
    torch.testing.assert_close(runs[1].xs, runs[0].xs, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(runs[1].us, runs[0].us, rtol=1e-12, atol=1e-14)


def test_warm_start_on_the_nominal_plant_needs_no_iteration():
    """When the plant is the model, the next state is the predicted one: the shifted,
    closed-loop-rolled-out warm start is already optimal (the solve converges at once)."""
    A, B, Q, R, P = _lq()
    def f(x, u, t):
        return (x @ A.T + u @ B.T)
    mpc = trajopt.MPC(f, trajopt.QuadraticCost(Q, R, P), horizon=15, n_controls=1,
                      iterations=5)
    x = torch.tensor([1.0, 0.0], dtype=DT)
    u = mpc.step(x)
    first_plan = mpc.last.us.clone()
    x = f(x, u, 0)
    mpc.step(x)
    assert mpc.last.reason.item() == "converged" and int(mpc.last.iterations) <= 1
    torch.testing.assert_close(mpc.last.us[:-1], first_plan[1:], rtol=1e-8, atol=1e-10)


def test_mpc_bad_input():
    A, B, Q, R, P = _lq()
    cost = trajopt.QuadraticCost(Q, R, P)
    def f(x, u, t):
        return (x @ A.T + u @ B.T)
    with pytest.raises(InvalidArgumentError, match="horizon"):
        trajopt.MPC(f, cost, horizon=0, n_controls=1)
    with pytest.raises(InvalidArgumentError, match="n_controls"):   # nothing states m
        trajopt.MPC(f, trajopt.Cost(lambda x, u, t: (x ** 2).sum(-1)), horizon=5)
    mpc = trajopt.MPC(f, cost, horizon=5, n_controls=1)
    with pytest.raises(ShapeError, match="plant must return"):
        mpc.simulate(lambda x, u, k: x[:1], torch.zeros(2, dtype=DT), 2)
    with pytest.raises(InvalidArgumentError, match="steps"):
        mpc.simulate(f, torch.zeros(2, dtype=DT), 0)
    assert isinstance(np.asarray(mpc.simulate(f, torch.ones(2, dtype=DT), 1).reasons),
                      np.ndarray)


def test_mpc_with_an_obstacle_keeps_out_and_reaches_the_goal():
    """The unicycle with a round obstacle on its path, closed loop: the obstacle keeps the
    plant out (to the approximation of two outer iterations a step: within 10 % of the
    radius; without the constraint the path crosses it) and the goal is reached; the
    multipliers are warm-started (the second step's initial multipliers are the first
    step's shifted)."""
    from trajopt import problems
    p = problems.unicycle(T=30, obstacles=((1.0, 0.1, 0.25),))
    mpc = trajopt.MPC(p.dynamics, p.cost, horizon=30, iterations=3,
                      control_limits=p.control_limits, constraints=p.constraints)
    mpc.step(p.x0)
    first = mpc.last.multipliers
    seen = []
    solve = mpc.solver.solve
    mpc.solver.solve = lambda x, plan, multipliers=None, **kw: (
        seen.append(multipliers), solve(x, plan, multipliers, **kw))[1]
    mpc.step(mpc.last.xs[1])
    mpc.solver.solve = solve
    torch.testing.assert_close(seen[0][0][:-1], first[0][1:])   # shifted by one stage
    torch.testing.assert_close(seen[0][1], first[1])            # terminal: as it was
    mpc.reset()
    run = mpc.simulate(p.dynamics, p.x0, 69)
    centre = torch.tensor([1.0, 0.1], dtype=torch.float64)
    dist = (run.xs[:, :2] - centre).norm(dim=-1)
    assert float(dist.min()) >= 0.9 * 0.25
    free = trajopt.MPC(p.dynamics, p.cost, horizon=30, iterations=3,
                       control_limits=p.control_limits).simulate(p.dynamics, p.x0, 70)
    assert float((free.xs[:, :2] - centre).norm(dim=-1).min()) < 0.15
    assert float((run.xs[-1, :2] - torch.tensor([2.0, 1.0], dtype=torch.float64)).norm()) < 0.1


def test_the_control_size_comes_from_a_linear_model_or_a_quadratic_cost():
    """Without control_limits or n_controls: m from LinearDynamics' B or QuadraticCost's
    R (it had to be passed); a plain callable and cost still need n_controls."""
    D = torch.float64
    A = torch.tensor([[1.0, 0.1], [0.0, 1.0]], dtype=D)
    B = torch.tensor([[0.0, 0.005], [0.1, 0.1]], dtype=D)
    cost = trajopt.QuadraticCost(torch.eye(2, dtype=D), torch.eye(2, dtype=D),
                                 torch.eye(2, dtype=D))
    assert trajopt.MPC(trajopt.LinearDynamics(A, B), cost, horizon=5).n_controls == 2
    assert trajopt.MPC(lambda x, u, t: x @ A.T + u @ B.T, cost, horizon=5).n_controls == 2
    plain = trajopt.Cost(lambda x, u, t: (x ** 2).sum(-1) + (u ** 2).sum(-1))
    assert trajopt.MPC(trajopt.LinearDynamics(A, B), plain, horizon=5).n_controls == 2
    with pytest.raises(InvalidArgumentError, match="n_controls"):
        trajopt.MPC(lambda x, u, t: x @ A.T + u @ B.T, plain, horizon=5)


def test_a_plan_from_reset_is_used_cut_to_the_horizon_and_broadcast():
    """reset(plan) with an offline solution over a longer horizon (the docs' call) was
    dropped silently for zeros; now its first `horizon` stages warm-start the step, one
    plan serves a batch of states, and a plan of the wrong size is refused by name."""
    A, B, Q, R, P = _lq()
    dyn, cost = trajopt.LinearDynamics(A, B), trajopt.QuadraticCost(Q, R, P)
    x0 = torch.tensor([1.0, -0.5], dtype=DT)
    offline = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(40, 1, dtype=DT))

    def first_start(plan, x):
        """The controls the solver starts from at the first step."""
        mpc = trajopt.MPC(dyn, cost, horizon=10, iterations=1)
        mpc.reset(plan)
        seen = []
        solve = mpc.solver.solve
        mpc.solver.solve = lambda x, us0, **kw: seen.append(us0.clone()) or solve(x, us0,
                                                                                  **kw)
        mpc.step(x)
        return seen[0]
    torch.testing.assert_close(first_start(offline.us, x0), offline.us[:10], rtol=0, atol=0)
    assert not first_start(None, x0).any()
    xb = torch.stack([x0, 2 * x0, -x0])
    torch.testing.assert_close(first_start(offline.us, xb),
                               offline.us[:10].expand(3, 10, 1), rtol=0, atol=0)
    with pytest.raises(ShapeError, match="plan must be controls"):
        trajopt.MPC(dyn, cost, horizon=10).reset(offline.us[:5])
    with pytest.raises(ShapeError, match="plan must be controls"):
        trajopt.MPC(dyn, cost, horizon=10).reset(offline.us[:, 0])
    bad = trajopt.MPC(dyn, cost, horizon=10)
    bad.reset(torch.zeros(2, 10, 1, dtype=DT))
    with pytest.raises(ShapeError, match="does not broadcast"):
        bad.step(xb)
