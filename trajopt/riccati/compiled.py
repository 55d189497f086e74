r"""The Riccati recursion as one compiled CPU loop, for small problems.

A backward pass of a small problem (one 8-state LQ problem, a pendulum) is a few thousand
torch operations on a few dozen numbers each: ~3-6 us of dispatch per operation, so
~10-20 ms for 100 stages whatever the arithmetic (``docs/performance.md``). This module
runs the same recursion -- the expansion, the regularized Cholesky gains and the general
value update of :mod:`trajopt.riccati.step`, stage by stage -- as one loop compiled by
`numba <https://numba.pydata.org>`_ (machine code, no per-operation dispatch): ~0.3-2 us
per stage and element for n + m up to 11, against ~100-300 us per stage in torch.

Per element ``b`` and stage ``t = T-1, ..., 0``, with ``V = (V_x, V_xx)`` of stage ``t+1``:

.. math::

    J &= L_t + F_t^\top [\,V_x + V_{xx} c_t \mid V_{xx} F_t\,]
         \quad\text{(the packed expansion of } \texttt{expand\_q\_joint}\text{)}, \\
    [k \mid K] &= -(Q_{uu} + \mu_b I)^{-1} [Q_u \mid Q_{ux}]
         \quad\text{(Cholesky of the lower triangle, as } \texttt{cholesky\_ex}\text{)}, \\
    P &= J_{:, :1+n} + J_{:, 1+n:} [k \mid K], \qquad
    [V_x \mid V_{xx}] = P_x + K^\top P_u \ \text{(}V_{xx}\text{ symmetrized)},

and the expected change :math:`[\sum k^\top Q_u, \tfrac12 \sum k^\top Q_{uu} k]` from
:math:`k^\top (Q_u + Q_{uu} k)`. Under control limits (:class:`BoxLimits`) ``k`` and the
free rows of ``K`` come from the box QP of :func:`trajopt.riccati.boxqp.box_qp`, the same
steps compiled, and the rows of clamped controls of ``K`` are zero
(:class:`~trajopt.riccati.policy.BoxGains`). The stages are the outer loop and the batch
elements the inner one, so each stage's data are read in memory order. An element whose
regularized :math:`Q_{uu}` is not positive definite (or whose box QP fails) at some stage
gets ``ok = False`` and NaN from that stage down (the torch recursion leaves meaningless
numbers there; both are flagged).

The arithmetic is done in float64 whatever the input dtype (float32 results are rounded
once at the end), so it equals the torch recursion to the rounding of the input dtype,
not bitwise.

**When it is used** (:func:`compiled_pays`): numba importable, a CPU tensor of float32 or
float64 that needs no gradient and is not under a torch.func transform, and
``batch * (n + m)^3 <=`` :data:`MAX_WORK` (measured with two threads, T = 50: the
compiled loop 1.2-35x faster than the torch recursion up to it, from one pendulum to 64
problems of 12 states or one of 50 states; 0.4-0.85x from 500,000, where the torch
recursion's batched products amortize its per-operation cost; re-measured with the
loop's batch cut between two threads: 1.5-2.1x under it, 0.43-1.04x over it). A pass
of ``T * batch * (n + m)^3 >=`` 2 :data:`MIN_WORK_PER_THREAD` runs its batch in slices on
the caller's intra-op thread count (:func:`trajopt._threads.in_slices`; bitwise the
one-thread pass). The first call in a process loads the compiled loop from numba's
cache (``__pycache__`` beside this file or numba's user cache directory): ~1 s; the very
first on a machine compiles it, ~5-20 s per dtype. Where numba cannot be imported the
solvers warn once and use the torch recursion.
"""

from __future__ import annotations

import functools
import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch

from .._threads import in_slices, slices_for
from . import boxqp

__all__ = ["CompiledPass", "BoxLimits", "compiled_available", "compilable",
           "compiled_pays", "compiled_recursion", "kernel_array", "kernels", "MAX_WORK"]

#: largest ``batch * (n + m)^3`` for which the solvers take the compiled loop
#: (``docs/performance.md``, "Seventh round")
MAX_WORK = 2 ** 18

#: smallest ``T * batch * (n + m)^3`` a thread of a pass is given (``docs/performance.md``,
#: "Eleventh round"): smaller passes run on one thread
MIN_WORK_PER_THREAD = 2 ** 15

#: set to "0" to keep the solvers off the compiled loop (a debugging aid: the torch
#: recursion is then used everywhere)
ENV_SWITCH = "TRAJOPT_COMPILED"


@functools.cache
def kernels():
    """The compiled loops (:mod:`trajopt.riccati._kernels`: numba imported on first use,
    each loop compiled or loaded from numba's cache on its first call), or None without
    numba."""
    try:
        from . import _kernels
    except Exception as exc:  # not installed, or built against another numpy
        warnings.warn(f"numba could not be imported ({exc}); the solvers use the torch "
                      "recursion for small problems (slower, the same results)",
                      RuntimeWarning, stacklevel=2)
        return None
    return _kernels


def compiled_available() -> bool:
    """Whether the compiled loops can run here (numba importable, not switched off by the
    environment variable ``TRAJOPT_COMPILED=0``)."""
    return os.environ.get(ENV_SWITCH, "1") != "0" and kernels() is not None


