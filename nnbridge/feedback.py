r"""The feedback term of a DDP step and its closed-loop gain, for the optimizers' forward
passes (DDPNOpt, GT-DDP).

Each stage applies :math:`\delta u = -P^{-1}(\mathbb{E}[Q_u] + F)` with the feedback
term :math:`F = \mathbb{E}_i[Q_{ux}^i dX^i]`.  Along it the value's quadratic model of
the stage's next state closes the loop with the gain
:math:`\rho = \langle F, P^{-1} F\rangle / \mathbb{E}_i[(f_x dX^i)^\top V' f_x dX^i]`
(:class:`trajopt.riccati.StateFeedback`): for a positive semidefinite :math:`V'` at
most 1 where :math:`P` is at least the curvature the value sees, above 1 where the
curvature model underestimates it and the feedback overshoots.  The optimizers measure
it only under ``value_psd=True`` (their default), where that bound holds; a curvature
that watches it (:attr:`Curvature.watches_feedback`) gets it through
:meth:`Curvature.closed_loop` and :meth:`Curvature.feedback_scale`.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["feedback_terms", "loop_gain", "open_loop_gain", "watched"]


def feedback_terms(step: Any, dX: torch.Tensor, curvature: bool
                   ) -> tuple[Any, torch.Tensor | None]:
    """``(F, q)``: the stage's feedback term :math:`F` (control-shaped; a list of the
    players' for a graph stage) for the state deviations dX (B, n), and with
    ``curvature`` the samples' :math:`q^i = (f_x dX^i)^\\top V' f_x dX^i` (B,) (None
    without: ``step.feedback(dX)`` alone)."""
    if not curvature:
        return step.feedback(dX), None
    terms = step.feedback_terms(dX)
    return step.stage.fu_T_mean(terms.cotangent), terms.curvature


def loop_gain(F: Sequence[torch.Tensor | None], PF: Sequence[torch.Tensor | None],
              q: torch.Tensor, mean: Callable[[torch.Tensor], torch.Tensor]) -> float:
    """:math:`\\rho = \\langle F, P^{-1} F\\rangle / \\mathbb{E}_i[q^i]` from the feedback
    terms ``F`` and ``PF`` :math:`= P^{-1} F` (pairs of control tensors in the same
    coordinates; None for a frozen player) and the local samples' ``q`` (B,); ``mean``
    turns a local sum into the batch mean (:class:`~nnbridge.distributed.BatchMean`:
    the same number on every rank).  0 where the state did not change in the value's
    metric.  One device-to-host copy (the curvature decides on it in Python)."""
    terms = [(f * pf).sum() for f, pf in zip(F, PF) if f is not None and pf is not None]
    num = terms[0] if len(terms) == 1 else torch.stack(terms).sum()
    num, den = torch.stack((num, mean(q.sum()))).tolist()
    return num / den if den > 0 else 0.0


def watched(curvature: Any, F: Sequence[torch.Tensor | None],
            PF: Sequence[torch.Tensor | None], q: torch.Tensor,
            mean: Callable[[torch.Tensor], torch.Tensor], states: Sequence[Any]
            ) -> tuple[list, list]:
    """One stage's feedback terms ``PF`` :math:`= P^{-1} F` (its players', None for a
    frozen one) as ``curvature`` scales them for the stage's closed-loop gain
    (:func:`loop_gain`: one gain for all players), and the players' curvature ``states``
    as it keeps them (:meth:`Curvature.feedback_scale`, :meth:`Curvature.closed_loop`)."""
    gain = loop_gain(F, PF, q, mean)
    scale = curvature.feedback_scale(gain)
    if scale != 1:
        PF = [None if f is None else f * scale for f in PF]
    return list(PF), [None if s is None else curvature.closed_loop(s, gain) for s in states]


def open_loop_gain(step_curvature: torch.Tensor, r: torch.Tensor, value: Any,
                   mean: Callable[[torch.Tensor], torch.Tensor], tikhonov: float = 0.0
                   ) -> float:
    r"""The open-loop step's gain in the backward pass, :math:`\rho_k = \mathbb{E}_i[r^{i
    \top} V' r^i] / \langle g, P^{-1} g\rangle`, from ``step_curvature`` :math:`=
    \langle g, P^{-1} g\rangle` (a 0-d tensor: the batch-mean gradient g is the same on
    every rank) and the samples' state responses ``r`` (B, n) :math:`= f_u^i P^{-1} g`
    to the step :math:`-P^{-1} g`; ``value`` is :math:`V'` (``hess_apply``).

    Along the step the value's quadratic model has its minimum at :math:`1/\rho_k` of
    it: the Rayleigh quotient of :math:`\mathbb{E}_i[f_u^{i\top} V' f_u^i]` against
    :math:`P` at :math:`P^{-1} g`, at most 1 where :math:`P` is at least the curvature
    the value sees (:func:`loop_gain`'s bound, along the open-loop step instead of the
    feedback term); read before the step's value recursion uses :math:`P^{-1}`.  One
    device-to-host copy."""
    q = (r * value.hess_apply(r.unsqueeze(1), tikhonov).squeeze(1)).sum(-1)
    num, den = torch.stack((mean(q.sum()), step_curvature.to(q.dtype))).tolist()
    return num / den if den > 0 else 0.0
