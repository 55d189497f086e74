"""Zero-order-hold discretization of linear (A, B) pairs: :func:`c2d`."""

from __future__ import annotations

import math
from typing import Any

import torch

from .._arrays import as_tensors
from .._checks import check_finite, check_matrix, check_square
from ..errors import InvalidArgumentError


def c2d(A: Any, B: Any, dt: float) -> tuple[Any, Any]:
    r"""Exact discretization of :math:`\dot x = A x + B u` with u held constant over each
    step of length ``dt`` (zero-order hold):

    .. math::

        A_d = e^{A\,dt}, \qquad B_d = \int_0^{dt} e^{A s}\,ds\; B ,

    both read off one matrix exponential, :math:`\exp([[A, B], [0, 0]]\,dt) =
    [[A_d, B_d], [0, I]]` (Van Loan 1978; what ``scipy.signal.cont2discrete`` does for
    ``method="zoh"``).  Batched over leading dimensions; numpy in, numpy out.

    Parameters
    ----------
    A : (..., n, n)
    B : (..., n, m)
    dt : float
        The sampling time, positive and finite.

    Returns
    -------
    (A_d, B_d) : (..., n, n), (..., n, m)
    """
    if isinstance(dt, bool) or not isinstance(dt, (int, float)) or not 0 < dt < math.inf:
        raise InvalidArgumentError(f"dt must be a positive finite number; got {dt!r}")
    t, kind = as_tensors({"A": A, "B": B}, sequences=False)
    A, B = t["A"], t["B"]
    n = check_square(A, "A")
    check_matrix(B, "B", n, None)
    check_finite(A, "A")
    check_finite(B, "B")
    m = B.shape[-1]
    batch = torch.broadcast_shapes(A.shape[:-2], B.shape[:-2])
    M = torch.zeros(*batch, n + m, n + m, dtype=A.dtype, device=A.device)
    M[..., :n, :n] = A
    M[..., :n, n:] = B
    E = torch.linalg.matrix_exp(M * dt)
    return kind.out(E[..., :n, :n]), kind.out(E[..., :n, n:])
