r"""The iLQR backward pass by the compiled recursion, where it applies and pays.

:func:`trajopt.riccati.compiled.compiled_recursion` is the backward pass of
:meth:`trajopt.ddp.DDPSolver.backward_pass` -- expansion, Cholesky gains with each
element's Levenberg-Marquardt :math:`\mu`, general value update, the expected change and
the ok flags -- as one compiled loop. It applies to the plain gains plug
(:class:`~trajopt.riccati.policy.CholeskyGains`, any :math:`\mu`) and to control limits
(:class:`~trajopt.riccati.policy.BoxGains` of one player with its exact curvature: the
same box QP, compiled), dense first-order stages (``mode="ilqr"``) of one size, and pays by
:func:`~trajopt.riccati.compiled.compiled_pays` (CPU, small problems, numba importable).
Elsewhere the solver takes the parallel scan (:mod:`trajopt.ddp.scanpass`) or the torch
recursion.
"""

from __future__ import annotations

import torch

from ..riccati.compiled import BoxLimits, compiled_pays, compiled_recursion
from ..riccati.expansion import DenseStage
from ..riccati.policy import BoxGains, CholeskyGains, GainsPlug
from ..riccati.scan import stacked_stages
from .batch import Policy, Rows

__all__ = ["compiled_backward_pass"]


def compiled_backward_pass(stages: list, Vx: torch.Tensor, Vxx: torch.Tensor,
                           gains: GainsPlug) -> Policy | None:
    """The backward pass by the compiled loop, or ``None`` where it does not apply or pay
    (the caller then runs the scan or the torch recursion).

    Parameters
    ----------
    stages : list of DenseStage, each F (B, n, n+m), L (B, n+m, 1+n+m)
    Vx : (B, n), Vxx : (B, n, n)
        Terminal value derivatives.
    gains : GainsPlug
        The pass's gains plug: :class:`~trajopt.riccati.policy.CholeskyGains`, or
        :class:`~trajopt.riccati.policy.BoxGains` of one player with exact curvature.
    """
    if type(gains) is CholeskyGains:
        box = None
    elif type(gains) is BoxGains and gains.sizes is None and gains.curvature is None:
        box = gains
    else:
        return None
    if not stages:
        return None
    s0 = stages[0]
    if type(s0) is not DenseStage or s0.F.ndim != 3:
        return None
    B, n, nm = s0.F.shape
    mu = torch.as_tensor(gains.reg)
    extra = () if box is None else (box.lo, box.hi, box.us[0])
    if not compiled_pays(len(stages), B, n, nm - n, s0.F, s0.L, Vx, Vxx, mu, *extra):
        return None
    stacked = stacked_stages(stages)
    if stacked is None:
        return None
    limits = None if box is None else BoxLimits(
        box.lo, box.hi, Rows.stack(box.us),
        None if box.warm is None else Rows.stack(box.warm))
    done = compiled_recursion(*stacked, Vx, Vxx, mu.expand(B), limits)
    return Policy.from_stacked(done.kK, done.Vx, done.Vxx, Vx, Vxx, done.dV, done.ok)
