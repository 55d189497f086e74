r"""The Riccati step with operator-form derivatives, per-sample values and a shared control.

The same three parts as :mod:`trajopt.riccati.step` (DESIGN.md, "The Riccati step and its
plug points"; DDPNOpt paper Eq. 4, 9, 12-13, Alg. 3), for the OCP of a network layer:
``B`` samples ``x^i`` driven by one shared control ``u`` (the layer's weights), a running
cost on the control only (``l(u)``, e.g. weight decay, so
:math:`l_x = l_{xx} = l_{ux} = 0`) and first-order dynamics.

1. *Expansion* (operators, :class:`OperatorStage`): with :math:`V' = V_{xx}'^{\,i}`,

   .. math::

       Q_x^i = f_x^\top V_x'^{\,i}, \quad Q_u^i = l_u + f_u^{i\top} V_x'^{\,i}, \quad
       Q_{ux}^i = f_u^{i\top} V' f_x, \quad Q_{xx}^i = f_x^\top V' f_x,

   never formed: the stage applies :math:`f_x^\top`, :math:`f_x` and the batch mean of
   :math:`f_u^{i\top}`.
2. *Policy* (the Q_uu plug, :class:`ControlResponse`): a shared curvature
   :math:`P \approx Q_{uu}` (exact, or a preconditioner that only applies its inverse)
   gives :math:`k^i = -P^{-1} Q_u^i`, :math:`K^i = -P^{-1} Q_{ux}^i`; the value needs
   only its *response* :math:`M^i = f_u^i S f_u^{i\top}` in next-state space, with
   :math:`S = 2P^{-1} - P^{-1} Q_{uu} P^{-1}` (:math:`= P^{-1}` when :math:`P` is the
   curvature model itself).
3. *Value* (the V_xx plug, :mod:`trajopt.riccati.value`): the general value update of
   :func:`~trajopt.riccati.step.value_update` in this form,

   .. math::

       V_x^i = f_x^\top \bigl(V_x'^{\,i} - V' r^i\bigr),\qquad
       V_{xx}^i = f_x^\top \bigl(V' - V' M^i V'\bigr) f_x,

   :math:`r^i = M^i V_x'^{\,i} + f_u^i S\, l_u`; the representation (dense, rank one
   :math:`c z z^\top`, rank r :math:`Z C Z^\top`) decides how the correction and the
   pull-back are computed.  The paper's rank-one recursion
   :math:`z \leftarrow \sqrt{1-\beta}\, f_x^\top z` is undefined when an approximate
   :math:`P` makes :math:`\beta > 1`; the signed coefficient ``c`` is exact and never NaN.

Tikhonov regularization (:math:`V_{xx} + \epsilon I`, Alg. 3) is applied to every
non-terminal value Hessian where it is *used* (``V'`` above); see
:mod:`trajopt.riccati.value` for how each representation propagates it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from ..errors import InvalidArgumentError
from .value import Value

__all__ = [
    "OperatorStage",
    "ControlResponse",
    "OperatorStep",
    "StateFeedback",
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

    def value_gradient(self, Vx: torch.Tensor) -> Any:
        """(Optional; absent: ``fu_T_mean``.) The part of
        :math:`\\mathbb{E}[Q_u] = \\mathbb{E}[f_u^\\top V_x'] + l_u` the step computes:
        ``fu_T_mean(Vx)``, or ``fu_T_mean(Vx) - s`` for a gradient ``s`` the caller
        already holds and adds to :math:`l_u` instead (a network's own
        back-propagated gradient: only the difference is multiplied, one product
        instead of two).  The step uses it only in the sum with :math:`l_u` under
        ``recursion="mean"``; under ``"per_sample"`` it must be ``fu_T_mean(Vx)``."""

    def carried_pullback(self, K: torch.Tensor) -> torch.Tensor | None:
        """(Optional; absent: None.) :math:`f_x^\\top K` for the cotangent K (B, n1) a
        factored value carries (:class:`trajopt.riccati.value.Carried`) when the stage
        already holds it (a network stage: the gradient autograd sent to its input),
        else None; the step then pulls back only the value's directions."""

    def reusing(self, Y: torch.Tensor) -> contextlib.AbstractContextManager[None]:
        """(Optional; absent: nothing is kept.) A context within which the stage's
        pull-backs of the rows ``Y`` -- for :meth:`fx_T` and for the response's
        ``response_gram`` / ``response`` of the same tensor -- are computed once: a
        factored value's step asks for both (the Gram matrix of its basis rows and their
        pulled-back factor).  Whatever is kept is dropped on exit."""

    # optional: samplewise (bool), f_x acts sample by sample (nothing mixes the samples):
    # the step may then read per-sample quantities off per-sample pull-backs (the
    # feedback's coordinates); absent means False
    # optional: response_samplewise (bool), f_u acts sample by sample (the response M^i =
    # f_u^i S f_u^i' is block diagonal, whatever f_x does): the value's downdate may then
    # come from the response's Gram matrix in control space; absent means samplewise

