r"""The rollout of an affine law on linear dynamics as one compiled CPU loop.

The closed loop :math:`u_t = \mathrm{ff}_t + K_t (x_t - \bar x_t)` (open loop without
:math:`K`) on :math:`x_{t+1} = A_t x_t + B_t u_t + c_t`, stage by stage as the torch loop
computes it, compiled by numba (:mod:`trajopt.riccati._kernels`): no per-operation
dispatch and no self-check -- it *is* the sequential loop, so its states carry the loop's
rounding, not the parallel scan's (:mod:`trajopt.lqr.affine_scan`). Sums are formed in
float64 whatever the dtype.

The rule (:func:`compiled_rollout_pays`): :func:`~trajopt.riccati.compiled.compilable`
tensors (CPU, float32 / float64, no gradient, numba importable) and ``batch * n * (n +
m) <=`` :data:`MAX_WORK`, measured (``docs/performance.md``, "A compiled recursion").
"""

from __future__ import annotations

import torch

from ..riccati.compiled import compilable, kernel_array, kernels

__all__ = ["compiled_rollout", "compiled_rollout_pays", "MAX_WORK"]

#: largest ``batch * n * (n + m)`` for which the DDP rollouts take the compiled loop:
#: measured (two threads, T = 100, closed loops, ``Chain.simulate`` with the running cost)
#: 2.2-4.5x faster than the scan or the torch loop up to 8,000 (n = 2, 8, 20 at batch
#: 256, 16, 16), 0.84x at 12,288 (n = 2, batch 2,048) and 0.24-0.6x beyond, where torch's
#: loop over the batch is vectorized and the compiled one is not
MAX_WORK = 8192


def compiled_rollout_pays(T: int, batch: int, n: int, m: int, *tensors: torch.Tensor
                          ) -> bool:
    """The rule of the module docstring."""
    return T >= 1 and batch * n * (n + m) <= MAX_WORK and compilable(*tensors)


def compiled_rollout(A: torch.Tensor, B: torch.Tensor, c: torch.Tensor | None,
                     ff: torch.Tensor, K: torch.Tensor | None, xbar: torch.Tensor | None,
                     x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """States and controls of the law.

    Parameters
    ----------
    A : (T or 1, n, n), B : (T or 1, n, m), c : (T or 1, n) or None
        The dynamics' matrices per stage (one for all stages where the first axis is 1).
    ff : (T, B, m)
        Feedforward controls.
    K : (T, B, m, n) or None, xbar : (T, B, n) or None
        Feedback gains and the states they are about (None: open loop).
    x0 : (B, n)

    Returns
    -------
    xs : (T+1, B, n), us : (T, B, m)
    """
    T, Bn, m = ff.shape
    n = x0.shape[-1]
    dt = x0.dtype

    def arr(v, ndim=1):
        return kernel_array(v, dt, ndim)
    xs = torch.empty(T + 1, Bn, n, dtype=dt)
    us = torch.empty(T, Bn, m, dtype=dt)
    kernels().rollout(arr(A), arr(B), arr(c, 2), arr(ff), arr(K, 4), arr(xbar, 3), arr(x0),
                      xs.numpy(), us.numpy())
    return xs, us
