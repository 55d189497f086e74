r"""Structured doubling algorithm (SDA) for the DARE, batched in torch.

After eliminating the cross term and the descriptor matrix (:math:`E` invertible,
:math:`R \succ 0`)

.. math::

    \hat A = E^{-1}(A - B R^{-1} S^\top), \quad \hat B = E^{-1} B, \quad
    \hat Q = Q - S R^{-1} S^\top, \quad G = \hat B R^{-1} \hat B^\top ,

the equation becomes :math:`Y = \hat A^\top Y (I + G Y)^{-1} \hat A + \hat Q` for
:math:`Y = E^\top X E`, which SDA (Chu, Fan & Lin 2005, "Structure-preserving algorithms
for periodic discrete-time algebraic Riccati equations"; Lin & Xu 2006) solves by

.. math::

    W_k &= I + G_k H_k, \\
    A_{k+1} &= A_k W_k^{-1} A_k, \quad
    G_{k+1} = G_k + A_k W_k^{-1} G_k A_k^\top, \quad
    H_{k+1} = H_k + A_k^\top H_k W_k^{-1} A_k ,

starting from :math:`(\hat A, G, \hat Q)`; :math:`H_k \to Y` quadratically when the
stabilizing solution exists.  Every step is a batched solve and a few matmuls, so a batch
of systems (on any device) is solved at once (:func:`_iterate`); float64 CPU data of at
most :data:`MAX_COMPILED_N` states take the same steps in one compiled loop over the
systems instead (:func:`_iterate_compiled`, the rule :func:`compiled_pays`;
``docs/dare.md``, "Which loop runs the doubling").
"""

from __future__ import annotations

import functools
import operator

import numpy as np
import torch

from .._linalg import batched_solve, finite_rows, sym
from .._threads import in_slices, slices_for
from ..errors import NumericalError
from ..riccati.compiled import compilable
from ._common import DAREData


def _spd_solve(M: torch.Tensor, rhs: torch.Tensor, name: str) -> torch.Tensor:
    L, info = torch.linalg.cholesky_ex(M)
    if bool((info != 0).any()):
        raise NumericalError(
            f"method='doubling' needs {name} positive definite; use method='scipy' or "
            f"'slycot' (or 'auto') for a singular or indefinite {name}")
    return torch.cholesky_solve(rhs, L)


