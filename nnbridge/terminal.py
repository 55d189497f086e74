r"""The terminal value of the network OCP: :math:`V_x^T = \nabla\phi` and a model of
:math:`V_{xx}^T = \nabla^2\phi` per sample, in the kernel's value representations
(:mod:`trajopt.riccati.value`).

The closure's loss is the batch mean of a per-sample loss :math:`\phi(x_T^i)` of the
network output (torch's ``reduction="mean"``), so
:math:`V_x^{T,i} = B\,\partial\,\text{loss}/\partial x_T^i`.  The curvature at the output
(``terminal_hessian``) is one of

* ``"ggn"`` -- the exact Gauss-Newton matrix of the loss in the output, which for these
  losses is the exact Hessian: softmax cross-entropy on logits,
  :math:`\mathrm{diag}(p) - p p^\top = Z Z^\top` with
  :math:`Z = \mathrm{diag}(\sqrt p) - p \sqrt p^\top` rotated to its n - 1 nonzero
  directions (rank r = classes - 1); MSE over n
  outputs (torch's mean over all elements, so :math:`\phi = \tfrac1n\|x_T - y\|^2`),
  :math:`\tfrac2n I`;
* ``"fisher"`` -- a sampled rank-one Fisher: :math:`z = p - e_{\hat y}`,
  :math:`\hat y \sim p` for cross-entropy (:math:`\mathbb{E}[z z^\top]` is the GGN);
  :math:`z = \sqrt{2/n}\,\varepsilon`, :math:`\varepsilon \sim N(0, I)` for MSE; drawn
  from the optimizer's own generator (seeded from ``torch.initial_seed()``, saved in its
  ``state_dict``), so it neither consumes nor depends on the script's random stream;
* ``"empirical"`` -- :math:`z = \nabla\phi` (the empirical Fisher: curvature
  :math:`\approx 2` on confidently misclassified samples, where the true Hessian is near
  0);
* a callable ``f(output)`` returning a factor (B, n) (:math:`z z^\top`), a factor
  (B, n, r) (:math:`Z Z^\top`, ``value_hessian="outer"``) or the Hessian (B, n, n)
  (``value_hessian="full"``).

With ``value_hessian="outer"`` the value is kept factored (:class:`RankOneValue` for
rank-one models, :class:`RankRValue` for ``"ggn"``); with ``"full"`` it is dense per
sample.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch

from trajopt.errors import InvalidArgumentError, ShapeError
from trajopt.riccati import DenseValue, RankOneValue, RankRValue

__all__ = ["TERMINAL_HESSIANS", "LOSSES", "terminal_value", "ggn_factor", "fisher_factor",
           "check_terminal_options", "check_output_gradient"]

TERMINAL_HESSIANS = ("ggn", "fisher", "empirical")
LOSSES = ("cross_entropy", "mse")
Loss = Literal["cross_entropy", "mse"]


def _check_output(output: torch.Tensor) -> None:
    if output.ndim != 2:
        raise ShapeError(f"terminal_hessian 'ggn'/'fisher' need a (B, n) network output; "
                         f"got shape {tuple(output.shape)} (pass a callable for others)")


def ggn_factor(output: torch.Tensor, loss: Loss) -> torch.Tensor:
    r"""Z with :math:`Z Z^\top` the per-sample Gauss-Newton matrix (= Hessian) of ``loss``
    at the output (B, n): (B, n, n - 1) for cross-entropy, (B, n, n) for MSE.

    Cross-entropy: :math:`\mathrm{diag}(p) - p p^\top = Z_0 Z_0^\top` with
    :math:`Z_0 = \mathrm{diag}(\sqrt p) - p \sqrt p^\top`, and :math:`Z_0 \sqrt p = 0`
    (the probabilities sum to one), so the rank is n - 1: :math:`Z = Z_0 Q` with Q the
    first n - 1 columns of the Householder reflection that maps :math:`\sqrt p` to
    :math:`-e_n` (an orthonormal basis of :math:`\sqrt p^\perp`; :math:`Z Z^\top =
    Z_0 (I - \sqrt p \sqrt p^\top) Z_0^\top`), one operator response fewer per sample and
    stage (half of them for two classes)."""
    _check_output(output)
    B, n = output.shape
    if loss == "cross_entropy":
        p = torch.softmax(output, -1)
        sp = p.sqrt()
        Z0 = torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)
        if n == 1:
            return Z0
        v = sp.clone()
        v[:, -1] += 1.0                  # sqrt(p) + e_n: |v|^2 = 2 + 2 sqrt(p_n) >= 2
        Hv = (Z0 @ v.unsqueeze(-1)) * (2.0 / (v * v).sum(-1))[:, None, None]
        return (Z0 - Hv * v.unsqueeze(-2))[..., :-1]     # Z0 (I - 2 v v' / v'v), n - 1 columns
    eye = torch.eye(n, dtype=output.dtype, device=output.device)
    return (2.0 / n) ** 0.5 * eye.expand(B, n, n)


def fisher_factor(output: torch.Tensor, loss: Loss,
                  generator: torch.Generator | None = None,
                  rows: tuple[int, int] | None = None) -> torch.Tensor:
    """A sampled rank-one factor z (B, n) with :math:`\\mathbb{E}[z z^\\top]` the GGN,
    drawn from ``generator`` (torch's global one when None).

    ``rows = (offset, total)``: these B samples are rows ``offset .. offset + B`` of a
    batch of ``total`` split over data-parallel ranks; the draws are made for the whole
    batch and sliced, so each sample gets the draw it would get in one process (and the
    generators of all ranks stay in step).  Cross-entropy: :math:`\\hat y` by inverting
    the CDF of p at a uniform draw; MSE: a standard normal draw."""
    _check_output(output)
    B, n = output.shape
    offset, total = (0, B) if rows is None else rows
    kw = dict(generator=generator, dtype=output.dtype, device=output.device)
    if loss == "cross_entropy":
        p = torch.softmax(output, -1)
        u = torch.rand(total, 1, **kw)[offset:offset + B]
        y = (p.cumsum(-1) < u).sum(-1).clamp(max=n - 1)
        return p - torch.nn.functional.one_hot(y, n).to(p.dtype)
    eps = torch.randn(total, n, **kw)[offset:offset + B]
    return (2.0 / n) ** 0.5 * eps


def terminal_value(Vx: torch.Tensor, output: torch.Tensor,
                   terminal_hessian: str | Callable[[torch.Tensor], torch.Tensor],
                   loss: Loss, value_hessian: Literal["outer", "full"],
                   generator: torch.Generator | None = None,
                   rows: tuple[int, int] | None = None):
    """The terminal value (module docstring) for per-sample gradients ``Vx`` (B, n) and the
    network output (B, ...) flattened to (B, n); ``generator`` and ``rows`` feed
    ``"fisher"`` (:func:`fisher_factor`)."""
    B, n = Vx.shape
    if loss == "cross_entropy" and terminal_hessian in ("fisher", "ggn") and \
            output.dim() != 2:
        raise InvalidArgumentError(
            f"terminal_hessian={terminal_hessian!r} is the softmax curvature of a (batch, "
            f"classes) output; this model's output is {tuple(output.shape)} (a "
            "cross-entropy over positions has one softmax block per position, which is "
            "not implemented): flatten the positions into the batch, or pass "
            "terminal_hessian= a callable returning the per-sample factor")
    out = output.detach().reshape(B, -1).to(Vx)
    if callable(terminal_hessian):
        H = terminal_hessian(output).to(Vx)
    elif terminal_hessian == "empirical":
        H = Vx
    elif terminal_hessian == "fisher":
        H = fisher_factor(out, loss, generator, rows)
    else:
        Z = ggn_factor(out, loss)
        if value_hessian == "outer":
            return RankRValue(Vx=Vx, Z=Z)
        return DenseValue(Vx=Vx, Vxx=Z @ Z.transpose(-1, -2))
    if H.shape == (B, n):
        if value_hessian == "outer":
            return RankOneValue(Vx=Vx, c=torch.ones_like(Vx[:, 0]), z=H)
        return DenseValue(Vx=Vx, Vxx=H.unsqueeze(-1) * H.unsqueeze(-2))
    if H.ndim == 3 and H.shape[:2] == (B, n):
        if value_hessian == "full":
            if H.shape[2] != n:
                return DenseValue(Vx=Vx, Vxx=H @ H.transpose(-1, -2))
            return DenseValue(Vx=Vx, Vxx=H)
        return RankRValue(Vx=Vx, Z=H)
    raise ShapeError(f"terminal_hessian must return ({B}, {n}) (a factor z), ({B}, {n}, r) "
                     f"(a factor Z) or, with value_hessian='full', ({B}, {n}, {n}) (the "
                     f"Hessian); got {tuple(H.shape)}")


def check_terminal_options(terminal_hessian, loss) -> None:
    """Validate the two options (the constructor's check)."""
    if not callable(terminal_hessian) and terminal_hessian not in TERMINAL_HESSIANS:
        raise InvalidArgumentError(f"terminal_hessian must be one of {TERMINAL_HESSIANS} "
                                   f"or a callable; got {terminal_hessian!r}")
    if loss not in LOSSES:
        raise InvalidArgumentError(f"loss must be one of {LOSSES}; got {loss!r}")


#: a weighted mean's weights average 1: a batch mean of the weights' lower bounds above
#: this is a sum (c_i >= 2); the slack covers rounding and the autocast dtypes
_CE_WEIGHT_BOUND = 1.5


_ADVICE = ("pass loss='mse' for torch's mean squared error (F.mse_loss), or "
           "terminal_hessian='empirical' or a callable for other losses")


def check_output_gradient(Vx: torch.Tensor, loss: Loss, output: torch.Tensor,
                          advice: str = _ADVICE, *, any_loss: bool = False) -> None:
    r"""Refuse a closure whose loss is not a (weighted) batch mean of ``loss`` where that
    shows.  For cross-entropy, sample i's row of ``Vx`` (B, n) (= B times the output
    gradient) is :math:`c_i (p_i - q_i)`, with :math:`p_i` the softmax of ``output``'s
    row, :math:`q_i` a distribution (the label, smoothed or soft) and :math:`c_i` the
    sample's weight in the loss: 1 for a mean, weights of mean 1 for torch's ``weight=``,
    ``ignore_index`` or micro-batches scaled 1/K, B for ``reduction="sum"``.  As
    :math:`q \ge 0`, :math:`\hat c_i = \max_k V_{x,ik} / p_{ik} \le c_i`, with equality
    for a hard label; so a batch mean of :math:`\hat c_i` above 1.5 is a sum (B times too
    large: the step would diverge), at any confidence of the model.  ``any_loss``: the
    caller takes any loss (EMSA), so a gradient that is not a softmax cross-entropy's
    passes; one that is must still be of a batch mean."""
    if loss != "cross_entropy" or Vx.shape[0] < 2:
        return
    # a softmax cross-entropy's gradient p - e_y (or p - q: soft labels, smoothing) sums
    # to 0 over the classes; a regression's does not
    l1 = Vx.abs().sum(-1)
    slack = 4 * Vx.shape[-1] * torch.finfo(Vx.dtype).eps
    ratio = Vx.sum(-1).abs() / (l1 + slack)
    if Vx.shape[-1] == 1 or float(ratio.median()) > 0.1:
        if any_loss:
            return
        raise InvalidArgumentError(
            f"loss: the output gradient of a softmax cross-entropy sums to 0 over the "
            f"classes for every sample; this one's does not (median |sum| / L1 norm "
            f"{float(ratio.median()):.2g} over the batch): the closure's loss is another "
            f"one. A model that ends in log_softmax with F.nll_loss: return the logits "
            f"and use F.cross_entropy (the same loss); an optimizer on part of a model: "
            f"pass the whole model (frozen parts stay fixed); otherwise {advice}")
    # the weights' lower bounds (docstring); a per-sample bound on |Vx|_1 refused weighted
    # means at whichever batch went over it, a mean of the norms let sums of a confident
    # model through
    p = torch.softmax(output.detach().reshape(Vx.shape[0], -1).to(Vx), -1)
    resolved = p > 1e3 * torch.finfo(p.dtype).tiny   # a ratio of two well-rounded numbers
    c = torch.where(resolved, Vx / torch.where(resolved, p, 1), 0).amax(-1).clamp_min(0)
    mean = float(c.mean())
    if mean > _CE_WEIGHT_BOUND:
        raise InvalidArgumentError(
            f"loss: the output gradient times the batch size is {mean:.3g} times a "
            "per-sample cross-entropy's on average (at least): is the loss summed "
            "(reduction='sum'), a sum of several means, or a mean scaled by a factor (a "
            "loss weight, distillation's T^2)? The step's terminal Hessian is that of the "
            "batch *mean* of the per-sample cross-entropy (reduction='mean', as torch's "
            "default; weights normalized as torch's weight= and ignore_index do are "
            "fine): scale the learning rate instead of the loss, or " + advice)
