"""Infinite-horizon LQR with linear terms and the cyclic (periodic) LQR."""

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import trajopt
from tests._hypothesis import examples
from tests.reference.lqr_kkt import random_stages


def _stable_enough(rng, n, m):
    A = rng.normal(size=(n, n)) / np.sqrt(n)
    B = rng.normal(size=(n, m))
    L = rng.normal(size=(n + m, n + m))
    W = L @ L.T / (n + m) + 0.2 * np.eye(n + m)
    return A, B, W[:n, :n], W[n:, n:], W[n:, :n], rng.normal(size=n), rng.normal(size=m)


def _long_horizon(stage_list, periods):
    """Finite LQR repeating the given stages `periods` times, zero terminal cost."""
    seq = stage_list * periods
    n_end = seq[-1]["A"].shape[0]
    prob = trajopt.LQR(**{k: [s[k] for s in seq] for k in seq[0]},
                       QT=np.zeros((n_end, n_end)))
    return trajopt.solve_lqr(prob)


def test_infinite_lqr_linear_term_is_the_long_horizon_limit():
    rng = np.random.default_rng(0)
    A, B, Q, R, M, q, r = _stable_enough(rng, 4, 2)
    inf = trajopt.solve_infinite_lqr(A, B, Q, R, M, q, r)
    fin = _long_horizon([dict(A=A, B=B, Q=Q, R=R, M=M, q=q, r=r)], 600)
    np.testing.assert_allclose(fin.P[0], inf.P, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fin.p[0], inf.p, rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(fin.K[0], inf.K, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(fin.k[0], inf.k, rtol=1e-9, atol=1e-9)
    # fixed point of thesis Eq. 2.3.9 in the 1/2 convention
    Acl = A + B @ inf.K
    np.testing.assert_allclose(inf.p, q + inf.K.T @ r + Acl.T @ inf.p, rtol=1e-12,
                               atol=1e-12)


def test_infinite_without_linear_terms_is_the_dare():
    rng = np.random.default_rng(1)
    A, B, Q, R, M, _, _ = _stable_enough(rng, 3, 2)
    inf = trajopt.solve_infinite_lqr(A, B, Q, R, M)
    dare = trajopt.solve_dare(A, B, Q, R, S=M.T)
    np.testing.assert_allclose(inf.P, dare.P, rtol=1e-13)
    np.testing.assert_array_equal(inf.p, np.zeros(3))
    np.testing.assert_array_equal(inf.k, np.zeros(2))


@st.composite
def cycle(draw):
    N = draw(st.integers(1, 4))
    ns = draw(st.lists(st.integers(1, 4), min_size=N, max_size=N))
    ms = draw(st.lists(st.integers(1, 3), min_size=N, max_size=N))
    return ns, ms, draw(st.booleans()), draw(st.integers(0, 2**31 - 1))


def _cyclic_args(rng, ns, ms, linear):
    stages, _, _ = random_stages(rng, ns + [ns[0]], ms, cross=True, linear=linear,
                                 offset=False)
    get = {k: [getattr(s, k) for s in stages] for k in ("A", "B", "Q", "R", "M", "q", "r")}
    return dict(As=get["A"], Bs=get["B"], Qs=get["Q"], Rs=get["R"], Ms=get["M"],
                qs=get["q"] if linear else None, rs=get["r"] if linear else None)


@settings(max_examples=examples(30), deadline=None)
@given(cycle())
def test_cyclic_lift_equals_sweep_and_satisfies_periodic_riccati(case):
    ns, ms, linear, seed = case
    args = _cyclic_args(np.random.default_rng(seed), ns, ms, linear)
    lift = trajopt.solve_cyclic_lqr(**args, method="lift")
    sweep = trajopt.solve_cyclic_lqr(**args, method="sweep")
    for name in ("P", "K", "p", "k"):
        for a, b in zip(getattr(lift, name), getattr(sweep, name)):
            scale = max(1.0, np.abs(a).max())
            np.testing.assert_allclose(a, b, rtol=0, atol=1e-9 * scale, err_msg=name)
    # periodic Riccati: P[n] = Ric_n(P[n+1 mod N]) (residual of the equation itself)
    N = len(ns)
    for i in range(N):
        A, B, Q, R, M = (args[k][i] for k in ("As", "Bs", "Qs", "Rs", "Ms"))
        Pn = lift.P[(i + 1) % N]
        H = M + B.T @ Pn @ A
        rhs = Q + A.T @ Pn @ A - H.T @ np.linalg.solve(R + B.T @ Pn @ B, H)
        np.testing.assert_allclose(lift.P[i], rhs, rtol=0,
                                   atol=1e-10 * max(1.0, np.abs(rhs).max()))


def test_cyclic_with_one_phase_is_solve_dare():
    rng = np.random.default_rng(3)
    A, B, Q, R, M, q, r = _stable_enough(rng, 4, 2)
    cyc = trajopt.solve_cyclic_lqr([A], [B], [Q], [R], [M], [q], [r])
    inf = trajopt.solve_infinite_lqr(A, B, Q, R, M, q, r)
    np.testing.assert_allclose(cyc.P[0], inf.P, rtol=1e-11, atol=1e-12)
    np.testing.assert_allclose(cyc.K[0], inf.K, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(cyc.p[0], inf.p, rtol=1e-10, atol=1e-11)
    np.testing.assert_allclose(cyc.k[0], inf.k, rtol=1e-10, atol=1e-11)


def test_cyclic_equals_long_periodic_finite_horizon():
    rng = np.random.default_rng(4)
    ns, ms = [3, 2, 4], [2, 1, 2]
    args = _cyclic_args(rng, ns, ms, True)
    cyc = trajopt.solve_cyclic_lqr(**args)
    stage_list = [dict(A=args["As"][i], B=args["Bs"][i], Q=args["Qs"][i], R=args["Rs"][i],
                       M=args["Ms"][i], q=args["qs"][i], r=args["rs"][i]) for i in range(3)]
    fin = _long_horizon(stage_list, 300)
    for i in range(3):
        np.testing.assert_allclose(fin.P[i], cyc.P[i], rtol=1e-9, atol=1e-9)
        np.testing.assert_allclose(fin.p[i], cyc.p[i], rtol=1e-8, atol=1e-8)
        np.testing.assert_allclose(fin.K[i], cyc.K[i], rtol=1e-9, atol=1e-9)


def test_cyclic_batched_torch_and_numpy_agree():
    rng = np.random.default_rng(5)
    args = _cyclic_args(rng, [3, 3], [2, 2], True)
    stacked = {k: np.stack(v) for k, v in args.items()}
    batch = {k: np.stack([v, v * (1.0 if k not in ("qs",) else 2.0)]) for k, v in
             stacked.items()}
    tb = trajopt.solve_cyclic_lqr(**{k: torch.tensor(v) for k, v in batch.items()})
    assert isinstance(tb.P[0], torch.Tensor) and tb.P[0].shape == (2, 3, 3)
    one = trajopt.solve_cyclic_lqr(**{k: list(v[1]) for k, v in batch.items()})
    np.testing.assert_allclose(tb.p[1][1].numpy(), one.p[1], rtol=1e-11, atol=1e-12)


def test_cycle_that_does_not_close_is_rejected():
    rng = np.random.default_rng(6)
    A0, A1 = rng.normal(size=(3, 2)), rng.normal(size=(4, 3))
    with pytest.raises(trajopt.errors.ShapeError, match="cycle does not close"):
        trajopt.solve_cyclic_lqr([A0, A1], [np.ones((3, 1)), np.ones((4, 1))],
                                 [np.eye(2), np.eye(3)], [np.eye(1), np.eye(1)])


@pytest.mark.parametrize("a", [2.0, 1.01])
@pytest.mark.parametrize("method", ["lift", "sweep"])
def test_an_unstabilizable_cycle_is_named_by_both_methods(a, method):
    """A mode |a|^2 > 1 per cycle that B does not reach: "sweep" raised a Cholesky error
    blaming R when P overflowed within a sweep (a = 2); both methods say what is wrong."""
    from trajopt.errors import NotStabilizableError
    A, B = [np.diag([a, 0.5])] * 2, [np.array([[0.0], [1.0]])] * 2
    with pytest.raises(NotStabilizableError, match="lambda|not stabilizable"):
        trajopt.solve_cyclic_lqr(A, B, [np.eye(2)] * 2, [np.eye(1)] * 2, method=method)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_sweep_at_the_edge_of_the_float_range(dtype):
    """A stabilizable cycle whose P is ~1e20 (float32) or ~1e156 (float64) is solved by
    "sweep" as by "lift" (a stop at sqrt(float max) refused it; Frobenius norms of such a
    P overflowed and read as converged); a cycle whose P overflows in the first sweep is
    NotStabilizableError."""
    from trajopt.errors import NotStabilizableError
    b = 1e-10 if dtype == torch.float32 else 1e-78
    As = torch.tensor([[[2.0]], [[1.0]]], dtype=dtype)
    Bs, Qs, Rs = (torch.full((2, 1, 1), v, dtype=dtype) for v in (b, 1.0, 1.0))
    lift = trajopt.solve_cyclic_lqr(As, Bs, Qs, Rs, method="lift")
    sweep = trajopt.solve_cyclic_lqr(As, Bs, Qs, Rs, method="sweep")
    # the sweep stops at a relative change of 100 eps per sweep
    torch.testing.assert_close(sweep.P[0], lift.P[0], atol=0,
                               rtol=1e-4 if dtype == torch.float32 else 1e-11)
    assert float(lift.P[0]) > (1e19 if dtype == torch.float32 else 1e155)
    big = torch.tensor([[[1e10 if dtype == torch.float32 else 1e80]], [[1.0]]], dtype=dtype)
    with pytest.raises(NotStabilizableError, match="diverged"):
        trajopt.solve_cyclic_lqr(big, 0 * Bs, Qs, Rs, method="sweep")
    # R + B'PB overflowing inside the first sweep (an UnboundLocalError in review)
    with pytest.raises(NotStabilizableError, match="diverged .*after 1 sweeps"):
        trajopt.solve_cyclic_lqr(big ** 2, Bs, Qs, Rs, method="sweep")
