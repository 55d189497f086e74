r"""The iLQR backward pass by the parallel scan, where it is the same pass and pays.

An iLQR backward pass with Levenberg-Marquardt :math:`\mu = 0` and no control limits is
the Riccati recursion of an LQ problem, so its value functions are the suffix products of
:func:`trajopt.riccati.scan.scan_values`.  Given them, the one Riccati step of
:mod:`trajopt.riccati.step` runs **once over all stages** (stages as a batch dimension)
for the gains, the value derivatives it returns, the expected change and the ok flags:
the kernel is unchanged, only its input :math:`V_{t+1}` comes from the scan instead of
from the previous iteration of a Python loop.

The rule (:func:`scan_applies`), measured on the CPU (``docs/performance.md``, "The
backward pass as a parallel scan"):

* the plain gains plug (:class:`~trajopt.riccati.policy.CholeskyGains`) with every
  element's :math:`\mu = 0` -- a regularized pass is the value of the regularized policy
  under the *unregularized* cost, which is not the value of an LQ problem; box limits
  and players have their own plugs --, dense stages without second-order dynamics terms
  (``mode="ilqr"``), all of one size;
* :func:`~trajopt.riccati.scan.scan_pays`: at least
  :data:`~trajopt.riccati.scan.MIN_STAGES` stages and ``batch * (n + m)^2 <=``
  :data:`~trajopt.riccati.scan.MAX_WORK` on the CPU,
  :data:`~trajopt.riccati.scan.MAX_WORK_CUDA` on a GPU (a few problems of a few states,
  where the recursion is bound by per-operation dispatch or kernel launches).

It then checks itself: the step's :math:`V_t`, computed from the scan's
:math:`V_{t+1}`, must equal the scan's :math:`V_t` to
:data:`~trajopt.riccati.scan.AGREEMENT` (relative);
elsewhere (an indefinite cost that makes :math:`I + C_i J_j` nearly singular, a cost
whose :math:`l_{uu}` is not positive definite) the pass returns ``None`` and the caller
runs the recursion.  Elements whose :math:`Q_{uu}` is not positive definite are flagged
``ok = False`` as the recursion flags them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..riccati.expansion import DenseStage, expand_q_joint
from ..riccati.policy import CholeskyGains, GainsPlug
from ..riccati.scan import scan_pays, scanned_step, stacked_stages
from ..riccati.step import total_expected_change, value_update
from .batch import Policy

__all__ = ["scan_applies", "scan_backward_pass"]


def scan_applies(stages: list, gains: GainsPlug, mu: torch.Tensor, lo) -> bool:
    """Whether :func:`scan_backward_pass` is tried for this backward pass (the rule of the
    module docstring; the stages' sizes are checked by the pass itself)."""
    if lo is not None or type(gains) is not CholeskyGains:
        return False
    s0 = stages[0]
    if type(s0) is not DenseStage or s0.F.ndim != 3 or s0.fxx is not None:
        return False
    B, _, nm = s0.F.shape
    return scan_pays(len(stages), B, nm, s0.F.device) and not bool(mu.any())


def scan_backward_pass(stages: list[DenseStage], Vx: torch.Tensor, Vxx: torch.Tensor,
                       gains: CholeskyGains) -> Policy | None:
    """The backward pass of :meth:`trajopt.ddp.DDPSolver.backward_pass` by the scan, or
    ``None`` where it does not apply to these stages or numbers (see the module
    docstring).

    Parameters
    ----------
    stages : list of DenseStage, each F (B, n, n+m), L (B, n+m, 1+n+m)
    Vx : (B, n), Vxx : (B, n, n)
        Terminal value derivatives.
    gains : CholeskyGains
        The gains plug of the pass (every ``reg`` zero).
    """
    def step(Vx1, Vxx1, F, L, n, c):
        Q = expand_q_joint(Vx1, Vxx1, F, L, n, c)
        g = gains.gains(Q, 0)  # all stages at once: K (T, B, m, n), ok (T, B)
        # elements whose Q_uu was not PD somewhere are flagged, as the recursion flags them
        return _Pass(g, value_update(Q, g.K, g.k, exact_policy=False, kK=g.kK)), g.ok.all(0)

    stacked = stacked_stages(stages)
    done = None if stacked is None else scanned_step(stacked, stages[0].n, Vx, Vxx, step)
    if done is None:
        return None
    g, ok = done.gains, done.gains.ok.all(0)
    k, Qu, Qg = (v.transpose(0, 1).flatten(1) for v in done.step.change_terms())
    dV = total_expected_change([(k, Qu, Qg)])
    return Policy.from_stacked(g.kK, done.Vx, done.Vxx, Vx, Vxx, dV,
                               ok & torch.isfinite(dV).all(-1))


@dataclass(frozen=True)
class _Pass:
    """The gains and the value update of all stages (``Vx``, ``Vxx``: the step's, for
    :func:`~trajopt.riccati.scan.scanned_step`'s check)."""

    gains: Any
    step: Any

    @property
    def Vx(self) -> torch.Tensor:  # noqa: N802
        return self.step.Vx

    @property
    def Vxx(self) -> torch.Tensor:  # noqa: N802
        return self.step.Vxx
