"""Time invariance inferred from a model's code (``trajopt.ddp.stage_argument``) and
confirmed on the first trajectory (``StageDerivatives(confirm=True)``)."""

import functools
import math
import sys

import pytest
import torch

import trajopt
from trajopt.ddp.stage_argument import ignores_argument

F64 = torch.float64
REFS = torch.linspace(0.0, 1.0, 20, dtype=F64)


def _nested_reads(x, u, t):
    def inner():
        return t
    return x * inner()


def _comprehension_reads(x, u, t):
    return torch.stack([x[..., 0] * s for s in range(t + 1)]).sum(0)


def _locals_reads(x, u, t):
    return x * locals()["t"]


def _frame_reads(x, u, t):
    return x * sys._getframe().f_locals["t"]


def _eval_reads(x, u, t):
    return x * eval("t")


def _branch_reads(x, u, t):
    if t > 3:
        return 2 * x
    return x


def _shadowed(x, u, t):
    t = 3          # a store is no read, but the load after it is
    return x * t


def _deleted(x, u, t):
    del t
    return x


def _varargs(x, *rest):
    return x * rest[1]


def _ignores(x, u, t):
    th, w = x[..., 0], x[..., 1]
    return torch.stack([th + 0.1 * w, w + 0.1 * (u[..., 0] - math.sin(1.0) * th)], -1)


def _global_named_t(x, u, stage):
    return x * t_global


t_global = 2.0


class _Model:
    def ignores(self, x, u, t):
        return x + u

    def reads(self, x, u, t):
        return x + t * u


class _CallableIgnores:
    def __call__(self, x, u, t):
        return x + u


class _CallableReads:
    def __call__(self, x, u, t):
        return x + t * u


class _Module(torch.nn.Module):
    def forward(self, x, u, t):       # Module.__call__(*args) calls it: its forward is read
        return x + u


class _ModuleReads(torch.nn.Module):
    def forward(self, x, u, t):
        return x + t * u


def _hooked():
    """A module whose forward ignores t, with a forward pre-hook (handed t): not read."""
    m = _Module()
    m.register_forward_pre_hook(lambda mod, args: None)
    return m


@pytest.mark.parametrize("fn, expected", [
    (_ignores, True),
    (lambda x, u, t: x + u, True),
    (_global_named_t, True),          # the global t_global is not the parameter
    (_Model().ignores, True),          # a bound method: self not counted
    (lambda x, u, t: x + t, False),
    (_branch_reads, False),
    (_nested_reads, False),            # captured by a nested function
    (_comprehension_reads, False),
    (_locals_reads, False),            # the frame read by name
    (_frame_reads, False),
    (_eval_reads, False),
    (_shadowed, False),
    (_deleted, False),
    (_varargs, False),                 # t inside *args
    (_Model().reads, False),
    (functools.partial(_ignores), False),   # not a plain function: not looked into
    (torch.add, False),
    (_CallableIgnores(), True),        # an object: its class's __call__, self not counted
    (_CallableReads(), False),
    (_Module(), True),
    (_ModuleReads(), False),
    (_hooked(), False),
])
def test_ignores_argument(fn, expected):
    assert ignores_argument(fn, 2) is expected


def _pendulum(f, running):
    return (trajopt.Dynamics(f), trajopt.Cost(running, lambda x: 10 * ((x - 1) ** 2).sum(-1)))


def _running(x, u, t):
    return (x ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1)


def _solve(dyn, cost, B=1):
    x0 = torch.tensor([[0.3, 0.0], [0.1, 0.2], [-0.2, 0.1]], dtype=F64)[:B]
    solver = trajopt.DDPSolver(dyn, cost, max_iter=50)
    return solver, solver.solve(x0, torch.zeros(B, 20, 1, dtype=F64))


@pytest.mark.parametrize("B", [1, 3])
def test_time_invariance_is_inferred(B):
    """``f(x, u, t)`` and ``running(x, u, t)`` that never read t are time invariant by
    default (one batched call over all stages, no vmap), and solve as the declared
    time-varying models do; ``time_invariant=False`` is obeyed."""
    dyn, cost = _pendulum(_ignores, _running)
    assert dyn.time_invariant and dyn.time_invariance_inferred
    assert cost.time_invariant and cost.time_invariance_inferred
    solver, res = _solve(dyn, cost, B)
    chain = solver.structure
    assert chain._dynamics_derivatives.time_invariant
    assert chain._cost_derivatives.time_invariant
    assert chain._dynamics_derivatives.tensor_t is None   # the vmap path never tried
    slow_dyn = trajopt.Dynamics(_ignores, time_invariant=False)
    slow_cost = trajopt.Cost(_running, cost.terminal, time_invariant=False)
    assert not slow_dyn.time_invariant and not slow_dyn.time_invariance_inferred
    slow_solver, ref = _solve(slow_dyn, slow_cost, B)
    assert slow_solver.structure._dynamics_derivatives.tensor_t is True
    assert bool(res.converged.all()) and bool(ref.converged.all())
    torch.testing.assert_close(res.us, ref.us, rtol=1e-12, atol=1e-13)
    torch.testing.assert_close(res.cost, ref.cost, rtol=1e-13, atol=0)
    # declared True stays declared (not confirmed)
    assert not trajopt.Dynamics(_ignores, time_invariant=True).time_invariance_inferred
    # confirmed once: a later solver with the same models does not check again
    assert dyn.time_invariance_confirmed and cost.time_invariance_confirmed
    again = trajopt.DDPSolver(dyn, cost).structure
    assert not again._dynamics_derivatives.confirm and not again._cost_derivatives.confirm
    assert trajopt.DDPSolver(*_pendulum(_ignores, _running)).structure \
        ._dynamics_derivatives.confirm


