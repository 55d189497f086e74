r"""Conjugate gradients for a symmetric positive definite operator given only by its
products (Hestenes & Stiefel 1952; Golub & Van Loan, *Matrix Computations*, 4th ed.,
Alg. 11.3.2).

.. math::

    A x = b, \qquad A = A^\top \succ 0 \text{ applied as } v \mapsto A v .

Used where forming A costs more than the iterations: the output-space natural gradient
of :mod:`nnbridge.steepest`, whose Gramian has size ``B n_out`` squared while one product
with it costs one pass over the layers (``docs/steepest.md``).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

__all__ = ["CGResult", "conjugate_gradient"]


@dataclass(frozen=True)
class CGResult:
    r"""The outcome of :func:`conjugate_gradient`.

    Attributes
    ----------
    x : (D,)
        The last iterate (the solution when ``converged``).
    iterations : int
        Operator products taken.
    converged : bool
        The recursive residual reached ``tol * ||b||``.
    residual : float
        The last recursive residual relative to ``||b||``.
    reason : str
        ``"converged"``, ``"max_iter"``, ``"stopped"`` (by the caller's ``stop``),
        ``"not_positive_definite"`` (a direction with :math:`p^\top A p \le 0`: A is
        not numerically positive definite) or ``"non_finite"`` (a NaN / inf in the
        iteration).
    """

    x: torch.Tensor
    iterations: int
    converged: bool
    residual: float
    reason: str


def conjugate_gradient(apply: Callable[[torch.Tensor], torch.Tensor], b: torch.Tensor, *,
                       tol: float, max_iter: int,
                       stop: Callable[[int, float], bool] | None = None) -> CGResult:
    r"""Solve :math:`A x = b` by conjugate gradients from :math:`x_0 = 0`.

    Parameters
    ----------
    apply : callable ``v -> A v``, (D,) -> (D,)
        The products with a symmetric positive definite A.
    b : (D,)
    tol : float
        Stop when :math:`\|r_k\| \le` ``tol`` :math:`\|b\|` (:math:`r_k` the recursive
        residual).
    max_iter : int
        The most products of A taken (at most D are needed in exact arithmetic).
    stop : callable ``(iterations, relative residual) -> bool``, optional
        Asked after every unconverged iteration; True ends the iteration (reason
        ``"stopped"``), e.g. when the residual's progress says ``max_iter`` will not do.

    Returns
    -------
    CGResult
        The iterate and why the iteration stopped; never raises on a breakdown (the
        caller decides what an unconverged solve means).
    """
    x = torch.zeros_like(b)
    bnorm = float(torch.linalg.vector_norm(b))
    if bnorm == 0.0:
        return CGResult(x, 0, True, 0.0, "converged")
    if not bnorm < float("inf"):
        return CGResult(x, 0, False, float("nan"), "non_finite")
    r = b.clone()
    p = r.clone()
    rr = r @ r
    for it in range(1, max_iter + 1):
        Ap = apply(p)
        pAp = p @ Ap
        if not bool(torch.isfinite(pAp)):
            return CGResult(x, it, False, float("nan"), "non_finite")
        if not float(pAp) > 0.0:
            return CGResult(x, it, False, float(rr.sqrt()) / bnorm, "not_positive_definite")
        alpha = rr / pAp
        x.add_(alpha * p)
        r.sub_(alpha * Ap)
        rr_new = r @ r
        rel = float(rr_new.sqrt()) / bnorm
        if rel <= tol:
            return CGResult(x, it, True, rel, "converged")
        if not rel < float("inf"):
            return CGResult(x, it, False, rel, "non_finite")
        if stop is not None and stop(it, rel):
            return CGResult(x, it, False, rel, "stopped")
        p = torch.add(r, p, alpha=float(rr_new / rr))
        rr = rr_new
    return CGResult(x, max_iter, False, rel if max_iter > 0 else 1.0, "max_iter")
