r"""Control limits of a DDP solve: the shapes ``control_limits=(lo, hi)`` accepts and the
two forms the solver works with.

Each of ``lo`` and ``hi`` is, with ``T`` the stages, ``m`` the controls and ``batch`` the
batch shape of the solve (of ``x0`` and ``us0`` broadcast; ``B`` its size when it has one
dimension):

* a number (or 0-d array): that bound on every control, stage and element;
* ``(m,)``: one bound per control, the same at every stage and for every element;
* ``(T, m)``: per stage (crocoddyl's bounds per node, a zero-thrust final node);
* ``(*batch, m)``, e.g. ``(B, m)``: per element of the batch, the same at every stage;
* ``(T, *batch, m)``, e.g. ``(T, B, m)`` (mpc.pytorch's ``u_lower`` / ``u_upper``): per
  stage and element.  Any of its leading dimensions may be 1 (broadcast): ``(T, 1, m)``
  is per stage, ``(1, B, m)`` per element.

**T == B.** A 2-d ``(L, m)`` with one batch dimension is read by its size: ``L == T`` per
stage, ``L == B`` per element.  When ``T == B > 1`` it could be either and is refused
(:class:`~trajopt.errors.ShapeError` naming ``control_limits``): write ``(T, 1, m)`` for
per-stage or ``(1, B, m)`` for per-element limits.  Never guessed: the same code would
change meaning when the horizon or the batch changes.  In general ``T`` followed by ones
(``(T, 1, .., 1, m)``, at most one more dimension than the batch has) is per stage, and
it is refused where it is also a per-element shape (a 2-d batch ``(T, B2)`` with
``(T, 1, m)``: write ``(T, 1, 1, m)`` or ``(1, T, B2, m)``).  The stage dimension comes
first, as in mpc.pytorch -- not in ``us0``'s ``(*batch, T, m)`` order: with ``T == B`` a
``(B, T, m)`` array is read as ``(T, B, m)``.

Internally (:func:`prepare_limits`) the limits are either ``(m,)`` -- numbers and
``(m,)`` on both sides: the solver's original path, bit for bit -- or ``(T, B, m)`` over
the flat batch (contiguous), whose stage ``t`` is ``lo[t]`` (B, m).  The solver's loop
works on subsets of the rows and on rows repeated per line-search step; a
trajectory's ``rows`` name the flat element of each, and :func:`for_rows` takes the
limits of those rows.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .._arrays import ArrayKind
from .._checks import is_number, shape_str
from ..errors import InvalidArgumentError, NonFiniteError, ShapeError

__all__ = ["prepare_limits", "for_rows", "at_stage", "clamp_stages", "like_controls"]


def _broadcasts(lead: tuple, batch: tuple) -> bool:
    try:
        return len(lead) == len(batch) and torch.broadcast_shapes(lead, batch) == batch
    except RuntimeError:
        return False


def _full_form(v: torch.Tensor, name: str, T: int, batch: tuple, m: int
               ) -> torch.Tensor | None:
    """``v`` as (T or 1, *batch or 1s, m) (None: the (m,) form), or a ShapeError."""
    nb = len(batch)
    lead = tuple(v.shape[:-1])
    dims = ", ".join(map(str, batch)) + ", " if nb else ""
    want = (f"control_limits must be (lo, hi) of shape ({m},) (the width of us0) or numbers, "
            f"({T}, {m}) per stage (T = {T})"
            + (f", ({dims}{m}) per element (batch {batch}) or ({T}, {dims}{m}) per stage "
               f"and element" if nb else ""))
    if v.ndim == 0 or v.shape[-1] != m:   # numbers are (m,) already
        raise ShapeError(f"{want}; got {name} of shape {shape_str(v)}")
    if not lead:
        return None
    # per stage: T then ones, (T, m) .. (T, 1 x nb, m); per element: the batch's rank
    stage = lead[0] == T and len(lead) <= 1 + nb and all(d == 1 for d in lead[1:])
    element = nb >= 1 and _broadcasts(lead, batch)
    full = len(lead) == 1 + nb and lead[0] in (1, T) and _broadcasts(lead[1:], batch)
    if stage and element and T > 1:   # T == the batch's first size: either reading
        ones = ", ".join(["1"] * nb)
        raise ShapeError(
            f"control_limits: {name} of shape {shape_str(v)} is ambiguous: the horizon T = "
            f"{T} equals the batch's first size (batch {batch}); write per-stage limits as "
            f"({T}, {ones}, {m}) or per-element limits as (1, {dims}{m})")
    if stage:
        return v.reshape(T, *([1] * nb), m)
    if element:
        return v.reshape(1, *lead, m)
    if full:
        return v
    raise ShapeError(f"{want}; got {name} of shape {shape_str(v)}")


def prepare_limits(control_limits, kind, T: int, batch: tuple, widths: Sequence[int]
                   ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Validate ``control_limits`` (see the module docstring) for a solve of ``T``
    stages, batch shape ``batch`` and control sizes ``widths`` (per stage); returns
    ``(lo, hi)``: None, (m,) tensors, or (T, B, m) tensors (B the flat batch)."""
    if control_limits is None:
        return None, None
    limits = control_limits
    if not isinstance(limits, (tuple, list)) or len(limits) != 2:
        raise InvalidArgumentError(
            f"control_limits must be a pair (lo, hi); got {type(limits).__name__}"
            + (f" of length {len(limits)}" if isinstance(limits, (tuple, list)) else ""))
    m = widths[0]
    # a number (or 0-d array) bounds every control, as mpc.pytorch's u_lower / u_upper
    lo, hi = (kind.tensor(v, f"control_limits[{i}]").reshape(()).expand(m)
              if is_number(v) else kind.tensor(v, f"control_limits[{i}]")
              for i, v in enumerate(limits))
    if len(set(widths)) > 1:
        raise ShapeError(f"control_limits need every stage to have the same control "
                         f"size; us0 has sizes {sorted(set(widths))}")
    names = ("control_limits[0] (lo)", "control_limits[1] (hi)")
    batch = tuple(batch)
    forms = [_full_form(v, name, T, batch, m) for v, name in zip((lo, hi), names)]
    for name, v in zip(names, (lo, hi)):
        if bool(torch.isnan(v).any()):
            raise NonFiniteError(f"{name} contains NaN (infinite limits are allowed)")
    if forms[0] is None and forms[1] is None:   # (m,) on both sides: the original path
        if bool((lo > hi).any()):
            bad = int(torch.nonzero(lo > hi)[0])
            raise InvalidArgumentError(f"control_limits: lo > hi for control {bad} "
                                       f"({float(lo[bad])} > {float(hi[bad])})")
        return lo, hi
    B = 1
    for d in batch:
        B *= d
    full = [(v.reshape(1, *([1] * len(batch)), m) if f is None else f)
            .expand(T, *batch, m).reshape(T, B, m).contiguous() for v, f in zip((lo, hi), forms)]
    lo, hi = full
    if bool((lo > hi).any()):
        t, b, i = (int(j) for j in torch.nonzero(lo > hi)[0])
        where = f"stage {t}" + (f", flat batch element {b}" if batch else "")
        raise InvalidArgumentError(f"control_limits: lo > hi at {where}, control {i} "
                                   f"({float(lo[t, b, i])} > {float(hi[t, b, i])})")
    return lo, hi


