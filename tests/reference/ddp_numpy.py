"""A slow, plainly written DDP / iLQR in numpy, one problem at a time, no control limits.

It follows the same algorithm as trajopt.ddp.solver (Tassa, Erez & Todorov 2012:
Q_uu + mu I regularization with the same schedule, backtracking over the same alphas with
the actual/expected > c1 test) but shares no code with it: the derivatives are supplied by
the caller (analytic), every matrix is formed explicitly, and loops are over time.
"""

from __future__ import annotations

import numpy as np


def backward(fx, fu, fxx, fux, fuu, lx, lu, lxx, luu, lux, VxT, VxxT, mu, full, c=None):
    """One backward pass.  Lists over t of (n1,n), (n1,m), (n1,n,n)... Returns dict of
    lists K, k, Qu, Quu, Qux, Vx, Vxx (Vx, Vxx with T+1 entries) and dV (2,), or None if
    some Q_uu + mu I is not positive definite.  ``c``: optional list of the dynamics'
    offsets (x' = f + c_t: the next value seen from stage t has gradient Vx + Vxx c)."""
    T = len(fx)
    Vx, Vxx = VxT, VxxT
    out = {name: [None] * T for name in ("K", "k", "Qu", "Quu", "Qux", "Qx", "Qxx")}
    out["Vx"], out["Vxx"] = [None] * (T + 1), [None] * (T + 1)
    out["Vx"][T], out["Vxx"][T] = Vx, Vxx
    dV = np.zeros(2)
    for t in reversed(range(T)):
        if c is not None:
            Vx = Vx + Vxx @ c[t]
        Qx = lx[t] + fx[t].T @ Vx
        Qu = lu[t] + fu[t].T @ Vx
        Qxx = lxx[t] + fx[t].T @ Vxx @ fx[t]
        Qux = lux[t] + fu[t].T @ Vxx @ fx[t]
        Quu = luu[t] + fu[t].T @ Vxx @ fu[t]
        if full:
            Qxx = Qxx + np.tensordot(Vx, fxx[t], axes=1)
            Qux = Qux + np.tensordot(Vx, fux[t], axes=1)
            Quu = Quu + np.tensordot(Vx, fuu[t], axes=1)
        H = Quu + mu * np.eye(Quu.shape[0])
        if np.any(np.linalg.eigvalsh(0.5 * (H + H.T)) <= 0):
            return None
        k = -np.linalg.solve(H, Qu)
        K = -np.linalg.solve(H, Qux)
        Vx = Qx + K.T @ Quu @ k + K.T @ Qu + Qux.T @ k
        Vxx = Qxx + K.T @ Quu @ K + K.T @ Qux + Qux.T @ K
        Vxx = 0.5 * (Vxx + Vxx.T)
        dV += np.array([k @ Qu, 0.5 * k @ Quu @ k])
        for name, val in (("K", K), ("k", k), ("Qu", Qu), ("Quu", Quu), ("Qux", Qux),
                          ("Qx", Qx), ("Qxx", Qxx)):
            out[name][t] = val
        out["Vx"][t], out["Vxx"][t] = Vx, Vxx
    out["dV"] = dV
    return out


ALPHAS = tuple(10.0 ** np.linspace(0, -3, 11))


class ReferenceDDP:
    """``problem`` supplies numpy callables: f(x, u), derivs(x, u) -> (fx, fu, fxx, fux, fuu),
    l(x, u), lderivs(x, u) -> (lx, lu, lxx, luu, lux), lT(x), lTderivs(x) -> (g, H)."""

    def __init__(self, problem, *, full=False, mu0=0.0, mu_min=1e-6, mu_max=1e10, factor=1.6,
                 alphas=ALPHAS, c1=0.1, tol=1e-8):
        self.p, self.full = problem, full
        self.mu, self.delta = mu0, 1.0
        self.mu_min, self.mu_max, self.factor = mu_min, mu_max, factor
        self.alphas, self.c1, self.tol = alphas, c1, tol

    def rollout(self, x0, us):
        xs, J = [x0], 0.0
        for u in us:
            J += self.p.l(xs[-1], u)
            xs.append(self.p.f(xs[-1], u))
        return xs, J + self.p.lT(xs[-1])

    def backward_at(self, xs, us):
        d = [self.p.derivs(x, u) for x, u in zip(xs[:-1], us)]
        c = [self.p.lderivs(x, u) for x, u in zip(xs[:-1], us)]
        g, H = self.p.lTderivs(xs[-1])
        args = [[v[i] for v in d] for i in range(5)] + [[v[i] for v in c] for i in range(5)]
        return backward(*args, g, H, self.mu, self.full)

    def iterate(self, x0, us, iterations):
        """Run ``iterations`` iterations; returns (xs, us, J, last backward dict)."""
        xs, J = self.rollout(x0, us)
        bw = None
        for _ in range(iterations):
            while True:
                bw = self.backward_at(xs, us)
                if bw is not None:
                    break
                self.delta = max(self.factor, self.delta * self.factor)
                self.mu = max(self.mu_min, self.mu * self.delta)
            if -bw["dV"][0] <= self.tol * (1 + abs(J)):
                break
            for alpha in self.alphas:
                xn, un, Jn = [x0], [], 0.0
                for t in range(len(us)):
                    u = us[t] + alpha * bw["k"][t] + bw["K"][t] @ (xn[-1] - xs[t])
                    Jn += self.p.l(xn[-1], u)
                    un.append(u)
                    xn.append(self.p.f(xn[-1], u))
                Jn += self.p.lT(xn[-1])
                expected = -(alpha * bw["dV"][0] + alpha ** 2 * bw["dV"][1])
                if J - Jn >= self.c1 * expected:
                    xs, us, J = xn, un, Jn
                    self.delta = min(1 / self.factor, self.delta / self.factor)
                    self.mu = self.mu * self.delta if self.mu * self.delta > self.mu_min else 0
                    break
            else:
                self.delta = max(self.factor, self.delta * self.factor)
                self.mu = max(self.mu_min, self.mu * self.delta)
        return xs, us, J, bw
