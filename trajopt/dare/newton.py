r"""Newton (Kleinman-Hewer) refinement of a DARE solution, batched in torch.

At an approximate solution :math:`X` with gain :math:`K` and closed loop
:math:`A_c = A + BK`, the Fréchet derivative of the Riccati operator is
:math:`\Delta \mapsto A_c^\top \Delta A_c - E^\top \Delta E`, so a Newton step solves the
Stein equation

.. math::  A_c^\top \Delta A_c - E^\top \Delta E + \mathrm{Ric}(X) = 0 .

With :math:`F = E^{-1} A_c` and :math:`\tilde\Delta = E^\top \Delta E` this is
:math:`\tilde\Delta = \sum_j F^{\top j}\, \mathrm{Ric}(X)\, F^j`, summed by squared Smith
doubling (:math:`Y \leftarrow Y + F^\top Y F`, :math:`F \leftarrow F^2`), which converges
when :math:`A_c` is stable, i.e. when :math:`X` is near the stabilizing solution.
"""

from __future__ import annotations

import numpy as np

from ._common import DAREData, gain, ops, relative_residual, residual_matrix


def stein_smith(F, C, max_iter: int = 60):
    """Solve ``F' Y F - Y + C = 0`` for stable F by squared Smith doubling (numpy or
    torch, batched)."""
    o = ops(C)
    Y = C
    eps = o.finfo(C).eps
    for _ in range(max_iter):
        inc = o.T(F) @ Y @ F
        Y = Y + inc
        F = F @ F
        small = o.norm(inc) <= eps * o.norm(Y)
        if bool((small | ~o.allfinite(Y)).all()):
            break
    return 0.5 * (Y + o.T(Y))


def newton_refine(d: DAREData, X, steps: int = 1, res=None):
    """Apply up to ``steps`` Newton steps, keeping per element only those that lower the
    relative residual (``res``: X's, when the caller has it).  Returns the refined X
    (..., n, n) and its relative residual (...); X itself when no step lowered it.
    """
    # a step from a far or unstable X can overflow (inf, NaN): it is then not kept, so
    # numpy's overflow warnings would only be noise (an error under -W error)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _newton_steps(d, X, steps, res)


def _newton_steps(d: DAREData, X, steps: int, res):
    """:func:`newton_refine` itself."""
    o = ops(X)
    best = X
    best_res = relative_residual(d, X) if res is None else res
    for _ in range(steps):
        K = gain(d, best)
        Acl = d.A + d.B @ K
        F = Acl if d.E is None else o.solve(d.E, Acl)
        res, _ = residual_matrix(d, best, K)
        Dt = stein_smith(F, res)
        if d.E is not None:
            Einv_t = o.T(o.inv(d.E))
            Dt = Einv_t @ Dt @ o.T(Einv_t)
        cand = best + Dt
        cand = 0.5 * (cand + o.T(cand))
        cand_res = relative_residual(d, cand)
        better = cand_res < best_res
        if not bool(better.any()):
            break
        best = o.where(better[..., None, None], cand, best)
        best_res = o.where(better, cand_res, best_res)
    return best, best_res


def dare_adjoint(d: DAREData, P, G):
    r"""The adjoint of the DARE residual's derivative at P: Λ with
    :math:`A_c \Lambda A_c^\top - E \Lambda E^\top + G = 0` (torch, batched;
    ``trajopt.dare.implicit``)."""
    o = ops(P)
    F = d.A + d.B @ gain(d, P)
    if d.E is not None:                      # F = A_c E^{-1}
        F = o.T(o.solve(o.T(d.E), o.T(F)))
    L = stein_smith(o.T(F), G)
    if d.E is not None:                      # Λ = E^{-1} Λ' E^{-T}
        L = o.solve(d.E, o.T(o.solve(d.E, L)))
    return 0.5 * (L + o.T(L))
