"""Closed-loop stability of a Riccati solution, in discrete or continuous time: the
Lyapunov certificate, the PBH test for an uncontrollable unstable mode, and the
:class:`~trajopt.errors.NotStabilizableError` that names it (used by ``solve_dare`` and
``solve_care``)."""

from __future__ import annotations

import torch

from .._linalg import sym
from ..errors import NotStabilizableError
from ._common import DAREData

__all__ = ["lyapunov_certificate", "uncontrollable_unstable_mode", "raise_unstabilizable"]


def lyapunov_certificate(d: DAREData, X: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """(batch,) bool: ``X`` and ``W = [I; K]'[[Q, S], [S', R]][I; K]`` are positive
    definite.  At a solution of the DARE, ``X = (A + BK)'X(A + BK) + W``; of the CARE,
    ``(A + BK)'X + X(A + BK) = -W``: either way that proves the closed loop stable
    (Lyapunov).  Two batched Cholesky factorizations; False (not proven) with E."""
    if d.E is not None:
        return torch.zeros(d.batch, dtype=torch.bool, device=X.device)
    K = K.detach()
    W = d.Q + K.transpose(-1, -2) @ d.R @ K
    if d.S is not None:
        SK = d.S @ K
        W = W + SK + SK.transpose(-1, -2)
    ok_w = torch.linalg.cholesky_ex(sym(W))[1] == 0
    ok_x = torch.linalg.cholesky_ex(sym(X))[1] == 0
    return ok_w & ok_x


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
    index = tuple(int(i) for i in torch.unravel_index(torch.tensor(first), d.batch)) \
        if len(d.batch) else ()
    label = d.label(index)
    where = f" for batch element {label}" if label else ""
    mode = uncontrollable_unstable_mode(d.element(index), continuous)
    if mode is not None:
        which = "Re lambda >= 0" if continuous else f"|lambda| = {abs(mode):.6g} >= 1"
        raise NotStabilizableError(
            f"no stabilizing solution{where}: the mode lambda = {mode:.6g} ({which}) is not "
            "controllable through B")
    axis = "the imaginary axis" if continuous else "the unit circle"
    raise NotStabilizableError(
        f"no stabilizing solution{where}: {what}; check that (A, B) is stabilizable and "
        f"that (Q, A) has no unobservable mode on {axis}")
