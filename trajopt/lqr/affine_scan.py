r"""The states of an affine recurrence by a parallel scan: the rollout of linear dynamics.

A closed loop :math:`u_t = k_t + K_t (x_t - \bar x_t)` on linear dynamics
:math:`x_{t+1} = A_t x_t + B_t u_t + c_t` is the affine recurrence

.. math::

    x_{t+1} = M_t x_t + v_t, \qquad M_t = A_t + B_t K_t, \quad
    v_t = B_t (k_t - K_t \bar x_t) + c_t .

The maps :math:`e_t(x) = M_t x + v_t` compose associatively,
:math:`(M_j, v_j) \circ (M_i, v_i) = (M_j M_i, M_j v_i + v_j)`, so the states are the prefix
compositions :math:`x_{t+1} = (e_t \circ \dots \circ e_0)(x_0)`, computed here in
:math:`\lceil \log_2 T \rceil` rounds of batched operations over all stages (Hillis-Steele,
as the values of :mod:`trajopt.riccati.scan`): a few dozen torch operations for T = 100
where the stage-by-stage loop takes several hundred.  The first map is folded into a
constant one, :math:`e_0 \equiv M_0 x_0 + v_0`, so every prefix is a state and round
:math:`k` only multiplies the maps of the stages :math:`t \ge 2^{k+1}` that are not yet
complete.

**The self-check** (:func:`checked_states`).  The scan reaches :math:`x_{t+1}` through
products of up to T maps, not through :math:`x_t`, so where those products are large and
the states small (an unstable loop held near a point by its inputs) it is less accurate
than the loop.  The callers recompute every transition from the scanned states in one
batched product; the residuals' own recurrence, scanned, estimates the scanned states'
distance from the exact trajectory and corrects them.  The states are accepted once a
correction is within :data:`FORWARD` eps of the magnitudes :math:`|A_t||x_t| +
|B_t||u_t| + |c_t| + |x_{t+1}|` (the largest entry of each; :math:`|u_t|` the magnitudes
of the law's terms, :math:`|k_t| + |K_t|(|x_t| + |\bar x_t|)`, whose rounding reaches
:math:`x_{t+1}` through :math:`B_t`) -- after at most :data:`REFINEMENTS` corrections,
each shrinking the estimate by :data:`CONVERGENCE` -- and the corrected states satisfy
every transition to :data:`CONSISTENCY` eps of the same (:func:`consistent`).  Otherwise
the callers run the loop.  ``docs/performance.md`` ("Fourth round", "Fifth round") has
the measurements behind the rule (:func:`rollout_pays`) and the bounds.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from .._linalg import mv as _mv
from ..riccati.scan import MIN_STAGES
from .stages import RANK, STAGE_ARGS, Stage, stage_cost, terminal_cost

__all__ = ["scan_states", "checked_states", "scan_closed_loop", "consistent",
           "rollout_pays", "CONSISTENCY", "FORWARD", "REFINEMENTS",
           "CONVERGENCE", "STALLED", "MAX_WORK", "MAX_WORK_CUDA"]

#: largest work for which the scan replaces the loop on the CPU: ``batch * n^2`` where
#: every element has its own maps (a closed loop), ``n (n + batch)`` where they share them
#: (one model's open loop, one LQR problem from many initial states), measured
#: (``docs/performance.md``, "Fourth round")
MAX_WORK = 512
#: the same on a GPU, where kernel launches bound the loop: measured on an H200, T = 100,
#: n = 8 / 20 (``benchmarks/bench_rollout.py``; ``docs/performance.md``, "Fifth round"
#: and "Sixth round"): the scan 1.5-3.8x faster up to this work (n = 20, batch 256),
#: 0.88x at 131,072 (n = 8, batch 2,048), 0.3-1.0x beyond
MAX_WORK_CUDA = 102400
#: accepted residual of a scanned transition, in eps of its magnitudes (:func:`consistent`):
#: a few dozen roundings, the order of what a loop's step commits for a few dozen terms
CONSISTENCY = 32
#: accepted estimate of the scan's forward error, in eps of the states' magnitudes
#: (:func:`checked_states`)
FORWARD = 1024
#: most corrections of the scanned states, and the factor by which each must shrink the
#: estimate: :func:`checked_states`
REFINEMENTS = 4
CONVERGENCE = 4
#: accepted estimate, relative to the states' magnitudes, once the corrections have
#: stopped shrinking it after shrinking it at least once: the transitions' own rounding
#: propagated along the horizon, the order of the loop's forward error on long decays
#: (4e3-5e4 eps of float64 at T = 600-2,000, measured).  2^-36 (65,536 eps of float64);
#: below one float32 rounding, so float32 keeps to :data:`FORWARD` (:func:`checked_states`)
STALLED = 2.0 ** -36


def rollout_pays(T: int, batch: int, n: int, shared: bool,
                 device: torch.device | None = None) -> bool:
    """The callers' rule: the scan for ``T`` stages of ``batch`` states of size ``n`` on
    ``device``, whose maps are ``shared`` by the batch or each element's own."""
    bound = MAX_WORK_CUDA if device is not None and device.type == "cuda" else MAX_WORK
    work = n * (n + batch) if shared else batch * n * n
    return T >= MIN_STAGES and batch > 0 and work <= bound


