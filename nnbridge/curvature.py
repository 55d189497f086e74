r"""Curvature models :math:`P \approx Q_{uu}` of one stage (DDPNOpt paper, Table 2).

Each curvature is a small functional kernel on the stage's augmented control
:math:`\tilde U` (out, in') (see :mod:`nnbridge.stages`):

* :meth:`Curvature.update` -- new statistics (moments, Kronecker factors) from the batch
  mean :math:`g = \mathbb{E}[Q_u]` (and, for EKFAC, the per-sample factors); always
  out of place, so a skipped step leaves the optimizer state untouched;
* :meth:`Curvature.open_loop` -- the open-loop update :math:`-P^{-1} d` (``d`` the
  curvature's direction: the gradient, or its momentum / Adam's first moment);
* :meth:`Curvature.preconditioner` -- a :class:`Preconditioner`, computed once per step
  and stage, with ``inverse`` (:math:`P^{-1} G` for a control-shaped ``G``: the update and
  the feedback) and ``per_sample`` (:math:`[S(w^i \tilde x^{i\top})]\, \tilde x^i`, the
  response the value recursion needs, :class:`trajopt.riccati.operator.ControlResponse`,
  with rank-one closed forms for Linear layers).

With :math:`P^{-1} G = Q_G [(Q_G^\top G Q_A) \odot D] Q_A^\top` (rotations ``None`` for
the diagonal ones), the family covers identity (:math:`D = \eta`, SGD), RMSprop and Adam
(:math:`D = \eta / (\sqrt{v}+\epsilon)`) and EKFAC (eigenbases of
:math:`\mathbb{E}[\tilde x \tilde x^\top]`, :math:`\mathbb{E}[V_h V_h^\top]`,
:math:`D = \eta / (s + \epsilon)`).  :class:`Exact` is vanilla DDP's
:math:`Q_{uu} = l_{uu} + \mathbb{E}[f_u^\top V_{xx} f_u]` (small Linear layers only).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch

from trajopt.errors import InvalidArgumentError
from trajopt.riccati.solvers import cholesky_factor

from .eigenbasis import eigenbasis
from .stages import outer_sum_rows, spread

__all__ = ["Curvature", "Preconditioner", "DensePreconditioner", "Identity", "RMSprop",
           "Adam", "EKFAC", "Exact", "CURVATURES", "NetworkResponse", "NoControl",
           "response_gram"]

State = dict[str, Any]


class Curvature:
    """Base class; ``defaults`` are the hyper-parameters (torch.optim names).  The default
    learning rates are DDPNOpt's, chosen on the digits validation split
    (``docs/experiments.md``; ekfac 0.1, exact 1.0 with regularization 1.0) or, for
    identity (0.1), rmsprop (1e-3) and adam (2e-3), inside the range where the feedback
    was measured stable (``docs/ddpnopt.md``, "Default rates"), not torch.optim's; the
    other defaults are torch.optim's."""

    name = "base"
    defaults: dict[str, Any] = {}
    needs_factors = False  # update() wants the per-sample factors (w, X)
    #: P^-1 from the squared batch gradient, lr / (sqrt(v) + eps): unbounded where that
    #: gradient vanishes (``DDPNOpt._bias_cancelled``)
    adaptive_diagonal = False

    def validate(self, hp: dict) -> None:
        if not hp["lr"] >= 0:
            raise ValueError(f"Invalid learning rate: {hp['lr']}")
        if not hp.get("weight_decay", 0.0) >= 0:
            raise ValueError(f"Invalid weight_decay value: {hp['weight_decay']}")
        if "eps" in hp and not hp["eps"] >= 0:
            raise ValueError(f"Invalid epsilon value: {hp['eps']}")

    def update(self, st: State, g: torch.Tensor, hp: dict, step: int,
               w: torch.Tensor | None = None, X: torch.Tensor | None = None,
               mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> State:
        """New statistics from ``g`` (and the per-sample factors ``w`` (B, out, P), ``X``
        (B, in', P)); ``mean`` turns a sum over the local samples into the batch mean
        (default: divide by B; :class:`nnbridge.distributed.BatchMean` across ranks)."""
        return dict(st)

    # P^{-1} = rotations + elementwise D
    def scale(self, st: State, hp: dict, step: int) -> torch.Tensor:
        raise NotImplementedError

    def rotations(self, st: State) -> tuple[torch.Tensor, torch.Tensor] | None:
        return None

    def preconditioner(self, st: State, hp: dict, step: int) -> Preconditioner:
        """:math:`P^{-1}` of the (updated) state, computed once per step and stage."""
        return Preconditioner(self.scale(st, hp, step), self.rotations(st))

    def direction(self, st: State, g: torch.Tensor, hp: dict, step: int) -> torch.Tensor:
        return g

    def open_loop(self, st: State, g: torch.Tensor, hp: dict, step: int,
                  pre: Preconditioner) -> torch.Tensor:
        return -pre.inverse(self.direction(st, g, hp, step))

    #: the feedback pass measures each stage's closed-loop gain for :meth:`closed_loop`
    #: (:class:`trajopt.riccati.StateFeedback`; a few elementwise operations a stage)
    watches_feedback = False

    def closed_loop(self, st: State, gain: float) -> State:
        """The state to keep after a step whose feedback closed the loop at this stage
        with ``gain`` (:class:`trajopt.riccati.StateFeedback`: above 1 where :math:`P`
        underestimates the curvature the value sees); called only where
        :attr:`watches_feedback`."""
        return st

    def feedback_scale(self, gain: float) -> float:
        """The factor on this stage's feedback term, given its closed-loop ``gain``
        (called only where :attr:`watches_feedback`): 1, the method's feedback."""
        return 1.0

    def overshot(self, before: State, after: State, gain: float) -> State | None:
        """In the backward pass, where :attr:`watches_feedback`: at a stage whose
        open-loop step overshoots the value's model with ``gain``
        (:func:`nnbridge.feedback.open_loop_gain`; above 1 where :math:`P`
        underestimates the curvature the value sees along the step), the state to
        update again from instead of ``before`` (``after`` is the update from
        ``before``), or None to keep ``after`` (the default)."""
        return None

    def reuses_response(self, st: State, hp: dict) -> bool:
        """Whether :meth:`open_loop` is :math:`-P^{-1} g` for the ``g`` it is given (no
        momentum, no first moment): the value recursion's response applies
        :math:`S = P^{-1}` to that same ``g``, and the feedback pass may take the step
        from there (:class:`NetworkResponse`) instead of applying :math:`P^{-1}` again."""
        return (type(self).direction is Curvature.direction
                and type(self).open_loop is Curvature.open_loop)


@dataclass(frozen=True)
class Preconditioner:
    r""":math:`P^{-1} G = Q_G [(Q_G^\top G Q_A) \odot D] Q_A^\top` (``rot = (Q_G, Q_A)``
    or None); D (out, in') or a number."""

    D: torch.Tensor | float
    rot: tuple[torch.Tensor, torch.Tensor] | None = None
    #: one stage's inputs and their rotation :math:`\tilde x = x Q_A`, kept for the calls
    #: of the same step (:meth:`rotated_inputs`)
    _xr: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @property
    def value_is_inverse(self) -> bool:
        """:meth:`value_inverse` is :meth:`inverse` (S = P^{-1}: the curvature model is
        its own Q_uu): true unless a subclass defines its own :meth:`value_inverse`."""
        return type(self).value_inverse is Preconditioner.value_inverse

    def inverse(self, G: torch.Tensor) -> torch.Tensor:
        if self.rot is None:
            return G * self.D
        return self.unrotate(self.rotate(G))

    def rotate(self, G: torch.Tensor) -> torch.Tensor:
        r""":math:`(Q_G^\top G Q_A) \odot D`: :math:`P^{-1} G` in the eigenbasis."""
        QG, QA = self.rot
        return (QG.transpose(-1, -2) @ G @ QA) * self.D

    def unrotate(self, R: torch.Tensor) -> torch.Tensor:
        r""":math:`Q_G R Q_A^\top`, back from the eigenbasis."""
        QG, QA = self.rot
        return QG @ R @ QA.transpose(-1, -2)

    def rotated_inputs(self, X: torch.Tensor) -> torch.Tensor:
        r""":math:`\tilde x = x Q_A` (B, in') of a Linear stage's inputs X (B, in', 1),
        computed once for the calls that share this preconditioner and X."""
        if self._xr.get("X") is not X:
            self._xr.clear()
            self._xr.update(X=X, Xr=X[..., 0] @ self.rot[1])
        return self._xr["Xr"]

    def seed_rotated_inputs(self, X: torch.Tensor, Xr: torch.Tensor) -> None:
        """:meth:`rotated_inputs` of ``X`` already computed (``Xr`` = X[..., 0] Q_A, by
        :meth:`EKFAC.update` with this preconditioner's Q_A)."""
        self._xr.clear()
        self._xr.update(X=X, Xr=Xr)

    def eigen_step_pays(self, X: torch.Tensor) -> bool:
        r"""Whether a Linear stage (inputs X (B, in', 1)) keeps its open-loop step in the
        eigenbasis, :math:`R = (Q_G^\top g Q_A) \odot D` (:class:`NetworkResponse`),
        and the feedback pass forms :math:`P^{-1}(g + F) = Q_G (R + (Q_G^\top F Q_A)
        \odot D) Q_A^\top` with one rotation back, the value's response and the feedback
        term from the rotated factors (:math:`x Q_A`, :math:`h Q_G`).  By multiply-adds:
        ``B (in'^2 + 2 out^2)`` against the two rotations it saves, ``2 out in' (out +
        in')``: so for batches below about the layer's width (256 wide: B <= 342)."""
        if (self.rot is None or not torch.is_tensor(self.D) or not self.value_is_inverse
                or X.dim() != 3 or X.shape[-1] != 1):
            return False
        B, i, o = X.shape[0], X.shape[1], self.rot[0].shape[-1]
        return B * (i * i + 2 * o * o) < 2 * o * i * (o + i)

    def value_inverse(self, G: torch.Tensor) -> torch.Tensor:
        """S G (the value recursion's operator); = P^{-1} G when the curvature model is
        its own Q_uu."""
        return self.inverse(G)

    def per_sample(self, w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """[S (w^i x~^i')] x~^i: w (B, J, out, P), X (B, in', P) -> (B, J, out, P)."""
        if X.shape[-1] == 1 and X.dim() == 3:  # Linear: rank-one per-sample cotangents
            a, x = w[..., 0], X[..., 0]
            if not torch.is_tensor(self.D):
                return w * (self.D * (x * x).sum(-1))[:, None, None, None]
            if self.rot is not None:
                a, x = a @ self.rot[0], self.rotated_inputs(X)
            e = (x * x) @ self.D.transpose(-1, -2)                       # (B, out)
            res = a * e.unsqueeze(1)
            if self.rot is not None:
                res = res @ self.rot[0].transpose(-1, -2)
            return res.unsqueeze(-1)
        if not torch.is_tensor(self.D) and self.rot is None and _positions_gram_pays(w, X):
            # S = D I (SGD): [D w^i x~^i'] x~^i = D w^i (x~^i' x~^i), through the P x P Gram
            # matrix of each sample's positions, without per-sample (out x in') gradients
            gram = torch.einsum("b...ip,b...iq->b...pq", X, X)
            return self.D * torch.einsum("bj...op,b...pq->bj...oq", w, gram)
        if self._rotates_factors(w, X, back=True):
            Gr, Xr = self._rotated(w, X)
            return self.rot[0] @ torch.einsum("bj...oi,b...ip->bj...op", Gr * self.D, Xr)
        # (a grouped convolution: one more dimension, the groups, before out / in')
        G = torch.einsum("bj...op,b...ip->bj...oi", w, X)
        return torch.einsum("bj...oi,b...ip->bj...op", self.value_inverse(G), X)

    def gram(self, w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
        """:math:`\\langle w_j^i \\tilde x^{i\\top}, S(w_k^i \\tilde x^{i\\top})\\rangle`
        (B, J, J) for w (B, J, out, P): what a factored value's downdate needs of the
        response, without mapping :meth:`per_sample` back to positions."""
        if X.shape[-1] == 1 and X.dim() == 3:  # Linear: rank-one per-sample cotangents
            a, x = w[..., 0], X[..., 0]
            if not torch.is_tensor(self.D):
                return (self.D * (x * x).sum(-1)).view(-1, 1, 1) * torch.bmm(
                    a, a.transpose(-1, -2))
            if self.rot is not None:
                a, x = a @ self.rot[0], self.rotated_inputs(X)
            e = (x * x) @ self.D.transpose(-1, -2)                       # (B, out)
            return torch.bmm(a * e.unsqueeze(1), a.transpose(-1, -2))
        if not torch.is_tensor(self.D) and self.rot is None and _positions_gram_pays(w, X):
            # S = D I through the P x P Gram matrix of each sample's positions
            gram = torch.einsum("b...ip,b...iq->b...pq", X, X)
            t = torch.einsum("bj...op,b...pq->bj...oq", w, gram)
            return self.D * (t.flatten(2) @ w.flatten(2).transpose(-1, -2))
        if self._rotates_factors(w, X, back=False):
            Gr = self._rotated(w, X)[0]
            return response_gram(Gr, Gr * self.D)
        G = torch.einsum("bj...op,b...ip->bj...oi", w, X)
        if self.rot is None and torch.is_tensor(self.D) and self.value_is_inverse and \
                bool((self.D >= 0).all()):
            # a diagonal S = D >= 0 (Adam, RMSprop): <G_j, D G_k> = <G_j sqrt D, G_k sqrt D>,
            # scaled in place: no second (B, J, out, in') tensor (~40 % of this Gram)
            G = G.mul_(self.D.sqrt()).flatten(2)
            return G @ G.transpose(-1, -2)
        return response_gram(G, self.value_inverse(G))

    def _rotates_factors(self, w: torch.Tensor, X: torch.Tensor, back: bool) -> bool:
        r"""Whether an eigenbasis (EKFAC) maps per-sample cotangents through the rotated
        factors (:meth:`_rotated`) rather than through per-sample gradients rotated there
        and back.  By multiply-adds a sample (and group): ``J out^2 P (2 or 1) + in'^2
        P`` (the rows' rotation, once more back for the response; the inputs' rotation,
        shared by the J rows) against ``2 J out in' (out + in')`` (two rotations of each
        per-sample gradient); both routes form J (out, in') products over the P
        positions, the response one more.  ``back``: the response (:meth:`per_sample`),
        else its Gram matrix, which needs no rotation back (Frobenius products are
        invariant under it).  A first convolution on few channels over many positions
        keeps the per-sample gradients."""
        if self.rot is None or not torch.is_tensor(self.D) or not self.value_is_inverse:
            return False
        J, out, P, inp = w.shape[1], w.shape[-2], w.shape[-1], X.shape[-2]
        return J * out * out * P * (2 if back else 1) + inp * inp * P < \
            2 * J * out * inp * (out + inp)

    def _rotated(self, w: torch.Tensor, X: torch.Tensor
                 ) -> tuple[torch.Tensor, torch.Tensor]:
        r"""The per-sample gradients in the eigenbasis, :math:`\tilde G = Q_G^\top (w
        X^\top) Q_A = \tilde w \tilde X^\top` (B, J, [G,] out, in') from the rotated
        factors :math:`\tilde w = Q_G^\top w`, :math:`\tilde X = Q_A^\top X`, and
        :math:`\tilde X` (B, [G,] in', P): then :math:`S G = Q_G (\tilde G \odot D)
        Q_A^\top` and :math:`(S G) X = Q_G (\tilde G \odot D) \tilde X`."""
        QG, QA = self.rot
        Xr = QA.transpose(-1, -2) @ X
        return torch.einsum("bj...op,b...ip->bj...oi", QG.transpose(-1, -2) @ w, Xr), Xr


def _positions_gram_pays(w: torch.Tensor, X: torch.Tensor) -> bool:
    """Whether a scalar S (SGD) goes through each sample's P x P Gram matrix of positions,
    ~P^2 (in' + J out) multiply-adds a sample (and group), rather than through per-sample
    (out x in') gradients, ~2 J out in' P: for w (B, J, ..., out, P), X (B, ..., in', P).
    A convolution with many input channels takes the Gram matrix; a BatchNorm stage
    (in' = 2: 64 x 64 Gram matrices for a 2-entry gradient, 22 ms a call on the digits
    ResNet) or a first convolution on few channels does not."""
    J, out, P = w.shape[1], w.shape[-2], w.shape[-1]
    return P * (X.shape[-2] + J * out) < 2 * J * out * X.shape[-2]


@dataclass(frozen=True)
class DensePreconditioner(Preconditioner):
    r"""Dense curvature over the flattened control (:class:`Exact`), kept as a Cholesky
    factor: :math:`P^{-1} = \eta (Q_{uu} + \mu I)^{-1}` and
    :math:`S = 2P^{-1} - P^{-1} Q_{uu} P^{-1}` are applied by triangular solves, never
    formed (forming S costs two m^3 products; a solve costs m^2 per right-hand side).

    Attributes
    ----------
    D : (m, m)
        Cholesky factor L of :math:`Q_{uu} + \mu I`.
    Quu : (m, m)
        The curvature entering the value (without :math:`\mu`).
    lr : float
        :math:`\eta`.
    """

    Quu: torch.Tensor | None = None
    lr: float = 1.0

    def _solve(self, flat: torch.Tensor) -> torch.Tensor:
        """:math:`P^{-1}` on the rows of ``flat`` (k, m)."""
        return torch.cholesky_solve(flat.T, self.D).T * self.lr

    def inverse(self, G):
        return self._solve(G.reshape(1, -1)).reshape(G.shape)

    def value_inverse(self, G):
        flat = G.reshape(-1, self.Quu.shape[0])
        PG = self._solve(flat)
        return (2 * PG - self._solve(PG @ self.Quu)).reshape(G.shape)

    def per_sample(self, w, X):
        G = torch.einsum("bjop,bip->bjoi", w, X)
        return torch.einsum("bjoi,bip->bjop", self.value_inverse(G), X)

    def gram(self, w, X):
        return response_gram(w, self.per_sample(w, X))


def response_gram(w: torch.Tensor, Sw: torch.Tensor) -> torch.Tensor:
    """The Gram matrix (B, J, J) of J per-sample cotangent factors ``w`` and their
    responses ``Sw`` (both (B, J, ...) in the same layout): :math:`\\langle w_j, Sw_k
    \\rangle` per sample."""
    return w.flatten(2) @ Sw.flatten(2).transpose(-1, -2)


def _lr_over(lr: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """``lr / x`` as torch rounds it, overwriting the fresh tensor ``x``: a number over a
    tensor is its reciprocal times the number (``Tensor.__rtruediv__``); a tensor ``lr``
    divides."""
    return lr / x if torch.is_tensor(lr) else x.reciprocal_().mul_(lr)


def _decayed(old: torch.Tensor | None, keep: float, new: torch.Tensor) -> torch.Tensor:
    """``old * keep + new`` (``new`` alone when there is no ``old``: a zero state, as
    torch.optim starts), into a fresh tensor: ``old`` is never modified (a skipped step
    leaves the optimizer's state as it was); ``new`` may be overwritten."""
    return new if old is None else (old * keep).add_(new)


def _moment(old: torch.Tensor | None, new: torch.Tensor, keep: float) -> torch.Tensor:
    return new if old is None else old * keep + new * (1.0 - keep)


class Identity(Curvature):
    """:math:`P = I/\\eta`: SGD (torch.optim.SGD's momentum, dampening, nesterov,
    weight_decay)."""

    name = "identity"
    defaults = dict(lr=0.1, momentum=0.0, dampening=0.0, nesterov=False, weight_decay=0.0)

    def validate(self, hp):
        super().validate(hp)
        if not hp["momentum"] >= 0:
            raise ValueError(f"Invalid momentum value: {hp['momentum']}")
        if hp["nesterov"] and (hp["momentum"] <= 0 or hp["dampening"] != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")

    def update(self, st, g, hp, step, w=None, X=None, mean=None):
        st = dict(st)
        mu = hp["momentum"]
        if mu:
            buf = st.get("momentum_buffer")
            st["momentum_buffer"] = (g.clone() if buf is None
                                     else _decayed(buf, mu, g * (1.0 - hp["dampening"])))
        return st

    def direction(self, st, g, hp, step):
        mu = hp["momentum"]
        if not mu:
            return g
        buf = st["momentum_buffer"]
        return g + buf * mu if hp["nesterov"] else buf

    def reuses_response(self, st, hp):
        return not hp["momentum"]

    def preconditioner(self, st, hp, step):
        return Preconditioner(float(hp["lr"]))


class RMSprop(Curvature):
    """:math:`P = \\mathrm{diag}(\\sqrt{v} + \\epsilon)/\\eta`, v the running mean of
    :math:`\\mathbb{E}[Q_u]^{\\odot 2}` (torch.optim.RMSprop's alpha, eps, weight_decay,
    momentum, centered)."""

    name = "rmsprop"
    adaptive_diagonal = True
    defaults = dict(lr=1e-3, alpha=0.99, eps=1e-8, weight_decay=0.0, momentum=0.0,
                    centered=False)

    def validate(self, hp):
        super().validate(hp)
        if not hp["alpha"] >= 0 or not hp["momentum"] >= 0:
            raise ValueError(f"Invalid alpha/momentum: {hp['alpha']}, {hp['momentum']}")

    def update(self, st, g, hp, step, w=None, X=None, mean=None):
        st = dict(st)
        a = hp["alpha"]
        st["square_avg"] = _decayed(st.get("square_avg"), a, (g * g).mul_(1 - a))
        if hp["centered"]:
            st["grad_avg"] = _decayed(st.get("grad_avg"), a, g * (1 - a))
        if hp["momentum"]:
            st["momentum_buffer"] = _decayed(st.get("momentum_buffer"), hp["momentum"],
                                             g / self._avg(st, hp))
        return st

    def _avg(self, st, hp):
        v = st["square_avg"]
        if hp["centered"]:
            v = v - st["grad_avg"] * st["grad_avg"]
        return v.sqrt().add_(hp["eps"])

    def scale(self, st, hp, step):
        return _lr_over(hp["lr"], self._avg(st, hp))

    def open_loop(self, st, g, hp, step, pre):
        if hp["momentum"]:
            return -hp["lr"] * st["momentum_buffer"]
        return -pre.inverse(g)

    def reuses_response(self, st, hp):
        return not hp["momentum"]


class Adam(Curvature):
    """:math:`P = \\mathrm{diag}(\\sqrt{\\hat v} + \\epsilon)/\\eta` with the direction
    :math:`\\hat m` (torch.optim.Adam's betas, eps, weight_decay, amsgrad)."""

    name = "adam"
    adaptive_diagonal = True
    defaults = dict(lr=2e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, amsgrad=False)

    def validate(self, hp):
        super().validate(hp)
        b1, b2 = hp["betas"]
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"Invalid beta parameters: {hp['betas']}")

    def update(self, st, g, hp, step, w=None, X=None, mean=None):
        st = dict(st)
        b1, b2 = hp["betas"]
        m = st.get("exp_avg")
        st["exp_avg"] = (torch.zeros_like(g) if m is None else m).lerp(g, 1 - b1)
        st["exp_avg_sq"] = _decayed(st.get("exp_avg_sq"), b2, (g * g).mul_(1 - b2))
        if hp["amsgrad"]:
            top = st.get("max_exp_avg_sq")
            st["max_exp_avg_sq"] = st["exp_avg_sq"].clone() if top is None else \
                torch.maximum(top, st["exp_avg_sq"])
        return st

    def scale(self, st, hp, step):
        b2 = hp["betas"][1]
        v = st["max_exp_avg_sq"] if hp["amsgrad"] else st["exp_avg_sq"]
        # lr / (sqrt(v) / sqrt(1 - b2^t) + eps), each operation rounded as written
        return _lr_over(hp["lr"], v.sqrt().div_(math.sqrt(1 - b2 ** step)).add_(hp["eps"]))

    def direction(self, st, g, hp, step):
        return st["exp_avg"] / (1 - hp["betas"][0] ** step)


class EKFAC(Curvature):
    """Eigenvalue-corrected Kronecker factorization (George et al. 2018):
    :math:`P^{-1} G = Q_G [(Q_G^\\top G Q_A) / (s + \\epsilon)] Q_A^\\top \\eta` with
    running averages (``alpha``) of :math:`A = \\mathbb{E}[\\tilde x \\tilde x^\\top]`,
    :math:`G = \\mathbb{E}[w w^\\top]`, eigenbases recomputed every ``update_freq`` steps,
    and :math:`s` the running mean of the squared per-sample gradients in that basis
    (re-estimated from the batch whenever the basis changes).  Under the DDP feedback a
    stage's eigenbases are also recomputed at the step after one whose feedback's
    closed-loop gain exceeded 1, and that feedback is scaled by :math:`1/\\rho`
    (:meth:`closed_loop`, :meth:`feedback_scale`)."""

    name = "ekfac"
    defaults = dict(lr=0.1, eps=0.1, alpha=0.75, update_freq=10, weight_decay=0.0)
    needs_factors = True

    def validate(self, hp):
        super().validate(hp)
        if not 0 <= hp["alpha"] < 1:
            raise ValueError(f"Invalid alpha (running-average factor): {hp['alpha']}")
        uf = hp["update_freq"]
        if (isinstance(uf, bool) or not isinstance(uf, (int, float)) or not math.isfinite(uf)
                or uf != int(uf) or uf < 1):
            raise InvalidArgumentError(f"Invalid update_freq (an integer >= 1): {uf!r}")

    def update(self, st, g, hp, step, w=None, X=None, mean=None):
        st = dict(st)
        a = hp["alpha"]
        B, P = X.shape[0], X.shape[-1]
        if mean is None:
            def mean(local_sum):
                return local_sum / B
        # a grouped convolution has one more dimension (the groups) before out / in':
        # one Kronecker pair per group
        Wf = w.reshape(B, *w.shape[-X.dim() + 1:-1], P)
        st["A"] = _moment(st.get("A"), mean(torch.einsum("b...ip,b...jp->...ij", X, X)) / P,
                          a)
        st["G"] = _moment(st.get("G"), mean(torch.einsum("b...op,b...qp->...oq", Wf, Wf))
                          / P, a)
        # the eigenbases every update_freq steps, and at the step after one whose feedback
        # overshot at this stage (closed_loop; the mark is consumed either way)
        stale = st.pop("stale", False)
        fresh = "QA" not in st or (step - 1) % int(hp["update_freq"]) == 0 or stale
        if fresh:
            st["QA"], st["QG"] = eigenbasis(st["A"]), eigenbasis(st["G"])
        st["refreshed"] = fresh
        if P == 1 and X.dim() == 3:
            xr = X[..., 0] @ st["QA"]
            # the rotated inputs x Q_A again in this step's response and feedback pass
            # (Preconditioner.rotated_inputs): handed to the preconditioner made next
            self._rotated = (X, st["QA"], xr)
            s = mean(((Wf[..., 0] @ st["QG"]) ** 2).transpose(0, 1) @ xr ** 2)
        else:
            Gi = torch.einsum("b...op,b...ip->b...oi", Wf, X)
            s = mean(((st["QG"].transpose(-1, -2) @ Gi @ st["QA"]) ** 2).sum(0))
        st["S"] = s if fresh else _moment(st["S"], s, a)
        return st

    #: ``(X, Q_A, X Q_A)`` of the last :meth:`update` of a Linear stage, until the
    #: :meth:`preconditioner` of that state takes it
    _rotated: tuple | None = None

    def preconditioner(self, st, hp, step):
        pre = super().preconditioner(st, hp, step)
        memo, self._rotated = self._rotated, None
        if memo is not None and memo[1] is pre.rot[1]:
            pre.seed_rotated_inputs(memo[0], memo[2])
        return pre

    def scale(self, st, hp, step):
        return hp["lr"] / (st["S"] + hp["eps"])

    watches_feedback = True

    def closed_loop(self, st, gain):
        """Marks the eigenbases stale where the feedback's closed-loop gain exceeded 1
        through a basis older than this step: the diagonal :math:`S` in an eigenbasis
        older than the weights underestimates the curvature along the directions the
        value sees (the DDP feedback through it overshot: a small CNN's loss 1.8 -> 10.4
        in one step with ``update_freq=10``), so :meth:`update` recomputes them at the
        next step (``docs/ddpnopt.md``, "EKFAC's eigenbasis under feedback")."""
        if "QA" not in st or st.get("refreshed", False) or not gain > 1:
            return st      # a basis of this very step is not stale: S or the rate is
        return dict(st, stale=True)

    def feedback_scale(self, gain):
        """:math:`1 / \\max(1, \\rho)`: in the step where the gain exceeds 1 the feedback
        cancels what the model's Newton step would along the state change, no more."""
        return 1.0 / gain if gain > 1 else 1.0

    def overshot(self, before, after, gain):
        """Eigenbases older than this step under an open-loop step that overshot the
        value's model (``gain`` > 1): ``before`` marked stale, so that this step's
        update from it recomputes them (and re-estimates S from the batch in them), as
        at a refresh (``docs/ddpnopt.md``, "EKFAC's eigenbasis under feedback"); also
        GT-DDP's joint states (:class:`~nnbridge.cooperative.CooperativeEKFAC`)."""
        if after.get("refreshed", True) or not gain > 1:
            return None
        return dict(before, stale=True)

    def rotations(self, st):
        return st["QG"], st["QA"]


class Exact(Curvature):
    """Vanilla DDP: :math:`P = (Q_{uu} + \\mu I)/\\eta` with
    :math:`Q_{uu} = \\lambda I + \\mathbb{E}_i[f_u^{i\\top} (V_{xx}'^{\\,i} + \\epsilon I)
    f_u^i]` formed densely (Linear stages only; memory (out in')^2 per layer).  ``mu`` is
    the Levenberg-Marquardt regularization; the value uses the general (exact-for-the-
    policy) form with :math:`S = 2P^{-1} - P^{-1}Q_{uu}P^{-1}`."""

    name = "exact"
    defaults = dict(lr=1.0, regularization=1.0, weight_decay=0.0)

    def validate(self, hp):
        super().validate(hp)
        if not hp["regularization"] >= 0:
            raise ValueError(f"Invalid regularization: {hp['regularization']}")

    def build(self, lin, value, tikhonov: float, hp) -> DensePreconditioner:
        """Form Q_uu from the next value (called by the optimizer before the solve)."""
        if lin.X.shape[-1] != 1 or lin.X.dim() != 3:
            raise InvalidArgumentError(
                "curvature='exact' supports Linear stages only (Conv2d would need the dense "
                "per-sample control Jacobian); use 'ekfac' for convolutions")
        out = lin.h_shape[0]
        E = torch.eye(out, dtype=lin.X.dtype, device=lin.X.device).expand(lin.B, out, out)
        Sig = lin.sigma(E)                                      # rows sigma_h e_j
        Vhh = lin.sigma_T(value.hess_apply(Sig, tikhonov))      # (B, out, out)
        x = lin.X[..., 0]
        m = out * x.shape[-1]
        eye = torch.eye(m, dtype=x.dtype, device=x.device)
        # E_b[Vhh^b (x) x^b x^b'] as one (out^2, B) @ (B, in'^2) product, then reordered
        xx = (x.unsqueeze(-1) * x.unsqueeze(-2)).reshape(lin.B, -1)
        n_in = x.shape[-1]
        Quu = lin.mean(Vhh.reshape(lin.B, -1).T @ xx).reshape(out, out, n_in, n_in)
        Quu = Quu.permute(0, 2, 1, 3).reshape(m, m)
        Quu = 0.5 * (Quu + Quu.T) + hp["weight_decay"] * eye
        L = cholesky_factor(Quu + hp["regularization"] * eye,
                            "curvature='exact': Q_uu + regularization * I", lin.stage.index,
                            f"increase regularization (now {hp['regularization']}) or keep "
                            "value_psd=True")
        return DensePreconditioner(D=L, Quu=Quu, lr=hp["lr"])


CURVATURES: dict[str, type[Curvature]] = {c.name: c for c in
                                          (Identity, RMSprop, Adam, EKFAC, Exact)}


@dataclass
class NetworkResponse:
    """:class:`trajopt.riccati.operator.ControlResponse` of a preconditioner on a network
    stage linearization ``lin`` (see :class:`nnbridge.stages.StageLinearization`);
    ``wdU`` is :math:`l_u = \\lambda \\tilde U` or None.

    ``total`` (optional) is :math:`\\mathbb{E}[Q_u] + l_u` as the caller formed it from
    the step's ``qu``: :meth:`apply_total` of that ``qu`` then uses it and keeps
    :math:`S\\,` ``total`` in ``Sg`` (the open-loop step when :math:`S = P^{-1}`,
    :meth:`Curvature.reuses_response`).  With ``rotated`` (the caller can take it) and
    where :meth:`Preconditioner.eigen_step_pays`, it keeps that step in the eigenbasis
    instead, ``Rg`` = :math:`(Q_G^\\top\\,` ``total`` :math:`Q_A) \\odot D` (``Sg``
    = :meth:`Preconditioner.unrotate` of it), and the response comes from the rotated
    inputs without forming ``Sg``."""

    pre: Preconditioner
    lin: Any
    wdU: torch.Tensor | None
    total: torch.Tensor | None = None
    qu: Any = None
    Sg: torch.Tensor | None = None
    rotated: bool = False
    Rg: torch.Tensor | None = None
    #: :meth:`apply_total` of ``qu``, kept for the calls of the same step
    r_total: torch.Tensor | None = None

    def step_curvature(self) -> torch.Tensor:
        r""":math:`\langle g, S g\rangle` for g = ``total`` after :meth:`apply_total` of
        ``qu``: from ``Sg``, or in the eigenbasis from ``Rg`` :math:`= (Q_G^\top g Q_A)
        \odot D` as :math:`\sum R_g^2 / D` (no rotation of g; an entry with D = 0, a zero
        rate or an infinite S, contributes its 0)."""
        if self.Rg is not None:
            D = self.pre.D
            return torch.where(D > 0, self.Rg * self.Rg / D, 0.0).sum()
        return (self.total * self.Sg).sum()

    def response(self, Y: torch.Tensor) -> torch.Tensor:
        return self.lin.from_h(self.pre.per_sample(self.lin.factors(Y), self.lin.X))

    def response_gram(self, Y: torch.Tensor) -> torch.Tensor:
        """:math:`Y^i M^i Y^{i\\top}` (B, J, J), in control space (no map back to the
        state: :meth:`Preconditioner.gram`)."""
        return self.pre.gram(self.lin.factors(Y), self.lin.X)

    def response_shared(self, Y: torch.Tensor) -> torch.Tensor:
        r""":math:`f_u^i S \sum_k f_u^{k\top} Y^k` (the batch-augmented form's response,
        :mod:`trajopt.riccati.joint`), (B, J, n1) -> (B, J, n1)."""
        X = self.lin.X
        return self.lin.from_h(spread(self.pre.value_inverse(
            outer_sum_rows(self.lin.factors(Y), X)), X))

    def response_const(self) -> torch.Tensor | None:
        return None if self.wdU is None else self.apply_control(self.wdU)

    def apply_control(self, G: torch.Tensor) -> torch.Tensor:
        h = self.lin.gu(self.pre.value_inverse(G))
        return self.lin.from_h(h.unsqueeze(1)).squeeze(1)

    def apply_total(self, G: torch.Tensor) -> torch.Tensor:
        if self.total is not None and G is self.qu:
            if self.r_total is None:
                self.r_total = self._apply_total()
            return self.r_total
        return self.apply_control(G if self.wdU is None else G + self.wdU)

    def _apply_total(self) -> torch.Tensor:
        """:meth:`apply_total` of ``qu``: ``total`` through S, keeping ``Rg`` or ``Sg``."""
        if self.rotated and self.pre.eigen_step_pays(self.lin.X):
            # g_u S g = x Q_A R' Q_G' per sample, (B, out)
            self.Rg = self.pre.rotate(self.total)
            h = (self.pre.rotated_inputs(self.lin.X) @ self.Rg.transpose(-1, -2)
                 ) @ self.pre.rot[0].transpose(-1, -2)
            return self.lin.from_h(h[:, None, :, None]).squeeze(1)
        self.Sg = self.pre.value_inverse(self.total)
        return self.lin.from_h(self.lin.gu(self.Sg).unsqueeze(1)).squeeze(1)


@dataclass
class NoControl:
    r""":class:`trajopt.riccati.operator.ControlResponse` of a stage without control (all
    its parameters frozen): no policy, so the response is zero and the value is carried
    through :math:`f_x` unchanged (:math:`V = f_x^\top V' f_x`)."""

    lin: Any

    def response(self, Y: torch.Tensor) -> torch.Tensor:
        return torch.zeros_like(Y)

    response_shared = response

    def response_const(self) -> None:
        return None

    def apply_control(self, G: torch.Tensor) -> torch.Tensor:
        return self.lin.x_next.new_zeros(self.lin.B, self.lin.n1)

    apply_total = apply_control
