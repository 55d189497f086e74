"""The running cost of a rollout from one call over all stages
(trajopt.ddp.stagewise.StageDerivatives.total, used by Chain.simulate), float64: equal to
the plain per-stage sum for time-invariant and time-varying costs; costs that cannot take
a stage tensor (branching on t) or answer differently with one (float32 arithmetic on t)
fall back to stage-by-stage calls, and say so once."""

import pytest
import torch

import trajopt
from trajopt.ddp.chain import Chain
from trajopt.ddp.models import Cost, Dynamics

F64 = dict(dtype=torch.float64)
T, B = 12, 3


def _args():
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(B, 2, generator=g, **F64), torch.randn(B, 1, generator=g, **F64))
            for _ in range(T)]


def _plain(running, args):
    total = torch.zeros(B, **F64)
    for t, (x, u) in enumerate(args):
        total = total + running(x, u, t)
    return total


COSTS = {
    "time-invariant": (lambda x, u: (x ** 2).sum(-1) + torch.cos(u[..., 0]), None),
    "tensor t": (lambda x, u, t: (x ** 2).sum(-1) * (1 + torch.as_tensor(t, **F64))
                 + u[..., 0], True),
    "branch on t": (lambda x, u, t: (x ** 2).sum(-1) * (2.0 if t == 5 else 1.0), False),
    # 0.1 * t: a Python float for an int t, float32 for an int64 tensor t
    # 0.1 * t: a Python float for an int t, float32 for an int64 tensor t
    "float32 t": (lambda x, u, t: (x ** 2).sum(-1) + 0.1 * t, False),
}


@pytest.mark.parametrize("name", sorted(COSTS))
def test_total_equals_the_per_stage_sum(name):
    fn, tensor_t = COSTS[name]
    cost = Cost(fn)
    chain = Chain(Dynamics(lambda x, u, t: x), cost)
    args = _args()
    plain = _plain(cost.running, args)
    for _ in range(2):  # the first call decides, the second uses the decision
        total = chain._cost_derivatives.total(args)
        assert (total - plain).abs().max() <= 1e-13 * plain.abs().max()
    assert chain._cost_derivatives.value_tensor_t is tensor_t


def test_rollout_cost_is_the_sum_of_stage_and_terminal_costs():
    def f(x, u, t):
        return torch.stack([x[..., 0] + 0.1 * x[..., 1], x[..., 1] + 0.1 * u[..., 0]], -1)

    def running(x, u, t):
        return (x ** 2).sum(-1) * (1 + 0.1 * torch.as_tensor(t, **F64)) + (u ** 2).sum(-1)

    def terminal(x):
        return 10 * (x ** 2).sum(-1)
    solver = trajopt.DDPSolver(f, trajopt.Cost(running, terminal))
    x0 = torch.tensor([[1.0, 0.0], [0.5, -0.2]], **F64)
    us = torch.linspace(-1, 1, 2 * 20, **F64).reshape(2, 20, 1)
    traj = solver.rollout(x0, list(us.unbind(1)))
    x, expected = x0, torch.zeros(2, **F64)
    for t in range(20):
        expected = expected + running(x, us[:, t], t)
        x = f(x, us[:, t], t)
    expected = expected + terminal(x)
    assert (traj.cost - expected).abs().max() <= 1e-13 * expected.abs().max()


def test_a_stage_singled_out_by_python_control_flow_is_seen():
    """``if t in waypoints:`` hashes a stage tensor and is silently False under vmap: only
    the stage it singles out shows it (30 here, not among the five sampled stages). The
    values are compared at every stage, so both the rollout cost and the derivatives are
    taken stage by stage, and the solution passes through the waypoint."""
    waypoint = {30: torch.tensor([1.0, 0.0], **F64)}

    def f(x, u):
        return torch.stack([x[..., 0] + 0.1 * x[..., 1], x[..., 1] + 0.1 * u[..., 0]], -1)

    def running(x, u, t):
        c = 1e-2 * (u ** 2).sum(-1)
        if t in waypoint:
            c = c + 100.0 * ((x - waypoint[t]) ** 2).sum(-1)
        return c
    cost = trajopt.Cost(running, lambda x: (x ** 2).sum(-1))
    solver = trajopt.DDPSolver(f, cost)
    traj = solver.rollout(torch.zeros(1, 2, **F64), [torch.zeros(1, 1, **F64)] * 60)
    assert traj.cost.tolist() == [100.0]
    res = solver.solve(torch.zeros(2, **F64), torch.zeros(60, 1, **F64))
    chain = solver.structure
    assert chain._cost_derivatives.value_tensor_t is False
    assert chain._cost_derivatives.tensor_t is False
    assert res.converged and (res.xs[30] - waypoint[30]).abs().max() < 0.01
