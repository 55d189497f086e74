"""The dtype a DDP solve runs in (trajopt.ddp.inputs.widened): x0 and us0 in different
dtypes, or a float32 problem whose cost or dynamics hold float64 tensors (torch's type
promotion makes their output float64), solve in the wider dtype -- the answer of the same
problem given in float64 -- instead of failing inside the line search; a model that returns
a narrower dtype is refused with an error naming it; a float32 model stays float32."""

import math

import pytest
import torch

import trajopt
from tests.trajopt._pendulum import pendulum as _pendulum
from trajopt import Constraint
from trajopt.errors import InvalidArgumentError

F64 = dict(dtype=torch.float64)


def _cost(dtype=torch.float64):
    """The swing-up cost built from tensors of ``dtype``."""
    Q = torch.diag(torch.tensor([1.0, 0.1], dtype=dtype))
    QT = torch.diag(torch.tensor([50.0, 5.0], dtype=dtype))
    goal = torch.tensor([math.pi, 0.0], dtype=dtype)

    def running(x, u, t):
        d = x - goal
        return 0.5 * ((d @ Q) * d).sum(-1) + 0.025 * (u ** 2).sum(-1)

    def terminal(x):
        d = x - goal
        return 0.5 * ((d @ QT) * d).sum(-1)
    return trajopt.Cost(running, terminal)


def _inputs():
    x0 = torch.tensor([[0.3, 0.0], [-0.2, 0.1]])            # float32, as torch.tensor gives
    return x0, torch.zeros(2, 30, 1)


def _same(r, ref):
    assert r.xs.dtype == r.us.dtype == r.cost.dtype == torch.float64
    assert list(r.reason) == list(ref.reason)
    torch.testing.assert_close(r.us, ref.us, rtol=0, atol=1e-12)
    torch.testing.assert_close(r.cost, ref.cost, rtol=1e-13, atol=0)


@pytest.mark.parametrize("case", ["x0 float32, us0 float64", "float32 inputs, float64 cost"])
def test_the_solve_runs_in_the_wider_dtype(case):
    x0, us0 = _inputs()
    if case.startswith("x0"):
        us0 = us0.double()
    ref = trajopt.solve_ddp(_pendulum, _cost(), x0.double(), us0.double())
    _same(trajopt.solve_ddp(_pendulum, _cost(), x0, us0), ref)


def test_the_constrained_solve_runs_in_the_wider_dtype():
    x0, us0 = _inputs()
    cons = [Constraint(lambda x, u: u[..., :1] - 1.5, kind="inequality")]
    ref = trajopt.solve_ddp(_pendulum, _cost(), x0.double(), us0.double(), constraints=cons,
                            max_iter=40)
    r = trajopt.solve_ddp(_pendulum, _cost(), x0, us0, constraints=cons, max_iter=40)
    _same(r, ref)
    assert r.max_violation.dtype == torch.float64


def test_a_float32_problem_stays_float32():
    x0, us0 = _inputs()
    r = trajopt.solve_ddp(_pendulum, _cost(torch.float32), x0, us0)
    assert r.xs.dtype == r.us.dtype == r.cost.dtype == torch.float32
    assert all(r.converged)


def test_a_model_returning_a_narrower_dtype_is_refused():
    x0, us0 = _inputs()
    with pytest.raises(InvalidArgumentError, match="returned torch.float32 from torch.float64"):
        trajopt.solve_ddp(lambda x, u, t: _pendulum(x, u, t).float(), _cost(), x0.double(),
                          us0.double())
