"""Linear dynamics and their rollout by a parallel scan (trajopt.ddp.linear,
trajopt.lqr.affine_scan), float64:

* ``scan_states`` equals a plainly written loop over the affine recurrence (hypothesis
  over horizons, shared and per-element maps);
* ``LinearDynamics`` evaluates and differentiates as the same map written as a callable
  (torch.func's Jacobians), time-varying with an offset included, and names a bad
  argument;
* DDP solves with ``LinearDynamics`` take the scan for the open-loop and the closed-loop
  rollouts and equal the solves with the callable; with control limits they keep the loop;
* a scan whose self-check fails (an unstable open loop held back by its controls) falls
  back to the loop, which then runs unchanged;
* ``solve_lqr``'s rollout by the scan equals the loop's for every batch layout.

Tolerances: the scan reaches ``x_t`` through products of up to t maps, so it equals the
loop to rounding relative to the largest state, not bitwise (1e-12 on these problems of
states ~1-1e4).
"""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
import trajopt.ddp.chain as chain_mod
import trajopt.lqr.affine_scan as affine_scan
import trajopt.lqr.finite as finite
from tests._hypothesis import examples
from trajopt.errors import ShapeError

F64 = dict(dtype=torch.float64)
F64_EPS = float(torch.finfo(torch.float64).eps)


@pytest.fixture(autouse=True)
def _no_compiled_pass(monkeypatch):
    """The DDP solves here compare the scanned rollouts with the loop's under the torch
    backward pass they were measured with; the compiled recursion that the solver tries
    first for small CPU problems (trajopt.ddp.compiledpass, its own tests in
    test_compiled.py) is switched off by its documented environment variable."""
    monkeypatch.setenv("TRAJOPT_COMPILED", "0")


def _loop_states(M, v, x0):
    """x_{t+1} = M_t x_t + v_t, one stage at a time."""
    xs = [x0]
    for t in range(M.shape[0]):
        xs.append(M[t] @ xs[-1] + v[t])
    return torch.stack(xs)


@settings(max_examples=examples(25), deadline=None)
@given(T=st.integers(1, 70), G=st.integers(1, 3), R=st.integers(1, 3), n=st.integers(1, 5),
       seed=st.integers(0, 2**31 - 1))
def test_scan_states_equal_the_loop(T, G, R, n, seed):
    g = torch.Generator().manual_seed(seed)
    M = 0.9 * torch.randn(T, G, n, n, generator=g, **F64) / n ** 0.5
    v = torch.randn(T, G, n, R, generator=g, **F64)
    x0 = torch.randn(G, n, R, generator=g, **F64)
    ref = _loop_states(M, v, x0)
    got = affine_scan.scan_states(M, v, x0)
    assert got.shape == ref.shape
    assert torch.allclose(got, ref, rtol=0, atol=1e-12 * float(ref.abs().max()))


def _system(seed, n=4, m=2, T=30, varying=False, offset=False):
    rng = np.random.default_rng(seed)
    shape = (T,) if varying else ()
    A = torch.tensor(np.eye(n) + 0.15 * rng.normal(size=shape + (n, n)))
    B = torch.tensor(rng.normal(size=shape + (n, m)))
    c = torch.tensor(rng.normal(size=shape + (n,))) if offset else None
    return A, B, c


def _as_callable(A, B, c):
    """The same map as a user writes it (stage t reads row t of time-varying arrays)."""
    def f(x, u, t):
        At = A if A.ndim == 2 else A.index_select(0, torch.as_tensor(t).reshape(1))[0]
        Bt = B if B.ndim == 2 else B.index_select(0, torch.as_tensor(t).reshape(1))[0]
        out = x @ At.T + u @ Bt.T
        if c is None:
            return out
        return out + (c if c.ndim == 1 else c.index_select(0, torch.as_tensor(t).reshape(1))[0])
    return f


