r"""The one Riccati backward step: Q-expansion -> policy -> value update.

Given the next value derivatives (:math:`V_x', V_{xx}'`) a stage's expansion
(:mod:`~trajopt.riccati.expansion`) gives :math:`Q`; a policy plug gives
:math:`\delta u = k + K \delta x` (:math:`k = -\tilde Q_{uu}^{-1} Q_u`,
:math:`K = -\tilde Q_{uu}^{-1} Q_{ux}` for the plain solvers of
:mod:`~trajopt.riccati.solvers`; box QP and cooperative players in
:mod:`~trajopt.riccati.policy`); and the value of that policy is

.. math::

    V_x &= Q_x + K^\top Q_{uu} k + K^\top Q_u + Q_{ux}^\top k, \\
    V_{xx} &= Q_{xx} + K^\top Q_{uu} K + K^\top Q_{ux} + Q_{ux}^\top K
    \quad\text{(symmetrized)},

exact for any gains (regularized, approximate, clamped; Tassa, Erez & Todorov 2012,
Eq. 11), reducing to :math:`V_x = Q_x + Q_{ux}^\top k`,
:math:`V_{xx} = Q_{xx} + Q_{ux}^\top K` when the gains solve the unregularized
:math:`Q_{uu}` exactly.  For an LQR stage (:math:`f_x = A, f_u = B, l_{xx} = Q,
l_{uu} = R, l_{ux} = M, l_x = q, l_u = r`) this is thesis Eq. 2.3.4-2.3.5 with
:math:`P = V_{xx}`, :math:`p = V_x`, written for the 1/2-convention cost of
``docs/notation.md``.

The per-sample form with operator derivatives and factored value Hessians (network
layers) is :func:`trajopt.riccati.operator.operator_riccati_step`, the same three parts
with the value plug of :mod:`~trajopt.riccati.value`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .._linalg import mv as _mv
from .._linalg import sym
from .expansion import QExpansion, addmm, expand_q_joint, joint_blocks
from .solvers import CholeskySolver, QuuSolver, solve_policy

__all__ = ["RiccatiStep", "value_update", "total_expected_change", "riccati_step",
           "riccati_step_joint"]


@dataclass(frozen=True)
class RiccatiStep:
    """Result of one backward step.

    Attributes
    ----------
    K : (..., m, n)
        Feedback gain, ``delta_u = k + K delta_x``.
    k : (..., m)
        Feedforward term.
    Vx : (..., n)
        Value gradient at this stage (the thesis' lambda, our ``p``).
    Vxx : (..., n, n)
        Value Hessian at this stage (the thesis' K, our ``P``), symmetric.
    Q : QExpansion
        The expansion the policy came from (unregularized Q_uu).
    Qg : (..., m) or None
        ``Q_u + Q_uu k`` (the general form computes it on the way; :meth:`change_terms`).
    """

    K: torch.Tensor
    k: torch.Tensor
    Vx: torch.Tensor
    Vxx: torch.Tensor
    Q: QExpansion
    Qg: torch.Tensor | None = None

    def change_terms(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(k, Q_u, Q_u + Q_uu k)``, what :meth:`expected_change` is made of
        (:func:`total_expected_change` sums them over stages in a few ops)."""
        Qg = self.Qg
        if Qg is None:
            Qg = self.Q.Qu + _mv(sym(self.Q.Quu), self.k)
        return self.k, self.Q.Qu, Qg

    def expected_change(self) -> torch.Tensor:
        """Expected value change of the full step, (..., 2): ``[k'Q_u, 1/2 k'Q_uu k]``, so
        a line search with step alpha expects ``alpha dV[0] + alpha^2 dV[1]``."""
        return total_expected_change([self.change_terms()])


def total_expected_change(terms) -> torch.Tensor:
    """The expected change summed over stages, (..., 2), from the stages'
    :meth:`RiccatiStep.change_terms` ``(k, Q_u, g = Q_u + Q_uu k)``:
    ``[sum k'Q_u, 1/2 sum k'Q_uu k]`` with ``k'Q_uu k = k'g - k'Q_u``, all stages in one
    product (the control sizes may differ between stages)."""
    k, Qu, g = (torch.cat(v, -1) if len(v) > 1 else v[0] for v in zip(*terms))
    kQu = (k * Qu).sum(-1)
    return torch.stack([kQu, 0.5 * ((k * g).sum(-1) - kQu)], dim=-1)


def value_update(
    Q: QExpansion, K: torch.Tensor, k: torch.Tensor, *, exact_policy: bool = False,
    kK: torch.Tensor | None = None,
) -> RiccatiStep:
    """Value derivatives of the policy ``(K, k)`` under the expansion ``Q``.

    With ``exact_policy`` (K, k solve the unregularized Q_uu exactly) the shorter forms
    ``Vx = Qx + Qux'k``, ``Vxx = Qxx + Qux'K`` are used (one matmul on the joint
    expansion); otherwise the general forms that stay correct for a regularized,
    approximate or clamped policy.  ``kK`` is the joint ``[k | K]`` (..., m, 1+n) when the
    caller has it (saves a ``cat``).
    """
    n = K.shape[-1]
    if kK is None:
        kK = torch.cat([k.unsqueeze(-1), K], -1)
    if exact_policy and Q.joint is not None:
        V = addmm(Q.joint[..., :n, :n + 1], Q.Qux.transpose(-1, -2), kK)
        Vx, Vxx = V[..., 0], sym(V[..., 1:])
    elif exact_policy:
        QuxT = Q.Qux.transpose(-1, -2)
        Vx = Q.Qx + _mv(QuxT, k)
        Vxx = sym(Q.Qxx + QuxT @ K)
    else:
        # Q along the policy, u = k + K dx: with J = [[Qx, Qxx, Qxu], [Qu, Qux, Quu]],
        # P = J[:, :1+n] + J[:, 1+n:] [k | K] = [[Qx + Qxu k, Qxx + Qxu K],
        # [Qu + Quu k, Qux + Quu K]] and [Vx | Vxx] = P_x + K' P_u: two products for the
        # whole general update (Vx = Qx + K'Quu k + K'Qu + Qux'k,
        # Vxx = Qxx + K'Quu K + K'Qux + Qux'K, symmetrized)
        J0, Ju = Q.packed().split([n + 1, k.shape[-1]], -1)
        Px, Pu = addmm(J0, Ju, kK).split([n, k.shape[-1]], -2)
        V = addmm(Px, K.transpose(-1, -2), Pu)
        Vx, Vxx = V[..., 0], sym(V[..., 1:])
        return RiccatiStep(K=K, k=k, Vx=Vx, Vxx=Vxx, Q=Q, Qg=Pu[..., 0])
    return RiccatiStep(K=K, k=k, Vx=Vx, Vxx=Vxx, Q=Q)


def riccati_step(
    Vx: torch.Tensor,
    Vxx: torch.Tensor,
    fx: torch.Tensor,
    fu: torch.Tensor,
    lx: torch.Tensor | None,
    lu: torch.Tensor | None,
    lxx: torch.Tensor,
    luu: torch.Tensor,
    lux: torch.Tensor | None,
    c: torch.Tensor | None = None,
    *,
    solver: QuuSolver | None = None,
    stage: int | None = None,
) -> RiccatiStep:
    """One backward Riccati / DDP step on dense derivatives (see the module docstring).

    Parameters are those of :func:`~trajopt.riccati.expansion.expand_q`; ``solver``
    defaults to an unregularized :class:`~trajopt.riccati.solvers.CholeskySolver`;
    ``stage`` only labels error messages.
    """
    F, L = joint_blocks(fx, fu, lx, lu, lxx, luu, lux)
    return riccati_step_joint(Vx, Vxx, F, L, fx.shape[-1], c, solver=solver, stage=stage)


def riccati_step_joint(
    Vx: torch.Tensor, Vxx: torch.Tensor, F: torch.Tensor, L: torch.Tensor, n: int,
    c: torch.Tensor | None = None, *, solver: QuuSolver | None = None,
    stage: int | None = None,
) -> RiccatiStep:
    """:func:`riccati_step` on packed derivatives (``F``, ``L`` of
    :func:`~trajopt.riccati.expansion.joint_blocks`), the form the LQR solvers precompute
    for every stage at once.

    A solver that reports a ``value_damping(stage)`` (the Neumann solver's adaptive trust
    region) has it added to the Q_uu the value is computed under: the damping is part of
    the cost, so the returned value derivatives are those of the damped problem.
    """
    solver = CholeskySolver() if solver is None else solver
    Q = expand_q_joint(Vx, Vxx, F, L, n, c)
    K, k = solve_policy(Q, solver, stage)
    damping = getattr(solver, "value_damping", None)
    delta = 0.0 if damping is None else damping(stage)
    if torch.is_tensor(delta) or delta:
        m = Q.Quu.shape[-1]
        eye = torch.eye(m, dtype=Q.Quu.dtype, device=Q.Quu.device)
        d = torch.as_tensor(delta, dtype=Q.Quu.dtype, device=Q.Quu.device)
        Q = QExpansion(Qx=Q.Qx, Qu=Q.Qu, Qxx=Q.Qxx, Qux=Q.Qux,
                       Quu=Q.Quu + d[..., None, None] * eye)
        return value_update(Q, K, k, exact_policy=False)
    return value_update(Q, K, k, exact_policy=getattr(solver, "reg", None) == 0.0)
