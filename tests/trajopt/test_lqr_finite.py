"""Finite-horizon LQR against a dense KKT solve and a plain numpy Riccati recursion."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from tests.reference.lqr_kkt import kkt_solve, kkt_value, random_stages, riccati_numpy
from trajopt.errors import InvalidArgumentError, NotPositiveDefiniteError, NumericalError

RTOL = 1e-9  # float64 identities; the KKT matrix condition number stays < 1e6 here


def _problem(stages, QT, qT, to=np.asarray):
    def opt(name):
        vals = [getattr(s, name) for s in stages]
        return None if vals[0] is None else [to(v) for v in vals]
    return trajopt.LQR(A=[to(s.A) for s in stages], B=[to(s.B) for s in stages],
                       Q=[to(s.Q) for s in stages], R=[to(s.R) for s in stages],
                       M=opt("M"), q=opt("q"), r=opt("r"), c=opt("c"),
                       QT=to(QT), qT=None if qT is None else to(qT))


def _close(a, b, rtol=RTOL):
    a, b = np.asarray(a), np.asarray(b)
    scale = max(1.0, np.abs(b).max())
    assert np.abs(a - b).max() <= rtol * scale, (np.abs(a - b).max(), scale)


@st.composite
def lqr_case(draw):
    T = draw(st.integers(1, 5))
    ns = draw(st.lists(st.integers(1, 4), min_size=T + 1, max_size=T + 1))
    ms = draw(st.lists(st.integers(1, 3), min_size=T, max_size=T))
    flags = draw(st.tuples(st.booleans(), st.booleans(), st.booleans()))
    seed = draw(st.integers(0, 2**31 - 1))
    return ns, ms, flags, seed


@settings(max_examples=examples(60), deadline=None)
@given(lqr_case())
def test_matches_dense_kkt(case):
    ns, ms, (cross, linear, offset), seed = case
    rng = np.random.default_rng(seed)
    stages, QT, qT = random_stages(rng, ns, ms, cross=cross, linear=linear, offset=offset)
    x0 = rng.normal(size=ns[0])
    sol = trajopt.solve_lqr(_problem(stages, QT, qT), x0)
    xs, us, cost = kkt_solve(stages, QT, qT, x0)
    for a, b in zip(sol.xs, xs):
        _close(a, b)
    for a, b in zip(sol.us, us):
        _close(a, b)
    _close(sol.cost, cost)
    for t in range(len(stages) + 1):
        P, p = kkt_value(stages, QT, qT, t)
        _close(sol.P[t], P)
        _close(sol.p[t], p)


def test_matches_numpy_recursion_and_policy_reproduces_trajectory():
    rng = np.random.default_rng(1)
    stages, QT, qT = random_stages(rng, [3, 5, 2, 4], [2, 1, 3])
    sol = trajopt.solve_lqr(_problem(stages, QT, qT), rng.normal(size=3))
    K, k, P, p = riccati_numpy(stages, QT, qT)
    for name, ref in {"K": K, "k": k, "P": P, "p": p}.items():
        for a, b in zip(getattr(sol, name), ref):
            _close(a, b)
    for t in range(3):
        _close(sol.us[t], sol.K[t] @ sol.xs[t] + sol.k[t])
        np.testing.assert_array_equal(sol.P[t], sol.P[t].T)


def _stacked(rng, batch, T, n, m):
    A = rng.normal(size=(*batch, T, n, n)) / np.sqrt(n)
    B = rng.normal(size=(*batch, T, n, m))
    L = rng.normal(size=(*batch, T, n + m, n + m))
    W = L @ np.swapaxes(L, -1, -2) / (n + m) + 0.1 * np.eye(n + m)
    return dict(A=A, B=B, Q=W[..., :n, :n], R=W[..., n:, n:], M=W[..., n:, :n],
                q=rng.normal(size=(*batch, T, n)), r=rng.normal(size=(*batch, T, m)),
                c=rng.normal(size=(*batch, T, n)), QT=np.eye(n), qT=rng.normal(size=n))


def test_batched_equals_looped_and_stacked_equals_list():
    rng = np.random.default_rng(2)
    data = _stacked(rng, (3, 2), 6, 4, 2)
    x0 = rng.normal(size=(3, 2, 4))
    sol = trajopt.solve_lqr(trajopt.LQR(**data), x0)
    assert sol.K.shape == (3, 2, 6, 2, 4) and sol.P.shape == (3, 2, 7, 4, 4)
    assert sol.xs.shape == (3, 2, 7, 4) and sol.us.shape == (3, 2, 6, 2)
    assert sol.cost.shape == (3, 2)
    for i in range(3):
        for j in range(2):
            one = {k: (v[i, j] if v.ndim > 2 and k not in ("QT",) and v.shape[:2] == (3, 2)
                       else v) for k, v in data.items()}
            lists = {k: (list(v) if k not in ("QT", "qT") else v) for k, v in one.items()}
            ref = trajopt.solve_lqr(trajopt.LQR(**lists), x0[i, j])
            for name in ("K", "k", "P", "p", "xs", "us"):
                np.testing.assert_allclose(getattr(sol, name)[i, j],
                                           np.stack(getattr(ref, name)), rtol=1e-12,
                                           atol=1e-12)
            np.testing.assert_allclose(sol.cost[i, j], ref.cost, rtol=1e-12)


def test_shared_problem_broadcasts_over_batch_of_x0():
    rng = np.random.default_rng(3)
    data = _stacked(rng, (), 5, 3, 2)
    x0 = rng.normal(size=(8, 3))
    sol = trajopt.solve_lqr(trajopt.LQR(**data), x0)
    assert sol.K.shape == (5, 2, 3) and sol.xs.shape == (8, 6, 3)
    one = trajopt.solve_lqr(trajopt.LQR(**data), x0[5])
    np.testing.assert_allclose(sol.xs[5], one.xs, rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("path", ["compiled", "scan", "recursion"])
@pytest.mark.parametrize("name", ["c", "q", "r", "qT"])
def test_a_batch_carried_by_one_linear_term_equals_the_elements(name, path, monkeypatch):
    """One system, T = 20, with a batch of 4 in only one of c, q, r, qT (a batch of
    references or disturbances): each element equals the same problem solved alone, by
    the compiled loop, the values' scan and the recursion (before, c and qT raised a
    RuntimeError from an expand in the Q expansion, not naming the argument)."""
    if path != "compiled":
        monkeypatch.setenv("TRAJOPT_COMPILED", "0")
    if path == "recursion":
        monkeypatch.setattr("trajopt.riccati.scan.MAX_WORK", 0)
    rng = np.random.default_rng(12)
    data = _stacked(rng, (), 20, 3, 2)
    core = {"c": 3, "q": 3, "r": 2, "qT": 3}[name]
    data[name] = rng.normal(size=(4, core) if name == "qT" else (4, 20, core))
    x0 = rng.normal(size=3)
    sol = trajopt.solve_lqr(trajopt.LQR(**data), x0)
    assert sol.K.shape == (4, 20, 2, 3) and sol.xs.shape == (4, 21, 3)
    for i in range(4):
        ref = trajopt.solve_lqr(trajopt.LQR(**dict(data, **{name: data[name][i]})), x0)
        for field in ("K", "k", "P", "p", "xs", "us", "cost"):
            np.testing.assert_allclose(getattr(sol, field)[i], getattr(ref, field),
                                       rtol=1e-12, atol=1e-12)
    # gradients of the summed cost (the adjoint LQR): the elements' own, x0's summed
    term = torch.tensor(data[name], requires_grad=True)
    x0t = torch.tensor(x0, requires_grad=True)
    tdata = {k: torch.tensor(v) for k, v in data.items()}
    cost = trajopt.solve_lqr(trajopt.LQR(**dict(tdata, **{name: term})), x0t).cost
    g_term, g_x0 = torch.autograd.grad(cost.sum(), (term, x0t))
    g_sum = torch.zeros_like(g_x0)
    for i in range(4):
        one, x1 = term[i].detach().requires_grad_(), x0t.detach().requires_grad_()
        c1 = trajopt.solve_lqr(trajopt.LQR(**dict(tdata, **{name: one})), x1).cost
        g1, gx = torch.autograd.grad(c1, (one, x1))
        torch.testing.assert_close(g_term[i], g1, rtol=1e-12, atol=1e-12)
        g_sum += gx
    torch.testing.assert_close(g_x0, g_sum, rtol=1e-12, atol=1e-12)


def test_numpy_equals_torch_and_types_follow_input():
    rng = np.random.default_rng(4)
    data = _stacked(rng, (2,), 4, 3, 2)
    x0 = rng.normal(size=(2, 3))
    sn = trajopt.solve_lqr(trajopt.LQR(**data), x0)
    st_ = trajopt.solve_lqr(trajopt.LQR(**{k: torch.tensor(v) for k, v in data.items()}),
                            torch.tensor(x0))
    assert isinstance(sn.K, np.ndarray) and sn.K.dtype == np.float64
    assert isinstance(st_.K, torch.Tensor) and st_.K.dtype == torch.float64
    for name in ("K", "k", "P", "p", "xs", "us", "cost"):
        np.testing.assert_allclose(getattr(sn, name), getattr(st_, name).numpy(),
                                   rtol=1e-13, atol=1e-13)
    s32 = trajopt.solve_lqr(trajopt.LQR(**{k: torch.tensor(v, dtype=torch.float32)
                                           for k, v in data.items()}),
                            torch.tensor(x0, dtype=torch.float32))
    assert s32.K.dtype == torch.float32
    # float32 agrees to single precision (loose by design: eps_32 ~ 1e-7, T = 4 steps)
    np.testing.assert_allclose(s32.xs.numpy(), sn.xs, rtol=1e-4, atol=1e-4)


def test_rollout_of_optimal_controls_gives_same_cost_and_perturbation_increases_it():
    rng = np.random.default_rng(5)
    data = _stacked(rng, (), 7, 3, 2)
    prob = trajopt.LQR(**data)
    x0 = rng.normal(size=3)
    sol = trajopt.solve_lqr(prob, x0)
    tr = trajopt.rollout(prob, x0, sol.us)
    np.testing.assert_allclose(tr.xs, sol.xs, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(tr.cost, sol.cost, rtol=1e-12)
    worse = trajopt.rollout(prob, x0, sol.us + 1e-3 * rng.normal(size=sol.us.shape))
    assert worse.cost > sol.cost


def test_regularization_and_indefinite_stage_named():
    rng = np.random.default_rng(6)
    data = _stacked(rng, (), 4, 3, 2)
    data["R"] = data["R"].copy()
    data["R"][2] = -10 * np.eye(2)
    with pytest.raises(NotPositiveDefiniteError, match="stage 2") as info:
        trajopt.solve_lqr(trajopt.LQR(**data))
    assert info.value.stage == 2
    sol = trajopt.solve_lqr(trajopt.LQR(**data), reg=1e3)
    assert np.isfinite(sol.K).all()
    # regularized gains equal the exact gains of the problem with R + reg I at that step
    data2 = _stacked(np.random.default_rng(7), (), 3, 2, 2)
    reg = 0.7
    a = trajopt.solve_lqr(trajopt.LQR(**data2), reg=reg)
    b_data = dict(data2, R=data2["R"] + reg * np.eye(2))
    b = trajopt.solve_lqr(trajopt.LQR(**b_data))
    np.testing.assert_allclose(a.K[-1], b.K[-1], rtol=1e-12)


@pytest.mark.parametrize("reg", [-0.5, float("nan"), float("inf"), "0.1"])
def test_a_negative_or_non_finite_reg_is_refused_by_name(reg):
    """reg < 0 solved another problem silently (R + reg I); NaN failed as an indefinite
    Q_uu blaming R."""
    from trajopt.riccati import CholeskySolver
    data = _stacked(np.random.default_rng(6), (), 4, 3, 2)
    with pytest.raises(InvalidArgumentError, match="reg must be a finite number >= 0"):
        trajopt.solve_lqr(trajopt.LQR(**data), reg=reg)
    with pytest.raises(InvalidArgumentError, match="reg"):
        CholeskySolver(reg=reg)


def test_finite_horizon_converges_to_dare():
    rng = np.random.default_rng(8)
    n, m, T = 4, 2, 400
    A = rng.normal(size=(n, n)) / 1.5
    B = rng.normal(size=(n, m))
    Q, R = np.eye(n), np.eye(m)
    prob = trajopt.LQR(A=np.broadcast_to(A, (T, n, n)), B=np.broadcast_to(B, (T, n, m)),
                       Q=np.broadcast_to(Q, (T, n, n)), R=np.broadcast_to(R, (T, m, m)),
                       QT=np.zeros((n, n)))
    sol = trajopt.solve_lqr(prob)
    dare = trajopt.solve_dare(A, B, Q, R)
    errs = [np.abs(sol.P[T - h] - dare.P).max() for h in (1, 5, 20, 400)]
    assert errs[-1] <= 1e-10 * np.abs(dare.P).max()
    assert errs[0] > errs[1] > errs[2]
    np.testing.assert_allclose(sol.K[0], dare.K, rtol=1e-9, atol=1e-10)


def _growing(dtype, T, q_first=1.0, stacked=True):
    """An unstable mode (3) that the control cannot reach: P and the state grow as 9^t
    and 3^t over the horizon."""
    A = torch.tensor([[3.0, 0.0], [0.0, 0.5]], dtype=dtype)
    B = torch.tensor([[0.0], [1.0]], dtype=dtype)
    Q = torch.diag(torch.tensor([q_first, 1.0], dtype=dtype))
    R = torch.eye(1, dtype=dtype)
    if stacked:
        return trajopt.LQR.time_invariant(A, B, Q, R, T)
    return trajopt.LQR(A=[A] * T, B=[B] * T, Q=[Q] * T, R=[R] * T, QT=Q)


@pytest.mark.parametrize("stacked", [True, False])
@pytest.mark.parametrize("x0", [None, "ones"])
def test_an_overflowing_value_function_is_an_error_naming_the_stage(stacked, x0):
    """Where P overflows (float32: 9^t passes 3.4e38 about 40 stages before the end)
    the solve raised nothing and returned P = inf, cost = nan; in float64 (9^t passes
    1.8e308 at t ~ 323) the NaN Q_uu was reported as "not positive definite, check R"
    (a user trial, session 30).  Stage T - 41 = 59 is where P first is inf in float32."""
    x0 = None if x0 is None else torch.ones(2)
    with pytest.raises(NumericalError, match="value function .*float32 at stage 59"):
        trajopt.solve_lqr(_growing(torch.float32, 100, stacked=stacked), x0=x0)
    with pytest.raises(NumericalError, match="value matrix P overflows float64 at stage 477"):
        trajopt.solve_lqr(_growing(torch.float64, 800, stacked=stacked), x0=x0)
    # below the overflow the same problem solves, with huge but finite values
    sol = trajopt.solve_lqr(_growing(torch.float64, 300, stacked=stacked), x0=x0)
    assert 1e280 < float(sol.P[0][0, 0]) < float("inf")


def test_an_overflowing_trajectory_is_an_error_naming_the_stage():
    """Q does not weigh the unstable mode: P stays finite, the state 3^t overflows
    float64 at stage 647 (3^646 * 1 < 1.8e308 < 3^647); solve_lqr and rollout returned
    cost = nan and non-finite states silently."""
    prob = _growing(torch.float64, 700, q_first=0.0)
    with pytest.raises(NumericalError, match="optimal trajectory overflows float64 at stage 647"):
        trajopt.solve_lqr(prob, x0=torch.ones(2, dtype=torch.float64))
    with pytest.raises(NumericalError, match="state overflows float64 at stage 647"):
        trajopt.rollout(prob, torch.ones(2, dtype=torch.float64),
                        torch.zeros(700, 1, dtype=torch.float64))
    short = _growing(torch.float64, 600, q_first=0.0)
    traj = trajopt.rollout(short, torch.ones(2, dtype=torch.float64),
                           torch.zeros(600, 1, dtype=torch.float64))
    assert 1e285 < float(traj.xs[-1, 0]) < float("inf")


def test_a_cost_that_overflows_with_finite_stages_is_named():
    """Every state finite, their cost's sum not (float32, x0 = 1e20): an IndexError in
    the first version of the overflow check (a review, session 30)."""
    prob = trajopt.LQR.time_invariant(torch.eye(2), torch.ones(2, 1), torch.eye(2),
                                      torch.eye(1), 5)
    x0 = torch.full((2,), 1e20)
    with pytest.raises(NumericalError, match="cost of the state overflows float32"):
        trajopt.rollout(prob, x0, torch.zeros(5, 1))
    with pytest.raises(NumericalError, match="cost of the optimal trajectory overflows"):
        trajopt.solve_lqr(prob, x0)
