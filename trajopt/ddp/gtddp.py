r"""DDP with residual spans and cooperative-game stages (GT-DDP paper, papers/001, Sec. 3,
App. A) over abstract dynamics.

**Residual spans.**  A :class:`Span` ``(start, end)`` carries :math:`x_r = x_{start}` past
the stages in between and merges it at stage ``end``:

.. math::

    x_{end+1} = f_{end}(x_{end}, u_{end}) + h(x_r, v)

with :math:`h` the identity (``shortcut=None``) or a shortcut map with its own parameters
:math:`v` (``n_params``; they are the last entries of the control of stage ``end``).  For
``start < t <= end`` the value depends on :math:`(x_t, x_r)` (Eq. 8); the backward pass
carries :math:`V_{x x_r}, V_{x_r x_r}` and :math:`V_{x_r}` (Eq. 10, 29-30), the policies
gain the residual feedback :math:`G_t \delta x_r` (Eq. 9, 28), and at ``start`` the value
derivatives are merged (Eq. 11-12, 31-33).  Spans may nest, follow each other, share a
start or an end, and have ``start == end`` (a one-stage residual block).

The recursion is that of DDP on the state augmented with every open residual (Eq. 26), but
the augmented Jacobian is never formed: its residual blocks are identities, so
:math:`Q_{yy} = J^\top V' J` is computed block by block (the carried residuals cost one
copy, not a product), no augmented dynamics are differentiated, and only the state blocks
of the value and the gains are kept per stage.

**Cooperative games.**  A stage's control may be split among players (``players``, and the
shortcut parameters of a merging span are a player of their own, Sec. 3.2).  Each stage's
policy is :func:`trajopt.lqr.game.cooperative_policy`; :meth:`GTDDPSolver.player_curvature`
may replace a player's curvature block by an approximation (exact by default, in which
case the policy equals DDP on the concatenated control).

Everything else -- regularization, line search, convergence tests, per-element batches --
is :class:`~trajopt.ddp.solver.DDPSolver`'s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from torch.func import jacfwd, vmap

from ..errors import InvalidArgumentError, ShapeError
from ..lqr.game import cooperative_policy
from ..lqr.riccati import QExpansion, cholesky_solve, value_update
from .boxqp import box_qp
from .models import _like
from .solver import DDPSolver, _Policy, _Traj

__all__ = ["Span", "GTDDPSolver"]


@dataclass(frozen=True)
class Span:
    """A residual connection: :math:`x_{start}` is added to the output of stage ``end``.

    Attributes
    ----------
    start, end : int
        ``0 <= start <= end < T``; the merge is :math:`x_{end+1} = f_{end}(\\cdot) +
        h(x_{start}, v)`.
    shortcut : callable, optional
        Batched :math:`h(x_r, v)` (``n_params > 0``) or :math:`h(x_r)` (``n_params == 0``)
        returning (..., n_{end+1}); None: the identity (needs equal sizes).
    n_params : int
        Size of the shortcut's parameters :math:`v`, appended to the control of stage
        ``end`` (a second player there).
    """

    start: int
    end: int
    shortcut: Callable | None = None
    n_params: int = 0

    def __post_init__(self):
        if not 0 <= int(self.start) <= int(self.end):
            raise InvalidArgumentError(f"span needs 0 <= start <= end; got ({self.start}, "
                                       f"{self.end})")
        if self.n_params < 0 or (self.n_params and self.shortcut is None):
            raise InvalidArgumentError("span: n_params > 0 needs a shortcut h(x_r, v)")


@dataclass
class _GStage:
    """Derivatives of one stage (flat batch)."""

    fx: torch.Tensor                 # (B, n1, n)
    Fw: torch.Tensor                 # (B, n1, m): [f_u | h_v of merging spans]
    hr: list                         # per merging span: (B, n1, n_r) or None (identity)
    lx: torch.Tensor
    lw: torch.Tensor
    lxx: torch.Tensor
    lww: torch.Tensor
    lwx: torch.Tensor

    def select(self, idx) -> _GStage:
        return _GStage(*(v[idx] for v in (self.fx, self.Fw)),
                       [None if h is None else h[idx] for h in self.hr],
                       *(v[idx] for v in (self.lx, self.lw, self.lxx, self.lww, self.lwx)))


class GTDDPSolver(DDPSolver):
    """iLQR with residual spans and cooperative players; see the module docstring.

    Parameters
    ----------
    dynamics, cost
        As for :class:`DDPSolver`; at a stage where spans with parameters merge, the
        cost sees the whole control (u and the shortcut parameters), the dynamics only u.
    spans : sequence of Span
    players : sequence of int or callable ``t -> sequence of int``, optional
        How the dynamics' control u of each stage is split among players (default: one
        player).  Shortcut parameters are always players of their own.
    **kwargs
        ``mode`` ("ilqr" only), ``max_iter``, ``tol``, ``regularization``,
        ``line_search``, ``callback`` as for :class:`DDPSolver`.
    """

    def __init__(self, dynamics, cost, *, spans: Sequence[Span] = (),
                 players: Sequence[int] | Callable[[int], Sequence[int]] | None = None,
                 **kwargs):
        if kwargs.get("mode", "ilqr") != "ilqr":
            raise InvalidArgumentError("spans and players support mode='ilqr' only (the "
                                       "second-order dynamics terms are not implemented)")
        if kwargs.get("control_limits") is not None and players is not None:
            raise InvalidArgumentError("control_limits are not supported with several "
                                       "players (the cooperative policy has no box QP)")
        super().__init__(dynamics, cost, **kwargs)
        spans = list(spans)
        for i, s in enumerate(spans):
            if not isinstance(s, Span):
                raise TypeError(f"spans[{i}] must be a trajopt.Span; got "
                                f"{type(s).__name__}")
        self.spans = spans
        self.players = players

    # ------------------------------------------------------------------ layout
    def _layout(self, T: int, us: list[torch.Tensor]) -> None:
        for i, s in enumerate(self.spans):
            if s.end >= T:
                raise InvalidArgumentError(f"spans[{i}] = ({s.start}, {s.end}) ends past the "
                                           f"horizon T = {T}")
        self._open = [[s for s in self.spans if s.start < t <= s.end] for t in range(T + 1)]
        self._merging = [[s for s in self.spans if s.end == t] for t in range(T)]
        self._mu_size, self._players = [], []
        for t in range(T):
            npar = sum(s.n_params for s in self._merging[t])
            m = us[t].shape[-1] - npar
            if m < 0:
                raise ShapeError(f"us0[{t}] has {us[t].shape[-1]} entries; the shortcut "
                                 f"parameters merging there need {npar}")
            self._mu_size.append(m)
            if self.players is None:
                base = [m] if m else []
            else:
                base = list(self.players(t) if callable(self.players) else self.players)
                if sum(base) != m or any(p < 1 for p in base):
                    raise ShapeError(f"players at stage {t} = {base} must be positive and "
                                     f"sum to the control size {m}")
            self._players.append(base + [s.n_params for s in self._merging[t]
                                         if s.n_params])

    def _prepare(self, x0, us0):
        out = super()._prepare(x0, us0)
        self._layout(len(out[4]), out[4])
        return out

    # ------------------------------------------------------------------ simulation
    def _merge(self, x_next, t, w, xs):
        off = self._mu_size[t]
        for s in self._merging[t]:
            r = xs[s.start]
            if s.shortcut is None:
                x_next = x_next + r
            elif s.n_params:
                x_next = x_next + s.shortcut(r, w[..., off:off + s.n_params])
                off += s.n_params
            else:
                x_next = x_next + s.shortcut(r)
        return x_next

    def _simulate(self, x, T, control):
        xs, ws = [x], []
        cost = torch.zeros(x.shape[0], dtype=x.dtype, device=x.device)
        for t in range(T):
            w = control(t, x, xs)
            cost = cost + self.cost.running(x, w, t)
            x = self._merge(self.dynamics(x, w[..., :self._mu_size[t]], t), t, w, xs)
            xs.append(x)
            ws.append(w)
        return _Traj(xs, ws, cost + self.cost.terminal(x))

    def rollout(self, x0, us):
        return self._simulate(x0, len(us), lambda t, x, xs: us[t])

    def _dy(self, t, xs, xbar):
        parts = [xs[t] - xbar[t]] + [xs[s.start] - xbar[s.start] for s in self._open[t]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    def forward_pass(self, traj, policy, alpha, lo=None, hi=None):
        if isinstance(alpha, torch.Tensor):
            alpha = alpha.unsqueeze(-1)

        def control(t, x, xs):
            dy = self._dy(t, xs, traj.xs)  # xs = [x_0, ..., x_t]
            u = traj.us[t] + alpha * policy.k[t] + (policy.K[t] @ dy.unsqueeze(-1))[..., 0]
            return u if lo is None else torch.minimum(torch.maximum(u, lo), hi)

        out = self._simulate(traj.xs[0], len(traj.us), control)
        finite = torch.isfinite(out.cost) & torch.stack(
            [torch.isfinite(v).all(-1) for v in out.xs], -1).all(-1)
        cost = torch.where(finite, out.cost, torch.full_like(out.cost, float("inf")))
        return _Traj(out.xs, out.us, cost)

    # ------------------------------------------------------------------ derivatives
    def derivatives(self, traj):
        """Stage derivatives on the flat batch of ``traj``: one vectorized call for all
        stages when the dynamics / cost are time invariant and the shapes uniform (as
        :meth:`DDPSolver.derivatives`), and one per shortcut map for all its spans."""
        T = len(traj.us)
        B = traj.cost.shape[0]
        xs, ws = traj.xs[:-1], traj.us
        us = [w[..., :self._mu_size[t]] for t, w in enumerate(ws)]

        def batched(fn, args_per_stage, time_invariant):
            uniform = all(all(a.shape == b.shape for a, b in zip(args, args_per_stage[0]))
                          for args in args_per_stage)
            if time_invariant and uniform and T > 1:
                flat = [torch.cat(col, 0) for col in zip(*args_per_stage)]
                d = fn(*flat, 0)
                return [type(d)(**{k: None if v is None else v[t * B:(t + 1) * B]
                                   for k, v in vars(d).items()}) for t in range(T)]
            return [fn(*args, t) for t, args in enumerate(args_per_stage)]

        fds = batched(lambda x, u, t: self.dynamics.derivatives(x, u, t),
                      list(zip(xs, us)), self.dynamics.time_invariant)
        cds = batched(self.cost.derivatives, list(zip(xs, ws)), self.cost.time_invariant)
        hd = self._shortcut_derivatives(traj)
        stages = []
        for t in range(T):
            Fw, hr = [fds[t].fu], []
            for s in self._merging[t]:
                jr, jv = hd[(id(s))] if s.shortcut is not None else (None, None)
                hr.append(jr)
                if jv is not None:
                    Fw.append(jv)
            cd = cds[t]
            stages.append(_GStage(fds[t].fx, torch.cat(Fw, -1), hr, cd.lx, cd.lu, cd.lxx,
                                  cd.luu, cd.lux))
        Vx, Vxx = self.cost.terminal_derivatives(traj.xs[-1])
        return stages, Vx, Vxx

    def _shortcut_derivatives(self, traj) -> dict:
        """``{id(span): (h_r, h_v or None)}``, one vmap(jacfwd) per shortcut callable."""
        groups: dict = {}
        for s in self.spans:
            if s.shortcut is not None:
                groups.setdefault((id(s.shortcut), s.n_params), []).append(s)
        out = {}
        for (_, npar), group in groups.items():
            h = group[0].shortcut
            r = torch.cat([traj.xs[s.start] for s in group], 0)
            if npar:
                v = torch.cat([self._params(traj, s) for s in group], 0)
                jr, jv = _like(vmap(jacfwd(h, argnums=(0, 1)))(r, v), r)
            else:
                jr, jv = _like((vmap(jacfwd(h))(r),), r)[0], None
            B = traj.xs[0].shape[0]
            for i, s in enumerate(group):
                out[id(s)] = (jr[i * B:(i + 1) * B],
                              None if jv is None else jv[i * B:(i + 1) * B])
        return out

    def _params(self, traj, span: Span) -> torch.Tensor:
        """The shortcut parameters v of ``span`` in the control of its merge stage."""
        t = span.end
        off = self._mu_size[t]
        for s in self._merging[t]:
            if s is span:
                return traj.us[t][..., off:off + s.n_params]
            off += s.n_params
        raise AssertionError("span not merging at its end stage")

    def player_curvature(self, t: int, i: int, block: torch.Tensor) -> torch.Tensor | None:
        """Approximation of player ``i``'s curvature block ``block`` (B, m_i, m_i) at stage
        ``t``; None (default): the exact block.  Override for approximate players."""
        return None

    # ------------------------------------------------------------------ backward pass
    def _slices(self, t: int, n: int, dims: dict) -> dict:
        """Offsets of y_t = [x_t, residuals of the spans open at t]."""
        out, off = {"x": slice(0, n)}, n
        for s in self._open[t]:
            out[id(s)] = slice(off, off + dims[id(s)])
            off += dims[id(s)]
        out["size"] = off
        return out

    def backward_pass(self, stages, Vx, Vxx, mu, traj, lo=None, hi=None, k_warm=None):
        T = len(stages)
        B = mu.shape[0]
        dims = {id(s): traj.xs[s.start].shape[-1] for s in self.spans}
        ok = torch.ones(B, dtype=torch.bool, device=mu.device)
        Ks, ks = [None] * T, [None] * T
        Vxs, Vxxs = [None] * (T + 1), [None] * (T + 1)
        Vxs[T], Vxxs[T] = Vx, Vxx
        V, VV = Vx, Vxx  # over y_{T} = [x_T] (no span is open after the last stage)
        dV = torch.zeros(B, 2, dtype=mu.dtype, device=mu.device)
        for t in range(T - 1, -1, -1):
            st = stages[t]
            n, n1 = st.fx.shape[-1], st.fx.shape[-2]
            yi, yo = self._slices(t, n, dims), self._slices(t + 1, n1, dims)
            # the structured Jacobian d y_{t+1} / d y_t, grouped by input block:
            # {in slice: [(out slice, matrix or None = identity), ...]}
            J: dict = {"x": [(yo["x"], st.fx)]}
            for s, h in zip(self._merging[t], st.hr):
                J.setdefault("x" if s.start == t else id(s), []).append((yo["x"], h))
            for s in self._open[t + 1]:
                J.setdefault("x" if s.start == t else id(s), []).append((yo[id(s)], None))
            # every input block feeds something: x feeds x_{t+1}, an open residual is
            # carried or merged
            blocks = [J["x"]] + [J[id(s)] for s in self._open[t]]
            # A = V' J, g = J' V_x', Qyy = J' V' J, block by block (identities are copies)
            A = torch.cat([_sum(VV[:, :, o] if M is None else VV[:, :, o] @ M
                                for o, M in blk) for blk in blocks], -1)
            g = torch.cat([_sum(V[:, o] if M is None else (V[:, o].unsqueeze(-2) @ M)[:, 0]
                                for o, M in blk) for blk in blocks], -1)
            Qyy = torch.cat([_sum(A[:, o, :] if M is None else M.transpose(-1, -2) @ A[:, o, :]
                                  for o, M in blk) for blk in blocks], -2)
            xo = yo["x"]
            FwT = st.Fw.transpose(-1, -2)
            Qw = st.lw + (FwT @ V[:, xo].unsqueeze(-1))[..., 0]
            Qwy = FwT @ A[:, xo, :]
            Qww = st.lww + FwT @ VV[:, xo, xo] @ st.Fw
            xs_ = yi["x"]
            g[:, xs_] += st.lx
            Qyy[:, xs_, xs_] += st.lxx
            Qwy[:, :, xs_] += st.lwx
            sizes = self._players[t]
            approx = None
            if type(self).player_curvature is not GTDDPSolver.player_curvature:
                approx = [self.player_curvature(t, i, blk) for i, blk in
                          enumerate(_diag_blocks(Qww, sizes))]
            if lo is not None:  # box limits (one player): DDPSolver's box QP
                m = Qww.shape[-1]
                H = Qww + mu[:, None, None] * torch.eye(m, dtype=mu.dtype, device=mu.device)
                u = traj.us[t]
                res = box_qp(H, Qw, lo - u, hi - u, None if k_warm is None else k_warm[t])
                ok = ok & ~res.failed
                k = res.x
                rhs = torch.where(res.clamped.unsqueeze(-1), torch.zeros_like(Qwy), Qwy)
                K = -cholesky_solve(rhs, res.factor)
            else:
                # non-finite gains show up in dV (checked below), as in DDPSolver
                pol = cooperative_policy(Qw, Qwy, Qww, sizes, approx=approx, reg=mu,
                                         check_finite=False)
                ok = ok & pol.ok
                K, k = pol.K, pol.k
            step = value_update(QExpansion(Qx=g, Qu=Qw, Qxx=Qyy, Qux=Qwy, Quu=Qww),
                                K, k, exact_policy=False)
            V, VV = step.Vx, step.Vxx
            dV = dV + step.expected_change()
            Ks[t], ks[t] = K, k
            Vxs[t], Vxxs[t] = V[:, xs_], VV[:, xs_, xs_]
        return _Policy(Ks, ks, Vxs, Vxxs, dV, ok & torch.isfinite(dV).all(-1))


def _sum(terms):
    it = iter(terms)
    out = next(it)
    for v in it:
        out = out + v
    return out


def _diag_blocks(Qww: torch.Tensor, sizes: Sequence[int]) -> list[torch.Tensor]:
    out, a = [], 0
    for s in sizes:
        out.append(Qww[:, a:a + s, a:a + s])
        a += s
    return out
