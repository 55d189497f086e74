"""Slow, plainly written references for the LQR tests (numpy, one problem at a time).

* :func:`kkt_solve` solves a finite-horizon LQR as one equality-constrained quadratic
  program over z = (x_0..x_T, u_0..u_{T-1}) by a dense KKT system.
* :func:`kkt_value` recovers the value function V_t(x) = 1/2 x'P_t x + p_t'x + s from the
  KKT solution of the tail problem started at stage t, as an affine function of x.
* :func:`riccati_numpy` is the textbook Riccati recursion (thesis Eq. 2.3.4-2.3.5 in the
  1/2 convention) in plain numpy loops.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass
class NpStage:
    A: np.ndarray
    B: np.ndarray
    Q: np.ndarray
    R: np.ndarray
    M: np.ndarray | None = None
    q: np.ndarray | None = None
    r: np.ndarray | None = None
    c: np.ndarray | None = None


def _kkt(stages, QT, qT, x0):
    T = len(stages)
    ns = [s.A.shape[1] for s in stages] + [stages[-1].A.shape[0]]
    ms = [s.B.shape[1] for s in stages]
    xo = np.cumsum([0] + ns)
    uo = xo[-1] + np.cumsum([0] + ms)
    N = uo[-1]
    H = np.zeros((N, N))
    g = np.zeros(N)
    rows = []
    rhs = []

    def xs(t):
        return slice(xo[t], xo[t + 1])

    def us(t):
        return slice(uo[t], uo[t + 1])

    for t, s in enumerate(stages):
        H[xs(t), xs(t)] += s.Q
        H[us(t), us(t)] += s.R
        if s.M is not None:
            H[us(t), xs(t)] += s.M
            H[xs(t), us(t)] += s.M.T
        if s.q is not None:
            g[xs(t)] += s.q
        if s.r is not None:
            g[us(t)] += s.r
    H[xs(T), xs(T)] += QT
    if qT is not None:
        g[xs(T)] += qT
    # x_0 = x0
    C0 = np.zeros((ns[0], N))
    C0[:, xs(0)] = np.eye(ns[0])
    rows.append(C0)
    rhs.append(x0)
    for t, s in enumerate(stages):
        C = np.zeros((ns[t + 1], N))
        C[:, xs(t + 1)] = np.eye(ns[t + 1])
        C[:, xs(t)] = -s.A
        C[:, us(t)] = -s.B
        rows.append(C)
        rhs.append(np.zeros(ns[t + 1]) if s.c is None else s.c)
    C = np.vstack(rows)
    d = np.concatenate(rhs)
    nc = C.shape[0]
    KKT = np.block([[H, C.T], [C, np.zeros((nc, nc))]])
    return H, g, KKT, d, xo, uo, ns


def kkt_solve(stages, QT, qT, x0, equalities=()):
    """Optimal xs (list), us (list) and cost of the LQR from x0 by one dense KKT solve.

    ``equalities``: extra linear constraints ``(t, Ex, Eu, e)`` meaning
    ``Ex x_t + Eu u_t = e`` (``Eu`` None at t = T, or for a state-only constraint)."""
    H, g, KKT, d, xo, uo, ns = _kkt(stages, QT, qT, x0)
    N = H.shape[0]
    if equalities:
        rows, rhs = [], []
        for t, Ex, Eu, e in equalities:
            row = np.zeros((len(e), N))
            row[:, xo[t]:xo[t + 1]] = Ex
            if Eu is not None:
                row[:, uo[t]:uo[t + 1]] = Eu
            rows.append(row)
            rhs.append(e)
        C = np.vstack([KKT[N:, :N]] + rows)
        d = np.concatenate([d] + rhs)
        nc = C.shape[0]
        KKT = np.block([[H, C.T], [C, np.zeros((nc, nc))]])
    sol = np.linalg.solve(KKT, np.concatenate([-g, d]))
    z = sol[:N]
    T = len(stages)
    xs = [z[xo[t]:xo[t + 1]] for t in range(T + 1)]
    us = [z[uo[t]:uo[t + 1]] for t in range(T)]
    return xs, us, 0.5 * z @ H @ z + g @ z


def kkt_value(stages, QT, qT, t):
    """(P_t, p_t) of the tail problem from stage t, from the affine KKT solution map."""
    tail = stages[t:]
    n = tail[0].A.shape[1] if tail else QT.shape[0]
    if not tail:
        return QT, (np.zeros(n) if qT is None else qT)
    H, g, KKT, d, xo, uo, ns = _kkt(tail, QT, qT, np.zeros(n))
    N = H.shape[0]
    rhs0 = np.concatenate([-g, d])
    z0 = np.linalg.solve(KKT, rhs0)[:N]
    Z = np.zeros((N, n))
    for i in range(n):
        e = np.zeros(n)
        e[i] = 1.0
        de = np.concatenate([np.zeros(N), e, np.zeros(d.size - n)])
        Z[:, i] = np.linalg.solve(KKT, de)[:N]
    return Z.T @ H @ Z, Z.T @ (H @ z0 + g)


def riccati_numpy(stages, QT, qT):
    """Textbook backward recursion; returns lists K, k, P, p (P, p of length T+1)."""
    P = QT
    p = np.zeros(QT.shape[0]) if qT is None else qT
    Ps, ps, Ks, ks = [P], [p], [], []
    for s in reversed(stages):
        n, m = s.A.shape[1], s.B.shape[1]
        M = np.zeros((m, n)) if s.M is None else s.M
        q = np.zeros(n) if s.q is None else s.q
        r = np.zeros(m) if s.r is None else s.r
        pc = p if s.c is None else p + P @ s.c
        G = s.R + s.B.T @ P @ s.B
        H = M + s.B.T @ P @ s.A
        K = -np.linalg.solve(G, H)
        k = -np.linalg.solve(G, r + s.B.T @ pc)
        P = s.Q + s.A.T @ P @ s.A + H.T @ K
        P = 0.5 * (P + P.T)
        p = q + s.A.T @ pc + H.T @ k
        Ps.append(P)
        ps.append(p)
        Ks.append(K)
        ks.append(k)
    return Ks[::-1], ks[::-1], Ps[::-1], ps[::-1]


def random_stages(rng, ns, ms, *, cross=True, linear=True, offset=True):
    """Random convex LQR stages with state sizes ns (T+1 entries) and control sizes ms."""
    stages = []
    for t, m in enumerate(ms):
        n, n1 = ns[t], ns[t + 1]
        L = rng.normal(size=(n + m, n + m))
        W = L @ L.T / (n + m) + 0.1 * np.eye(n + m)
        stages.append(NpStage(
            A=rng.normal(size=(n1, n)) / np.sqrt(n), B=rng.normal(size=(n1, m)),
            Q=W[:n, :n], R=W[n:, n:], M=W[n:, :n] if cross else None,
            q=rng.normal(size=n) if linear else None, r=rng.normal(size=m) if linear else None,
            c=rng.normal(size=n1) if offset else None))
    L = rng.normal(size=(ns[-1], ns[-1]))
    QT = L @ L.T / ns[-1] + 0.1 * np.eye(ns[-1])
    qT = rng.normal(size=ns[-1]) if linear else None
    return stages, QT, qT
