"""The compiled Riccati recursion (trajopt.riccati.compiled), the DDP backward pass built
on it (trajopt.ddp.compiledpass), solve_lqr's use of it (trajopt.lqr.exact_pass) and the
compiled rollout of linear dynamics (trajopt.lqr.compiled_rollout):

* the compiled pass equals the plain numpy reference of ``tests/reference/ddp_numpy.py``
  (gains, values, expected change) with offsets, cross terms and per-element
  regularization (hypothesis, float64), and flags elements whose regularized Q_uu is not
  positive definite, leaving the others exact;
* float32 inputs give the float64 answer rounded to float32;
* whole DDP solves take it by default for small problems on the CPU and give the torch
  recursion's result (convex and nonconvex problems, where mu is raised, and box limits
  with one and two controls); the rule leaves it out for gradients, approximate players,
  second-order dynamics, large batches, without numba (with a warning) and when
  switched off;
* solve_lqr through it equals the dense KKT solution and still names a stage that is
  not positive definite;
* the compiled rollout equals the plain loop (hypothesis), and DDP with LinearDynamics
  through it equals the callable model.
"""
import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
import trajopt._threads
import trajopt.ddp.compiledpass as compiledpass
import trajopt.riccati.compiled as compiled
from tests._hypothesis import examples
from tests.reference.ddp_numpy import backward as reference_backward
from tests.reference.lqr_kkt import random_stages
from trajopt.ddp.gtddp import GTDDPSolver
from trajopt.lqr.compiled_rollout import compiled_rollout
from trajopt.riccati.compiled import compiled_pays, compiled_recursion
from trajopt.riccati.expansion import joint_blocks

F64 = dict(dtype=torch.float64)

pytestmark = pytest.mark.skipif(not compiled.compiled_available(),
                                reason="numba is not installed")


def _problem(seed, B, T, n, m, offset):
    """B random convex problems: numpy stage lists per element, and the packed stacked
    tensors F (T, B, n, n+m), L (T, B, n+m, 1+n+m), c (T, B, n) or None, Vx, Vxx."""
    rng = np.random.default_rng(seed)
    probs = [random_stages(rng, [n] * (T + 1), [m] * T, offset=offset) for _ in range(B)]

    def col(name, t, shape):
        return torch.tensor(np.stack([np.zeros(shape) if getattr(p[0][t], name) is None
                                      else getattr(p[0][t], name) for p in probs]), **F64)
    Fs, Ls = [], []
    for t in range(T):
        F, L = joint_blocks(col("A", t, (n, n)), col("B", t, (n, m)), col("q", t, n),
                            col("r", t, m), col("Q", t, (n, n)), col("R", t, (m, m)),
                            col("M", t, (m, n)))
        Fs.append(F)
        Ls.append(L)
    c = torch.stack([col("c", t, n) for t in range(T)]) if offset else None
    Vx = torch.tensor(np.stack([p[2] for p in probs]), **F64)
    Vxx = torch.tensor(np.stack([p[1] for p in probs]), **F64)
    return probs, torch.stack(Fs), torch.stack(Ls), c, Vx, Vxx


def _reference(prob, mu, offset):
    stages, QT, qT = prob
    T = len(stages)
    n, m = stages[0].B.shape

    def get(name, shape):
        return [np.zeros(shape) if getattr(s, name) is None else getattr(s, name)
                for s in stages]
    return reference_backward(
        [s.A for s in stages], [s.B for s in stages], None, None, None,
        get("q", n), get("r", m), get("Q", (n, n)), get("R", (m, m)), get("M", (m, n)),
        qT, QT, mu, False, c=[s.c for s in stages] if offset else None) if T else None


def _close(a, b, rel):
    a, b = np.asarray(a), np.asarray(b)
    return np.abs(a - b).max() <= rel * max(1.0, np.abs(b).max())


