"""Gradients through the Riccati solvers (implicit differentiation, trajopt.dare.implicit)
against finite differences (torch.autograd.gradcheck, float64)."""

import warnings

import numpy as np
import pytest
import torch

import trajopt
import trajopt.lqr.finite as finite
from trajopt.dare.backends import slycot_available

DT = torch.float64


def _data(seed, n, m, batch=(), with_e=False, with_s=False):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(*batch, n, n, generator=g, dtype=DT) / n ** 0.5
    B = torch.randn(*batch, n, m, generator=g, dtype=DT)
    L = torch.randn(n, n, generator=g, dtype=DT)
    Q = L @ L.T / n + 0.5 * torch.eye(n, dtype=DT)
    R = torch.eye(m, dtype=DT) + 0.1 * torch.diag(torch.rand(m, generator=g, dtype=DT))
    E = torch.eye(n, dtype=DT) + 0.05 * torch.randn(n, n, generator=g, dtype=DT) \
        if with_e else None
    S = 0.05 * torch.randn(n, m, generator=g, dtype=DT) if with_s else None
    return [v.requires_grad_() if v is not None else None for v in (A, B, Q, R, E, S)]


def _check(solve, args, method):
    A, B, Q, R, E, S = args
    present = [v for v in args if v is not None]
    has_e, has_s = E is not None, S is not None

    def fn(*xs):
        it = iter(xs)
        A, B, Q, R = (next(it) for _ in range(4))
        E = next(it) if has_e else None
        S = next(it) if has_s else None
        sol = solve(A, B, 0.5 * (Q + Q.mT), 0.5 * (R + R.mT), E, S, method=method)
        return sol.P, sol.K
    assert torch.autograd.gradcheck(fn, present, eps=1e-6, atol=1e-6, rtol=1e-5)


DARE_METHODS = ["auto", "scipy", "doubling"] + (["slycot"] if slycot_available() else [])


@pytest.mark.parametrize("method", DARE_METHODS)
@pytest.mark.parametrize("with_e,with_s", [(False, False), (True, True)])
def test_dare_gradients_match_finite_differences(method, with_e, with_s):
    _check(trajopt.solve_dare, _data(0, 3, 2, with_e=with_e, with_s=with_s), method)


@pytest.mark.parametrize("method", ["auto", "scipy", "sign"])
@pytest.mark.parametrize("with_e,with_s", [(False, False), (True, True)])
def test_care_gradients_match_finite_differences(method, with_e, with_s):
    _check(trajopt.solve_care, _data(1, 3, 2, with_e=with_e, with_s=with_s), method)


@pytest.mark.parametrize("solve", [trajopt.solve_dare, trajopt.solve_care])
def test_batched_gradients(solve):
    _check(solve, _data(2, 3, 1, batch=(3,)), "auto")


