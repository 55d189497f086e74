r"""The batch-augmented ("joint") form of the operator Riccati step.

:func:`~trajopt.riccati.operator.operator_riccati_step` carries one value Hessian per
sample (the block diagonal of GT-DDP Sec. 4.2, Fig. 4).  The exact dynamic program of a
batch stacks the ``B`` samples into one state :math:`X = [x^1; \dots; x^B]` of size
:math:`B n` driven by the shared control (DDPNOpt's batch formulation, the "previous
work" of GT-DDP Fig. 1), with the batch-mean terminal cost.  Its value Hessian is dense,
:math:`B n \times B n`, and its cross-sample blocks come from the shared control:

.. math::

    \mathcal V = F_x^\top\Bigl(\mathcal V' - \tfrac1B\,\mathcal V' F_u S F_u^\top
    \mathcal V'\Bigr) F_x, \qquad
    \mathcal V_X = F_x^\top\bigl(\mathcal V_X' - \mathcal V' F_u S\,
    \mathbb E[Q_u]\bigr),

with :math:`F_u = [f_u^1; \dots; f_u^B]`, :math:`F_x` the Jacobian of the whole batch
(block diagonal unless a layer couples the samples, as BatchNorm in training mode does),
and :math:`\mathcal V = B\,\nabla^2_{XX} V` (the per-sample scaling of the operator
step).  This is the ``"mean"`` recursion of the operator step with the *joint* response
:math:`M = F_u S F_u^\top` in place of its diagonal blocks :math:`f_u^i S f_u^{i\top}`;
the policy is :math:`\delta u = -P^{-1}(\mathbb E[Q_u] + \tfrac1B F_u^\top \mathcal V'
F_x\,\delta X)`.

So the joint step is the operator step on adapters: :class:`JointStage` (the batch as
one sample), :class:`JointResponse` (needs ``response_shared``, the cross-sample response
:math:`f_u^i S \sum_k f_u^{k\top} Y^k`) and a dense value of shape (1, Bn, Bn).  Memory
:math:`O(B^2 n^2)` per stage and :math:`B n` operator responses: the form GT-DDP's
block-diagonal approximation avoids; here to measure that claim and to see the
cross-sample blocks (Fig. 4).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import InvalidArgumentError
from .operator import OperatorStage, OperatorStep, StateFeedback, operator_riccati_step
from .value import DenseValue

__all__ = ["JointStage", "JointResponse", "JointStep", "joint_value", "sample_blocks",
           "joint_riccati_step"]


def joint_value(value: DenseValue) -> DenseValue:
    """The batch-augmented value of per-sample values (B, n) / (B, n, n): ``Vx`` (1, Bn)
    and the block-diagonal ``Vxx`` (1, Bn, Bn)."""
    B, n = value.Vx.shape
    V = torch.zeros(B, n, B, n, dtype=value.Vxx.dtype, device=value.Vxx.device)
    idx = torch.arange(B, device=V.device)
    V[idx, :, idx, :] = value.Vxx
    return DenseValue(Vx=value.Vx.reshape(1, B * n), Vxx=V.reshape(1, B * n, B * n))


def sample_blocks(value: DenseValue, B: int) -> DenseValue:
    """The per-sample view of a batch-augmented value: ``Vx`` (B, n) and the diagonal
    blocks of ``Vxx`` (B, n, n), views without copies."""
    n = value.Vx.shape[-1] // B
    blocks = value.Vxx.reshape(B, n, B, n).diagonal(dim1=0, dim2=2).permute(2, 0, 1)
    return DenseValue(Vx=value.Vx.reshape(B, n), Vxx=blocks)


@dataclass(frozen=True)
class JointStage:
    """An :class:`~trajopt.riccati.operator.OperatorStage` of ``B`` samples as one sample of
    size B n (rows ``Y`` (1, J, B n1)); ``stage.fx_T`` must be the transposed Jacobian of
    the whole batch (cross-sample terms included where the layer couples the samples)."""

    stage: OperatorStage
    B: int

    def split(self, Y: torch.Tensor) -> torch.Tensor:
        """(1, J, B k) -> (B, J, k)."""
        J = Y.shape[1]
        return Y.reshape(J, self.B, -1).transpose(0, 1)

    def join(self, Y: torch.Tensor) -> torch.Tensor:
        """(B, J, k) -> (1, J, B k)."""
        return Y.transpose(0, 1).reshape(1, Y.shape[1], -1)

    def fx_T(self, Y):
        return self.join(self.stage.fx_T(self.split(Y)))

    def fx(self, dX):
        return self.stage.fx(dX.reshape(self.B, -1)).reshape(1, -1)

    def fu_T_mean(self, Y):
        return self.stage.fu_T_mean(Y.reshape(self.B, -1))

    def value_gradient(self, Y):
        return self.stage.value_gradient(Y.reshape(self.B, -1))


@dataclass(frozen=True)
class JointResponse:
    """The joint response :math:`F_u S F_u^\\top` of a per-sample
    :class:`~trajopt.riccati.operator.ControlResponse` that has ``response_shared``."""

    response_: Any
    stage: JointStage

    def response(self, Y):
        st = self.stage
        return st.join(self.response_.response_shared(st.split(Y)))

    def response_const(self):
        c = self.response_.response_const()
        return None if c is None else c.reshape(1, -1)

    def apply_control(self, G):
        return self.response_.apply_control(G).reshape(1, -1)

    def apply_total(self, G):
        return self.response_.apply_total(G).reshape(1, -1)


@dataclass(frozen=True)
class JointStep:
    """:class:`~trajopt.riccati.operator.OperatorStep` of the joint form whose
    :meth:`feedback` takes the per-sample deviations dX (B, n)."""

    step: OperatorStep
    B: int

    @property
    def Qu(self):
        return self.step.Qu

    @property
    def value(self) -> DenseValue | None:
        return self.step.value

    def feedback(self, dX: torch.Tensor) -> Any:
        """Batch mean :math:`\\tfrac1B F_u^\\top \\mathcal V' F_x\\, \\delta X` for dX (B, n)."""
        return self.step.feedback(dX.reshape(1, -1))

    @property
    def stage(self) -> OperatorStage:
        """The batch-augmented stage."""
        return self.step.stage

    def feedback_terms(self, dX: torch.Tensor, curvature: bool = True) -> StateFeedback:
        """:meth:`OperatorStep.feedback_terms` of the augmented state (one "sample": the
        cotangent (1, B n1), the curvature :math:`\\delta X^\\top F_x^\\top \\mathcal V'
        F_x \\delta X` (1,))."""
        return self.step.feedback_terms(dX.reshape(1, -1), curvature)


def joint_riccati_step(value: DenseValue, stage: OperatorStage,
                       curvature: Callable[[Any, DenseValue], Any], *, samples: int,
                       tikhonov: float = 0.0, project_psd: bool = False,
                       propagate: bool = True) -> JointStep:
    """One backward step of the batch-augmented dynamic program (module docstring).

    Parameters
    ----------
    value : DenseValue
        Next-stage value, batch-augmented: ``Vx`` (1, B n1), ``Vxx`` (1, B n1, B n1)
        (:func:`joint_value` of per-sample values at the last stage).
    stage : OperatorStage
        The per-sample linearization of the ``samples`` samples.
    curvature : callable
        ``curvature(Qu_mean, per_sample_value)`` -> a ControlResponse with
        ``response_shared``; it receives the diagonal blocks (:func:`sample_blocks`).
    samples : int
        B.
    tikhonov, project_psd, propagate
        As :func:`~trajopt.riccati.operator.operator_riccati_step` (the projection acts
        on the whole B n1 x B n1 matrix).

    Returns
    -------
    JointStep
        ``value`` (1, B n, B n) or None; ``feedback`` on per-sample deviations.
    """
    if isinstance(samples, bool) or not isinstance(samples, int) or samples < 1:
        raise InvalidArgumentError(f"samples must be a positive integer; got {samples!r}")
    if value.Vx.dim() != 2 or value.Vx.shape[0] != 1 or value.Vx.shape[1] % samples:
        raise InvalidArgumentError(
            f"value: a batch-augmented value has Vx of shape (1, samples * n1) with samples="
            f"{samples}; got {tuple(value.Vx.shape)} (joint_value() makes one)")
    jstage = JointStage(stage, samples)

    def make(Qu, val):
        return JointResponse(curvature(Qu, sample_blocks(val, samples)), jstage)

    step = operator_riccati_step(value, jstage, make, tikhonov=tikhonov,
                                 project_psd=project_psd, recursion="mean",
                                 propagate=propagate, batch_size=samples)
    return JointStep(step, samples)
