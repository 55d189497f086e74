"""The numba kernels of :mod:`trajopt.riccati.compiled` and
:mod:`trajopt.lqr.compiled_rollout` (imported on first use: importing this module imports
numba; the functions are compiled on their first call, or loaded from numba's cache).

Plain loops over small matrices, one batch element at a time; every sum is formed in
float64. The math is documented where the kernels are called.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import register_jitable

__all__ = ["recursion", "rollout"]

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")


@register_jitable
def _cholesky(H, out, m):
    """Cholesky factor of the lower triangle of H (m, m) into out (lower); False where H
    is not positive definite (or not finite)."""
    for j in range(m):
        s = H[j, j]
        for q in range(j):
            s -= out[j, q] * out[j, q]
        if not s > 0.0:
            return False
        out[j, j] = np.sqrt(s)
        for i in range(j + 1, m):
            s = H[i, j]
            for q in range(j):
                s -= out[i, q] * out[j, q]
            out[i, j] = s / out[j, j]
        for i in range(j):
            out[i, j] = 0.0
    return True


@register_jitable
def _chol_solve_col(Lf, X, j, m):
    """Column j of X (m, .) <- (Lf Lf')^{-1} X[:, j]."""
    for i in range(m):
        s = X[i, j]
        for q in range(i):
            s -= Lf[i, q] * X[q, j]
        X[i, j] = s / Lf[i, i]
    for i in range(m - 1, -1, -1):
        s = X[i, j]
        for q in range(i + 1, m):
            s -= Lf[q, i] * X[q, j]
        X[i, j] = s / Lf[i, i]


@register_jitable
def _qp_value(H, g, x, m):
    """1/2 x'Hx + g'x (H read whole, as torch's product)."""
    v = 0.0
    gx = 0.0
    for i in range(m):
        s = 0.0
        for j in range(m):
            s += H[i, j] * x[j]
        v += x[i] * s
        gx += g[i] * x[i]
    return 0.5 * v + gx


@register_jitable
def _clamp(v, lo, hi):
    """torch.minimum(torch.maximum(v, lo), hi) (NaN propagates)."""
    if v < lo:
        v = lo
    if v > hi:
        v = hi
    return v


@register_jitable
def _clamped_set(H, g, x, lo, hi, grad, clamped, m):
    for i in range(m):
        s = g[i]
        for j in range(m):
            s += H[i, j] * x[j]
        grad[i] = s
        clamped[i] = (x[i] <= lo[i] and s > 0.0) or (x[i] >= hi[i] and s < 0.0)


@register_jitable
def _masked_cholesky(H, free, Lf, Hm, m):
    for i in range(m):
        for j in range(m):
            Hm[i, j] = H[i, j] if (free[i] and free[j]) else 0.0
        if not free[i]:
            Hm[i, i] += 1.0
    return _cholesky(Hm, Lf, m)


# The box QP of :func:`trajopt.riccati.boxqp.box_qp` for one element, the same steps in
# three pieces the recursion calls in turn: the closed form for m = 1
# (``_box_qp_scalar``); for m >= 2 the unconstrained minimizer where H is positive
# definite and it lies in the box (``_box_qp_inside``), else projected Newton with the
# same Armijo backtracking (``_box_qp_projected``). Each writes x, clamped and the factor
# Lf of the free block, and returns False where it failed. The first two are small
# enough for LLVM to inline into the recursion's loop; one function for all three was
# not inlined, and its call with sixteen arrays cost ~140 ns an element and stage
# (docs/performance.md, "Eleventh round").


@register_jitable
def _box_qp_scalar(H, g, lo, hi, x, clamped, Lf):
    """The box QP for one control: the closed form."""
    h = H[0, 0]
    xv = _clamp(-g[0] / h, lo[0], hi[0])
    gr = g[0] + h * xv
    clamped[0] = (xv <= lo[0] and gr > 0.0) or (xv >= hi[0] and gr < 0.0)
    x[0] = xv
    if clamped[0]:
        Lf[0, 0] = 1.0
    else:
        Lf[0, 0] = np.sqrt(h) if h > 0.0 else (0.0 if h <= 0.0 else h)
    return h > 0.0


@register_jitable
def _box_qp_inside(H, g, lo, hi, x, clamped, Lf, d, m):
    """The box QP's first step (m >= 2): where H is positive definite and the
    unconstrained minimizer lies in the box, write it (no control clamped, Lf the factor
    of H) and return True; False otherwise (nothing of x or clamped written). d (m, 1):
    work array."""
    if not _cholesky(H, Lf, m):
        return False
    for i in range(m):
        d[i, 0] = -g[i]
    _chol_solve_col(Lf, d, 0, m)
    for i in range(m):
        if not (d[i, 0] >= lo[i] and d[i, 0] <= hi[i]):
            return False
    for i in range(m):
        x[i] = d[i, 0]
        clamped[i] = False
    return True


@register_jitable
def _box_qp_projected(H, g, lo, hi, x0, has_x0, x, clamped, Lf, m, grad, free, d, cand,
                      Hm, qp):
    """The box QP's rest (m >= 2), where :func:`_box_qp_inside` said no: projected
    Newton from the clamped warm start x0 (has_x0) or zero. grad, free (m), d (m, 1),
    cand (m), Hm (m, m): work arrays; qp: the settings (max_iter, tol, armijo, shrink,
    min_step) of :mod:`trajopt.riccati.boxqp`."""
    for i in range(m):
        x[i] = _clamp(x0[i] if has_x0 else 0.0, lo[i], hi[i])
    failed = False
    value = _qp_value(H, g, x, m)
    max_iter, tol, armijo, shrink, min_step = int(qp[0]), qp[1], qp[2], qp[3], qp[4]
    for _ in range(max_iter):
        _clamped_set(H, g, x, lo, hi, grad, clamped, m)
        gmax = 0.0
        anyfree = False
        for i in range(m):
            free[i] = not clamped[i]
            if free[i]:
                anyfree = True
                gmax = max(gmax, abs(grad[i]))
        if gmax <= tol or not anyfree:
            break
        if not _masked_cholesky(H, free, Lf, Hm, m):
            failed = True
            break
        for i in range(m):
            d[i, 0] = -grad[i] if free[i] else 0.0
        _chol_solve_col(Lf, d, 0, m)
        slope = 0.0
        for i in range(m):
            if not free[i]:
                d[i, 0] = 0.0
            slope += grad[i] * d[i, 0]
        if not slope < 0.0:
            break
        step = 1.0
        stop = False
        while True:
            for i in range(m):
                cand[i] = _clamp(x[i] + step * d[i, 0], lo[i], hi[i])
            v = _qp_value(H, g, cand, m)
            if (v - value) <= armijo * step * slope:
                for i in range(m):
                    x[i] = cand[i]
                value = v
                break
            step *= shrink
            if step < min_step:
                stop = True
                break
        if stop:
            break
    _clamped_set(H, g, x, lo, hi, grad, clamped, m)
    for i in range(m):
        free[i] = not clamped[i]
    return _masked_cholesky(H, free, Lf, Hm, m) and not failed


@register_jitable
def _nan_stage(kK, Vxs, Vxxs, t, b, n, m):
    for i in range(m):
        for j in range(1 + n):
            kK[t, b, i, j] = np.nan
    for i in range(n):
        Vxs[t, b, i] = np.nan
        for j in range(n):
            Vxxs[t, b, i, j] = np.nan


@_jit
def recursion(F, L, c, VxT, VxxT, mu, lo, hi, us, warm, qp, kK, Vxs, Vxxs, dV, ok, b0, b1):
    """The Riccati recursion of :func:`trajopt.riccati.compiled.compiled_recursion`
    (box limits where ``lo`` is not empty) for the batch elements ``b0 <= b < b1``: the
    outputs' other elements are not touched, so several threads may share the arrays.
    Stages outside, elements inside: each stage's data of the batch are read and written
    in memory order."""
    T, B, n, nm = F.shape
    m = nm - n
    with_c = c.shape[0] > 0
    boxed = lo.shape[0] > 0
    lo_t = lo.shape[0] > 1   # limits (T or 1, B or 1, m): per stage, per element
    lo_b = lo.shape[1] > 1 if boxed else False
    has_warm = warm.shape[0] > 0
    vx = np.empty((B, n))  # the value of every element at the current stage
    vxx = np.empty((B, n, n))
    good = np.ones(B, dtype=np.bool_)
    kQu = np.zeros(B)
    kg = np.zeros(B)
    vc = np.empty(n)
    G = np.empty((n, 1 + nm))  # [V_x + V_xx c | V_xx F]
    J = np.empty((nm, 1 + nm))  # [[Q_x Q_xx Q_xu], [Q_u Q_ux Q_uu]]
    H = np.empty((m, m))  # Q_uu + mu I
    Lf = np.empty((m, m))  # its Cholesky factor (box: of the free block)
    S = np.empty((m, 1 + n))  # [k | K]
    P = np.empty((nm, 1 + n))  # J[:, :1+n] + J[:, 1+n:] [k | K]
    V = np.empty((n, 1 + n))
    g = np.empty(m)
    blo = np.empty(m)
    bhi = np.empty(m)
    x0 = np.empty(m)
    xq = np.empty(m)
    clamped = np.empty(m, dtype=np.bool_)
    grad = np.empty(m)
    free = np.empty(m, dtype=np.bool_)
    d = np.empty((m, 1))
    cand = np.empty(m)
    Hm = np.empty((m, m))
    for b in range(b0, b1):
        for i in range(n):
            vx[b, i] = VxT[b, i]
            for j in range(n):
                vxx[b, i, j] = VxxT[b, i, j]
    for t in range(T - 1, -1, -1):
        for b in range(b0, b1):
            if not good[b]:
                _nan_stage(kK, Vxs, Vxxs, t, b, n, m)
                continue
            for i in range(n):
                s = vx[b, i]
                if with_c:
                    for q in range(n):
                        s += vxx[b, i, q] * c[t, b, q]
                vc[i] = s
            for i in range(n):
                G[i, 0] = vc[i]
                for j in range(nm):
                    s = 0.0
                    for q in range(n):
                        s += vxx[b, i, q] * F[t, b, q, j]
                    G[i, 1 + j] = s
            for r in range(nm):
                for j in range(1 + nm):
                    s = L[t, b, r, j]
                    for q in range(n):
                        s += F[t, b, q, r] * G[q, j]
                    J[r, j] = s
            for i in range(m):
                for j in range(m):
                    H[i, j] = J[n + i, 1 + n + j]
                H[i, i] += mu[b]
            if boxed:
                for i in range(m):
                    g[i] = J[n + i, 0]
                    blo[i] = lo[t if lo_t else 0, b if lo_b else 0, i] - us[t, b, i]
                    bhi[i] = hi[t if lo_t else 0, b if lo_b else 0, i] - us[t, b, i]
                    x0[i] = warm[t, b, i] if has_warm else 0.0
                # the common cases inlined: one control, or the minimizer inside the box
                if m == 1:
                    ok_t = _box_qp_scalar(H, g, blo, bhi, xq, clamped, Lf)
                else:
                    ok_t = _box_qp_inside(H, g, blo, bhi, xq, clamped, Lf, d, m) or \
                        _box_qp_projected(H, g, blo, bhi, x0, has_warm, xq, clamped, Lf,
                                          m, grad, free, d, cand, Hm, qp)
                if ok_t:
                    # k the QP's minimizer; K = -H_free^{-1} Q_ux with clamped rows zero
                    for i in range(m):
                        S[i, 0] = xq[i]
                        for j in range(n):
                            S[i, 1 + j] = 0.0 if clamped[i] else -J[n + i, 1 + j]
                    for j in range(n):
                        _chol_solve_col(Lf, S, 1 + j, m)
            else:
                ok_t = _cholesky(H, Lf, m)
                if ok_t:  # [k | K] = -(Q_uu + mu I)^{-1} [Q_u | Q_ux]
                    for i in range(m):
                        for j in range(1 + n):
                            S[i, j] = -J[n + i, j]
                    for j in range(1 + n):
                        _chol_solve_col(Lf, S, j, m)
            if not ok_t:
                good[b] = False
                _nan_stage(kK, Vxs, Vxxs, t, b, n, m)
                continue
            for r in range(nm):
                for j in range(1 + n):
                    s = J[r, j]
                    for q in range(m):
                        s += J[r, 1 + n + q] * S[q, j]
                    P[r, j] = s
            for i in range(n):
                for j in range(1 + n):
                    s = P[i, j]
                    for q in range(m):
                        s += S[q, 1 + i] * P[n + q, j]
                    V[i, j] = s
            for i in range(n):
                vx[b, i] = V[i, 0]
                for j in range(i + 1):
                    a = 0.5 * (V[i, 1 + j] + V[j, 1 + i])
                    vxx[b, i, j] = a
                    vxx[b, j, i] = a
            for q in range(m):
                kQu[b] += S[q, 0] * J[n + q, 0]
                kg[b] += S[q, 0] * P[n + q, 0]
            for i in range(m):
                for j in range(1 + n):
                    kK[t, b, i, j] = S[i, j]
            for i in range(n):
                Vxs[t, b, i] = vx[b, i]
                for j in range(n):
                    Vxxs[t, b, i, j] = vxx[b, i, j]
    for b in range(b0, b1):
        dV[b, 0] = kQu[b]
        dV[b, 1] = 0.5 * (kg[b] - kQu[b])
        ok[b] = good[b] and np.isfinite(kQu[b]) and np.isfinite(kg[b])


@_jit
def rollout(A, Bm, c, ff, K, xbar, x0, xs, us):
    """The rollout of :func:`trajopt.lqr.compiled_rollout.compiled_rollout`."""
    T, Bn, m = ff.shape
    n = x0.shape[1]
    closed = K.shape[0] > 0
    with_c = c.shape[0] > 0
    x = np.empty(n)
    xn = np.empty(n)
    u = np.empty(m)
    for b in range(Bn):
        for i in range(n):
            x[i] = x0[b, i]
            xs[0, b, i] = x0[b, i]
        for t in range(T):
            ta = t if A.shape[0] > 1 else 0
            tb = t if Bm.shape[0] > 1 else 0
            for i in range(m):
                s = ff[t, b, i]
                if closed:
                    for j in range(n):
                        s += K[t, b, i, j] * (x[j] - xbar[t, b, j])
                us[t, b, i] = s
            for i in range(m):  # the control as stored (float32: rounded), as the loop
                u[i] = us[t, b, i]
            for i in range(n):
                s = 0.0
                for j in range(n):
                    s += A[ta, i, j] * x[j]
                for j in range(m):
                    s += Bm[tb, i, j] * u[j]
                if with_c:
                    s += c[t if c.shape[0] > 1 else 0, i]
                xn[i] = s
            for i in range(n):
                xs[t + 1, b, i] = xn[i]
                x[i] = xs[t + 1, b, i]
