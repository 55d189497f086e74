r"""A unit-circle mode that the cost does not weigh: no stabilizing solution, though the
solvers find one to within their rounding.

With :math:`R \succ 0` and :math:`\hat Q = Q - S R^{-1} S^\top \succeq 0`, the DARE has a
stabilizing solution only if no eigenvalue :math:`\lambda` of the pencil
:math:`(\hat A, E)`, :math:`\hat A = A - B R^{-1} S^\top`, on the unit circle has an
eigenvector :math:`v` with :math:`\hat Q v = 0` (the pair is detectable on the circle).
Where one has, the solvers still return an answer: its gain is ~``sqrt(eps)`` off, which
moves the mode inside the circle by ``1e-10 .. 1.7e-7`` (40 random such problems, session
32: scipy itself returned 39 of them), beyond the fixed margin and the closed loop's
rounding test. This module finds such a mode after the fact, for a closed loop within
:func:`near_circle` of the circle (``1e-4`` in float64), where all three hold:

- **on the circle**: eigenvalues within :data:`SPREAD` of the circle are grouped where
  they lie within :data:`SPREAD` of each other. A group whose unit eigenvectors are
  nearly parallel (an angle below :data:`DEFECTIVE`, or ``64 sqrt(eps)``) and whose
  members each lie within their own window is a defective cluster: its members are
  ``sqrt(eps)`` apart by rounding, its mean is not, and the mean is judged within
  :math:`16 \epsilon \|P\| (|\hat A| + |\mu||E|)` of the circle (``P`` the cluster's
  spectral projector). Otherwise each eigenvalue is judged within :math:`16 \epsilon\,
  |y|^\top(|A| + |B||R^{-1}S^\top| + |\lambda||E|)|v|` (componentwise absolute values; y
  the left eigenvector with :math:`y^H E v = 1`; the E term only where E is given): the
  shift under a relative rounding of each entry, with room for the eigensolver's
  backward error; eigenvalues within each other's window are one repeated eigenvalue. (A
  nearly defective pair ``1 -+ 1e-6`` is two modes: each lies far outside its own
  window.)
- **not weighed**: :math:`u^H \hat Q u \le c\,\epsilon\, |u|^\top (|Q| + |S||R^{-1}
  S^\top|) |u| + \delta^2 \|\hat Q\|` for a unit eigenvector u -- a defective cluster's
  own eigenvectors, a repeated eigenvalue's least weighted direction of its eigenspace
  -- with ``c = 2`` (the rounding of Q's entries; ``2(m + 2)`` where S forms
  :math:`\hat Q`) and :math:`\delta` the eigenvector's error: :math:`\epsilon |\hat A| /
  \mathrm{gap}` (the gap to the other eigenvalues), plus twice the angle of a defective
  cluster. The quadratic form keeps an eigenvector's error second order; the
  componentwise scale keeps a small weight on a diagonal cost (``diag(1e14, 1)``) a
  weight; the error term refuses a node of an undamped chain (its eigenvector's weight
  7e-27 on a diagonal Q, rounding of a 1e-13 eigenvector error);
- **kept by the closed loop**: :math:`|(A + BK)u - \mu E u| \le` ``near_circle(eps)``
  :math:`|E u|`. A weight at the rounding of Q's entries that the gain does act on (the
  control as cheap, ``R = 2^-48 I``: closed loop 0.38) is a weight.

``eps`` is the data's: float32's for float32 data, also where they are solved again in
float64 (:mod:`trajopt.dare.precision`). Not asked where R is not positive definite or
:math:`\hat Q` is indefinite beyond its rounding; in a batch, of the elements whose
closed-loop eigenvalues are computed (those without the doubling and Lyapunov
certificates: X does not weigh an unweighted mode either, so the Lyapunov form vanishes
along it and that certificate fails). The CARE's analogue (``solve_care``: the imaginary
axis, the real part, :data:`SPREAD` and the gate scaled by ``|A|``) is asked the same way.

Missed (session 33, two reviews): Jordan blocks of size 3 and more (their eigenvectors
are ``eps^(1/3)`` off, so they look weighted), bases so ill-conditioned (``cond 1e5``)
that the gain moves the mode beyond ``near_circle``, and a few float32 problems. Refused
though solvable, in float32: an unweighted stable mode within ~8 float32 roundings of the
circle, weights within ~8 roundings of Q's entries (undecidable in that precision).
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
#: value; ``64 sqrt(eps)`` where larger: 0.022 for float32 data) is defective: a Jordan
#: pair's computed eigenvectors are ``spread / coupling`` apart
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
    # the data's: a float32 problem's weight at float32's rounding moves its mode by
    # ~sqrt(eps32) also under a float64 gain (the float64 re-solve of precision.py)
    kept_tol = near_circle(eps)
    n = A.shape[-1]
    if int(torch.linalg.cholesky_ex(sym(R))[1]) != 0:
        return None
    m = B.shape[-1]
    forming = 2 if d.S is None else 2 * (m + 2)   # Q^ formed from S: m + 2 roundings
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
    # the imaginary axis is not scale-free: the spread grows with the closed loop's size
    wide = SPREAD * (max(float(torch.linalg.matrix_norm(A) + torch.linalg.matrix_norm(B)
                                * torch.linalg.matrix_norm(K) + torch.linalg.matrix_norm(E)),
                         1.0) if continuous else 1.0)

    def room(z):
        return abs(z.real) if continuous else abs(abs(z) - 1)
    candidates = [i for i, z in enumerate(lam.tolist()) if room(z) <= wide]
    Acl, Ec, Qc = (M.to(V.dtype) for M in (A + B @ K, E, Qh))
    # E's rounding where E is data (the identity of E = None is exact)
    Ea = torch.zeros_like(E) if d.E is None else E.abs()
    norm_a, norm_q = float(torch.linalg.matrix_norm(Aabs)), float(torch.linalg.matrix_norm(Qabs, 2))

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
        return P * (norm_a + abs(mu) * float(torch.linalg.matrix_norm(Ea)))

    for spread in _clusters(lam, candidates, wide):
        Vn = V[:, spread] / torch.linalg.vector_norm(V[:, spread], dim=-2, keepdim=True)
        sv = torch.linalg.svdvals(Vn)
        angle = float(sv[-1]) / float(sv[0])
        if len(spread) > 1 and angle <= max(DEFECTIVE, 64 * eps ** 0.5) and all(
                room(complex(lam[i])) <= 16 * eps * cond([i]) for i in spread):
            # a defective cluster: its members' spread is rounding (each within its own
            # window: a nearly defective pair 1 -+ 1e-6 is two modes), its mean is not
            groups, spans = [spread], False
        else:   # distinct eigenvalues; those within each other's rounding repeat one
            groups, spans = _clusters(lam, spread, lambda i, j: 16 * eps * max(
                cond([i]), cond([j]))), True
        for group in groups:
            mu = complex(lam[group].mean())
            if not room(mu) <= 16 * eps * cond(group):
                continue
            # an eigenvector is off by ~ eps |A^| / gap (gap to the other eigenvalues);
            # its weight then by that squared times |Q^|: a defective pair's sqrt(eps)
            others = [j for j in range(n) if j not in group]
            gap = min((abs(complex(lam[j]) - mu) for j in others), default=math.inf)
            blur = (eps * norm_a / max(gap, eps)) ** 2 * norm_q
            if not spans:   # a defective cluster: its eigenvectors are off by about the
                # angle between them (a Jordan pair's: sqrt(eps |A| / coupling))
                blur += 4 * angle ** 2 * norm_q
            Vg = V[:, group] / torch.linalg.vector_norm(V[:, group], dim=-2, keepdim=True)
            for u in (_least_weighted(Vg, Qc) if spans else Vg.unbind(-1)):
                weight = float((u.conj() @ Qc @ u).real)
                bound = forming * eps * float(u.abs() @ Qabs @ u.abs()) + blur
                Eu = Ec @ u
                kept = float(torch.linalg.vector_norm(Acl @ u - mu * Eu)) \
                    <= kept_tol * float(torch.linalg.vector_norm(Eu))
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
    the batch: closed loops within :func:`near_circle` of the unit circle, or of the
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
