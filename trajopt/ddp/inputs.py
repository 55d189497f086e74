"""The boundary of the DDP solvers: validation of ``x0``, ``us0``, the given states ``xs0``
and the control limits (once per solve, with errors that name the argument), and of what
the user's cost returns."""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass, replace

import torch

from .._arrays import ArrayKind, infer_kind
from .._checks import broadcast_shapes, check_finite, shape_str
from ..errors import InvalidArgumentError, ShapeError
from .batch import Traj
from .limits import clamp_stages, prepare_limits
from .models import Cost
from .writes import called_on_copies

__all__ = ["SolveInputs", "prepare_inputs", "prepare_states", "check_cost_shapes", "widened"]


@dataclass(frozen=True)
class SolveInputs:
    """The validated inputs of one solve: the array kind, the batch shape, whether the
    controls came as a list, the flat initial states (B, n) and controls (T x (B, m)),
    the control limits (m,), (T, B, m) (per stage or element: :mod:`trajopt.ddp.limits`)
    or None, and the given states of the controls (T+1 x
    (B, n_t), still to be checked against the dynamics) or None."""

    kind: ArrayKind
    batch: torch.Size
    listed: bool
    x0: torch.Tensor
    us: list[torch.Tensor]
    lo: torch.Tensor | None
    hi: torch.Tensor | None
    xs: list[torch.Tensor] | None = None


def prepare_inputs(x0, us0, control_limits, xs0=None) -> SolveInputs:
    """Validate ``x0`` (..., n) and ``us0`` (..., T, m) or a list, flatten the batch and
    clamp the controls to the limits; ``xs0``, given states: :func:`prepare_states`."""
    kind = infer_kind(x0, us0)
    if not torch.is_tensor(x0) and not kind.numpy:
        # the dtype of x0 (docs/ddp.md): numpy (or a list) is float64 even beside a torch
        # us0, which is cast to it (infer_kind took us0's float32); results stay torch
        kind = replace(kind, dtype=torch.float64)
    x0t = kind.tensor(x0, "x0")
    if x0t.ndim < 1:
        raise ShapeError(f"x0 must have shape (..., n); got {shape_str(x0t)}")
    check_finite(x0t, "x0")
    listed = isinstance(us0, (list, tuple))
    if listed:
        us = [kind.tensor(u, f"us0[{t}]") for t, u in enumerate(us0)]
        if not us:
            raise ShapeError("us0 must hold at least one stage")
        for t, u in enumerate(us):
            if u.ndim < 1:
                raise ShapeError(f"us0[{t}] must have shape (..., m); got {shape_str(u)}")
    else:
        ut = kind.tensor(us0, "us0")
        if ut.ndim < 2 or ut.shape[-2] == 0:
            raise ShapeError(f"us0 must have shape (..., T, m) with T >= 1; got "
                             f"{shape_str(ut)}")
    # one check over all stages; the stage-by-stage loop only to name a bad one
    if listed or not bool(torch.isfinite(ut).all()):
        for t, u in enumerate(us if listed else ut.unbind(-2)):
            check_finite(u, f"us0[{t}]")
    try:
        batch = broadcast_shapes(x0t.shape[:-1], *((u.shape[:-1] for u in us) if listed
                                                   else (ut.shape[:-2],)))
    except RuntimeError:
        raise ShapeError(f"batch dimensions of x0 {shape_str(x0t)} and us0 do not "
                         "broadcast") from None
    B = batch.numel()
    if B == 0:
        raise ShapeError(f"the batch of x0 {shape_str(x0t)} and us0 is empty")
    if x0t.shape[-1] == 0:
        raise ShapeError(f"x0 must have at least one state (n >= 1); got "
                         f"{shape_str(x0t)}")
    x0f = x0t.expand(*batch, x0t.shape[-1]).reshape(B, -1).clone()
    if listed:
        usf = [u.expand(*batch, u.shape[-1]).reshape(B, -1).clone() for u in us]
    else:  # one copy for all stages, (B, T, m); the stages are views of it
        usf = list(ut.expand(*batch, *ut.shape[-2:]).reshape(B, *ut.shape[-2:]).clone()
                   .unbind(1))
    # (m,) limits, or (T, B, m) per stage / element (trajopt/ddp/limits.py)
    lo, hi = prepare_limits(control_limits, kind, len(usf), tuple(batch),
                            [u.shape[-1] for u in usf])
    if lo is not None:
        usf = clamp_stages(usf, lo, hi, listed)
    inp = SolveInputs(kind, batch, listed, x0f, usf, lo, hi)
    return inp if xs0 is None else replace(inp, xs=prepare_states(xs0, inp))


