"""The numba kernel of :mod:`trajopt.dare.doubling` (imported on first use: importing this
module imports numba; the kernel is compiled on its first call, or loaded from numba's
cache).

Plain loops over one small system at a time, in float64; the math is documented in
:mod:`trajopt.dare.doubling`.
"""

from __future__ import annotations

import numba
import numpy as np
from numba.extending import register_jitable

__all__ = ["sda"]

_jit = numba.njit(cache=True, nogil=True, error_model="numpy")

_TINY = 2.2250738585072014e-308  # float64's smallest normal number


@register_jitable
def _lu_solve(W, S, n, cols):
    """``S[:, :cols] <- W^{-1} S[:, :cols]`` by LU with partial pivoting (W overwritten).
    A zero pivot gives inf / NaN (``error_model="numpy"``), which the caller detects."""
    for k in range(n):
        p = k
        big = abs(W[k, k])
        for i in range(k + 1, n):
            if abs(W[i, k]) > big:
                big = abs(W[i, k])
                p = i
        if p != k:
            for j in range(n):
                t = W[k, j]
                W[k, j] = W[p, j]
                W[p, j] = t
            for j in range(cols):
                t = S[k, j]
                S[k, j] = S[p, j]
                S[p, j] = t
        d = W[k, k]
        for i in range(k + 1, n):
            f = W[i, k] / d
            for j in range(k + 1, n):
                W[i, j] -= f * W[k, j]
            for j in range(cols):
                S[i, j] -= f * S[k, j]
    for k in range(n - 1, -1, -1):
        d = W[k, k]
        for j in range(cols):
            S[k, j] /= d
        for i in range(k):
            f = W[i, k]
            for j in range(cols):
                S[i, j] -= f * S[k, j]


@register_jitable
def _times(L, R, off, out, n):
    """``out = L @ R[:, off:off + n]`` (n x n)."""
    for i in range(n):
        for j in range(n):
            out[i, j] = 0.0
        for k in range(n):
            a = L[i, k]
            for j in range(n):
                out[i, j] += a * R[k, off + j]


@register_jitable
def _norm(M, n):
    """The Frobenius norm of M (n x n), scaled by its largest entry so that squares of
    entries near the float range's ends neither overflow nor underflow (as LAPACK's);
    inf / NaN where an entry is."""
    big = 0.0
    for i in range(n):
        for j in range(n):
            a = abs(M[i, j])
            if not a <= big:
                if a != a:   # NaN
                    return a
                big = a
    if big == 0.0 or not np.isfinite(big):
        return big
    s = 0.0
    for i in range(n):
        for j in range(n):
            q = M[i, j] / big
            s += q * q
    return big * np.sqrt(s)


@_jit
def sda(A0, G0, H0, tol, max_iter, X, done):
    """SDA on the systems ``A0, G0, H0`` (b, n, n), one after another: ``X`` (b, n, n)
    gets the last ``H_k``, ``done`` (b,) whether it converged with ``A_k`` vanished (the
    stopping rule of :func:`trajopt.dare.doubling._iterate`)."""
    nb, n, _ = A0.shape
    A = np.empty((n, n))
    G = np.empty((n, n))
    H = np.empty((n, n))
    W = np.empty((n, n))
    S = np.empty((n, 2 * n))
    T = np.empty((n, n))
    U = np.empty((n, n))
    root_eps = np.sqrt(np.finfo(np.float64).eps)
    for b in range(nb):
        for i in range(n):
            for j in range(n):
                A[i, j] = A0[b, i, j]
                G[i, j] = G0[b, i, j]
                H[i, j] = H0[b, i, j]
        a0 = max(_norm(A, n), _TINY)
        conv = False
        it = 0
        while it < max_iter:
            it += 1
            # W = I + G H;  S = W^{-1} [A | G] = [WA | WG]
            for i in range(n):
                for j in range(n):
                    W[i, j] = 0.0
                    S[i, j] = A[i, j]
                    S[i, n + j] = G[i, j]
                W[i, i] = 1.0
                for k in range(n):
                    g = G[i, k]
                    for j in range(n):
                        W[i, j] += g * H[k, j]
            _lu_solve(W, S, n, 2 * n)
            # H <- sym(H + A' (H WA))  (sym(M) = (M + M') / 2, as the torch loop: where H is
            # nearly singular, forming only a triangle left residuals ~1e3 times larger)
            _times(H, S, 0, T, n)
            for i in range(n):
                for j in range(n):
                    U[i, j] = 0.0
            for k in range(n):
                for i in range(n):
                    a = A[k, i]
                    for j in range(n):
                        U[i, j] += a * T[k, j]
            for i in range(n):
                for j in range(n):
                    v = 0.5 * ((H[i, j] + U[i, j]) + (H[j, i] + U[j, i]))
                    T[i, j] = v - H[i, j]
                    W[i, j] = v   # (W's factors are spent)
            change = _norm(T, n)
            size = _norm(W, n)
            for i in range(n):
                for j in range(n):
                    H[i, j] = W[i, j]
            # G <- sym(G + (A WG) A')
            _times(A, S, n, T, n)
            for i in range(n):
                for j in range(n):
                    s = 0.0
                    for k in range(n):
                        s += T[i, k] * A[j, k]
                    U[i, j] = G[i, j] + s
            for i in range(n):
                for j in range(i, n):
                    v = 0.5 * (U[i, j] + U[j, i])
                    G[i, j] = v
                    G[j, i] = v
            # A <- A WA
            _times(A, S, 0, T, n)
            for i in range(n):
                for j in range(n):
                    A[i, j] = T[i, j]
            if not np.isfinite(change):
                break
            if change <= tol * size and _norm(A, n) <= root_eps * a0:
                conv = True
                break
        for i in range(n):
            for j in range(n):
                X[b, i, j] = H[i, j]
        done[b] = conv
