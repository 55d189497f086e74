r"""The Riccati recursion as one compiled CPU loop, for small problems.

A backward pass of a small problem (one 8-state LQ problem, a pendulum) is a few thousand
torch operations on a few dozen numbers each: ~3-6 us of dispatch per operation, so
~10-20 ms for 100 stages whatever the arithmetic (``docs/performance.md``). This module
runs the same recursion -- the expansion, the regularized Cholesky gains and the general
value update of :mod:`trajopt.riccati.step`, stage by stage -- as one loop compiled by
`numba <https://numba.pydata.org>`_ (machine code, no per-operation dispatch): ~2-40 us
per stage and element instead of ~100 us per stage.

Per element ``b`` and stage ``t = T-1, ..., 0``, with ``V = (V_x, V_xx)`` of stage ``t+1``:

.. math::

    J &= L_t + F_t^\top [\,V_x + V_{xx} c_t \mid V_{xx} F_t\,]
         \quad\text{(the packed expansion of } \texttt{expand\_q\_joint}\text{)}, \\
    [k \mid K] &= -(Q_{uu} + \mu_b I)^{-1} [Q_u \mid Q_{ux}]
         \quad\text{(Cholesky of the lower triangle, as } \texttt{cholesky\_ex}\text{)}, \\
    P &= J_{:, :1+n} + J_{:, 1+n:} [k \mid K], \qquad
    [V_x \mid V_{xx}] = P_x + K^\top P_u \ \text{(}V_{xx}\text{ symmetrized)},

and the expected change :math:`[\sum k^\top Q_u, \tfrac12 \sum k^\top Q_{uu} k]` from
:math:`k^\top (Q_u + Q_{uu} k)`. An element whose regularized :math:`Q_{uu}` is not
positive definite at some stage gets ``ok = False`` and NaN from that stage down (the
torch recursion leaves meaningless numbers there; both are flagged).

The arithmetic is done in float64 whatever the input dtype (float32 results are rounded
once at the end), so it equals the torch recursion to the rounding of the input dtype,
not bitwise.

**When it is used** (:func:`compiled_pays`): numba importable, a CPU tensor of float32 or
float64 that needs no gradient and is not under a torch.func transform, and
``batch * (n + m)^3 <=`` :data:`MAX_WORK` (measured with two threads, T = 50: the
compiled loop 1.35-70x faster than the torch recursion up to it, from one pendulum to
1,024 problems of 12 states; 0.78x at 64 problems of 40 states and 10 controls, where the
loop's plain triple products fall out of cache; the loop runs on one thread). The first call in a
process loads the compiled loop from numba's cache (``__pycache__`` beside this file or
numba's user cache directory): ~1 s; the very first on a machine compiles it, ~5-20 s per
dtype.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["CompiledPass", "compiled_available", "compilable", "compiled_pays",
           "compiled_recursion", "jit", "MAX_WORK"]

#: largest ``batch * (n + m)^3`` for which the solvers take the compiled loop
#: (``docs/performance.md``, "A compiled recursion")
MAX_WORK = 2 ** 22

#: set to "0" to keep the solvers off the compiled loop (a debugging aid: the torch
#: recursion is then used everywhere)
ENV_SWITCH = "TRAJOPT_COMPILED"


@functools.cache
def jit(fn):
    """``fn`` compiled by numba (imported, and the function compiled or loaded from its
    cache, on first use), or None without numba."""
    try:
        import numba
    except ImportError:
        return None
    return numba.njit(cache=True, nogil=True)(fn)


def _kernel():
    return jit(_recursion)


def compiled_available() -> bool:
    """Whether the compiled loops can run here (numba importable, not switched off by the
    environment variable ``TRAJOPT_COMPILED=0``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and _kernel() is not None


def compilable(*tensors: torch.Tensor) -> bool:
    """Whether a compiled loop may read and write ``tensors``: CPU, float32 / float64, no
    gradient, not under a torch.func transform, and :func:`compiled_available`."""
    for v in tensors:
        if (v.device.type != "cpu" or v.dtype not in (torch.float32, torch.float64)
                or v.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(v)):
            return False
    return compiled_available()


def compiled_pays(T: int, batch: int, n: int, m: int, *tensors: torch.Tensor) -> bool:
    """The solvers' rule for ``T`` stages of ``batch`` problems with ``n`` states and
    ``m`` controls whose data are ``tensors`` (see the module docstring)."""
    return T >= 1 and batch * (n + m) ** 3 <= MAX_WORK and compilable(*tensors)


@dataclass(frozen=True)
class CompiledPass:
    """One backward pass of :func:`compiled_recursion` (stages lead).

    Attributes
    ----------
    kK : (T, B, m, 1+n)
        The joint gains ``[k | K]``.
    Vx : (T, B, n), Vxx : (T, B, n, n)
        The value derivatives of stages 0 .. T-1.
    dV : (B, 2)
        ``[sum_t k'Q_u, 1/2 sum_t k'Q_uu k]``.
    ok : (B,) bool
        Every stage's regularized ``Q_uu`` positive definite and ``dV`` finite.
    """

    kK: torch.Tensor
    Vx: torch.Tensor
    Vxx: torch.Tensor
    dV: torch.Tensor
    ok: torch.Tensor


def compiled_recursion(F: torch.Tensor, L: torch.Tensor, c: torch.Tensor | None,
                       Vx: torch.Tensor, Vxx: torch.Tensor, mu: torch.Tensor
                       ) -> CompiledPass:
    """The regularized Riccati recursion of the module docstring over stacked stages.

    Parameters
    ----------
    F : (T, B, n, n+m)
        ``[f_x f_u]`` per stage (:func:`~trajopt.riccati.expansion.joint_blocks`).
    L : (T, B, n+m, 1+n+m)
        The packed cost blocks.
    c : (T, B, n) or None
        Affine offsets of the dynamics.
    Vx : (B, n), Vxx : (B, n, n)
        The terminal value derivatives.
    mu : (B,)
        Levenberg-Marquardt regularization of ``Q_uu`` per element.

    Callers check :func:`compiled_pays` first (CPU, float32 / float64, no autograd).
    """
    T, B, n, nm = F.shape
    m = nm - n
    dt = F.dtype

    def arr(v):
        return np.ascontiguousarray(v.detach().to(dt).numpy())

    cc = arr(c) if c is not None else np.zeros((0, 0, 0), dtype=arr(F).dtype)
    kK = torch.empty(T, B, m, 1 + n, dtype=dt)
    Vxs = torch.empty(T, B, n, dtype=dt)
    Vxxs = torch.empty(T, B, n, n, dtype=dt)
    dV = torch.empty(B, 2, dtype=torch.float64)
    ok = torch.empty(B, dtype=torch.bool)
    _kernel()(arr(F), arr(L), cc, arr(Vx), arr(Vxx), arr(mu), kK.numpy(), Vxs.numpy(),
              Vxxs.numpy(), dV.numpy(), ok.numpy())
    return CompiledPass(kK, Vxs, Vxxs, dV.to(dt), ok)


def _recursion(F, L, c, VxT, VxxT, mu, kK, Vxs, Vxxs, dV, ok):  # pragma: no cover
    # (compiled by numba; the plain-Python call is exercised by the tests)
    T, B, n, nm = F.shape
    m = nm - n
    with_c = c.shape[0] > 0
    vx = np.empty(n)
    vc = np.empty(n)
    vxx = np.empty((n, n))
    G = np.empty((n, 1 + nm))  # [V_x + V_xx c | V_xx F]
    J = np.empty((nm, 1 + nm))  # [[Q_x Q_xx Q_xu], [Q_u Q_ux Q_uu]]
    H = np.empty((m, m))  # Cholesky factor of Q_uu + mu I (lower)
    S = np.empty((m, 1 + n))  # [k | K]
    P = np.empty((nm, 1 + n))  # J[:, :1+n] + J[:, 1+n:] [k | K]
    V = np.empty((n, 1 + n))
    for b in range(B):
        for i in range(n):
            vx[i] = VxT[b, i]
            for j in range(n):
                vxx[i, j] = VxxT[b, i, j]
        good = True
        kQu = 0.0
        kg = 0.0
        for t in range(T - 1, -1, -1):
            if not good:
                for i in range(m):
                    for j in range(1 + n):
                        kK[t, b, i, j] = np.nan
                for i in range(n):
                    Vxs[t, b, i] = np.nan
                    for j in range(n):
                        Vxxs[t, b, i, j] = np.nan
                continue
            # G = [V_x + V_xx c | V_xx F]
            for i in range(n):
                s = vx[i]
                if with_c:
                    for q in range(n):
                        s += vxx[i, q] * c[t, b, q]
                vc[i] = s
            for i in range(n):
                G[i, 0] = vc[i]
                for j in range(nm):
                    s = 0.0
                    for q in range(n):
                        s += vxx[i, q] * F[t, b, q, j]
                    G[i, 1 + j] = s
            # J = L + F' G
            for r in range(nm):
                for j in range(1 + nm):
                    s = L[t, b, r, j]
                    for q in range(n):
                        s += F[t, b, q, r] * G[q, j]
                    J[r, j] = s
            # Cholesky of Q_uu + mu I, from its lower triangle
            for j in range(m):
                s = J[n + j, 1 + n + j] + mu[b]
                for q in range(j):
                    s -= H[j, q] * H[j, q]
                if not s > 0.0:
                    good = False
                    break
                H[j, j] = np.sqrt(s)
                for i in range(j + 1, m):
                    s = J[n + i, 1 + n + j]
                    for q in range(j):
                        s -= H[i, q] * H[j, q]
                    H[i, j] = s / H[j, j]
            if not good:
                for i in range(m):
                    for j in range(1 + n):
                        kK[t, b, i, j] = np.nan
                for i in range(n):
                    Vxs[t, b, i] = np.nan
                    for j in range(n):
                        Vxxs[t, b, i, j] = np.nan
                continue
            # [k | K] = -(H H')^{-1} [Q_u | Q_ux]
            for j in range(1 + n):
                for i in range(m):
                    s = -J[n + i, j]
                    for q in range(i):
                        s -= H[i, q] * S[q, j]
                    S[i, j] = s / H[i, i]
                for i in range(m - 1, -1, -1):
                    s = S[i, j]
                    for q in range(i + 1, m):
                        s -= H[q, i] * S[q, j]
                    S[i, j] = s / H[i, i]
            # P = J[:, :1+n] + J[:, 1+n:] [k | K]
            for r in range(nm):
                for j in range(1 + n):
                    s = J[r, j]
                    for q in range(m):
                        s += J[r, 1 + n + q] * S[q, j]
                    P[r, j] = s
            # [V_x | V_xx] = P_x + K' P_u
            for i in range(n):
                for j in range(1 + n):
                    s = P[i, j]
                    for q in range(m):
                        s += S[q, 1 + i] * P[n + q, j]
                    V[i, j] = s
            for i in range(n):
                vx[i] = V[i, 0]
                for j in range(i + 1):
                    a = 0.5 * (V[i, 1 + j] + V[j, 1 + i])
                    vxx[i, j] = a
                    vxx[j, i] = a
            for q in range(m):
                kQu += S[q, 0] * J[n + q, 0]
                kg += S[q, 0] * P[n + q, 0]
            for i in range(m):
                for j in range(1 + n):
                    kK[t, b, i, j] = S[i, j]
            for i in range(n):
                Vxs[t, b, i] = vx[i]
                for j in range(n):
                    Vxxs[t, b, i, j] = vxx[i, j]
        dV[b, 0] = kQu
        dV[b, 1] = 0.5 * (kg - kQu)
        ok[b] = good and np.isfinite(kQu) and np.isfinite(kg)