class ControlResponse(Protocol):
    """How the shared curvature acts on the next state (the Q_uu plug point)."""

    def response(self, Y: torch.Tensor) -> torch.Tensor:
        """:math:`f_u^i S f_u^{i\\top} Y^i`, (B, J, n1) -> (B, J, n1)."""

    def response_const(self) -> torch.Tensor | None:
        """:math:`f_u^i S\\, l_u`, (B, n1), or None when :math:`l_u = 0`."""

    def apply_control(self, G: Any) -> torch.Tensor:
        """:math:`f_u^i S G` for one control-shaped G shared by the samples, (B, n1)."""

    def apply_total(self, G: Any) -> torch.Tensor:
        """(Optional; absent: the two applications.) :math:`f_u^i S (G + l_u)`, (B, n1):
        ``apply_control(G) + response_const()`` in one application."""

    # optional, for the batch-augmented form (:mod:`trajopt.riccati.joint`):
    # response_shared(Y): f_u^i S sum_k f_u^k' Y^k, (B, J, n1) -> (B, J, n1)
    # optional, for factored values: response_gram(Y): Y^i M^i Y^i', (B, J, n1) ->
    # (B, J, J), = <f_u^i' Y^i, S f_u^i' Y^i> in control space (no map back to the state)


@dataclass(frozen=True)
class OperatorStep:
    """Result of :func:`operator_riccati_step`.

    Attributes
    ----------
    Qu : control-shaped
        ``stage.value_gradient(V_x')``: the batch mean :math:`\\mathbb{E}_i f_u^{i\\top}
        V_x'^{\\,i}` (add :math:`l_u` for :math:`\\mathbb{E}[Q_u]`), less what the stage's
        caller moved into :math:`l_u`.
    value : DenseValue, RankOneValue, RankRValue or None
        Value derivatives at this stage (None when not propagated).
    stage, next_value, tikhonov
        What :meth:`feedback` needs.
    factor_map : (B, r, r) or None
        For a factored ``next_value`` (:math:`Z C Z^\\top`): ``value``'s factor is
        :math:`f_x^\\top Z` times the inverse of this (None: the identity), so the
        feedback needs no :math:`f_x` of its own.
    """

    Qu: Any
    value: Value | None
    stage: OperatorStage
    next_value: Value
    tikhonov: float
    factor_map: torch.Tensor | None = None

    def feedback(self, dX: torch.Tensor) -> Any:
        """Batch mean of :math:`Q_{ux}^i dX^i = f_u^{i\\top} V' f_x dX^i` for dX (B, n); the
        applied policy is :math:`\\delta u = -P^{-1}(\\mathbb{E}[Q_u] + \\text{this})`:
        ``stage.fu_T_mean`` of :meth:`feedback_cotangent`."""
        return self.stage.fu_T_mean(self.feedback_cotangent(dX))

    def feedback_cotangent(self, dX: torch.Tensor) -> torch.Tensor:
        """:math:`V' f_x dX^i` (B, n1), the cotangent whose :math:`f_u^\\top` batch mean
        is :meth:`feedback` (for a caller that maps it to the controls its own way).
        For a factored :math:`V' = Z C Z^\\top` the coordinates :math:`Z^\\top f_x dX =
        (f_x^\\top Z)^\\top dX` come from this stage's pulled-back factor (kept anyway)."""
        return self.feedback_terms(dX, curvature=False).cotangent

    def feedback_terms(self, dX: torch.Tensor, curvature: bool = True) -> StateFeedback:
        """:meth:`feedback_cotangent` and, with ``curvature``, the value's second-order
        term of each sample's state change, :math:`(f_x dX^i)^\\top V' f_x dX^i` (B,): the
        denominator of the feedback's closed-loop gain (:class:`StateFeedback`)."""
        if (self.value is not None and self.next_value.factored and not self.tikhonov
                and getattr(self.stage, "samplewise", False)):
            a = torch.bmm(self.value.directions(), dX.reshape(dX.shape[0], -1, 1))  # (B, r, 1)
            if self.factor_map is not None:
                a = self.factor_map.transpose(-1, -2) @ a
            a = a.transpose(-1, -2)                                          # (B, 1, r)
            Y = self.next_value.hess_from_coords(a).squeeze(1)
            q = self.next_value.coords_quadratic(a).squeeze(1) if curvature else None
        else:
            change = self.stage.fx(dX)
            Y = self.next_value.hess_apply(change.unsqueeze(1), self.tikhonov).squeeze(1)
            q = (change * Y).sum(-1) if curvature else None
        return StateFeedback(cotangent=Y, curvature=q)