@pytest.mark.parametrize("varying,offset", [(False, False), (True, True), (False, True)])
def test_linear_dynamics_match_the_callable_and_torch_func(varying, offset):
    A, B, c = _system(0, varying=varying, offset=offset)
    lin = trajopt.LinearDynamics(A, B, c)
    assert lin.time_invariant is not varying and lin.n == 4 and lin.m == 2
    f = _as_callable(A, B, c)
    generic = trajopt.Dynamics(f)
    x, u = torch.randn(6, 4, **F64), torch.randn(6, 2, **F64)
    for t in (0, 7, 29):
        assert torch.equal(lin(x, u, t), f(x, u, t))
        d, ref = lin.derivatives(x, u, t), generic.derivatives(x, u, t)
        assert torch.allclose(d.fx, ref.fx, rtol=0, atol=1e-15)
        assert torch.allclose(d.fu, ref.fu, rtol=0, atol=1e-15)
    stages = torch.tensor([0, 3, 3, 29, 5, 1])  # one stage per point
    d = lin.derivatives(x, u, stages)
    for i, t in enumerate(stages.tolist()):
        assert torch.equal(d.fx[i], A if A.ndim == 2 else A[t])
        assert torch.allclose(lin(x[i:i + 1], u[i:i + 1], t)[0], lin(x, u, stages)[i],
                              rtol=0, atol=1e-14)  # one point vs six: other GEMM kernels
    assert lin.derivatives(x, u, 0, second_order=True).fxx is None  # linear: none


def test_linear_dynamics_name_bad_arguments():
    with pytest.raises(ShapeError, match="A must be"):
        trajopt.LinearDynamics(torch.zeros(3, 4), torch.zeros(3, 1))
    with pytest.raises(ShapeError, match="B must be"):
        trajopt.LinearDynamics(torch.eye(3), torch.zeros(2, 1))
    with pytest.raises(ShapeError, match="c must be"):
        trajopt.LinearDynamics(torch.eye(3), torch.zeros(3, 1), torch.zeros(2))
    with pytest.raises(ValueError, match="A"):
        trajopt.LinearDynamics(torch.tensor([[float("nan")]]), torch.ones(1, 1))
    A, B, _ = _system(0, T=10, varying=True)
    lin = trajopt.LinearDynamics(A, B)
    with pytest.raises(ShapeError, match="A has 10 stages"):
        lin(torch.zeros(1, 4, **F64), torch.zeros(1, 2, **F64), 10)
    with pytest.raises(ShapeError, match="A has 10 stages"):
        trajopt.solve_ddp(lin, trajopt.QuadraticCost(torch.eye(4), torch.eye(2),
                                                      torch.eye(4)),
                          torch.ones(4, **F64), torch.zeros(12, 2, **F64))


def _spy(monkeypatch, module, name, record=lambda out: out is not None):
    """Replace ``module.name`` by a wrapper that records ``record(result)`` of each call."""
    seen = []
    real = getattr(module, name)

    def spy(*a):
        out = real(*a)
        seen.append(record(out))
        return out
    monkeypatch.setattr(module, name, spy)
    return seen


def _count_scans(monkeypatch):
    """For each rollout the DDP loop tries to scan, whether the scan held its check
    (after the refinement where the first check failed)."""
    return _spy(monkeypatch, chain_mod, "checked_states")


def linear_problem(varying, offset, batch):
    """``(A, B, c, cost, x0, us0)``: a 4-state, 2-control system (:func:`_system`, seed 1),
    a quadratic cost towards (1, 1, 1, 1), ``batch`` initial states, T = 30."""
    A, B, c = _system(1, varying=varying, offset=offset)
    cost = trajopt.QuadraticCost(torch.eye(4), 0.1 * torch.eye(2), 10 * torch.eye(4),
                                 x_goal=torch.ones(4))
    x0 = torch.randn(batch, 4, generator=torch.Generator().manual_seed(2), **F64)
    return A, B, c, cost, x0, torch.zeros(batch, 30, 2, **F64)


@pytest.mark.parametrize("varying,offset,batch", [(False, False, 1), (True, True, 3),
                                                  (False, True, 5)])