def test_inferred_time_invariance_that_mixes_rows_falls_back():
    """A running cost that never reads t but mixes the rows of its batch (a scale from
    ``x.sum()``) gives other values when all stages are one batch: the first trajectory's
    check sees it and the model is time varying from then on, with the answer of the
    declared time-varying model."""
    def mixing(x, u, t):
        return (x ** 2).sum(-1) * (1.0 + 0.1 * torch.tanh(x[..., 0].sum())) \
            + 0.1 * (u ** 2).sum(-1)
    dyn, cost = _pendulum(_ignores, mixing)
    assert cost.time_invariance_inferred
    solver, res = _solve(dyn, cost)
    assert not solver.structure._cost_derivatives.time_invariant
    assert solver.structure._dynamics_derivatives.time_invariant
    _, ref = _solve(dyn, trajopt.Cost(mixing, cost.terminal, time_invariant=False))
    torch.testing.assert_close(res.us, ref.us, rtol=0, atol=0)
    # without the check the batched call gives another answer: the test can fail
    flat = torch.randn(40, 2, dtype=F64), torch.randn(40, 1, dtype=F64)
    stagewise = torch.cat([mixing(flat[0][i:i + 2], flat[1][i:i + 2], 0)
                           for i in range(0, 40, 2)])
    assert not torch.allclose(mixing(*flat, 0), stagewise)


def test_subclasses_are_inferred_from_their_forward():
    """A subclass's ``forward`` / ``running`` is looked into unless the class also
    overrides what could use t another way (``derivatives``)."""
    class Plain(trajopt.Dynamics):
        def forward(self, x, u, t):
            return x + 0.1 * u

    class Reads(trajopt.Dynamics):
        def forward(self, x, u, t):
            return _ignores(x, u, t)      # handing t on is reading it

    class OwnDerivatives(Plain):
        def derivatives(self, x, u, t, *, second_order=False):
            return super().derivatives(x, u, t, second_order=second_order)

    class Running(trajopt.Cost):
        def running(self, x, u, t):
            return (x ** 2).sum(-1) + (u ** 2).sum(-1)

    assert Plain().time_invariant and Plain().time_invariance_inferred
    assert not Reads().time_invariant
    assert not OwnDerivatives().time_invariant
    assert Running().time_invariant
    assert not trajopt.Dynamics().time_invariant    # nothing to look into


def test_a_diverged_element_does_not_undo_the_inference():
    """The confirmation compares values where an element's first rollout is not finite
    (NaN where both are NaN): a model that ignores t stays time invariant."""
    def f(x, u, t):
        th, w = x[..., 0], x[..., 1]
        kick = 1e-6 * torch.exp(u[..., 0])          # inf for the second element's controls
        return torch.stack([th + 0.1 * w, w + 0.1 * (u[..., 0] - torch.sin(th) + kick)], -1)
    dyn, cost = _pendulum(f, _running)
    us0 = torch.zeros(2, 20, 1, dtype=F64)
    us0[1] = 800.0
    solver = trajopt.DDPSolver(dyn, cost, max_iter=50)
    with pytest.warns(trajopt.errors.ConvergenceWarning, match="not finite"):
        res = solver.solve(torch.zeros(2, 2, dtype=F64), us0)
    assert list(res.reason) == ["converged", "diverged"]
    assert solver.structure._dynamics_derivatives.time_invariant and dyn.time_invariant
    assert solver.structure._cost_derivatives.time_invariant and cost.time_invariant


def test_given_states_do_not_decide_the_inference():
    """States given as a warm start (``xs0``, possibly a guess) are checked stage by stage
    while the inference is unconfirmed; the solve equals the one without them."""
    dyn, cost = _pendulum(_ignores, _running)
    x0 = torch.tensor([0.3, 0.0], dtype=F64)
    ref = trajopt.DDPSolver(dyn, cost, max_iter=50).solve(x0, torch.zeros(20, 1, dtype=F64))
    guess = torch.full((21, 2), float("nan"), dtype=F64)
    dyn2, cost2 = _pendulum(_ignores, _running)
    solver = trajopt.DDPSolver(dyn2, cost2, max_iter=50)
    res = solver.solve(x0, torch.zeros(20, 1, dtype=F64), xs0=guess)
    assert dyn2.time_invariant and cost2.time_invariant
    torch.testing.assert_close(res.us, ref.us, rtol=0, atol=0)
