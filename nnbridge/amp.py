r"""Loss scaling (``torch.amp.GradScaler``) under the optimizers that read the recorded
gradients.

A ``GradScaler`` multiplies the loss by :math:`S` before the backward pass, so ``p.grad``
*and every gradient the recorder keeps* (the output gradient, the pre-activation and
input gradients) are :math:`S` times the loss's.  torch.optim's optimizers only see
``p.grad``, which ``scaler.step(optimizer)`` (or ``scaler.unscale_(optimizer)`` before
it) divides by :math:`S`; the recorded gradients need the same division.

The optimizers take part in torch's protocol for optimizers that handle the scale
themselves (``_step_supports_amp_scaling = True``, as torch's fused Adam): ``scaler.step``
then sets ``optimizer.grad_scale`` (:math:`S`, or None where ``scaler.unscale_`` already
divided ``p.grad``, e.g. to clip it) and ``optimizer.found_inf`` before calling ``step``,
which skips the step where ``found_inf`` is set (the scaler lowers :math:`S` and the loop
goes on: the optimizer's state is untouched, the recorded passes dropped) and otherwise
divides ``p.grad`` and the recorded gradients by :math:`S`.  After ``scaler.unscale_``
the scale is no longer on the optimizer: the scaler passed as ``grad_scaler=`` gives it
(``GradScaler.get_scale()``, the scale of the passes since its last ``update()``), as for
kfac-pytorch's ``KFACPreconditioner(grad_scaler=)``; without it the step is refused.
:math:`S` is a power of two: the division is exact, and a float32 model trained with a
scaler (no overflow) takes the unscaled model's steps bit for bit.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from trajopt.errors import InvalidArgumentError

__all__ = ["LossScale", "amp_step", "take_loss_scale"]


@dataclass(frozen=True)
class LossScale:
    """What a ``GradScaler`` step asks of the optimizer's step.

    Attributes
    ----------
    skip : bool
        The scaler found inf / NaN gradients: take no step.
    inverse : Tensor or None
        :math:`1/S` (0-dim) for the recorded gradients (``p.grad`` is unscaled already);
        None without a scaler.
    """

    skip: bool = False
    inverse: torch.Tensor | None = None


def take_loss_scale(optimizer: torch.optim.Optimizer, grad_scaler=None, *,
                    records: bool = True) -> LossScale:
    """The loss scale of the recorded passes, with ``p.grad`` divided by it where the
    scaler left that to the optimizer (module docstring).

    Parameters
    ----------
    optimizer : torch.optim.Optimizer
        With ``_step_supports_amp_scaling = True``; ``grad_scale`` / ``found_inf`` set by
        ``GradScaler.step`` (absent when ``step`` is called directly: no scale).
    grad_scaler : torch.amp.GradScaler, optional
        The scaler, needed where ``scaler.unscale_(optimizer)`` ran before
        ``scaler.step`` and the step reads the recorded gradients.
    records : bool
        The step reads the recorded gradients (``feedback=False`` with a first-order
        curvature reads only ``p.grad``: it needs no scale).
    """
    found = getattr(optimizer, "found_inf", None)
    if found is None:
        return LossScale()
    if bool(found):
        return LossScale(skip=True)
    scale = getattr(optimizer, "grad_scale", None)
    if scale is not None:
        # as GradScaler.unscale_ computes it: the reciprocal in float64
        inverse = scale.double().reciprocal().float()
        for group in optimizer.param_groups:
            for p in group["params"]:
                if p.grad is not None:
                    p.grad.mul_(inverse.to(p.grad.device))
        return LossScale(inverse=inverse)
    if not records:
        return LossScale()
    if grad_scaler is None:
        raise InvalidArgumentError(
            f"grad_scaler: scaler.unscale_(optimizer) divided p.grad by the loss scale "
            f"before scaler.step(optimizer), but the gradients {type(optimizer).__name__} "
            f"recorded in the backward pass are still scaled and the scale is no longer "
            f"known to the step: pass the scaler to the optimizer, "
            f"{type(optimizer).__name__}(model, ..., grad_scaler=scaler)")
    return LossScale(inverse=torch.tensor(1.0 / grad_scaler.get_scale()))


def amp_step(step: Callable) -> Callable:
    """Decorate an optimizer's ``step``: where it raises, the ``grad_scale`` /
    ``found_inf`` that ``GradScaler.step`` set on the optimizer are removed (the scaler
    removes them only after a step that returns), so that they do not reach a later
    ``step()`` called without the scaler."""
    @functools.wraps(step)
    def wrapped(self, *args, **kwargs):
        try:
            return step(self, *args, **kwargs)
        except BaseException:
            for name in ("grad_scale", "found_inf"):
                self.__dict__.pop(name, None)
            raise
    return wrapped
