"""Defects of the DDP front end found by a user trial (trial 30b), one test group each:
non-finite stage derivatives, the dtype of a numpy ``x0``, ``nn.Module`` models, a
terminal-only :class:`trajopt.Cost` and a cost holding per-element data."""

import pytest
import torch

import trajopt
from trajopt.errors import NonFiniteError

T, DT = 30, 0.1
DTYPE = torch.float64
GOAL = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=DTYPE)


def drag(x, u, t):
    """Quadratic drag v |v| written as v sqrt(v.v): torch's Jacobian at v = 0 is NaN."""
    v = x[..., 2:4]
    a = u - 0.5 * v * torch.sqrt((v ** 2).sum(-1, keepdim=True))
    return torch.cat([x[..., :2] + DT * v, v + DT * a], -1)


def smooth(x, u, t):
    v = x[..., 2:4]
    return torch.cat([x[..., :2] + DT * v, v + DT * u], -1)


def quad(x, u, t):
    return ((x - GOAL) ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1)


COST = trajopt.Cost(quad, lambda x: 10 * ((x - GOAL) ** 2).sum(-1))


# ---------------------------------------------------------------- 1. NaN derivatives
@pytest.mark.parametrize("us0", [0.0, 1e-3])
def test_nan_jacobian_of_the_dynamics_is_named(us0):
    # was: reason 'regularization_limit' after 0 iterations, no error
    x0 = torch.zeros(4, dtype=DTYPE)
    with pytest.raises(NonFiniteError, match=r"fx .* of the dynamics .* stage 0.*sqrt"):
        trajopt.solve_ddp(drag, COST, x0, torch.full((T, 2), us0, dtype=DTYPE))


def test_nan_jacobian_names_the_batch_element():
    x0 = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=DTYPE)
    with pytest.raises(NonFiniteError, match=r"dynamics .* stage 0, flat batch element 1"):
        trajopt.solve_ddp(drag, COST, x0, torch.zeros(T, 2, dtype=DTYPE))


def test_nan_jacobian_under_full_ddp_is_named():
    with pytest.raises(NonFiniteError, match="of the dynamics .* stage 0"):
        trajopt.solve_ddp(drag, COST, torch.zeros(4, dtype=DTYPE),
                          torch.zeros(T, 2, dtype=DTYPE), mode="ddp")


def test_nan_gradient_of_the_running_cost_is_named():
    cost = trajopt.Cost(lambda x, u, t: torch.sqrt((x ** 2).sum(-1)) + (u ** 2).sum(-1),
                        lambda x: ((x - GOAL) ** 2).sum(-1))
    with pytest.raises(NonFiniteError, match=r"lx \(dl/dx\) of the running cost .* stage 0"):
        trajopt.solve_ddp(smooth, cost, torch.zeros(4, dtype=DTYPE),
                          torch.zeros(T, 2, dtype=DTYPE))


def test_nan_gradient_of_the_terminal_cost_is_named():
    cost = trajopt.Cost(lambda x, u, t: (u ** 2).sum(-1),
                        lambda x: torch.sqrt((x ** 2).sum(-1)))
    # at rest at the origin the state never moves: the terminal state is 0
    with pytest.raises(NonFiniteError, match=f"lx .* of the terminal cost .* stage {T}"):
        trajopt.solve_ddp(smooth, cost, torch.zeros(4, dtype=DTYPE),
                          torch.zeros(T, 2, dtype=DTYPE))


def test_finite_derivatives_solve_as_before():
    res = trajopt.solve_ddp(drag, COST, torch.tensor([0, 0, 0.5, -0.3], dtype=DTYPE),
                            torch.zeros(T, 2, dtype=DTYPE))
    assert res.reason == "converged" and torch.isfinite(res.cost)


# ---------------------------------------------------------------- 2. dtype of a numpy x0
def _unicycle(x, u, t):
    th = x[..., 2]
    return x + 0.1 * torch.stack([u[..., 0] * torch.cos(th), u[..., 0] * torch.sin(th),
                                  u[..., 1]], -1)


_UNICYCLE_COST = trajopt.Cost(lambda x, u, t: 0.5 * (100 * (x ** 2).sum(-1) + (u ** 2).sum(-1)),
                              lambda x: 50 * (x ** 2).sum(-1))


@pytest.mark.parametrize("x0", ["numpy", "list"])
def test_numpy_x0_runs_in_float64_beside_a_float32_us0(x0):
    import numpy as np
    x0n = np.array([-1.0, -1.0, 1.0 + 1e-9])
    given = x0n if x0 == "numpy" else x0n.tolist()
    r = trajopt.solve_ddp(_unicycle, _UNICYCLE_COST, given, torch.zeros(20, 2))  # float32 us0
    ref = trajopt.solve_ddp(_unicycle, _UNICYCLE_COST, x0n, np.zeros((20, 2)))
    assert torch.is_tensor(r.xs) and r.xs.dtype == r.us.dtype == torch.float64
    assert float(r.xs[0, 2]) == x0n[2]                  # was rounded to float32: 1.0
    assert np.array_equal(r.us.numpy(), ref.us) and float(r.cost) == float(ref.cost)


def test_torch_inputs_keep_their_dtype():
    x0 = torch.tensor([-1.0, -1.0, 1.0])
    r = trajopt.solve_ddp(_unicycle, _UNICYCLE_COST, x0, torch.zeros(20, 2))
    assert r.xs.dtype == torch.float32

