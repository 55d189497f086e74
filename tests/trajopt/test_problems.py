"""The classical problems: well-formed, and a few iterations make progress."""

import math

import numpy as np
import pytest
import torch

import trajopt
from trajopt import problems


@pytest.mark.parametrize("name", problems.names())
def test_problem_is_well_formed_and_improves(name):
    p = problems.get(name)
    assert p.x0.shape == (p.n,) and p.us0.shape == (p.T, p.m)
    assert p.reference and p.parameters
    res = trajopt.solve_ddp(p.dynamics, p.cost, p.x0, p.us0, control_limits=p.control_limits,
                            max_iter=3)
    first = res.history[0].cost.item() + res.history[0].actual.item()  # cost of us0
    assert res.cost.item() < first
    assert torch.isfinite(res.xs).all()
    if p.control_limits is not None:
        lo, hi = p.control_limits
        assert (res.us >= lo).all() and (res.us <= hi).all()


def test_unknown_problem():
    with pytest.raises(ValueError, match="unknown problem 'x'; choose from"):
        problems.get("x")


def test_mpc_pendulum_matches_mpc_pytorch_equations():
    """One step of PendulumDx written out by hand in numpy (mpc.pytorch 0.0.6)."""
    p = problems.mpc_pendulum()
    th, dth, u = 0.7, -0.3, 3.5  # u is clamped to 2 inside the model
    x = torch.tensor([math.cos(th), math.sin(th), dth], dtype=torch.float64)
    out = p.dynamics(x, torch.tensor([u], dtype=torch.float64), 0).numpy()
    g, m, l, dt = 10.0, 1.0, 1.0, 0.05
    new_dth = dth + dt * (-3 * g / (2 * l) * (-math.sin(th)) + 3 * 2.0 / (m * l * l))
    new_th = th + new_dth * dt
    np.testing.assert_allclose(out, [math.cos(new_th), math.sin(new_th), new_dth], rtol=1e-14)


def test_rk4_matches_scipy_integration():
    from scipy.integrate import solve_ivp
    p = problems.cartpole()
    x0 = np.array([0.1, 0.5, -0.2, 0.3])
    u = 2.0
    fc = p.dynamics.fc

    def rhs(t, x):
        return fc(torch.tensor(x), torch.tensor([u])).numpy()
    ref = solve_ivp(rhs, (0, p.dt), x0, rtol=1e-12, atol=1e-12).y[:, -1]
    step = p.dynamics(torch.tensor(x0), torch.tensor([u], dtype=torch.float64), 0).numpy()
    rk4_err = np.abs(step - ref).max()
    assert rk4_err < 1e-4  # local error O(dt^5) with derivatives of this size
    euler = trajopt.discretize(fc, p.dt, "euler")(torch.tensor(x0), torch.tensor([u]), 0)
    assert np.abs(euler.numpy() - ref).max() > 100 * rk4_err  # Euler is O(dt^2)


def test_analytic_cost_derivatives_match_torch_func():
    p = problems.mpc_pendulum()
    x = torch.randn(5, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    u = torch.randn(5, 1, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    ours = p.cost.derivatives(x, u, 0)
    auto = trajopt.Cost.derivatives(p.cost, x, u, 0)  # the generic torch.func path
    for name in ("lx", "lu", "lxx", "luu", "lux"):
        np.testing.assert_allclose(getattr(ours, name).numpy(), getattr(auto, name).numpy(),
                                   rtol=1e-14, atol=1e-15, err_msg=name)
