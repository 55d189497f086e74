"""The parallel scan of the LQ value functions (trajopt.riccati.scan) and the iLQR backward
pass built on it (trajopt.ddp.scanpass), float64:

* the scan's values equal the textbook recursion and the dense KKT solution of
  ``tests/reference/lqr_kkt.py`` (cross terms, linear terms, offsets, batches; hypothesis);
* a backward pass by the scan equals the recursion's (gains, values, expected change, ok
  flags), including elements whose Q_uu is not positive definite;
* whole DDP solves take the scan by default where the rule says so, and give the
  recursion's result; the rule leaves it out for regularized passes, limits, second-order
  dynamics and large batches; an inconsistent scan falls back to the recursion.
"""

import math

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
import trajopt.ddp.scanpass as scanpass
from tests._hypothesis import examples
from tests.reference.lqr_kkt import kkt_value, random_stages, riccati_numpy
from trajopt.riccati.expansion import DenseStage, DenseStages, joint_blocks
from trajopt.riccati.policy import CholeskyGains
from trajopt.riccati.scan import scan_values, stacked_stages

F64 = dict(dtype=torch.float64)


@pytest.fixture(autouse=True)
def _no_compiled_pass(monkeypatch):
    """The DDP solves here are about the scan: the compiled recursion, which the solver
    tries first for small problems on the CPU (trajopt.ddp.compiledpass), is switched
    off by its documented environment variable."""
    monkeypatch.setenv("TRAJOPT_COMPILED", "0")


def _scanned_problem(seed, n, m, T):
    """One random problem (stages, QT, qT) with n states, m controls, T stages, and the
    scan of its values (batch 1)."""
    stages, QT, qT = random_stages(np.random.default_rng(seed), [n] * (T + 1), [m] * T)
    F, L, c = _packed([stages], n, m)
    vals = scan_values(F, L, n, torch.tensor(qT)[None], torch.tensor(QT)[None], c)
    return stages, QT, qT, vals


def _packed(stage_lists, n, m):
    """F (T, B, n, n+m), L (T, B, n+m, 1+n+m), c (T, B, n) of B problems."""
    Fs, Ls, cs = [], [], []
    for t in range(len(stage_lists[0])):
        per = [p[t] for p in stage_lists]

        def col(name, shape, per=per):
            return torch.tensor(np.stack([np.zeros(shape) if getattr(s, name) is None
                                          else getattr(s, name) for s in per]), **F64)
        F, L = joint_blocks(col("A", (n, n)), col("B", (n, m)), col("q", n), col("r", m),
                            col("Q", (n, n)), col("R", (m, m)), col("M", (m, n)))
        Fs.append(F)
        Ls.append(L)
        cs.append(col("c", n))
    return torch.stack(Fs), torch.stack(Ls), torch.stack(cs)