@dataclass(frozen=True)
class StateFeedback:
    r"""One stage's feedback term for the state deviations dX (B, n) of a forward pass.

    The applied feedback is :math:`\delta u_{fb} = -P^{-1} F` with :math:`F =
    \mathbb{E}_i[f_u^{i\top} Y^i]` (``stage.fu_T_mean`` of the cotangent).  Along it the
    value's quadratic model of the next state closes the loop with the gain

    .. math::

        \rho = \frac{\langle F, P^{-1} F\rangle}{\mathbb{E}_i[q^i]},\qquad
        q^i = (f_x dX^i)^\top V' f_x dX^i,

    the share of the state change's value coordinates :math:`a^i = Z^\top f_x dX^i`
    that the feedback cancels (:math:`\rho = -\sum_i a^{i\top} C b^i / \sum_i a^{i\top}
    C a^i` with :math:`b^i = Z^\top f_u^i \delta u_{fb}`).  For :math:`V' \succeq 0` it
    is at most the largest eigenvalue of :math:`P^{-1}\mathbb{E}_i[f_u^{i\top} V'
    f_u^i]`, so in [0, 1] when :math:`P \succeq \mathbb{E}_i[f_u^{i\top} V' f_u^i]`
    (exact DDP, where the feedback is the model's Newton step) and above 1 only where
    the curvature model underestimates the curvature the value sees: the feedback
    overshoots.  An indefinite :math:`V'` (no PSD projection) voids the bound.

    Attributes
    ----------
    cotangent : (B, n1)
        :math:`Y^i = V' f_x dX^i`.
    curvature : (B,) or None
        :math:`q^i` (None where not asked for).
    """

    cotangent: torch.Tensor
    curvature: torch.Tensor | None = None


def operator_riccati_step(
    value: Value,
    stage: OperatorStage,
    curvature: Callable[[Any, Value], ControlResponse],
    *,
    tikhonov: float = 0.0,
    project_psd: bool = False,
    recursion: str = "per_sample",
    propagate: bool = True,
    batch_size: int | None = None,
) -> OperatorStep:
    """One backward step in operator form (see the module docstring).

    Parameters
    ----------
    value : DenseValue, RankOneValue or RankRValue
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
        Project :math:`V' - V' M V'` onto the positive semidefinite cone (dense: clamp
        its eigenvalues; rank r: those of the core C; rank one: clamp c at 0).  With an approximate
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
    batch_size : int, optional
        The B of the ``"mean"`` recursion's :math:`\\tfrac1B` (the reciprocal of each
        sample's weight in the applied policy); default ``V_x'.shape[0]``.  With the
        batch split over ranks it is the number of samples over all of them.
    """
    if recursion not in ("per_sample", "mean"):
        raise InvalidArgumentError(f"recursion must be 'per_sample' or 'mean'; got "
                                   f"{recursion!r}")
    if batch_size is not None and (isinstance(batch_size, bool) or not isinstance(
            batch_size, int) or batch_size < 1):
        raise InvalidArgumentError(f"batch_size must be a positive integer; got "
                                   f"{batch_size!r}")
    Vx1 = value.Vx
    # 1. expansion (operators); a stage without value_gradient: fu_T_mean
    Qu = getattr(stage, "value_gradient", stage.fu_T_mean)(Vx1)
    resp = curvature(Qu, value)                        # 2. the Q_uu plug
    if not propagate:
        return OperatorStep(Qu=Qu, value=None, stage=stage, next_value=value,
                            tikhonov=tikhonov)
    # 3. value: the rows the correction is taken in, Dz (the factored forms' directions,
    # the rows of a dense V), and the basis rows D the factor is pulled back in (Dz, or
    # Q' of Z = QR under the PSD projection: R not None)
    D, R = value.basis(project_psd) if value.factored else (value.directions(tikhonov),
                                                            None)
    Dz = D if R is None else value.directions(tikhonov)
    gram = value.factored and recursion == "mean" and _has_gram(resp, stage)
    MD = None
    if recursion == "mean":
        w = 1.0 / (Vx1.shape[0] if batch_size is None else batch_size)
        r = _total_response(resp, Qu)
        if not value.factored:
            MD = resp.response(Dz)
    else:   # the responses of V_x' (per sample) and of the rows, in one call
        w = 1.0
        RD = resp.response(torch.cat([Vx1.unsqueeze(1), Dz], 1))
        r, MD = RD[:, 0], RD[:, 1:]
        const = resp.response_const()
        if const is not None:
            r = r + const
    K = _carried_pullback(value, stage, tikhonov) if value.factored else None
    if K is None:
        g = Vx1 - value.hess_apply(r.unsqueeze(1), tikhonov).squeeze(1)
    if not value.factored:
        new = value.pullback(stage.fx_T, g, value.downdate(Dz, MD, w, project_psd))
        return OperatorStep(Qu=Qu, value=new, stage=stage, next_value=value,
                            tikhonov=tikhonov)
    # the basis rows, pulled back once for the Gram matrix and for the factor where the
    # stage can keep its pull-back; the gradient g = V_x' - V' r on its own (unless the
    # stage holds the pull-back of the value's carried gradient: V_x = K + Z b)
    with getattr(stage, "reusing", _no_reuse)(D):
        if gram:   # Z'MZ from the response's Gram matrix of the basis rows in control
            # space: the controls act sample by sample, so it transforms sample by
            # sample, Z'MZ = R'(Q'MQ)R (where they do not -- a BatchNorm after the layer
            # in the stage -- the response of Q's columns is not that of Z's: Dz above)
            G = resp.response_gram(D)
            if R is not None:
                G = R.transpose(-1, -2) @ G @ R
        else:   # (of the kept rows too, where Dz is D)
            G = Dz @ (resp.response(Dz) if MD is None else MD).transpose(-1, -2)
        FD = stage.fx_T(D)
    Vx = None if K is not None else stage.fx_T(g.unsqueeze(1)).squeeze(1)
    new = value.pulled(FD, value.downdate_gram(G, w, project_psd, R), R, Vx=Vx,
                       carried=None if K is None else (K, r))
    return OperatorStep(Qu=Qu, value=new, stage=stage, next_value=value, tikhonov=tikhonov,
                        factor_map=R)