def scan_states(M: torch.Tensor, v: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
    r"""States of :math:`x_{t+1} = M_t x_t + v_t` from ``x0``, for G groups of R states
    that share their maps (the columns of ``v`` and ``x0``): R = 1 for maps of their own
    (a closed loop per batch element), G = 1 for one map over a whole batch (an open loop
    of one model, one LQR problem from many initial states).

    Parameters
    ----------
    M : (T, G, n, n)
    v : (T, G, n, R)
    x0 : (G, n, R)

    Returns
    -------
    (T+1, G, n, R)
        :math:`x_0, \dots, x_T` (up to rounding; see the module's self-check).
    """
    T, G, n, R = v.shape
    # element 0 as the constant map x_1: every prefix that contains it is a state
    w = torch.cat([torch.baddbmm(v[0], M[0], x0).unsqueeze(0), v[1:]])
    rest = M[1:]  # the maps of the incomplete stages t >= d: rest[i] is stage d + i
    d = 1
    while d < T:
        # w_t <- M_t w_{t-d} + w_t for t >= d
        upd = torch.baddbmm(w[d:].reshape(-1, n, R), rest.reshape(-1, n, n),
                            w[:T - d].reshape(-1, n, R))
        w = torch.cat([w[:d], upd.view(T - d, G, n, R)])
        if 2 * d < T:  # M_t <- M_t M_{t-d} for the stages still incomplete (t >= 2d)
            rest = torch.matmul(rest[d:], rest[:T - 2 * d])
        d *= 2
    return torch.cat([x0.unsqueeze(0), w])


def checked_states(M: torch.Tensor, v: torch.Tensor, x0: torch.Tensor,
                   transitions: Callable) -> torch.Tensor | None:
    r"""States of :math:`x_{t+1} = M_t x_t + v_t` by :func:`scan_states`, refined and
    checked against the caller's own transitions.

    Parameters
    ----------
    M : (T, G, n, n)
        One map per stage for every element (G = N) or for all of them (G = 1).
    v : (T, N, n)
    x0 : (N, n)
    transitions : callable
        ``transitions(xs) -> (predicted, scale)``: for states ``xs`` (T+1, N, n), the
        transitions :math:`x_{t+1}` as the caller's model computes them from
        :math:`x_t` (T, N, n), and the magnitudes of their terms (see
        :func:`consistent`).

    Returns
    -------
    (T+1, N, n), or None where the scan is not accurate enough (the caller runs its
    loop).

    Notes
    -----
    Iterative refinement: with the residuals :math:`r_t = \mathrm{predicted}_t - x_{t+1}`
    of the states, the correction :math:`\delta_{t+1} = M_t \delta_t + r_t`,
    :math:`\delta_0 = 0`, is scanned the same way.  It is the states' distance from the
    exact trajectory of the recurrence (up to its own rounding, relative to the
    rounding-sized residuals).  The states are corrected by it; where it is within
    :data:`FORWARD` eps of the states' magnitudes they are accepted if they pass
    :func:`consistent`.  Where it is not, the corrected states are refined again, up to
    :data:`REFINEMENTS` corrections in all, as long as each shrinks the estimate by
    :data:`CONVERGENCE`.  A correction that does not has reached the floor of the
    residuals' own rounding, the transitions' rounding propagated along the horizon
    (what the loop commits too): after at least one correction that did shrink it (the
    scan's own error removed), the states are accepted there if the estimate is within
    :data:`STALLED` (relative) and they pass :func:`consistent`, else None:

    * states that decay by orders of magnitude along the horizon (a stable closed loop
      over a long horizon: 1e-90 after 300 stages, 1e-300 after 1,000) are scanned with
      an error relative to the products of maps over many stages, not to the state; each
      correction shrinks the estimate (~40x a correction, measured) until it is within
      :data:`FORWARD`, or stalls at the floor, measured at 1e3-2e4 eps where the loop
      itself is 3e3-5e4 eps from the exact states (T = 600-2,000);
    * where the recurrence amplifies rounding -- an unstable loop held near a point by
      its inputs, whose scanned states drift off it -- the floor is the amplified
      rounding (7e20 eps for ``x' = 1.7 x - 0.7`` at T = 100), which the first
      corrections do not shrink (``x' = 1.05 x - 0.05``, T = 200: 1.4e4 -> 1.2e4 eps,
      where the loop is exact), and None is returned.

    Magnitudes are taken no smaller than the dtype's smallest normal number: below it
    (subnormal states of a long decay) rounding is absolute, for the loop too.
    """
    T, N, n = v.shape
    if M.shape[1] == 1:  # one map: the states are the columns of one recurrence
        def fold(z):
            return z.transpose(-1, -2).unsqueeze(1)

        def unfold(w):
            return w.squeeze(1).transpose(-1, -2)
    else:
        def fold(z):
            return z.unsqueeze(-1)

        def unfold(w):
            return w.squeeze(-1)
    xs = unfold(scan_states(M, fold(v), fold(x0.unsqueeze(0))[0]))
    zero = fold(torch.zeros_like(x0).unsqueeze(0))[0]
    eps = torch.finfo(xs.dtype).eps
    previous, converged = float("inf"), False
    for _ in range(REFINEMENTS):
        predicted, scale = transitions(xs)
        # the correction to the exact trajectory of the recurrence: the residuals' own
        # recurrence, scanned
        delta = unfold(scan_states(M, fold(predicted - xs[1:]), zero))[1:]
        error = float((delta.abs().amax(-1) / _size(scale, xs[1:])).max().detach()) / eps
        xs = torch.cat([xs[:1], xs[1:] + delta])
        stalled = not error < previous / CONVERGENCE  # (or NaN)
        if error <= FORWARD or stalled and converged and error * eps <= STALLED:
            predicted, scale = transitions(xs)
            return xs.contiguous() if consistent(xs[1:], predicted, scale) else None
        if stalled:  # at the floor of its own rounding, far above the states: amplified
            return None
        converged, previous = previous < float("inf"), error
    return None


def _size(scale: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
    """Per state, the largest magnitude of a transition's terms and of its result, no
    smaller than the smallest normal number of the dtype."""
    return (scale + x_next.abs()).amax(-1).clamp_min(torch.finfo(x_next.dtype).tiny)


def consistent(x_next: torch.Tensor, predicted: torch.Tensor, scale: torch.Tensor) -> bool:
    """Whether scanned states ``x_next`` (..., n) equal the transitions ``predicted``
    recomputed from the scanned states, to :data:`CONSISTENCY` eps of ``scale`` (the
    magnitudes of the terms, elementwise, of the same shape), state by state in the max
    norm.  NaN and inf fail."""
    tol = CONSISTENCY * torch.finfo(x_next.dtype).eps
    err = (x_next - predicted).abs().amax(-1)
    return bool((err <= tol * _size(scale, x_next)).all())


def _time_first(v: torch.Tensor | None, rank: int, nbatch: int) -> torch.Tensor | None:
    """A stacked array (..., T, core) as (T, 1.., ..., core) with ``nbatch`` batch axes."""
    if v is None:
        return None
    v = v.movedim(-rank - 1, 0)
    return v.reshape(v.shape[0], *[1] * (nbatch - v.ndim + 1 + rank), *v.shape[1:])


def scan_closed_loop(problem, Ks: list, ks: list, x0: torch.Tensor):
    """The rollout of :func:`trajopt.solve_lqr`'s closed loop ``u_t = K_t x_t + k_t`` (the
    ``Ks``, ``ks`` lists of its recursion) from ``x0`` (..., n) on the stacked stages of
    ``problem`` (a :class:`~trajopt.lqr.finite.LQR`) by the scan: the state list (T+1),
    the control list (T) and the total cost, as the stage loop returns them, or None
    where the stages are not stacked, :func:`rollout_pays` says no or the self-check
    (:func:`checked_states`) fails."""
    if not problem.stacked:
        return None
    T, arr = problem.T, problem.arrays
    Kt, kt = torch.stack(Ks), torch.stack(ks)  # (T, *problem batch, m, n), (T, ..., m)
    batch = torch.broadcast_shapes(x0.shape[:-1], Kt.shape[1:-2], kt.shape[1:-1], *(
        arr[name].shape[:-RANK[name] - 1] for name in STAGE_ARGS if arr[name] is not None))
    n, N, nb = x0.shape[-1], batch.numel(), len(batch)
    shared = all(arr[name] is None or arr[name].shape[:-RANK[name] - 1].numel() == 1
                 for name in ("A", "B", "c")) and Kt.shape[1:-2].numel() == 1 \
        and kt.shape[1:-1].numel() == 1
    if not rollout_pays(T, N, n, shared, x0.device):
        return None
    st = Stage(**{name: _time_first(arr[name], RANK[name], nb) for name in STAGE_ARGS})
    Kt = Kt.reshape(T, *[1] * (nb + 3 - Kt.ndim), *Kt.shape[1:])
    kt = kt.reshape(T, *[1] * (nb + 2 - kt.ndim), *kt.shape[1:])
    M = st.A + st.B @ Kt
    v = _mv(st.B, kt) if st.c is None else _mv(st.B, kt) + st.c
    Kabs = Kt.abs()

    def transitions(xs):  # the dynamics' own, from the scanned states, and magnitudes
        X = xs[:-1].reshape(T, *batch, n)
        U = _mv(Kt, X) + kt
        pred = _mv(st.A, X) + _mv(st.B, U)
        scale = _mv(st.A.abs(), X.abs()) + _mv(st.B.abs(), _mv(Kabs, X.abs()) + kt.abs())
        if st.c is not None:
            pred, scale = pred + st.c, scale + st.c.abs()
        return pred.reshape(T, N, n), scale.reshape(T, N, n)
    xs = checked_states(M.reshape(T, 1, n, n) if shared else
                        M.expand(T, *batch, n, n).reshape(T, N, n, n),
                        v.expand(T, *batch, n).reshape(T, N, n),
                        x0.expand(*batch, n).reshape(N, n), transitions)
    if xs is None:
        return None
    xs = xs.reshape(T + 1, *batch, n)
    X = xs[:-1]
    U = _mv(Kt, X) + kt
    total = stage_cost(st, X, U).sum(0) + terminal_cost(*problem.terminal, xs[-1])
    return list(xs.unbind(0)), list(U.unbind(0)), total