def for_rows(lo, hi, rows: torch.Tensor | None):
    """The limits of a trajectory's rows (``rows`` (N,) the flat element of each, None:
    row i is element i): (m,) limits as they are, (T, B, m) ones as (T, N, m)."""
    if lo is None or lo.ndim == 1 or rows is None:
        return lo, hi
    return lo[:, rows], hi[:, rows]


def at_stage(v: torch.Tensor, t: int) -> torch.Tensor:
    """Stage ``t``'s limit: (m,) as it is, row ``t`` (B, m) of a (T, B, m) one."""
    return v if v.ndim == 1 else v[t]


def clamp_stages(us: list[torch.Tensor], lo, hi, listed: bool) -> list[torch.Tensor]:
    """The controls (T tensors (B, m)) clamped to the limits; the stacked layout of
    :func:`~trajopt.ddp.inputs.prepare_inputs` (stages as views of one (B, T, m) tensor)
    unless ``listed``."""
    if listed:
        return [torch.minimum(torch.maximum(u, at_stage(lo, t)), at_stage(hi, t))
                for t, u in enumerate(us)]
    if lo.ndim == 3:
        lo, hi = lo.transpose(0, 1), hi.transpose(0, 1)
    return list(torch.minimum(torch.maximum(torch.stack(us, 1), lo), hi).unbind(1))


def like_controls(control_limits, us: torch.Tensor
                  ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``control_limits`` as tensors that broadcast against controls ``us`` (*batch, T, m)
    of a result (its dtype and device): (m,), or (*batch, T, m) per stage / element."""
    kind = ArrayKind(False, us.dtype, us.device)
    batch = tuple(us.shape[:-2])
    lo, hi = prepare_limits(control_limits, kind, us.shape[-2], batch, [us.shape[-1]])
    if lo is None or lo.ndim == 1:
        return lo, hi
    T, _, m = lo.shape
    return tuple(v.reshape(T, *batch, m).movedim(0, -2) for v in (lo, hi))