def test_the_gradient_is_implicit_not_unrolled():
    """P's graph is one node over the problem's matrices (no doubling iterations in it),
    and "auto" no longer warns that scipy's answer is not differentiable."""
    A, B, Q, R, _, _ = _data(3, 4, 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sol = trajopt.solve_dare(A, B, Q, R)
    assert type(sol.P.grad_fn).__name__ == "_ImplicitBackward"
    assert sol.K.requires_grad
    sol.P.sum().backward()
    assert all(v.grad is not None for v in (A, B, Q, R))


@pytest.mark.parametrize("time", ["discrete", "continuous"])
def test_infinite_lqr_gradients(time):
    """p and k (through P and K) with respect to the problem and the linear terms."""
    A, B, Q, R, _, _ = _data(4, 3, 2)
    g = torch.Generator().manual_seed(5)
    q = torch.randn(3, generator=g, dtype=DT, requires_grad=True)
    r = torch.randn(2, generator=g, dtype=DT, requires_grad=True)

    def fn(A, B, Q, q, r):
        s = trajopt.solve_infinite_lqr(A, B, 0.5 * (Q + Q.T), R.detach(), None, q, r,
                                       time=time)
        return s.P, s.K, s.p, s.k
    assert torch.autograd.gradcheck(fn, (A, B, Q, q, r), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_finite_lqr_gradients():
    """solve_lqr's xs, us, cost are differentiable with respect to x0 and the matrices
    (the adjoint LQR of trajopt.lqr.implicit)."""
    g = torch.Generator().manual_seed(6)
    T, n, m = 5, 3, 2
    A = (torch.randn(T, n, n, generator=g, dtype=DT) / 2).requires_grad_()
    B = torch.randn(T, n, m, generator=g, dtype=DT, requires_grad=True)
    x0 = torch.randn(n, generator=g, dtype=DT, requires_grad=True)

    def fn(A, B, x0):
        prob = trajopt.LQR(A=A, B=B, Q=torch.eye(n, dtype=DT).expand(T, n, n),
                           R=torch.eye(m, dtype=DT).expand(T, m, m),
                           QT=torch.eye(n, dtype=DT))
        s = trajopt.solve_lqr(prob, x0)
        return s.xs, s.us, s.cost
    assert torch.autograd.gradcheck(fn, (A, B, x0), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_finite_lqr_trajectory_gradient_is_the_adjoint_solve():
    """Every problem tensor (A, B, Q, R, M, q, r, c, QT, qT) and x0, a batch that
    broadcasts against unbatched cost matrices, against finite differences (gradcheck);
    the trajectory's graph is the adjoint's one node, not the rollout."""
    g = torch.Generator().manual_seed(7)
    T, n, m, Bt = 4, 3, 2, 2

    def rnd(*shape, scale=1.0):
        return (scale * torch.randn(*shape, generator=g, dtype=DT)).requires_grad_()
    A, B = rnd(Bt, T, n, n, scale=0.5), rnd(Bt, T, n, m)
    Qh, Rh = rnd(T, n, n, scale=0.3), rnd(T, m, m, scale=0.3)
    M, q, r, c = rnd(T, m, n, scale=0.1), rnd(T, n), rnd(T, m), rnd(Bt, T, n)
    QTh, qT, x0 = rnd(n, n, scale=0.3), rnd(n), rnd(Bt, n)

    def fn(A, B, Qh, Rh, M, q, r, c, QTh, qT, x0):
        eye_n, eye_m = torch.eye(n, dtype=DT), torch.eye(m, dtype=DT)
        Q = eye_n + Qh @ Qh.mT
        R = eye_m + Rh @ Rh.mT
        prob = trajopt.LQR(A=A, B=B, Q=Q, R=R, M=M, q=q, r=r, c=c,
                           QT=eye_n + QTh @ QTh.mT, qT=qT)
        s = trajopt.solve_lqr(prob, x0)
        return s.xs, s.us, s.cost
    args = (A, B, Qh, Rh, M, q, r, c, QTh, qT, x0)
    assert torch.autograd.gradcheck(fn, args, eps=1e-6, atol=1e-6, rtol=1e-5)
    xs, _, _ = fn(*args)
    # stacked from the custom function's outputs: no rollout ops in the graph
    names = set()
    stack = [xs.grad_fn]
    while stack:
        node = stack.pop()
        if node is None or node.name() in names:
            continue
        names.add(node.name())
        if "LQRTrajectory" in node.name():
            continue
        stack += [nxt for nxt, _ in node.next_functions]
    assert any("LQRTrajectory" in nm for nm in names)
    assert not any("Mm" in nm or "Bmm" in nm for nm in names), names


def test_finite_lqr_gradients_with_stages_of_different_sizes():
    """A problem given as lists with n_t, m_t varying: gradcheck of xs, us, cost."""
    g = torch.Generator().manual_seed(8)
    ns, ms = [2, 3, 2], [1, 2]
    A = [(0.5 * torch.randn(ns[t + 1], ns[t], generator=g, dtype=DT)).requires_grad_()
         for t in range(2)]
    B = [torch.randn(ns[t + 1], ms[t], generator=g, dtype=DT, requires_grad=True)
         for t in range(2)]
    x0 = torch.randn(2, generator=g, dtype=DT, requires_grad=True)

    def fn(A0, A1, B0, B1, x0):
        prob = trajopt.LQR(A=[A0, A1], B=[B0, B1],
                           Q=[torch.eye(k, dtype=DT) for k in ns[:2]],
                           R=[torch.eye(k, dtype=DT) for k in ms],
                           QT=torch.eye(ns[2], dtype=DT))
        s = trajopt.solve_lqr(prob, x0)
        return (*s.xs, *s.us, s.cost)
    assert torch.autograd.gradcheck(fn, (*A, *B, x0), eps=1e-6, atol=1e-6, rtol=1e-5)


def test_finite_lqr_adjoint_equals_autograd_through_the_unrolled_solve():
    """The adjoint gradient of xs, us, cost equals autograd through the unrolled solve:
    the recursion's K, k (differentiable) rolled out by hand from x0."""
    g = torch.Generator().manual_seed(9)
    T, n, m = 6, 3, 2
    A = (0.5 * torch.randn(T, n, n, generator=g, dtype=DT)).requires_grad_()
    B = torch.randn(T, n, m, generator=g, dtype=DT, requires_grad=True)
    q = torch.randn(T, n, generator=g, dtype=DT, requires_grad=True)
    x0 = torch.randn(n, generator=g, dtype=DT, requires_grad=True)
    w_x = torch.randn(T + 1, n, generator=g, dtype=DT)
    w_u = torch.randn(T, m, generator=g, dtype=DT)
    prob = trajopt.LQR(A=A, B=B, Q=torch.eye(n, dtype=DT).expand(T, n, n),
                       R=torch.eye(m, dtype=DT).expand(T, m, m), q=q,
                       QT=2 * torch.eye(n, dtype=DT))
    s = trajopt.solve_lqr(prob, x0)
    ours = torch.autograd.grad((s.xs * w_x).sum() + (s.us * w_u).sum() + 0.7 * s.cost,
                               (A, B, q, x0))
    x, xs, us, J = x0, [x0], [], 0.0
    for t in range(T):
        u = s.K[t] @ x + s.k[t]
        J = J + 0.5 * x @ x + 0.5 * u @ u + q[t] @ x
        x = A[t] @ x + B[t] @ u
        xs.append(x)
        us.append(u)
    J = J + x @ x
    unrolled = torch.autograd.grad((torch.stack(xs) * w_x).sum()
                                   + (torch.stack(us) * w_u).sum() + 0.7 * J, (A, B, q, x0))
    for a, b in zip(ours, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


def test_finite_lqr_gradient_paths_agree_and_say_their_limits():
    """One matrix repeated over the stages (LQR(A=[A] * T)) is counted once; with reg the
    trajectory is differentiated through the recursion (gradcheck); torch.func.jacrev
    works; the adjoint path equals the explicit CholeskySolver() path (autograd through
    the recursion and rollout), which also gives second derivatives, while the adjoint
    path asked for them raises a named error."""
    from trajopt.errors import InvalidArgumentError
    from trajopt.riccati import CholeskySolver
    g = torch.Generator().manual_seed(10)
    T, n, m = 4, 3, 2
    A = (0.5 * torch.randn(n, n, generator=g, dtype=DT)).requires_grad_()
    B = torch.randn(n, m, generator=g, dtype=DT, requires_grad=True)
    S = torch.randn(n, n, generator=g, dtype=DT, requires_grad=True)
    x0 = torch.randn(n, generator=g, dtype=DT)

    def f(A, B, S, **kw):
        Q = torch.eye(n, dtype=DT) + 0.1 * (S + S.T)
        prob = trajopt.LQR(A=[A] * T, B=[B] * T, Q=[Q] * T,
                           R=[torch.eye(m, dtype=DT)] * T, QT=Q)
        s = trajopt.solve_lqr(prob, x0, **kw)
        return (torch.stack(s.xs) ** 2).sum() + (torch.stack(s.us) ** 3).sum() + s.cost
    adjoint = torch.autograd.grad(f(A, B, S), (A, B, S))
    unrolled = torch.autograd.grad(f(A, B, S, solver=CholeskySolver()), (A, B, S))
    for a, b in zip(adjoint, unrolled):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)
    assert torch.autograd.gradcheck(lambda *a: f(*a, reg=0.5), (A, B, S), eps=1e-6,
                                    atol=1e-6, rtol=1e-5)
    J = torch.func.jacrev(lambda a: f(a, B.detach(), S.detach()))(A.detach())
    torch.testing.assert_close(J, adjoint[0], rtol=1e-10, atol=1e-12)
    H = torch.autograd.functional.hessian(
        lambda a: f(a, B.detach(), S.detach(), solver=CholeskySolver()), A.detach())
    assert float(H.abs().max()) > 0
    with pytest.raises(InvalidArgumentError, match="first order"):
        torch.autograd.functional.hessian(lambda a: f(a, B.detach(), S.detach()),
                                          A.detach())


@pytest.mark.parametrize("scan", [True, False])
@pytest.mark.parametrize("pb,xb", [((3,), ()), ((), (5,)), ((3,), (2, 3))])
def test_finite_lqr_trajectory_gradient_with_broadcast_batches(monkeypatch, scan, pb, xb):
    """x0's batch broadcast against the problem's, both ways, by the adjoint: against
    central differences (an unbatched x0 of a batched problem got the batch's summed
    gradient for every element, 3x too large here; an x0 batch larger than the problem's
    crashed in the adjoint's packing). The rollout by the scan and by the loop alike."""
    if not scan:
        monkeypatch.setattr(finite, "scan_closed_loop", lambda *a: None)
    rng = np.random.default_rng(0)
    T, n, m = 30, 3, 2
    A = torch.tensor(np.eye(n) + 0.2 * rng.normal(size=(*pb, T, n, n)), requires_grad=True)
    prob = trajopt.LQR(A=A, B=torch.tensor(rng.normal(size=(*pb, T, n, m))),
                       Q=torch.eye(n, dtype=torch.float64).expand(*pb, T, n, n),
                       R=torch.eye(m, dtype=torch.float64).expand(*pb, T, m, m),
                       q=torch.tensor(rng.normal(size=(*pb, T, n))),
                       QT=torch.eye(n, dtype=torch.float64))
    x0 = torch.tensor(rng.normal(size=(*xb, n)), requires_grad=True)
    W = torch.tensor(rng.normal(size=(*torch.broadcast_shapes(pb, xb), T + 1, n)))

    def loss(x):
        sol = trajopt.solve_lqr(prob, x)
        return (sol.xs * W).sum() + sol.cost.sum()
    g, gA = torch.autograd.grad(loss(x0), (x0, A))
    h, e = 1e-6, torch.tensor(rng.normal(size=x0.shape))
    with torch.no_grad():
        fd = (loss(x0 + h * e) - loss(x0 - h * e)) / (2 * h)
    assert abs(float((g * e).sum() - fd)) <= 1e-6 * (1 + abs(float(fd)))
    assert gA.shape == A.shape and bool(torch.isfinite(gA).all())
