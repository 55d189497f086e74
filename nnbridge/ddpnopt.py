r"""DDPNOpt (Liu, Chen & Theodorou, Alg. 3) and EKFAC as torch.optim optimizers.

One step on a batch of B samples (the closure's loss is the batch *mean* of a per-sample
loss :math:`\phi`):

1. the training loop's forward pass and ``loss.backward()`` (in a closure or before a
   plain ``step()``) are recorded by :class:`nnbridge.recorder.BatchRecorder`: the stage
   inputs :math:`x_t^i`, the gradient at the output, so
   :math:`V_x^{T,i} = B\,\partial \text{loss}/\partial x_T^i = \nabla\phi(x_T^i)`,
   and at each pre-activation (what ``p.grad`` holds beyond it -- a penalty, clipping --
   is a running cost :math:`l(u)`);
2. ``feedback=False``: :math:`\mathbb{E}[Q_u^t]` is ``p.grad`` (Prop. 2: with
   :math:`Q_{ux} = 0` DDP's backward pass is back-propagation) and the update is exactly
   the baseline's (SGD, RMSprop, Adam, EKFAC);
3. ``feedback=True``: the backward pass is :func:`trajopt.riccati.operator.
   operator_riccati_step` per stage, fed with the layer's operators
   (:class:`nnbridge.stages.StageLinearization`) and the curvature's response, with the
   value Hessian rank-one ("outer", Prop. 4) or dense per sample ("full"); then the
   additional forward pass applies, layer by layer,
   :math:`\delta u_t = -P_t^{-1}\bigl(d_t + \mathbb{E}_i[Q_{ux}^{t,i}\,\delta x_t^i]\bigr)`,
   :math:`\delta x_t = \hat x_t - x_t`, i.e. the batch mean of :math:`k^i + K^i \delta x^i`
   with the curvature's direction :math:`d_t` (the mean :math:`Q_u`, or its momentum /
   Adam moment) in the open-loop part.

A non-finite loss or update skips the step with a :class:`~trajopt.errors.
SkippedStepWarning`: parameters and optimizer state are left exactly as they were.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable
from typing import Any, Literal

import torch
from torch import nn

from trajopt.errors import InvalidArgumentError, SkippedStepWarning
from trajopt.riccati import (
    Carried,
    JointStep,
    joint_riccati_step,
    joint_value,
    operator_riccati_step,
)

from .amp import amp_step, take_loss_scale
from .batchnorm import batch_coupled
from .closure import loss_is_finite
from .curvature import CURVATURES, Exact, NetworkResponse, NoControl
from .decompose import stages
from .distributed import BatchMean, data_parallel_group, unwrap
from .feedback import feedback_terms, open_loop_gain, watched
from .graph import graph_stages
from .optimizer_base import not_copyable, refuse_second_group
from .recorder import BatchRecorder
from .stages import (
    StageLinearization,
    check_unshared,
    check_whole_gradients,
    draws_random,
    normalizes_by_batch,
    random_function,
    without_gradient,
    zeroed_gradient,
)
from .terminal import check_output_gradient, check_terminal_options, terminal_value
from .traced_values import StageReplay, TracedValues

__all__ = ["DDPNOpt", "EKFAC"]

_CLOSURE_HELP = ("a closure that zeroes the gradients, runs the forward pass, calls "
                 "loss.backward() and returns the loss (as for torch.optim.LBFGS)")
#: an optimizer built on part of a model (``model[:3]``, ``model.body``) whose own
#: forward is never called: the recorder's hooks sit on that module's forward
_PART_HELP = ("; the optimizer records the forward pass of the module it was given: one "
              "built on a slice or a part of the model (model[:3], model.body) sees "
              "nothing when the whole model runs -- give it the whole model and freeze "
              "the rest with requires_grad_(False)")


class DDPNOpt(torch.optim.Optimizer):
    r"""Differential Dynamic Programming Neural Optimizer.

    Parameters
    ----------
    model : nn.Sequential
        The network (decomposed once by :func:`nnbridge.stages`); its parameters form the
        single parameter group.
    lr : float, optional
        Learning rate :math:`\eta` (:math:`P = M/\eta`); default: the curvature's (ekfac
        0.1, exact 1.0, chosen on the digits validation split, ``docs/experiments.md``;
        identity 0.1, rmsprop 1e-3, adam 2e-3, where the feedback stays stable:
        ``docs/ddpnopt.md``, "Default rates").
    curvature : {"identity", "rmsprop", "adam", "ekfac", "exact"}
        :math:`Q_{uu}` model (Table 2): identity (SGD), RMSprop, Adam, EKFAC, or "exact"
        (vanilla DDP, small Linear networks).  Each takes the hyper-parameters of the
        torch.optim class it extends, with the same names and defaults (``momentum``,
        ``alpha``, ``betas``, ``eps``, ``weight_decay``, ...); EKFAC takes ``eps``
        (damping), ``alpha``, ``update_freq``; exact takes ``regularization`` (Levenberg-
        Marquardt :math:`\mu`, default 1.0).
    feedback : bool
        Apply the feedback policies (``False``: exactly the baseline optimizer).
    value_hessian : {"outer", "full", "joint"}
        Rank-one per-sample :math:`V_{xx} = c z z^\top` (Prop. 4; memory O(B n)), dense
        per-sample :math:`V_{xx}` (B, n, n) (small models), or the dense value of the
        batch-augmented state, (B n, B n), with the cross-sample blocks the shared
        weights create (:mod:`trajopt.riccati.joint`: the exact dynamic program of the
        batch, memory O(B^2 n^2): to measure what the per-sample forms approximate;
        first-order and EKFAC curvatures, one process).
    tikhonov : float
        :math:`\epsilon_V` added to every non-terminal :math:`V_{xx}` (Alg. 3).
    value_psd : bool
        Keep every per-sample :math:`V_{xx}` positive semidefinite (clamp the rank-one
        coefficient / the eigenvalues at 0).  ``False`` is the literal recursion, whose
        value Hessian an approximate curvature can drive negative and, layer after layer,
        to overflow (see ``docs/ddpnopt.md``).
    value_recursion : {"mean", "per_sample"}
        ``"per_sample"``: Alg. 3 literally (each sample's value follows its own
        :math:`k^i = -P^{-1}Q_u^i`); ``"mean"`` (default): the value of the batch-mean
        policy that is actually applied (block diagonal of the joint DP; the correction
        terms carry :math:`\mathbb{E}[Q_u]` and 1/B).  Identical for B = 1; see
        ``docs/ddpnopt.md`` for why the literal form fails to train.
    terminal_hessian : {"ggn", "fisher", "empirical"} or callable, optional
        The model of :math:`\nabla^2\phi` at the output (:mod:`nnbridge.terminal`):
        ``"ggn"`` the exact Gauss-Newton matrix of ``loss`` (= its Hessian; cross-entropy:
        a rank-r factor, r = classes - 1), ``"fisher"`` a sampled rank-one Fisher,
        ``"empirical"`` :math:`z = \nabla\phi` (the paper's factor, the empirical
        Fisher), or ``f(output)`` -> a factor (B, n) or (B, n, r), or the Hessian
        (B, n, n) with ``value_hessian="full"``.  Default (None): ``"fisher"`` with
        ``value_hessian="outer"`` (measured on MLPs: as stable as "ggn" at the cost of
        "empirical"; :class:`nnbridge.GTDDP`'s is "ggn"), ``"ggn"`` with ``"full"`` and
        ``"joint"`` (the loss's true Hessian, so that a full-mode step with the exact
        curvature is a DDP step); see ``docs/ddpnopt.md``.
    loss : {"cross_entropy", "mse"}
        The per-sample loss the closure's batch mean is of (torch's definitions,
        ``reduction="mean"``); used by ``"ggn"`` and ``"fisher"``.
    grad_scaler : torch.amp.GradScaler, optional
        Needed only where the loop calls ``scaler.unscale_(optimizer)`` before
        ``scaler.step(optimizer)`` (to clip the gradients): the scale of the recorded
        gradients (:mod:`nnbridge.amp`).  ``scaler.step(optimizer)`` alone needs nothing.
    **hyper
        Curvature hyper-parameters.
    """

    __getstate__ = not_copyable  # copy.deepcopy / pickle: a clear error

    #: torch.amp.GradScaler.step hands the loss scale to the step (:mod:`nnbridge.amp`)
    _step_supports_amp_scaling = True

    #: the backward pass carries the value gradient as V_x = K + Z a, K the gradient the
    #: training loop's backward pass sent to each stage (recorded), so that only the
    #: value's directions are pulled back (:class:`trajopt.riccati.value.Carried`)
    _carries_gradient = True

    #: the terminal Hessian of ``value_hessian="outer"`` when none is given (the dense
    #: forms default to "ggn"); a class's choice, by measurement (``docs/ddpnopt.md``)
    default_terminal_hessian = "fisher"

    def __init__(self, model: nn.Module, lr: float | None = None, *,
                 curvature: Literal["identity", "rmsprop", "adam", "ekfac", "exact"] = "adam",
                 feedback: bool = True,
                 value_hessian: Literal["outer", "full", "joint"] = "outer",
                 tikhonov: float = 0.0,
                 value_psd: bool = True,
                 value_recursion: Literal["mean", "per_sample"] = "mean",
                 terminal_hessian: str | Callable[[torch.Tensor], torch.Tensor] | None = None,
                 loss: Literal["cross_entropy", "mse"] = "cross_entropy",
                 grad_scaler: torch.amp.GradScaler | None = None,
                 **hyper: Any):
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__} needs the model (any nn.Module), not "
                            f"its parameters: the feedback pass walks its layers; got "
                            f"{type(model).__name__}")
        if curvature not in CURVATURES:
            raise InvalidArgumentError(f"curvature must be one of {sorted(CURVATURES)}; got "
                                       f"{curvature!r}")
        if value_recursion not in ("mean", "per_sample"):
            raise InvalidArgumentError(f"value_recursion must be 'mean' or 'per_sample'; "
                                       f"got {value_recursion!r}")
        if value_hessian not in ("outer", "full", "joint"):
            raise InvalidArgumentError(f"value_hessian must be 'outer', 'full' or 'joint'; "
                                       f"got {value_hessian!r}")
        if value_hessian == "joint" and curvature == "exact":
            raise InvalidArgumentError(
                "value_hessian='joint' with curvature='exact': the exact Q_uu of the "
                "batch-augmented state needs its cross-sample blocks, which are not formed; "
                "use value_hessian='full' (or a first-order / 'ekfac' curvature)")
        if terminal_hessian is None:
            terminal_hessian = (self.default_terminal_hessian if value_hessian == "outer"
                                else "ggn")
        check_terminal_options(terminal_hessian, loss)
        if not tikhonov >= 0:
            raise ValueError(f"Invalid tikhonov value: {tikhonov}")
        self.curvature = CURVATURES[curvature]()
        defaults = dict(self.curvature.defaults)
        unknown = sorted(set(hyper) - set(defaults))
        if unknown:
            raise TypeError(f"unexpected hyper-parameter(s) {unknown} for curvature "
                            f"{curvature!r}; it takes {sorted(defaults)}")
        defaults.update(hyper)
        if lr is not None:
            defaults["lr"] = lr
        self.curvature.validate(defaults)
        if isinstance(self.curvature, Exact) and not feedback:
            raise InvalidArgumentError("curvature='exact' (vanilla DDP) needs feedback=True")
        defaults.update(feedback=bool(feedback), tikhonov=float(tikhonov),
                        value_psd=bool(value_psd), value_recursion=value_recursion)
        self.model = model
        self.value_hessian = value_hessian
        self.terminal_hessian = terminal_hessian
        self.loss = loss
        self._grad_scaler = grad_scaler
        self._rng: torch.Generator | None = None   # "fisher": created at the first use
        self._rng_state: torch.Tensor | None = None
        if isinstance(model, nn.DataParallel):
            raise InvalidArgumentError(
                "model: nn.DataParallel runs the forward pass on replicas in threads, which "
                "the recorded batch cannot follow; use DistributedDataParallel (one process "
                "per device, docs/ddpnopt.md) or pass the module it wraps on one device")
        net = unwrap(model)
        self._pre, self._stages = self._decompose(net)
        if isinstance(self.curvature, Exact):
            other = [st for st in self._stages if type(st.module) is not nn.Linear]
            if other:
                raise InvalidArgumentError(
                    f"curvature='exact' supports Linear stages only (it forms the dense "
                    f"per-sample control Jacobian); stage {other[0].index} is a "
                    f"{type(other[0].module).__name__}: use 'ekfac' or a first-order "
                    f"curvature for this model")
        params = [p for st in self._stages for p in st.params()]
        check_unshared(self._stages)
        fixed = [(n, p) for n, p in net.named_parameters() if all(p is not q for q in params)]
        if fixed:  # kfac-pytorch's rule for the layers it cannot precondition
            owners = sorted({n.rpartition(".")[0] or n for n, _ in fixed})
            base = ("SGD" if self.curvature.needs_factors or isinstance(self.curvature, Exact)
                    else curvature)
            warnings.warn(
                f"{type(self).__name__}: the parameters of {owners} have no DDP model (only "
                f"Linear / Conv layers and BatchNorm / LayerNorm affine parameters are "
                f"stages): they are updated by {base} from "
                f"p.grad, without feedback, and held fixed in the DDP pass", UserWarning,
                stacklevel=2)
        self._fixed = [p for _, p in fixed]
        super().__init__(params + self._fixed, defaults)
        self._recorder = BatchRecorder(net, self._stages,
                                       input_grads=feedback and self._carries_gradient)
        self._replay = StageReplay(self._stages)  # the stages against each recorded pass
        self._traced = TracedValues(net)  # what the trace read from Python, checked each step

    def zero_grad(self, set_to_none: bool = True) -> None:
        """torch.optim's ``zero_grad``; also forgets the recorded forward passes whose
        backward pass has run (:mod:`nnbridge.recorder`)."""
        super().zero_grad(set_to_none)
        self._recorder.clear(keep_pending=True)

    def add_param_group(self, param_group: dict) -> None:
        """The one parameter group is the model's stages; a second one is refused (it
        would be silently ignored by the step).  Per-layer learning rates: not yet."""
        refuse_second_group(self)
        super().add_param_group(param_group)

    # ------------------------------------------------------------------ extension points
    # (documented for subclasses: nnbridge.GTDDP replaces the chain of stages by the
    # stage graph of a residual network through these five)
    def _decompose(self, net: nn.Module) -> tuple[list[nn.Module], list]:
        """``(pre, stages)``: the input transform and the affine layers (one per stage)."""
        return stages(net)

    def _maps(self) -> list[tuple[int, nn.Module]]:
        """``(stage, module)`` of every module the feedback pass re-runs."""
        return [(st.index, m) for st in self._stages for post in st.post
                for m in post.modules()]

    def _random_functions(self) -> list[tuple[int, str]]:
        """``(stage, what)`` of every random function or tensor method the feedback pass
        would re-run (:func:`~nnbridge.stages.random_function`)."""
        return [(index, what) for index, m in self._maps()
                if (what := random_function(m)) is not None]

    def _ddp_context(self, rec):
        """Context of the DDP pass: BatchNorm in training mode normalizes with the
        statistics of the batch it sees and leaves its running statistics alone
        (:mod:`nnbridge.batchnorm`); ``rec`` None (no DDP pass): nothing."""
        return batch_coupled(self._bn_candidates() if rec is not None else [])

    # ------------------------------------------------------------------ helpers
    def _check_feedback_modules(self):
        """The feedback pass re-runs each stage's sigma: it must be deterministic (and
        BatchNorm in training mode is run with the statistics of the batch it sees,
        :mod:`nnbridge.batchnorm`)."""
        for index, what in self._random_functions():
            raise InvalidArgumentError(
                f"stage {index}: {what} draws random numbers in every mode, which makes "
                "the feedback pass random (it re-runs the stage and would draw other "
                "numbers than the recorded pass); use feedback=False, or add the noise "
                "before the first layer or to the batch in the training loop")
        for index, p in self._maps():
            what = draws_random(p)
            if what is not None:
                raise InvalidArgumentError(
                    f"stage {index}: {what} in training mode makes the feedback pass "
                    "random (it re-runs the stage and would draw another mask than the "
                    "recorded pass); use feedback=False or model.eval() for it")
            if isinstance(p, nn.SyncBatchNorm) and p.training:
                raise InvalidArgumentError(
                    f"stage {index}: SyncBatchNorm in training mode normalizes with "
                    "statistics over all ranks, which the feedback pass does not "
                    "reproduce; use BatchNorm (per-rank statistics) or feedback=False")

    def _terminal(self, rec, mean: BatchMean):
        B = mean.local
        Vx = (rec.output_grad * B).reshape(B, -1)
        if self.terminal_hessian in ("ggn", "fisher"):
            check_output_gradient(Vx, self.loss, rec.output)
        if self.terminal_hessian == "fisher" and self._rng is None:
            self._rng = torch.Generator(device=Vx.device).manual_seed(torch.initial_seed())
            if self._rng_state is not None:  # from load_state_dict
                self._rng.set_state(self._rng_state)
        if self.value_hessian != "joint":
            return terminal_value(Vx, rec.output, self.terminal_hessian, self.loss,
                                  self.value_hessian, self._rng, mean.rows)
        if mean.size != B:
            raise InvalidArgumentError(
                "value_hessian='joint' couples all the samples of a batch in one value; "
                "with the batch split over ranks use 'outer' or 'full'")
        return joint_value(terminal_value(Vx, rec.output, self.terminal_hessian,
                                          self.loss, "full", self._rng, mean.rows))

    def _riccati_step(self, value, lin, make, *, tikhonov: float, project_psd: bool,
                      recursion: str, propagate: bool, mean: BatchMean):
        """One backward step: per sample (:func:`trajopt.riccati.operator_riccati_step`)
        or, with ``value_hessian="joint"``, batch-augmented (:func:`trajopt.riccati.
        joint_riccati_step`; its recursion is the joint one)."""
        if self.value_hessian == "joint":
            return joint_riccati_step(value, lin, make, samples=mean.local,
                                      tikhonov=tikhonov, project_psd=project_psd,
                                      propagate=propagate)
        return operator_riccati_step(value, lin, make, tikhonov=tikhonov,
                                     project_psd=project_psd, recursion=recursion,
                                     propagate=propagate, batch_size=mean.size)

    def state_dict(self) -> dict[str, Any]:
        """torch.optim's state dict, plus the state of the generator of the sampled
        Fisher (so that a resumed run draws what an uninterrupted one would)."""
        out = super().state_dict()
        if self._rng is not None:
            out["fisher_rng"] = self._rng.get_state()
        elif self._rng_state is not None:
            out["fisher_rng"] = self._rng_state
        return out

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """torch.optim's, refusing a state dict of another curvature (its hyper-parameters
        differ: Adam's moments loaded into an RMSprop curvature would fail later, at the
        first step, with a bare KeyError)."""
        state_dict = dict(state_dict)
        rng = state_dict.pop("fisher_rng", None)
        groups = state_dict.get("param_groups") or [{}]
        theirs = set(groups[0]) - {"params"}
        # a scheduler adds keys (initial_lr); another curvature, or a torch.optim class
        # (no feedback, value_recursion, ...), lacks some of ours
        missing = sorted(set(self.defaults) - theirs)
        if theirs and missing:
            raise InvalidArgumentError(
                f"state_dict: saved by an optimizer without the hyper-parameters {missing} "
                f"of this {type(self).__name__} with curvature {self.curvature.name!r} (it "
                f"has {sorted(theirs - set(self.defaults))}): load it into the optimizer "
                f"it was saved from ({type(self).__name__} with that curvature)")
        super().load_state_dict(state_dict)
        # applied when the generator is created on the data's device (first step)
        self._rng, self._rng_state = None, rng

    def _running_cost_gradient(self, st, U, sent, hp, mean) -> torch.Tensor:
        r""":math:`l_u` of the layer ``st`` with control ``U``: weight decay's
        :math:`\lambda\tilde U` plus ``p.grad`` minus ``sent``, the gradient the backward
        pass sent through the network (:math:`\sum_i \nabla_{h^i}\text{loss}\;
        \tilde x^{i\top}` over the local samples, from the recorded pre-activation
        gradients, or None; zero up to rounding when nothing edited ``p.grad``)."""
        lu = self._grad(st)
        if sent is not None:
            lu = lu - mean(sent * mean.local)
        if hp["weight_decay"]:
            lu = lu + hp["weight_decay"] * U
        return lu

    def _grad(self, st) -> torch.Tensor:
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in st.params()]
        return st.join([g.detach() for g in grads])

    # ------------------------------------------------------------------ step
    @amp_step
    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One DDPNOpt iteration; returns the closure's loss (None without a closure).

        With a closure (zero_grad, forward, ``loss.backward()``, return the loss) the step
        is taken on the batch the closure evaluates.  Without one, on the forward and
        backward passes run since the last step (:mod:`nnbridge.recorder`: several are one
        batch, as in gradient accumulation).  The open-loop term is ``p.grad`` as the
        training loop left it (clipped, accumulated, with a penalty's gradient, reduced
        over data-parallel ranks); see ``docs/ddpnopt.md``, "In a training script".
        """
        if closure is not None and not callable(closure):
            raise TypeError(f"{type(self).__name__}.step takes {_CLOSURE_HELP}; got "
                            f"{type(closure).__name__}")
        loss = None
        if closure is not None:
            self._recorder.clear()
            with torch.enable_grad():
                loss = closure()
            if not loss_is_finite(loss):
                self._recorder.clear()
                warnings.warn(f"non-finite loss {loss}; step skipped", SkippedStepWarning,
                              stacklevel=2)
                return loss
        group = self.param_groups[0]
        feedback = group["feedback"]
        if feedback:
            self._check_feedback_modules()
            check_whole_gradients(self._stages)
        # after the checks (a refused step leaves p.grad as the loop left it)
        scale = take_loss_scale(self, self._grad_scaler,
                                records=feedback or self.curvature.needs_factors)
        if scale.skip:   # the scaler found inf / NaN gradients: no step, as torch.optim's
            self._recorder.clear()
            return loss
        dtype = self._stages[0].module.weight.dtype
        rec = self._recorder.batch(dtype, scale.inverse)
        why = self._recorder.why_not_recorded()   # before clear() forgets it
        self._recorder.clear()
        if rec is None and (feedback or self.curvature.needs_factors):
            if closure is not None:
                raise RuntimeError(f"the closure must run the model's forward pass and call "
                                   f"loss.backward(); {type(self).__name__}.step needs "
                                   f"{_CLOSURE_HELP}{_PART_HELP}{why}")
            raise RuntimeError("no forward and backward pass of the model was recorded "
                               "since the last step: run them (with gradients enabled) "
                               f"before step(), or pass {_CLOSURE_HELP}{_PART_HELP}"
                               + why)
        with self._ddp_context(rec if feedback else None):
            return self._step(rec, group, feedback, loss)

    def _step(self, rec, group, feedback, loss):
        if feedback:
            self._traced.check()
            self._verify_decomposition(rec)
        # a layer without a gradient (run under no_grad in forward) is kept, as frozen
        frozen = [f or without_gradient(st) for f, st in zip(self._frozen(), self._stages)]
        rng_before = None if self._rng is None else self._rng.get_state()
        device = self._stages[0].module.weight.device.type
        # the DDP pass runs in the parameters' dtype, also inside an autocast region
        with torch.no_grad(), torch.autocast(device, enabled=False):
            mean = None if rec is None else BatchMean.over(
                rec.output.shape[0], data_parallel_group(self.model), rec.output.device)
            if feedback:   # a layer whose gradients the loop zeroed is kept too
                controls, states = self._ddp_update(
                    rec, group, [f or zeroed_gradient(st) for f, st in
                                 zip(frozen, self._stages)], mean)
            else:  # a layer without a gradient is skipped, as torch.optim does
                controls, states = self._open_loop_update(rec, group, frozen, mean)
            fixed = self._fixed_update(group)
            # one check, over every new control and state: the largest magnitude is NaN /
            # inf exactly where an entry is (a sum, as before, also overflowed on large
            # finite entries and skipped good steps)
            new = [U for U in controls if U is not None] + [
                v for s in states + [s for _, _, s in fixed] if s is not None
                for v in s.values() if torch.is_tensor(v) and v.is_floating_point()] + [
                v for _, v, _ in fixed]
            if new and not bool(torch.isfinite(_largest_magnitude(new))):
                warnings.warn("non-finite update; step skipped (parameters and state "
                              "unchanged)", SkippedStepWarning, stacklevel=3)
                if rng_before is None:   # the Fisher generator is part of the state too
                    self._rng = None
                else:
                    self._rng.set_state(rng_before)
                return loss
            for p, v, s in fixed:
                p.copy_(v)
                self._commit(p, s)
            for st, U, s in zip(self._stages, controls, states):
                if U is None:  # a frozen stage: parameters and state untouched
                    continue
                for p, v in zip(st.params(), st.split(U)):
                    p.copy_(v)
                self._commit(st.module.weight, s)
        return loss

    def _verify_decomposition(self, rec) -> None:
        """Each step: the stages replay the training loop's forward pass
        (:class:`~nnbridge.traced_values.StageReplay`), so that the feedback pass re-runs
        what it ran."""
        self._replay.check(rec.inputs, rec.output, rec.passes)

    def _fixed_update(self, group) -> list[tuple[torch.Tensor, torch.Tensor, dict]]:
        """``(parameter, new value, new state)`` of the parameters outside the stages: the
        open-loop update of the curvature when it is elementwise (identity, rmsprop,
        adam), SGD for the curvatures that need a layer's structure (ekfac, exact);
        parameters without a gradient are skipped, as torch.optim does."""
        out = []
        curv = self.curvature
        sgd = curv.needs_factors or isinstance(curv, Exact)
        for p in self._fixed:
            if p.grad is None:
                continue
            if p.grad.is_sparse and not sgd and curv.name != "identity":
                name = next(n for n, q in self.model.named_parameters() if q is p)
                raise InvalidArgumentError(
                    f"{name} has a sparse gradient (nn.Embedding(sparse=True)): curvature "
                    f"{curv.name!r} keeps dense moments and does not take it (as "
                    "torch.optim.Adam / RMSprop do not); use sparse=False, or "
                    "curvature='identity' or 'ekfac'")
            state, step = self._saved(p)
            g = p.grad.detach().to(p.dtype)
            if group.get("weight_decay"):
                g = g + group["weight_decay"] * p.detach()
            if sgd:
                out.append((p, p.detach() - group["lr"] * g, {}))
                continue
            new = curv.update(state, g, group, step)
            pre = curv.preconditioner(new, group, step)
            out.append((p, p.detach() + curv.open_loop(new, g, group, step, pre), new))
        return out

    def _frozen(self) -> list[bool]:
        """Per stage: all its parameters have ``requires_grad=False`` (a stage without
        control: it keeps its parameters and its optimizer state, and only carries the
        value through its dynamics).  A stage frozen in part is refused."""
        out = []
        for st in self._stages:
            flags = [p.requires_grad for p in st.params()]
            if any(flags) and not all(flags):
                names = [n for n, p in st.module.named_parameters() if not p.requires_grad]
                raise InvalidArgumentError(
                    f"stage {st.index} ({type(st.module).__name__}) is frozen in part "
                    f"({names} have requires_grad=False): freeze all of a layer's "
                    "parameters or none")
            out.append(not any(flags))
        return out

    def _hp(self, st, group) -> tuple[dict, dict, int]:
        return (group, *self._saved(st.module.weight))

    def _saved(self, key: torch.Tensor) -> tuple[dict, int]:
        """The optimizer state kept under ``key`` (without its step count) and the number
        of this step; ``.get``: a skipped step leaves no empty entry."""
        saved = self.state.get(key, {})
        return {k: v for k, v in saved.items() if k != "step"}, int(saved.get("step", 0)) + 1

    def _commit(self, key: torch.Tensor, state: dict) -> None:
        """Store a step's new ``state`` under ``key``, counting the step."""
        state["step"] = self.state.get(key, {}).get("step", 0) + 1
        self.state[key] = state

    def _open_loop_update(self, rec, group, frozen, mean):
        controls, states = [], []
        for t, st in enumerate(self._stages):
            if frozen[t]:
                controls.append(None)
                states.append(None)
                continue
            hp, state, step = self._hp(st, group)
            U = st.control()
            g = self._grad(st)
            if hp["weight_decay"]:
                g = g + hp["weight_decay"] * U
            w = X = None
            if self.curvature.needs_factors:
                X = st.unfold_calls(rec.calls[t])     # every call (nnbridge.EKFAC)
                hg = rec.factor_gradient(t, st)
                w = st.factor_view(hg * hg.shape[0])
            new = self.curvature.update(state, g, hp, step, w, X, mean)
            pre = self.curvature.preconditioner(new, hp, step)
            controls.append(U + self.curvature.open_loop(new, g, hp, step, pre))
            states.append(new)
        return controls, states

    def _carried(self, rec, value, mean):
        r"""``(value, Ks)``: the terminal value carrying :math:`V_x = K_T + Z\cdot 0`
        and :math:`K_t = B \times` the gradient stage t's module sent to its input
        (:mod:`nnbridge.recorder`), or ``(value, None)`` where nothing is carried (dense
        values, no record)."""
        grads = rec.input_grads
        if not (getattr(value, "factored", False) and grads and
                any(g is not None for g in grads[1:])):
            return value, None
        B = mean.local
        r = value.directions().shape[1]
        value = dataclasses.replace(value, carried=Carried(
            K=value.Vx, a=value.Vx.new_zeros(B, r)))
        Ks = [None if g is None else (g * B).reshape(B, -1) for g in grads]
        return value, Ks + [value.Vx]

    def _ddp_update(self, rec, group, frozen, mean):
        T = len(self._stages)
        value, Ks = self._carried(rec, self._terminal(rec, mean), mean)
        rec.input_grads = None  # B-scaled into Ks (or not carried): not read again
        curv = self.curvature
        out: list[dict] = [None] * T
        steps = [None] * T
        for t in range(T - 1, -1, -1):
            st = self._stages[t]
            hp, state, step = self._hp(st, group)
            x_next = rec.inputs[t + 1] if t < T - 1 else rec.output
            # what the loop did to p.grad after the backward pass (a penalty's gradient,
            # clipping, hooks) is a running cost l(u): its gradient joins weight decay's.
            # With the "mean" recursion only E[Q_u] = E[f_u' V_x'] + l_u enters the step,
            # so the gradient the backward pass sent (h, recorded) is left out of both
            # (StageLinearization.value_gradient): l_u + sent = p.grad, one product
            h = rec.h_grads[t]
            fused = h is not None and not frozen[t] and hp["value_recursion"] == "mean"
            carry = None if Ks is None or t == 0 else (Ks[t + 1], Ks[t], h)
            lin = StageLinearization(st, rec.inputs[t], x_next=x_next, mean=mean,
                                     sent=h if fused else None, carry=carry,
                                     cancelled_bias=self._bias_cancelled(t))
            U = lin.U
            tik = hp["tikhonov"] if t < T - 1 else 0.0
            rec_t: dict[str, Any] = {"hp": hp, "step": step, "U": U}
            lu = None if frozen[t] else self._running_cost_gradient(
                st, U, None if h is None or fused else lin.control_gradient(h), hp, mean)

            def make(Qu, val, lin=lin, hp=hp, state=state, step=step, tik=tik,
                     rec_t=rec_t, lu=lu, nxt=value):
                if lu is None:  # no control: no policy, the value passes through f_x
                    return NoControl(lin)
                g = Qu + lu
                if isinstance(curv, Exact):
                    cst, pre = state, curv.build(lin, val, tik, hp)
                else:
                    w = lin.factors(val.Vx.unsqueeze(1)).squeeze(1) if curv.needs_factors \
                        else None
                    cst = curv.update(state, g, hp, step, w, lin.X, mean)
                    pre = curv.preconditioner(cst, hp, step)
                rec_t.update(g=g, state=cst, pre=pre)
                # the value's response applies P^-1 to this g: the open-loop step
                reuse = pre.value_is_inverse and curv.reuses_response(cst, hp)
                watch = curv.watches_feedback and hp["value_psd"]
                if not (reuse or watch):
                    return NetworkResponse(pre, lin, lu)
                resp = NetworkResponse(pre, lin, lu, total=g, qu=Qu, rotated=reuse)
                if watch:   # the step against the value's model, before the value uses it
                    r = resp.apply_total(Qu)    # (forms S g: step_curvature reads it)
                    if self.value_hessian == "joint":   # V' of the batch (``val``: its
                        B = r.shape[0]                   # diagonal blocks), one sample
                        gain = open_loop_gain(resp.step_curvature(), r.reshape(1, -1), nxt,
                                              lambda local_sum: local_sum / B, tik)
                    else:
                        gain = open_loop_gain(resp.step_curvature(), r, val, mean, tik)
                    again = curv.overshot(state, cst, gain)
                    if again is not None:   # this step's update again, in fresh bases
                        cst = curv.update(again, g, hp, step, w, lin.X, mean)
                        pre = curv.preconditioner(cst, hp, step)
                        rec_t.update(state=cst, pre=pre)
                        resp = NetworkResponse(pre, lin, lu, total=g, qu=Qu, rotated=reuse)
                if reuse:
                    rec_t["resp"] = resp
                return resp

            steps[t] = self._riccati_step(value, lin, make, tikhonov=tik,
                                          project_psd=hp["value_psd"],
                                          recursion=hp["value_recursion"],
                                          propagate=t > 0, mean=mean)
            value = steps[t].value
            steps[t] = _released(steps[t])
            resp = rec_t.pop("resp", None)
            if resp is not None and resp.Sg is not None:   # -P^-1 g, kept instead of g
                rec_t["Sg"], rec_t["g"] = resp.Sg, None
            elif resp is not None and resp.Rg is not None:  # the same, in the eigenbasis
                rec_t["Rg"], rec_t["g"] = resp.Rg, None
            del resp
            # what only this backward step read: its sent and carried gradients, and the
            # value V_{t+1} beyond its factor (``docs/performance.md``, "Memory")
            lin.carry = lin.sent = rec.h_grads[t] = None
            if t + 1 < T:
                steps[t], steps[t + 1] = _consumed(steps[t], steps[t + 1])
                if Ks is not None:
                    Ks[t + 1] = None
            out[t] = rec_t
        # additional forward pass (Alg. 3): delta u_t = k_bar + mean_i K^i dx^i
        return self._feedback_pass(rec, out, steps, frozen, mean)

    def _bias_cancelled(self, t: int) -> bool:
        """Stage ``t``'s bias is removed by a BatchNorm normalizing with the batch's
        statistics right after the layer (the first of its ``post`` modules, or the next
        stage's module): its gradient is zero and its per-sample factors cancel over the
        batch, but an adaptive diagonal curvature (``lr / (sqrt(v) + eps)`` of that zero
        gradient, ~lr / eps) turns them into a feedback that drives the bias without
        bound, and the running mean used in evaluation cannot follow. Left out of the
        DDP pass under those curvatures (RMSprop's, Adam's); SGD's, EKFAC's and the
        exact one keep it: bounded there (``docs/ddpnopt.md``, "A bias before
        BatchNorm")."""
        st = self._stages[t]
        if not st.has_bias or not self.curvature.adaptive_diagonal:
            return False
        nxt = st.post[0] if st.post else (
            self._stages[t + 1].module if t + 1 < len(self._stages) else None)
        return normalizes_by_batch(nxt)

    def _bn_candidates(self) -> list[nn.Module]:
        """Every module the DDP pass runs (maps and stage modules)."""
        return [m for _, m in self._maps()] + [st.module for st in self._stages]

    def _feedback_pass(self, rec, out, steps, frozen, mean):
        T = len(self._stages)
        curv = self.curvature
        controls = []
        xhat = rec.inputs[0]
        for t, st in enumerate(self._stages):
            r = out[t]
            if frozen[t]:
                controls.append(None)
                if t < T - 1:
                    xhat = st.forward(xhat, r["U"])
                continue
            hp, cst, step, U, pre = r["hp"], r["state"], r["step"], r["U"], r["pre"]
            dX = None if t == 0 else (xhat - rec.inputs[t]).reshape(mean.local, -1)
            # the gain is at most 1 for an exact curvature only where V' >= 0 (value_psd)
            watch = dX is not None and curv.watches_feedback and hp["value_psd"]
            Rg = r.pop("Rg", None)   # P^-1 g in the eigenbasis (Preconditioner.rotate)
            if Rg is not None:       # one rotation back for the step and the feedback term
                if dX is not None:
                    F, q = _rotated_feedback(steps[t], dX, pre, watch)
                    fb = F * pre.D
                    Rg = Rg + (fb if not watch else self._watched(r, F, fb, q, mean))
                du = -pre.unrotate(Rg)
            else:
                Sg = r.pop("Sg", None)   # P^-1 g from the value's response (reuses_response)
                du = -Sg if Sg is not None else curv.open_loop(cst, r["g"], hp, step, pre)
                del Sg
                if dX is not None:
                    F, q = feedback_terms(steps[t], dX, watch)
                    fb = pre.inverse(F)
                    du = du - (fb if not watch else self._watched(r, F, fb, q, mean))
            del Rg
            Unew = U + du
            controls.append(Unew)
            # the stage is done: its step and the tensors only it read go (the moments in
            # ``state`` stay for the commit)
            steps[t] = None
            r["g"] = r["pre"] = r["U"] = None
            del U, pre
            if t < T - 1:
                xhat = st.forward(xhat, Unew)
        states = [None if frozen[t] else {} if isinstance(curv, Exact) else out[t]["state"]
                  for t in range(T)]
        return controls, states

    def _watched(self, r: dict, F, fb, q, mean):
        """The feedback term ``fb`` = :math:`P^{-1} F` (F in the same coordinates: the
        eigenbasis' rotations are orthogonal) as the curvature scales it for its
        closed-loop gain, the stage's new state ``r["state"]`` as it keeps it
        (:meth:`Curvature.closed_loop`, :mod:`nnbridge.feedback`)."""
        (fb,), (r["state"],) = watched(self.curvature, [F], [fb], q, mean, [r["state"]])
        return fb

    def __repr__(self) -> str:
        g = {k: v for k, v in self.param_groups[0].items() if k != "params"}
        return (f"{type(self).__name__}(curvature={self.curvature.name!r}, "
                f"value_hessian={self.value_hessian!r}, {g})")