def _total_response(resp: ControlResponse, Qu: Any) -> torch.Tensor:
    """:math:`f_u^i S (\\mathbb{E}[Q_u] + l_u)` (B, n1): ``apply_total`` where the
    response has it, else its two applications."""
    if hasattr(resp, "apply_total"):
        return resp.apply_total(Qu)
    r = resp.apply_control(Qu)
    const = resp.response_const()
    return r if const is None else r + const


def _has_gram(resp: ControlResponse, stage: OperatorStage) -> bool:
    """The response has a Gram matrix in control space (``response_gram``) and the
    stage's controls act sample by sample, so that it is the per-sample Gram matrix of
    the response."""
    return getattr(resp, "response_gram", None) is not None and getattr(
        stage, "response_samplewise", getattr(stage, "samplewise", False))


@contextlib.contextmanager
def _no_reuse(rows: torch.Tensor):
    """:meth:`OperatorStage.reusing` of a stage without it: nothing to keep."""
    yield


def _carried_pullback(value: Value, stage: OperatorStage,
                      tikhonov: float) -> torch.Tensor | None:
    r""":math:`f_x^\top K` of the value's carried cotangent from the stage, or None (no
    carried part; a Tikhonov term, which puts :math:`\epsilon r` outside the span of K
    and the directions; a stage that does not hold it)."""
    carried = getattr(value, "carried", None)
    pull = getattr(stage, "carried_pullback", None)
    if carried is None or tikhonov or pull is None:
        return None
    return pull(carried.K)


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

    #: per-sample Jacobians: nothing mixes the samples
    samplewise = True

    value_gradient = fu_T_mean


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

    def response_gram(self, Y):
        """:math:`Y^i M^i Y^{i\\top}` (B, J, J) in control space."""
        F = Y @ self.stage.Bu                               # (B, J, m): f_u' Y
        return F @ (F @ self._S().transpose(-1, -2)).transpose(-1, -2)

    def response_shared(self, Y):
        r""":math:`f_u^i S \sum_k f_u^{k\top} Y^k` (the joint form's cross-sample
        response), (B, J, n1) -> (B, J, n1)."""
        Bu = self.stage.Bu
        G = torch.einsum("bjn,bnm->jm", Y, Bu) @ self._S().transpose(-1, -2)
        return torch.einsum("jm,bnm->bjn", G, Bu)

    def response_const(self):
        if self.lu is None:
            return None
        return self.apply_control(self.lu)

    def apply_control(self, G):
        return self.stage.Bu @ (self._S() @ G)

    def apply_total(self, G):
        return self.apply_control(G if self.lu is None else G + self.lu)