@settings(max_examples=examples(40), deadline=None)
@given(T=st.integers(1, 25), n=st.integers(1, 5), m=st.integers(1, 3),
       B=st.integers(1, 3), offset=st.booleans(), seed=st.integers(0, 2**16),
       mus=st.lists(st.sampled_from([0.0, 0.3, 5.0]), min_size=3, max_size=3))
def test_compiled_pass_equals_the_reference(T, n, m, B, offset, seed, mus):
    probs, F, L, c, Vx, Vxx = _problem(seed, B, T, n, m, offset)
    mu = torch.tensor(mus[:B], **F64)
    got = compiled_recursion(F, L, c, Vx, Vxx, mu)
    assert got.ok.all()
    for b in range(B):
        ref = _reference(probs[b], mus[b], offset)
        # float64 identities; the bound is relative to the largest entry, and the values
        # of T random stages grow with T (conditioning, not rounding, sets the 1e-10)
        for t in range(T):
            assert _close(got.kK[t, b, :, 0], ref["k"][t], 1e-10)
            assert _close(got.kK[t, b, :, 1:], ref["K"][t], 1e-10)
            assert _close(got.Vx[t, b], ref["Vx"][t], 1e-10)
            assert _close(got.Vxx[t, b], ref["Vxx"][t], 1e-10)
            assert torch.equal(got.Vxx[t, b], got.Vxx[t, b].T)
        assert _close(got.dV[b], ref["dV"], 1e-10)


def test_not_positive_definite_elements_are_flagged_and_the_others_exact():
    probs, F, L, c, Vx, Vxx = _problem(3, 3, 12, 4, 2, True)
    L[5, 1, 4:, 5:] = -1e3 * torch.eye(2, **F64)  # element 1: Q_uu indefinite at stage 5
    mu = torch.zeros(3, **F64)
    got = compiled_recursion(F, L, c, Vx, Vxx, mu)
    assert got.ok.tolist() == [True, False, True]
    assert torch.isnan(got.kK[:6, 1]).all() and torch.isnan(got.Vxx[:6, 1]).all()
    assert torch.isfinite(got.kK[6:, 1]).all()
    for b in (0, 2):
        ref = _reference(probs[b], 0.0, True)
        assert _close(got.kK[0, b, :, 1:], ref["K"][0], 1e-10)
        assert _close(got.dV[b], ref["dV"], 1e-10)
    # a regularization that makes it positive definite again: the reference's answer
    probs[1][0][5].R[...] = -1e3 * np.eye(2)
    mu = torch.tensor([0.0, 2e3, 0.0], **F64)
    got = compiled_recursion(F, L, c, Vx, Vxx, mu)
    ref = _reference(probs[1], 2e3, True)
    assert got.ok.all() and _close(got.kK[0, 1, :, 1:], ref["K"][0], 1e-10)


def test_non_finite_data_are_flagged_not_returned():
    _, F, L, c, Vx, Vxx = _problem(4, 2, 8, 3, 1, False)
    F[2, 0, 0, 0] = math.nan
    got = compiled_recursion(F, L, c, Vx, Vxx, torch.zeros(2, **F64))
    assert got.ok.tolist() == [False, True]


