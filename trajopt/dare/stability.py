"""Closed-loop stability of a Riccati solution, in discrete or continuous time: the
Lyapunov certificate, the PBH test for an uncontrollable unstable mode, and the
:class:`~trajopt.errors.NotStabilizableError` that names it (used by ``solve_dare`` and
``solve_care``)."""

from __future__ import annotations

import torch

from .._linalg import sym
from ..errors import NotStabilizableError
from ._common import DAREData, unravel

__all__ = ["lyapunov_certificate", "stable_beyond_rounding", "uncontrollable_unstable_mode",
           "raise_unstabilizable"]


def lyapunov_certificate(d: DAREData, X: torch.Tensor, K: torch.Tensor,
                         continuous: bool = False) -> torch.Tensor:
    """(batch,) bool: ``X`` is positive definite and so is the closed loop's Lyapunov form
    -- ``W = X - Acl'X Acl`` (discrete) or ``W = -(Acl'X + X Acl)`` (continuous), ``Acl =
    A + BK`` -- by more than the rounding of forming it (``8 n eps |X| (|A| + |B||K|)^2``,
    resp. ``(|A| + |B||K|)``, Frobenius norms): that proves the closed loop with this K
    stable (Lyapunov).  At a Riccati solution ``W = [I; K]'[[Q, S], [S', R]][I; K]``
    minus the residual matrix; W is formed from the closed loop itself, not from Q, R and
    K, because where ``|A'XA|`` dwarfs Q that identity holds only to a residual larger
    than W (``1e8 A`` gave an unstable closed loop at relative residual 2e-16).  Two
    batched Cholesky factorizations; False (not proven) with E."""
    if d.E is not None:
        return torch.zeros(d.batch, dtype=torch.bool, device=X.device)
    K = K.detach()
    X = sym(X)
    Acl = d.A + d.B @ K
    XA = X @ Acl
    size = (torch.linalg.matrix_norm(d.A)
            + torch.linalg.matrix_norm(d.B) * torch.linalg.matrix_norm(K))
    if continuous:
        W = -(XA + XA.transpose(-1, -2))
    else:
        W = X - Acl.transpose(-1, -2) @ XA
        size = size * size
    margin = 8 * d.n * torch.finfo(X.dtype).eps * size * torch.linalg.matrix_norm(X)
    eye = torch.eye(d.n, dtype=X.dtype, device=X.device)
    ok_w = torch.linalg.cholesky_ex(sym(W) - margin[..., None, None] * eye)[1] == 0
    ok_x = torch.linalg.cholesky_ex(X)[1] == 0
    return ok_w & ok_x