def _rotated_feedback(step, dX: torch.Tensor, pre, curvature: bool):
    r"""``(Q_G^T F Q_A, q)``: the feedback term :math:`F = \mathbb{E}[Q_{ux} dX]` of a
    Linear stage in its eigenbasis (:meth:`Preconditioner.eigen_step_pays`; times D it
    is :math:`P^{-1} F` there), from its rotated inputs and cotangents where the step
    gives the cotangent, else by rotating F; and with ``curvature`` the samples' value
    curvature of the state change (:func:`feedback_terms`)."""
    if getattr(step, "feedback_cotangent", None) is None:
        F, q = feedback_terms(step, dX, curvature)
        QG, QA = pre.rot
        return QG.transpose(-1, -2) @ F @ QA, q
    terms = step.feedback_terms(dX, curvature)
    Xr = pre.rotated_inputs(step.stage.X)
    return step.stage.fu_T_mean_rotated(terms.cotangent, pre.rot[0], Xr), terms.curvature


def _with(step, **changes):
    """``step`` with ``changes`` to its :class:`~trajopt.riccati.OperatorStep` (the one a
    :class:`~trajopt.riccati.JointStep` wraps, for the joint form)."""
    if isinstance(step, JointStep):
        return dataclasses.replace(step, step=dataclasses.replace(step.step, **changes))
    return dataclasses.replace(step, **changes)


