"""Wrappers of the reference DARE solvers: scipy (QZ on the extended symplectic pencil)
and slycot (SLICOT SB02OD / SG02AD, generalized Schur).  Both loop over batch elements
on the CPU in float64; numpy data (one system, see ``_common``) is passed through.
:func:`reference_solution` is "auto"'s choice between them."""

from __future__ import annotations

import itertools

import numpy as np
import scipy.linalg
import torch

from ..errors import NotStabilizableError, NumericalError, SolverUnavailableError, TrajoptError
from ._common import DAREData, ops, relative_residual
from .stability import raise_unstabilizable


def slycot_available() -> bool:
    try:
        import slycot  # noqa: F401
    except ImportError:
        return False
    return True


def _np(t: torch.Tensor | None) -> np.ndarray | None:
    return None if t is None else t.detach().cpu().to(torch.float64).numpy()


def loop_elements(d: DAREData, solve_one, on_failure=raise_unstabilizable) -> torch.Tensor:
    """``solve_one(A, B, Q, R, E, S)`` (float64 numpy, one system) for every batch
    element, stacked as tensors of ``d``'s dtype and device.  An element whose solve raises
    :class:`NotStabilizableError` is named: ``on_failure(d, bad, message)`` raises it
    (``bad``: the mask of that element; :func:`raise_unstabilizable` by default, which
    names an uncontrollable unstable mode where there is one)."""
    out = torch.empty(*d.batch, d.n, d.n, dtype=d.A.dtype, device=d.A.device)
    for index in itertools.product(*(range(s) for s in d.batch)):
        e = d.element(index)
        try:
            X = solve_one(_np(e.A), _np(e.B), _np(e.Q), _np(e.R), _np(e.E), _np(e.S))
        except NotStabilizableError as exc:
            bad = torch.zeros(d.batch, dtype=torch.bool)
            bad[index] = True
            on_failure(d, bad, str(exc))
            raise
        out[index] = torch.as_tensor(X, dtype=d.A.dtype, device=d.A.device)
    return out


def _scipy_one(A, B, Q, R, E, S):
    # scipy 1.17's balancing is wrong for E != I (residuals ~1e-3 on ~15% of random
    # well-conditioned systems, see docs/dare.md), so balancing is used only without E.
    try:
        return scipy.linalg.solve_discrete_are(A, B, Q, R, e=E, s=S, balanced=E is None)
    except (np.linalg.LinAlgError, ValueError) as exc:
        raise NotStabilizableError(
            f"scipy found no stabilizing solution: {exc}") from exc


def _slycot_one(A, B, Q, R, E, S):
    # slycot divides alpha/beta for infinite eigenvalues and warns; they are not used
    with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
        return _slycot_raw(A, B, Q, R, E, S)


def _slycot_raw(A, B, Q, R, E, S):
    import slycot
    from slycot.exceptions import SlycotError

    n, m = B.shape
    try:
        if E is None:
            X, _rcond, _w, _S, _T = slycot.sb02od(
                n, m, A, B, Q, R, "D", L=np.zeros((n, m)) if S is None else S)
        else:
            out = slycot.sg02ad("D", "B", "N", "U", "Z" if S is None else "N", "N", "S",
                                "R", n, m, 0, A, E, B, Q, R,
                                np.zeros((n, m)) if S is None else S)
            X = out[1]
    except SlycotError as exc:
        raise NotStabilizableError(f"slycot found no stabilizing solution: {exc}") from exc
    except ValueError as exc:  # slycot's argument errors
        raise NumericalError(f"slycot failed: {exc}") from exc
    return X


def solve_scipy(d: DAREData):
    """``scipy.linalg.solve_discrete_are`` element by element (numpy data: one call)."""
    if d.is_numpy:
        return _scipy_one(d.A, d.B, d.Q, d.R, d.E, d.S)
    return loop_elements(d, _scipy_one)


def solve_slycot(d: DAREData):
    """SLICOT SB02OD (E = I) or SG02AD (general E) element by element."""
    if not slycot_available():
        raise SolverUnavailableError(
            "method='slycot' needs the optional slycot package (GPL-2.0): "
            "pip install 'trajopt-nnbridge[slycot]'")
    if d.is_numpy:
        return _slycot_one(d.A, d.B, d.Q, d.R, d.E, d.S)
    return loop_elements(d, _slycot_one)


def eps_of(X) -> float:
    """The machine epsilon of X's dtype."""
    return float(ops(X).finfo(X).eps)


def accept_tol(X, n: int) -> float:
    """Residual below which 'auto' accepts a result without a fallback (X: the solution,
    for its dtype)."""
    return 1e3 * n * eps_of(X)


def reference_solution(d: DAREData) -> tuple[torch.Tensor, str]:
    """slycot (else scipy); when slycot's answer is not accurate to the acceptance
    tolerance, scipy too, and per element the one with the smaller residual: "auto" never
    returns a worse residual than the best back end it tried (slycot with E and S has
    returned residuals of 1e-3 where scipy's were 1e-9)."""
    if slycot_available():
        try:
            X = solve_slycot(d)
        except TrajoptError:
            X = None
        if X is not None:
            res = relative_residual(d, X)
            if bool((res <= accept_tol(X, d.n)).all()):
                return X, "slycot"
            try:
                Xs = solve_scipy(d)
            except TrajoptError:
                return X, "slycot"
            better = relative_residual(d, Xs) < res
            if not bool(better.any()):
                return X, "slycot"
            return ops(X).where(better[..., None, None], Xs, X), "slycot,scipy"
    return solve_scipy(d), "scipy"
