r"""Residual spans (GT-DDP paper, papers/001, Sec. 3, App. A) as a problem structure for
the DDP loop.

A :class:`Span` ``(start, end)`` carries :math:`x_r = x_{start}` past the stages in
between and merges it at stage ``end``:

.. math::

    x_{end+1} = f_{end}(x_{end}, u_{end}) + h(x_r, v)

with :math:`h` the identity (``shortcut=None``) or a shortcut map with its own parameters
:math:`v` (``n_params``; they are the last entries of the control of stage ``end``).  For
``start < t <= end`` the value depends on :math:`(x_t, x_r)` (Eq. 8); the feedback acts
on :math:`[\delta x_t, \delta x_r]` (Eq. 9, 28).  :class:`SpanChain` simulates this
structure and hands the kernel :class:`~trajopt.riccati.spans.SpanStage` expansions,
whose identity blocks are copies (the augmented Jacobian of Eq. 26 is never formed).
Spans may nest, follow each other, share a start or an end, and have
``start == end``.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.func import jacfwd, vmap

from ..errors import InvalidArgumentError, ShapeError
from ..riccati.spans import SpanStage
from .batch import Traj
from .chain import Chain
from .models import Cost, Dynamics, _like

__all__ = ["Span", "SpanChain"]


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
        for name in ("start", "end", "n_params"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)):
                raise InvalidArgumentError(f"span {name} must be an integer; got {v!r}")
        if not 0 <= int(self.start) <= int(self.end):
            raise InvalidArgumentError(f"span needs 0 <= start <= end; got ({self.start}, "
                                       f"{self.end})")
        if self.n_params < 0 or (self.n_params and self.shortcut is None):
            raise InvalidArgumentError("span: n_params > 0 needs a shortcut h(x_r, v)")


class SpanChain(Chain):
    """A chain with residual spans and a split of each stage's control among players.

    Parameters
    ----------
    dynamics, cost
        At a stage where spans with parameters merge, the cost sees the whole control
        (u and the shortcut parameters), the dynamics only u.
    spans : sequence of Span
    players : sequence of int or callable ``t -> sequence of int``, optional
        How the dynamics' control u of each stage is split among players (default: one
        player).  Shortcut parameters are always players of their own.
    """

    def __init__(self, dynamics: Dynamics, cost: Cost, spans: Sequence[Span] = (),
                 players: Sequence[int] | Callable[[int], Sequence[int]] | None = None):
        super().__init__(dynamics, cost)
        spans = list(spans)
        for i, s in enumerate(spans):
            if not isinstance(s, Span):
                raise TypeError(f"spans[{i}] must be a trajopt.Span; got "
                                f"{type(s).__name__}")
        self.spans = spans
        self.player_split = players
        self._open: list[list[Span]] = []
        self._merging: list[list[Span]] = []
        self._mu_size: list[int] = []
        self._players: list[list[int]] = []

    # ------------------------------------------------------------------ layout
    def setup(self, us: Sequence[torch.Tensor]) -> None:
        T = len(us)
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
                                 f"parameters merging there need {npar}, after the stage's "
                                 f"own controls: give stage {t} m + {npar} entries (us0 as a "
                                 f"list of per-stage controls, docs/gtddp.md)")
            self._mu_size.append(m)
            split = self.player_split
            if split is None:
                base = [m] if m else []
            else:
                base = list(split(t) if callable(split) else split)
                if sum(base) != m or any(p < 1 for p in base):
                    raise ShapeError(f"players at stage {t} = {base} must be positive and "
                                     f"sum to the control size {m}")
            self._players.append(base + [s.n_params for s in self._merging[t]
                                         if s.n_params])

    def players(self) -> list[list[int]]:
        return self._players

    # ------------------------------------------------------------------ simulation
    def linear_model(self) -> None:
        """None: the shortcuts and the parameters in the controls make a span chain's
        transitions other than its dynamics', so it is never scanned."""
        return None

    def _merge(self, x_next, t, w, xs):
        off = self._mu_size[t]
        for s in self._merging[t]:
            r = xs[s.start]
            if s.shortcut is None:
                h = r
            elif s.n_params:
                h = s.shortcut(r, w[..., off:off + s.n_params])
                off += s.n_params
            else:
                h = s.shortcut(r)
            if not torch.is_tensor(h) or h.shape != x_next.shape:   # would broadcast
                got = tuple(h.shape) if torch.is_tensor(h) else type(h).__name__
                raise ShapeError(f"the span ({s.start}, {s.end}) adds {got} to the state "
                                 f"{tuple(x_next.shape)} it merges into: its shortcut must "
                                 f"return the shape of x_{s.end + 1}")
            x_next = x_next + h
        return x_next

    def transition(self, t, x, w, xs):
        """``f_t(x_t, u_t)`` (u: the first entries of the stage's control w) plus the
        shortcuts of the spans merging at t."""
        return self._merge(self.dynamics(x, w[..., :self._mu_size[t]], t), t, w, xs)

    def deviation(self, t, xs, xbar):
        """``[x_t - xbar_t, x_start - xbar_start for each span open at t]``."""
        parts = [xs[t] - xbar[t]] + [xs[s.start] - xbar[s.start] for s in self._open[t]]
        return parts[0] if len(parts) == 1 else torch.cat(parts, -1)

    # ------------------------------------------------------------------ derivatives
    def derivatives(self, traj: Traj, second_order: bool):
        """Span-structured stages on the flat batch of ``traj``: the dynamics and cost
        derivatives over all stages at once where the model allows
        (:class:`~trajopt.ddp.stagewise.StageDerivatives`), one call per shortcut map
        for all its spans."""
        if second_order:
            raise InvalidArgumentError("spans and players support mode='ilqr' only")
        self.cost.bind_rows(traj.rows)
        T = len(traj.us)
        xs, ws = traj.xs[:-1], traj.us
        us = [w[..., :self._mu_size[t]] for t, w in enumerate(ws)]
        _, fds = self._dynamics_derivatives(list(zip(xs, us)), rows=traj.rows)
        _, cds = self._cost_derivatives(list(zip(xs, ws)), rows=traj.rows)
        hd = self._shortcut_derivatives(traj)
        dims = {id(s): traj.xs[s.start].shape[-1] for s in self.spans}
        stages = []
        for t in range(T):
            fx = fds[t].fx
            Fw, hr = [fds[t].fu], []
            for s in self._merging[t]:
                jr, jv = hd[id(s)] if s.shortcut is not None else (None, None)
                hr.append(jr)
                if jv is not None:
                    Fw.append(jv)
            n, n1 = fx.shape[-1], fx.shape[-2]
            yo = self._slices(t + 1, n1, dims)
            # the structured Jacobian d y_{t+1} / d y_t, grouped by input block:
            # {input: [(output slice, matrix or None = identity), ...]}; every input feeds
            # something (x feeds x_{t+1}, an open residual is carried or merged)
            J: dict = {"x": [(yo["x"], fx)]}
            for s, h in zip(self._merging[t], hr):
                J.setdefault("x" if s.start == t else id(s), []).append((yo["x"], h))
            for s in self._open[t + 1]:
                J.setdefault("x" if s.start == t else id(s), []).append((yo[id(s)], None))
            blocks = [J["x"]] + [J[id(s)] for s in self._open[t]]
            cd = cds[t]
            stages.append(SpanStage(blocks, torch.cat(Fw, -1), yo["x"], n, cd.lx, cd.lu,
                                    cd.lxx, cd.luu, cd.lux))
        return (stages, *self.terminal_derivatives(traj.xs[-1], traj.rows, T))

    def _slices(self, t: int, n: int, dims: dict) -> dict:
        """Offsets of y_t = [x_t, residuals of the spans open at t]."""
        out, off = {"x": slice(0, n)}, n
        for s in self._open[t]:
            out[id(s)] = slice(off, off + dims[id(s)])
            off += dims[id(s)]
        return out

    def _shortcut_derivatives(self, traj: Traj) -> dict:
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

    def _params(self, traj: Traj, span: Span) -> torch.Tensor:
        """The shortcut parameters v of ``span`` in the control of its merge stage."""
        t = span.end
        off = self._mu_size[t]
        for s in self._merging[t]:
            if s is span:
                return traj.us[t][..., off:off + s.n_params]
            off += s.n_params
        raise AssertionError("span not merging at its end stage")