def stable_beyond_rounding(d: DAREData, K, continuous: bool = False,
                           eps: float | None = None) -> torch.Tensor:
    r"""(batch,) bool: every eigenvalue :math:`\lambda_i` of the closed loop ``A + BK``
    is inside the unit circle (discrete) or the left half plane (continuous) by more than
    ``4 eps kappa_i (|A| + |B||K|)`` (Frobenius norms), four times the first-order bound
    on its shift under a relative rounding ``eps`` of the closed loop's data and the
    eigensolver's backward error; ``kappa_i = |v_i| |w_i|`` is its condition number
    (right and left eigenvectors, ``w_i' v_i = 1``).

    The solvers' fixed margin (``1000 n eps`` of the unit circle, of ``|A|_1`` for the
    imaginary axis) keeps a unit-circle mode that rounding moved inside from passing as
    stable; it also refused stable modes closer than that to the boundary: a float32
    spring chain sampled at 1 kHz (radius 1 - 1.1e-4 against a margin of 9.5e-4), a slow
    mode beside fast ones (``-1e-6`` beside ``-1e6``).  This test is asked only where that
    margin refused.  False for a defective or nearly defective closed loop (``kappa``
    not finite), with E (the test is for ``E = I``), and below float64: the test bounds
    the rounding of the closed loop for the gain K found, but near a unit-circle mode that
    Q does not weigh K itself is ~``sqrt(eps)`` off (3.5e-4 in float32: a review's hidden
    rotation came out at radius ``1 - 2.4e-5``), so float32 problems are decided in
    float64 (:mod:`trajopt.dare.precision`, which asks this test of the float64 solution
    with float32's ``eps``: the data's rounding)."""
    d = d.torch()
    if d.E is not None or d.A.dtype != torch.float64:
        return torch.zeros(d.batch, dtype=torch.bool, device=d.A.device)
    K = torch.as_tensor(K, dtype=d.A.dtype, device=d.A.device).detach()
    A, B = d.A.detach(), d.B.detach()
    lam, V = torch.linalg.eig(A + B @ K)
    W, info = torch.linalg.inv_ex(V)
    kappa = torch.linalg.vector_norm(V, dim=-2) * torch.linalg.vector_norm(W, dim=-1)
    size = (torch.linalg.matrix_norm(A)
            + torch.linalg.matrix_norm(B) * torch.linalg.matrix_norm(K))
    tol = 4 * (torch.finfo(A.dtype).eps if eps is None else eps) * kappa * size[..., None]
    room = -lam.real if continuous else 1 - lam.abs()
    return (room > tol).all(-1) & torch.isfinite(tol).all(-1) & (info == 0)


def uncontrollable_unstable_mode(d: DAREData, continuous: bool = False) -> complex | None:
    """PBH test on one (unbatched) system: an unstable eigenvalue of (A, E) -- ``|lambda|
    >= 1`` (discrete) or ``Re lambda >= 0`` (continuous) -- at which
    ``[A - lambda E, B]`` loses rank, or None."""
    d = d.torch()
    A = d.A.to(torch.complex128)
    E = torch.eye(d.n, dtype=A.dtype, device=A.device) if d.E is None else d.E.to(A.dtype)
    lam = torch.linalg.eigvals(torch.linalg.solve(E, A))
    Bc = d.B.to(A.dtype)
    scale_ = max(float(torch.linalg.matrix_norm(A, 2)), float(torch.linalg.matrix_norm(Bc, 2)),
                 1e-300)
    tol = 1e3 * d.n * torch.finfo(d.A.dtype).eps * scale_
    for lv in lam.tolist():
        stable = lv.real < -1e-10 * scale_ if continuous else abs(lv) < 1 - 1e-10
        if stable:
            continue
        sv = torch.linalg.svdvals(torch.cat([A - lv * E, Bc], dim=-1))
        if float(sv[-1]) <= tol:
            return lv
    return None


def raise_unstabilizable(d: DAREData, bad, what: str, continuous: bool = False) -> None:
    """Raise :class:`NotStabilizableError` for the first batch element in ``bad``, naming
    an uncontrollable unstable mode when there is one, else ``what``."""
    first = torch.nonzero(torch.as_tensor(bad).reshape(-1))[0].item()
    index = unravel(first, d.batch)
    label = d.label(index)
    where = f" for batch element {label}" if label else ""
    mode = uncontrollable_unstable_mode(d.element(index), continuous)
    if mode is not None:
        if continuous:
            which = "Re lambda >= 0" if mode.real >= 0 else \
                f"Re lambda = {mode.real:.6g}, within rounding of the imaginary axis"
        else:
            which = f"|lambda| = {abs(mode):.6g}" + (
                " >= 1" if abs(mode) >= 1 else ", within rounding of the unit circle")
        raise NotStabilizableError(
            f"no stabilizing solution{where}: the mode lambda = {mode:.6g} ({which}) is not "
            "controllable through B")
    axis = "the imaginary axis" if continuous else "the unit circle"
    raise NotStabilizableError(
        f"no stabilizing solution{where}: {what}; check that (A, B) is stabilizable and "
        f"that (Q, A) has no unobservable mode on {axis}")
