"""The public CARE entry point :func:`solve_care`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import cached_property, partial
from typing import Any, Literal, get_args

import numpy as np
import scipy.linalg
import torch

from .._arrays import as_tensors
from .._linalg import finite_rows, norm1
from ..dare._common import DAREData, ops, prepare, riccati_arguments, scale
from ..dare.backends import loop_elements
from ..dare.detectability import near_circle, refuse_unweighted_circle_modes
from ..dare.implicit import attach_riccati_grad, detached, requires_grad
from ..dare.precision import decided_in_float64
from ..dare.stability import (
    lyapunov_certificate,
    raise_unstabilizable,
    stable_beyond_rounding,
)
from ..errors import ConvergenceWarning, InvalidArgumentError, NotStabilizableError
from ._common import (
    care_closed_loop_eigvals,
    care_gain,
    care_relative_residual,
    care_residual_matrix,
)
from .newton import care_adjoint, care_newton_refine
from .sign import solve_sign

__all__ = ["CARESolution", "solve_care", "CAREMethod"]

CAREMethod = Literal["auto", "scipy", "sign"]
#: the continuous-time NotStabilizableError (modes with Re lambda >= 0)
_unstabilizable = partial(raise_unstabilizable, continuous=True)
#: relative residual above which a result is flagged (sqrt(eps), as for the DARE)
_INACCURATE = {torch.float64: 1.5e-8, torch.float32: 3.5e-4}


@dataclass(frozen=True)
class CARESolution:
    """Stabilizing solution of the CARE (the fields of :class:`trajopt.DARESolution`).

    Attributes
    ----------
    P : (..., n, n)
        The symmetric stabilizing solution (scipy's return value).
    K : (..., m, n)
        Optimal gain in the convention ``u = K x``: ``K = -R^{-1}(B'PE + S')``
        (python-control's ``lqr`` / ``care`` return ``-K``).
    closed_loop_eigvals : (..., n) complex
        Eigenvalues of the pencil ``(A + BK, E)``, all in the open left half-plane.
    residual : (...)
        Relative residual ``||Ric(P)||_F`` over the sum of the Frobenius norms of the
        equation's terms.
    method : str
        The method(s) that produced P, e.g. ``"sign+newton"``, ``"scipy"``.
    """

    P: Any
    K: Any
    residual: Any
    method: str
    _eigvals: Callable[[], Any] = field(repr=False, compare=False)

    @cached_property
    def closed_loop_eigvals(self) -> Any:
        return self._eigvals()


def _scipy_one(A, B, Q, R, E, S):
    # scipy 1.17's balancing is wrong for E != I here too (as for the DARE, docs/dare.md):
    # a random n = 4 system with E = I + 0.05 noise had residual 0.4 balanced, 1e-14 not
    try:
        return scipy.linalg.solve_continuous_are(A, B, Q, R, e=E, s=S, balanced=E is None)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise NotStabilizableError(f"scipy found no stabilizing solution: {exc}") from exc


def solve_care_scipy(d: DAREData) -> torch.Tensor:
    """``scipy.linalg.solve_continuous_are`` element by element (float64, CPU); a failed
    element is named, with its uncontrollable mode when it has one."""
    return loop_elements(d, _scipy_one, on_failure=_unstabilizable)


def _auto(d: DAREData, tol, max_iter) -> tuple[torch.Tensor, list[str]]:
    """One small CPU system: scipy (per-call overhead dominates), Newton-polished when its
    residual is above 4 eps.  Otherwise the batched sign iteration, Newton-polished, with
    scipy per element where it did not converge or is not accurate."""
    if d.batch.numel() == 1 and d.A.device.type == "cpu" and d.n <= 32:
        X = solve_care_scipy(d)
        res = care_relative_residual(d, X)
        if not bool(res <= 4 * torch.finfo(X.dtype).eps):   # Newton only above rounding
            X2, _ = care_newton_refine(d, X, steps=2, res=res)
            if X2 is not X:
                return X2, ["scipy+newton"]
        return X, ["scipy"]
    X, ok = solve_sign(d, tol=tol, max_iter=max_iter)
    used = ["sign"]
    X = torch.where(ok[..., None, None], X, torch.zeros_like(X))
    X, res = care_newton_refine(d, X, steps=2)
    bad = ~ok | ~(res <= 1e3 * d.n * torch.finfo(X.dtype).eps)
    if bool(bad.any()):
        idx = torch.nonzero(bad.reshape(-1)).flatten().tolist()
        sub = d.subset(idx)
        Xr = solve_care_scipy(sub)
        used.append("scipy")
        flat = X.reshape(-1, d.n, d.n).clone()
        res_r = care_relative_residual(sub, Xr)
        take = (res_r < res.reshape(-1)[idx]) | ~ok.reshape(-1)[idx]
        flat[idx] = torch.where(take[:, None, None], Xr, flat[idx])
        X = flat.reshape(X.shape)
    return X, used


def solve_care(
    A: Any,
    B: Any,
    Q: Any,
    R: Any,
    E: Any = None,
    S: Any = None,
    *,
    method: CAREMethod = "auto",
    refine: int = 0,
    tol: float | None = None,
    max_iter: int = 100,
) -> CARESolution:
    r"""Solve the continuous algebraic Riccati equation (drop-in for scipy's).

    .. math::

        A^\top P E + E^\top P A - (E^\top P B + S) R^{-1} (B^\top P E + S^\top) + Q = 0

    Arguments mean exactly what they mean in ``scipy.linalg.solve_continuous_are(a, b, q,
    r, e, s)``.  Leading dimensions are batch dimensions (broadcast); numpy input returns
    numpy (float64), torch input returns torch of its dtype and device (integer tensors:
    torch's default float dtype).

    Parameters
    ----------
    A : (..., n, n)
    B : (..., n, m)
    Q : (..., n, n), symmetric
    R : (..., m, m), symmetric, invertible
    E : (..., n, n), optional, invertible
    S : (..., n, m), optional
    method : {"auto", "scipy", "sign"}
        "scipy" loops over the batch on the CPU (Schur method on the Hamiltonian pencil);
        "sign" is the batched matrix-sign-function iteration in torch (any device);
        "auto": scipy for one small CPU system, else "sign" with two Newton steps and a
        per-element fallback to scipy where it did not converge or is not accurate
        (``docs/care.md``).
    refine : int
        Newton (Kleinman) steps after the chosen method, each kept only where it lowers
        the residual ("auto" applies two to the sign iteration's result).
    tol, max_iter
        Convergence tolerance (relative change of the sign iterate, default 10 n eps) and
        iteration cap of the sign iteration.

    Returns
    -------
    CARESolution
        With torch inputs that require a gradient, ``P`` and ``K`` are differentiable
        with respect to them (every method), by implicit differentiation (one adjoint
        Lyapunov solve; ``docs/dare.md``, "Gradients").

    Raises
    ------
    ShapeError, NonFiniteError, NotSymmetricError
        On bad input, naming the argument.
    NotStabilizableError
        When no stabilizing solution exists (the message names an uncontrollable unstable
        mode when there is one).
    """
    if method not in get_args(CAREMethod):
        raise InvalidArgumentError(f"method must be one of {get_args(CAREMethod)}; got "
                                   f"{method!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise InvalidArgumentError(f"refine must be an integer >= 0; got {refine!r}")
    named = riccati_arguments(A, B, Q, R, E, S)
    # a float32 problem the boundary check refuses is decided in float64 (precision.py)
    return decided_in_float64(partial(_solve_care, method=method, refine=refine, tol=tol,
                                      max_iter=max_iter), named, continuous=True)


def _solve_care(named: dict[str, Any], method: str, refine: int, tol: float | None,
                max_iter: int) -> CARESolution:
    """:func:`solve_care` on its checked arguments."""
    t, kind = as_tensors(named,
                         sequences=False)
    d = prepare(t["A"], t["B"], t["Q"], t["R"], t["E"], t["S"])
    grad_d = None
    if requires_grad(d):  # solve outside autograd, attach P after (implicit gradient)
        grad_d, d = d, detached(d)
    for name, M in (("R", d.R), ("E", d.E)):
        if M is not None and not bool((torch.linalg.inv_ex(M)[1] == 0).all()):
            raise InvalidArgumentError(f"{name} must be invertible for the CARE")
    d, e = scale(d)  # the cost scaled to O(1); P = 2^e X
    if method == "auto":
        X, used = _auto(d, tol, max_iter)
    elif method == "scipy":
        X, used = solve_care_scipy(d), ["scipy"]
    else:
        X, ok = solve_sign(d, tol=tol, max_iter=max_iter)
        used = ["sign"]
        if not bool(ok.all()):
            _unstabilizable(d, ~ok, "the sign iteration did not converge (H has "
                                  "eigenvalues on or near the imaginary axis)")
    label = ",".join(used)
    if refine:
        X0 = X
        X, _ = care_newton_refine(d, X, steps=refine)
        if X is not X0:
            label += "+newton"
    elif method == "auto" and "sign" in used:
        label = label.replace("sign", "sign+newton")
    K = care_gain(d, X)
    finite = finite_rows(X) & finite_rows(K)
    if not bool(finite.all()):
        _unstabilizable(d, ~finite, "the solver produced a non-finite solution")
    # Lyapunov certificate first (two batched Cholesky factorizations); the eigenvalues
    # (a non-symmetric eigensolver, slow on GPUs) only where it does not hold
    unchecked = ~lyapunov_certificate(d, X, K, continuous=True)
    if bool(unchecked.any()):
        flat = unchecked.reshape(-1)
        sub = d.subset(flat)
        Ks = K.reshape(-1, *K.shape[-2:])[flat]
        eig = care_closed_loop_eigvals(sub, Ks)
        scale_ = norm1(sub.A)[..., None]
        margin = 1000 * d.n * torch.finfo(X.dtype).eps * scale_.clamp(min=1.0)
        ok = (eig.real < -margin).all(-1)
        if not bool(ok.all()):  # refused by the margin: by the eigenvalues' own rounding?
            ok[~ok] = stable_beyond_rounding(sub.subset(~ok), Ks[~ok], continuous=True)
        stable = torch.ones(flat.shape, dtype=torch.bool, device=X.device)
        stable[flat] = ok
        stable = stable.reshape(d.batch)
        if not bool(stable.all()):
            _unstabilizable(d, ~stable, "the solution found is not stabilizing "
                                  f"(closed-loop eigenvalue real part "
                                  f"{float(eig.real.amax(-1)[~ok].max()):.3g})")
        refuse_unweighted_circle_modes(
            sub, eig.real.amax(-1) > -near_circle(torch.finfo(X.dtype).eps)
            * scale_[..., 0].clamp(min=1.0), Ks,
            continuous=True)
    res = care_relative_residual(d, X)
    worst = float(res.max())
    if not worst <= _INACCURATE.get(X.dtype, 1.5e-8):
        warnings.warn(f"the {label} solution has relative residual {worst:.1e} (the "
                      "problem is ill-conditioned; try refine=2 or method='scipy')",
                      ConvergenceWarning, stacklevel=4)
    P = ops(X).ldexp(X, e)
    if grad_d is not None:
        P = attach_riccati_grad(P, grad_d, adjoint=care_adjoint,
                                residual=lambda dd, Y: care_residual_matrix(dd, Y)[0])
        K = care_gain(grad_d, P)
    return CARESolution(P=kind.out(P), K=kind.out(K), residual=kind.out(res), method=label,
                        _eigvals=partial(_eigvals_out, kind, d, K.detach()))


def _eigvals_out(kind: Any, d: DAREData, K: torch.Tensor) -> Any:
    """The result's closed-loop eigenvalues, computed when first read (a module-level
    function under ``functools.partial``, so that the result pickles)."""
    return kind.out(care_closed_loop_eigvals(d, K))
