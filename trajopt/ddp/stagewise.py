r"""The derivatives of a dynamics or cost at every stage of a trajectory, in as few calls
as the model allows, with the user's function checked on the way.

The rule (``docs/performance.md``, "Stage derivatives"):

1. a model marked ``time_invariant`` is differentiated at all ``T * B`` points in one call
   with ``t = 0``;
2. otherwise, one call with ``t`` a (T*B,) tensor of stage indices: the model's callable
   sees a 0-d int64 tensor ``t`` under ``vmap``; code that ignores ``t`` or uses it
   through torch ops (``torch.as_tensor(t, dtype=x.dtype) * dt``, ``torch.where(
   torch.as_tensor(t) < 5, a, b)``, ``ref.index_select(0, torch.as_tensor(t).reshape(1))``)
   works.  The first time, the result at five stages spread over the horizon is compared
   with a call at the plain ``int`` stage; a callable that cannot take a tensor ``t``
   (``if t == T - 1:``, ``refs[t]``: vmap cannot index with a 0-d tensor) or gives a
   different answer (``0.01 * t`` is float32 for an int64 ``t``, in a float64 problem)
   is differentiated stage by stage from then on; the model's *values* are compared at
   every stage the first time as well (``if t in waypoints:`` does not fail under
   ``vmap``, it is silently False for a tensor ``t``, and only the stages it singles out
   show it);
3. stage by stage when the stages have different state or control sizes.

The same rule gives the running cost of a rollout (:meth:`StageDerivatives.total`) and the
check of given states against the dynamics (:meth:`StageDerivatives.values`): the
values of all stages in one call after the states are known (the time-varying case under
``vmap`` with a 0-d stage tensor, compared once with the ``int`` stage on its own), summed
over the stages, instead of one call per stage inside the rollout loop.

The first evaluation also checks the user's function: derivatives that are exactly zero
at a stage where the function's value changes with ``x`` and ``u`` mean torch.func could
not see the computation (``.detach()``, ``.numpy()``, ``torch.no_grad()``, ``.data``):
that raises instead of letting DDP report a false "converged".  A callable that calls
``.item()`` or branches on a tensor (``if x[0] > 0:``) is named with what to write instead.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import fields, replace
from typing import Any

import torch
from torch.func import vmap

from .._checks import same_shapes_by_position
from ..errors import InvalidArgumentError, ShapeError
from .stagechecks import STACKED_ROWS, check_finite_derivatives, check_jacobian_shapes

__all__ = ["StageDerivatives", "stage_points", "check_visible"]

# torch.func's message for .item() / data-dependent control flow under vmap
_DATA_DEPENDENT = ("data-dependent control flow", "calling .item()", ".item() on a Tensor")


def stage_points(args_per_stage: Sequence[tuple[torch.Tensor, ...]]
                 ) -> tuple[torch.Tensor, ...] | None:
    """The points of all stages stacked stage-major, one (T*B, d) tensor per argument
    (stage t is rows ``t*B:(t+1)*B``): what one call over all stages evaluates; None for
    fewer than two stages or stages whose shapes differ."""
    if len(args_per_stage) < 2 or not same_shapes_by_position(args_per_stage):
        return None
    return tuple(torch.cat(col, 0) for col in zip(*args_per_stage))


class StageDerivatives:
    """Evaluate ``derivatives(*args, t)`` of one model over the stages of a trajectory.

    Parameters
    ----------
    derivatives : callable ``(*args, t) -> dataclass of tensors with N leading rows``
        E.g. ``Dynamics.derivatives`` or ``Cost.derivatives``.
    value : callable ``(*args, t) -> tensor`` with N leading rows
        The function itself (for the zero-derivative check).
    time_invariant : bool
        The model ignores ``t``.
    name : str
        How errors name the model ("the dynamics", "the running cost").
    model : Dynamics or Cost, optional
        The model ``derivatives`` and ``value`` belong to.  Where its ``time_invariant``
        was inferred from its code, not declared (``time_invariance_inferred``,
        :mod:`trajopt.ddp.stage_argument`), the first trajectory confirms it: the values
        of all stages in one call with ``t = 0`` against stage-by-stage calls at their
        own ``t``.  Where they differ (a function that mixes the rows of its batch, ``if
        x.sum() > 0:``) the model is time varying from then on
        (``model.found_time_varying()``: its own derivatives then leave the rows alone
        too); where they agree, ``model.time_invariance_confirmed`` is set and later
        solves with the model (a new solver each ``solve_ddp`` call) skip the check.
    """

    def __init__(self, derivatives: Callable, value: Callable, *, time_invariant: bool,
                 name: str, model: Any = None):
        self.derivatives = derivatives
        self.value = value
        self.time_invariant = time_invariant
        self.name = name
        self.model = model
        self.confirm = time_invariant and getattr(model, "time_invariance_inferred", False) \
            and not getattr(model, "time_invariance_confirmed", False)
        self.tensor_t: bool | None = None  # None: not tried yet
        self.value_tensor_t: bool | None = None  # the same, for the values (total)
        self.checked = False

    def total(self, args_per_stage: Sequence[tuple[torch.Tensor, ...]],
              points: tuple[torch.Tensor, ...] | None = None) -> torch.Tensor:
        """The value summed over the stages, (B,): ``sum_t value(*args_per_stage[t], t)``
        in one call over all ``T * B`` points where the rule allows, else stage by stage
        (in stage order).  ``points``: :func:`stage_points` of ``args_per_stage``, where
        the caller has them."""
        T = len(args_per_stage)
        first = args_per_stage[0]
        B = first[0].shape[0]
        out = self.values(args_per_stage, points=points)
        if torch.is_tensor(out) and out.shape == (T * B,):
            return out.view(T, B).sum(0)
        total = self.value(*first, 0)
        for t in range(1, T):
            total = total + self.value(*args_per_stage[t], t)
        return total

    def values(self, args_per_stage: Sequence[tuple[torch.Tensor, ...]], *,
               probe: bool = True, points: tuple[torch.Tensor, ...] | None = None
               ) -> Any | None:
        """The values ``value(*args_per_stage[t], t)`` of every stage in one call over all
        ``T * B`` points, stacked stage-major (stage t is rows ``t*B:(t+1)*B``): with
        ``t = 0`` for a time-invariant model, else under ``vmap`` with a 0-d stage tensor
        (compared once with the ``int`` stage).  None where the rule does not allow one
        call (a single stage, stages of different shapes, a callable that cannot take a
        tensor stage): the caller then evaluates stage by stage.

        ``probe=False``: a time-varying model whose vectorized call has not been compared
        with the ``int`` stage yet is not tried (None), so that points that are not a
        trajectory (a user's guess, possibly NaN) never decide the comparison.

        ``points``: :func:`stage_points` of ``args_per_stage``, where the caller has them
        (not None)."""
        flat = stage_points(args_per_stage) if points is None else points
        if flat is None:
            return None
        if self.confirm:   # not on points that are not a trajectory (probe=False)
            if not probe:
                return None
            out = self._confirm(flat, args_per_stage)
            if out is not None:
                return out
        if self.time_invariant:
            return self._stacked(flat, args_per_stage)
        if self.value_tensor_t is False or (self.value_tensor_t is None and not probe):
            return None
        return self._vectorized_values(flat, args_per_stage)

    def _confirm(self, flat, args_per_stage) -> Any | None:
        """Confirm an inferred time invariance once (``model`` in the class docstring);
        where it fails the model is time varying from then on.  Returns the values of the
        one batched call where confirmed (what :meth:`values` returns), else None.  A
        call that raises is left to raise where it is made."""
        self.confirm = False
        try:
            out = self._stacked(flat, args_per_stage)
            B = args_per_stage[0][0].shape[0]
            same = all(_same_values(out[t * B:(t + 1) * B], self.value(*args, t))
                       for t, args in enumerate(args_per_stage))
        except ShapeError:   # data per batch element (_stacked): named
            raise
        except (RuntimeError, TypeError, IndexError, ValueError):
            same = False
        if not same:
            self.time_invariant = False
            self.model.found_time_varying()
            return None
        self.model.time_invariance_confirmed = True
        return out

    def _stacked(self, flat, args_per_stage):
        """The values at the stacked rows ``flat`` of all stages (``t = 0``).  Where that
        call raises but the first stage's (B, n) rows alone do not, the model holds data
        of one row per batch element (a (B, n) reference): :class:`ShapeError` naming it,
        with the way out (:data:`STACKED_ROWS`), the model's exception chained."""
        try:
            return self.value(*flat, 0)
        except (RuntimeError, ValueError, IndexError, TypeError) as exc:
            try:
                self.value(*args_per_stage[0], 0)
            except Exception:   # noqa: BLE001 (not about the stacking: the first error)
                raise exc from None
            raise ShapeError(f"{self.name} failed on the rows of all {len(args_per_stage)} "
                             f"stages stacked ({flat[0].shape[0]} rows) but not on the "
                             f"{args_per_stage[0][0].shape[0]} rows of one stage: "
                             f"{STACKED_ROWS} ({type(exc).__name__}: {exc})") from exc

    def _vectorized_values(self, flat, args_per_stage):
        """The values at every stage in one ``vmap`` call with a 0-d stage tensor (the
        derivatives' convention), checked once against the ``int`` stage at **every**
        stage (T plain calls, once): Python control flow on ``t`` that does not fail
        under ``vmap`` -- ``if t in waypoints:`` hashes the tensor and is always False --
        changes the answer at the stages it singles out, which a sample of stages can
        miss."""
        T, B = len(args_per_stage), args_per_stage[0][0].shape[0]
        stages = torch.arange(T, device=flat[0].device).repeat_interleave(B)
        try:
            out = vmap(lambda *a: self.value(*a))(*flat, stages)
        except (RuntimeError, TypeError, IndexError, ValueError):
            if self.value_tensor_t:
                raise
            self.value_tensor_t = False
            return None
        if self.value_tensor_t is None:
            for t in range(T):
                ref = self.value(*args_per_stage[t], t)
                if not _close((out[t * B:(t + 1) * B],), (ref,)):
                    self.value_tensor_t = False
                    return None
            self.value_tensor_t = True
        return out

    def __call__(self, args_per_stage: Sequence[tuple[torch.Tensor, ...]],
                 points: tuple[torch.Tensor, ...] | None = None, *,
                 rows: torch.Tensor | None = None, **kw) -> tuple[Any | None, list]:
        """Derivatives at every stage: ``(stacked, per_stage)``.

        ``stacked`` holds all stages in one object of (T*B, ...) tensors, stage-major
        (stage t is rows ``t*B:(t+1)*B``), or None when the stages' shapes differ;
        ``per_stage`` is the sequence of T objects (views of ``stacked`` when there is
        one, taken when read).  ``points``: :func:`stage_points` of ``args_per_stage``,
        where the caller has them (not None: the dynamics and the cost of one
        trajectory share them).  ``rows``: the flat-batch element of each of the B rows
        (None: row i is element i), for the error of :func:`check_finite_derivatives`,
        which every result passes (a NaN derivative is not a "not positive definite"
        Q_uu).
        """
        T = len(args_per_stage)
        first = args_per_stage[0]
        B = first[0].shape[0]
        uniform = points is not None or same_shapes_by_position(args_per_stage)
        stacked = None
        if uniform and T > 1:
            flat = stage_points(args_per_stage) if points is None else points
            if self.confirm:
                self._confirm(flat, args_per_stage)
            if self.time_invariant:
                stacked = self._call(flat, 0, None, **kw)
            elif self.tensor_t is not False:
                stages = torch.arange(T, device=flat[0].device).repeat_interleave(B)
                stacked = self._vectorized(flat, stages, args_per_stage, **kw)
        if stacked is not None:
            per_stage = _StageRows(stacked, B, T)
        else:
            per_stage = [self._call(args, t, t, **kw) for t, args in enumerate(args_per_stage)]
            if uniform:
                stacked = _cat(per_stage)
        if not self.checked:
            check_jacobian_shapes(per_stage[0], first, self.name)
            self.checked = True
            # only stages whose derivatives are all zero need the finite-difference check;
            # find them with one op per derivative over all stages
            zero = range(T)
            if stacked is not None:
                nonzero = None
                for v in _tensors(stacked):
                    nz = v.reshape(T, -1).ne(0).any(-1)
                    nonzero = nz if nonzero is None else nonzero | nz
                zero = [] if nonzero is None else torch.nonzero(~nonzero).flatten().tolist()
            for t in zero:
                check_visible(lambda *a, t=t: self.value(*a, t), args_per_stage[t],
                              per_stage[t], f"{self.name} at stage {t}")
        for t, d in [(0, stacked)] if stacked is not None else enumerate(per_stage):
            check_finite_derivatives(d, self.name, B, T, rows, t, self.model)
        return stacked, per_stage

    def _vectorized(self, flat, stages, args_per_stage, **kw):
        """One call with a tensor of stages; verified against the int stage once."""
        try:
            out = self.derivatives(*flat, stages, **kw)
        except (RuntimeError, TypeError, IndexError, ValueError):
            if self.tensor_t:  # worked before: a genuine failure, report it
                raise
            self.tensor_t = False
            return None
        if self.tensor_t is None:  # the first time: against the int stage, at 5 stages,
            # and the values at every stage (a stage singled out by Python control flow
            # on t, `if t in waypoints:`, is seen there; derivatives at every stage would
            # cost T transform calls)
            B, T = args_per_stage[0][0].shape[0], len(args_per_stage)
            if self.value_tensor_t is False or (
                    self.value_tensor_t is None
                    and self._vectorized_values(flat[:2], args_per_stage) is None):
                self.tensor_t = False
                return None
            for t in sorted({0, 1, T // 3, (2 * T) // 3, T - 1}):
                ref = self._call(args_per_stage[t], t, t, **kw)
                if not _close(_rows(out, slice(t * B, (t + 1) * B)), ref):
                    self.tensor_t = False
                    return None
            self.tensor_t = True
        return out

    def _call(self, args, t, stage, **kw):
        try:
            return self.derivatives(*args, t, **kw)
        except RuntimeError as exc:
            if any(s in str(exc) for s in _DATA_DEPENDENT):
                where = "" if stage is None else f" at stage {stage}"
                raise InvalidArgumentError(
                    f"{self.name}{where} calls .item() or branches on a tensor's value "
                    f"(`if x[..., 0] > 0:`, `float(x)`), which torch.func cannot "
                    f"differentiate over a batch: write the branch with torch.where / "
                    f"torch.clamp, or override derivatives() with analytic ones") from exc
            raise


def check_visible(value: Callable, args: tuple[torch.Tensor, ...], derivatives,
                  name: str) -> None:
    """Raise when ``derivatives`` (a dataclass or tuple of tensors) are exactly zero but
    ``value(*args)`` has a nonzero central difference along a small move of every
    argument: the function's computation is hidden from torch.func."""
    if any(bool(v.ne(0).any()) for v in _tensors(derivatives)):
        return
    eps = torch.finfo(args[0].dtype).eps
    h = eps ** 0.5
    up = value(*(a + h * (1 + a.abs()) for a in args))
    down = value(*(a - h * (1 + a.abs()) for a in args))
    scale = float(up.abs().amax() + down.abs().amax())
    if float((up - down).abs().amax()) > 100 * eps * scale:
        raise InvalidArgumentError(
            f"the derivatives of {name} are exactly zero, but its value changes with its "
            f"inputs: the computation is hidden from torch.func (.detach(), .numpy(), "
            f".data, torch.no_grad() or a Python float inside the function); write it "
            f"with differentiable torch ops or override derivatives() with analytic ones")


class _StageRows(Sequence):
    """The per-stage views of a stacked result, taken when read (a caller that uses the
    stacked form never pays the T slices)."""

    def __init__(self, stacked, B: int, T: int):
        self.stacked, self.B, self.T = stacked, B, T

    def __len__(self) -> int:
        return self.T

    def __getitem__(self, t):
        if isinstance(t, slice):
            return [self[i] for i in range(*t.indices(self.T))]
        if t < 0:
            t += self.T
        if not 0 <= t < self.T:
            raise IndexError(t)
        return _rows(self.stacked, slice(t * self.B, (t + 1) * self.B))


def _tensors(d) -> list[torch.Tensor]:
    if isinstance(d, tuple):
        return [v for v in d if torch.is_tensor(v)]
    return [v for v in (getattr(d, f.name) for f in fields(d)) if torch.is_tensor(v)]


def _rows(d, rows: slice):
    return replace(d, **{f.name: getattr(d, f.name)[rows] for f in fields(d)
                         if torch.is_tensor(getattr(d, f.name))})


def _cat(per_stage: list):
    first = per_stage[0]
    return replace(first, **{f.name: torch.cat([getattr(d, f.name) for d in per_stage], 0)
                             for f in fields(first)
                             if torch.is_tensor(getattr(first, f.name))})


def _same_values(a, b) -> bool:
    """:func:`_close` for the values of a trajectory, whose elements may have diverged:
    NaN where both are NaN, infinities where both are the same, and the finite entries
    to 1000 eps of their scale."""
    if not (torch.is_tensor(a) and torch.is_tensor(b)) or a.shape != b.shape:
        return False
    finite = torch.isfinite(b)
    scale = float(b[finite].abs().amax()) if bool(finite.any()) else 0.0
    tol = 1000 * torch.finfo(b.dtype).eps * scale
    ok = (a == b) | (torch.isnan(a) & torch.isnan(b)) | ((a - b).abs() <= tol)
    return bool(ok.all())


def _close(a, b) -> bool:
    """Equal up to the rounding of batched against unbatched kernels (1000 eps of each
    tensor's scale): a tensor ``t`` whose arithmetic differs (``0.01 * t`` is float32
    for an int64 ``t`` in torch) is caught."""
    for x, y in zip(_tensors(a), _tensors(b)):
        if x.shape != y.shape:
            return False
        tol = 1000 * torch.finfo(y.dtype).eps * float(y.abs().amax())
        if not bool(((x - y).abs() <= tol).all()):
            return False
    return True
