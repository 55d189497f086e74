r"""A unit-circle mode that the cost does not weigh: no stabilizing solution, though the
solvers find one to within their rounding.

With :math:`R \succ 0` and :math:`\hat Q = Q - S R^{-1} S^\top \succeq 0`, the DARE has a
stabilizing solution only if no eigenvalue :math:`\lambda` of the pencil
:math:`(\hat A, E)`, :math:`\hat A = A - B R^{-1} S^\top`, on the unit circle has an
eigenvector :math:`v` with :math:`\hat Q v = 0` (the pair is detectable on the circle).
Where one has, the solvers still return an answer: its gain is ~``sqrt(eps)`` off, which
moves the mode inside the circle by ``1e-10 .. 1.7e-7`` (40 random such problems, session
32: scipy itself returned 39 of them), beyond the fixed margin and the closed loop's
rounding test. This module finds such a mode after the fact:

- **on the circle**: :math:`||\lambda_i| - 1|` within :math:`16 n \epsilon \kappa_i
  (|A| + |B||R^{-1}S^\top| + |\lambda_i||E|)` (Frobenius norms), the first-order bound of
  the eigenvalue's shift under a relative rounding of the pencil's data with room for the
  eigensolver's backward error (``4 eps`` alone was too tight: an eigenvalue 1 of a matrix
  formed as ``T D T^-1`` came out ``10 eps`` off, by torch and numpy differently), with
  :math:`\kappa_i = |v_i||y_i| / |y_i^H E v_i|` (right and left eigenvectors); capped at
  :data:`DEFECTIVE_WINDOW`, which covers the ``sqrt(eps)`` spread of a defective pair
  (an eigenvector matrix that cannot be inverted gives the cap);
- **not weighed**: :math:`v^H \hat Q v \le 8 n \epsilon\, |v|^\top (|Q| + |S||R^{-1}
  S^\top|) |v|` (componentwise absolute values): the weight is at the rounding of forming
  :math:`\hat Q`. The quadratic form is what makes this decidable: an eigenvector off by
  :math:`\delta` (``sqrt(eps)`` for a defective pair) changes it by
  :math:`|\hat Q^{1/2}\delta|^2`, within the bound, while a mode that the cost does weigh
  keeps its weight to first order. Componentwise scales keep a small weight on a
  diagonal cost (``Q = diag(1e14, 1)``) a weight.

Not asked where R is not positive definite or :math:`\hat Q` is indefinite beyond its
rounding (the criterion above does not hold there), and only for closed loops within
:data:`NEAR_CIRCLE` of the circle (:func:`refuse_unweighted_circle_modes`), so that other
problems pay nothing; in a batch, of the elements whose closed-loop eigenvalues are
computed (those without the doubling and Lyapunov certificates: X does not weigh an
unweighted mode either, so the Lyapunov form vanishes along it and that certificate
fails). The CARE's analogue (``solve_care``: a mode on the imaginary axis, its real part
within the same window, the cap scaled by ``|A|``; closed loops within ``1e-4
max(|A|_1, 1)`` of the axis) is asked the same way. Session 33: over 40
random problems of each family of session 32's scan (a hidden rotation, lambda = 1 and
-1, a Jordan pair, a rotation hidden only through S, with E), every method accepts none
(they had accepted up to 38 of 40); the review's false refusals of session 32's attempt
are solved (``tests/trajopt/test_dare_detectability.py``).
"""

from __future__ import annotations

import math

import torch

from .._linalg import sym
from ..errors import NotStabilizableError
from ._common import DAREData, unravel

__all__ = ["NEAR_CIRCLE", "SPREAD", "DEFECTIVE", "near_circle", "unweighted_circle_mode",
           "refuse_unweighted_circle_modes"]

#: closed loops with a spectral radius above ``1 - near_circle(eps)`` are asked; a mode
#: is kept by the closed loop where ``|(A + BK) u - lambda E u| <= near_circle(eps) |E u|``
NEAR_CIRCLE = 1e-4
#: eigenvalues this close to the circle are candidates, and candidates this close to each
#: other one cluster: a Jordan pair's computed eigenvalues are ``sqrt(eps |coupling|)``
#: apart (4.7e-7 for a double integrator in a random basis), a triple's ``eps^(1/3)``
SPREAD = 1e-5
#: a cluster whose unit eigenvectors span less than this (smallest over largest singular
#: value) is defective: a Jordan pair's computed eigenvectors are ``spread / coupling``
#: apart
DEFECTIVE = 1e-4