def test_ddp_with_linear_dynamics_scans_and_equals_the_callable(monkeypatch, varying,
                                                                 offset, batch):
    A, B, c, cost, x0, us0 = linear_problem(varying, offset, batch)
    ref = trajopt.solve_ddp(trajopt.Dynamics(_as_callable(A, B, c)), cost, x0, us0)
    seen = _count_scans(monkeypatch)
    got = trajopt.solve_ddp(trajopt.LinearDynamics(A, B, c), cost, x0, us0)
    # the initial rollout and every forward pass were scanned, and held the check
    assert len(seen) >= 2 and all(seen)
    assert torch.equal(got.iterations, ref.iterations) and bool(got.converged.all())
    scale = float(ref.xs.abs().max())
    assert torch.allclose(got.xs, ref.xs, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(got.us, ref.us, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(got.cost, ref.cost, rtol=1e-12, atol=0)
    assert torch.allclose(got.K, ref.K, rtol=0, atol=1e-12 * float(ref.K.abs().max()))


def test_ddp_with_control_limits_keeps_the_loop(monkeypatch):
    A, B, _ = _system(3)
    cost = trajopt.QuadraticCost(torch.eye(4), 0.01 * torch.eye(2), 10 * torch.eye(4),
                                 x_goal=3 * torch.ones(4))
    limits = (-0.5 * torch.ones(2, **F64), 0.5 * torch.ones(2, **F64))
    x0, us0 = torch.zeros(4, **F64), torch.zeros(30, 2, **F64)
    ref = trajopt.solve_ddp(trajopt.Dynamics(_as_callable(A, B, None)), cost, x0, us0,
                            control_limits=limits)
    seen = _count_scans(monkeypatch)
    got = trajopt.solve_ddp(trajopt.LinearDynamics(A, B), cost, x0, us0,
                            control_limits=limits)
    assert len(seen) == 1  # the initial open-loop rollout only; the clamped passes loop
    assert bool((got.us.abs() >= 0.5 - 1e-12).any())  # the limits are active
    assert torch.equal(got.iterations, ref.iterations)
    assert torch.allclose(got.us, ref.us, rtol=0, atol=1e-12)


@pytest.mark.parametrize("a,T", [(1e10, 40), (1.7, 100), (1.05, 200), (1.1, 100)])
def test_an_amplifying_recurrence_falls_back_to_the_loop(monkeypatch, a, T):
    """x' = a x + u from x0 = 1 with u = 1 - a stays at 1 exactly in the loop. The scan
    reaches x_t through a^t: for 1e10 it overflows; for 1.7 its states drift off the
    unstable equilibrium (to ~1e6 at T = 100) while satisfying every transition to 32 eps
    -- a trajectory of the dynamics, not the loop's. The forward-error estimate (the
    residuals' recurrence) is far above its bound in both, and the loop's states are
    returned.  For 1.05 (T = 200) and 1.1 (T = 100) the estimate stalls from the first
    correction on at 1e3-1e4 eps, within ``STALLED`` (a reviewer's case: accepted there,
    3e4 eps off the loop's exact states); a stall counts only after a correction that
    shrank the estimate, which an amplified floor does not give."""
    lin = trajopt.LinearDynamics(torch.tensor([[a]], **F64), torch.tensor([[1.0]], **F64))
    solver = trajopt.DDPSolver(lin, trajopt.QuadraticCost(torch.eye(1), torch.eye(1),
                                                         torch.eye(1)))
    checks = _spy(monkeypatch, affine_scan, "consistent", bool)
    scans = _spy(monkeypatch, affine_scan, "scan_states", lambda out: 1)
    seen = _count_scans(monkeypatch)
    traj = solver.rollout(torch.ones(1, 1, **F64), [torch.full((1, 1), 1 - a, **F64)] * T)
    assert seen == [False] and checks == []  # refused by the forward estimate
    # ... as soon as a correction failed to shrink it (not after every refinement)
    assert len(scans) < 1 + affine_scan.REFINEMENTS
    assert all(torch.equal(x, torch.ones(1, 1, **F64)) for x in traj.xs)
    # the scan alone is off by far more than rounding here (3e4 eps for 1.05, ~1e6 for 1.7)
    raw = affine_scan.scan_states(torch.full((T, 1, 1, 1), a, **F64),
                                  torch.full((T, 1, 1, 1), 1 - a, **F64),
                                  torch.ones(1, 1, 1, **F64))
    assert not bool(((raw - 1).abs() <= 1e3 * F64_EPS).all())


def test_decaying_states_are_refined_once(monkeypatch):
    """A closed loop whose states decay from ~1 to ~1e-14: the scan's error is relative to
    products over many stages (its transitions are off by up to ~170 eps of their terms,
    measured, against the check's 32); corrected by the residuals' recurrence, the scan
    is taken, and its states equal the loop's stage by stage."""
    rng = np.random.default_rng(0)
    T, n, m = 100, 8, 3
    prob = trajopt.LQR(A=torch.tensor(np.eye(n) + 0.1 * rng.normal(size=(T, n, n))),
                       B=torch.tensor(0.3 * rng.normal(size=(T, n, m))),
                       Q=torch.eye(n, **F64).expand(T, n, n),
                       R=torch.eye(m, **F64).expand(T, m, m), QT=torch.eye(n, **F64))
    x0 = torch.tensor(rng.normal(size=(16, n)))
    calls = _spy(monkeypatch, finite, "scan_closed_loop")
    got = trajopt.solve_lqr(prob, x0)
    assert calls == [True]
    monkeypatch.setattr(finite, "scan_closed_loop", lambda *a: None)
    ref = trajopt.solve_lqr(prob, x0)
    assert float(ref.xs[:, -1].abs().max()) < 1e-12  # decayed by > 12 orders
    err = (got.xs - ref.xs).abs().amax(-1) / ref.xs.abs().amax(-1)  # per stage
    assert float(err.max()) < 1e-12


def _longdouble_states(A, B, K, k, x0):
    """The closed loop x' = A x + B (K x + k) in numpy's extended precision, stage by
    stage (A (N, T, n, n), B (N, T, n, m), K (N, T, m, n), k (N, T, m), x0 (N, n))."""
    A, B, K, k, x = (v.numpy().astype(np.longdouble) for v in (A, B, K, k, x0))
    xs = [x]
    for t in range(A.shape[1]):
        u = np.einsum("bij,bj->bi", K[:, t], x) + k[:, t]
        x = np.einsum("bij,bj->bi", A[:, t], x) + np.einsum("bij,bj->bi", B[:, t], u)
        xs.append(x)
    return np.stack(xs, 1)


def _random_optimal_loops(seed, T, n, m, N):
    """N random LQR problems (``A ~ N(0, 1/n)``, ``B ~ N(0, 1)``, unit costs) of T stages
    and initial states: their optimal closed loops decay by orders of magnitude."""
    rng = np.random.default_rng(seed)
    A = torch.tensor(rng.normal(size=(N, T, n, n)) / np.sqrt(n))
    B = torch.tensor(rng.normal(size=(N, T, n, m)))
    prob = trajopt.LQR(A=A, B=B, Q=torch.eye(n, **F64).expand(N, T, n, n),
                       R=torch.eye(m, **F64).expand(N, T, m, m), QT=torch.eye(n, **F64))
    return A, B, prob, torch.tensor(rng.normal(size=(N, n)))


def _relative_error(xs, exact):
    """Largest per-state error of ``xs`` against ``exact`` (longdouble), relative to the
    state (no smaller than the smallest normal float64)."""
    size = np.maximum(np.abs(exact).max(-1), np.finfo(np.float64).tiny)
    return float((np.abs(xs.numpy().astype(np.longdouble) - exact).max(-1) / size).max())


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18, reason="no extended precision")
def test_a_long_decay_is_refined_twice_and_as_accurate_as_the_loop(monkeypatch):
    """T = 300 stages of a random optimal closed loop, states decaying from ~1 to 1e-91:
    the first correction of the scan is 1.2e3 eps of the states, over the bound (the
    scan's error is relative to products of non-normal maps over many stages), the second
    5.8e2 eps; the scan is taken with two corrections.  Against an extended-precision rollout
    the scan is 2.5e3 eps from the exact states, the loop 6.2e2 eps (per state, relative,
    measured): both within 1e-12."""
    A, B, prob, x0 = _random_optimal_loops(1, T=300, n=10, m=4, N=4)
    scans = _spy(monkeypatch, affine_scan, "scan_states", lambda out: 1)
    got = trajopt.solve_lqr(prob, x0)
    assert len(scans) == 3  # the states and two corrections
    monkeypatch.setattr(finite, "scan_closed_loop", lambda *a: None)
    ref = trajopt.solve_lqr(prob, x0)
    assert float(ref.xs[:, -1].abs().max()) < 1e-85
    exact = _longdouble_states(A, B, ref.K, ref.k, x0)
    assert _relative_error(got.xs, exact) < 1e-12 and _relative_error(ref.xs, exact) < 1e-12


@pytest.mark.skipif(np.finfo(np.longdouble).eps > 1e-18, reason="no extended precision")
def test_a_decay_to_1e_minus_300_stalls_and_is_taken_at_the_loops_accuracy(monkeypatch):
    """T = 1,000 stages of random optimal closed loops (the GPU benchmark's problem at batch
    8), states decaying from ~1 to ~1e-308: the corrections' estimates are 3.5e4, 7.4e3
    and 4.8e3 eps (measured), the third not 4x smaller than the second: the floor of the
    transitions' own rounding, above FORWARD.  The scan is taken there (before STALLED it
    was refused and the loop ran).  Against extended precision the scan is 2.1e4 eps from
    the exact states, the loop 2.0e4 eps (per state, relative, measured)."""
    monkeypatch.setattr(affine_scan, "MAX_WORK", 1 << 20)  # batch 8 at n = 10 on the CPU
    A, B, prob, x0 = _random_optimal_loops(100, T=1000, n=10, m=4, N=8)
    calls = _spy(monkeypatch, finite, "scan_closed_loop")
    scans = _spy(monkeypatch, affine_scan, "scan_states", lambda out: 1)
    got = trajopt.solve_lqr(prob, x0)
    assert calls == [True] and len(scans) == 4  # the states and three corrections
    monkeypatch.setattr(finite, "scan_closed_loop", lambda *a: None)
    ref = trajopt.solve_lqr(prob, x0)
    assert float(ref.xs[:, -1].abs().max()) < 1e-300
    exact = _longdouble_states(A, B, ref.K, ref.k, x0)
    loop = _relative_error(ref.xs, exact)
    assert _relative_error(got.xs, exact) <= 2 * loop and loop < 1e5 * F64_EPS


def test_autograd_through_the_scanned_rollout_equals_the_loop_and_warns_nothing(
        monkeypatch):
    """An explicit CholeskySolver() differentiates the recursion and the rollout by
    autograd: through the scan (with its refinement's float estimate, taken from a
    detached tensor) the gradients are the loop's, and no warning is raised."""
    import warnings

    from trajopt.riccati.solvers import CholeskySolver
    prob = _lqr((3,), 11, full=False)
    grads = []
    for scanned in (True, False):
        if not scanned:
            monkeypatch.setattr(finite, "scan_closed_loop", lambda *a: None)
        x0 = torch.tensor(np.random.default_rng(1).normal(size=(3, 4)), requires_grad=True)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            sol = trajopt.solve_lqr(prob, x0, solver=CholeskySolver())
            grads.append(torch.autograd.grad(sol.xs.square().sum() + sol.cost.sum(), x0)[0])
    assert torch.allclose(grads[0], grads[1], rtol=1e-12, atol=1e-12)


def test_an_empty_batch_of_initial_states_rolls_out_nothing():
    sol = trajopt.solve_lqr(_lqr((), 12), torch.zeros(0, 4, **F64))
    assert sol.xs.shape == (0, 41, 4) and sol.us.shape == (0, 40, 2) and sol.cost.shape == (0,)


def _lqr(pb, seed, T=40, n=4, m=2, full=True):
    rng = np.random.default_rng(seed)
    kw = {}
    if full:
        kw = dict(c=torch.tensor(rng.normal(size=(*pb, T, n))),
                  q=torch.tensor(rng.normal(size=(*pb, T, n))),
                  M=0.1 * torch.tensor(rng.normal(size=(*pb, T, m, n))))
    return trajopt.LQR(A=torch.tensor(np.eye(n) + 0.2 * rng.normal(size=(*pb, T, n, n))),
                       B=torch.tensor(rng.normal(size=(*pb, T, n, m))),
                       Q=torch.eye(n, **F64).expand(*pb, T, n, n),
                       R=torch.eye(m, **F64).expand(*pb, T, m, m),
                       QT=torch.eye(n, **F64), **kw)


@pytest.mark.parametrize("pb,xb,full", [((), (), True), ((), (5,), True), ((3,), (3,), True),
                                        ((3,), (), True), ((2, 1), (2, 3), True),
                                        ((), (5,), False)])
def test_solve_lqr_rollout_by_the_scan_equals_the_loop(monkeypatch, pb, xb, full):
    prob = _lqr(pb, 4, full=full)
    x0 = torch.tensor(np.random.default_rng(5).normal(size=(*xb, 4)))
    calls = _spy(monkeypatch, finite, "scan_closed_loop")
    got = trajopt.solve_lqr(prob, x0)
    assert calls == [True]
    monkeypatch.setattr(finite, "scan_closed_loop", lambda *a: None)
    ref = trajopt.solve_lqr(prob, x0)
    scale = float(ref.xs.abs().max())
    assert got.xs.shape == ref.xs.shape and got.us.shape == ref.us.shape
    assert torch.allclose(got.xs, ref.xs, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(got.us, ref.us, rtol=0, atol=1e-12 * scale)
    assert torch.allclose(got.cost, ref.cost, rtol=1e-12, atol=0)


def test_the_rule_leaves_large_batches_and_short_horizons_to_the_loop(monkeypatch):
    assert affine_scan.rollout_pays(100, 4, 8, shared=False)
    assert not affine_scan.rollout_pays(100, 16, 8, shared=False)
    assert affine_scan.rollout_pays(100, 16, 8, shared=True)
    assert not affine_scan.rollout_pays(100, 64, 8, shared=True)
    assert not affine_scan.rollout_pays(15, 1, 2, shared=True)
    prob = _lqr((), 6)
    calls = _spy(monkeypatch, affine_scan, "scan_states", lambda out: 1)
    sol = trajopt.solve_lqr(prob, torch.zeros(1024, 4, **F64))
    assert calls == [] and sol.xs.shape == (1024, 41, 4)
    trajopt.solve_lqr(prob, torch.zeros(8, 4, **F64))
    assert calls == [1, 1]  # the states and their correction


@pytest.mark.parametrize("which", ["A", "B", "c"])
def test_linear_dynamics_with_one_argument_per_stage_evaluate_per_point(which):
    """Only one of A, B, c per stage: a tensor of stages (one per point) gives each point
    its own stage's map, as the int stage does (the shape of the result included)."""
    rng = np.random.default_rng(7)
    A, B, c = torch.tensor(rng.normal(size=(3, 3))), torch.tensor(rng.normal(size=(3, 2))), \
        torch.tensor(rng.normal(size=(3,)))
    arrays = dict(A=A, B=B, c=c)
    arrays[which] = torch.tensor(rng.normal(size=(10, *arrays[which].shape)))
    lin = trajopt.LinearDynamics(**arrays)
    x, u = torch.randn(4, 3, **F64), torch.randn(4, 2, **F64)
    stages = torch.tensor([0, 3, 3, 9])
    out = lin(x, u, stages)
    assert out.shape == (4, 3)
    for i, t in enumerate(stages.tolist()):
        assert torch.allclose(out[i], lin(x[i:i + 1], u[i:i + 1], t)[0], rtol=0, atol=1e-14)


@pytest.mark.parametrize("mode", ["ilqr", "ddp"])
def test_gradients_through_solve_ddp_with_linear_dynamics(mode):
    """Implicit differentiation of the solution (no second-order dynamics terms: none
    to add) equals that of the same dynamics as a callable, for x0 and for A."""
    A, B, _ = _system(8, n=3, m=1, T=20)
    cost = trajopt.QuadraticCost(torch.eye(3), 0.1 * torch.eye(1), torch.eye(3))
    us0 = torch.zeros(20, 1, **F64)
    grads = []
    for make in (lambda A_: trajopt.LinearDynamics(A_, B),
                 lambda A_: trajopt.Dynamics(lambda x, u: x @ A_.T + u @ B.T)):
        x0 = torch.ones(3, **F64, requires_grad=True)
        Ap = A.clone().requires_grad_()
        res = trajopt.solve_ddp(make(Ap), cost, x0, us0, mode=mode, params=[Ap])
        grads.append(torch.autograd.grad(res.cost.sum(), (x0, Ap)))
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-10, atol=1e-12)