def _consumed(step, later):
    """``step`` (stage t) and ``later`` (stage t+1) once the backward pass is past stage t:
    the value :math:`V_{t+1}` they share keeps what the feedback pass reads (its factor,
    its Hessian), not its gradient nor its carried form (a (B, n) tensor or two)."""
    v = (step.step if isinstance(step, JointStep) else step).next_value
    if v is not later.value or not dataclasses.is_dataclass(v):
        return step, later
    lean = dataclasses.replace(v, **dict.fromkeys(
        {f.name for f in dataclasses.fields(v)} & {"Vx", "carried"}))
    return _with(step, next_value=lean), _with(later, value=lean)


def _released(step):
    """The backward step as the feedback pass keeps it: its :math:`Q_u` (a control-sized
    tensor per stage, summed into the stage's ``g``) released, the values kept."""
    return _with(step, Qu=None)


class EKFAC(DDPNOpt):
    """EKFAC (George et al. 2018) as a standalone optimizer: ``DDPNOpt`` with the EKFAC
    curvature and no feedback, the baseline of the DDPNOpt paper.  It takes any network
    :func:`nnbridge.graph_stages` decomposes (residual and branching ones too: one
    Kronecker pair per layer; :class:`nnbridge.GTEKFAC` couples the players of a stage).

    Parameters
    ----------
    model : nn.Sequential
    lr : float
    eps : float
        Damping added to the eigenvalue estimates.
    alpha : float
        Running-average factor of the Kronecker factors and the eigenvalue estimates.
    update_freq : int
        Eigenbases are recomputed every ``update_freq`` steps.
    weight_decay : float
    """

    def __init__(self, model: nn.Module, lr: float = 0.1, *, eps: float = 0.1,
                 alpha: float = 0.75, update_freq: int = 10, weight_decay: float = 0.0,
                 grad_scaler: torch.amp.GradScaler | None = None):
        super().__init__(model, lr, curvature="ekfac", feedback=False, eps=eps, alpha=alpha,
                         update_freq=update_freq, weight_decay=weight_decay,
                         grad_scaler=grad_scaler)

    def _decompose(self, net: nn.Module):
        """Every affine layer of the network (no feedback pass: no stage structure
        needed beyond each layer's input and pre-activation gradient)."""
        graph = graph_stages(net)
        return graph.pre, graph.players