def near_circle(eps: float) -> float:
    """How far inside the circle a gain that is ``sqrt(eps)``-off leaves a mode the cost
    does not weigh: :data:`NEAR_CIRCLE` in float64 (measured up to 1.7e-7), ``64
    sqrt(eps)`` (0.022) for float32 data (measured up to 3.6e-3)."""
    return max(NEAR_CIRCLE, 64 * eps ** 0.5)


def unweighted_circle_mode(d: DAREData, K, continuous: bool = False,
                           eps: float | None = None) -> complex | None:
    """The eigenvalue of one (unbatched) system's pencil ``(A^, E)`` on the unit circle
    (``continuous``: the imaginary axis) whose eigenvector (or eigenspace, for a repeated
    eigenvalue) the cost ``Q^`` does not weigh and the closed loop ``A + BK`` keeps, within
    rounding (module docstring), or None.  ``eps``: the data's rounding, by default its
    dtype's (float32's for float32 data solved in float64: the circle mode of a float32
    problem is a float32 rounding away from the circle)."""
    d = d.torch()
    eps = torch.finfo(d.A.dtype).eps if eps is None else eps
    A, B, Q, R = (v.detach().to(torch.float64) for v in (d.A, d.B, d.Q, d.R))
    K = torch.as_tensor(K).detach().to(device=A.device, dtype=torch.float64)
    n = A.shape[-1]
    if int(torch.linalg.cholesky_ex(sym(R))[1]) != 0:
        return None
    if d.S is None:
        RiSt = torch.zeros_like(B.transpose(-1, -2))
        Qh, Qabs = Q, Q.abs()
    else:
        S = d.S.detach().to(torch.float64)
        RiSt = torch.linalg.solve(R, S.transpose(-1, -2))
        Qh, Qabs = Q - S @ RiSt, Q.abs() + S.abs() @ RiSt.abs()
    Qh = sym(Qh)
    if float(torch.linalg.eigvalsh(Qh)[0]) < -8 * n * eps * float(torch.linalg.matrix_norm(Qabs)):
        return None   # indefinite: the criterion does not hold
    Ah = A - B @ RiSt
    Aabs = A.abs() + B.abs() @ RiSt.abs()
    E = torch.eye(n, dtype=A.dtype, device=A.device) if d.E is None \
        else d.E.detach().to(torch.float64)
    Ei = None if d.E is None else torch.linalg.inv(E)
    lam, V = torch.linalg.eig(Ah if Ei is None else Ei @ Ah)
    W, info = torch.linalg.inv_ex(V)
    if Ei is not None:      # the pencil's left eigenvectors, rows y' with y' E v = 1
        W = W @ Ei.to(W.dtype)
    scale = float(torch.linalg.matrix_norm(A) + torch.linalg.matrix_norm(B)
                  * torch.linalg.matrix_norm(K) + torch.linalg.matrix_norm(E))
    wide = SPREAD * (max(scale, 1.0) if continuous else 1.0)

    def room(z):
        return abs(z.real) if continuous else abs(abs(z) - 1)
    candidates = [i for i, z in enumerate(lam.tolist()) if room(z) <= wide]
    Acl, Ec, Qc = (M.to(V.dtype) for M in (A + B @ K, E, Qh))
    Ea = E.abs().to(torch.float64)

    def cond(group):
        """The shift of the group's mean under a relative rounding of each entry: one
        eigenvalue's |y|'(|A^| + |mu||E|)|v|; a group's by its spectral projector."""
        mu = complex(lam[group].mean())
        if int(info) != 0:
            return math.inf
        if len(group) == 1:
            Va, Wa = V[:, group].abs(), W[group].abs()
            return float((Wa @ Aabs @ Va).sum() + abs(mu) * (Wa @ Ea @ Va).sum())
        P = float(torch.linalg.matrix_norm(V[:, group] @ W[group]))
        return P * float(torch.linalg.matrix_norm(Aabs) + abs(mu) * torch.linalg.matrix_norm(E))

    for spread in _clusters(lam, candidates, wide):
        Vn = V[:, spread] / torch.linalg.vector_norm(V[:, spread], dim=-2, keepdim=True)
        sv = torch.linalg.svdvals(Vn)
        if len(spread) > 1 and float(sv[-1]) <= DEFECTIVE * float(sv[0]):
            # a defective cluster: its members' spread is rounding, its mean is not
            groups, spans = [spread], False
        else:   # distinct eigenvalues; those within each other's rounding repeat one
            groups, spans = _clusters(lam, spread, lambda i, j: 16 * n * eps * max(
                cond([i]), cond([j]))), True
        for group in groups:
            mu = complex(lam[group].mean())
            if not room(mu) <= 16 * n * eps * cond(group):
                continue
            Vg = V[:, group] / torch.linalg.vector_norm(V[:, group], dim=-2, keepdim=True)
            for u in (_least_weighted(Vg, Qc) if spans else Vg.unbind(-1)):
                weight = float((u.conj() @ Qc @ u).real)
                bound = 8 * n * eps * float(u.abs() @ Qabs @ u.abs())
                Eu = Ec @ u
                kept = float(torch.linalg.vector_norm(Acl @ u - mu * Eu)) \
                    <= near_circle(eps) * float(torch.linalg.vector_norm(Eu))
                if weight <= bound and kept:
                    return mu
    return None