def compilable(*tensors: torch.Tensor) -> bool:
    """Whether a compiled loop may read and write ``tensors``: CPU, float32 / float64, no
    gradient, not under a torch.func transform, and :func:`compiled_available`."""
    for v in tensors:
        if (v.device.type != "cpu" or v.dtype not in (torch.float32, torch.float64)
                or v.requires_grad or torch._C._functorch.is_functorch_wrapped_tensor(v)):
            return False
    return compiled_available()


def compiled_pays(T: int, batch: int, n: int, m: int, *tensors: torch.Tensor) -> bool:
    """The solvers' rule for ``T`` stages of ``batch`` problems with ``n`` states and
    ``m`` controls whose data are ``tensors`` (see the module docstring)."""
    return T >= 1 and batch * (n + m) ** 3 <= MAX_WORK and compilable(*tensors)


@dataclass(frozen=True)
class CompiledPass:
    """One backward pass of :func:`compiled_recursion` (stages lead).

    Attributes
    ----------
    kK : (T, B, m, 1+n)
        The joint gains ``[k | K]``.
    Vx : (T, B, n), Vxx : (T, B, n, n)
        The value derivatives of stages 0 .. T-1.
    dV : (B, 2)
        ``[sum_t k'Q_u, 1/2 sum_t k'Q_uu k]``.
    ok : (B,) bool
        Every stage's regularized ``Q_uu`` positive definite and ``dV`` finite.
    """

    kK: torch.Tensor
    Vx: torch.Tensor
    Vxx: torch.Tensor
    dV: torch.Tensor
    ok: torch.Tensor


@dataclass(frozen=True)
class BoxLimits:
    """Control limits of a pass: ``lo <= u_t + k <= hi``.

    Attributes
    ----------
    lo, hi : (m,) or (T, B, m)
        The same limits at every stage, or per stage and element (a leading dimension of
        size 1 broadcasts).
    us : (T, B, m)
        The nominal controls.
    warm : (T, B, m) or None
        Warm starts of the box QPs (the last feedforward terms).
    """

    lo: torch.Tensor
    hi: torch.Tensor
    us: torch.Tensor
    warm: torch.Tensor | None = None


def kernel_array(v: torch.Tensor | None, dt: torch.dtype, ndim: int = 1) -> np.ndarray:
    """``v`` as a C-contiguous numpy array of dtype ``dt`` for the compiled kernels (a
    view where it already is one: the detach and the cast are dispatched operations,
    made only where needed); None (an absent input): an empty array of ``ndim``
    dimensions."""
    if v is None:
        return np.zeros((0,) * ndim, dtype=np.float64 if dt == torch.float64 else np.float32)
    if v.requires_grad or v.dtype != dt:
        v = v.detach().to(dt)
    return np.ascontiguousarray(v.numpy())


def compiled_recursion(F: torch.Tensor, L: torch.Tensor, c: torch.Tensor | None,
                       Vx: torch.Tensor, Vxx: torch.Tensor, mu: torch.Tensor,
                       limits: BoxLimits | None = None) -> CompiledPass:
    """The regularized Riccati recursion of the module docstring over stacked stages.

    Parameters
    ----------
    F : (T, B, n, n+m)
        ``[f_x f_u]`` per stage (:func:`~trajopt.riccati.expansion.joint_blocks`).
    L : (T, B, n+m, 1+n+m)
        The packed cost blocks.
    c : (T, B, n) or None
        Affine offsets of the dynamics.
    Vx : (B, n), Vxx : (B, n, n)
        The terminal value derivatives.
    mu : (B,)
        Levenberg-Marquardt regularization of ``Q_uu`` per element.
    limits : BoxLimits or None
        Control limits: the gains of :class:`~trajopt.riccati.policy.BoxGains` (one
        player) instead of the Cholesky gains.

    Callers check :func:`compiled_pays` first (CPU, float32 / float64, no autograd).
    """
    T, B, n, nm = F.shape
    m = nm - n
    dt = F.dtype

    def arr(v, ndim=1):
        return kernel_array(v, dt, ndim)

    box = limits if limits is not None else BoxLimits(None, None, None)
    kK = torch.empty(T, B, m, 1 + n, dtype=dt)
    Vxs = torch.empty(T, B, n, dtype=dt)
    Vxxs = torch.empty(T, B, n, n, dtype=dt)
    dV = torch.empty(B, 2, dtype=torch.float64)
    ok = torch.empty(B, dtype=torch.bool)
    lo, hi = (None if v is None else v.reshape(1, 1, -1) if v.ndim == 1 else v
              for v in (box.lo, box.hi))   # (T or 1, B or 1, m)
    args = (arr(F), arr(L), arr(c, 3), arr(Vx), arr(Vxx), arr(mu), arr(lo, 3),
            arr(hi, 3), arr(box.us, 3), arr(box.warm, 3),
            np.array([boxqp.MAX_ITER, boxqp.TOL, boxqp.ARMIJO, boxqp.SHRINK,
                      boxqp.MIN_STEP]),
            kK.numpy(), Vxs.numpy(), Vxxs.numpy(), dV.numpy(), ok.numpy())
    in_slices(functools.partial(kernels().recursion, *args), B,
              slices_for(T * B * (n + m) ** 3, B, MIN_WORK_PER_THREAD))
    return CompiledPass(kK, Vxs, Vxxs, dV.to(dt), ok)
