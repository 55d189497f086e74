r"""GT-DDP-EKFAC: the Kronecker curvature of a cooperative game between the players of
one stage (GT-DDP paper, Sec. 4.1 Theorem 3, Sec. 6 Corollary 7, App. B.2-B.3).

The k players of a stage (the layer and its projection shortcut, parallel branches)
have controls :math:`\tilde U_j = [W_j \mid b_j]` (out_j, in'_j).  Written as one
augmented layer (Eq. 49)

.. math::

    \begin{bmatrix} h_1 \\ \vdots \\ h_k \end{bmatrix}
    = \underbrace{\begin{bmatrix} \tilde U_1 & & 0 \\ & \ddots & \\ 0 & & \tilde U_k
      \end{bmatrix}}_{\tilde W}
      \underbrace{\begin{bmatrix} \tilde x_1 \\ \vdots \\ \tilde x_k \end{bmatrix}}_{a},
    \qquad g = \begin{bmatrix} w_1 \\ \vdots \\ w_k \end{bmatrix}
    \;(w_j = V_{h_j}),

the Kronecker model of the augmented control :math:`\tilde W` (sum out, sum in') is
:math:`Q_{\tilde W \tilde W} \approx A_{ww} \otimes B_{ww}` with the joint factors
(Eq. 50)

.. math::

    A_{ww} = \mathbb{E}[a a^\top] = [A_{jl}] = [\mathbb{E}[\tilde x_j \tilde x_l^\top]],
    \qquad
    B_{ww} = \mathbb{E}[g g^\top] = [B_{jl}] = [\mathbb{E}[w_j w_l^\top]].

Only the diagonal blocks :math:`\tilde U_j` of :math:`\tilde W` are parameters; the
off-diagonal ("fictitious") blocks have zero gradient.  The cooperative update of
Theorem 3 (Eq. 52) is the preconditioned joint gradient restricted to the real blocks,

.. math::

    \delta \tilde U_j = -\big[B_{ww}^{-1}\, M\, A_{ww}^{-1}\big]_{jj},
    \qquad M = \mathrm{blockdiag}(G_1, \dots, G_k),

whose diagonal blocks are Eq. 16-18: with two players u, v,
:math:`[B_{ww}^{-1} M A_{ww}^{-1}]_{uu} = \tilde B_{uu}^{-1}(G_u + B_{uv} B_{vv}^{-1}
G_v A_{vv}^{-1} A_{vu}) \tilde A_{uu}^{-1}` with the Schur complements
:math:`\tilde A_{uu} = A_{uu} - A_{uv} A_{vv}^{-1} A_{vu}`,
:math:`\tilde B_{uu} = B_{uu} - B_{uv} B_{vv}^{-1} B_{vu}` (re-derived in
``docs/gtekfac.md``; the plus sign comes from the two off-diagonal blocks of the
inverses, each negative).

:class:`CooperativeEKFAC` is EKFAC (George et al. 2018) on that augmented layer: the
joint factors are running averages, their eigenbases :math:`Q_A, Q_G` are refreshed
every ``update_freq`` steps, and the Kronecker eigenvalues are replaced by the running
mean :math:`S` of the squared per-sample joint gradients
:math:`\mathrm{blockdiag}(w_1^i \tilde x_1^{i\top}, \dots, w_k^i \tilde x_k^{i\top})`
in that basis, so

.. math::

    P^{-1}[G_1, \dots, G_k] = \eta\,\Big[Q_G \big[(Q_G^\top M Q_A) \oslash
    (S + \epsilon)\big] Q_A^\top\Big]_{jj}, \quad j = 1..k.

With :math:`S` the Kronecker eigenvalues (:math:`\lambda^G \lambda^{A\top}`) and
:math:`\epsilon = 0` this is Theorem 3 exactly; with k = 1 it is
:class:`nnbridge.curvature.EKFAC`, number for number.  Damping: :math:`\epsilon` is
added to every joint eigenvalue, i.e. to :math:`A_{ww} \otimes B_{ww}` including its
fictitious blocks (the model's :math:`(A_{ww} \otimes B_{ww} + \epsilon I)^{-1}`
restricted to the real blocks), not to the real blocks only as in Corollary 7; see
:class:`CooperativeEKFAC` (Notes) and ``docs/gtekfac.md`` for how the two differ.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from trajopt.errors import InvalidArgumentError, ShapeError

from .curvature import EKFAC, _moment
from .eigenbasis import eigenbasis

__all__ = ["CooperativeEKFAC", "CooperativePreconditioner", "can_cooperate"]

State = dict[str, Any]
Blocks = tuple  # per player (out_j, in'_j), or None for a frozen player

_EKFAC = EKFAC()


def _offsets(sizes: Sequence[int]) -> list[slice]:
    out, o = [], 0
    for s in sizes:
        out.append(slice(o, o + s))
        o += s
    return out


def _norm_blocks(blocks) -> Blocks:
    return tuple(None if b is None else (int(b[0]), int(b[1])) for b in blocks)


def can_cooperate(Xs: Sequence[torch.Tensor | None],
                  active: Sequence[bool] | None = None) -> bool:
    """Whether the active players of a stage can share one :class:`CooperativeEKFAC`:
    at least one active player, and all of them with the same number of positions P
    (the joint factor :math:`\\mathbb{E}[a a^\\top]` pairs player j's position p with
    player l's position p).

    Parameters
    ----------
    Xs : list of Tensor or None
        Per player the unfolded bias-augmented input (B, in'_j, P_j).
    active : list of bool, optional
        Per player: its control is optimized (default: ``Xs[j] is not None``).

    Returns
    -------
    bool
        False: use per-player EKFAC (:class:`nnbridge.graph_ops.BlockDiagonal`).
    """
    if active is None:
        active = [X is not None for X in Xs]
    act = [X for X, a in zip(Xs, active) if a]
    if not act or any(X is None or X.dim() != 3 for X in act):
        return False
    return len({(X.shape[0], X.shape[-1]) for X in act}) == 1


def _breaker(M: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    r"""The tie-breaker of a joint factor ``M`` (``sizes``: the players' blocks) for
    :func:`nnbridge.eigenbasis.eigenbasis`: inside each repeated eigenvalue of M the
    basis is made the one that diagonalizes :math:`T = \mathrm{blockdiag}_j(j\,
    M_{jj})` there (j = 1..k), and where T does not separate it, the coordinates.

    A joint factor has repeated eigenvalues by construction: the players of a merge by a
    sum share their output cotangent, so :math:`B_{ww} = \mathbf{1}\mathbf{1}^\top
    \otimes B` (a null space of the output's size: ``l3(x3) + p(x2)``, a projection
    shortcut), biased players share the constant input (a (k-1)-dimensional null space
    of :math:`A_{ww}`), and a batch smaller than the factor leaves a null space.  There
    ``eigh``'s basis is rounding's choice (the order of the samples, the ranks'
    all-reduce), and the re-estimated S depends on it, because the real blocks'
    per-sample gradients do not vanish there: one step of GT-EKFAC on two ranks differed
    from one process by 0.3.  T depends on the statistics only (not on their order)
    and is generic on those null spaces: on :math:`\mathbf{1}\mathbf{1}^\top \otimes B`'s
    it is :math:`\sum_j j\, v_j^\top B v_j` (:math:`\sum_j v_j \in \mathrm{null}\,B`),
    on the biases' :math:`\sum_j j\, c_j^2` (:math:`\sum_j c_j = 0`), with distinct
    eigenvalues (interlacing).  Where T is zero, every player's own factor is: a
    player's own null space (its batch smaller than its inputs), whose basis the
    coordinates fix, as for EKFAC (:mod:`nnbridge.eigenbasis`)."""
    return torch.block_diag(*[(j + 1) * M[s, s] for j, s in enumerate(_offsets(sizes))])


class CooperativeEKFAC:
    r"""EKFAC on the augmented layer of a stage's k >= 1 players (Theorem 3 with the
    eigenvalue correction; module docstring).

    A functional kernel like :class:`nnbridge.curvature.Curvature`, but over LISTS, one
    entry per player of the stage (None: a frozen player, not part of the joint model).
    Hyper-parameters and defaults are :class:`nnbridge.curvature.EKFAC`'s: ``lr``
    (:math:`\eta`), ``eps`` (damping :math:`\epsilon`, added to the joint eigenvalues),
    ``alpha`` (running-average factor), ``update_freq`` (steps between eigenbasis
    refreshes), ``weight_decay`` (applied by the optimizer through :math:`l_u`).

    State (one dict per group of players): ``A`` (sum in', sum in') and ``G``
    (sum out, sum out) the joint factors :math:`A_{ww}, B_{ww}`; ``QA``, ``QG`` their
    eigenbases; ``S`` (sum out, sum in') the eigenvalue re-estimate; ``blocks`` the
    per-player control shapes (None: frozen) the statistics belong to.  With k = 1 the
    tensors are :class:`~nnbridge.curvature.EKFAC`'s.

    Notes
    -----
    Damping.  :math:`\epsilon` is added to the joint eigenvalues, i.e. the model is
    :math:`(A_{ww} \otimes B_{ww} + \epsilon I)^{-1}` (S the Kronecker eigenvalues)
    over the whole augmented :math:`\tilde W`, fictitious blocks included.  Corollary 7
    damps the real blocks only.  On Fig. 7a's module (two players with the same input
    and the same output derivative, Eq. 56; :math:`K = A \otimes B` the single layer's
    factors, vec column-major) the two differ as follows.  The joint factors are
    :math:`\mathbf{1}\mathbf{1}^\top \otimes A` and
    :math:`\mathbf{1}\mathbf{1}^\top \otimes B` (:math:`\mathbf{1} \in \mathbb{R}^2`),
    so over the four blocks uu, uv, vu, vv of :math:`\tilde W` the model is
    :math:`\mathbf{1}_4\mathbf{1}_4^\top \otimes K`: eigenvalue :math:`4\lambda` on
    the all-equal direction, 0 on the three others.  The joint gradient
    :math:`(G, 0, 0, G)` has half its weight on the null directions, and

    .. math::

        P^{-1}[G, G]_u = \tfrac12 (4K + \epsilon I)^{-1} G + \tfrac{1}{2\epsilon} G
        = \tfrac14 (2K + \tfrac{\epsilon}{2} I)^{-1} G + \tfrac{1}{2\epsilon} G
        \quad (\eta = 1),

    while Corollary 7 (:math:`Q_{uu} = Q_{vv} = K + \gamma I`, :math:`Q_{uv} = K`) gives
    :math:`\tilde Q_{uu} = U \mathrm{diag}(\gamma + \lambda - \lambda^2/(\gamma +
    \lambda)) U^\top` (Eq. 57-58) and the cooperative update (Eq. 40a)
    :math:`\tilde Q_{uu}^{-1}(Q_u - Q_{uv} Q_{vv}^{-1} Q_v) = (2K + \gamma I)^{-1} G`.
    So ours is a quarter of Corollary 7's with :math:`\gamma = \epsilon / 2`, plus a
    plain gradient step :math:`G / (2\epsilon)` along the null directions.  With the
    re-estimated S those directions get the second moments of the real per-sample
    gradients (not 0): the update is the mean of two EKFAC steps of the single layer,
    one in the eigenbasis of (A, B) and one in the basis of the joint factors' null
    spaces (which :func:`_breaker` fixes: eigh's would be rounding's choice).  Both
    relations are tests (``tests/nnbridge/test_cooperative.py``).

    Biased players.  Every player's :math:`\tilde x_j` ends with the constant 1, so k
    biased players make :math:`A_{ww}` singular (a (k-1)-dimensional null space; Fig.
    7a's module makes both factors singular).  The undamped Theorem 3 form (Eq. 16-18)
    does not exist then; with :math:`\epsilon > 0` and the re-estimated S it is well
    defined (S on those directions is the second moment of the per-sample joint
    gradients there, not 0).  S depends on the basis inside a repeated eigenvalue (that
    null space for k >= 3; the output's null space of players whose outputs are added;
    a batch smaller than the joint factor), where eigh's basis is rounding's choice: the
    eigenbases are fixed there by :func:`_breaker`, so that the step does not depend on
    the order of the samples or on how the batch is split over ranks; inside a player's
    own null space (its factor rank deficient) the coordinates fix it, as for EKFAC
    (:mod:`nnbridge.eigenbasis`).

    Examples
    --------
    One step of a stage whose players all share P (:func:`can_cooperate`), in the
    optimizer's backward pass and forward pass::

        coop = CooperativeEKFAC()
        st = coop.update(st, gs, hp, step, ws, Xs, mean)    # gs, ws, Xs: per player
        pre = coop.preconditioner(st, hp, step)             # the stage's Q_ww plug
        du = coop.open_loop(st, gs, hp, step, pre)          # -P^{-1} g per player
        fb = pre.inverse(feedback)                           # P^{-1} E[Q_wy dy]
    """

    name = "gtekfac"
    defaults = dict(EKFAC.defaults)
    needs_factors = True

    def validate(self, hp: dict) -> None:
        """EKFAC's checks (lr, eps, weight_decay >= 0, 0 <= alpha < 1, integer
        update_freq >= 1)."""
        _EKFAC.validate(hp)

    # ------------------------------------------------------------------ statistics
    def update(self, st: State, gs: Sequence[torch.Tensor | None], hp: dict, step: int,
               ws: Sequence[torch.Tensor | None], Xs: Sequence[torch.Tensor | None],
               mean: Callable[[torch.Tensor], torch.Tensor] | None = None) -> State:
        r"""New joint statistics (out of place: ``st`` is not modified).

        Parameters
        ----------
        st : dict
            The group's state ({} at the first step).  If its ``blocks`` differ from the
            players' now (a player frozen or unfrozen, a shape changed), the statistics
            restart from this batch.
        gs : list of Tensor or None
            Per player the batch-mean gradient (out_j, in'_j) (unused, as in EKFAC; kept
            for the curvature interface).
        hp : dict
            Hyper-parameters (``alpha``, ``update_freq``).
        step : int
            Step count from 1; the eigenbases are refreshed when
            ``(step - 1) % update_freq == 0`` (and on the first call).
        ws : list of Tensor or None
            Per player the per-sample cotangents at the pre-activation, (B, out_j, P) or
            (B, 1, out_j, P); None: a frozen player.
        Xs : list of Tensor or None
            Per player the unfolded bias-augmented input (B, in'_j, P); entries of frozen
            players are ignored.  All active players share B and P
            (:func:`can_cooperate`).
        mean : callable, optional
            Turns a sum over the local samples into the batch mean (default: divide by
            B; :class:`nnbridge.distributed.BatchMean` across ranks).

        Returns
        -------
        dict
            The new state: :math:`A_{ww} \leftarrow \alpha A_{ww} + (1-\alpha)
            \mathbb{E}[a a^\top]/P`, :math:`B_{ww}` likewise with :math:`g` (Eq. 50,
            positions summed and divided by P as in EKFAC), the eigenbases, and
            :math:`S = \mathbb{E}_i[(Q_G^\top J^i Q_A)^{\odot 2}]` with
            :math:`J^i = \mathrm{blockdiag}_j(\sum_p w_{j,p}^i \tilde x_{j,p}^{i\top})`
            (reset on a refresh, else averaged with ``alpha``).
        """
        if len(ws) != len(Xs):
            raise ShapeError(f"ws and Xs: one entry per player (got {len(ws)} and "
                             f"{len(Xs)})")
        act = [j for j, w in enumerate(ws) if w is not None]
        if not act:
            raise InvalidArgumentError("CooperativeEKFAC.update: no active player (every "
                                       "entry of ws is None)")
        B, P = Xs[act[0]].shape[0], Xs[act[0]].shape[-1]
        W, X, blocks = [], [], [None] * len(ws)
        for j in act:
            Xj, wj = Xs[j], ws[j]
            if Xj is None or Xj.dim() != 3 or Xj.shape[0] != B or Xj.shape[-1] != P:
                raise ShapeError(
                    f"Xs[{j}]: the players of a cooperative group share B and the number "
                    f"of positions P (player {act[0]}: B={B}, P={P}; player {j}: "
                    f"{None if Xj is None else tuple(Xj.shape)}); use per-player EKFAC "
                    f"for players with different P (can_cooperate)")
            if wj.shape[0] != B or wj.shape[-1] != P:
                raise ShapeError(f"ws[{j}]: expected (B={B}, [1,] out, P={P}), got "
                                 f"{tuple(wj.shape)}")
            W.append(wj.reshape(B, wj.shape[-2], P))
            X.append(Xj)
            blocks[j] = (W[-1].shape[1], Xj.shape[1])
        blocks = _norm_blocks(blocks)
        if st.get("blocks") is not None and _norm_blocks(st["blocks"]) != blocks:
            st = {}
        st = dict(st)
        st["blocks"] = blocks
        a = hp["alpha"]
        if mean is None:
            def mean(local_sum):
                return local_sum / B
        Xc, Wc = torch.cat(X, 1), torch.cat(W, 1)
        st["A"] = _moment(st.get("A"), mean(torch.einsum("bip,bjp->ij", Xc, Xc)) / P, a)
        st["G"] = _moment(st.get("G"), mean(torch.einsum("bop,bqp->oq", Wc, Wc)) / P, a)
        # as EKFAC's: also at the step after one whose feedback overshot (closed_loop)
        stale = st.pop("stale", False)
        fresh = "QA" not in st or (step - 1) % int(hp["update_freq"]) == 0 or stale
        if fresh:
            # inside a repeated eigenvalue eigh's basis is rounding's choice (the order
            # of the samples, the ranks' all-reduce) and S depends on it (_breaker);
            # one player: EKFAC's, bit for bit
            joint = len(act) > 1
            st["QA"] = eigenbasis(st["A"], [_breaker(st["A"], [x.shape[1] for x in X])]
                                  if joint else ())
            st["QG"] = eigenbasis(st["G"], [_breaker(st["G"], [w.shape[1] for w in W])]
                                  if joint else ())
        st["refreshed"] = fresh
        QGs = [st["QG"][r] for r in _offsets([w.shape[1] for w in W])]
        QAs = [st["QA"][c] for c in _offsets([x.shape[1] for x in X])]
        if P == 1:
            # rotated per-sample joint gradient: sum_j a_j b_j' with a_j = QG_j' w_j,
            # b_j = QA_j' x_j, so its square is sum_{j,l} (a_j a_l)(b_j b_l)' -- k^2
            # (out, B) @ (B, in') products, no (B, out, in') tensor (k = 1: EKFAC's).
            aj = [w[..., 0] @ q for w, q in zip(W, QGs)]
            bj = [x[..., 0] @ q for x, q in zip(X, QAs)]
            pairs = [(j, m) for j in range(len(aj)) for m in range(j, len(aj))]
            lhs = [aj[j] ** 2 if j == m else (2 * aj[j]) * aj[m] for j, m in pairs]
            rhs = [bj[j] ** 2 if j == m else bj[j] * bj[m] for j, m in pairs]
            s = mean(torch.cat(lhs, 0).transpose(0, 1) @ torch.cat(rhs, 0))
        else:
            R = None
            for w, x, qg, qa in zip(W, X, QGs, QAs):
                Gi = torch.einsum("bop,bip->boi", w, x)
                r = qg.transpose(-1, -2) @ Gi @ qa
                R = r if R is None else R + r
            s = mean((R ** 2).sum(0))
        st["S"] = s if fresh else _moment(st["S"], s, a)
        return st

    # ------------------------------------------------------------------ P^{-1}
    def scale(self, st: State, hp: dict, step: int) -> torch.Tensor:
        r""":math:`D = \eta / (S + \epsilon)` (sum out, sum in')."""
        return hp["lr"] / (st["S"] + hp["eps"])

    def rotations(self, st: State) -> tuple[torch.Tensor, torch.Tensor]:
        """The joint eigenbases ``(QG, QA)``."""
        return st["QG"], st["QA"]

    def preconditioner(self, st: State, hp: dict, step: int) -> CooperativePreconditioner:
        """:math:`P^{-1}` of the (updated) state, computed once per step and stage."""
        QG, QA = self.rotations(st)
        return CooperativePreconditioner(self.scale(st, hp, step), QG, QA,
                                         _norm_blocks(st["blocks"]))

    def direction(self, st: State, gs: Sequence[torch.Tensor | None], hp: dict,
                  step: int) -> list[torch.Tensor | None]:
        """The gradients themselves (EKFAC has no momentum)."""
        return list(gs)

    def open_loop(self, st: State, gs: Sequence[torch.Tensor | None], hp: dict, step: int,
                  pre: CooperativePreconditioner) -> list[torch.Tensor | None]:
        r"""The cooperative open-loop update :math:`-P^{-1} g` per player (Eq. 18 with
        the eigenvalue correction); None for frozen players."""
        return [None if d is None else -d for d in pre.inverse(self.direction(st, gs, hp,
                                                                               step))]


@dataclass(frozen=True)
class CooperativePreconditioner:
    r"""The joint preconditioner of a cooperative group (the interface of
    :class:`nnbridge.graph_ops.BlockDiagonal`: lists, one entry per player, None for a
    frozen player):

    .. math::

        P^{-1}[G_1..G_k]_j = Q_{G,j}\Big[\Big(\sum_l Q_{G,l}^\top G_l Q_{A,l}\Big)
        \odot D\Big] Q_{A,j}^\top,

    :math:`Q_{G,j}` (out_j, sum out) and :math:`Q_{A,j}` (in'_j, sum in') the rows of
    the joint eigenbases belonging to player j; this is
    :math:`[Q_G ((Q_G^\top M Q_A) \odot D) Q_A^\top]_{jj}` with
    :math:`M = \mathrm{blockdiag}(G_l)` without forming M.

    Attributes
    ----------
    D : Tensor (sum out, sum in')
        :math:`\eta / (S + \epsilon)`.
    QG : Tensor (sum out, sum out)
    QA : Tensor (sum in', sum in')
    blocks : tuple
        Per player (out_j, in'_j), or None (frozen).
    """

    D: torch.Tensor
    QG: torch.Tensor
    QA: torch.Tensor
    blocks: Blocks

    def _split(self):
        act = [j for j, b in enumerate(self.blocks) if b is not None]
        rows = _offsets([self.blocks[j][0] for j in act])
        cols = _offsets([self.blocks[j][1] for j in act])
        return act, [self.QG[r] for r in rows], [self.QA[c] for c in cols]

    def _check(self, items, what: str) -> None:
        if len(items) != len(self.blocks):
            raise ShapeError(f"{what}: one entry per player ({len(self.blocks)}), got "
                             f"{len(items)}")
        for j, (x, b) in enumerate(zip(items, self.blocks)):
            if (x is None) != (b is None):
                raise InvalidArgumentError(
                    f"{what}[{j}] is {'None' if x is None else 'given'} but player {j} is "
                    f"{'active' if b is not None else 'frozen'} in the cooperative state")

    def inverse(self, Gs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """:math:`P^{-1}` per player; ``Gs[j]`` (..., out_j, in'_j) (leading dimensions
        broadcast), None for a frozen player."""
        self._check(Gs, "Gs")
        act, QGs, QAs = self._split()
        R = None
        for j, qg, qa in zip(act, QGs, QAs):
            r = qg.transpose(-1, -2) @ Gs[j] @ qa
            R = r if R is None else R + r
        Z = R * self.D
        out: list[torch.Tensor | None] = [None] * len(self.blocks)
        for j, qg, qa in zip(act, QGs, QAs):
            out[j] = qg @ Z @ qa.transpose(-1, -2)
        return out

    def value_inverse(self, Gs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """= :meth:`inverse` (the curvature model is its own :math:`Q_{ww}`)."""
        return self.inverse(Gs)

    def per_sample(self, ws: Sequence[torch.Tensor | None],
                   Xs: Sequence[torch.Tensor | None]) -> list[torch.Tensor | None]:
        r""":math:`[P^{-1} J^i]_j\, \tilde x_j^i` per player for the per-sample joint
        gradients :math:`J^i = \mathrm{blockdiag}_l(w_l^i \tilde x_l^{i\top})` (one per
        sample and column).

        Parameters
        ----------
        ws : list of Tensor or None
            Per player (B, J, out_j, P); None: frozen.
        Xs : list of Tensor or None
            Per player (B, in'_j, P) (entries of frozen players ignored).

        Returns
        -------
        list of Tensor or None
            Per player (B, J, out_j, P).  For P = 1 (Linear) the rank-one closed form
            :math:`Q_{G,j}\sum_l a_l \odot (D (c_l \odot c_j))` with
            :math:`a_l = Q_{G,l}^\top w_l`, :math:`c_l = Q_{A,l}^\top \tilde x_l` (no
            (B, J, out, in') tensor; k = 1: :class:`~nnbridge.curvature.Preconditioner`'s).
        """
        self._check(ws, "ws")
        act, QGs, QAs = self._split()
        out: list[torch.Tensor | None] = [None] * len(self.blocks)
        if Xs[act[0]].shape[-1] == 1:
            a = [ws[j][..., 0] @ qg for j, qg in zip(act, QGs)]          # (B, J, sum out)
            c = [Xs[j][..., 0] @ qa for j, qa in zip(act, QAs)]          # (B, sum in')
            Dt = self.D.transpose(-1, -2)
            for m, (j, qg) in enumerate(zip(act, QGs)):
                res = None
                for n in range(len(act)):
                    e = (c[n] * c[m]) @ Dt                                  # (B, sum out)
                    r = a[n] * e.unsqueeze(1)
                    res = r if res is None else res + r
                out[j] = (res @ qg.transpose(-1, -2)).unsqueeze(-1)
            return out
        G = [None] * len(self.blocks)
        for j in act:
            G[j] = torch.einsum("bjop,bip->bjoi", ws[j], Xs[j])
        S = self.value_inverse(G)
        for j in act:
            out[j] = torch.einsum("bjoi,bip->bjop", S[j], Xs[j])
        return out

