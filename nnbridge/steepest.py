r"""Steepest descent on a network as an LQR (thesis papers/002, Ch. 3): gradient descent,
natural gradient and Newton directions from :func:`trajopt.steepest.steepest_descent_lqr`
on the network's linearization.

The state is batch-augmented: :math:`X_i = [x_i^{(1)}; \dots; x_i^{(B)}]`, so
:math:`A_i = \mathrm{blockdiag}_j(\partial f_i / \partial x_i^{(j)})` and
:math:`B_i = [\partial f_i / \partial u_i (x_i^{(j)})]_j` stacked, and a minibatch step is
exact (Thm 3.1.1 written for a batch).  The network is decomposed by
:func:`nnbridge.stages` (the same decomposition DDPNOpt uses); the control of a stage is
:math:`[W \mid b]` flattened row-major.  Dense matrices of size ``B n_i`` are formed:
small networks only (``docs/steepest.md``).

Divergences (:math:`\delta` = ``damping``):

* ``"euclidean"``: :math:`Q = M = 0`, :math:`R = I`: minus the gradient
  (:math:`-g/(1 + \delta)`);
* ``"kl"``: :math:`Q_N = \tfrac1B \mathrm{blockdiag}_j(\mathrm{diag}(p_j) - p_j p_j^\top)`,
  the Hessian of the batch-mean KL between the softmax output distributions (Sec.
  3.2.3), :math:`R = \delta I`: :math:`-(F + \delta I)^{-1} g` with F the Fisher;
* ``"newton"``: :math:`Q_N = \nabla^2_{x_N}` of the loss, :math:`Q_i, R_i, M_i` the second
  derivatives of the Hamiltonian :math:`\lambda_{i+1}^\top f_i` (Sec. 3.2.4), plus
  :math:`\delta I` on :math:`R_i`: :math:`-(H + \delta I)^{-1} g`.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable

import torch
from torch import nn

from trajopt.errors import (
    InvalidArgumentError,
    NonFiniteError,
    NotPositiveDefiniteError,
    SkippedStepWarning,
    UnsupportedModelError,
)
from trajopt.steepest import NeumannSolver, steepest_descent_lqr

from .closure import loss_is_finite
from .decompose import stages
from .gramian import (
    OutputGramian,
    check_solve,
    damped_fisher_direction,
    fisher_factor,
    stage_jacobian,
)
from .optimizer_base import not_copyable, refuse_second_group
from .recorder import capture
from .stages import (
    NormStage,
    StageLinearization,
    check_gradients,
    check_no_frozen,
    check_rerun_deterministic,
    check_unshared,
    outer_sum,
)
from .terminal import check_output_gradient
from .traced_values import StageReplay, TracedValues

__all__ = ["DIVERGENCES", "lqr_direction", "LQRDescent"]

DIVERGENCES = ("euclidean", "kl", "newton")


def _block_diag(blocks: torch.Tensor) -> torch.Tensor:
    """(B, r, c) -> (B r, B c) block diagonal."""
    return torch.block_diag(*blocks.unbind(0))


def lqr_direction(model: nn.Module, x: torch.Tensor, y: torch.Tensor,
                  loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], *,
                  divergence: str = "euclidean", damping: float = 0.0,
                  neumann_terms: int | None = None, solve: str = "auto"
                  ) -> list[torch.Tensor]:
    r"""The steepest-descent direction of ``loss(model(x), y)`` from the LQR.

    Parameters
    ----------
    model : nn.Sequential
        Decomposable by :func:`nnbridge.stages` (Linear / Conv2d and elementwise ops).
    x : (B, ...)
        Input batch.
    y : any
        Targets, passed to ``loss``.
    loss : callable ``loss(output, y) -> scalar``
        The batch loss (e.g. ``F.cross_entropy``, a batch mean).
    divergence : {"euclidean", "kl", "newton"}
    damping : float
        :math:`\delta \ge 0`; "kl" needs :math:`\delta > 0` unless the Fisher is
        invertible.
    neumann_terms : int, optional
        Replace each stage's inverse by a truncated Neumann series with the
        layer-adaptive damping :math:`\delta_i = \max(\delta, 1.1\,\rho_i)` (thesis
        Ch. 5, :class:`trajopt.steepest.NeumannSolver`): no matrix is inverted.
    solve : {"auto", "direct", "cg"}
        How the "kl" direction's output-space system (size ``B n_out``) is solved:
        Cholesky of the formed system, conjugate gradients on the applied one, or
        "auto": CG from ``B n_out >= 2048`` within the direct solve's cost, else (and
        where CG stops short) direct (:func:`nnbridge.gramian.damped_fisher_direction`,
        ``docs/steepest.md``).

    Returns
    -------
    list of Tensor
        One tensor per ``model.parameters()`` entry, shaped like it.
    """
    _check(divergence, damping, neumann_terms)
    check_solve(solve)
    pre, sts = stages(model)
    _check_all_stages(model, sts)
    with torch.no_grad():
        h = x
        for p in pre:
            h = p(h)
        xs = [h.detach()]
        for st in sts:
            xs.append(st.forward(xs[-1]))
    out = xs[-1]
    shape = out.shape

    def objective(o_flat):
        return loss(o_flat.reshape(shape), y)

    o = out.reshape(-1)
    aN = torch.func.grad(objective)(o)
    QN = torch.func.hessian(objective)(o) if divergence == "newton" else None
    if not bool(torch.isfinite(aN).all()):
        raise NonFiniteError("lqr_direction: the loss gradient at the output is not finite "
                             "(check x, y and the loss)")
    d = _direction(model, sts, xs, aN, QN, divergence, damping, neumann_terms, solve=solve)
    if not all(bool(torch.isfinite(v).all()) for v in d):
        raise NonFiniteError(f"lqr_direction: the {divergence} direction is not finite "
                             "(increase damping)")
    return d


def _check(divergence: str, damping: float, neumann_terms: int | None = None) -> None:
    if divergence not in DIVERGENCES:
        raise InvalidArgumentError(
            f"divergence must be one of {', '.join(DIVERGENCES)}; got {divergence!r}")
    if not 0 <= damping < float("inf"):
        raise InvalidArgumentError(f"damping must be finite and >= 0; got {damping}")
    if neumann_terms is not None and (isinstance(neumann_terms, bool)
                                      or not isinstance(neumann_terms, int)
                                      or neumann_terms < 0):
        raise InvalidArgumentError(f"neumann_terms must be None or an integer >= 0; got "
                                   f"{neumann_terms!r}")


def _direction(model, sts, xs, aN, loss_hessian, divergence, damping, neumann_terms=None,
               riccati: bool = False, solve: str = "auto"):
    """The LQR of the module docstring from the stage inputs ``xs`` (x_0 .. x_N), the
    output gradient ``aN`` (B n_N,) and, for Newton, the output Hessian: Euclidean and KL
    in output space (:func:`_output_space_steps`), Newton and the Neumann variant (and
    ``riccati=True``: tests, benchmarks) by the batch-augmented Riccati recursion
    (:func:`_riccati_steps`)."""
    if divergence == "kl":
        _check_classifier(xs[-1], aN)
    if divergence in ("euclidean", "kl") and neumann_terms is None and not riccati:
        lins = [StageLinearization(st, xs[t], x_next=xs[t + 1]) for t, st in enumerate(sts)]
        steps = _output_space_steps(lins, xs[-1], aN, divergence, damping, solve)
    else:
        lins, steps = _riccati_steps(sts, xs, aN, loss_hessian, divergence, damping,
                                     neumann_terms)
    by_param = {}
    for st, lin, du in zip(sts, lins, steps):
        for prm, v in zip(st.params(), st.split(du.reshape(lin.U.shape))):
            by_param[prm] = v
    return [by_param[prm] for prm in model.parameters()]


def _check_classifier(output: torch.Tensor, aN: torch.Tensor) -> None:
    """divergence="kl" is the softmax Fisher of a (B, classes) output under the batch
    mean of a cross-entropy: refuse other outputs and losses by name (a regression gave
    a zero Fisher and steps of lr / damping times the gradient, a sum B-fold ones)."""
    if output.dim() != 2:
        raise InvalidArgumentError(
            f"divergence='kl' is the softmax Fisher of a (batch, classes) output; this "
            f"model's output is {tuple(output.shape)} (a cross-entropy over positions has "
            "one Fisher block per position, which is not implemented): use "
            "divergence='euclidean' or 'newton' with loss_hessian, or flatten the "
            "positions into the batch")
    B = output.shape[0]
    check_output_gradient(B * aN.reshape(B, -1), "cross_entropy", output,
                          advice="divergence='kl' needs the batch mean of a softmax "
                          "cross-entropy; use divergence='euclidean' or 'newton' with "
                          "loss_hessian for other losses")


def _check_all_stages(model: nn.Module, sts) -> None:
    """The steepest-descent LQR has the stages' controls only: a model with parameters
    outside them (a LayerNorm, an Embedding) is refused by name."""
    grouped = [st.index for st in sts if st.groups != 1 and not isinstance(st, NormStage)]
    if grouped:
        raise UnsupportedModelError(
            f"model: stage {grouped[0]} is a grouped convolution; the steepest-descent "
            "LQR forms dense per-sample control Jacobians of ungrouped layers only")
    owned = {id(p) for st in sts if not isinstance(st, NormStage) for p in st.params()}
    other = sorted({n.rpartition(".")[0] or n for n, p in model.named_parameters()
                    if id(p) not in owned})
    if other:
        raise UnsupportedModelError(
            f"model: the parameters of {other} are not stages (only Linear and Conv layers "
            "are); the steepest-descent LQR has no direction for them: use DDPNOpt, which "
            "updates them from p.grad")


def _output_space_steps(lins, out, aN, divergence, damping, solve="auto"):
    r"""The Euclidean / KL LQR solved through its controllability Gramian in output space.

    With no stage cost (:math:`Q_i = M_i = 0`), :math:`R_i = r I` and the state
    perturbation starting at 0, the terminal perturbation is :math:`X_N = J u`, J the
    Jacobian of the batch's outputs in all controls, and the LQR's solution is
    :math:`u = -(rI + J^\top Q_N J)^{-1} J^\top a = -J^\top (rI + Q_N S)^{-1} a` (push-
    through identity) with :math:`S = J J^\top = \sum_i J_i J_i^\top`, the Gramian, of
    size :math:`B n_N` (outputs), not :math:`B n_i` (hidden states) as the Riccati
    matrices are.  The rows of :math:`J_i` are :math:`f_u^\top` applied to
    :math:`Y_{i+1}` (:math:`Y_N = I`, :math:`Y_i = Y_{i+1} f_x`): per sample b and output
    j the cotangent factor :math:`w_{bj}` times the input :math:`\tilde x_b^\top`
    (:class:`nnbridge.gramian.OutputGramian`: S formed, or applied without forming it).
    :math:`Q_N` is block diagonal (one softmax Fisher block per sample).  The damped
    system is solved by :func:`nnbridge.gramian.damped_fisher_direction` (``solve``):
    directly in time :math:`O((B n_N)^2 \sum_i \mathrm{out}_i + (B n_N)^3)` and memory
    :math:`O((B n_N)^2)`, or by conjugate gradients, linear in B per iteration
    (docs/steepest.md)."""
    B = out.shape[0]
    n_out = out[0].numel()
    Y = torch.eye(n_out, dtype=out.dtype, device=out.device).expand(B, n_out, n_out)
    factors = [None] * len(lins)
    for t in range(len(lins) - 1, -1, -1):
        factors[t] = lins[t].factors(Y)                            # (B, n_out, out, P)
        if t > 0:
            Y = lins[t].fx_T(Y)
    a = aN.reshape(B * n_out)
    if divergence == "euclidean":                                  # Q_N = 0, r = 1 + delta
        v = a / (1.0 + damping)
    else:                                                          # the softmax Fisher
        p = torch.softmax(out.reshape(B, -1), -1)
        QN = (torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / B   # (B, n, n)
        if damping == 0:   # the undamped natural gradient: F itself must be invertible
            Js = [stage_jacobian(w, lin.X) for w, lin in zip(factors, lins)]
            return _undamped_natural_gradient(Js, _block_diag(QN), a, B * (n_out - 1))
        gramian = OutputGramian(factors, [lin.X for lin in lins])
        v = damped_fisher_direction(gramian, fisher_factor(p, B), a, damping, solve)
    v = v.reshape(B, n_out)
    # J_i' v: the control gradient of the per-sample cotangent sum_j v_bj w_bj
    return [-outer_sum(torch.einsum("bj,bjop->bop", v, w), lin.X).reshape(-1)
            for w, lin in zip(factors, lins)]


def _undamped_natural_gradient(Js, QN, a, max_rank):
    r""":math:`-F^{-1} J^\top a` with the Fisher :math:`F = J^\top Q_N J` (m x m), which
    has rank at most B (n_N - 1) (each softmax Fisher block has the null vector 1)."""
    J = torch.cat(Js, 1)
    m = J.shape[1]
    F = J.T @ QN @ J
    L, info = torch.linalg.cholesky_ex(0.5 * (F + F.T))
    if bool(info.any()):
        raise NotPositiveDefiniteError(
            f"lqr_direction: divergence='kl' with damping=0 needs an invertible Fisher; "
            f"it is {m} x {m}, of rank at most {max_rank} (batch x (classes - 1)) or "
            "numerically singular: use damping > 0")
    u = -torch.cholesky_solve((J.T @ a).unsqueeze(-1), L).squeeze(-1)
    return list(u.split([Jt.shape[1] for Jt in Js]))


def _riccati_steps(sts, xs, aN, loss_hessian, divergence, damping, neumann_terms):
    """The batch-augmented Riccati recursion (dense matrices of size B n_i)."""
    out = xs[-1]
    B = out.shape[0]
    lins = [StageLinearization(st, xs[t]) for t, st in enumerate(sts)]
    jac = [lin.jacobians() for lin in lins]
    A = [_block_diag(fx) for fx, _ in jac]
    Bm = [fu.reshape(-1, fu.shape[-1]) for _, fu in jac]
    QN = Q = R = M = None
    if divergence == "kl":
        p = torch.softmax(out.reshape(B, -1), -1)
        QN = _block_diag(torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)) / B
        R = [b.new_zeros(b.shape[-1], b.shape[-1]) for b in Bm]
    elif divergence == "newton":
        QN = loss_hessian
        # costates lambda_{i+1} (batch-augmented), lambda_N = a_N, lambda_i = A_i' lambda
        lam = [None] * (len(sts) + 1)
        lam[-1] = aN
        for t in range(len(sts) - 1, -1, -1):
            lam[t] = A[t].T @ lam[t + 1]
        Q, R, M = [], [], []
        for t, lin in enumerate(lins):
            Hxx, Huu, Hux = _hamiltonian_hessians(lin, lam[t + 1].reshape(B, -1))
            Q.append(_block_diag(Hxx))
            R.append(Huu.sum(0))
            M.append(torch.cat(Hux.unbind(0), -1))
    try:
        if neumann_terms is None:
            steps = steepest_descent_lqr(A, Bm, aN, QN, Q=Q, R=R, M=M, damping=damping)
        else:
            solver = NeumannSolver(neumann_terms, damping=damping)
            steps = steepest_descent_lqr(A, Bm, aN, QN, Q=Q, R=R, M=M, solver=solver)
    except NotPositiveDefiniteError as exc:
        if divergence != "newton":
            raise
        # the LQR's "regularization" and "R" are this function's damping and the loss
        raise NotPositiveDefiniteError(
            f"lqr_direction: divergence='newton' with damping={damping}: the Hessian of the "
            f"loss with respect to the parameters (the LQR's Q_uu) is not positive "
            f"definite at this point; increase damping") from exc
    return lins, steps


class LQRDescent(torch.optim.Optimizer):
    r"""Steepest descent through the LQR as a torch.optim optimizer:
    :math:`u \leftarrow u + \eta\, d` with ``d`` the direction of :func:`lqr_direction`.

    ``step(closure)`` takes the standard closure (zero_grad, forward, ``loss.backward()``,
    return the loss); the input batch, the output and the output gradient are recorded
    by hooks (:func:`nnbridge.capture`).  ``divergence="newton"`` also needs
    ``loss_hessian(output) -> (B n_out, B n_out)``, the Hessian of the batch loss with
    respect to the flattened output.  A non-finite loss or direction skips the step
    (:class:`~trajopt.errors.SkippedStepWarning`) and leaves the parameters unchanged.

    Parameters
    ----------
    model : nn.Sequential
    lr : float
    divergence : {"euclidean", "kl", "newton"}
    damping : float
    loss_hessian : callable, optional
    neumann_terms : int, optional
        The Neumann-series variant (see :func:`lqr_direction`).
    solve : {"auto", "direct", "cg"}
        The output-space solve of the "kl" direction (see :func:`lqr_direction`).
    """

    __getstate__ = not_copyable  # copy.deepcopy / pickle: a clear error

    def __init__(self, model: nn.Module, lr: float = 0.1, *, divergence: str = "kl",
                 damping: float = 1e-3,
                 loss_hessian: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 neumann_terms: int | None = None, solve: str = "auto"):
        if not isinstance(model, nn.Module):
            raise TypeError(f"LQRDescent needs the model, not its parameters; got "
                            f"{type(model).__name__}")
        if isinstance(lr, bool) or not isinstance(lr, (int, float)) or not 0 <= lr < \
                float("inf"):
            raise InvalidArgumentError(f"lr, the learning rate, must be a finite number >= 0; got "
                                       f"{lr!r}")
        if isinstance(damping, bool) or not isinstance(damping, (int, float)):
            raise InvalidArgumentError(f"damping must be a number; got {damping!r}")
        _check(divergence, damping, neumann_terms)
        check_solve(solve)
        if divergence == "newton" and loss_hessian is None:
            raise InvalidArgumentError("divergence='newton' needs loss_hessian(output)")
        self.model = model
        self.pre, self._stages = stages(model)
        self._traced = TracedValues(model)
        self._replay = StageReplay(self._stages)
        check_unshared(self._stages)
        _check_all_stages(model, self._stages)
        self.loss_hessian = loss_hessian
        super().__init__(model.parameters(), {"lr": lr, "divergence": divergence,
                                              "damping": damping,
                                              "neumann_terms": neumann_terms,
                                              "solve": solve})

    def add_param_group(self, param_group: dict) -> None:
        """One parameter group, the model's stages (a second would be ignored)."""
        refuse_second_group(self)
        super().add_param_group(param_group)

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        if closure is None or not callable(closure):
            raise TypeError("LQRDescent.step needs a closure that zeroes the gradients, "
                            "runs the model, calls loss.backward() and returns the loss")
        check_no_frozen(self._stages, "LQRDescent")
        check_rerun_deterministic(self._stages, "LQRDescent")
        self._traced.check()
        group = self.param_groups[0]
        # recorded in the parameters' dtype, also after an autocast forward pass (its
        # activations are of the lower dtype): the direction is computed in it
        weight = self._stages[0].module.weight
        with capture(self.model, self._stages, dtype=weight.dtype) as rec, \
                torch.enable_grad():
            loss = closure()
        if not loss_is_finite(loss):
            warnings.warn(f"non-finite loss {loss}; step skipped", SkippedStepWarning,
                          stacklevel=2)
            return loss
        check_gradients(self._stages, "LQRDescent")
        self._replay.check(rec.inputs, rec.output, rec.passes)
        out = rec.output
        xs = list(rec.inputs) + [out]
        aN = rec.output_grad.reshape(-1)
        with torch.autocast(weight.device.type, enabled=False):
            H = None if group["divergence"] != "newton" else self.loss_hessian(out)
            d = _direction(self.model, self._stages, xs, aN, H, group["divergence"],
                           group["damping"], group["neumann_terms"],
                           solve=group.get("solve", "auto"))
        if not all(bool(torch.isfinite(v).all()) for v in d):
            warnings.warn("non-finite direction; step skipped", SkippedStepWarning,
                          stacklevel=2)
            return loss
        for p, v in zip(self.model.parameters(), d):
            p.add_(v, alpha=group["lr"])
        return loss


def _hamiltonian_hessians(lin: StageLinearization, lam: torch.Tensor):
    r"""Per-sample second derivatives of :math:`\lambda^\top f(x, U)`:
    ``Hxx`` (B, n, n), ``Huu`` (B, m, m), ``Hux`` (B, m, n)."""
    st = lin.stage
    U = lin.U

    def ham(xi, Uflat, li):
        return (st.forward(xi.unsqueeze(0), Uflat.reshape(U.shape)).reshape(-1) * li).sum()

    x = lin.x.reshape(lin.B, -1)

    def ham_flat(xf, Uflat, li):
        return ham(xf.reshape(lin.x_shape), Uflat, li)

    H = torch.func.vmap(torch.func.hessian(ham_flat, argnums=(0, 1)),
                        in_dims=(0, None, 0))(x, U.reshape(-1), lam)
    (Hxx, _), (Hux, Huu) = H
    return Hxx, Huu, Hux