def prepare_states(xs0, inp: SolveInputs) -> list[torch.Tensor]:
    """Validate the given states ``xs0`` of a solve whose inputs are ``inp``: an array
    (..., T+1, n) or a sequence of T+1 arrays (..., n_t), with ``n`` (``n_0``) the size
    of ``x0`` and batch dimensions that broadcast to the solve's batch; a torch tensor must
    have the solve's dtype and device (a copy in another precision could not pass the
    consistency check).  Returns T+1 tensors (B, n_t), copies (the solver writes into
    its trajectory).  The values are not checked: NaN or a wrong state only fails the
    check against the dynamics (:meth:`~trajopt.ddp.chain.Chain.consistent_prefix`)."""
    kind, batch = inp.kind, inp.batch
    T, n, B = len(inp.us), inp.x0.shape[-1], inp.x0.shape[0]

    def tensor(v, name):
        if isinstance(v, torch.Tensor) and (v.dtype != kind.dtype or v.device != kind.device):
            raise ShapeError(f"{name} must have the dtype and device of the solve "
                             f"({kind.dtype} on {kind.device}, from x0 and us0); got "
                             f"{v.dtype} on {v.device}")
        return kind.tensor(v, name)

    def flat(v, name, tail):
        try:
            fits = torch.broadcast_shapes(v.shape[:v.ndim - len(tail)], batch) == batch
        except RuntimeError:
            fits = False
        if not fits:
            raise ShapeError(f"the batch dimensions of {name} {shape_str(v)} must broadcast "
                             f"to the batch {tuple(batch)} of x0 and us0")
        return v.expand(*batch, *tail).reshape(B, *tail)

    if isinstance(xs0, (list, tuple)):
        if len(xs0) != T + 1:
            raise ShapeError(f"xs0 must hold T+1 = {T + 1} states (us0 has {T} stages); "
                             f"got {len(xs0)}")
        xs = [tensor(v, f"xs0[{t}]") for t, v in enumerate(xs0)]
        for t, v in enumerate(xs):
            if v.ndim < 1 or v.shape[-1] == 0 or (t == 0 and v.shape[-1] != n):
                want = n if t == 0 else "n_t"
                raise ShapeError(f"xs0[{t}] must have shape (..., {want}); got "
                                 f"{shape_str(v)}")
        return [flat(v, f"xs0[{t}]", v.shape[-1:]).clone() for t, v in enumerate(xs)]
    xt = tensor(xs0, "xs0")
    if xt.ndim < 2 or xt.shape[-2:] != (T + 1, n):
        raise ShapeError(f"xs0 must have shape (..., T+1, n) = (..., {T + 1}, {n}) (the "
                         f"states of us0 from x0); got {shape_str(xt)}")
    # stage-major, one contiguous copy: each stage (B, n) is contiguous
    return list(flat(xt, "xs0", (T + 1, n)).transpose(0, 1).clone(
        memory_format=torch.contiguous_format).unbind(0))


def widened(inp: SolveInputs, dtypes: Iterable[torch.dtype]) -> SolveInputs | None:
    """The inputs in the dtype the model computes in, where what its first rollout
    returned (``dtypes``: of the states, the cost, constraint values) is wider than ``x0``
    and ``us0`` (float32 inputs, float64 parameters in the dynamics or cost: torch's type
    promotion makes the states or the cost float64, and the solve then runs in float64,
    as the model's own arithmetic does); None where the rollout kept the dtype.  A model
    that returns a *narrower* dtype (float32 states from float64 inputs) is refused: the
    solve cannot keep its precision."""
    dt = inp.x0.dtype
    got = set(dtypes)
    if got == {dt}:
        return None
    narrow = sorted(str(d) for d in got if torch.promote_types(d, dt) == dt and d != dt)
    if narrow:
        raise InvalidArgumentError(
            f"the dynamics or cost returned {', '.join(narrow)} from {dt} x0 and us0: "
            f"they must compute in the dtype of x0 and us0 (or pass x0 and us0 in "
            f"{narrow[0]})")
    wide = dt
    for d in got:
        wide = torch.promote_types(wide, d)

    def cast(v):
        return None if v is None else v.to(wide)
    return replace(inp, kind=replace(inp.kind, dtype=wide), x0=cast(inp.x0),
                   us=[cast(u) for u in inp.us], lo=cast(inp.lo), hi=cast(inp.hi),
                   xs=None if inp.xs is None else [cast(x) for x in inp.xs])


