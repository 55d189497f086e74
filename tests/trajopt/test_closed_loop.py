"""The closed-loop stage loop with the law's operations inlined (``Chain._inlined_loop``),
with grad mode on and off (into buffers), gives the generic loop's states and controls bit
for bit."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from trajopt.ddp.batch import Rows
from trajopt.ddp.chain import AffineLaw, Chain, feedback_control
from trajopt.ddp.stagewise import stage_points

F64 = torch.float64


def _f(x, u, t):
    th, w = x[..., 0], x[..., 1]
    return torch.stack([th + 0.1 * w, w + 0.1 * (u[..., 0] - torch.sin(th))], -1)


def _cost():
    return trajopt.Cost(lambda x, u, t: (x ** 2).sum(-1) + (u ** 2).sum(-1),
                        lambda x: (x ** 2).sum(-1))


class _Counted(trajopt.Dynamics):
    """A subclass whose forward is its own: the loop must call it, not a wrapped f."""

    def __init__(self):
        super().__init__()
        self.calls = 0

    def forward(self, x, u, t):
        self.calls += 1
        return _f(x, u, t)


@settings(max_examples=examples(20), deadline=None)
@given(B=st.integers(1, 4), T=st.integers(1, 12), stacked=st.booleans(),
       shared_gain=st.booleans(), stacked_gain=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_inlined_loop_equals_the_generic_loop(B, T, stacked, shared_gain, stacked_gain,
                                              seed):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 2, generator=g, dtype=F64)
    ff = [torch.randn(B, 1, generator=g, dtype=F64) for _ in range(T)]
    # a gain shared by the batch (1, m, n) takes addmm's broadcasting branch
    K = [torch.randn(1 if shared_gain else B, 1, 2, generator=g, dtype=F64)
         for _ in range(T)]
    xbar = [torch.randn(B, 2, generator=g, dtype=F64) for _ in range(T + 1)]
    # stacked gains (a backward pass's) are read without scanning the stages' shapes
    law = AffineLaw(Rows(torch.stack(ff)) if stacked else ff,
                    Rows(torch.stack(K)) if stacked_gain else K, xbar)
    chain = Chain(trajopt.Dynamics(_f), _cost())
    generic = chain.simulate(x0, T, feedback_control(law, chain.deviation))
    inlined = chain.simulate(x0, T, feedback_control(law, chain.deviation), law=law)
    with torch.no_grad():   # as in a solve: into buffers, two operations a stage
        buffered = chain.simulate(x0, T, feedback_control(law, chain.deviation), law=law)
    for run in (inlined, buffered):
        for a, b in zip(generic.xs + generic.us, run.xs + run.us):
            assert torch.equal(a, b)
        assert torch.equal(generic.cost, run.cost)
    # the points a rollout keeps (the buffer's among them) are its stages' points
    for run in (generic, inlined, buffered):
        expected = stage_points(list(zip(run.xs[:-1], run.us)))
        assert (run.points is None) == (expected is None)
        for a, b in zip(run.points or (), expected or ()):
            assert torch.equal(a, b)


def test_points_follow_the_rows():
    """A trajectory's kept points go with a wholesale assignment and are dropped where
    rows are written or selected (they would be stale)."""
    chain = Chain(trajopt.Dynamics(_f), _cost())
    law = AffineLaw([torch.full((3, 1), 0.1 * t, dtype=F64) for t in range(4)], None, None)
    x0 = torch.randn(3, 2, dtype=F64, generator=torch.Generator().manual_seed(0))
    a = chain.simulate(x0, 4, feedback_control(law, chain.deviation), law=law)
    b = chain.simulate(2 * x0, 4, feedback_control(law, chain.deviation), law=law)
    assert a.points is not None and b.points is not None
    assert a.select(torch.tensor([0, 2])).points is None
    a.assign(torch.arange(3), b)
    assert a.points is b.points
    one = AffineLaw([u[:1] for u in law.ff], None, None)
    a.assign(torch.tensor([1]), chain.simulate(
        3 * x0[1:2], 4, feedback_control(one, chain.deviation), law=one))
    assert a.points is None


def test_states_of_changing_size_take_the_unbuffered_loop():
    """A state that grows (the augmented states of GT-DDP's reference) has gains of
    another width at each stage: no buffer of one shape, the same answer."""
    def grow(x, u, t):
        return torch.cat([x, u], -1) if t == 0 else x + 0.1 * u.sum(-1, keepdim=True)
    T, B = 3, 2
    g = torch.Generator().manual_seed(0)
    sizes = [2, 3, 3, 3]
    law = AffineLaw([torch.randn(B, 1, generator=g, dtype=F64) for _ in range(T)],
                    [torch.randn(B, 1, sizes[t], generator=g, dtype=F64) for t in range(T)],
                    [torch.randn(B, sizes[t], generator=g, dtype=F64) for t in range(T + 1)])
    chain = Chain(trajopt.Dynamics(grow), _cost())
    x0 = torch.randn(B, 2, generator=g, dtype=F64)
    generic = chain.simulate(x0, T, feedback_control(law, chain.deviation))
    with torch.no_grad():
        inlined = chain.simulate(x0, T, feedback_control(law, chain.deviation), law=law)
    for a, b in zip(generic.xs + generic.us, inlined.xs + inlined.us):
        assert torch.equal(a, b)


def test_open_loop_equals_the_generic_loop():
    g = torch.Generator().manual_seed(1)
    us = [torch.randn(3, 1, generator=g, dtype=F64) for _ in range(7)]
    x0 = torch.randn(3, 2, generator=g, dtype=F64)
    chain = Chain(trajopt.Dynamics(_f), _cost())
    generic = chain.simulate(x0, 7, lambda t, xs: us[t])
    inlined = chain.simulate(x0, 7, lambda t, xs: us[t], law=AffineLaw(us))
    assert all(a is b for a, b in zip(generic.us, inlined.us))   # the given tensors
    for a, b in zip(generic.xs, inlined.xs):
        assert torch.equal(a, b)
    assert torch.equal(generic.cost, inlined.cost)


def test_stage_function_and_subclasses():
    plain = trajopt.Dynamics(_f)
    assert plain.stage_function() is _f
    patched = trajopt.Dynamics(_f)
    patched.forward = lambda x, u, t: 0.5 * _f(x, u, t)   # on the instance: still called
    assert patched.stage_function() is patched
    x0 = torch.ones(1, 2, dtype=F64)
    law = AffineLaw([torch.zeros(1, 1, dtype=F64)] * 3, [torch.ones(1, 1, 2, dtype=F64)] * 3,
                    [torch.zeros(1, 2, dtype=F64)] * 4)
    chain = Chain(patched, _cost())
    with torch.no_grad():
        run = chain.simulate(x0, 3, feedback_control(law, chain.deviation), law=law)
    generic = chain.simulate(x0, 3, feedback_control(law, chain.deviation))
    assert all(torch.equal(a, b) for a, b in zip(run.xs, generic.xs))
    counted = _Counted()
    assert counted.stage_function() is counted
    chain = Chain(counted, _cost())
    T = 5
    law = AffineLaw([torch.zeros(1, 1, dtype=F64)] * T, [torch.ones(1, 1, 2, dtype=F64)] * T,
                    [torch.zeros(1, 2, dtype=F64)] * (T + 1))
    chain.simulate(torch.ones(1, 2, dtype=F64), T, feedback_control(law, chain.deviation),
                   law=law)
    assert counted.calls == T


@pytest.mark.parametrize("B", [1, 3])
def test_ddp_solve_is_unchanged_by_the_inlined_loop(monkeypatch, B):
    """A whole solve with the inlined loop equals one with the generic loop forced."""
    x0 = torch.tensor([[0.3, 0.0], [0.1, 0.2], [-0.2, 0.1]], dtype=F64)[:B]
    runs = []
    for inlined in (True, False):
        if not inlined:
            monkeypatch.setattr(Chain, "_plain_stages", lambda self: False)
        res = trajopt.DDPSolver(_f, _cost()).solve(x0, torch.zeros(B, 30, 1, dtype=F64))
        runs.append(res)
    assert torch.equal(runs[0].us, runs[1].us) and torch.equal(runs[0].xs, runs[1].xs)


def test_the_cost_call_cannot_change_the_kept_points():
    """The running cost's one call gets copies of the points the rollout keeps: a write
    the checks of ``trajopt.ddp.writes`` do not see (through ``.data``, at later stages
    only) stays in the copies (a reviewer's case: the kept points were read by the
    derivatives and the next forward pass)."""
    def writing(x, u, t):
        u.data[u.shape[0] // 2:] = 0.0
        return (x ** 2).sum(-1) + (u ** 2).sum(-1)
    chain = Chain(trajopt.Dynamics(_f, time_invariant=True),
                  trajopt.Cost(writing, lambda x: (x ** 2).sum(-1), time_invariant=True))
    law = AffineLaw([torch.full((2, 1), 1.0 + t, dtype=F64) for t in range(6)], None, None)
    x0 = torch.randn(2, 2, dtype=F64, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        run = chain.simulate(x0, 6, feedback_control(law, chain.deviation), law=law)
    for a, b in zip(run.points, stage_points(list(zip(run.xs[:-1], run.us)))):
        assert torch.equal(a, b)
    assert bool((run.points[1] != 0).all())


def test_line_search_candidates_carry_their_points(monkeypatch):
    """An accepted candidate brings the points its rollout stacked: the derivatives at the
    accepted trajectory read them (all but the first rollout's and those of steps
    accepted apart from the first trial)."""
    seen = []
    derivatives = Chain.derivatives

    def spy(self, traj, second_order):
        seen.append(traj.points is not None)
        return derivatives(self, traj, second_order)
    monkeypatch.setattr(Chain, "derivatives", spy)
    trajopt.solve_ddp(_f, _cost(), torch.tensor([0.3, 0.0], dtype=F64),
                      torch.zeros(40, 1, dtype=F64), max_iter=10)
    assert len(seen) >= 3 and sum(seen) >= len(seen) - 1
