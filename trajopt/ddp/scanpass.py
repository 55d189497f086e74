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
* at least :data:`MIN_STAGES` stages and ``batch * (n + m)^2 <= MAX_WORK``: the scan does
  :math:`O(T \log T)` small matrix operations against the recursion's :math:`O(T)`, so it
  pays only where the recursion is bound by per-operation dispatch (a few problems of a
  few states).

It then checks itself: the step's :math:`V_t`, computed from the scan's
:math:`V_{t+1}`, must equal the scan's :math:`V_t` to :data:`CONSISTENCY` (relative);
elsewhere (an indefinite cost that makes :math:`I + C_i J_j` nearly singular, a cost
whose :math:`l_{uu}` is not positive definite) the pass returns ``None`` and the caller
runs the recursion.  Elements whose :math:`Q_{uu}` is not positive definite are flagged
``ok = False`` as the recursion flags them.
"""

from __future__ import annotations

import torch

from ..riccati.expansion import DenseStage, expand_q_joint
from ..riccati.policy import CholeskyGains, GainsPlug
from ..riccati.scan import scan_values
from ..riccati.step import total_expected_change, value_update
from .batch import Policy

__all__ = ["MIN_STAGES", "MAX_WORK", "CONSISTENCY", "scan_applies", "scan_backward_pass"]

#: fewest stages for which the scan is taken (below it the recursion is as fast)
MIN_STAGES = 16
#: largest ``batch * (n + m)^2`` for which the scan is taken
MAX_WORK = 256
#: largest relative difference between the scan's values and the step's
CONSISTENCY = 1e-8


def scan_applies(stages: list, gains: GainsPlug, mu: torch.Tensor, lo) -> bool:
    """Whether :func:`scan_backward_pass` computes this backward pass (the rule of the
    module docstring)."""
    if lo is not None or type(gains) is not CholeskyGains or len(stages) < MIN_STAGES:
        return False
    s0 = stages[0]
    if type(s0) is not DenseStage or s0.F.ndim != 3 or s0.F.shape[-2] != s0.n:
        return False
    B, n, nm = s0.F.shape
    if B * nm * nm > MAX_WORK or bool(mu.any()):
        return False
    with_c = s0.c is not None
    return all(type(s) is DenseStage and s.fxx is None and s.F.shape == s0.F.shape
               and s.L.shape == s0.L.shape and (s.c is not None) == with_c
               for s in stages)


def scan_backward_pass(stages: list[DenseStage], Vx: torch.Tensor, Vxx: torch.Tensor,
                       gains: CholeskyGains) -> Policy | None:
    """The backward pass of :meth:`trajopt.ddp.DDPSolver.backward_pass` by the scan, or
    ``None`` where it does not apply to these numbers (see the module docstring).

    Parameters
    ----------
    stages : list of DenseStage, each F (B, n, n+m), L (B, n+m, 1+n+m)
    Vx : (B, n), Vxx : (B, n, n)
        Terminal value derivatives.
    gains : CholeskyGains
        The gains plug of the pass (every ``reg`` zero).
    """
    n = stages[0].n
    F = torch.stack([s.F for s in stages])
    L = torch.stack([s.L for s in stages])
    c = None if stages[0].c is None else torch.stack([s.c for s in stages])
    vals = scan_values(F, L, n, Vx, Vxx, c)
    if not bool(vals.ok.all()):
        return None
    Q = expand_q_joint(vals.Vx[1:], vals.Vxx[1:], F, L, n, c)
    g = gains.gains(Q, 0)  # all stages at once: K (T, B, m, n), ok (T, B)
    step = value_update(Q, g.K, g.k, exact_policy=False, kK=g.kK)
    ok = g.ok.all(0)
    # the step's V_t from the scan's V_{t+1} against the scan's V_t, for the elements
    # whose Q_uu was PD at every stage (the others are flagged, as the recursion flags them)
    scale = vals.Vxx[:-1].abs().amax((-2, -1)) + vals.Vx[:-1].abs().amax(-1)
    diff = torch.maximum((step.Vxx - vals.Vxx[:-1]).abs().amax((-2, -1)),
                         (step.Vx - vals.Vx[:-1]).abs().amax(-1))
    consistent = (diff <= CONSISTENCY * scale) | ~ok
    if not bool(consistent.all()):
        return None
    k, Qu, Qg = (v.transpose(0, 1).flatten(1) for v in step.change_terms())
    dV = total_expected_change([(k, Qu, Qg)])
    return Policy(list(g.K.unbind(0)), list(g.k.unbind(0)),
                  list(step.Vx.unbind(0)) + [Vx], list(step.Vxx.unbind(0)) + [Vxx], dV,
                  ok & torch.isfinite(dV).all(-1))
