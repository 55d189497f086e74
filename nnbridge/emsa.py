r"""The extended method of successive approximations (E-MSA; Li, Chen, Tai & E, "Maximum
principle based algorithms for deep learning", JMLR 18, 2018, Alg. 2): the
Pontryagin-based training method the DDPNOpt paper compares against (its Table 3 and
Fig. 3).

On the stage decomposition every nnbridge optimizer uses, :math:`x_{t+1} = f_t(x_t,
\theta_t)` (:func:`nnbridge.stages`), with per-sample costates :math:`p^s_T = -\nabla
\Phi(x^s_T)` (the gradient of the loss of sample s) and :math:`p^s_t = \nabla_x H_t(x^s_t,
p^s_{t+1}, \theta_t)`, :math:`H_t(x, p, \theta) = p^\top f_t(x, \theta)`, one iteration
is

1. the forward pass (states) and the backward pass (costates) of the current weights
   (the training loop's own ``loss.backward()``, recorded);
2. for every layer at once, the maximization of the *extended* Hamiltonian averaged over
   the batch,

.. math::

    \theta_t \leftarrow \arg\max_\theta \frac1S \sum_s \Big[ H_t(x^s_t, p^s_{t+1}, \theta)
    - \tfrac{\rho}{2} \big\| x^s_{t+1} - f_t(x^s_t, \theta) \big\|^2
    - \tfrac{\rho}{2} \big\| p^s_t - \nabla_x H_t(x^s_t, p^s_{t+1}, \theta) \big\|^2
    \Big],

   with :math:`x_{t+1}, p_t` held at their current values: the two penalties vanish, with
   their gradients, at the current weights and keep the step where the states and
   costates it was computed from stay valid (the "extended" part; plain MSA, rho = 0,
   diverges on networks).  The maximization is approximate, ``inner_steps`` steps of
   gradient ascent of size ``lr`` (Li et al. leave the maximizer open; their
   experiments use a few gradient steps per iteration): the first step is exactly a
   gradient-descent step on the loss.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from trajopt.errors import InvalidArgumentError, SkippedStepWarning, UnsupportedModelError

from .amp import amp_step, take_loss_scale
from .decompose import stages
from .optimizer_base import not_copyable, refuse_second_group
from .recorder import BatchRecorder
from .stages import Stage, check_rerun_deterministic, check_unshared, without_gradient
from .terminal import check_output_gradient
from .traced_values import StageReplay, TracedValues

__all__ = ["EMSA", "extended_hamiltonian"]


def extended_hamiltonian(stage: Stage, U: torch.Tensor, x: torch.Tensor, p_next: torch.Tensor,
                         x_next: torch.Tensor, p: torch.Tensor, rho: float) -> torch.Tensor:
    r"""The batch mean of the extended Hamiltonian of ``stage`` at weights ``U`` (its
    augmented weight matrix), differentiable in ``U``.

    Parameters
    ----------
    stage : Stage
    U : (out, in') augmented weights
    x : (S, ...) stage inputs; x_next : (S, ...) the current outputs
    p_next : (S, ...) costates of the outputs; p : (S, ...) costates of the inputs
    rho : float
    """
    xg = x.detach().requires_grad_()
    with torch.enable_grad():
        f = stage.forward(xg, U)
        H = (p_next * f).reshape(f.shape[0], -1).sum(-1)   # (B,) outputs too
        (Hx,) = torch.autograd.grad(H.sum(), xg, create_graph=True)
    S = x.shape[0]
    return (H.sum() - 0.5 * rho * ((x_next - f) ** 2).sum()
            - 0.5 * rho * ((p - Hx) ** 2).sum()) / S


class EMSA(torch.optim.Optimizer):
    r"""E-MSA (module docstring) with the torch.optim interface.

    Parameters
    ----------
    model : nn.Module
        A network :func:`nnbridge.stages` decomposes (Linear / Conv layers and the
        parameter-free ops between them; normalization layers are not supported).
    lr : float
        Step size of the gradient ascent on the extended Hamiltonian (the first step is a
        gradient-descent step on the loss of this size); 0.2, chosen on digits'
        validation split (``docs/emsa.md``).
    rho : float
        Weight of the two penalties (Li et al.'s rho).
    inner_steps : int
        Gradient-ascent steps per iteration and layer.
    grad_scaler : torch.amp.GradScaler, optional
        Needed only where ``scaler.unscale_(optimizer)`` runs before
        ``scaler.step(optimizer)`` (:mod:`nnbridge.amp`).

    Notes
    -----
    ``step(closure)``: the closure runs zero_grad, the forward pass and
    ``loss.backward()`` and returns the loss; ``step()`` without one uses the passes run
    since the last step.  A non-finite loss or update skips the step (weights unchanged,
    :class:`~trajopt.errors.SkippedStepWarning`).  ``p.grad`` is not read: the costates
    come from the recorded backward pass (clipping a gradient does not change E-MSA's
    step).
    """

    __getstate__ = not_copyable  # copy.deepcopy / pickle: a clear error

    #: torch.amp.GradScaler.step hands the loss scale to the step (:mod:`nnbridge.amp`)
    _step_supports_amp_scaling = True

    def __init__(self, model: nn.Module, lr: float = 0.2, *, rho: float = 1.0,
                 inner_steps: int = 5, grad_scaler: torch.amp.GradScaler | None = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"EMSA needs the model, not its parameters; got "
                            f"{type(model).__name__}")
        if not lr > 0:
            raise InvalidArgumentError(f"lr must be positive; got {lr}")
        if not rho >= 0:
            raise InvalidArgumentError(f"rho must be >= 0; got {rho}")
        if isinstance(inner_steps, bool) or not isinstance(inner_steps, int) or \
                inner_steps < 1:
            raise InvalidArgumentError(f"inner_steps must be a positive integer; got "
                                       f"{inner_steps!r}")
        self.model = model
        self._grad_scaler = grad_scaler
        self._pre, self._stages = stages(model)
        self._traced = TracedValues(model)
        self._replay = StageReplay(self._stages)
        for st in self._stages:
            if type(st) is not Stage:
                raise UnsupportedModelError(
                    f"model: EMSA supports Linear / Conv stages, not normalization layers "
                    f"yet; stage {st.index} is {type(st.module).__name__}")
        check_unshared(self._stages)
        params = [p for st in self._stages for p in st.params()]
        others = [n for n, p in model.named_parameters() if all(p is not q for q in params)]
        if others:
            raise UnsupportedModelError(f"model: the parameters {others} belong to no stage "
                                        f"EMSA can update")
        super().__init__(params, dict(lr=float(lr), rho=float(rho),
                                      inner_steps=inner_steps))
        self._recorder = BatchRecorder(model, self._stages)

    def add_param_group(self, param_group: dict) -> None:
        """One parameter group, the model's stages (a second would be ignored)."""
        refuse_second_group(self)
        super().add_param_group(param_group)

    def zero_grad(self, set_to_none: bool = True) -> None:
        super().zero_grad(set_to_none)
        self._recorder.clear(keep_pending=True)

    def costates(self, inputs: list[torch.Tensor], output_grad: torch.Tensor
                 ) -> list[torch.Tensor]:
        """Per-sample costates of every stage input and the output: ``p_T = -S dL/dx_T``
        (S the batch: the gradient of each sample's own loss when the loss is a batch
        mean), ``p_t = f_x' p_{t+1}``; a list of T+1 tensors."""
        S = output_grad.shape[0]
        ps = [-S * output_grad]
        for st, x in zip(reversed(self._stages), reversed(inputs)):
            _, vjp = torch.func.vjp(lambda z, st=st: st.forward(z), x)
            ps.append(vjp(ps[-1])[0])
        return ps[::-1]

    @amp_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One E-MSA iteration; returns the closure's loss (None without one)."""
        loss = None
        if closure is not None:
            self._recorder.clear()
            with torch.enable_grad():
                loss = closure()
            if loss is not None and not bool(torch.isfinite(torch.as_tensor(loss)).all()):
                self._recorder.clear()
                warnings.warn(f"non-finite loss {loss}; step skipped", SkippedStepWarning,
                              stacklevel=2)
                return loss
        scale = take_loss_scale(self, self._grad_scaler)
        if scale.skip:   # the scaler found inf / NaN gradients: no step
            self._recorder.clear()
            return loss
        rec = self._recorder.batch(self._stages[0].module.weight.dtype, scale.inverse)
        why = self._recorder.why_not_recorded()   # before clear() forgets it
        self._recorder.clear()
        if rec is None:
            raise RuntimeError("EMSA.step needs a recorded forward and backward pass: pass "
                               "a closure that runs them, or run them before step()"
                               + why)
        self._traced.check()
        check_rerun_deterministic(self._stages, "EMSA")
        self._replay.check(rec.inputs, rec.output, rec.passes)
        B = rec.output_grad.shape[0]
        check_output_gradient(B * rec.output_grad.reshape(B, -1), "cross_entropy",
                              rec.output, advice="EMSA's costates are B times the output "
                              "gradient of the batch-mean loss", any_loss=True)
        group = self.param_groups[0]
        lr, rho, steps = group["lr"], group["rho"], group["inner_steps"]
        with torch.no_grad():
            xs = rec.inputs + [rec.output]
            ps = self.costates(rec.inputs, rec.output_grad)
        new = []
        for t, st in enumerate(self._stages):
            U = st.control().detach()
            flags = [p.requires_grad for p in st.params()]
            if any(flags) and not all(flags):
                raise InvalidArgumentError(
                    f"stage {st.index} ({type(st.module).__name__}) is frozen in part: "
                    "freeze all of a layer's parameters or none")
            if not any(flags) or without_gradient(st):
                new.append(U)  # a frozen layer, or one without a gradient: its control stays
                continue
            for _ in range(steps):
                U = U.requires_grad_()
                value = extended_hamiltonian(st, U, xs[t], ps[t + 1], xs[t + 1], ps[t],
                                             rho)
                (g,) = torch.autograd.grad(value, U)
                U = (U + lr * g).detach()
            new.append(U)
        if not all(bool(torch.isfinite(U).all()) for U in new):
            warnings.warn("non-finite update; step skipped (weights unchanged)",
                          SkippedStepWarning, stacklevel=2)
            return loss
        with torch.no_grad():
            for st, U in zip(self._stages, new):
                for p, v in zip(st.params(), st.split(U)):
                    p.copy_(v)
        return loss
