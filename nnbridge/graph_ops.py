r"""Operator-form derivatives of a :class:`~nnbridge.graph.GraphStage` on the augmented
state, and the players' curvature (the Q_uu plug of the GT-DDP step).

:class:`GraphLinearization` implements :class:`trajopt.riccati.operator.OperatorStage`
for :math:`y_{t+1} = F_t(y_t, w_t)` with :math:`y` flattened and concatenated per sample
(``(B, n_y)``, residual blocks after :math:`x_t`) and the control :math:`w_t` the list of
the players' controls.  Its transposed Jacobian :math:`F_y^\top` carries a cotangent of
:math:`y_{t+1}` to :math:`y_t`: through the layer to :math:`x_t`, unchanged along carried
residuals, summed into :math:`x_t` where a residual starts (GT-DDP Prop. 2's merge) and
through the shortcut where it ends (Eq. 26).  So :func:`trajopt.riccati.
operator_riccati_step` on these stages is DDP on the augmented state: it carries
:math:`V_x`, :math:`V_{x x_r}`, :math:`V_{x_r x_r}` as blocks of the augmented value and
its policy's columns on the residual blocks are the residual feedback :math:`G` (Eq. 9);
with the rank-one value the factor is :math:`[z_x; z_{x_r}]` (Prop. 6).

Derivatives are vector-Jacobian and Jacobian-vector products of the stage's sub-graph
(``torch.func``); the control cotangents stay factored per sample,
:math:`f_{w_j}^{i\top} y = w_j^i \tilde x_j^{i\top}` with :math:`w_j` the cotangent at
player j's pre-activation, as for chain stages (:mod:`nnbridge.stages`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trajopt.errors import InvalidArgumentError
from trajopt.riccati.solvers import cholesky_factor

from .curvature import DensePreconditioner, Preconditioner, response_gram
from .graph import GraphStage
from .stages import (
    controls_samplewise,
    outer_sum,
    outer_sum_rows,
    samplewise,
    spread,
    without_bias_row,
)

__all__ = ["GraphLinearization", "GraphResponse", "BlockDiagonal", "JointDense",
           "joint_exact"]

Controls = list  # one (out_j, in'_j) tensor (or None: a frozen player) per player


class GraphLinearization:
    """First-order operators of a graph stage around nominal :math:`y_t` (list of (B, ...)).

    Parameters
    ----------
    stage : GraphStage
    ys : list of Tensor
        Nominal :math:`y_t`.
    active : list of bool
        Per player: its control is optimized (False: frozen, a constant of the stage).
    mean : callable
        Batch mean from a sum over the local samples.
    sent : list of Tensor or None, optional
        Per player, the recorded gradient of the batch-mean loss at its pre-activation
        (the training loop's backward pass): the control gradient of its per-sample
        cotangents (B times it) is what the caller already holds, left out by
        :meth:`value_gradient`.
    cancelled : list of bool, optional
        Per player, its bias is left out of the per-sample factors (the bias row of its
        unfolded input is 0): a BatchNorm with batch statistics right after it removes
        it (:meth:`GraphStage.bias_before_batchnorm`).
    """

    def __init__(self, stage: GraphStage, ys: list[torch.Tensor], active: list[bool],
                 mean: Callable[[torch.Tensor], torch.Tensor],
                 sent: list[torch.Tensor | None] | None = None,
                 cancelled: list[bool] | None = None):
        self.stage = stage
        self.sent = sent
        self._kept = None   # [rows, their pull-back] within reusing(rows)
        self.ys = list(ys)
        self.active = active
        self.mean = mean
        self.B = ys[0].shape[0]
        self.U = [p.control() for p in stage.players]
        rec: dict = {}
        with torch.no_grad():
            outs = stage.run(self.ys, self.U, record=rec)
        self.outs = outs
        self.in_shapes = [tuple(y.shape[1:]) for y in ys]
        self.out_shapes = [tuple(y.shape[1:]) for y in outs]
        self.n = sum(y[0].numel() for y in ys)
        self.n1 = sum(y[0].numel() for y in outs)
        self.x_next = outs[0]
        self.X = [stage.unfold(j, rec["x", j]) for j in range(len(stage.players))]
        for j, c in enumerate(cancelled or []):
            if c:   # as StageLinearization(cancelled_bias=True)
                self.X[j] = without_bias_row(self.X[j])
        self.h_shapes = [tuple(rec["h", j].shape[1:]) for j in range(len(stage.players))]
        self._zeros = [torch.zeros_like(rec["h", j]) for j in range(len(stage.players))]
        U = self.U

        def f(ys_, dh):
            return stage.run(ys_, U, dh)
        self._f = f
        _, self._vjp = torch.func.vjp(f, self.ys, self._zeros)
        # Jacobian-vector products as the transpose of the (linear) vjp: one reverse pass
        # each, in autograd's C++ engine (forward-mode AD through BatchNorm and pooling
        # runs Python decompositions: the step measured 1.2-1.7x slower)
        _, self._jvp = torch.func.vjp(self._vjp, [torch.zeros_like(o) for o in outs])

    # -------------------------------------------------------------- layout helpers
    def _split(self, Y: torch.Tensor, shapes) -> list[torch.Tensor]:
        """(B, J, sum n_k) -> per block (B, J, *shape_k)."""
        B, J = Y.shape[:2]
        sizes = [int(torch.Size(s).numel()) for s in shapes]
        return [p.reshape(B, J, *s) for p, s in zip(Y.split(sizes, -1), shapes)]

    @staticmethod
    def _cat(parts: list[torch.Tensor]) -> torch.Tensor:
        """per block (B, J, ...) -> (B, J, sum n_k)."""
        if len(parts) == 1:
            return parts[0].reshape(parts[0].shape[0], parts[0].shape[1], -1)
        return torch.cat([p.reshape(p.shape[0], p.shape[1], -1) for p in parts], -1)

    @contextlib.contextmanager
    def reusing(self, Y: torch.Tensor):
        """Within: the pull-back of the rows ``Y`` (this tensor) is computed once, for
        :meth:`fx_T` and the response's :meth:`factors` alike
        (:meth:`trajopt.riccati.operator.OperatorStage.reusing`)."""
        self._kept = [Y, None]
        try:
            yield
        finally:
            self._kept = None

    def _pull(self, Y: torch.Tensor):
        """The vector-Jacobian product of the stage for J cotangents per sample: the
        cotangents of :math:`y_t` (list) and of the players' pre-activations (list);
        within :meth:`reusing` of ``Y``, computed once."""
        kept = self._kept
        if kept is None or kept[0] is not Y:
            return self._pulled(Y)
        if kept[1] is None:
            kept[1] = self._pulled(Y)
        return kept[1]

    def _pulled(self, Y: torch.Tensor):
        """:meth:`_pull` itself."""
        parts = [p.transpose(0, 1) for p in self._split(Y, self.out_shapes)]   # (J, B, ..)
        if Y.shape[1] == 1:
            gy, gh = self._vjp([p[0] for p in parts])
            return [g.unsqueeze(1) for g in gy], [g.unsqueeze(1) for g in gh]
        gy, gh = torch.func.vmap(self._vjp)(parts)
        return [g.transpose(0, 1) for g in gy], [g.transpose(0, 1) for g in gh]

    # -------------------------------------------------------------- OperatorStage
    def fx_T(self, Y: torch.Tensor) -> torch.Tensor:
        """:math:`F_y^\\top Y`, (B, J, n1) -> (B, J, n)."""
        return self._cat(self._pull(Y)[0])

    @functools.cached_property
    def samplewise(self) -> bool:
        """:math:`F_y` acts sample by sample (:func:`nnbridge.stages.samplewise`).
        Once per linearization: the step asks at its Gram downdate and its feedback."""
        return samplewise(self.stage, self.stage.modules(), self.fx_T, self.B, self.n1,
                          self.x_next)

    @functools.cached_property
    def response_samplewise(self) -> bool:
        """The players' controls act sample by sample: the map from their pre-activations
        to :math:`y_{t+1}` mixes no samples, so the response :math:`f_u^i S f_u^{i\\top}`
        is block diagonal and the kernel may downdate from its Gram matrix in control space
        even where :math:`F_y` mixes the samples (a BatchNorm player after its own
        normalization: the statistics are part of :math:`F_y`; not a layer followed by a
        BatchNorm in the same stage).  Stages acting sample by sample (:attr:`samplewise`)
        qualify; otherwise one pull-back of a cotangent on sample 0 alone must reach
        every active player's sample 0 and no other sample, cached like
        :func:`nnbridge.stages.samplewise` (an inconclusive probe counts as mixing)."""
        if self.samplewise:
            return True
        return controls_samplewise(self.stage, self.stage.modules(),
                                   lambda Y: [g for g, a in zip(self._pull(Y)[1], self.active)
                                              if a],
                                   self.B, self.n1, self.x_next)

    def fx(self, dX: torch.Tensor) -> torch.Tensor:
        """:math:`F_y\\, dY`, (B, n) -> (B, n1)."""
        parts = [p.transpose(0, 1) for p in self._split(dX.unsqueeze(1), self.in_shapes)]
        out = self._jvp_batched(parts, [z.unsqueeze(0) for z in self._zeros])
        return torch.cat([o[0].reshape(self.B, -1) for o in out], -1)

    def factors(self, Y: torch.Tensor) -> list[torch.Tensor | None]:
        """Per player, per-sample cotangent factors ``w_j`` (B, J, out_j, P_j) with
        :math:`f_{w_j}^{i\\top} Y^i = w_j^i \\tilde x_j^{i\\top}` (None: frozen)."""
        gh = self._pull(Y)[1]
        return [p.factor_view(g, lead=2) if a else None
                for p, g, a in zip(self.stage.players, gh, self.active)]

    def from_h(self, D: list[torch.Tensor | None]) -> torch.Tensor:
        """Pre-activation changes (B, J, out_j, P_j) per player -> (B, J, n1)."""
        ref = next(d for d in D if d is not None)
        B, J = ref.shape[:2]
        tj = [torch.zeros(J, B, *s, dtype=ref.dtype, device=ref.device) if d is None
              else d.reshape(B, J, *s).transpose(0, 1) for d, s in zip(D, self.h_shapes)]
        ty = [torch.zeros(J, *y.shape, dtype=y.dtype, device=y.device) for y in self.ys]
        outs = self._jvp_batched(ty, tj)
        return self._cat([o.transpose(0, 1) for o in outs])

    def _jvp_batched(self, ty, th):
        r""":math:`F_y\,t_y + F_h\,t_h` for J tangents (leading dimension J)."""
        if ty[0].shape[0] == 1:
            return [o.unsqueeze(0) for o in
                    self._jvp(([t[0] for t in ty], [t[0] for t in th]))[0]]
        return torch.func.vmap(lambda a, b: self._jvp((a, b))[0])(ty, th)

    def fu_T_mean(self, Y: torch.Tensor) -> Controls:
        """Batch mean of :math:`F_{w_j}^{i\\top} Y^i` per player, (out_j, in'_j)."""
        return [None if w is None else self.mean(outer_sum(w[:, 0], X))
                for w, X in zip(self.factors(Y.unsqueeze(1)), self.X)]

    def value_gradient(self, Vx: torch.Tensor) -> Controls:
        """``fu_T_mean(Vx)``, less the mean control gradient of each player's
        :attr:`sent` cotangents (one product of the difference)."""
        if self.sent is None:
            return self.fu_T_mean(Vx)
        return [None if w is None else self.mean(outer_sum(
            w[:, 0] if s is None else torch.sub(w[:, 0], p.factor_view(s), alpha=self.B),
            X))
            for w, X, s, p in zip(self.factors(Vx.unsqueeze(1)), self.X, self.sent,
                                  self.stage.players)]

    def control_gradient(self, j: int, h_grad: torch.Tensor) -> torch.Tensor:
        """:math:`\\sum_i g^i \\tilde x_j^{i\\top}` for player j's pre-activation
        cotangents (a sum over the local samples)."""
        return outer_sum(self.stage.players[j].factor_view(h_grad), self.X[j])

    def gu(self, j: int, G: torch.Tensor) -> torch.Tensor:
        """Player j's pre-activation change (B, out_j, P_j) for a shared control G."""
        return G @ self.X[j]

    def forward(self, ys: list[torch.Tensor], Us: Controls) -> list[torch.Tensor]:
        """:math:`F_t` at other inputs and controls (None entries: the nominal control)."""
        return self.stage.run(ys, [u if v is None else v for u, v in zip(self.U, Us)])

    def flat(self, ys: list[torch.Tensor]) -> torch.Tensor:
        """:math:`y` as (B, n)."""
        return torch.cat([y.reshape(y.shape[0], -1) for y in ys], -1)


@dataclass(frozen=True)
class BlockDiagonal:
    """The players' curvature with :math:`Q_{uv} = 0` (GT-DDP Table 1 for the first-order
    methods): each player's own :class:`~nnbridge.curvature.Preconditioner`."""

    pres: list[Preconditioner | None]

    def inverse(self, Gs: Controls) -> Controls:
        return [None if p is None else p.inverse(G) for p, G in zip(self.pres, Gs)]

    def value_inverse(self, Gs: Controls) -> Controls:
        return [None if p is None else p.value_inverse(G) for p, G in zip(self.pres, Gs)]

    def per_sample(self, ws, Xs) -> list[torch.Tensor | None]:
        return [None if p is None else p.per_sample(w, X)
                for p, w, X in zip(self.pres, ws, Xs)]

    def gram(self, ws, Xs) -> torch.Tensor:
        """Sum over the players of :meth:`~nnbridge.curvature.Preconditioner.gram`."""
        return sum(p.gram(w, X) for p, w, X in zip(self.pres, ws, Xs) if p is not None)


@dataclass(frozen=True)
class JointDense:
    """The exact joint curvature of a stage's players (the cooperative game with exact
    blocks, Eq. 40 with nothing approximated): one dense matrix over the concatenated
    controls, :class:`~nnbridge.curvature.DensePreconditioner`; ``shapes`` of the
    active players' controls (None: frozen)."""

    dense: DensePreconditioner
    shapes: list[tuple[int, int] | None]

    def _flat(self, Gs, lead: tuple) -> torch.Tensor:
        return torch.cat([G.reshape(*lead, -1) for G in Gs if G is not None], -1)

    def _unflat(self, flat: torch.Tensor, lead: tuple) -> Controls:
        out, off = [], 0
        for s in self.shapes:
            if s is None:
                out.append(None)
                continue
            k = s[0] * s[1]
            out.append(flat[..., off:off + k].reshape(*lead, *s))
            off += k
        return out

    def inverse(self, Gs):
        return self._unflat(self.dense.inverse(self._flat(Gs, ())), ())

    def value_inverse(self, Gs):
        return self._unflat(self.dense.value_inverse(self._flat(Gs, ())), ())

    def per_sample(self, ws, Xs):
        B, J = next(w for w in ws if w is not None).shape[:2]
        G = [None if w is None else torch.einsum("bjop,bip->bjoi", w, X)
             for w, X in zip(ws, Xs)]
        S = self._unflat(self.dense.value_inverse(self._flat(G, (B, J))), (B, J))
        return [None if s is None else torch.einsum("bjoi,bip->bjop", s, X)
                for s, X in zip(S, Xs)]


def joint_exact(lin: GraphLinearization, value, tikhonov: float, hp: dict) -> JointDense:
    r"""Vanilla DDP's curvature of a graph stage: :math:`Q_{ww} = \lambda I +
    \mathbb{E}_i[F_w^{i\top}(V_{yy}'^{\,i} + \epsilon I) F_w^i]` over all active players
    (cross blocks exact), :math:`P = (Q_{ww} + \mu I)/\eta` (small networks: the per-sample
    control Jacobian is formed densely)."""
    cols, shapes = [], []
    B = lin.B
    act = [j for j, a in enumerate(lin.active) if a]
    for j in act:
        if lin.U[j].dim() != 2:
            raise InvalidArgumentError(
                f"curvature='exact' at stage {lin.stage.index}: a grouped convolution's "
                "control has no dense per-sample Jacobian here; use 'ekfac'")
        out, n_in = lin.U[j].shape
        P = lin.X[j].shape[-1]
        # unit controls E_(o,i) -> pre-activation changes E X: (B, out*in', out, P)
        D = torch.zeros(B, out, n_in, out, P, dtype=lin.X[j].dtype, device=lin.X[j].device)
        idx = torch.arange(out)
        D[:, idx, :, idx, :] = lin.X[j].unsqueeze(0).expand(out, B, n_in, P)
        D = D.reshape(B, out * n_in, out, P)
        cols.append(lin.from_h([D if k == j else None for k in range(len(lin.U))]))
    for j in range(len(lin.U)):
        shapes.append(tuple(lin.U[j].shape) if lin.active[j] else None)
    Jt = torch.cat(cols, 1)                                   # (B, m, n1) = F_w'
    VJ = value.hess_apply(Jt, tikhonov)                       # (B, m, n1)
    Q = lin.mean((VJ @ Jt.transpose(1, 2)).sum(0))
    m = Q.shape[0]
    eye = torch.eye(m, dtype=Q.dtype, device=Q.device)
    Q = 0.5 * (Q + Q.T) + hp["weight_decay"] * eye
    L = cholesky_factor(Q + hp["regularization"] * eye,
                        "curvature='exact': Q_ww + regularization * I", lin.stage.index,
                        f"increase regularization (now {hp['regularization']})")
    return JointDense(DensePreconditioner(D=L, Quu=Q, lr=hp["lr"]), shapes)


@dataclass
class GraphResponse:
    """:class:`trajopt.riccati.operator.ControlResponse` of the players' curvature
    ``pre`` (:class:`BlockDiagonal`, :class:`JointDense` or a cooperative Kronecker one)
    on a graph stage; ``lu`` the running-cost gradient per player (None: none)."""

    pre: object
    lin: GraphLinearization
    lu: Controls | None
    #: the step's Q_u and :meth:`apply_total` of it, kept for the calls of the same step
    qu: Controls | None = None
    r_total: torch.Tensor | None = None

    def response(self, Y: torch.Tensor) -> torch.Tensor:
        ws = self.lin.factors(Y)
        if all(w is None for w in ws):
            return torch.zeros_like(Y)
        return self.lin.from_h(self.pre.per_sample(ws, self.lin.X))

    def response_gram(self, Y: torch.Tensor) -> torch.Tensor:
        """:math:`Y^i M^i Y^{i\\top}` (B, J, J) in control space: the players' factors
        against their responses, without the map back to the stage's output."""
        ws = self.lin.factors(Y)
        if all(w is None for w in ws):
            return Y.new_zeros(Y.shape[0], Y.shape[1], Y.shape[1])
        if hasattr(self.pre, "gram"):
            return self.pre.gram(ws, self.lin.X)
        ps = self.pre.per_sample(ws, self.lin.X)
        return sum(response_gram(w, p) for w, p in zip(ws, ps) if w is not None)

    def response_shared(self, Y: torch.Tensor) -> torch.Tensor:
        r"""The batch-augmented form's response :math:`F_w^i S \sum_k F_w^{k\top} Y^k`
        (:mod:`trajopt.riccati.joint`), (B, J, n1) -> (B, J, n1)."""
        ws = self.lin.factors(Y)
        if all(w is None for w in ws):
            return torch.zeros_like(Y)
        G = [None if w is None else outer_sum_rows(w, X) for w, X in zip(ws, self.lin.X)]
        S = self.pre.value_inverse(G)
        return self.lin.from_h([None if s is None else spread(s, X)
                                for s, X in zip(S, self.lin.X)])

    def response_const(self) -> torch.Tensor | None:
        return None if self.lu is None else self.apply_control(self.lu)

    def apply_total(self, G: Controls) -> torch.Tensor:
        if G is self.qu and self.r_total is not None:
            return self.r_total
        r = self.apply_control(G if self.lu is None else [
            g if lu is None else lu if g is None else g + lu for g, lu in zip(G, self.lu)])
        if G is self.qu:
            self.r_total = r
        return r

    def apply_control(self, G: Controls) -> torch.Tensor:
        S = self.pre.value_inverse(G)
        if all(s is None for s in S):
            return self.lin.x_next.new_zeros(self.lin.B, self.lin.n1)
        hs = [None if s is None else self.lin.gu(j, s).unsqueeze(1) for j, s in enumerate(S)]
        return self.lin.from_h(hs).squeeze(1)
