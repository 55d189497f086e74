"""Per-element batch bookkeeping of the DDP loop: trajectories and policies on a flat batch
of ``B`` elements, row selection and merging (every element converges, fails or diverges
on its own, so the loop works on the rows still active)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch

from .._checks import same_shapes
from .._linalg import finite_rows
from .inference import normal, outside
from .options import DDPResult

__all__ = ["Traj", "Policy", "Rows", "merge_policy", "select_gains", "step_size",
           "pack_result", "take_rows", "put_rows"]


class Rows(Sequence):
    """Per-stage tensors read as the rows of one stacked tensor, ``stacked`` (T, ...), and
    an optional last element ``tail`` (a value's terminal derivative): what a pass over all
    stages at once gives, read stage by stage as views made when read, and handed on
    stacked (:meth:`stack`) without T views built and stacked back.  Writing into a row
    (``rows[t][idx] = v``) writes into ``stacked``; the sequence itself is read-only.
    """

    __slots__ = ("stacked", "tail")

    def __init__(self, stacked: torch.Tensor, tail: torch.Tensor | None = None):
        self.stacked, self.tail = stacked, tail

    def __len__(self) -> int:
        return self.stacked.shape[0] + (self.tail is not None)

    def __iter__(self):
        yield from self.stacked.unbind(0)   # one op for all the views, not one a row
        if self.tail is not None:
            yield self.tail

    def __getitem__(self, t):
        if isinstance(t, slice):
            return list(self)[t]
        T = self.stacked.shape[0]
        i = t + len(self) if t < 0 else t
        if self.tail is not None and i == T:
            return self.tail
        if not 0 <= i < T:
            raise IndexError(f"stage {t} of {len(self)}")
        return self.stacked[i]

    @property
    def uniform_shapes(self) -> bool:
        """Every element has one shape (read by :func:`trajopt._checks.same_shapes`)."""
        return self.tail is None or self.tail.shape == self.stacked.shape[1:]

    @staticmethod
    def holds(rows: Sequence[torch.Tensor], T: int) -> bool:
        """``rows`` is a :class:`Rows` of ``T`` stacked stages and no tail (one shape)."""
        return isinstance(rows, Rows) and rows.tail is None and rows.stacked.shape[0] == T

    @staticmethod
    def stack(rows: Sequence[torch.Tensor]) -> torch.Tensor:
        """Any sequence of tensors stacked (T, ...): a :class:`Rows`' own tensor where it
        has no tail (no copy), else ``torch.stack``."""
        if isinstance(rows, Rows) and rows.tail is None:
            return rows.stacked
        return torch.stack(list(rows))


def take_rows(values: Sequence[torch.Tensor], idx: torch.Tensor) -> list[torch.Tensor]:
    """``[v[idx] for v in values]`` (``idx`` indices or a mask over the rows): one
    indexing of the stacked stages where they share a shape (T index operations otherwise:
    ~100 for a horizon of 100, each paying torch's dispatch)."""
    if len(values) > 2 and same_shapes(values):
        return list(Rows.stack(values)[:, idx].unbind(0))
    return [v[idx] for v in values]


def put_rows(dst: list[torch.Tensor], idx: torch.Tensor, src: Sequence[torch.Tensor]
             ) -> None:
    """``dst[t][idx] = src[t]`` for every stage: where ``dst`` is a list whose stages
    share a shape, one write into the stacked stages, whose rows then replace the list's
    tensors (the same values as writing each in place); a :class:`Rows` is written
    through, row by row."""
    if isinstance(dst, list) and len(dst) > 2 and same_shapes(dst) and same_shapes(src):
        stacked = torch.stack(dst)
        stacked[:, idx] = Rows.stack(src)
        dst[:] = stacked.unbind(0)
        return
    for a, b in zip(dst, src):
        if a is not b:  # a policy's terminal derivatives may be the very same tensor
            a[idx] = b


@dataclass
class Traj:
    """A rolled-out trajectory: ``xs`` T+1 tensors (B, n_t), ``us`` T tensors (B, m_t),
    ``cost`` (B,); ``rows`` (B,) the element of the solve's flat batch each row belongs to
    (None: row i is element i), so that per-element data (a multiplier, a reference)
    follows the rows through the loop's selections (:meth:`trajopt.Cost.bind_rows`).

    ``points``: ``xs[:-1]`` and ``us`` stacked stage-major, ((T B, n), (T B, m)), as the
    rollout formed them for the running cost's one call
    (:func:`~trajopt.ddp.stagewise.stage_points`; the stage loop's control buffer is one
    already), kept for the derivatives and the next forward pass at this trajectory; None
    where they were not formed, and after rows were written or selected.

    ``gaps``: T tensors (B, n_{t+1}), the defects ``f_t(x_t, u_t) - x_{t+1}`` of a
    multiple-shooting solve (:mod:`trajopt.ddp.shooting`); None where there are none."""

    xs: list[torch.Tensor]
    us: list[torch.Tensor]
    cost: torch.Tensor
    rows: torch.Tensor | None = None
    points: tuple[torch.Tensor, torch.Tensor] | None = None
    gaps: list[torch.Tensor] | None = None

    def select(self, idx: torch.Tensor) -> Traj:
        rows = idx if self.rows is None else self.rows[idx]
        return Traj(take_rows(self.xs, idx), take_rows(self.us, idx), self.cost[idx], rows,
                    gaps=None if self.gaps is None else take_rows(self.gaps, idx))

    def controls(self) -> Sequence[torch.Tensor]:
        """``us``, as a :class:`Rows` of the stacked controls (T, B, m) where
        :attr:`points` hold them (stacking and shape tests then cost nothing)."""
        if self.points is None:
            return self.us
        U = self.points[1]
        return Rows(U.view(len(self.us), -1, U.shape[-1]))

    def assign(self, idx: torch.Tensor, other: Traj) -> None:
        """Write ``other`` into the rows ``idx`` (in order); when they are all the rows,
        take ``other``'s tensors instead of copying (unless one tensor appears twice in
        its lists: rows written later would then change both)."""
        if idx.numel() == self.cost.shape[0] and other.cost.shape == self.cost.shape and \
                len({id(v) for v in other.xs + other.us}) == len(other.xs) + len(other.us):
            self.xs[:], self.us[:], self.cost = other.xs, other.us, other.cost
            self.points, self.gaps = other.points, other.gaps
            return
        self.points = None
        put_rows(self.xs, idx, other.xs)
        put_rows(self.us, idx, other.us)
        self.cost[idx] = other.cost
        if self.gaps is not None:   # a row's defects only shrink: None in other is zeros
            put_rows(self.gaps, idx, other.gaps if other.gaps is not None else
                     [g.new_zeros(idx.numel(), *g.shape[1:]) for g in self.gaps])

    def finite(self) -> torch.Tensor:
        """(B,) bool: the cost and every state are finite."""
        xs = self.xs
        if same_shapes(xs):  # one reduction over all stages
            return torch.isfinite(self.cost) & finite_rows(torch.stack(xs, 1), 2)
        return torch.isfinite(self.cost) & torch.stack(
            [torch.isfinite(v).all(-1) for v in xs], -1).all(-1)


@dataclass
class Policy:
    """The gains and value derivatives of one backward pass (sequences over stages: lists,
    or :class:`Rows` from a pass over all stages at once), the expected change ``dV``
    (B, 2) and ``ok`` (B,)."""

    K: list[torch.Tensor]
    k: list[torch.Tensor]
    Vx: list[torch.Tensor]
    Vxx: list[torch.Tensor]
    dV: torch.Tensor
    ok: torch.Tensor
    shared: bool = False  # tensors borrowed from a backward pass: copy before writing

    @classmethod
    def from_stacked(cls, kK: torch.Tensor, Vx: torch.Tensor, Vxx: torch.Tensor,
                     VxT: torch.Tensor, VxxT: torch.Tensor, dV: torch.Tensor,
                     ok: torch.Tensor) -> Policy:
        """The policy of a pass computed over all stages at once: the joint gains ``kK``
        (T, B, m, 1+n), the values ``Vx`` (T, B, n), ``Vxx`` (T, B, n, n) of stages
        0 .. T-1 and the terminal ``VxT``, ``VxxT`` appended (:class:`Rows` of them)."""
        return cls(Rows(kK[..., 1:]), Rows(kK[..., 0]), Rows(Vx, VxT), Rows(Vxx, VxxT),
                   dV, ok)


def step_size(k: list[torch.Tensor], us: list[torch.Tensor]) -> torch.Tensor:
    """The feedforward step relative to the controls, ``max_t,i |k_t,i| / max_t,i
    |u_t,i|`` per element (B,) (0 when both are 0, inf when only the controls are):
    unchanged when the problem is scaled (Tassa's ``|k| / (1 + |u|)`` is not: from a
    tiny initial state it calls the zero control converged)."""
    step, size = (v.stacked.abs().amax(-1).amax(0) if isinstance(v, Rows) and v.tail is None
                  else torch.cat(list(v), -1).abs().amax(-1) for v in (k, us))
    return torch.where(step == 0, torch.zeros_like(step), step / size)


def select_gains(p: Policy, idx) -> Policy:
    """The rows ``idx`` of the gains K, k (all a forward pass reads; value derivatives are
    left out)."""
    return Policy(take_rows(p.K, idx), take_rows(p.k, idx), [], [], p.dV[idx], p.ok[idx])


def merge_policy(full: Policy | None, part: Policy, idx, B: int) -> Policy:
    """Write ``part`` (rows ``idx``) into ``full`` (B rows), allocating it (zeros) when
    None.  Rows whose backward pass failed (``ok`` False: the regularization limit) keep
    what they held -- the element's last successful policy, or zeros -- so the result
    never carries the failed pass's NaN (the element's ``reason`` says it stopped).

    When ``part`` replaces every row (all ``B`` rows, every one ``ok``) it is returned as
    it is (no copy), marked ``shared``: its tensors may be views of others (the terminal
    derivatives), so a later merge into it first copies it."""
    ok = part.ok
    if idx.numel() == B and bool(ok.all()):
        return Policy(part.K, part.k, part.Vx, part.Vxx, part.dV, part.ok, shared=True)
    if full is not None and full.shared:  # do not write into borrowed tensors
        full = Policy([v.clone() for v in full.K], [v.clone() for v in full.k],
                      [v.clone() for v in full.Vx], [v.clone() for v in full.Vxx],
                      full.dV.clone(), full.ok.clone())
    if full is None:
        def alloc(v):
            return torch.zeros(B, *v.shape[1:], dtype=v.dtype, device=v.device)
        full = Policy([alloc(v) for v in part.K], [alloc(v) for v in part.k],
                      [alloc(v) for v in part.Vx], [alloc(v) for v in part.Vxx],
                      alloc(part.dV), torch.zeros(B, dtype=torch.bool, device=part.ok.device))
    if not bool(ok.all()):
        idx, part = idx[ok], Policy(take_rows(part.K, ok), take_rows(part.k, ok),
                                    take_rows(part.Vx, ok), take_rows(part.Vxx, ok),
                                    part.dV[ok], ok[ok])
    for dst, src in ((full.K, part.K), (full.k, part.k), (full.Vx, part.Vx),
                     (full.Vxx, part.Vxx)):
        put_rows(dst, idx, src)
    full.dV[idx] = part.dV
    full.ok[idx] = part.ok
    return full


def pack_result(kind, batch: tuple, listed: bool, traj: Traj, pol: Policy,
                converged: torch.Tensor, iterations: torch.Tensor, reason: np.ndarray,
                history: list, max_gap: torch.Tensor | None = None, **extra) -> DDPResult:
    """The :class:`~trajopt.ddp.options.DDPResult` of a flat-batch solve in the caller's
    batch shape and array type (stages stacked unless the controls came as a list or the
    stage sizes differ); ``extra`` fields (already packed) are passed through."""
    def pack(values):
        if listed or not same_shapes(values):
            return kind.out([v.reshape(*batch, *v.shape[1:]).clone() for v in values])
        if isinstance(values, Rows):   # stacked already: (T, B, ...) -> a (B, T, ...) copy
            out = values.stacked if values.tail is None else torch.cat(
                [values.stacked, values.tail.unsqueeze(0)])
            out = out.transpose(0, 1).clone(memory_format=torch.contiguous_format)
        else:
            out = torch.stack(list(values), dim=1)  # (B, T, ...): one reshape, not T
        return kind.out(out.reshape(*batch, *out.shape[1:]))

    with outside():   # the arrays leave the solve: normal tensors, never inference ones
        return DDPResult(
            xs=pack(traj.xs), us=pack(traj.us), K=pack(pol.K), k=pack(pol.k),
            Vx=pack(pol.Vx), Vxx=pack(pol.Vxx),
            cost=kind.out(normal(traj.cost.reshape(batch))),
            converged=kind.out(normal(converged.reshape(batch))),
            iterations=kind.out(normal(iterations.reshape(batch))),
            reason=reason.reshape(tuple(batch)) if len(batch) else reason.reshape(()),
            history=history, max_gap=None if max_gap is None else kind.out(
                normal(max_gap.reshape(batch))), **extra)