def _clusters(lam: torch.Tensor, members: list[int], spread) -> list[list[int]]:
    """``members`` grouped where their eigenvalues lie within ``spread`` (a number, or a
    function of two indices) of one another, transitively."""
    def close(i, j):
        return abs(complex(lam[i] - lam[j])) <= (spread(i, j) if callable(spread) else spread)
    groups: list[list[int]] = []
    for i in members:
        joined = [g for g in groups if any(close(i, j) for j in g)]
        for g in joined:
            groups.remove(g)
        groups.append(sorted([i] + [j for g in joined for j in g]))
    return groups


def _least_weighted(Vg: torch.Tensor, Qc: torch.Tensor) -> list[torch.Tensor]:
    """The least weighted unit vector of the span of a repeated eigenvalue's eigenvectors
    ``Vg`` (n, k; any combination of them is an eigenvector)."""
    if Vg.shape[-1] == 1:
        return [Vg[:, 0]]
    Qb = torch.linalg.qr(Vg)[0]
    G = Qb.conj().transpose(-1, -2) @ Qc @ Qb
    return [Qb @ torch.linalg.eigh((G + G.conj().transpose(-1, -2)) / 2)[1][:, 0]]


def refuse_unweighted_circle_modes(d: DAREData, near, K, continuous: bool = False,
                                   eps: float | None = None) -> None:
    """Raise :class:`NotStabilizableError` for the first element in ``near`` (a mask over
    the batch: closed loops within :data:`NEAR_CIRCLE` of the unit circle, or of the
    imaginary axis relative to ``|A|``) with such a mode that the cost does not weigh
    (:func:`unweighted_circle_mode`); ``K`` the gains (batch, m, n)."""
    near = torch.as_tensor(near).reshape(-1)
    Ks = torch.as_tensor(K).reshape(-1, *torch.as_tensor(K).shape[-2:])
    for first in torch.nonzero(near).flatten().tolist():
        index = unravel(first, d.batch)
        mode = unweighted_circle_mode(d.element(index), Ks[first if len(Ks) > 1 else 0],
                                      continuous, eps)
        if mode is not None:
            label = d.label(index)
            where = f" for batch element {label}" if label else ""
            on = (f"Re lambda = {mode.real:.3g}, on the imaginary axis" if continuous else
                  f"|lambda| = {abs(mode):.17g}, on the unit circle")
            raise NotStabilizableError(
                f"no stabilizing solution{where}: the mode lambda = {mode:.6g} ({on} within "
                "rounding) is not weighed by the cost (Q - S R^-1 S' along its eigenvector "
                "is at its rounding level) and the gain found moves it off only by its own "
                "error")
