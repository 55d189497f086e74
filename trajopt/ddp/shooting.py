r"""Multiple shooting: a DDP solve from given states that the controls do not reach.

``DDPSolver(..., shooting="multiple")`` takes the states ``xs0`` of a solve as they are --
a guess (crocoddyl's ``init_xs``, e.g. ``[x0] * (T + 1)``; an interpolation to a goal; the
previous MPC plan) -- instead of rolling the controls out.  Their defects

.. math::  \bar f_t = f_t(\bar x_t, \bar u_t) - \bar x_{t+1}, \qquad t = 0, \dots, T-1

(the first state is ``x0`` itself) enter the backward pass as the affine offsets of the
linearized dynamics (:class:`~trajopt.riccati.expansion.DenseStage` ``c``), and a step of
size :math:`\alpha` closes the fraction :math:`\alpha` of each defect:

.. math::  \hat x_0 = x_0, \quad
           \hat u_t = \bar u_t + \alpha k_t + K_t (\hat x_t - \bar x_t), \quad
           \hat x_{t+1} = f_t(\hat x_t, \hat u_t) - (1 - \alpha) \bar f_t ,

so the new defects are :math:`(1 - \alpha) \bar f_t` and a full step leaves a rollout: the
feasibility-driven DDP of Mastalli et al. (2020), crocoddyl's ``SolverFDDP``.  From there
on the solve is the single-shooting one.

**Expected change.** In the linearization a step :math:`\alpha` moves the trajectory by
:math:`\alpha` times the full step's deviations, :math:`\delta x_0 = 0`,
:math:`\delta u_t = k_t + K_t \delta x_t`, :math:`\delta x_{t+1} = F_t [\delta x_t;
\delta u_t] + \bar f_t`, so the local model changes by exactly :math:`\alpha G +
\tfrac12 \alpha^2 H`, with :math:`G` the cost's gradient and :math:`H` its Hessian along
those deviations (:func:`model_change`).  That is exact for an LQ problem, and without
defects it is the single-shooting formula :math:`\alpha \sum k' Q_u + \tfrac12 \alpha^2
\sum k' Q_{uu} k`.  (crocoddyl's FDDP mixes the trial's states into its model, which is
then cubic in :math:`\alpha`.)  Closing defects may raise the cost (a negative expected
reduction): such a step is accepted when the cost rises by at most twice the expected
rise (:func:`closing_accepted`; crocoddyl's ``th_acceptnegstep = 2``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace
from typing import Literal

import torch

from .._checks import same_shapes
from ..errors import InvalidArgumentError, NonFiniteError
from ..riccati.expansion import DenseStages
from .batch import Traj
from .chain import STATES_RTOL_EPS, AffineLaw, Chain, feedback_control
from .inputs import within_rounding

__all__ = ["Shooting", "check_shooting", "gapped_start", "defects", "settle", "with_offsets",
           "model_change", "gapped_forward", "closing_accepted", "gapped_rows", "largest_gap",
           "largest"]

Shooting = Literal["single", "multiple"]

#: a step that closes defects is accepted while the cost rises by at most this many times
#: the expected rise (crocoddyl's ``th_acceptnegstep``)
RISE_FACTOR = 2.0


def check_shooting(shooting: str, mode: str) -> None:
    """Validate the solver's ``shooting`` option (multiple shooting is Gauss-Newton:
    ``mode="ilqr"``)."""
    if shooting not in ("single", "multiple"):
        raise InvalidArgumentError(f"shooting must be 'single' or 'multiple'; got "
                                   f"{shooting!r}")
    if shooting == "multiple" and mode != "ilqr":
        raise InvalidArgumentError("shooting='multiple' needs mode='ilqr' (the defects' "
                                   "model is Gauss-Newton, as crocoddyl's FDDP)")


def gapped_start(structure: Chain, x0: torch.Tensor, us: Sequence[torch.Tensor],
                 xs: Sequence[torch.Tensor]) -> Traj:
    """The trajectory of the given states ``xs`` (T+1 tensors (B, n)) and controls ``us``
    (T tensors (B, m), clamped), its first state replaced by ``x0`` (B, n): the cost at
    those points and the defects ``gaps`` (T tensors, None when there are none)."""
    if type(structure).transition is not Chain.transition:
        raise InvalidArgumentError(
            f"shooting='multiple' is not supported by {type(structure).__name__} (its "
            f"transitions are not the dynamics' own: residual spans or players)")
    for t, x in enumerate(xs[1:], 1):   # xs[0] is x0's place: not used
        if not bool(torch.isfinite(x).all()):
            raise NonFiniteError(f"xs0[{t}] (the given states) is not finite for flat batch "
                                 f"element(s) {_rows(~torch.isfinite(x).all(-1))}")
    states = [x0, *xs[1:]]
    T = len(us)
    traj = structure.simulate(x0, T, lambda t, _: us[t], known=states[1:])
    traj.gaps = defects(structure, us, states)
    settle(traj)
    return traj


def _rows(mask: torch.Tensor) -> list[int]:
    """The first rows (at most 10) of a (B,) mask, for a message."""
    return torch.nonzero(mask).flatten()[:10].tolist()


def settle(traj: Traj) -> None:
    """Close the defects at rounding level: a row whose every defect is within
    ``STATES_RTOL_EPS`` (16) times the dtype's epsilon of the larger max-norm of the two
    states it joins -- the test that accepts given states in single shooting
    (:meth:`~trajopt.ddp.chain.Chain.consistent_prefix`) -- has its defects set to 0
    (without a full step they only shrink geometrically: step lengths without 1.0 would
    never close them); ``traj.gaps`` becomes None when no row keeps one."""
    if traj.gaps is None:
        return
    rtol = STATES_RTOL_EPS * torch.finfo(traj.cost.dtype).eps
    if same_shapes(traj.xs):   # all stages at once: (T, B, n)
        X = torch.stack(list(traj.xs))
        small = within_rounding(torch.stack(list(traj.gaps)), X[:-1], X[1:], rtol).all(0)
    else:
        small = torch.stack([within_rounding(g, a, b, rtol) for g, a, b in zip(
            traj.gaps, traj.xs[:-1], traj.xs[1:])]).all(0)
    if bool(small.all()):
        traj.gaps = None
    elif bool(small.any()):
        keep = (~small).to(traj.cost.dtype).unsqueeze(-1)
        traj.gaps = [g * keep for g in traj.gaps]


def defects(structure: Chain, us: Sequence[torch.Tensor], xs: Sequence[torch.Tensor],
            checked: bool = True) -> list[torch.Tensor]:
    """The defects ``f_t(x_t, u_t) - x_{t+1}`` of the states ``xs`` (T+1 tensors (B, n))
    under the controls ``us`` (T tensors (B, m)): one call of the dynamics over all
    stages where the model allows (:meth:`~trajopt.ddp.chain.Chain.predictions`);
    ``checked``: non-finite predictions raise, naming the stage and the element (else
    they give non-finite defects: a diverged element's)."""
    pred = structure.predictions(xs, us)
    if pred is None:
        raise InvalidArgumentError(
            "the dynamics at the given states xs0 returned another shape than the states "
            "they predict (flattened batch)")
    if not checked:
        return [p - x for p, x in zip(pred, xs[1:])]
    finite = [bool(torch.isfinite(p).all()) for p in pred] if not same_shapes(pred) else \
        torch.isfinite(torch.stack(pred)).flatten(1).all(1).tolist()
    if not all(finite):
        t = finite.index(False)
        raise NonFiniteError(f"the dynamics are not finite at the given state xs0[{t}] and "
                             f"control us0[{t}] for flat batch element(s) "
                             f"{_rows(~torch.isfinite(pred[t]).all(-1))}")
    return [p - x for p, x in zip(pred, xs[1:])]


def gapped_rows(traj: Traj) -> torch.Tensor:
    """(B,) bool: the rows of ``traj`` with a defect."""
    B = traj.cost.shape[0]
    if traj.gaps is None:
        return torch.zeros(B, dtype=torch.bool, device=traj.cost.device)
    return torch.stack([(g != 0).any(-1) for g in traj.gaps]).any(0)


def largest_gap(traj: Traj) -> torch.Tensor:
    """(B,) the largest defect ``max_t,i |f_t(x_t, u_t)_i - x_{t+1,i}|`` of each row."""
    if traj.gaps is None:
        return torch.zeros_like(traj.cost)
    return largest(traj.gaps)


def largest(gaps: Sequence[torch.Tensor]) -> torch.Tensor:
    """(B,) the largest entry of the defects ``gaps`` (T tensors (B, n_t)) of each row."""
    return torch.stack([g.abs().amax(-1) for g in gaps]).amax(0)


def with_offsets(stages, gaps: Sequence[torch.Tensor] | None):
    """The stage derivatives with the defects as the dynamics' offsets ``c_t``."""
    if gaps is None:
        return stages
    if isinstance(stages, DenseStages):
        return DenseStages(replace(stages.stacked, c=torch.stack(list(gaps))))
    return [replace(s, c=g) for s, g in zip(stages, gaps)]


def model_change(stages, VxT: torch.Tensor, VxxT: torch.Tensor, K: Sequence[torch.Tensor],
                 k: Sequence[torch.Tensor], gaps: Sequence[torch.Tensor]) -> torch.Tensor:
    r"""(B, 2): ``[G, H / 2]``, the local model's change along the full step (``docs``
    above), in the layout of the backward pass's expected change: a step
    :math:`\alpha` is expected to lower the cost by :math:`-(\alpha G + \tfrac12
    \alpha^2 H)`.  ``stages``: the derivatives (F (B, n, n+m), L (B, n+m, 1+n+m)) with
    or without offsets; ``VxT``, ``VxxT``: the terminal cost's gradient and Hessian."""
    # the deviations as columns (B, n_t, 1), two batched products a stage (the first is
    # 0: the step starts at x0); the cost's gradient and Hessian along them at the end
    dx = VxT.new_zeros(VxT.shape[0], K[0].shape[-1] if len(K) else VxT.shape[-1], 1)
    zs = []
    for t, s in enumerate(stages):
        z = torch.cat([dx, torch.baddbmm(k[t].unsqueeze(-1), K[t], dx)], -2)
        zs.append(z)
        dx = torch.baddbmm(gaps[t].unsqueeze(-1), s.F, z)
    dx = dx.squeeze(-1)
    G = (VxT * dx).sum(-1)
    H = (dx * (VxxT @ dx.unsqueeze(-1)).squeeze(-1)).sum(-1)
    if isinstance(stages, DenseStages) and zs:   # stacked stages: (T, B, n+m, 1+n+m)
        Z, L = torch.stack(zs), stages.stacked.L
        return torch.stack([G + (L[..., :1] * Z).sum((0, 2, 3)),
                            0.5 * (H + (Z * (L[..., 1:] @ Z)).sum((0, 2, 3)))], -1)
    for s, z in zip(stages, zs):   # stage sizes that differ, or unstacked stages
        G = G + (s.L[..., :1] * z).sum((1, 2))
        H = H + (z * (s.L[..., 1:] @ z)).sum((1, 2))
    return torch.stack([G, 0.5 * H], -1)


def gapped_forward(structure: Chain, traj: Traj, K: Sequence[torch.Tensor],
                   ff: Sequence[torch.Tensor], alpha: float | torch.Tensor, lo=None,
                   hi=None) -> Traj:
    """The step of size ``alpha`` (a number or (N, 1)) from the defective ``traj``: the
    feedback law ``u_t = ff_t + K_t (x_t - xbar_t)`` (``ff = u_bar + alpha k``, clamped
    to the limits), each transition less ``(1 - alpha)`` times its defect; the result
    carries the defects left, ``(1 - alpha)`` times the old (None after full steps)."""
    keep = 1.0 - alpha
    left = not (isinstance(keep, float) and keep == 0.0)   # a full step closes them all
    gaps = traj.gaps
    control = feedback_control(AffineLaw(ff, K, traj.xs), structure.deviation, lo, hi)
    xs, us = [traj.xs[0]], []
    x = xs[0]
    for t in range(len(traj.us)):
        u = control(t, xs)
        x = structure.transition(t, x, u, xs)
        if left:
            x = x - keep * gaps[t]
        xs.append(x)
        us.append(u)
    out = structure.simulate(xs[0], len(us), lambda t, _: us[t], traj.rows, known=xs[1:])
    if left:
        out.gaps = [keep * g for g in gaps]
    return out


def closing_accepted(actual: torch.Tensor, expected: torch.Tensor) -> torch.Tensor:
    """A step expected to raise the cost (closing defects): accepted when the cost rises
    by at most :data:`RISE_FACTOR` times the expected rise."""
    return torch.isfinite(actual) & (expected < 0) & (actual >= RISE_FACTOR * expected)

