"""A model that writes into its arguments raises an error naming it (``trajopt.ddp.writes``)
instead of changing the trajectory under the solver: before the check a dynamics that
advanced its state in place returned a wrong solve without an error.  A model that leaves
torch (``.numpy()``) is named too, where torch.func's message said "Cannot access data
pointer"."""

import math

import numpy as np
import pytest
import torch

import trajopt
from trajopt.ddp.writes import unchanged
from trajopt.errors import InvalidArgumentError

F64 = torch.float64
DT = 0.1
GOAL = torch.tensor([math.pi, 0.0], dtype=F64)


def _f(x, u, t):
    th, w = x[..., 0], x[..., 1]
    return torch.stack([th + DT * w, w + DT * (u[..., 0] - 0.3 * w - 9.81 * torch.sin(th))],
                       -1)


def _f_in_place(x, u, t):   # numpy habits: advance the state where it is
    x[..., 0] += DT * x[..., 1]
    x[..., 1] += DT * (u[..., 0] - 0.3 * x[..., 1] - 9.81 * torch.sin(x[..., 0]))
    return x


def _f_writes_u(x, u, t):
    u.clamp_(-0.2, 0.2)
    return _f(x, u, t)


def _running(x, u, t):
    d = x - GOAL
    return (d ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1)


def _running_in_place(x, u, t):
    x -= GOAL
    return (x ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1)


def _running_scales_u(x, u, t):   # invisible in the values at u = 0
    u *= 2.0
    return ((x - GOAL) ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1)


def _terminal(x):
    return 10 * ((x - GOAL) ** 2).sum(-1)


def _terminal_in_place(x):
    x -= GOAL
    return 10 * (x ** 2).sum(-1)


def _solve(f, running, terminal, time_invariant=None, B=1):
    x0 = torch.tensor([[0.3, 0.0], [0.1, 0.2], [-0.2, 0.1]], dtype=F64)[:B]
    us0 = torch.full((B, 30, 1), 0.5, dtype=F64)
    return trajopt.solve_ddp(trajopt.Dynamics(f, time_invariant=time_invariant),
                             trajopt.Cost(running, terminal, time_invariant=time_invariant),
                             x0, us0, max_iter=5)


@pytest.mark.parametrize("time_invariant", [None, False])
@pytest.mark.parametrize("f, running, terminal, who, arg", [
    (_f_in_place, _running, _terminal, "the dynamics", "argument x "),
    (_f_writes_u, _running, _terminal, "the dynamics", "argument u "),
    (_f, _running_in_place, _terminal, "the running cost", "argument x "),
    (_f, _running, _terminal_in_place, "the terminal cost", "argument x "),
])
def test_a_model_writing_into_its_arguments_is_named(f, running, terminal, who, arg,
                                                     time_invariant):
    with pytest.raises(InvalidArgumentError, match=f"^{who} wrote into its {arg}"):
        _solve(f, running, terminal, time_invariant)


def test_a_write_the_values_do_not_show_is_named_by_the_derivatives():
    """``u *= 2`` on zero controls leaves the values as they were; the derivatives'
    replicated points are leaves that require grad, where autograd refuses it."""
    with pytest.raises(InvalidArgumentError, match="^the running cost wrote into"):
        trajopt.solve_ddp(_f, trajopt.Cost(_running_scales_u, _terminal),
                          torch.tensor([0.3, 0.0], dtype=F64),
                          torch.zeros(30, 1, dtype=F64), max_iter=5)


@pytest.mark.parametrize("B", [1, 3])
def test_models_that_write_nothing_solve_as_before(B):
    """The checks see copies: the solve is the one of the same models, including the
    identity dynamics that return their argument itself (no write)."""
    res = _solve(_f, _running, _terminal, B=B)
    assert torch.isfinite(res.cost).all()
    ident = trajopt.solve_ddp(lambda x, u, t: x, trajopt.Cost(_running, _terminal),
                              torch.tensor([0.3, 0.0], dtype=F64),
                              torch.zeros(10, 1, dtype=F64), max_iter=3)
    assert torch.equal(ident.xs, torch.tensor([0.3, 0.0], dtype=F64).expand(11, 2))


def test_unchanged_compares_bits():
    a = torch.tensor([1.0, float("nan"), -0.0], dtype=F64)
    assert unchanged(a.clone(), a)   # NaN equals itself bit for bit
    assert not unchanged(a.clone(), torch.tensor([1.0, float("nan"), 0.0], dtype=F64))
    assert not unchanged(a.clone(), a.float())
    c = torch.tensor([1 + 2j], dtype=torch.complex64)
    assert unchanged(c.clone(), c) and not unchanged(c.clone(), c * 1j)


@pytest.mark.parametrize("where", ["dynamics", "running cost", "terminal cost"])
def test_a_model_that_leaves_torch_is_named(where):
    def sin_np(v):
        return torch.as_tensor(np.sin(v.numpy()))
    f = (lambda x, u, t: x + DT * torch.stack([x[..., 1], u[..., 0] - sin_np(x[..., 0])], -1)) \
        if where == "dynamics" else _f
    running = (lambda x, u, t: sin_np(x[..., 0]) + (u ** 2).sum(-1)) \
        if where == "running cost" else _running
    terminal = (lambda x: sin_np(x[..., 0])) if where == "terminal cost" else _terminal
    with pytest.raises(InvalidArgumentError, match=f"^the {where} leaves torch"):
        _solve(f, running, terminal)