def solve_doubling(d: DAREData, *, tol: float | None = None, max_iter: int = 100
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve the DARE for every batch element by SDA.

    Parameters
    ----------
    d : DAREData
        Validated data, A (..., n, n), B (..., n, m), ...
    tol : float, optional
        Stop when ``||H_{k+1} - H_k||_F <= tol ||H_{k+1}||_F`` for every element
        (default: 10 n eps of the dtype).
    max_iter : int

    Returns
    -------
    X : (..., n, n)
        The solution (non-finite entries where the iteration broke down).
    converged : (...) bool
        The iteration converged *and* certified the solution stabilizing: in SDA
        ``A_k`` equals ``(E^{-1}(A + BK))^{2^k}`` up to a similarity, so it can only
        vanish when the closed loop is stable; ``||A_k||_F <= sqrt(eps) ||A_0||_F`` is
        required at the end.
    """
    n = d.n
    eps = torch.finfo(d.A.dtype).eps
    tol = 10 * n * eps if tol is None else tol
    A, B, Q = d.A, d.B, d.Q
    if d.S is not None:
        RinvSt = _spd_solve(d.R, d.S.transpose(-1, -2), "R")
        A = A - B @ RinvSt
        Q = sym(Q - d.S @ RinvSt)
    if d.E is not None:
        try:
            EinvAB = torch.linalg.solve(d.E, torch.cat([A, B], dim=-1))
        except RuntimeError as exc:  # singular E
            raise NumericalError("method='doubling' needs an invertible E") from exc
        A, B = EinvAB[..., :n], EinvAB[..., n:]
    G = sym(B @ _spd_solve(d.R, B.transpose(-1, -2), "R"))
    H = Q
    iterate = (_iterate_compiled if compiled_pays(n, A, G, H) and not torch.is_tensor(tol)
               else _iterate)
    X, converged = iterate(A.reshape(-1, n, n), G.reshape(-1, n, n), H.reshape(-1, n, n),
                           tol, max_iter)
    X, converged = X.reshape(*d.batch, n, n), converged.reshape(d.batch)
    if d.E is not None:
        Einv_t = torch.linalg.inv(d.E).transpose(-1, -2)
        X = sym(Einv_t @ X @ Einv_t.transpose(-1, -2))
    return X, converged & finite_rows(X)


def _iterate(A: torch.Tensor, G: torch.Tensor, H: torch.Tensor, tol: float, max_iter: int
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """SDA on a flat batch (b, n, n).  Elements that converged are taken out of the
    working set once a quarter of it is done, so the last iterations only touch the
    slow (nearly marginally stable) systems."""
    n = A.shape[-1]
    eps = torch.finfo(A.dtype).eps
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    X = H.clone()
    done = torch.zeros(A.shape[0], dtype=torch.bool, device=A.device)
    active = torch.arange(A.shape[0], device=A.device)
    a0 = torch.linalg.matrix_norm(A).clamp_min(torch.finfo(A.dtype).tiny)
    for _ in range(max_iter):
        W = torch.baddbmm(eye, G, H) if G.ndim == 3 else eye + G @ H
        sol = batched_solve(W, torch.cat([A, G], dim=-1))
        WA, WG = sol[..., :n], sol[..., n:]
        # a contiguous A' (a product with a transposed right operand is ~3x slower on
        # the CPU) and in-place symmetrization: fewer passes over the batch
        At = A.transpose(-1, -2).contiguous()
        H_new = H + At @ (H @ WA)
        H_new = torch.add(H_new, H_new.transpose(-1, -2)).mul_(0.5)
        G = G + (A @ WG) @ At
        G = torch.add(G, G.transpose(-1, -2)).mul_(0.5)
        A = A @ WA
        change = torch.linalg.matrix_norm(H_new - H)
        H = H_new
        conv = (change <= tol * torch.linalg.matrix_norm(H)) & (
            torch.linalg.matrix_norm(A) <= eps ** 0.5 * a0)
        stop = conv | ~torch.isfinite(change)
        if bool(stop.all()):
            X[active] = H
            done[active] = conv
            break
        if 4 * int(stop.sum()) >= stop.numel():
            X[active[stop]] = H[stop]
            done[active[stop]] = conv[stop]
            keep = ~stop
            active, A, G, H, a0 = active[keep], A[keep], G[keep], H[keep], a0[keep]
    else:
        X[active] = H
    return X, done


#: largest n for which the SDA runs as the compiled loop (``docs/performance.md``)
MAX_COMPILED_N = 24

#: smallest ``batch * n^3`` a thread of the compiled loop is given
MIN_WORK_PER_THREAD = 2 ** 16


def compiled_pays(n: int, *tensors: torch.Tensor) -> bool:
    """The rule: float64 CPU data of at most :data:`MAX_COMPILED_N` states that need no
    gradient (``solve_dare`` detaches its data before solving: data that require grad
    are solved here too), numba available (:func:`trajopt.riccati.compiled.compilable`);
    :func:`solve_doubling` also keeps a tensor ``tol`` (per element) on the torch loop."""
    return (n <= MAX_COMPILED_N and all(v.dtype == torch.float64 for v in tensors)
            and compilable(*tensors))


@functools.cache
def _kernel():
    from ._kernels import sda
    return sda


def _iterate_compiled(A: torch.Tensor, G: torch.Tensor, H: torch.Tensor, tol: float,
                      max_iter: int) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`_iterate` as one compiled loop over the systems (:mod:`._kernels`: no
    per-operation dispatch, each system's matrices in the cache, each system stopped by
    itself), its batch cut into slices on the caller's threads."""
    b, n = A.shape[0], A.shape[-1]
    steps_most = min(operator.index(max_iter), 2 ** 62)  # a float: TypeError, as range()
    arrays = [np.ascontiguousarray(v.resolve_neg().numpy()) for v in (A, G, H)]
    X = np.empty((b, n, n))
    done = np.zeros(b, dtype=np.bool_)
    sda = _kernel()

    def run(b0: int, b1: int) -> None:
        sda(*(v[b0:b1] for v in arrays), float(tol), steps_most, X[b0:b1], done[b0:b1])
    in_slices(run, b, slices_for(b * n ** 3, b, MIN_WORK_PER_THREAD))
    return torch.from_numpy(X), torch.from_numpy(done)
