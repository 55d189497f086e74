r"""Infinite-horizon, time-invariant LQR with linear terms (thesis Sec. 2.3.2).

.. math::

    \min_u \sum_{t=0}^\infty \tfrac12 x_t^\top Q x_t + \tfrac12 u_t^\top R u_t
        + u_t^\top M x_t + q^\top x_t + r^\top u_t, \qquad x_{t+1} = A x_t + B u_t .

:math:`P` solves the DARE (Eq. 2.3.8) with scipy's ``S = M^\top``; the linear term of the
value is the fixed point of Eq. 2.3.9, which in our notation reads
:math:`p = q + K^\top r + (A + BK)^\top p`, i.e.

.. math::

    p = (I - (A + BK)^\top)^{-1} (q + K^\top r), \qquad
    k = -(R + B^\top P B)^{-1}(r + B^\top p),

and the stationary policy is :math:`u = Kx + k`.  With linear terms the total cost is
infinite; :math:`p` is the gradient of the relative value function, the quantity the
thesis (Eq. 2.3.10, 4.1.7) uses.

In continuous time (``time="continuous"``: :math:`\dot x = Ax + Bu`, the same running
cost integrated) :math:`P` solves the CARE and the HJB equation's terms linear in x give

.. math::

    (A + BK)^\top p + q + K^\top r = 0, \qquad k = -R^{-1}(r + B^\top p),
    \qquad K = -R^{-1}(B^\top P + M).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import torch

from .._arrays import as_tensors
from .._checks import batch_shape, check_finite, check_matrix, check_vector
from ..care import CARESolution, solve_care
from ..dare._common import prepare
from ..dare.solve import DARESolution, solve_dare
from ..errors import InvalidArgumentError

__all__ = ["InfiniteLQRSolution", "solve_infinite_lqr", "linear_fixed_point",
           "continuous_linear_fixed_point"]


@dataclass(frozen=True)
class InfiniteLQRSolution:
    """Stationary solution of an infinite-horizon LQR.

    Attributes
    ----------
    P : (..., n, n)
        Value Hessian (stabilizing DARE solution; CARE in continuous time).
    K : (..., m, n)
        Feedback gain, ``u = K x + k``.
    p : (..., n)
        Value gradient (linear-term fixed point); zeros when q = r = 0.
    k : (..., m)
        Feedforward term; zeros when q = r = 0.
    closed_loop_eigvals : (..., n) complex
    residual : (...)
        Relative DARE (CARE) residual.
    method : str
    riccati : DARESolution or CARESolution
        The Riccati solution P came from.
    """

    P: Any
    K: Any
    p: Any
    k: Any
    residual: Any
    method: str
    riccati: DARESolution | CARESolution = field(repr=False, compare=False)

    @property
    def closed_loop_eigvals(self) -> Any:
        """Eigenvalues of ``A + BK`` (computed on first access, see DARESolution)."""
        return self.riccati.closed_loop_eigvals

    @property
    def dare(self) -> DARESolution | CARESolution:
        """The Riccati solution (the name from before continuous time; ``riccati``)."""
        return self.riccati


def _linear_terms(A, K, q, r) -> torch.Tensor:
    """``q + K'r`` (batch, n), zeros where both are None: the value's linear source."""
    batch = torch.broadcast_shapes(A.shape[:-2], K.shape[:-2])
    w = torch.zeros(*batch, A.shape[-1], dtype=A.dtype, device=A.device)
    if q is not None:
        w = w + q
    if r is not None:
        w = w + (K.transpose(-1, -2) @ r.unsqueeze(-1)).squeeze(-1)
    return w


def linear_fixed_point(A, B, R, P, K, q, r) -> tuple[torch.Tensor, torch.Tensor]:
    """``p = (I - (A+BK)')^{-1}(q + K'r)`` and ``k = -(R + B'PB)^{-1}(r + B'p)``
    (tensors, batched)."""
    n = A.shape[-1]
    eye = torch.eye(n, dtype=A.dtype, device=A.device)
    p = torch.linalg.solve(eye - (A + B @ K).transpose(-1, -2), _linear_terms(A, K, q, r))
    rhs = (B.transpose(-1, -2) @ p.unsqueeze(-1)).squeeze(-1)
    if r is not None:
        rhs = rhs + r
    G = R + B.transpose(-1, -2) @ P @ B
    k = -torch.linalg.solve(G, rhs)
    return p, k


def continuous_linear_fixed_point(A, B, R, K, q, r) -> tuple[torch.Tensor, torch.Tensor]:
    """``p = -(A+BK)'^{-1}(q + K'r)`` and ``k = -R^{-1}(r + B'p)`` (continuous time)."""
    p = -torch.linalg.solve((A + B @ K).transpose(-1, -2), _linear_terms(A, K, q, r))
    rhs = (B.transpose(-1, -2) @ p.unsqueeze(-1)).squeeze(-1)
    if r is not None:
        rhs = rhs + r
    return p, -torch.linalg.solve(R, rhs)


def solve_infinite_lqr(
    A: Any, B: Any, Q: Any, R: Any, M: Any = None, q: Any = None, r: Any = None, *,
    method: str = "auto", time: Literal["discrete", "continuous"] = "discrete",
) -> InfiniteLQRSolution:
    """Solve the infinite-horizon LQR (cost convention of ``docs/notation.md``), in
    discrete time (the DARE) or continuous time (the CARE).

    Parameters
    ----------
    A : (..., n, n)
    B : (..., n, m)
    Q : (..., n, n)
    R : (..., m, m)
    M : (..., m, n), optional
        Cross term ``u'Mx`` (scipy's ``S`` is ``M'``).
    q : (..., n), optional
    r : (..., m), optional
    method : str
        DARE method (:func:`trajopt.solve_dare`), or CARE method
        (:func:`trajopt.solve_care`) in continuous time.
    time : {"discrete", "continuous"}
        ``x_{t+1} = Ax_t + Bu_t`` with a summed cost, or ``dx/dt = Ax + Bu`` with an
        integrated one.

    Returns
    -------
    InfiniteLQRSolution
    """
    t, kind = as_tensors({"A": A, "B": B, "Q": Q, "R": R, "M": M, "q": q, "r": r},
                         sequences=False)
    S = None
    if t["M"] is not None:  # checked here, so that a bad M is not reported as scipy's S
        n, m = t["A"].shape[-1], t["B"].shape[-1]
        check_matrix(t["M"], "M", m, n)
        S = t["M"].transpose(-1, -2)
    d = prepare(t["A"], t["B"], t["Q"], t["R"], None, S)
    if t["q"] is not None:
        check_vector(t["q"], "q", d.n)
        check_finite(t["q"], "q")
    if t["r"] is not None:
        check_vector(t["r"], "r", d.m)
        check_finite(t["r"], "r")
    batch_shape(*((t[k], 2, k) for k in ("A", "B", "Q", "R", "M")), (t["q"], 1, "q"),
                (t["r"], 1, "r"))
    if time == "continuous":
        sol = solve_care(d.A, d.B, d.Q, d.R, None, d.S, method=method)
        p, k = continuous_linear_fixed_point(d.A, d.B, d.R, sol.K, t["q"], t["r"])
        riccati = CARESolution
    elif time == "discrete":
        sol = solve_dare(d.A, d.B, d.Q, d.R, None, d.S, method=method)
        p, k = linear_fixed_point(d.A, d.B, d.R, sol.P, sol.K, t["q"], t["r"])
        riccati = DARESolution
    else:
        raise InvalidArgumentError(f"time must be 'discrete' or 'continuous'; got {time!r}")
    return InfiniteLQRSolution(
        P=kind.out(sol.P), K=kind.out(sol.K), p=kind.out(p), k=kind.out(k),
        residual=kind.out(sol.residual), method=sol.method,
        riccati=riccati(P=kind.out(sol.P), K=kind.out(sol.K),
                        residual=kind.out(sol.residual), method=sol.method,
                        _eigvals=partial(_eigvals_out, kind, sol)))


def _eigvals_out(kind: Any, sol: DARESolution | CARESolution) -> Any:
    """The Riccati solution's closed-loop eigenvalues in the caller's array type, read
    when first asked for (module level, so that the result pickles)."""
    return kind.out(sol.closed_loop_eigvals)
