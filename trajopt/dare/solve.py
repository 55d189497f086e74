"""The public DARE entry point :func:`solve_dare`."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from functools import cached_property, partial
from typing import Any, Literal, get_args

import numpy as np
import torch

from .._arrays import ArrayKind, as_tensors
from ..errors import (
    ConvergenceWarning,
    InvalidArgumentError,
    NotStabilizableError,
    NumericalError,
    TrajoptError,
)
from ._common import (
    DAREData,
    closed_loop_eigvals,
    gain,
    numpy_single,
    ops,
    prepare,
    prepare_numpy,
    relative_residual,
    residual_matrix,
    riccati_arguments,
    scale,
)
from .backends import accept_tol, eps_of, reference_solution, solve_scipy, solve_slycot
from .detectability import near_circle, refuse_unweighted_circle_modes
from .doubling import solve_doubling
from .implicit import attach_riccati_grad, detached, requires_grad
from .newton import check_forward_error, dare_adjoint, forward_accurate, hewer_refine, newton_refine
from .precision import decided_in_float64
from .stability import lyapunov_certificate, raise_unstabilizable, stable_beyond_rounding

__all__ = ["DARESolution", "solve_dare", "DAREMethod"]

DAREMethod = Literal["auto", "scipy", "slycot", "doubling"]


@dataclass(frozen=True)
class DARESolution:
    """Stabilizing solution of the DARE.

    Attributes
    ----------
    P : (..., n, n)
        The symmetric stabilizing solution (scipy's return value).
    K : (..., m, n)
        Optimal gain in the convention ``u = K x``:
        ``K = -(R + B'PB)^{-1}(B'PA + S')``.  MATLAB/python-control ``dlqr`` return ``-K``.
    closed_loop_eigvals : (..., n) complex
        Eigenvalues of the pencil ``(A + BK, E)``, all inside the unit circle.  Computed
        on first access (an eigenvalue solve per system costs more than the doubling
        iteration itself for large batches); stability is certified without it.
    residual : (...)
        Relative residual ``||Ric(P)||_F`` divided by the sum of the Frobenius norms of
        the equation's terms (see ``docs/dare.md``).
    method : str
        The method(s) that produced P, e.g. ``"doubling"``, ``"doubling,slycot+newton"``.
    """

    P: Any
    K: Any
    residual: Any
    method: str
    _eigvals: Callable[[], Any] = field(repr=False, compare=False)

    @cached_property
    def closed_loop_eigvals(self) -> Any:
        return self._eigvals()


_SMALL_N = 32
#: Hewer steps "auto" allows a descriptor solution (each stops at the rounding floor)
_HEWER_STEPS = 6
#: relative residual above which an explicitly chosen back end's answer is flagged
#: (sqrt(eps): well above rounding for any conditioning the back ends handle)
_INACCURATE = {torch.float64: 1.5e-8, torch.float32: 3.5e-4}
#: relative residual above which a back end's answer ("auto"'s best, "scipy"'s,
#: "slycot"'s) is no solution at all (an error, not a warning: an indefinite R without a
#: stabilizing solution gave 0.08, where scipy's own call raises -- on the cost scaled by
#: 1/2 it returned that "solution")
_NO_SOLUTION = 1e-3


def _polish(d: DAREData, X: Any, res: Any, only: Any = None) -> tuple[Any, Any, bool]:
    """Two Newton steps on the elements (of ``only``, default all) whose relative
    residual ``res`` is above 4 eps; each step is kept per element only where it lowers
    the residual, so the result is never worse than X (with E: Hewer's steps, judged by
    their size, :func:`~trajopt.dare.newton.hewer_refine`).  Elements already at rounding
    level are left alone (a Newton step costs more than the doubling iteration).
    Returns X, its residual and whether any step was kept."""
    need = res > 4 * eps_of(X)
    if only is not None:
        need = need & only
    if not bool(need.any()):
        return X, res, False
    if d.is_numpy or bool(need.all()):
        X2, res2 = newton_refine(d, X, steps=2, res=res)
        return X2, res2, X2 is not X  # newton_refine returns X itself when no step helped
    idx = torch.nonzero(need.reshape(-1)).flatten()
    flat = X.reshape(-1, d.n, d.n)
    sub = flat[idx]
    X2, res2 = newton_refine(d.subset(idx), sub, steps=2, res=res.reshape(-1)[idx])
    if X2 is sub:
        return X, res, False
    flat = flat.clone()
    flat[idx] = X2
    res = res.reshape(-1).clone()
    res[idx] = res2
    return flat.reshape(X.shape), res.reshape(X.shape[:-2]), True


def _small_single(d: DAREData) -> tuple[Any, list[str], Any]:
    """One small CPU system: per-call overhead dominates, so scipy's pencil method (the
    drop-in reference, ~0.5 ms) is used and Newton-refined only when its residual is
    above 4 eps (:func:`_polish`)."""
    X = solve_scipy(d)
    X, res, refined = _polish(d, X, relative_residual(d, X))
    if not float(res.max()) <= accept_tol(X, d.n):
        raise NumericalError(f"scipy's solution has relative residual {float(res.max()):.1e}")
    return X, ["scipy+newton" if refined else "scipy"], res


def _auto(d: DAREData, tol: float | None, max_iter: int
          ) -> tuple[DAREData, Any, torch.Tensor | None, list[str], Any]:
    """'auto': one small (n <= 32) CPU system goes through :func:`_small_single`.
    Otherwise doubling for the whole batch when R > 0 and E is well conditioned, then a
    per-element fallback to slycot (else scipy) where doubling did not converge to a
    certified stabilizing solution or is not accurate; every candidate above 4 eps is
    Newton-refined (:func:`_polish`) and, per element, the one with the smaller residual
    kept.

    Returns the data (as tensors once the torch solvers ran), X, the mask of elements
    certified stabilizing by doubling (None: none), the methods and X's residual.
    """
    used: list[str] = []
    X = None
    if d.batch.numel() == 1 and (d.is_numpy or d.A.device.type == "cpu") and d.n <= _SMALL_N:
        try:
            X, used, res = _small_single(d)
            return d, X, None, used, res
        except TrajoptError:
            pass  # doubling below may still succeed where the pencil method failed
    d = d.torch()
    certified = torch.zeros(d.batch, dtype=torch.bool, device=d.A.device)
    eps = torch.finfo(d.A.dtype).eps
    if d.E is None or bool((torch.linalg.cond(d.E) < 1.0 / eps ** 0.5).all()):
        try:
            X, certified = solve_doubling(d, tol=tol, max_iter=max_iter)
            used.append("doubling")
        except NumericalError:
            X = None
    if X is None:
        bad = torch.ones(d.batch, dtype=torch.bool, device=d.A.device)
    else:
        X = torch.where(certified[..., None, None], X, torch.zeros_like(X))
        X, res, _ = _polish(d, X, relative_residual(d, X), only=certified)
        bad = ~certified | (res > accept_tol(X, d.n))
    if bool(bad.any()):
        idx = torch.nonzero(bad.reshape(-1)).flatten().tolist()
        flat = d.subset(idx)
        try:
            Xr, name = reference_solution(flat)
        except NotStabilizableError:
            if X is None or not bool(certified.reshape(-1)[idx].all()):
                raise  # an element doubling did not solve either (named in d's batch)
            return d, X, certified, used, res
        except TrajoptError:
            if X is None:
                raise
            return d, X, certified, used, res
        Xr, res_r, _ = _polish(flat, Xr, relative_residual(flat, Xr))
        used.append(name)
        if X is None:
            return (d, Xr.reshape(*d.batch, d.n, d.n), certified, used,
                    res_r.reshape(d.batch))
        Xf = X.reshape(-1, d.n, d.n).clone()
        rf = res.reshape(-1).clone()
        cf = certified.reshape(-1).clone()
        take = (res_r < rf[idx]) | ~cf[idx]
        Xf[idx] = torch.where(take[:, None, None], Xr, Xf[idx])
        rf[idx] = torch.where(take, res_r, rf[idx])
        cf[idx] = cf[idx] & ~take
        X, certified = Xf.reshape(*d.batch, d.n, d.n), cf.reshape(d.batch)
        res = rf.reshape(d.batch)
    return d, X, certified, used, res


def _out(kind: ArrayKind, x: Any) -> Any:
    """A result in the caller's array type (numpy results of the numpy path included)."""
    if isinstance(x, torch.Tensor):
        return kind.out(x)
    x = np.asarray(x)
    return x if kind.numpy else torch.from_numpy(x).to(kind.device)


def solve_dare(
    A: Any,
    B: Any,
    Q: Any,
    R: Any,
    E: Any = None,
    S: Any = None,
    *,
    method: DAREMethod = "auto",
    refine: int = 0,
    tol: float | None = None,
    max_iter: int = 100,
) -> DARESolution:
    r"""Solve the discrete algebraic Riccati equation (scipy's arguments; ``.P`` of the
    result is scipy's answer).

    .. math::

        A^\top P A - E^\top P E - (A^\top P B + S)(R + B^\top P B)^{-1}(B^\top P A + S^\top)
        + Q = 0

    Arguments mean exactly what they mean in ``scipy.linalg.solve_discrete_are(a, b, q,
    r, e, s)``; in our cost convention ``S = M'``.  Leading dimensions are batch
    dimensions (broadcast).  numpy input returns numpy (float64), torch input returns
    torch of its dtype/device (integer tensors: torch's default float dtype, as torch
    promotes them).

    Parameters
    ----------
    A : (..., n, n)
    B : (..., n, m)
    Q : (..., n, n), symmetric
    R : (..., m, m), symmetric
    E : (..., n, n), optional
    S : (..., n, m), optional
    method : {"auto", "scipy", "slycot", "doubling"}
        "scipy" and "slycot" loop over the batch on the CPU; "doubling" is the batched
        structured doubling algorithm in torch (needs R positive definite and E
        invertible); "auto" runs doubling where it applies, falls back per element to
        slycot (else scipy) where the result is not accurate or not stabilizing, and
        applies Newton refinement (see ``docs/dare.md``).
    refine : int
        Newton refinement steps applied after the chosen method (each kept only where it
        lowers the residual).  "auto" always tries two.
    tol, max_iter
        Convergence tolerance and iteration cap of the doubling iteration.

    Returns
    -------
    DARESolution
        With torch inputs that require a gradient, ``P`` and ``K`` are differentiable
        with respect to them (every method): implicit differentiation, one adjoint Stein
        solve in the backward pass (``trajopt.dare.implicit``, ``docs/dare.md``).

    Raises
    ------
    ShapeError, NonFiniteError, NotSymmetricError
        On bad input, naming the argument.
    NotStabilizableError
        When no stabilizing solution exists (the message names an uncontrollable unstable
        mode when there is one).
    SolverUnavailableError
        ``method="slycot"`` without slycot installed.
    """
    if method not in get_args(DAREMethod):
        raise InvalidArgumentError(f"method must be one of {get_args(DAREMethod)}; got "
                                   f"{method!r}")
    if isinstance(refine, bool) or not isinstance(refine, int) or refine < 0:
        raise InvalidArgumentError(f"refine must be an integer >= 0; got {refine!r}")
    named = riccati_arguments(A, B, Q, R, E, S)
    # a float32 problem the boundary check refuses is decided in float64 (precision.py)
    return decided_in_float64(partial(_solve_dare, method=method, refine=refine, tol=tol,
                                      max_iter=max_iter), named, continuous=False)


def _solve_dare(named: dict[str, Any], method: str, refine: int, tol: float | None,
                max_iter: int) -> DARESolution:
    """:func:`solve_dare` on its checked arguments."""
    single = numpy_single(named, _SMALL_N) if method == "auto" else None
    if single is not None:  # one small float64 system: numpy throughout (docs/dare.md)
        a, kind = single
        d = prepare_numpy(a["A"], a["B"], a["Q"], a["R"], a["E"], a["S"])
    else:
        t, kind = as_tensors(named, sequences=False)
        d = prepare(t["A"], t["B"], t["Q"], t["R"], t["E"], t["S"])
    if d.E is not None:   # (scipy's message was "no stabilizing solution")
        cond, eps = (float(np.linalg.cond(d.E)), np.finfo(np.float64).eps) if d.is_numpy \
            else (float(torch.linalg.cond(d.E.detach()).max()), torch.finfo(d.E.dtype).eps)
        if not cond < 1 / eps:
            raise InvalidArgumentError(f"E must be invertible for the DARE; its condition "
                                       f"number is {cond:.3g}")
    grad_d = None
    if not d.is_numpy and requires_grad(d):  # solve outside autograd, attach P after
        grad_d, d = d, detached(d)
    d, e = scale(d)  # solve with the cost scaled to O(1); P = 2^e X
    certified = res = None
    if method == "auto":
        d, X, certified, used, res = _auto(d, tol, max_iter)
        refine = 0
    elif method == "doubling":
        X, certified = solve_doubling(d, tol=tol, max_iter=max_iter)
        used = ["doubling"]
    elif method == "scipy":
        X, used = solve_scipy(d), ["scipy"]
    else:
        X, used = solve_slycot(d), ["slycot"]
    label, X0, fwd = ",".join(used), X, None
    if d.E is not None:  # Newton in Hewer's form, its last step X's forward error (newton.py)
        X, fwd = hewer_refine(d, X, _HEWER_STEPS if method == "auto" else refine)
        res = None if X is not X0 else res
    elif refine:
        X, res = newton_refine(d, X, steps=refine)
    if X is not X0 and not label.endswith("+newton"):  # X0: no step kept
        label += "+newton"
    sol, res = _finish(d, X, certified, e, label, kind, res)  # raises if not stabilizing
    if grad_d is not None:
        P = attach_riccati_grad(sol.P, grad_d, adjoint=dare_adjoint,
                                residual=lambda dd, X: residual_matrix(dd, X)[0])
        sol = replace(sol, P=P, K=gain(grad_d, P))
    if method == "doubling" and not bool(certified.all()):
        warnings.warn(f"doubling did not converge in {max_iter} iterations; the result is "
                      "stabilizing but may be inaccurate (see .residual)",
                      ConvergenceWarning, stacklevel=4)
    # a descriptor solution that Hewer's steps certify accurate: its residual is rounding
    # noise up to cond(E)^2 eps (1e-3 in float32 at cond(E) = 1e3: newton.py), not judged
    elif not (X is not X0 and forward_accurate(fwd, X)):
        worst = float(res.max())
        if method != "doubling" and not worst <= _NO_SOLUTION:  # doubling: max_iter
            which = f"no back end found a solution: the best ({label}) has" \
                if method == "auto" else f"the {label} back end returned no solution:"
            raise NumericalError(
                f"{which} relative residual {worst:.1e} (with an indefinite Q or R the DARE "
                "may have no stabilizing solution; scipy raises LinAlgError here)")
        if not worst <= _INACCURATE.get(X.dtype, 1.5e-8):
            hint = ("every back end it tried was inaccurate: the problem is ill-conditioned "
                    "or (with an indefinite Q or R) may have no stabilizing solution"
                    if method == "auto" else "the back end was inaccurate here: pass "
                    "refine=2 or try another method (\"auto\" compares them)")
            warnings.warn(f"the {label} solution has relative residual {worst:.1e} "
                          f"({hint})", ConvergenceWarning, stacklevel=4)
    if fwd is not None:
        check_forward_error(fwd, d, label, method == "auto")
    return sol


def _eigvals_out(kind: ArrayKind, d: DAREData, K: Any, eig: Any) -> Any:
    """The result's closed-loop eigenvalues, computed when first read (a module-level
    function under ``functools.partial``, so that the result pickles)."""
    return _out(kind, closed_loop_eigvals(d, K) if eig is None else eig)


def _not_stabilizing(rho: float) -> str:
    return (f"the solution found is not stabilizing (closed-loop spectral radius "
            f"{rho:.17g}; a badly scaled A or B -- only Q, R and S are rescaled -- can "
            "also end here: the solvers' answers are then no longer accurate)")


def _finish(d: DAREData, X: Any, certified: torch.Tensor | None, e: Any, label: str,
            kind: ArrayKind, res: Any = None) -> tuple[DARESolution, Any]:
    """Check finiteness and stability (eigenvalues only where doubling did not certify
    it), undo the scaling ``P = 2^e X`` and package the result and the residual (``res``:
    X's relative residual when the caller has it)."""
    o = ops(X)
    finite = o.allfinite(X)
    if not bool(finite.all()):
        raise_unstabilizable(d, ~finite, "the doubling produced a non-finite solution (it "
                             "also fails where an unstable mode of A is not seen by Q, which "
                             "has a stabilizing solution: method='auto' or 'scipy' solve it)"
                             if label.startswith("doubling") else
                             "the solver produced a non-finite solution")
    K = gain(d, X)
    if not bool(o.allfinite(K).all()):
        raise_unstabilizable(d, ~o.allfinite(K), "R + B'PB is singular at the solution "
                              "found (no gain K)")
    # a radius within rounding of 1 is a unit-circle mode, not a stable one
    margin = 1.0 - 1000 * d.n * eps_of(X)
    eig = None
    if d.is_numpy:  # one system: its eigenvalues are the check (and the result's field)
        eig = closed_loop_eigvals(d, K)
        rho = float(np.abs(eig).max())
        if not rho < margin and not bool(stable_beyond_rounding(d, K)):
            raise_unstabilizable(d, np.asarray(True), _not_stabilizing(rho))
        refuse_unweighted_circle_modes(d, np.asarray(rho > 1 - near_circle(eps_of(X))), K)
    else:
        if certified is None:
            certified = torch.zeros(d.batch, dtype=torch.bool, device=X.device)
        # doubling's certificate (A_k -> 0) is fooled by an undamped rotation that Q does
        # not weigh (repeated squaring decays under rounding): it stands only where the
        # Lyapunov certificate holds too; the other elements get the eigenvalue checks.
        # (An unweighted circle mode fails that certificate: X does not weigh it either,
        # so the closed loop's form W vanishes along it.)
        unchecked = ~certified
        if bool(certified.any()):
            unchecked = unchecked | (certified & ~lyapunov_certificate(d, X, K))
        if bool(unchecked.any()):
            flat = unchecked.reshape(-1)
            sub = d.subset(flat)
            rho_sub = closed_loop_eigvals(sub, K.reshape(-1, *K.shape[-2:])[flat]
                                          ).abs().amax(-1)
            rho = torch.zeros(flat.shape, dtype=X.dtype, device=X.device)
            rho[flat] = rho_sub
            bad = ~(rho < margin)
            if bool(bad.any()):  # refused by the margin: by the eigenvalues' own rounding?
                bad[bad.clone()] = ~stable_beyond_rounding(
                    d.subset(bad), K.reshape(-1, *K.shape[-2:])[bad])
                if bool(bad.any()):
                    raise_unstabilizable(d, bad.reshape(d.batch),
                                         _not_stabilizing(float(rho[bad].max())))
            refuse_unweighted_circle_modes(d, rho > 1 - near_circle(eps_of(X)), K)
    if res is None:
        res = relative_residual(d, X, K)
    if not d.is_numpy and not isinstance(e, torch.Tensor):  # "auto" moved numpy data on
        e = torch.as_tensor(e, device=X.device)
    P = o.ldexp(X, e)
    if not bool(o.allfinite(P).all()):
        raise NumericalError(
            "the solution P overflows " + str(X.dtype).replace("torch.", "") + ": its "
            "scaled value is finite but Q, R (and S) are too large for it (largest "
            f"entries ~2^{int(torch.as_tensor(e).max())}); scale them down and multiply P "
            "back")

    sol = DARESolution(P=_out(kind, P), K=_out(kind, K), residual=_out(kind, res),
                       method=label, _eigvals=partial(_eigvals_out, kind, d, K, eig))
    return sol, res