@settings(max_examples=examples(40), deadline=None)
@given(T=st.integers(1, 40), n=st.integers(1, 5), m=st.integers(1, 3),
       B=st.integers(1, 3), cross=st.booleans(), linear=st.booleans(),
       offset=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_scan_equals_the_textbook_recursion(T, n, m, B, cross, linear, offset, seed):
    rng = np.random.default_rng(seed)
    probs = [random_stages(rng, [n] * (T + 1), [m] * T, cross=cross, linear=linear,
                           offset=offset) for _ in range(B)]
    F, L, c = _packed([p[0] for p in probs], n, m)
    QT = torch.tensor(np.stack([p[1] for p in probs]), **F64)
    qT = torch.tensor(np.stack([np.zeros(n) if p[2] is None else p[2] for p in probs]), **F64)
    vals = scan_values(F, L, n, qT, QT, c if offset else None)
    assert vals.ok.all()
    for b, (stages, QTb, qTb) in enumerate(probs):
        _, _, Ps, ps = riccati_numpy(stages, QTb, qTb)
        for t in range(T + 1):
            P, p = torch.tensor(Ps[t]), torch.tensor(ps[t])
            assert (vals.Vxx[t, b] - P).abs().max() <= 1e-10 * (1 + P.abs().max())
            assert (vals.Vx[t, b] - p).abs().max() <= 1e-10 * (1 + p.abs().max() + P.abs().max())


def test_scan_equals_the_kkt_values():
    """Independent of any recursion: the value of the tail problem from the dense KKT."""
    T = 9
    stages, QT, qT, vals = _scanned_problem(3, 3, 2, T)
    for t in (0, 4, T - 1):
        P, p = kkt_value(stages, QT, qT, t)
        assert np.abs(vals.Vxx[t, 0].numpy() - P).max() <= 1e-10 * np.abs(P).max()
        assert np.abs(vals.Vx[t, 0].numpy() - p).max() <= 1e-10 * np.abs(P).max()


def test_scan_flags_a_singular_control_cost():
    rng = np.random.default_rng(4)
    n, m, T = 2, 2, 5
    probs = [random_stages(rng, [n] * (T + 1), [m] * T) for _ in range(2)]
    probs[1][0][2].R[:] = 0.0  # element 1, stage 2: R = 0 (Q_uu = B'PB may still be PD)
    F, L, c = _packed([p[0] for p in probs], n, m)
    QT = torch.tensor(np.stack([p[1] for p in probs]))
    vals = scan_values(F, L, n, torch.zeros(2, n, **F64), QT, c)
    assert vals.ok.tolist() == [True, False]


def _stages(T, B, n, m, seed, indefinite=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.eye(n, **F64) + 0.2 * torch.randn(T, B, n, n, generator=g, **F64)
    Bm = torch.randn(T, B, n, m, generator=g, **F64)
    W = torch.randn(T, B, n + m, n + m, generator=g, **F64)
    H = W @ W.transpose(-1, -2) / (n + m) + 0.1 * torch.eye(n + m, **F64)
    if indefinite:  # element 0, a concave state cost: Q_uu = R + B'V B fails somewhere
        H[:, 0, :n, :n] -= 3.0 * torch.eye(n, **F64)
    F, L = joint_blocks(A, Bm, torch.randn(T, B, n, generator=g, **F64),
                        torch.randn(T, B, m, generator=g, **F64), H[..., :n, :n],
                        H[..., n:, n:], H[..., n:, :n])
    return [DenseStage(F[t], L[t], n) for t in range(T)]


@pytest.mark.parametrize("indefinite", [False, True])
def test_backward_pass_by_the_scan_equals_the_recursion(indefinite, monkeypatch):
    T, B, n, m = 30, 3, 3, 2
    stages = _stages(T, B, n, m, 5, indefinite)
    g = torch.Generator().manual_seed(6)
    Vx = torch.randn(B, n, generator=g, **F64)
    Vxx = torch.eye(n, **F64).expand(B, n, n).clone()
    mu = torch.zeros(B, **F64)
    solver = trajopt.DDPSolver(lambda x, u, t: x, trajopt.QuadraticCost(
        torch.eye(n, **F64), torch.eye(m, **F64), torch.eye(n, **F64)))
    assert scanpass.scan_applies(stages, CholeskyGains(mu), mu, None)
    scan = scanpass.scan_backward_pass(stages, Vx, Vxx, CholeskyGains(mu))
    monkeypatch.setattr("trajopt.riccati.scan.MAX_WORK", 0)
    ref = solver.backward_pass(stages, Vx, Vxx, mu, None)
    assert scan is not None
    assert scan.ok.tolist() == ref.ok.tolist()
    assert ref.ok.tolist() == [not indefinite, True, True]  # the case is what it claims
    good = ref.ok
    for t in range(T):
        scale = 1 + ref.K[t][good].abs().max()
        assert (scan.K[t][good] - ref.K[t][good]).abs().max() <= 1e-10 * scale
        assert (scan.k[t][good] - ref.k[t][good]).abs().max() <= 1e-10 * (
            1 + ref.k[t][good].abs().max())
        assert (scan.Vxx[t][good] - ref.Vxx[t][good]).abs().max() <= 1e-10 * (
            1 + ref.Vxx[t][good].abs().max())
        assert (scan.Vx[t][good] - ref.Vx[t][good]).abs().max() <= 1e-10 * (
            1 + ref.Vx[t][good].abs().max())
    assert (scan.dV[good] - ref.dV[good]).abs().max() <= 1e-10 * ref.dV[good].abs().max()


def _pendulum():
    dt = 0.05

    def f(x, u, t):
        return torch.stack([x[..., 0] + dt * x[..., 1],
                            x[..., 1] + dt * (-9.81 * torch.sin(x[..., 0]) + u[..., 0])], -1)

    def running(x, u, t):
        return 1e-2 * (x ** 2).sum(-1) + 1e-2 * (u ** 2).sum(-1)

    def terminal(x):
        return 10.0 * ((x[..., 0] - math.pi) ** 2 + x[..., 1] ** 2)

    return f, trajopt.Cost(running, terminal)


def _solve(monkeypatch, B=1, work=None, consistency=None, calls=None, **kw):
    monkeypatch.undo()
    monkeypatch.setenv("TRAJOPT_COMPILED", "0")  # undone above: see _no_compiled_pass
    if work is not None:
        monkeypatch.setattr("trajopt.riccati.scan.MAX_WORK", work)
    if consistency is not None:
        monkeypatch.setattr("trajopt.riccati.scan.AGREEMENT", consistency)
    if calls is not None:
        original = scanpass.scan_backward_pass

        def counted(*a, **k):
            pol = original(*a, **k)
            calls.append(pol is not None)
            return pol
        monkeypatch.setattr("trajopt.ddp.solver.scan_backward_pass", counted)
    f, cost = _pendulum()
    x0 = torch.zeros(B, 2, **F64) + 0.1 * torch.arange(B, **F64)[:, None]
    return trajopt.solve_ddp(f, cost, x0, torch.zeros(B, 60, 1, **F64), **kw)


@pytest.mark.parametrize("B", [1, 4])
def test_ddp_takes_the_scan_by_default_and_matches_the_recursion(B, monkeypatch):
    calls = []
    res = _solve(monkeypatch, B, calls=calls)
    ref = _solve(monkeypatch, B, work=0)
    assert calls and all(calls)  # taken, and accepted, on every pass it applied to
    assert res.iterations.tolist() == ref.iterations.tolist()
    assert (res.us - ref.us).abs().max() <= 1e-9 * ref.us.abs().max()
    assert (res.K - ref.K).abs().max() <= 1e-9 * ref.K.abs().max()
    assert (res.cost - ref.cost).abs().max() <= 1e-12 * ref.cost.abs().max()


def test_an_inconsistent_scan_falls_back_to_the_recursion(monkeypatch):
    calls = []
    res = _solve(monkeypatch, 1, consistency=-1.0, calls=calls)
    ref = _solve(monkeypatch, 1, work=0)
    assert calls == [False]  # tried once, refused: the recursion for the rest of the solve
    assert int(res.iterations) > 1
    assert torch.equal(res.us, ref.us) and torch.equal(res.K, ref.K)


def test_a_refused_scan_is_tried_again_in_the_next_solve(monkeypatch):
    """A solver keeps to the recursion after one refusal within a solve (an ill-conditioned
    problem's scans are refused pass after pass: the cart-pole's 288 of 303, each a wasted
    scan), and tries the scan again in its next solve (an MPC step, an augmented
    Lagrangian's next inner solve)."""
    calls = []
    _solve(monkeypatch, 1, consistency=-1.0, calls=calls)  # installs the counting spy
    f, cost = _pendulum()
    solver = trajopt.DDPSolver(f, cost)
    calls.clear()
    for _ in range(2):
        solver.solve(torch.zeros(1, 2, **F64), torch.zeros(1, 60, 1, **F64))
    assert calls == [False, False]


@pytest.mark.parametrize("case", ["limits", "ddp"])
def test_the_rule_leaves_the_scan_out(case, monkeypatch):
    calls = []
    kw = {"limits": dict(control_limits=(-3.0, 3.0)), "ddp": dict(mode="ddp")}[case]
    _solve(monkeypatch, 1, calls=calls, **kw)
    assert calls == []


def test_the_rule_needs_zero_regularization_many_stages_and_a_small_batch():
    stages = _stages(20, 1, 2, 1, 7)
    zero = torch.zeros(1, **F64)
    assert scanpass.scan_applies(stages, CholeskyGains(zero), zero, None)
    mu = torch.full((1,), 1e-3, **F64)
    assert not scanpass.scan_applies(stages, CholeskyGains(mu), mu, None)
    assert not scanpass.scan_applies(stages[:10], CholeskyGains(zero), zero, None)
    big = _stages(20, 29, 2, 1, 7)  # 29 * 3^2 = 261 > MAX_WORK
    zero = torch.zeros(29, **F64)
    assert not scanpass.scan_applies(big, CholeskyGains(zero), zero, None)
    assert scanpass.scan_applies([s.select(slice(0, 28)) for s in big],
                                 CholeskyGains(zero[:28]), zero[:28], None)


def _lqr(T, B, n, m, seed, indefinite_at=None):
    rng = np.random.default_rng(seed)
    probs = [random_stages(rng, [n] * (T + 1), [m] * T) for _ in range(B)]
    if indefinite_at is not None:  # R_t + B'P B indefinite at that stage
        for p in probs:
            p[0][indefinite_at].R[:] = -50.0 * np.eye(m)
    st = [p[0] for p in probs]

    def arr(name):
        return np.stack([np.stack([getattr(s, name) for s in stages]) for stages in st])
    return trajopt.LQR(A=arr("A"), B=arr("B"), Q=arr("Q"), R=arr("R"), M=arr("M"),
                       q=arr("q"), r=arr("r"), c=arr("c"),
                       QT=np.stack([p[1] for p in probs]), qT=np.stack([p[2] for p in probs]))


def _counting(monkeypatch, calls):
    import trajopt.lqr.finite as finite
    original = finite.scan_backward

    def counted(*a, **k):
        out = original(*a, **k)
        calls.append(out is not None)
        return out
    monkeypatch.setattr(finite, "scan_backward", counted)


@pytest.mark.parametrize("B", [1, 3])
def test_solve_lqr_takes_the_scan_and_equals_the_recursion_and_the_kkt(B, monkeypatch):
    _scan_equals_the_recursion(_lqr(40, B, 3, 2, 8),
                               np.random.default_rng(9).normal(size=(B, 3)), monkeypatch)


def _scan_equals_the_recursion(prob, x0, monkeypatch):
    """``solve_lqr`` takes the scan by default and equals the recursion (forced), shapes
    included, to 1e-10 relative."""
    calls = []
    _counting(monkeypatch, calls)
    sol = trajopt.solve_lqr(prob, x0)
    monkeypatch.setattr("trajopt.riccati.scan.MAX_WORK", 0)
    ref = trajopt.solve_lqr(prob, x0)
    assert calls == [True, False]
    for a, b in ((sol.K, ref.K), (sol.k, ref.k), (sol.P, ref.P), (sol.p, ref.p),
                 (sol.xs, ref.xs), (sol.us, ref.us), (sol.cost, ref.cost)):
        assert a.shape == b.shape
        assert np.abs(a - b).max() <= 1e-10 * (1 + np.abs(b).max())


@pytest.mark.parametrize("shared", ["QT", "QT and Q, R"])
def test_solve_lqr_takes_the_scan_with_arrays_shared_by_the_batch(shared, monkeypatch):
    """A batch of dynamics with one terminal cost (and one stage cost) for all of them:
    the terminal value and the cost blocks are broadcast to the batch and the scan is
    taken (it was skipped before: an unbatched QT did not match the stages' batch)."""
    rng = np.random.default_rng(10)
    T, n, m, B = 40, 3, 2, 3
    lead = (B, T) if shared == "QT" else (T,)
    Q, R = np.broadcast_to(np.eye(n), (*lead, n, n)), np.broadcast_to(np.eye(m), (*lead, m, m))
    prob = trajopt.LQR(A=np.eye(n) + 0.2 * rng.normal(size=(B, T, n, n)),
                       B=rng.normal(size=(B, T, n, m)), Q=Q, R=R, QT=2 * np.eye(n))
    _scan_equals_the_recursion(prob, rng.normal(size=(B, n)), monkeypatch)


def test_solve_lqr_still_names_the_indefinite_stage(monkeypatch):
    from trajopt.errors import NotPositiveDefiniteError
    calls = []
    _counting(monkeypatch, calls)
    with pytest.raises(NotPositiveDefiniteError, match="stage 30"):
        trajopt.solve_lqr(_lqr(40, 1, 3, 2, 10, indefinite_at=30))
    assert calls == [False]  # tried, declined: the recursion raised


def test_solve_lqr_gradients_through_the_scan_equal_the_recursion(monkeypatch):
    prob = _lqr(20, 1, 2, 1, 11)
    QT = torch.tensor(prob.QT, requires_grad=True)
    A = torch.tensor(prob.A, requires_grad=True)

    def grads():
        p = trajopt.LQR(A=A, B=torch.tensor(prob.B), Q=torch.tensor(prob.Q),
                        R=torch.tensor(prob.R), QT=QT)
        sol = trajopt.solve_lqr(p)
        return torch.autograd.grad(sol.K.square().sum() + sol.P[..., 0, :, :].sum(), (QT, A))
    g = grads()
    monkeypatch.setattr("trajopt.riccati.scan.MAX_WORK", 0)
    r = grads()
    # QT is symmetric: only the symmetric part of its gradient is defined by the problem
    # (the recursion and the scan read the matrix in different orders, so the skew parts
    # of their raw gradients differ); A has no such freedom
    sym = [0.5 * (v + v.transpose(-1, -2)) for v in (g[0], r[0])]
    for a, b in ((sym[0], sym[1]), (g[1], r[1])):
        assert (a - b).abs().max() <= 1e-10 * (1 + b.abs().max())


def test_agreement_reads_both_value_derivatives():
    vals = _scanned_problem(12, 3, 2, 20)[3]
    Vx, Vxx = vals.Vx[:-1].clone(), vals.Vxx[:-1].clone()
    valid = torch.ones(1, dtype=torch.bool)
    assert vals.agrees(Vx, Vxx, valid)
    bumped = Vx.clone()
    bumped[5, 0, 1] *= 1 + 1e-9
    assert not vals.agrees(bumped, Vxx, valid)
    bumped = Vxx.clone()
    bumped[5, 0, 1, 1] *= 1 + 1e-9
    assert not vals.agrees(Vx, bumped, valid)
    assert vals.agrees(bumped, bumped * 0, ~valid)  # invalid elements are the caller's


@pytest.mark.parametrize("how", ["reg", "solver"])
def test_solve_lqr_with_reg_or_a_solver_keeps_the_recursion(how, monkeypatch):
    from trajopt.riccati.solvers import CholeskySolver
    prob = _lqr(40, 1, 3, 2, 13)
    calls = []
    _counting(monkeypatch, calls)
    kw = dict(reg=10.0) if how == "reg" else dict(solver=CholeskySolver(reg=10.0))
    sol = trajopt.solve_lqr(prob, **kw)
    exact = trajopt.solve_lqr(prob)
    assert calls == [True]  # only the exact solve took the scan
    assert np.abs(sol.K - exact.K).max() > 1e-3  # the regularization is in the answer



@pytest.mark.parametrize("second_order", [False, True])
def test_stacked_stages_are_the_sequence_of_their_rows(second_order):
    """``DenseStages`` (the DDP loop's derivatives, stacked) reads as the list of
    ``DenseStage`` views of its rows (index, negative index, slice, iteration, length),
    and ``stacked_stages`` gives the stacked tensors themselves, equal to stacking that
    list; with second-order dynamics terms it gives None (the scan's rule), as for the
    list."""
    g = torch.Generator().manual_seed(3)
    T, B, n, m = 5, 2, 3, 2
    F = torch.randn(T, B, n, n + m, generator=g, **F64)
    L = torch.randn(T, B, n + m, 1 + n + m, generator=g, **F64)
    second = [torch.randn(T, B, n, *s, generator=g, **F64) for s in ((n, n), (m, n), (m, m))] \
        if second_order else [None] * 3
    seq = DenseStages(DenseStage(F, L, n, None, *second))
    rows = [DenseStage(F[t], L[t], n, None, *(None if v is None else v[t] for v in second))
            for t in range(T)]
    assert len(seq) == T and len(list(seq)) == T
    for a, b in zip([*seq, seq[-1], *seq[1:4]], [*rows, rows[-1], *rows[1:4]]):
        for f in ("F", "L", "fxx", "fux", "fuu"):
            x, y = getattr(a, f), getattr(b, f)
            assert (x is None and y is None) or torch.equal(x, y)
        assert a.n == n and a.c is None
    with pytest.raises(IndexError):
        seq[T]
    got, want = stacked_stages(seq), stacked_stages(rows)
    if second_order:
        assert got is None and want is None
    else:
        assert got[0] is F and got[1] is L and got[2] is None
        assert torch.equal(want[0], F) and torch.equal(want[1], L) and want[2] is None


def test_rows_read_as_their_per_stage_list_and_write_through():
    """``Rows`` (a pass's gains and values over all stages) reads as the list of its rows
    and the tail (index, negative index, slice, iteration, length), ``Rows.stack`` hands its
    tensor on without a copy (a list or a tailed Rows: ``torch.stack``), writing into a row
    writes into the stacked tensor, and a solve's result owns its arrays (the packed
    gains are copies, not views of the pass's buffers)."""
    from trajopt.ddp.batch import Rows
    g = torch.Generator().manual_seed(4)
    S, tail = torch.randn(4, 2, 3, generator=g, **F64), torch.randn(2, 3, generator=g, **F64)
    plain, tailed = Rows(S), Rows(S, tail)
    want = list(S.unbind(0))
    assert len(plain) == 4 and len(tailed) == 5
    for got, ref in ((list(plain), want), (list(tailed), want + [tail]),
                     (tailed[1:5], want[1:] + [tail]), ([tailed[-1], plain[-1]], [tail, S[3]])):
        assert len(got) == len(ref) and all(torch.equal(a, b) for a, b in zip(got, ref))
    assert tailed[4] is tail
    for bad in (4, -5):
        with pytest.raises(IndexError):
            plain[bad]
    assert Rows.stack(plain) is S
    assert torch.equal(Rows.stack(tailed), torch.cat([S, tail[None]]))
    assert torch.equal(Rows.stack(want), S)
    plain[2][1] = 7.0
    assert bool((S[2, 1] == 7.0).all())
    assert plain.uniform_shapes and tailed.uniform_shapes
    assert not Rows(S, torch.zeros(3)).uniform_shapes
    # solves through the compiled pass (Rows inside) return arrays of their own
    A = torch.eye(2, **F64) + 0.1 * torch.randn(2, 2, generator=g, **F64)
    dyn = trajopt.LinearDynamics(A, torch.ones(2, 1, **F64))
    cost = trajopt.QuadraticCost(torch.eye(2, **F64), torch.eye(1, **F64), torch.eye(2, **F64))
    for x0 in (torch.ones(2, **F64), torch.randn(3, 2, generator=g, **F64)):
        r = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(*x0.shape[:-1], 20, 1, **F64))
        out = (r.K, r.k, r.Vx, r.Vxx, r.xs, r.us)
        assert len({v.untyped_storage().data_ptr() for v in out}) == len(out)
        assert all(v.is_contiguous() for v in out)


@settings(max_examples=examples(40), deadline=None)
@given(T=st.integers(1, 6), B=st.integers(1, 5), ragged=st.booleans(), mask=st.booleans(),
       seed=st.integers(0, 2**31 - 1))
def test_rows_taken_and_put_as_the_per_stage_loops(T, B, ragged, mask, seed):
    """``take_rows`` / ``put_rows`` (the DDP loop's row selections and merges, one indexing
    of the stacked stages) equal the plain per-stage loops ``[v[idx] for v in values]`` /
    ``dst[t][idx] = src[t]``, bitwise: index or mask, stages of one shape or of different
    widths (the loop then), a :class:`Rows` destination written through."""
    from trajopt.ddp.batch import Rows, put_rows, take_rows
    g = torch.Generator().manual_seed(seed)
    widths = [2 + (t % 2 if ragged else 0) for t in range(T)]
    values = [torch.randn(B, w, generator=g, **F64) for w in widths]
    keep = torch.rand(B, generator=g) < 0.6
    idx = keep if mask else torch.nonzero(keep).flatten()
    got, want = take_rows(values, idx), [v[idx] for v in values]
    assert len(got) == T and all(torch.equal(a, b) for a, b in zip(got, want))
    k = int(keep.sum())
    src = [torch.randn(k, w, generator=g, **F64) for w in widths]
    dst, ref = [v.clone() for v in values], [v.clone() for v in values]
    for a, b in zip(ref, src):
        a[idx] = b
    put_rows(dst, idx, src)
    assert all(torch.equal(a, b) for a, b in zip(dst, ref))
    if not ragged:   # a Rows destination is written through, in place
        S = torch.stack(values).clone()
        put_rows(Rows(S), idx, src)
        assert torch.equal(S, torch.stack(ref))
