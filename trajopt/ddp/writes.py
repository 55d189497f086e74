"""The models must not write into their arguments (``docs/ddp.md``, "Models are functions
of their arguments").

The solver hands the dynamics and the cost its own tensors: the states and controls of a
rollout, stacked once and read again by the derivatives and the next forward pass
(:attr:`trajopt.ddp.batch.Traj.points`).  A write such as ``x -= goal`` or ``x[..., 0] +=
dt * x[..., 1]`` changes the trajectory under the solver: a dynamics that advances its
state in place made every stored state the same tensor and gave a wrong solve with no
error.  Two cheap checks find it and name the model that wrote:

* :func:`guarded` around the first rollout of a solve: bitwise copies of the first
  stage's state and control, compared once the rollout is done (four operations); where
  they differ, the dynamics and the running cost are called on fresh copies to say which
  one writes;
* :func:`called_on_copies`: the cost's shape check (:func:`~trajopt.ddp.inputs.
  check_cost_shapes`) calls the running and terminal costs on copies and compares them,
  which finds a cost that writes into the stacked points of its one call over all stages.

A write that leaves the values as they were (``u *= 1``, or into zeros) is not seen by
them; the derivatives then meet it, where the replicated points are leaves that require
grad, and :func:`~trajopt.ddp.reverse.reverse_or_transforms` names the model too
(:data:`IN_PLACE_ON_LEAF`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from ..errors import InvalidArgumentError

__all__ = ["unchanged", "guarded", "called_on_copies", "write_message", "IN_PLACE_ON_LEAF"]

#: autograd's message for a write into a leaf that requires grad (the replicated points
#: of :mod:`trajopt.ddp.reverse` are such leaves)
IN_PLACE_ON_LEAF = "a leaf Variable that requires grad is being used in an in-place operation"

_BITS = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}


def _bits(v: torch.Tensor) -> torch.Tensor:
    """``v``'s bits as integers (a NaN equals itself there)."""
    if v.is_complex():
        v = torch.view_as_real(v)
    return v.view(_BITS[v.element_size()]) if v.is_floating_point() else v


def unchanged(copy: torch.Tensor, v: torch.Tensor) -> bool:
    """``v`` holds exactly the bits of ``copy`` (its earlier clone)."""
    return copy.shape == v.shape and copy.dtype == v.dtype and torch.equal(_bits(copy),
                                                                           _bits(v))


def write_message(who: str, arg: str) -> str:
    """The error message for ``who`` writing into ``arg`` (an argument's name, or a
    phrase)."""
    what = f"its argument {arg}" if arg in ("x", "u") else arg
    return (f"{who} wrote into {what} in place (as `x -= goal` or "
            f"`x[..., 0] += dt * x[..., 1]` do): the solver hands the models its own states "
            f"and controls, so the trajectory would change under it; compute new tensors "
            f"instead (`d = x - goal`, `torch.stack([...], -1)`) -- docs/ddp.md, \"Models "
            f"are functions of their arguments\"")


def _changed(args: tuple[torch.Tensor, ...], copies: tuple[torch.Tensor, ...],
             names: tuple[str, ...]) -> str | None:
    """The name of the first of ``copies`` that no longer holds its ``args``' bits."""
    return next((n for a, c, n in zip(args, copies, names) if not unchanged(a, c)), None)


def _written(call: Callable, args: tuple[torch.Tensor, ...], names: tuple[str, ...]
             ) -> str | None:
    """The name of the first of ``args`` that ``call`` writes into (called on copies);
    None where it writes into none of them or raises (the rollout reports that)."""
    copies = tuple(a.clone() for a in args)
    try:
        call(*copies)
    except Exception:   # noqa: BLE001 -- a failing model is reported where it runs
        return None
    return _changed(args, copies, names)


@contextmanager
def guarded(structure: Any, x0: torch.Tensor, u0: torch.Tensor | None) -> Iterator[None]:
    """Around a rollout from ``x0`` (B, n) with first control ``u0`` (B, m; None: no
    stages): raise :class:`~trajopt.errors.InvalidArgumentError` naming the model where
    the rollout changed either (module docstring)."""
    if u0 is None:
        yield
        return
    copies = (x0.clone(), u0.clone())
    yield
    if unchanged(copies[0], x0) and unchanged(copies[1], u0):
        return
    x, u = copies
    arg = _written(lambda a, b: structure.transition(0, a, b, [a]), (x, u), ("x", "u"))
    if arg is not None:
        raise InvalidArgumentError(write_message("the dynamics", arg))
    cost = getattr(structure, "cost", None)
    arg = None if cost is None else _written(lambda a, b: cost.running(a, b, 0), (x, u),
                                             ("x", "u"))
    who = "the running cost" if arg is not None else "the dynamics or the cost"
    raise InvalidArgumentError(write_message(who, arg or "its argument x or u"))


def called_on_copies(call: Callable, args: tuple[torch.Tensor, ...],
                     names: tuple[str, ...], who: str, extra: tuple = ()) -> Any:
    """``call(*args, *extra)`` on copies of the tensors ``args``; raise
    :class:`~trajopt.errors.InvalidArgumentError` naming ``who`` and the argument
    (``names``) where it wrote into one."""
    copies = tuple(a.clone() for a in args)
    out = call(*copies, *extra)
    arg = _changed(args, copies, names)
    if arg is not None:
        raise InvalidArgumentError(write_message(who, arg))
    return out
