r"""BatchNorm in training mode inside a DDP pass: the batch statistics held fixed.

In training mode a BatchNorm layer normalizes each sample with the mean and variance of
the batch, so :math:`x_{t+1}^i` depends on every sample :math:`x_t^j` and the per-sample
dynamics of DDPNOpt's Alg. 3 do not exist.  GT-DDP (Sec. 4.2, Fig. 4) keeps the value
Hessian block diagonal over the samples because its off-diagonal blocks are measured to
be negligible even with BN layers.  We make the matching approximation in the dynamics:
during the optimizer's backward and feedback passes each BN layer in training mode
normalizes with the statistics of the *recorded* batch, held fixed, i.e. it is the
per-channel affine map :math:`x \mapsto \gamma (x - \mu_B)/\sqrt{\sigma_B^2 + \epsilon}
+ \beta`.  What is dropped is the derivative through :math:`\mu_B, \sigma_B^2` (the
:math:`O(1/B)` coupling between samples, and the part of a sample's own derivative that
passes through the statistics).  The nominal values are exact: with the recorded inputs
the stages reproduce the forward pass.  The feedback (forward) pass runs the true
dynamics instead (:func:`live_statistics`: the statistics of the batch it sees).  The
running statistics are not touched by the optimizer's passes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager
from typing import Any

import torch
from torch import nn

from .stages import Stage

__all__ = ["training_batchnorms", "frozen_batch_statistics", "batch_statistics", "frozen",
           "input_statistics", "stage_statistics", "live_statistics"]

_BN = nn.modules.batchnorm._BatchNorm


def training_batchnorms(stage: Stage) -> list[nn.Module]:
    """The BatchNorm modules in training mode inside the stage's :math:`\\sigma`."""
    return [m for post in stage.post for m in post.modules()
            if isinstance(m, _BN) and m.training]


def input_statistics(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-channel mean and biased variance of ``x`` (B, C, ...): what a BatchNorm in
    training mode normalizes its input ``x`` with."""
    dims = [d for d in range(x.ndim) if d != 1]
    return x.mean(dims), x.var(dims, unbiased=False)


def stage_statistics(stage: Stage, x: torch.Tensor
                     ) -> dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]:
    """The batch statistics to hold fixed for a stage whose own module is a BatchNorm in
    training mode (its affine parameters as a stage, :class:`nnbridge.stages.NormStage`),
    from the stage's recorded input ``x``; empty otherwise."""
    m = stage.module
    if isinstance(m, _BN) and m.training:
        return {m: input_statistics(x)}
    return {}


@contextmanager
def _as_eval_with(bn: nn.Module, mean: torch.Tensor | None = None,
                  var: torch.Tensor | None = None) -> Iterator[None]:
    """``bn`` in eval mode normalizing with ``mean`` / ``var`` (None: only restore its
    mode and buffers on exit, e.g. around a calibration pass in training mode).  The
    buffers are restored in place: the module keeps its own tensors."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    training = bn.training
    originals = [getattr(bn, n) for n in names]
    values = [v.clone() if torch.is_tensor(v) else None for v in originals]
    try:
        if mean is not None:
            bn.train(False)
            bn.running_mean, bn.running_var = mean, var
            bn._nnbridge_frozen = True
        yield
    finally:
        bn.__dict__.pop("_nnbridge_frozen", None)
        bn.train(training)
        for name, original, value in zip(names, originals, values):
            setattr(bn, name, original)
            if value is not None:
                original.copy_(value)


def batch_statistics(bns: Sequence[nn.Module], run: Callable[[], Any]
                     ) -> tuple[Any, dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]]:
    """``run()``'s result and the batch mean and (biased) variance each BN layer of
    ``bns`` normalizes with during it (in training mode; buffers restored afterwards, so
    the running statistics are not updated twice)."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}

    def capture(mod, args):
        stats[mod] = input_statistics(args[0])

    with ExitStack() as stack, torch.no_grad():
        for bn in bns:
            stack.enter_context(_as_eval_with(bn))
            handle = bn.register_forward_pre_hook(capture)
            stack.callback(handle.remove)
        result = run()
    return result, stats


@contextmanager
def frozen(stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]]) -> Iterator[None]:
    """Inside the block each BN layer of ``stats`` normalizes with its entry, held fixed
    (mode and running statistics restored on exit)."""
    with ExitStack() as stack:
        for bn, (mean, var) in stats.items():
            stack.enter_context(_as_eval_with(bn, mean, var))
        yield


@contextmanager
def frozen_batch_statistics(stages: Sequence[Stage], inputs: Sequence[torch.Tensor]
                            ) -> Iterator[None]:
    """Inside the block, every BatchNorm in training mode within the stages' maps
    normalizes with the statistics of the recorded batch ``inputs`` (stage inputs), held
    fixed (module docstring); modes and running statistics are restored on exit."""
    stats: dict[nn.Module, tuple[torch.Tensor, torch.Tensor]] = {}
    for st, x in zip(stages, inputs):
        stats.update(stage_statistics(st, x))
        bns = training_batchnorms(st)
        if bns:
            stats.update(batch_statistics(bns, lambda st=st, x=x: st.forward(x))[1])
    with frozen(stats):
        yield


@contextmanager
def live_statistics(modules: Sequence[nn.Module]) -> Iterator[None]:
    """Inside the block the BatchNorm layers among ``modules`` that were in training mode
    when the step began (now frozen, :func:`frozen`) normalize with the statistics of
    whatever batch they see -- the network's true dynamics -- and their running statistics
    are left as they were (they update throw-away copies)."""
    with ExitStack() as stack:
        for bn in modules:
            if not isinstance(bn, _BN) or not getattr(bn, "_nnbridge_frozen", False):
                continue
            saved = (bn.training, bn.running_mean, bn.running_var, bn.num_batches_tracked)

            def restore(bn=bn, saved=saved):
                bn.training, bn.running_mean, bn.running_var, bn.num_batches_tracked = saved
            stack.callback(restore)
            bn.training = True
            bn.running_mean = None if saved[1] is None else saved[1].clone()
            bn.running_var = None if saved[2] is None else saved[2].clone()
            bn.num_batches_tracked = (None if saved[3] is None else saved[3].clone())
        yield
