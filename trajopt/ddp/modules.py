"""``torch.nn.Module`` models: the checks a learned dynamics or cost needs before a solve.

A module is called like a function (``module(x, u)`` or ``module(x, u, t)``, its
``forward``'s signature decides: :func:`~trajopt.ddp.models.Dynamics`), but a module
left in training mode with dropout or batch normalization -- the usual state right after
training it -- is not a function of each row of its batch: dropout is random (and
``torch.func.vmap`` refuses it with "called random operation while in randomness error
mode"), batch normalization mixes the rows through the batch statistics.  DDP needs a
deterministic function of each row, so :func:`check_eval_mode` refuses such a module by
name, before any work, and says to call ``.eval()``.
"""

from __future__ import annotations

import types

import torch
from torch import nn

from ..errors import InvalidArgumentError

__all__ = ["check_eval_mode", "train_mode_layers", "as_row_batch"]

def _random_or_coupling(m: nn.Module) -> bool:
    """``m`` in training mode draws random numbers (dropout with ``p > 0``, RReLU) or
    couples the rows of its batch (batch normalization); ``Dropout(0.0)`` -- a common
    configured default -- is the identity (a review, session 30)."""
    if not m.training:
        return False
    if isinstance(m, nn.modules.dropout._DropoutNd):
        return m.p > 0
    return isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.RReLU))


def train_mode_layers(module: nn.Module) -> list[str]:
    """The dotted names (``"net.1"``; ``""`` for ``module`` itself) of the layers of
    ``module`` whose training mode makes it random or couples its rows."""
    return [name for name, m in module.named_modules() if _random_or_coupling(m)]


def _modules(obj, depth: int = 3) -> list[nn.Module]:
    """The modules behind ``obj``: itself, what a function closes over (a wrapper
    ``lambda x, u, t: module(x, u)``) and what a trajopt model holds, ``depth`` levels
    down."""
    if isinstance(obj, nn.Module):
        return [obj]
    if depth == 0 or obj is None or isinstance(obj, torch.Tensor):
        return []
    if isinstance(obj, types.MethodType):
        return _modules(obj.__self__, depth - 1)
    if isinstance(obj, types.FunctionType):
        held = [c.cell_contents for c in obj.__closure__ or () if _filled(c)]
    elif type(obj).__module__.startswith("trajopt."):
        held = [w for v in getattr(obj, "__dict__", {}).values()
                for w in (v if isinstance(v, (list, tuple)) else (v,))]
    else:
        held = []
    return [m for h in held for m in _modules(h, depth - 1)]


def _filled(cell) -> bool:
    try:
        cell.cell_contents  # noqa: B018 (an empty cell raises)
    except ValueError:
        return False
    return True


def check_eval_mode(*named: tuple[str, object]) -> None:
    """Raise :class:`~trajopt.errors.InvalidArgumentError` naming the model (pairs
    ``("the dynamics", dynamics)``), the module and its layers when a module behind it
    is in training mode with dropout or batch-normalization layers."""
    for name, model in named:
        seen: set[int] = set()
        for module in _modules(model):
            if id(module) in seen:
                continue
            seen.add(id(module))
            layers = train_mode_layers(module)
            if layers:
                where = ", ".join(f"{type(module).__name__}{'.' + n if n else ''} "
                                  f"({type(module.get_submodule(n)).__name__})"
                                  for n in layers[:4])
                raise InvalidArgumentError(
                    f"{name} is an nn.Module ({type(module).__name__}) in training mode "
                    f"with dropout / batch normalization: {where}. In train() mode dropout "
                    f"is random and batch normalization mixes the rows of a batch, so it "
                    f"is not a function of each state and control; call "
                    f"{type(module).__name__.lower()}.eval() before solving (and .train() "
                    f"after, to train it further)")


def as_row_batch(fn):
    """``fn`` itself, or, where a batch normalization behind it takes batches only
    (``BatchNorm1d`` refuses one point, also in eval mode, where it is an affine map of
    each row), ``fn`` with its state and control given as a batch of one row and the row
    returned: for the derivatives taken point by point under ``vmap`` (DDP mode's second
    derivatives, time-varying models).  Models without one are called as before."""
    if not any(isinstance(m, nn.modules.batchnorm._BatchNorm)
               for module in _modules(fn) for m in module.modules()):
        return fn
    return lambda x, u, *t: fn(x.unsqueeze(0), u.unsqueeze(0), *t).squeeze(0)
