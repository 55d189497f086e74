r"""BatchNorm in training mode inside a DDP pass: the batch-coupled dynamics, the value
block diagonal.

In training mode a BatchNorm layer normalizes each sample with the mean and variance of
the batch, so :math:`x_{t+1}^i` depends on every sample :math:`x_t^j` and the per-sample
dynamics of DDPNOpt's Alg. 3 do not exist.  GT-DDP (Sec. 4.2, Fig. 4) approximates the
*value Hessian* of the batch-augmented state as block diagonal over the samples, having
measured its off-diagonal blocks to be negligible even with BN layers.  That is the one
approximation we make: in the optimizer's passes (backward and feedback) each BN in
training mode normalizes with the statistics of the batch it sees, exactly as in the
training loop's forward pass, and it is differentiated through them, so the operators of
a stage (:math:`f_x\,dX`, :math:`f_x^\top Y`, :math:`f_u^\top Y`) are the exact batch
Jacobians, coupling the samples; the value keeps one block (or factor) per sample.

The running statistics are detached during the passes (the module sees
``running_mean = None``): the passes never update them, and ``torch.func`` can batch the
operators over right-hand sides.

Measured (``docs/ddpnopt.md``, "Feedback with BatchNorm"): the alternative -- the recorded
batch's statistics held fixed, a per-sample affine map -- made the feedback large (about
the size of the step, against 0.5-8 % without BN) and training much worse than the base
optimizer on a BN ResNet; the deviations the feedback acts on are mostly common to the
batch, and a training-mode BN removes exactly the common part.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from contextlib import ExitStack, contextmanager

from torch import nn

__all__ = ["batch_coupled"]

_BN = nn.modules.batchnorm._BatchNorm


@contextmanager
def batch_coupled(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside the block, the BatchNorm layers in training mode among ``modules`` (and
    their submodules) normalize with the statistics of the batch they see and leave their
    running statistics alone (module docstring); restored on exit."""
    names = ("running_mean", "running_var", "num_batches_tracked")
    seen: set[int] = set()
    with ExitStack() as stack:
        for top in modules:
            for bn in top.modules():
                if not isinstance(bn, _BN) or not bn.training or id(bn) in seen:
                    continue
                seen.add(id(bn))
                saved = [getattr(bn, n) for n in names]

                def restore(bn=bn, saved=saved):
                    for n, v in zip(names, saved):
                        setattr(bn, n, v)
                stack.callback(restore)
                for n in names:
                    setattr(bn, n, None)
        yield