@pytest.mark.parametrize("boxed", [False, True])
def test_the_batch_cut_between_threads_gives_the_same_pass(boxed, monkeypatch):
    """A large pass runs its batch in slices on several threads: the slices cover the
    batch once, run on more than one thread, and the result (an element flagged in one
    slice included) is bitwise the one-thread pass."""
    import threading
    import types

    B, T, n, m = 7, 9, 3, 2
    _, F, L, c, Vx, Vxx = _problem(5, B, T, n, m, True)
    L[4, 5, n:, 1 + n:] = -1e3 * torch.eye(m, **F64)  # element 5: Q_uu indefinite
    mu = torch.linspace(0.0, 0.5, B, **F64)
    limits = compiled.BoxLimits(torch.full((m,), -0.3, **F64), torch.full((m,), 0.2, **F64),
                                0.1 * torch.randn(T, B, m, **F64)) if boxed else None
    one = compiled_recursion(F, L, c, Vx, Vxx, mu, limits)
    real = compiled.kernels()
    calls = []

    def recursion(*args):
        calls.append((args[-2], args[-1], threading.current_thread().name))
        return real.recursion(*args)
    monkeypatch.setattr(compiled, "kernels", lambda: types.SimpleNamespace(recursion=recursion))
    monkeypatch.setattr(trajopt._threads, "caller_threads", lambda: 3)
    monkeypatch.setattr(trajopt._threads.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(compiled, "MIN_WORK_PER_THREAD", 1)
    cut = compiled_recursion(F, L, c, Vx, Vxx, mu, limits)
    assert sorted((b0, b1) for b0, b1, _ in calls) == [(0, 2), (2, 4), (4, 7)]
    names = {name for _, _, name in calls}
    assert len(names) >= 2 and threading.current_thread().name in names
    assert one.ok.tolist() == [True] * 5 + [False, True]
    for field in ("kK", "Vx", "Vxx", "dV", "ok"):
        assert torch.equal(getattr(cut, field).nan_to_num(7.0),
                           getattr(one, field).nan_to_num(7.0)), field
    # no more slices than cores
    calls.clear()
    monkeypatch.setattr(trajopt._threads.os, "cpu_count", lambda: 2)
    compiled_recursion(F, L, c, Vx, Vxx, mu, limits)
    assert sorted((b0, b1) for b0, b1, _ in calls) == [(0, 3), (3, 7)]
    # below the work bound, one slice on the caller's thread
    calls.clear()
    monkeypatch.setattr(compiled, "MIN_WORK_PER_THREAD", T * B * (n + m) ** 3)
    compiled_recursion(F, L, c, Vx, Vxx, mu, limits)
    assert [(b0, b1) for b0, b1, _ in calls] == [(0, B)]
    assert calls[0][2] == threading.current_thread().name


def test_float32_is_the_float64_answer_rounded():
    _, F, L, c, Vx, Vxx = _problem(5, 2, 30, 4, 2, True)
    mu = torch.tensor([0.0, 0.1], **F64)
    ref = compiled_recursion(F, L, c, Vx, Vxx, mu)
    args = [v.float() for v in (F, L, c, Vx, Vxx, mu)]
    got = compiled_recursion(*args)
    assert got.kK.dtype == torch.float32 and got.dV.dtype == torch.float32
    # the inputs are rounded to float32 (relative 6e-8) and the recursion carries that
    # perturbation through 30 stages: 1e-5 relative to the largest entry
    for a, b in ((got.kK, ref.kK), (got.Vxx, ref.Vxx), (got.dV, ref.dV)):
        assert (a.double() - b).abs().max() <= 1e-5 * b.abs().max()


def _pendulum(nonconvex=False):
    dt = 0.05

    def f(x, u, t):
        return torch.stack([x[..., 0] + dt * x[..., 1],
                            x[..., 1] + dt * (-9.81 * torch.sin(x[..., 0]) + u[..., 0])], -1)

    def running(x, u, t):
        c = 1e-2 * (x ** 2).sum(-1) + 1e-2 * (u ** 2).sum(-1)
        return c - 0.5 * torch.cos(3 * u[..., 0]) * 1e-2 if nonconvex else c

    def terminal(x):
        return 10.0 * ((x[..., 0] - math.pi) ** 2 + x[..., 1] ** 2)

    return f, trajopt.Cost(running, terminal)


def _spy(monkeypatch):
    """Record (mu, with limits) of every compiled pass."""
    calls = []
    real = compiledpass.compiled_recursion

    def spy(*a):
        calls.append((a[5].clone(), a[6] is not None))
        return real(*a)
    monkeypatch.setattr(compiledpass, "compiled_recursion", spy)
    return calls


def _planar(T=40):
    """Two controls: a point mass in the plane pushed towards (1, 1) by a bounded force
    with a nonconvex running cost (the box QP with m = 2: projected Newton)."""
    dt = 0.1

    def f(x, u, t):
        return torch.cat([x[..., :2] + dt * x[..., 2:], x[..., 2:] + dt * u], -1)

    def running(x, u, t):
        return 1e-2 * (u ** 2).sum(-1) + 1e-2 * torch.sin(3 * x[..., 0]) ** 2

    def terminal(x):
        return 20.0 * ((x[..., :2] - 1) ** 2).sum(-1) + (x[..., 2:] ** 2).sum(-1)

    return f, trajopt.Cost(running, terminal), 4, 2


CASES = {  # name: (problem, batch, limits or None)
    "one": (_pendulum, 1, None),
    "batch": (_pendulum, 4, None),
    "nonconvex": (lambda: _pendulum(True), 3, None),
    "limits m=1": (_pendulum, 3, 2.0),
    "limits m=2": (_planar, 3, 0.2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_ddp_takes_the_compiled_pass_and_matches_the_recursion(case, monkeypatch):
    make, B, bound = CASES[case]
    f, cost, *sizes = make()
    n, m = sizes if sizes else (2, 1)
    x0 = torch.zeros(B, n, **F64) + 0.1 * torch.arange(B, **F64)[:, None]
    us0 = torch.zeros(B, 40 if sizes else 60, m, **F64)
    kw = {} if bound is None else dict(
        control_limits=(-bound * torch.ones(m, **F64), bound * torch.ones(m, **F64)))
    calls = _spy(monkeypatch)
    res = trajopt.solve_ddp(f, cost, x0, us0, **kw)
    assert calls  # taken by default
    with monkeypatch.context() as mp:
        mp.setenv("TRAJOPT_COMPILED", "0")
        n_calls = len(calls)
        ref = trajopt.solve_ddp(f, cost, x0, us0, **kw)
        assert len(calls) == n_calls  # switched off
    assert all(limited == (bound is not None) for _, limited in calls)
    if case == "nonconvex":  # some pass ran regularized, through the compiled loop
        assert any(bool(mu.gt(0).any()) for mu, _ in calls)
    if bound is not None:  # the limits are active in the solution
        assert bool((res.us.abs() >= bound * (1 - 1e-12)).any())
    assert res.iterations.tolist() == ref.iterations.tolist()
    assert res.reason.tolist() == ref.reason.tolist()
    assert (res.us - ref.us).abs().max() <= 1e-9 * ref.us.abs().max()
    assert (res.K - ref.K).abs().max() <= 1e-9 * ref.K.abs().max()
    assert (res.cost - ref.cost).abs().max() <= 1e-12 * ref.cost.abs().max()


@pytest.mark.parametrize("case", ["players", "ddp", "batch", "grad", "off", "no numba"])
def test_the_rule_leaves_the_compiled_pass_out(case, monkeypatch):
    calls = _spy(monkeypatch)
    f, cost = _pendulum()
    B = 2 if case == "batch" else 1
    kw = {}
    if case == "batch":  # 2 * (2 + 1)^3 = 54 over the bound
        monkeypatch.setattr(compiled, "MAX_WORK", 53)
    if case == "ddp":
        kw["mode"] = "ddp"
    if case == "off":
        monkeypatch.setenv("TRAJOPT_COMPILED", "0")
    if case == "no numba":
        monkeypatch.setattr(compiled, "kernels", lambda: None)
    if case == "grad":
        F = torch.zeros(20, 1, 2, 3, **F64, requires_grad=True)
        assert not compiled_pays(20, 1, 2, 1, F)
        assert compiled_pays(20, 1, 2, 1, F.detach())
        return
    if case == "players":  # an approximate player's curvature: its own box QP
        class Approx(GTDDPSolver):
            def player_curvature(self, t, i, block):
                return 2 * block
        Approx(f, cost, players=[1], max_iter=2, control_limits=(
            -torch.ones(1, **F64), torch.ones(1, **F64))).solve(
            torch.zeros(1, 2, **F64), torch.zeros(1, 30, 1, **F64))
        assert calls == []
        return
    trajopt.solve_ddp(f, cost, torch.zeros(B, 2, **F64), torch.zeros(B, 30, 1, **F64),
                      max_iter=2, **kw)
    assert calls == []


def test_the_rule_by_size_device_and_dtype():
    x = torch.zeros(3, **F64)
    work = compiled.MAX_WORK
    assert compiled_pays(100, work // 11 ** 3, 8, 3, x)
    assert not compiled_pays(100, work // 11 ** 3 + 1, 8, 3, x)
    assert not compiled_pays(100, 1, 8, 3, x.to(torch.complex128))
    assert not compiled_pays(100, 1, 8, 3, x.half())
    assert not compiled_pays(100, 1, 8, 3, torch.zeros(3, device="meta"))


# ---------------------------------------------------------------- the compiled rollout

def _loop(A, B, c, ff, K, xbar, x0):
    """The law on the dynamics, one stage at a time in plain torch (float64)."""
    xs, us = [x0], []
    def at(v, t):
        return None if v is None else v[t if v.shape[0] > 1 else 0]
    for t in range(ff.shape[0]):
        u = ff[t] if K is None else ff[t] + ((xs[-1] - xbar[t]).unsqueeze(1) @
                                             K[t].transpose(-1, -2)).squeeze(1)
        x = xs[-1] @ at(A, t).T + u @ at(B, t).T
        xs.append(x if c is None else x + at(c, t))
        us.append(u)
    return torch.stack(xs), torch.stack(us)


@settings(max_examples=examples(30), deadline=None)
@given(T=st.integers(1, 40), n=st.integers(1, 5), m=st.integers(1, 3),
       B=st.integers(1, 3), varying=st.booleans(), offset=st.booleans(),
       closed=st.booleans(), seed=st.integers(0, 2**16))
def test_compiled_rollout_equals_the_loop(T, n, m, B, varying, offset, closed, seed):
    g = torch.Generator().manual_seed(seed)
    S = T if varying else 1
    A = torch.eye(n, **F64) + 0.3 * torch.randn(S, n, n, generator=g, **F64) / n ** 0.5
    Bm = torch.randn(S, n, m, generator=g, **F64)
    c = torch.randn(S, n, generator=g, **F64) if offset else None
    ff = torch.randn(T, B, m, generator=g, **F64)
    K = -0.3 * torch.randn(T, B, m, n, generator=g, **F64) if closed else None
    xbar = torch.randn(T, B, n, generator=g, **F64) if closed else None
    x0 = torch.randn(B, n, generator=g, **F64)
    xs, us = compiled_rollout(A, Bm, c, ff, K, xbar, x0)
    rx, ru = _loop(A, Bm, c, ff, K, xbar, x0)
    # the same loop; only the order of each stage's sums differs (a few eps per stage,
    # carried by the dynamics over T stages)
    assert torch.allclose(xs, rx, rtol=0, atol=1e-12 * float(rx.abs().max()))
    assert torch.allclose(us, ru, rtol=0, atol=1e-12 * float(ru.abs().max()))
    x32, u32 = compiled_rollout(*(None if v is None else v.float()
                                  for v in (A, Bm, c, ff, K, xbar, x0)))
    assert x32.dtype == torch.float32 and torch.isfinite(x32).all()


def test_ddp_with_linear_dynamics_takes_the_compiled_loop_and_equals_the_callable(
        monkeypatch):
    import trajopt.ddp.chain as chain_mod
    from tests.trajopt.test_linear_rollout import _as_callable, linear_problem
    seen = []
    real = chain_mod.compiled_rollout

    def spy(*a):
        seen.append(a[4] is not None)  # closed loop
        return real(*a)
    monkeypatch.setattr(chain_mod, "compiled_rollout", spy)
    for varying, offset, batch in [(False, False, 1), (True, True, 3)]:
        A, B, c, cost, x0, us0 = linear_problem(varying, offset, batch)
        ref = trajopt.solve_ddp(trajopt.Dynamics(_as_callable(A, B, c)), cost, x0, us0)
        seen.clear()
        got = trajopt.solve_ddp(trajopt.LinearDynamics(A, B, c), cost, x0, us0)
        assert seen[0] is False and True in seen  # the open loop, then a forward pass
        assert torch.equal(got.iterations, ref.iterations) and bool(got.converged.all())
        scale = float(ref.xs.abs().max())
        assert torch.allclose(got.xs, ref.xs, rtol=0, atol=1e-13 * scale)
        assert torch.allclose(got.us, ref.us, rtol=0, atol=1e-13 * scale)
        assert torch.allclose(got.cost, ref.cost, rtol=1e-13, atol=0)


# ---------------------------------------------------------------- solve_lqr

def test_solve_lqr_takes_the_compiled_loop_and_equals_the_kkt_solution(monkeypatch):
    """A batch (3, 2) of stacked problems with cross terms, offsets and linear terms:
    the compiled loop's values equal the dense KKT solution, its gains the torch
    recursion's; an indefinite stage still raises, naming the stage."""
    import trajopt.lqr.exact_pass as exact_pass
    from tests.reference.lqr_kkt import NpStage, kkt_solve
    from tests.trajopt.test_lqr_finite import _stacked
    from trajopt.errors import NotPositiveDefiniteError
    seen = []
    real = exact_pass.compiled_recursion

    def spy(*a):
        out = real(*a)
        seen.append(bool(out.ok.all()))
        return out
    monkeypatch.setattr(exact_pass, "compiled_recursion", spy)
    rng = np.random.default_rng(2)
    data = _stacked(rng, (3, 2), 20, 4, 2)
    x0 = rng.normal(size=(3, 2, 4))
    sol = trajopt.solve_lqr(trajopt.LQR(**data), x0)
    assert seen == [True]
    with monkeypatch.context() as mp:
        mp.setenv("TRAJOPT_COMPILED", "0")
        mp.setattr("trajopt.riccati.scan.MAX_WORK", 0)
        ref = trajopt.solve_lqr(trajopt.LQR(**data), x0)
    for field in ("K", "k", "P", "p", "xs", "us", "cost"):
        np.testing.assert_allclose(getattr(sol, field), getattr(ref, field), rtol=1e-10,
                                   atol=1e-10 * np.abs(getattr(ref, field)).max())
    for i in range(3):
        for j in range(2):
            one = {k: v[i, j] for k, v in data.items() if k not in ("QT", "qT")}
            stages = [NpStage(**{k: v[t] for k, v in one.items()}) for t in range(20)]
            xs, us, value = kkt_solve(stages, data["QT"], data["qT"], x0[i, j])
            assert abs(sol.cost[i, j] - value) <= 1e-10 * max(1.0, abs(value))
            np.testing.assert_allclose(sol.us[i, j], np.stack(us), rtol=0,
                                       atol=1e-10 * np.abs(us).max())
    data["R"] = data["R"].copy()
    data["R"][1, 0, 7] = -50 * np.eye(2)
    with pytest.raises(NotPositiveDefiniteError, match="stage 7"):
        trajopt.solve_lqr(trajopt.LQR(**data))
    assert seen[-1] is False  # refused by the compiled loop, named by the recursion


def test_without_numba_the_solvers_warn_once_and_use_the_torch_recursion(monkeypatch):
    import sys

    import trajopt.riccati as riccati
    monkeypatch.setitem(sys.modules, "trajopt.riccati._kernels", None)  # import fails
    monkeypatch.delattr(riccati, "_kernels", raising=False)
    compiled.kernels.cache_clear()
    try:
        with pytest.warns(RuntimeWarning, match="numba could not be imported"):
            assert not compiled.compiled_available()
        f, cost = _pendulum()
        res = trajopt.solve_ddp(f, cost, torch.zeros(1, 2, **F64),
                                torch.zeros(1, 30, 1, **F64), max_iter=3)
        assert torch.isfinite(res.us).all()
    finally:
        monkeypatch.undo()
        compiled.kernels.cache_clear()
    assert compiled.compiled_available()
