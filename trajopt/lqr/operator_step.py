r"""The Riccati step with operator-form derivatives, per-sample values and a shared control.

This is the plug-point form of :mod:`trajopt.lqr.riccati` that network optimizers use
(DESIGN.md, "The Riccati step and its plug points"; DDPNOpt paper Eq. 4, 9, 12-13, Alg. 3).
The OCP has ``B`` samples ``x^i`` driven by one shared control ``u`` (a layer's weights),
a running cost that depends on the control only (``l(u)``, e.g. weight decay, so
:math:`l_x = l_{xx} = l_{ux} = 0`) and first-order dynamics. Per sample, with
:math:`V' = V_{x x}'^{\,i}` the next value Hessian,

.. math::

    Q_x^i = f_x^\top V_x'^{\,i}, \quad Q_u^i = l_u + f_u^{i\top} V_x'^{\,i}, \quad
    Q_{ux}^i = f_u^{i\top} V' f_x, \quad Q_{xx}^i = f_x^\top V' f_x,

the shared curvature :math:`P \approx Q_{uu}` (exact, or a preconditioner) gives the
per-sample policies :math:`k^i = -P^{-1} Q_u^i`, :math:`K^i = -P^{-1} Q_{ux}^i`, and the
value of the policy (the general form of :func:`~trajopt.lqr.riccati.value_update`)

.. math::

    V_x^i = Q_x^i - Q_{ux}^{i\top} S\, Q_u^i
          = f_x^\top \bigl(V_x'^{\,i} - V' r^i\bigr),\qquad
    V_{xx}^i = Q_{xx}^i - Q_{ux}^{i\top} S\, Q_{ux}^i
             = f_x^\top \bigl(V' - V' M^i V'\bigr) f_x,

with :math:`S = 2P^{-1} - P^{-1} Q_{uu} P^{-1}` (:math:`= P^{-1}` when :math:`P` is the
curvature model itself), the *response* :math:`M^i = f_u^i S f_u^{i\top}` (next-state
space) and :math:`r^i = M^i V_x'^{\,i} + f_u^i S\, l_u`.  Nothing of size ``m`` per sample is
ever formed here: the stage supplies :math:`f_x^\top`, :math:`f_x` and the batch mean of
:math:`f_u^{i\top}` as operators, and the curvature supplies the response.

The value Hessian is either :class:`DenseValue` (per-sample ``(B, n, n)``, "full") or
:class:`RankOneValue`, :math:`V_{xx}^i = c^i z^i z^{i\top}` (Prop. 4 of the DDPNOpt paper):
with :math:`\beta^i = z^{i\top} M^i z^i` the recursion is
:math:`c \leftarrow c(1 - c\beta)`, :math:`z \leftarrow f_x^\top z`.  The paper writes
:math:`z \leftarrow \sqrt{1-\beta}\, f_x^\top z`, undefined when an approximate
:math:`P` makes :math:`\beta > 1`; we keep the signed coefficient ``c`` instead, which is
exact (the same matrix the dense recursion produces) and never NaN.

Tikhonov regularization (:math:`V_{xx} + \epsilon I`, Alg. 3) is applied to every
non-terminal value Hessian where it is *used* (``V'`` above).  In the rank-one form the
:math:`\epsilon I` is not propagated to earlier stages (it would destroy the low rank);
the dense form propagates it exactly.  ``docs/ddpnopt.md`` discusses both choices.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from .._linalg import sym

__all__ = [
    "OperatorStage",
    "ControlResponse",
    "DenseValue",
    "RankOneValue",
    "OperatorStep",
    "operator_riccati_step",
    "DenseOperatorStage",
    "DenseResponse",
]


class OperatorStage(Protocol):
    """First-order dynamics of one stage around ``B`` nominal samples, as operators.

    ``Y`` has shape (B, J, n1) (J right-hand sides per sample), ``dX`` (B, n).
    """

    def fx_T(self, Y: torch.Tensor) -> torch.Tensor:
        """:math:`f_x^{i\\top} Y^i`, (B, J, n1) -> (B, J, n)."""

    def fx(self, dX: torch.Tensor) -> torch.Tensor:
        """:math:`f_x^i\\, dX^i`, (B, n) -> (B, n1)."""

    def fu_T_mean(self, Y: torch.Tensor) -> Any:
        """Batch mean :math:`\\frac1B \\sum_i f_u^{i\\top} Y^i` for Y (B, n1); the control's
        own type (a matrix, a tensor shaped like the weights)."""


class ControlResponse(Protocol):
    """How the shared curvature acts on the next state (the Q_uu plug point)."""

    def response(self, Y: torch.Tensor) -> torch.Tensor:
        """:math:`f_u^i S f_u^{i\\top} Y^i`, (B, J, n1) -> (B, J, n1)."""

    def response_const(self) -> torch.Tensor | None:
        """:math:`f_u^i S\\, l_u`, (B, n1), or None when :math:`l_u = 0`."""

    def apply_control(self, G: Any) -> torch.Tensor:
        """:math:`f_u^i S G` for one control-shaped G shared by the samples, (B, n1)."""


@dataclass(frozen=True)
class DenseValue:
    """Per-sample value derivatives with a dense Hessian.

    Attributes
    ----------
    Vx : (B, n)
    Vxx : (B, n, n)
    """

    Vx: torch.Tensor
    Vxx: torch.Tensor

    def hess_apply(self, Y: torch.Tensor, tikhonov: float = 0.0) -> torch.Tensor:
        """:math:`(V_{xx} + \\epsilon I) Y` for Y (B, J, n)."""
        out = Y @ self.Vxx.transpose(-1, -2)
        return out + tikhonov * Y if tikhonov else out


@dataclass(frozen=True)
class RankOneValue:
    """Per-sample value derivatives with a signed rank-one Hessian ``c z z'``.

    Attributes
    ----------
    Vx : (B, n)
    c : (B,)
    z : (B, n)
    """

    Vx: torch.Tensor
    c: torch.Tensor
    z: torch.Tensor

    @property
    def Vxx(self) -> torch.Tensor:
        """The dense (B, n, n) Hessian (tests and small models only)."""
        return self.c[:, None, None] * self.z.unsqueeze(-1) * self.z.unsqueeze(-2)

    def hess_apply(self, Y: torch.Tensor, tikhonov: float = 0.0) -> torch.Tensor:
        """:math:`(c z z^\\top + \\epsilon I) Y` for Y (B, J, n), without forming z z'."""
        zY = (Y * self.z.unsqueeze(1)).sum(-1, keepdim=True)
        out = (self.c[:, None, None] * zY) * self.z.unsqueeze(1)
        return out + tikhonov * Y if tikhonov else out