def _largest_magnitude(tensors: list[torch.Tensor]) -> torch.Tensor:
    r""":math:`\max |x|` over the entries of all ``tensors`` (NaN where one is NaN).

    On the CPU one ``aminmax`` a tensor (NaN propagates through both ends), then one
    reduction: torch's infinity norm (``linalg.vector_norm(t, inf)``, which its foreach
    norm reaches there) is 17-23x slower and cost ~2.9 ms a step on the 6 x 256 MLP.  On
    a GPU torch's foreach norm (``get_total_norm``: one fused launch per dtype) is 3-4x
    faster than a launch per tensor (H200; docs/performance.md)."""
    tensors = [t for t in tensors if t.numel()]
    if not tensors:
        return torch.zeros(())
    where = tensors[0].device
    total_norm = getattr(torch.nn.utils, "get_total_norm", None)   # torch >= 2.6
    if where.type != "cpu" and total_norm is not None:
        return total_norm(tensors, math.inf)
    # a model spread over devices: gathered on the first
    ends = [e if e.device == where else e.to(where) for t in tensors for e in _ends(t)]
    return torch.stack(ends).abs().max()


def _ends(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.aminmax(t)``; ``amin`` and ``amax`` where it has no kernel for the dtype
    (float16 on the CPU before torch 2.6: a half-precision step raised there)."""
    try:
        return torch.aminmax(t)
    except RuntimeError:
        return t.amin(), t.amax()
