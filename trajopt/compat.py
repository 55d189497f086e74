"""python-control's Riccati functions with its argument order, return values and sign
convention, for porting code: ``K, S, E = dlqr(A, B, Q, R)``.

How each maps onto trajopt (``sol`` the solution object):

- ``K, S, E = dlqr(A, B, Q, R, N)``: ``sol = solve_dare(A, B, Q, R, S=N)``,
  ``K = -sol.K``, ``S = sol.P``, ``E = sol.closed_loop_eigvals``;
- ``K, S, E = lqr(A, B, Q, R, N)``: the same with :func:`trajopt.solve_care`;
- ``X, L, G = dare(A, B, Q, R, S, E)``: ``X = sol.P``, ``L`` the eigenvalues,
  ``G = -sol.K``; ``care`` the same in continuous time;
- ``L, P, E = dlqe(A, G, C, QN, RN)``: the dual DARE ``(A', C', G QN G', RN)``,
  ``L = -sol.K'`` (the predictor gain ``A P C' (C P C' + RN)^{-1}``), ``P = sol.P``;
- ``L, P, E = lqe(A, G, C, QN, RN)``: the dual CARE, ``L = P C' RN^{-1}``.

The sign: python-control's gain is applied as ``u = -K x``; trajopt's ``K`` as
``u = K x``.  Where python-control accepts a ``StateSpace`` system as the first argument
(``lqr(sys, Q, R)``, ``dlqe(sys, QN, RN)``), these do too (any object with ``A``, ``B``
and, for the estimators, ``C`` attributes; python-control itself is not imported).
Scalars and nested lists are accepted where python-control accepts them (``R = 1``).
Results are numpy arrays, as python-control returns; batched torch input returns torch.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from ._checks import check_matrix
from .care import solve_care
from .dare import solve_dare
from .errors import InvalidArgumentError, ShapeError

__all__ = ["dlqr", "lqr", "dare", "care", "dlqe", "lqe"]


def _mat(x: Any) -> Any:
    """A matrix argument: torch stays torch, anything else becomes a 2-D float64 array
    (python-control's ``np.array(x, ndmin=2, dtype=float)``)."""
    if x is None or isinstance(x, torch.Tensor):
        return x
    return np.array(x, ndmin=2, dtype=float)


def _T(x: Any) -> Any:
    return x.transpose(-1, -2) if isinstance(x, torch.Tensor) else np.swapaxes(x, -1, -2)


def _system(args: tuple, names: tuple[str, ...], fn: str) -> list[Any]:
    """``(sys, rest...)`` or ``(matrices..., rest...)`` -> the matrices and the rest."""
    if args and all(hasattr(args[0], a) for a in names) and not isinstance(
            args[0], (np.ndarray, torch.Tensor, list, tuple)):
        sys_ = args[0]
        return [_mat(getattr(sys_, a)) for a in names] + list(args[1:])
    if len(args) < len(names):
        raise InvalidArgumentError(f"{fn}: expected {', '.join(names)} or a state-space "
                                   f"system first; got {len(args)} arguments")
    return [_mat(a) for a in args[:len(names)]] + list(args[len(names):])


def _sampling_time(sys_: Any) -> Any:
    """A state-space object's ``dt`` (None for matrices or an object without one)."""
    if sys_ is None or isinstance(sys_, (np.ndarray, torch.Tensor, list, tuple)):
        return None
    return getattr(sys_, "dt", None)


def _discrete(sys_: Any) -> bool:
    """A state-space object with a sampling time (python-control: ``dt`` True or > 0)."""
    dt = _sampling_time(sys_)
    return dt is not None and dt is not False and (dt is True or dt > 0)


def _refuse_continuous(args: tuple, fn: str) -> None:
    """python-control's discrete functions refuse a continuous-time system (``dt == 0``;
    ``dt=None``, unspecified, is accepted as either)."""
    dt = _sampling_time(args[0] if args else None)
    if dt is not None and dt is not True and dt is not False and dt == 0:
        raise InvalidArgumentError(f"{fn}: the system is continuous time (dt = 0); "
                                   f"{fn} needs a discrete-time one (dt > 0 or True), as "
                                   "in python-control")


def _method(method: Any, fn: str, ours: tuple[str, ...] = ("scipy", "slycot")) -> str:
    """python-control's ``method`` keyword (None, "scipy", "slycot") as trajopt's."""
    if method is None:
        return "auto"
    if method not in ours:
        raise InvalidArgumentError(f"{fn}: method must be None or one of {ours}; got "
                                   f"{method!r}")
    return method


def _refuse(fn: str, name: str, value: Any, why: str) -> None:
    """A python-control keyword trajopt.compat does not offer, refused by name."""
    raise InvalidArgumentError(f"{fn}: {name}={value!r} is not supported ({why})")


def _weights(rest: list, fn: str, names: tuple[str, ...], optional: int = 1) -> list[Any]:
    if not len(names) - optional <= len(rest) <= len(names):
        raise InvalidArgumentError(f"{fn}: expected {', '.join(names)}; got "
                                   f"{len(rest)} weight arguments")
    return [_mat(r) for r in rest] + [None] * (len(names) - len(rest))


_INTEGRAL = "augment the system with the integrator states and their weights instead"


def _check_cross(N: Any, A: Any, B: Any) -> None:
    """python-control's cross weight N is (n, m), checked under its own name (the solver
    would name it S, scipy's name)."""
    if N is not None and all(hasattr(x, "shape") and len(x.shape) >= 2 for x in (A, B)):
        check_matrix(N, "N", A.shape[-1], B.shape[-1])


def dlqr(*args: Any, method: str | None = None, integral_action: Any = None
         ) -> tuple[Any, Any, Any]:
    """``K, S, E = dlqr(A, B, Q, R[, N])`` or ``dlqr(sys, Q, R[, N])``: the discrete LQR
    gain for ``u = -K x``, the Riccati solution and the closed-loop eigenvalues
    (python-control's ``dlqr``; ``N`` the cross weight ``2 x'N u``; ``method`` None
    (trajopt's "auto"), "scipy" or "slycot"; a continuous-time ``sys`` is refused, as
    there)."""
    _refuse_continuous(args, "dlqr")
    if integral_action is not None:
        _refuse("dlqr", "integral_action", integral_action, _INTEGRAL)
    A, B, *rest = _system(args, ("A", "B"), "dlqr")
    Q, R, N = _weights(rest, "dlqr", ("Q", "R", "N"))
    _check_cross(N, A, B)
    sol = solve_dare(A, B, Q, R, S=N, method=_method(method, "dlqr"))
    return -sol.K, sol.P, sol.closed_loop_eigvals


def lqr(*args: Any, method: str | None = None, integral_action: Any = None
        ) -> tuple[Any, Any, Any]:
    """``K, S, E = lqr(A, B, Q, R[, N])`` or ``lqr(sys, Q, R[, N])``: the continuous-time
    LQR gain for ``u = -K x`` (python-control's ``lqr``; a discrete-time ``sys`` goes to
    :func:`dlqr`, as there; ``method`` None or "scipy")."""
    if _discrete(args[0] if args else None):   # python-control dispatches to dlqr
        return dlqr(*args, method=method, integral_action=integral_action)
    if integral_action is not None:
        _refuse("lqr", "integral_action", integral_action, _INTEGRAL)
    A, B, *rest = _system(args, ("A", "B"), "lqr")
    Q, R, N = _weights(rest, "lqr", ("Q", "R", "N"))
    _check_cross(N, A, B)
    sol = solve_care(A, B, Q, R, S=N, method=_method(method, "lqr", ("scipy",)))
    return -sol.K, sol.P, sol.closed_loop_eigvals


_STABILIZING = "trajopt solves for the stabilizing solution only"


def dare(A: Any, B: Any, Q: Any, R: Any, S: Any = None, E: Any = None,
         stabilizing: bool = True, method: str | None = None) -> tuple[Any, Any, Any]:
    """``X, L, G = dare(A, B, Q, R, S, E)`` (python-control's argument order: S before
    E): the solution, the closed-loop eigenvalues and ``G = (B'XB + R)^{-1}(B'XA + S')``;
    ``method`` None, "scipy" or "slycot"; ``stabilizing=False`` is refused."""
    if not stabilizing:
        _refuse("dare", "stabilizing", stabilizing, _STABILIZING)
    sol = solve_dare(_mat(A), _mat(B), _mat(Q), _mat(R), E=_mat(E), S=_mat(S),
                     method=_method(method, "dare"))
    return sol.P, sol.closed_loop_eigvals, -sol.K


def care(A: Any, B: Any, Q: Any, R: Any, S: Any = None, E: Any = None,
         stabilizing: bool = True, method: str | None = None) -> tuple[Any, Any, Any]:
    """``X, L, G = care(A, B, Q, R, S, E)``: the solution, the closed-loop eigenvalues
    and ``G = R^{-1}(B'XE + S')`` (python-control's ``care``; ``method`` None or
    "scipy"; ``stabilizing=False`` is refused)."""
    if not stabilizing:
        _refuse("care", "stabilizing", stabilizing, _STABILIZING)
    sol = solve_care(_mat(A), _mat(B), _mat(Q), _mat(R), E=_mat(E), S=_mat(S),
                     method=_method(method, "care", ("scipy",)))
    return sol.P, sol.closed_loop_eigvals, -sol.K


def _estimator(args: tuple, fn: str, solve, method: str) -> tuple[Any, Any, Any]:
    A, G, C, *rest = _system(args, ("A", "B", "C"), fn)
    QN, RN = _weights(rest, fn, ("QN", "RN"), optional=0)
    g = G.shape[-1]
    if tuple(QN.shape[-2:]) != (g, g):   # G QN G' (python-control checks QN the same way)
        raise ShapeError(f"{fn}: QN must be ({g}, {g}) for G with {g} columns; got shape "
                         f"{tuple(QN.shape)}")
    W = G @ QN @ _T(G)
    sol = solve(_T(A), _T(C), 0.5 * (W + _T(W)), RN, method=method)
    return _T(-sol.K), sol.P, sol.closed_loop_eigvals


def dlqe(*args: Any, method: str | None = None) -> tuple[Any, Any, Any]:
    """``L, P, E = dlqe(A, G, C, QN, RN)`` or ``dlqe(sys, QN, RN)`` (G = sys.B): the
    steady-state Kalman gain of ``x[k+1] = A x[k] + G w[k]``, ``y[k] = C x[k] + v[k]``
    with ``cov(w) = QN``, ``cov(v) = RN``, from the dual DARE (python-control's form: the
    predictor gain ``L = A P C' (C P C' + RN)^{-1}``, P the prior error covariance, E the
    eigenvalues of ``A - L C``; a continuous-time ``sys`` is refused, as there)."""
    _refuse_continuous(args, "dlqe")
    return _estimator(args, "dlqe", solve_dare, _method(method, "dlqe"))


def lqe(*args: Any, method: str | None = None) -> tuple[Any, Any, Any]:
    """``L, P, E = lqe(A, G, C, QN, RN)`` or ``lqe(sys, QN, RN)``: the steady-state
    Kalman-Bucy gain ``L = P C' RN^{-1}`` from the dual CARE (python-control's ``lqe``;
    E the eigenvalues of ``A - L C``; a discrete-time ``sys`` goes to :func:`dlqe`, as
    there)."""
    if _discrete(args[0] if args else None):   # python-control dispatches to dlqe
        return dlqe(*args, method=method)
    return _estimator(args, "lqe", solve_care, _method(method, "lqe", ("scipy",)))
