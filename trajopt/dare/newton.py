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

With :math:`E` the step is taken in Hewer's form instead (:func:`hewer_refine`): the
new :math:`X` is the value of :math:`X`'s own gain, :math:`E^\top X_+ E = \sum_j F^{\top
j} M F^j` with :math:`M = Q + SK + K^\top S^\top + K^\top R K` -- the same Newton
iterate in exact arithmetic. The incremental form's :math:`\mathrm{Ric}(X)` is a
difference of terms up to ~``cond(E)^2`` larger than itself, so a nearly singular E
made it (and the residual that judges it) rounding noise: at ``cond(E) = 1e4`` the
pencil solvers' X were 3e-5 off a 1,200-digit reference with residuals below 1e-12, and
the step made their gains worse; :math:`M` has no such cancellation (docs/dare.md, "A
nearly singular E").
"""

from __future__ import annotations

import warnings

import numpy as np
import torch

from ..errors import ConvergenceWarning, NumericalError
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
    With E the steps are Hewer's (:func:`hewer_refine`), kept while each is smaller
    than the one before: there the residual is rounding noise (module docstring).
    """
    if d.E is not None:
        X2, _ = hewer_refine(d, X, steps)
        return X2, (res if X2 is X and res is not None else relative_residual(d, X2))
    # a step from a far or unstable X can overflow (inf, NaN): it is then not kept, so
    # numpy's overflow warnings would only be noise (an error under -W error)
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        return _newton_steps(d, X, steps, res)


def _newton_steps(d: DAREData, X, steps: int, res):
    """:func:`newton_refine` itself (E absent); stops once every element's residual is
    at rounding level (4 eps, the level "auto" refines from)."""
    o = ops(X)
    floor = 4 * float(o.finfo(X).eps)
    best = X
    best_res = relative_residual(d, X) if res is None else res
    for _ in range(steps):
        K = gain(d, best)
        res, _ = residual_matrix(d, best, K)
        cand = best + stein_smith(d.A + d.B @ K, res)
        cand = 0.5 * (cand + o.T(cand))
        cand_res = relative_residual(d, cand)
        better = cand_res < best_res
        if not bool(better.any()):
            break
        best = o.where(better[..., None, None], cand, best)
        best_res = o.where(better, cand_res, best_res)
        if bool((best_res <= floor).all()):
            break
    return best, best_res


def policy_value(d: DAREData, X):
    r"""Hewer's step: the value :math:`X_+` of X's gain K, from
    :math:`A_c^\top X_+ A_c - E^\top X_+ E + Q + SK + K^\top S^\top + K^\top R K = 0`
    (Stein in :math:`E^\top X_+ E` with :math:`F = E^{-1} A_c`; E given)."""
    o = ops(X)
    K = gain(d, X)
    M = d.Q + o.T(K) @ d.R @ K
    if d.S is not None:
        SK = d.S @ K
        M = M + SK + o.T(SK)
    Einv = o.inv(d.E)
    P = stein_smith(Einv @ (d.A + d.B @ K), 0.5 * (M + o.T(M)))
    Xn = o.T(Einv) @ P @ Einv
    return 0.5 * (Xn + o.T(Xn))


def hewer_refine(d: DAREData, X, steps: int):
    """Up to ``steps`` Newton steps in Hewer's form (:func:`policy_value`), per element
    while each changes X by less than the one before (past that the changes are the
    rounding floor).  Returns X (X itself when no step was kept) and the relative size
    (Frobenius) of the last step kept per element: the estimate of X's forward error
    (``inf`` where no step could be taken: unknown).  Without a step (``steps = 0``) X
    and the size of one step, not taken.  Float32 data are stepped in float64 (a float32
    Stein solve would cost the answer of a float64 back end its accuracy) and the result
    rounded back."""
    if isinstance(X, torch.Tensor) and X.dtype == torch.float32:
        wide = DAREData(*(None if v is None else v.double()
                          for v in (d.A, d.B, d.Q, d.R, d.E, d.S)))
        X64 = X.double()
        best, size = hewer_refine(wide, X64, steps)
        return (X if best is X64 else best.float()), size
    o = ops(X)
    eps = float(o.finfo(X).eps)
    best, size, moving = X, np.inf, True
    with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
        for _ in range(max(steps, 1)):
            cand = policy_value(d, best)
            moved = o.norm(cand - best)   # 0 where X is a fixed point (also X = 0)
            change = o.where(moved == 0, 0.0 * moved, moved / o.norm(cand))
            change = o.where(o.isfinite(change), change, np.inf)
            if not steps:
                return X, change
            take = moving & (change < size)
            if not bool(take.any()):
                break
            best = o.where(take[..., None, None], cand, best)
            size = o.where(take, change, size)
            moving = take & (change > 4 * eps)
            if not bool(moving.any()):
                break
    return best, size


def forward_accurate(size, X) -> bool:
    """Every element has an estimate (:func:`hewer_refine`) within ``sqrt(eps)`` of X's
    dtype (False for ``size`` None)."""
    if size is None:
        return False
    size = torch.as_tensor(size)
    limit = float(torch.finfo(X.dtype if isinstance(X, torch.Tensor) else
                              torch.float64).eps) ** 0.5
    return bool((torch.isfinite(size) & (size <= limit)).all())


def check_forward_error(size, d: DAREData, label: str, auto: bool) -> None:
    """Judge a descriptor solution by :func:`hewer_refine`'s estimate of its forward
    error ``size``: above ``sqrt(eps)`` a ``ConvergenceWarning``; above 1e-3 under
    "auto" a ``NumericalError`` (an explicit method's answer is the caller's choice).
    An element without an estimate (no step could be taken: ``inf``) is left to the
    residual's checks."""
    size = torch.as_tensor(size)
    known = size[torch.isfinite(size)]
    worst = float(known.max()) if known.numel() else 0.0
    E = d.E if isinstance(d.E, torch.Tensor) else torch.as_tensor(d.E)
    limit = float(torch.finfo(E.dtype).eps) ** 0.5
    if worst <= limit:
        return
    cond = float(torch.linalg.cond(E.detach()).max())
    what = (f"the {label} solution is accurate to about {worst:.1e} (relative; the "
            f"value of its own gain differs from it by that much) with E's condition "
            f"number {cond:.1e}")
    if auto and worst > 1e-3:
        raise NumericalError(f"{what}: no back end solved this descriptor DARE")
    hint = "" if auto else "; pass refine=3 or method='auto' for Newton steps"
    warnings.warn(f"{what}{hint}", ConvergenceWarning, stacklevel=5)


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