Value = DenseValue | RankOneValue


@dataclass(frozen=True)
class OperatorStep:
    """Result of :func:`operator_riccati_step`.

    Attributes
    ----------
    Qu : control-shaped
        Batch mean :math:`\\mathbb{E}_i f_u^{i\\top} V_x'^{\\,i}` (add :math:`l_u` for
        :math:`\\mathbb{E}[Q_u]`).
    value : DenseValue or RankOneValue or None
        Value derivatives at this stage (None when not propagated).
    stage, next_value, tikhonov
        What :meth:`feedback` needs.
    """

    Qu: Any
    value: Value | None
    stage: OperatorStage
    next_value: Value
    tikhonov: float

    def feedback(self, dX: torch.Tensor) -> Any:
        """Batch mean of :math:`Q_{ux}^i dX^i = f_u^{i\\top} V' f_x dX^i` for dX (B, n); the
        applied policy is :math:`\\delta u = -P^{-1}(\\mathbb{E}[Q_u] + \\text{this})`."""
        Y = self.next_value.hess_apply(self.stage.fx(dX).unsqueeze(1), self.tikhonov)
        return self.stage.fu_T_mean(Y.squeeze(1))


def operator_riccati_step(
    value: Value,
    stage: OperatorStage,
    curvature: Callable[[Any, Value], ControlResponse],
    *,
    tikhonov: float = 0.0,
    project_psd: bool = False,
    recursion: str = "per_sample",
    propagate: bool = True,
) -> OperatorStep:
    """One backward step in operator form (see the module docstring).

    Parameters
    ----------
    value : DenseValue or RankOneValue
        Next-stage value derivatives, per sample (B, n1).
    stage : OperatorStage
        The stage's linearization.
    curvature : callable
        ``curvature(Qu_mean, value)`` -> :class:`ControlResponse`: receives the batch mean
        :math:`\\mathbb{E}[f_u^\\top V_x']` first (so adaptive curvatures update their
        statistics with it, as torch.optim does before it preconditions) and the value
        (so an exact curvature can form :math:`\\mathbb{E}[f_u^\\top V' f_u]`).
    tikhonov : float
        :math:`\\epsilon` added to ``value``'s Hessian where it is used.
    project_psd : bool
        Project :math:`V' - V' M V'` onto the positive semidefinite cone (rank one: clamp
        the coefficient at 0; dense: clamp the eigenvalues).  With an approximate
        :math:`P` the exact recursion can turn the value Hessian negative and, stage after
        stage, grow without bound (``c`` squares); the projection keeps it between 0 and
        its Gauss-Newton start.
    recursion : {"per_sample", "mean"}
        ``"per_sample"``: Alg. 3 literally, each sample's value follows its own policy
        :math:`k^i = -P^{-1}Q_u^i`, :math:`K^i` (:math:`r^i = f_u^i S Q_u^i`, correction
        :math:`V' M V'`).  ``"mean"``: the value of the policy actually applied, the batch
        mean :math:`\\bar k + \\tfrac1B\\sum_j K^j \\delta x^j` -- the block diagonal of the
        joint (B n)-state DP: :math:`r^i = f_u^i S\\, \\mathbb{E}[Q_u]` and correction
        :math:`\\tfrac1B V' M V'`.  Identical for B = 1.
    propagate : bool
        False: do not form this stage's value (``value`` of the result is None), e.g. at
        the first stage, whose state (the data) is never perturbed; :meth:`feedback` and
        ``Qu`` are unaffected.
    """
    Vx1 = value.Vx
    Qu = stage.fu_T_mean(Vx1)
    if recursion not in ("per_sample", "mean"):
        raise ValueError(f"recursion must be 'per_sample' or 'mean'; got {recursion!r}")
    resp = curvature(Qu, value)
    if not propagate:
        return OperatorStep(Qu=Qu, value=None, stage=stage, next_value=value,
                            tikhonov=tikhonov)
    const = resp.response_const()
    mean = recursion == "mean"
    w = 1.0 / Vx1.shape[0] if mean else 1.0
    if isinstance(value, RankOneValue):
        z = value.z
        if mean:
            r = resp.apply_control(Qu)
            r = r if const is None else r + const
            beta = w * (z * resp.response(z.unsqueeze(1)).squeeze(1)).sum(-1)
        else:  # V_x' and z share every operator call (J = 2 right-hand sides)
            R = resp.response(torch.stack([Vx1, z], 1))
            r = R[:, 0] if const is None else R[:, 0] + const
            beta = (z * R[:, 1]).sum(-1)
        Y = torch.stack([Vx1 - value.hess_apply(r.unsqueeze(1), tikhonov).squeeze(1), z], 1)
        FY = stage.fx_T(Y)
        c = value.c * (1.0 - value.c * beta)
        if project_psd:
            c = c.clamp(min=0.0)
        new: Value = RankOneValue(Vx=FY[:, 0], c=c, z=FY[:, 1])
    else:
        r = resp.apply_control(Qu) if mean else resp.response(Vx1.unsqueeze(1)).squeeze(1)
        if const is not None:
            r = r + const
        Vx = stage.fx_T((Vx1 - value.hess_apply(r.unsqueeze(1), tikhonov).squeeze(1))
                        .unsqueeze(1)).squeeze(1)
        n1 = value.Vxx.shape[-1]
        eye = torch.eye(n1, dtype=Vx1.dtype, device=Vx1.device)
        V = value.hess_apply(eye.expand(Vx1.shape[0], n1, n1), tikhonov)  # symmetric
        W = V - w * (V @ resp.response(V).transpose(-1, -2))
        if project_psd:
            lam, Q = torch.linalg.eigh(sym(W))
            W = (Q * lam.clamp(min=0.0).unsqueeze(-2)) @ Q.transpose(-1, -2)
        # f_x' W f_x: apply f_x' to the rows, then to the columns
        FW = stage.fx_T(W)                                    # (B, n1, n) = W f_x rows
        Vxx = stage.fx_T(FW.transpose(-1, -2).contiguous())   # (B, n, n)
        new = DenseValue(Vx=Vx, Vxx=sym(Vxx))
    return OperatorStep(Qu=Qu, value=new, stage=stage, next_value=value, tikhonov=tikhonov)


