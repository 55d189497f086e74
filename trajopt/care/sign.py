r"""The matrix-sign-function method for the CARE, batched in torch.

For the standard form :math:`A_s^\top Y + Y A_s - Y G Y + Q_s = 0` (``standard_form``) the
Hamiltonian :math:`H = [[A_s, -G], [-Q_s, -A_s^\top]]` maps the graph of the stabilizing
solution onto itself, :math:`H [I; Y] = [I; Y](A_s - G Y)` with :math:`A_s - G Y` stable,
so :math:`(\mathrm{sign}(H) + I)[I; Y] = 0`.  The sign is Newton's iteration
:math:`W \leftarrow \tfrac12 (c W + (c W)^{-1})` with determinant scaling
:math:`c = |\det W|^{-1/(2n)}` (Byers 1987; Roberts 1980), and Y the solution of the
consistent overdetermined system :math:`[W_{12}; W_{22} + I] Y = -[W_{11} + I; W_{21}]`.
The iteration converges (quadratically, after the scaled first steps) exactly when H has
no eigenvalue on the imaginary axis, i.e. when a stabilizing solution exists and is
unique; each step is one batched (2n x 2n) inverse, so a batch of systems costs about
what one does on a GPU.
"""

from __future__ import annotations

import torch

from .._linalg import finite_rows, norm1, sym
from ..dare._common import DAREData
from ._common import from_standard, standard_form


def solve_sign(d: DAREData, tol: float | None = None, max_iter: int = 100
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """The stabilizing solution X (batch, n, n) and a (batch,) bool: the sign iteration
    converged (elements where it did not hold NaN)."""
    A, G, Q = standard_form(d)
    n = d.n
    W = torch.cat([torch.cat([A, -G], -1), torch.cat([-Q, -A.transpose(-1, -2)], -1)], -2)
    eps = torch.finfo(W.dtype).eps
    tol = 10 * n * eps if tol is None else tol
    done = torch.zeros(d.batch, dtype=torch.bool, device=W.device)
    for k in range(max_iter):
        Winv, info = torch.linalg.inv_ex(W)
        ok = (info == 0) & finite_rows(Winv)
        if k < 8:   # determinant scaling for the first steps (quadratic convergence after)
            logdet = torch.linalg.slogdet(W)[1]
            c = torch.exp(-logdet / (2 * n)).clamp(1e-8, 1e8)[..., None, None]
            c = torch.where(torch.isfinite(c), c, torch.ones_like(c))
        else:
            c = torch.ones_like(W[..., :1, :1])
        new = 0.5 * (c * W + Winv / c)
        new = torch.where(ok[..., None, None], new, torch.full_like(new, float("nan")))
        step = norm1(new - W)
        done = done | (step <= tol * norm1(new))
        W = new
        if bool((done | ~ok).all()):
            break
    eye = torch.eye(n, dtype=W.dtype, device=W.device)
    W11, W12 = W[..., :n, :n], W[..., :n, n:]
    W21, W22 = W[..., n:, :n], W[..., n:, n:]
    lhs = torch.cat([W12, W22 + eye], -2)
    rhs = -torch.cat([W11 + eye, W21], -2)
    # consistent, and [W12; W22 + I] has full column rank at a converged sign; elements
    # whose iteration broke down (NaN) get a placeholder system (LAPACK's least squares
    # fails an internal assert on NaN) and NaN back
    broken = ~(finite_rows(lhs) & finite_rows(rhs))
    if bool(broken.any()):
        lhs = torch.where(broken[..., None, None], torch.eye(2 * n, n, dtype=W.dtype,
                                                             device=W.device), lhs)
        rhs = torch.where(broken[..., None, None], torch.zeros_like(rhs), rhs)
    Y = torch.linalg.lstsq(lhs, rhs).solution
    Y = torch.where(broken[..., None, None], torch.full_like(Y, float("nan")), Y)
    X = from_standard(d, sym(Y))
    return X, done & finite_rows(X)
