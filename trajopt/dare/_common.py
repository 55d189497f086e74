r"""Shared pieces of the DARE solvers: argument checks, residual, gain, diagnostics.

The equation is scipy's ``solve_discrete_are`` form

.. math::

    A^\top X A - E^\top X E - (A^\top X B + S)(R + B^\top X B)^{-1}(B^\top X A + S^\top)
    + Q = 0 ,

and the gain is returned in the DDP sign convention ``u = K x`` with
:math:`K = -(R + B^\top X B)^{-1}(B^\top X A + S^\top)` (MATLAB's ``dlqr`` returns
:math:`-K`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._checks import (
    batch_shape,
    check_finite,
    check_matrix,
    check_square,
    check_symmetric,
    shape_str,
)
from .._linalg import batched_solve, sym
from ..errors import ShapeError


@dataclass(frozen=True)
class DAREData:
    """Validated, broadcast DARE data as tensors (batch shape ``batch``)."""

    A: torch.Tensor
    B: torch.Tensor
    Q: torch.Tensor
    R: torch.Tensor
    E: torch.Tensor | None
    S: torch.Tensor | None

    @property
    def batch(self) -> torch.Size:
        return self.A.shape[:-2]

    @property
    def n(self) -> int:
        return self.A.shape[-1]

    @property
    def m(self) -> int:
        return self.B.shape[-1]

    def subset(self, index) -> DAREData:
        """The elements ``index`` (a list or mask over the flattened batch), as a flat
        batch."""
        def pick(t):
            return None if t is None else t.reshape(-1, *t.shape[-2:])[index]
        return DAREData(pick(self.A), pick(self.B), pick(self.Q), pick(self.R),
                        pick(self.E), pick(self.S))

    def element(self, index: tuple[int, ...]) -> DAREData:
        """One batch element (unbatched tensors)."""
        def pick(t):
            return None if t is None else t[index]
        return DAREData(pick(self.A), pick(self.B), pick(self.Q), pick(self.R),
                        pick(self.E), pick(self.S))


def prepare(A, B, Q, R, E, S) -> DAREData:
    """Check shapes, finiteness and symmetry; broadcast all batch dimensions."""
    n = check_square(A, "A")
    check_matrix(B, "B", n, None)
    m = B.shape[-1]
    if m == 0:
        raise ShapeError(f"B must have at least one column; got {shape_str(B)}")
    check_square(Q, "Q", n)
    check_square(R, "R", m)
    if E is not None:
        check_square(E, "E", n)
    if S is not None:
        check_matrix(S, "S", n, m)
    named = {"A": A, "B": B, "Q": Q, "R": R, "E": E, "S": S}
    for name, t in named.items():
        if t is not None:
            check_finite(t, name)
    check_symmetric(Q, "Q")
    check_symmetric(R, "R")
    batch = batch_shape(*((t, 2, name) for name, t in named.items()))

    def bc(t):
        return None if t is None else t.expand(*batch, *t.shape[-2:])
    return DAREData(bc(A), bc(B), sym(bc(Q)), sym(bc(R)), bc(E), bc(S))


def gain(d: DAREData, X: torch.Tensor) -> torch.Tensor:
    """``K = -(R + B'XB)^{-1} (B'XA + S')`` (..., m, n)."""
    BtX = d.B.transpose(-1, -2) @ X
    G = sym(d.R + BtX @ d.B)
    H = BtX @ d.A
    if d.S is not None:
        H = H + d.S.transpose(-1, -2)
    return -batched_solve(G, H)


def residual_matrix(d: DAREData, X: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Riccati residual and the sum of the norms of its terms (for scaling)."""
    At = d.A.transpose(-1, -2)
    AXA = At @ X @ d.A
    EXE = X if d.E is None else d.E.transpose(-1, -2) @ X @ d.E
    H = d.B.transpose(-1, -2) @ X @ d.A
    if d.S is not None:
        H = H + d.S.transpose(-1, -2)
    G = sym(d.R + d.B.transpose(-1, -2) @ X @ d.B)
    corr = H.transpose(-1, -2) @ batched_solve(G, H)
    res = sym(AXA - EXE - corr + d.Q)

    def nrm(t):
        return torch.linalg.matrix_norm(t)
    scale = nrm(AXA) + nrm(EXE) + nrm(corr) + nrm(d.Q)
    return res, scale


def relative_residual(d: DAREData, X: torch.Tensor) -> torch.Tensor:
    r"""``||Ric(X)||_F / (||A'XA||_F + ||E'XE||_F + ||(..)G^{-1}(..)||_F + ||Q||_F)``.

    NaN-free: a non-finite X gives ``inf``.
    """
    res, scale = residual_matrix(d, X)
    rel = torch.linalg.matrix_norm(res) / scale.clamp_min(torch.finfo(X.dtype).tiny)
    return torch.where(torch.isfinite(rel), rel, torch.full_like(rel, float("inf")))


def closed_loop_eigvals(d: DAREData, K: torch.Tensor) -> torch.Tensor:
    """Eigenvalues of the pencil ``(A + BK, E)`` (..., n), complex."""
    Acl = d.A + d.B @ K
    if d.E is not None:
        Acl = batched_solve(d.E, Acl)
    return torch.linalg.eigvals(Acl)


def uncontrollable_unstable_mode(d: DAREData) -> complex | None:
    """PBH test on one (unbatched) system: an eigenvalue ``|lambda| >= 1`` of (A, E) at
    which ``[A - lambda E, B]`` loses rank, or None."""
    A = d.A.to(torch.complex128)
    E = torch.eye(d.n, dtype=A.dtype, device=A.device) if d.E is None else d.E.to(A.dtype)
    lam = torch.linalg.eigvals(torch.linalg.solve(E, A))
    Bc = d.B.to(A.dtype)
    scale = max(float(torch.linalg.matrix_norm(A, 2)), float(torch.linalg.matrix_norm(Bc, 2)),
                1e-300)
    tol = 1e3 * d.n * torch.finfo(d.A.dtype).eps * scale
    for lv in lam.tolist():
        if abs(lv) < 1 - 1e-10:
            continue
        sv = torch.linalg.svdvals(torch.cat([A - lv * E, Bc], dim=-1))
        if float(sv[-1]) <= tol:
            return lv
    return None