def check_states(traj: Traj, listed: bool) -> None:
    """The dynamics return tensors (B, n_t).  Where the controls came as one tensor (not
    the per-stage list that declares stage sizes that differ, ``docs/ddp.md``), a state
    size that changes at the first stage only warns: x0's size is then likely wrong (a
    2-state model given a 3-entry x0 solves silently otherwise)."""
    B = traj.xs[0].shape[0]
    for t, x in enumerate(traj.xs[1:]):
        if not torch.is_tensor(x):
            raise ShapeError(f"the dynamics must return a tensor (B, n); got "
                             f"{type(x).__name__} at stage {t}")
        if x.shape[0] != B:
            raise ShapeError(f"the dynamics returned shape {shape_str(x)} at stage {t}; "
                             f"expected a leading batch of {B}")
    sizes = [x.shape[-1] for x in traj.xs]
    if not listed and len(sizes) > 2 and sizes[0] != sizes[1] and len(set(sizes[1:])) == 1:
        warnings.warn(
            f"x0 has {sizes[0]} entries per element but the dynamics return {sizes[1]} from "
            f"the first stage on: if x0 is a state of this model, its size is wrong (stage "
            f"sizes that differ are allowed: pass us0 as a list of per-stage arrays to "
            f"declare them, which also silences this)", UserWarning, stacklevel=4)


def check_cost_shapes(cost: Cost, traj: Traj) -> None:
    """The cost must give one value per batch element: a (B, 1) or (B, B) result
    would broadcast into a wrong total silently.  Called on copies of the trajectory's
    tensors, which must come back unchanged (:func:`~trajopt.ddp.writes.called_on_copies`:
    a cost writing into its arguments is named)."""
    B = traj.xs[0].shape[0]
    running = called_on_copies(cost.running, (traj.xs[0], traj.us[0]), ("x", "u"),
                               "the running cost", extra=(0,))
    terminal = called_on_copies(cost.terminal, (traj.xs[-1],), ("x",), "the terminal cost")
    for name, c in (("running", running), ("terminal", terminal)):
        if not torch.is_tensor(c) or c.shape != (B,):
            got = shape_str(c) if torch.is_tensor(c) else type(c).__name__
            raise ShapeError(f"cost.{name} must return one value per batch element, "
                             f"shape ({B},); got {got} (the summed cost has shape "
                             f"{shape_str(traj.cost)})")


def check_tol(tol, x0: torch.Tensor):
    """A solve's tolerance: a positive number, or one per element of the flat batch of
    ``x0`` (B, n) (a tensor, returned as (B,) in ``x0``'s dtype and device)."""
    B = x0.shape[0]
    if torch.is_tensor(tol):
        if tol.numel() != B or not bool((tol > 0).all()):
            raise InvalidArgumentError(f"tol must be positive, one per batch element ({B}); "
                                       f"got shape {tuple(tol.shape)}")
        return tol.reshape(B).to(dtype=x0.dtype, device=x0.device)
    if not tol > 0:
        raise InvalidArgumentError(f"tol must be positive; got {tol}")
    return tol


def transitions_agree(pred: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                       rtol: float) -> torch.Tensor:
    """(...,) bool: ``pred`` (..., n1) matches ``x_next`` (..., n1) componentwise to
    ``rtol`` times the larger max-norm of ``x`` (..., n) and ``x_next``, both finite."""
    return (torch.isfinite(pred).all(-1) & torch.isfinite(x_next).all(-1)
            & within_rounding(pred - x_next, x, x_next, rtol))


def within_rounding(d: torch.Tensor, x: torch.Tensor, x_next: torch.Tensor,
                    rtol: float) -> torch.Tensor:
    """(...,) bool: the defect ``d`` (..., n1) of the transition from ``x`` (..., n) to
    ``x_next`` is within ``rtol`` times the larger max-norm of the two, componentwise."""
    scale = torch.maximum(x.abs().amax(-1), x_next.abs().amax(-1)).unsqueeze(-1)
    return (d.abs() <= rtol * scale).all(-1)
