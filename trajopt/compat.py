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

from .care import solve_care
from .dare import solve_dare
from .errors import InvalidArgumentError

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


def _discrete(sys_: Any) -> bool:
    """A state-space object with a sampling time (python-control: ``dt`` True or > 0)."""
    dt = getattr(sys_, "dt", None)
    return not isinstance(sys_, (np.ndarray, torch.Tensor)) and dt is not None and \
        dt is not False and (dt is True or dt > 0)


def _weights(rest: list, fn: str, names: tuple[str, ...], optional: int = 1) -> list[Any]:
    if not len(names) - optional <= len(rest) <= len(names):
        raise InvalidArgumentError(f"{fn}: expected {', '.join(names)}; got "
                                   f"{len(rest)} weight arguments")
    return [_mat(r) for r in rest] + [None] * (len(names) - len(rest))


def dlqr(*args: Any) -> tuple[Any, Any, Any]:
    """``K, S, E = dlqr(A, B, Q, R[, N])`` or ``dlqr(sys, Q, R[, N])``: the discrete LQR
    gain for ``u = -K x``, the Riccati solution and the closed-loop eigenvalues
    (python-control's ``dlqr``; ``N`` the cross weight ``2 x'N u``)."""
    A, B, *rest = _system(args, ("A", "B"), "dlqr")
    Q, R, N = _weights(rest, "dlqr", ("Q", "R", "N"))
    sol = solve_dare(A, B, Q, R, S=N)
    return -sol.K, sol.P, sol.closed_loop_eigvals


def lqr(*args: Any) -> tuple[Any, Any, Any]:
    """``K, S, E = lqr(A, B, Q, R[, N])`` or ``lqr(sys, Q, R[, N])``: the continuous-time
    LQR gain for ``u = -K x`` (python-control's ``lqr``; a discrete-time ``sys`` goes to
    :func:`dlqr`, as there)."""
    if _discrete(args[0] if args else None):   # python-control dispatches to dlqr
        return dlqr(*args)
    A, B, *rest = _system(args, ("A", "B"), "lqr")
    Q, R, N = _weights(rest, "lqr", ("Q", "R", "N"))
    sol = solve_care(A, B, Q, R, S=N)
    return -sol.K, sol.P, sol.closed_loop_eigvals


def dare(A: Any, B: Any, Q: Any, R: Any, S: Any = None, E: Any = None
         ) -> tuple[Any, Any, Any]:
    """``X, L, G = dare(A, B, Q, R, S, E)`` (python-control's argument order: S before
    E): the solution, the closed-loop eigenvalues and ``G = (B'XB + R)^{-1}(B'XA + S')``."""
    sol = solve_dare(_mat(A), _mat(B), _mat(Q), _mat(R), E=_mat(E), S=_mat(S))
    return sol.P, sol.closed_loop_eigvals, -sol.K


def care(A: Any, B: Any, Q: Any, R: Any, S: Any = None, E: Any = None
         ) -> tuple[Any, Any, Any]:
    """``X, L, G = care(A, B, Q, R, S, E)``: the solution, the closed-loop eigenvalues
    and ``G = R^{-1}(B'XE + S')`` (python-control's ``care``)."""
    sol = solve_care(_mat(A), _mat(B), _mat(Q), _mat(R), E=_mat(E), S=_mat(S))
    return sol.P, sol.closed_loop_eigvals, -sol.K


def _estimator(args: tuple, fn: str, solve) -> tuple[Any, Any, Any]:
    A, G, C, *rest = _system(args, ("A", "B", "C"), fn)
    QN, RN = _weights(rest, fn, ("QN", "RN"), optional=0)
    W = G @ QN @ _T(G)
    sol = solve(_T(A), _T(C), 0.5 * (W + _T(W)), RN)
    return _T(-sol.K), sol.P, sol.closed_loop_eigvals


def dlqe(*args: Any) -> tuple[Any, Any, Any]:
    """``L, P, E = dlqe(A, G, C, QN, RN)`` or ``dlqe(sys, QN, RN)`` (G = sys.B): the
    steady-state Kalman gain of ``x[k+1] = A x[k] + G w[k]``, ``y[k] = C x[k] + v[k]``
    with ``cov(w) = QN``, ``cov(v) = RN``, from the dual DARE (python-control's form: the
    predictor gain ``L = A P C' (C P C' + RN)^{-1}``, P the prior error covariance, E the
    eigenvalues of ``A - L C``)."""
    return _estimator(args, "dlqe", solve_dare)


def lqe(*args: Any) -> tuple[Any, Any, Any]:
    """``L, P, E = lqe(A, G, C, QN, RN)`` or ``lqe(sys, QN, RN)``: the steady-state
    Kalman-Bucy gain ``L = P C' RN^{-1}`` from the dual CARE (python-control's ``lqe``;
    E the eigenvalues of ``A - L C``)."""
    return _estimator(args, "lqe", solve_care)