@dataclass(frozen=True)
class DenseOperatorStage:
    """An :class:`OperatorStage` from dense per-sample Jacobians ``A`` (B, n1, n) and
    ``Bu`` (B, n1, m): the classical case, and the reference the network stages are
    tested against."""

    A: torch.Tensor
    Bu: torch.Tensor

    def fx_T(self, Y):
        return Y @ self.A

    def fx(self, dX):
        return (self.A @ dX.unsqueeze(-1)).squeeze(-1)

    def fu_T_mean(self, Y):
        return (Y.unsqueeze(-2) @ self.Bu).squeeze(-2).mean(0)


@dataclass(frozen=True)
class DenseResponse:
    """:class:`ControlResponse` of an exact curvature on a :class:`DenseOperatorStage`.

    ``Quu`` (m, m) is the curvature the policy solves with (:math:`P`, e.g. regularized),
    ``Quu_true`` the unregularized one entering the value (None: same as ``Quu``), ``lu``
    (m,) the running-cost gradient or None.
    """

    stage: DenseOperatorStage
    Quu: torch.Tensor
    Quu_true: torch.Tensor | None = None
    lu: torch.Tensor | None = None

    def _S(self) -> torch.Tensor:
        Pinv = torch.linalg.inv(self.Quu)
        if self.Quu_true is None:
            return Pinv
        return 2 * Pinv - Pinv @ self.Quu_true @ Pinv

    def response(self, Y):
        Bu = self.stage.Bu
        return (Y @ Bu) @ self._S().transpose(-1, -2) @ Bu.transpose(-1, -2)

    def response_const(self):
        if self.lu is None:
            return None
        return self.apply_control(self.lu)

    def apply_control(self, G):
        return self.stage.Bu @ (self._S() @ G)
