r"""What the optimizers see of the training loop's forward and backward passes.

:class:`BatchRecorder` keeps hooks on the network for the optimizer's lifetime (as
kfac-pytorch does), so ``optimizer.step()`` works with and without a closure, in the loops
of HF Trainer, Accelerate and Lightning.  Every forward pass of the model *under grad
mode* opens a *chunk*: the stage inputs :math:`x_t`, the output :math:`x_T` and, once the
backward pass reaches them, the gradient of the loss at the output (and, when asked, at
each stage's pre-activation).  Forward passes under ``torch.no_grad()`` /
``inference_mode`` (evaluation) are not recorded.  The pre-activation gradients see the
gradient of the affine output *before* any in-place activation, so
``ReLU(inplace=True)`` is fine.

With ``input_grads=True`` a stage's input is handed to its module through an alias
(``x.view_as(x)``), so that the gradient recorded there is the one the stage's own
module sent back (its vector-Jacobian product, :math:`g_x^\top \nabla_h`), not the
total at :math:`x_t` that other consumers of the tensor add to; DDPNOpt's backward
pass reads :math:`f_x^\top K` off it (:meth:`nnbridge.stages.StageLinearization.
carried_pullback`).

At ``step()`` the chunks whose backward pass has run are the batch (gradient
accumulation: several forward/backward passes before one step are one batch, concatenated);
chunks still waiting for their backward pass are dropped.  A backward pass counts only
when it reached the parameters' ``.grad`` (what torch.optim's step sees): not a
gradient taken with ``torch.autograd.grad`` (an adversarial example's input gradient),
and not one whose ``.grad`` a later pass found reset to None (``model.zero_grad()``,
``p.grad = None``; an in-place ``zero_grad(set_to_none=False)`` on the model, not the
optimizer, cannot be seen).  ``zero_grad()`` drops the
chunks whose backward pass has run (they belong to the gradient it zeroes) and keeps those
waiting for it, so both ``zero_grad(); out = model(x); loss.backward()`` and
``out = model(x); zero_grad(); loss.backward()`` record the batch.  A backward pass that
raised is over at the next ``zero_grad()`` or forward pass.

Activation checkpointing: the non-reentrant variant records as a plain pass; the
reentrant one (torch's default) runs the checkpointed layers under ``no_grad`` and again
inside the backward pass, where :meth:`BatchRecorder._recompute` matches each
recomputed call to its recorded one by its input.
"""

from __future__ import annotations

import inspect
import weakref
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

import torch
from torch import nn

from trajopt.errors import UnsupportedModelError

from .stages import Stage, combine_calls
from .tracing import forward_defaults, other_call

__all__ = ["BatchRecorder", "Capture", "capture"]


@dataclass
class Capture:
    """What the recorded forward/backward passes saw (:meth:`BatchRecorder.batch`,
    :func:`capture`).

    Attributes
    ----------
    inputs : list of Tensor
        Nominal stage inputs :math:`x_t` (B, ...), detached (a layer called several
        times: its first call's).
    h_grads : list of Tensor or None
        Gradients of the loss with respect to each stage's pre-activation (a layer
        called several times: of all its calls, combined as
        :func:`nnbridge.stages.combine_calls` lays them out).
    output, output_grad : Tensor or None
        Network output :math:`x_T` and the loss gradient with respect to it.
    calls : list of list of Tensor
        Per layer, its inputs at each of its calls, in call order.
    model_input : Tensor or None
        The network's input.
    input_grads : list of Tensor or None
        Per stage, the gradient its module sent to its input (recorded with
        ``input_grads=True``, for a layer called once, in the dtype asked of
        :meth:`BatchRecorder.batch`: not under autocast), else None.
    passes : int
        How many forward/backward passes the record concatenates (gradient
        accumulation: more than one).
    """

    inputs: list = field(default_factory=list)
    h_grads: list = field(default_factory=list)
    output: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None
    calls: list = field(default_factory=list)
    model_input: torch.Tensor | None = None
    input_grads: list = field(default_factory=list)
    passes: int = 1

    def factor_gradient(self, t: int, stage) -> torch.Tensor:
        """``h_grads[t]``, for a curvature whose factors need every call's gradient
        (EKFAC): a layer one of whose calls got none (run under ``torch.no_grad()``, or
        cut from the loss) is refused by name."""
        hg = self.h_grads[t]
        if hg is None:
            raise UnsupportedModelError(
                f"stage {stage.index} ({type(stage.module).__name__}): one of its calls got "
                "no gradient (run under torch.no_grad() in forward, or cut from the loss); "
                "the EKFAC factors need every call's gradient: call the layer with "
                "gradients, or use a first-order curvature")
        return hg


@dataclass(eq=False)
class _Chunk:
    inputs: list        # per layer, the list of its calls' inputs
    h_grads: list       # per layer, per call, the pre-activation gradient or None
    in_grads: list      # per layer, per call, the gradient its module sent to its input
    model_input: torch.Tensor | None = None
    output: torch.Tensor | None = None
    output_grad: torch.Tensor | None = None
    #: its backward pass reached the parameters' ``.grad`` (None: not finished)
    accumulated: bool | None = None
    #: the gradients of the backward pass running now, by key (None: not staging), kept
    #: apart until the pass ends: a pass that does not count adds nothing
    pending: dict | None = None
    #: per layer, its calls under ``torch.no_grad()`` in this forward pass (reentrant
    #: activation checkpointing runs them again in the backward pass)
    no_grad: dict = field(default_factory=dict)
    #: an optional argument of ``forward`` this call passed other than its default
    #: (``"return_features=True"``; the stages were traced with the defaults), or None
    other: str | None = None

    @classmethod
    def open(cls, n: int, x) -> _Chunk:
        return cls([[] for _ in range(n)], [[] for _ in range(n)], [[] for _ in range(n)],
                   x.detach() if torch.is_tensor(x) else None)

    @property
    def complete(self) -> bool:
        return self.output_grad is not None

    def add_grad(self, key, g: torch.Tensor) -> None:
        """Store a gradient (summed when a retained graph is run backward twice; staged
        in :attr:`pending` while the recorder decides whether the pass counts)."""
        g = g.detach()
        if self.pending is not None:
            old = self.pending.get(key)
            self.pending[key] = g if old is None else old + g
            return
        self._store(key, g)

    def commit(self, replace: bool) -> None:
        """Move the staged gradients into the record: added to what earlier passes of
        this forward pass stored, or (``replace``) instead of it, where the user reset
        ``.grad`` after them."""
        staged, self.pending = self.pending or {}, None
        if replace:
            self.output_grad = None
            self.h_grads = [[None] * len(x) for x in self.h_grads]
            self.in_grads = [[None] * len(x) for x in self.in_grads]
        for key, g in staged.items():
            self._store(key, g)

    def _store(self, key, g: torch.Tensor) -> None:
        if key == "out":
            self.output_grad = g if self.output_grad is None else self.output_grad + g
            return
        kind, i, c = key
        store = self.h_grads if kind == "h" else self.in_grads
        old = store[i][c]
        store[i][c] = g if old is None else old + g


def _recorded_in(parts: list, dtype: torch.dtype | None) -> bool:
    """Every part was recorded in ``dtype`` (not in an autocast region's lower one: an
    input gradient of bfloat16 products is no stand-in for the float32 pull-back the
    optimizer's own pass computes)."""
    return all(p is not None and (dtype is None or p.dtype == dtype) for p in parts)


def _cat(parts: list, dtype: torch.dtype | None, scale: torch.Tensor | None = None):
    if any(p is None for p in parts):
        return None
    out = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
    out = out if dtype is None or not out.is_floating_point() else out.to(dtype)
    return out if scale is None else out * scale.to(out.device)


class BatchRecorder:
    """Persistent hooks on ``model`` and its stages (module docstring).

    Parameters
    ----------
    model : nn.Module
        The network whose forward pass opens a chunk (not a DDP wrapper: the module it
        wraps).
    stage_list : list of Stage
    input_grads : bool
        Also record the gradient each stage's module sends to its input (module
        docstring).
    """

    def __init__(self, model: nn.Module, stage_list: list[Stage], *,
                 input_grads: bool = False):
        self.n = len(stage_list)
        self.input_grads = bool(input_grads)
        self._chunks: list[_Chunk] = []
        self._open: _Chunk | None = None
        # the backward pass running now: the chunks whose output gradient it brought,
        # whether it reached a parameter's .grad, whether it found a .grad reset to None
        # that an earlier pass had written (model.zero_grad(), p.grad = None)
        self._backward: list[_Chunk] | None = None
        self._task = -1                   # its autograd graph task
        # layers recomputed in it (reentrant checkpointing): the call whose output the
        # forward hook is to watch, and whether a nested pass belongs to the running one
        self._recomputed: dict[int, tuple] = {}
        self._nested = False
        self._matched: set[tuple] = set()    # (chunk, layer, call) recomputed in it
        self._unmatched: set[int] = set()    # recomputed from an input never recorded
        self._names = [type(st.module).__name__ for st in stage_list]
        self._reached = self._reset = False
        # per parameter, the .grad tensor a recorded pass last wrote (weakly)
        self._written: dict[int, weakref.ref] = {}
        # forward's optional arguments, bound to their defaults in the traced graph, and
        # why the last forward pass under grad mode was not recorded (for the step's
        # error: it returned a tuple, ...)
        self._defaults = forward_defaults(model)
        self._signature = inspect.signature(model.forward) if self._defaults else None
        self._unrecorded: str | None = None
        ref = weakref.ref(self)
        handles = [model.register_forward_pre_hook(_begin(ref), with_kwargs=True),
                   model.register_forward_hook(_end(ref))]
        for i, st in enumerate(stage_list):
            handles.append(st.module.register_forward_pre_hook(_stage_input(ref, i)))
            handles.append(st.module.register_forward_hook(_stage_output(ref, i)))
        self._handles = handles
        self._model = weakref.ref(model)
        self._hooked: set[int] = set()    # parameters with a _param_grad hook
        # the hooks hold only a weak reference: they go when the recorder does
        self._finalizer = weakref.finalize(self, _remove, handles)

    def remove(self) -> None:
        """Remove the hooks (the recorder records nothing afterwards)."""
        self._finalizer()
        self._chunks.clear()

    def clear(self, *, keep_pending: bool = False) -> None:
        """Drop the recorded chunks (``keep_pending``: keep those awaiting a backward)."""
        self._end_failed_pass()
        self._chunks = [c for c in self._chunks if keep_pending and not c.complete]
        self._written.clear()
        self._unmatched.clear()
        self._unrecorded = None

    def why_not_recorded(self) -> str:
        """Why the forward passes since the last step left no record, for the step's
        error ("" when nothing is known)."""
        return "" if self._unrecorded is None else f"; {self._unrecorded}"

    def batch(self, dtype: torch.dtype | None = None,
              inverse_scale: torch.Tensor | None = None) -> Capture | None:
        """The completed chunks concatenated along the batch (cast to ``dtype``, e.g. the
        parameters' dtype after an autocast forward), or None when none completed.
        ``h_grads`` entries are None where a chunk lacks them.  ``inverse_scale``
        multiplies the gradients (a ``GradScaler``'s :math:`1/S`, :mod:`nnbridge.amp`)."""
        if self._unmatched:
            i = min(self._unmatched)
            self.clear()
            raise UnsupportedModelError(
                f"stage {i} ({self._names[i]}) was recomputed in the backward pass "
                "(activation checkpointing, use_reentrant=True) from an input other than "
                "the one its forward pass recorded: the recomputation is not "
                "deterministic (preserve_rng_state=False with dropout?); keep "
                "preserve_rng_state=True, or pass use_reentrant=False")
        done = [c for c in self._chunks if c.complete and c.accumulated and all(c.inputs)]
        other = next((c.other for c in done if c.other is not None), None)
        if other is not None:
            self.clear()
            raise UnsupportedModelError(
                f"the model was called with {other}: the stages were traced with the "
                f"defaults of forward's optional arguments {self._defaults} (the call "
                "model(x)), so they are not the network of that call; call model(x) in "
                "the passes the optimizer records, or wrap the model in a module whose "
                "forward(x) passes the argument")
        if not done:
            return None
        counts = {tuple(len(x) for x in c.inputs) for c in done}
        if len(counts) > 1:
            raise RuntimeError(
                "the recorded forward passes called the layers different numbers of times "
                f"({sorted(counts)}): one batch must run the same network")
        calls = [[_cat([ch.inputs[i][c] for ch in done], dtype)
                  for c in range(len(done[0].inputs[i]))] for i in range(self.n)]
        grads = [[_cat([ch.h_grads[i][c] for ch in done], dtype, inverse_scale)
                  for c in range(len(done[0].inputs[i]))] for i in range(self.n)]
        in_grads = [_cat([ch.in_grads[i][0] for ch in done], dtype, inverse_scale)
                    if len(done[0].inputs[i]) == 1 and _recorded_in(
                        [ch.in_grads[i][0] for ch in done], dtype) else None
                    for i in range(self.n)]
        return Capture(
            inputs=[x[0] for x in calls],
            h_grads=[g[0] if len(g) == 1 else None if any(h is None for h in g)
                     else combine_calls(g) for g in grads],
            output=_cat([c.output for c in done], dtype),
            output_grad=_cat([c.output_grad for c in done], dtype, inverse_scale),
            calls=calls, model_input=_cat([c.model_input for c in done], dtype),
            input_grads=in_grads, passes=len(done))

    # the hooks' side ----------------------------------------------------------
    def _recompute(self, i: int, x) -> tuple | None:
        """Layer ``i`` runs with gradients inside a backward pass, where no chunk is open:
        activation checkpointing recomputing it.  Where the recorded call ran under
        ``no_grad`` (the reentrant variant, ``use_reentrant=True``: torch's default when
        it is not given), its gradient goes through the recomputed graph only, in a
        backward pass nested in the running one: the recomputed call is matched to a
        recorded one of a chunk whose backward pass is running (newest first; not a
        stale forward pass of the same batch) by its input, bit for bit, and not matched
        twice in one pass (a retained graph run backward again matches again); its
        output is watched for that call (:func:`_stage_output`), and the nested pass
        counts as part of the running one (:meth:`_grad`).  An input matching no
        recorded call (a recomputation that is not deterministic) is refused by
        :meth:`batch`.  The non-reentrant variant records its calls under grad mode and
        its gradients through them: nothing to do.  Returns the chunk and the call, or
        None."""
        pending = [(c, k) for c in reversed(self._backward or []) for k in c.no_grad.get(i, ())
                   if (id(c), i, k) not in self._matched]
        for c, k in pending:
            seen = c.inputs[i][k]
            if torch.is_tensor(x) and seen.shape == x.shape and torch.equal(seen, x):
                self._matched.add((id(c), i, k))
                self._recomputed[i] = (c, k)
                self._nested = True
                return c, k
        if pending:
            self._unmatched.add(i)
        return None

    def _watch(self, chunk: _Chunk, key, out: torch.Tensor) -> None:
        if out.requires_grad:
            out.register_hook(_grad_hook(weakref.ref(self), chunk, key))

    def _hook_parameters(self, ref) -> None:
        """A :func:`_param_grad` hook on every parameter that requires a gradient and has
        none yet (a frozen one cannot take a hook; unfrozen later, it gets one here)."""
        model = self._model()
        for p in () if model is None else model.parameters():
            if p.requires_grad and id(p) not in self._hooked:
                self._handles.append(p.register_post_accumulate_grad_hook(
                    _param_grad(ref)))
                self._hooked.add(id(p))

    def _grad(self, chunk: _Chunk, key, g: torch.Tensor) -> None:
        """A gradient of a chunk's tensors: its backward pass is running; which pass
        counts is decided when that pass ends (:meth:`_backward_ended`), the gradients
        staged until then."""
        task = torch._C._current_graph_task_id()
        if self._backward is not None and task != self._task and not self._nested:
            # a pass that ended in an error never ran its callback: it counts as it stood
            self._backward_ended()
        if self._backward is None:
            self._backward, self._reached, self._reset = [], False, False
            self._task = task
            torch.autograd.Variable._execution_engine.queue_callback(self._backward_ended)
        if chunk.pending is None:
            chunk.pending = {}
            self._backward.append(chunk)
        chunk.add_grad(key, g)

    def _end_failed_pass(self) -> None:
        """Outside any backward pass, one that still seems to run ended in an error and
        never ran its callback: it counts as it stood (as :meth:`_grad` decides when the
        next pass's gradients arrive; called by a new forward pass and by
        :meth:`clear`, so that ``zero_grad()`` drops it, and so that a nested
        recomputation's mark does not outlive it)."""
        if self._backward is not None and torch._C._current_graph_task_id() == -1:
            self._backward_ended()

    def _backward_ended(self) -> None:
        """A pass counts when it reached the parameters' ``.grad`` (not a gradient the
        user took with ``torch.autograd.grad``, an adversarial example's); one that found
        a ``.grad`` an earlier pass had written reset to None (``model.zero_grad()``)
        discards the earlier passes, as it discarded their gradients."""
        ran, self._backward = self._backward or [], None
        self._nested = False
        self._recomputed.clear()
        self._matched.clear()
        if self._reset:   # their gradients were discarded with .grad: so are their records
            # (dropped, not kept unused: an optimizer kept alive beside the one that steps
            # -- by an old scheduler -- held every pass of the loop, 34 MiB in 30 steps)
            self._chunks = [c for c in self._chunks if c in ran or not c.complete]
        for c in ran:
            if c not in self._chunks:   # a retained graph run backward again after that
                self._chunks.append(c)
            if self._reached:
                c.commit(replace=self._reset)
                c.accumulated = True
            else:   # its gradients stay out of the record
                c.pending = None
                c.accumulated = bool(c.accumulated) and c.complete


def _remove(handles) -> None:
    for h in handles:
        h.remove()


def _begin(ref):
    def hook(mod, args, kwargs):
        rec = ref()
        if rec is not None and torch.is_grad_enabled():
            rec._end_failed_pass()
        if rec is not None:
            rec._open = (_Chunk.open(rec.n, args[0] if args else None)
                         if torch.is_grad_enabled() else None)
            if rec._open is not None:
                rec._open.other = other_call(rec._signature, rec._defaults, args, kwargs)
                rec._hook_parameters(ref)
    return hook


def _end(ref):
    def hook(mod, args, out):
        rec = ref()
        if rec is None or rec._open is None:
            return
        chunk, rec._open = rec._open, None
        if not torch.is_tensor(out):   # the step says so if nothing else is recorded
            rec._unrecorded = (f"the model's forward returned a {type(out).__name__}, not "
                               "a tensor" + (f" (called with {chunk.other})" if chunk.other
                                             else ""))
        if torch.is_tensor(out) and out.requires_grad:
            chunk.output = out.detach()
            rec._watch(chunk, "out", out)
            rec._chunks.append(chunk)
    return hook


def _grad_hook(ref, chunk: _Chunk, key):
    def hook(g):
        rec = ref()
        if rec is not None:
            rec._grad(chunk, key, g)
        else:
            chunk.add_grad(key, g)
        return None
    return hook


def _param_grad(ref):
    """A parameter's ``.grad`` written (a post-accumulate hook: not for a gradient taken
    with ``torch.autograd.grad``, even of the parameters): the running pass reaches
    ``.grad``; a ``.grad`` tensor other than the one a recorded pass last wrote was reset
    to None in between by the user (accumulation writes into the same tensor)."""
    def hook(p):
        rec = ref()
        if rec is not None and rec._backward is not None:
            rec._reached = True
            last = rec._written.get(id(p))
            if last is not None and last() is not p.grad:
                rec._reset = True
            rec._written[id(p)] = weakref.ref(p.grad)
    return hook


def _stage_input(ref, i):
    def hook(mod, args):
        rec = ref()
        if rec is None:
            return None
        x = args[0]
        if rec._open is not None:
            chunk, call = rec._open, len(rec._open.inputs[i])
            if not torch.is_grad_enabled():
                chunk.no_grad.setdefault(i, []).append(call)
            chunk.inputs[i].append(x.detach())
            chunk.h_grads[i].append(None)
            chunk.in_grads[i].append(None)
        elif torch.is_grad_enabled() and torch._C._current_graph_task_id() != -1:
            chunk, call = rec._recompute(i, x) or (None, None)
        else:
            chunk = None
        if chunk is not None and rec.input_grads and torch.is_tensor(x) and x.requires_grad:
            # the module sees an alias: its gradient is this module's alone
            alias = x.view_as(x)
            rec._watch(chunk, ("in", i, call), alias)
            return (alias, *args[1:])
        return None
    return hook


def _stage_output(ref, i):
    def hook(mod, args, out):
        rec = ref()
        if rec is not None and rec._open is not None:
            rec._watch(rec._open, ("h", i, len(rec._open.inputs[i]) - 1), out)
        elif rec is not None and i in rec._recomputed:
            chunk, call = rec._recomputed.pop(i)
            rec._watch(chunk, ("h", i, call), out)
    return hook


@contextmanager
def capture(model: nn.Module, stage_list: list[Stage], *,
            h_grads: bool = False, dtype: torch.dtype | None = None) -> Iterator[Capture]:
    """Record the forward/backward passes run inside the block (a :class:`BatchRecorder`
    for its duration; its hooks are removed on exit): the yielded :class:`Capture` is
    filled when the block ends (``h_grads=False`` leaves its ``h_grads`` None; ``dtype``
    as for :meth:`BatchRecorder.batch`)."""
    n = len(stage_list)
    rec = Capture(inputs=[None] * n, h_grads=[None] * n)
    recorder = BatchRecorder(model, stage_list)
    try:
        yield rec
    finally:
        got = recorder.batch(dtype)
        recorder.remove()
        if got is not None:
            rec.inputs, rec.output, rec.output_grad = got.inputs, got.output, got.output_grad
            rec.calls, rec.model_input = got.calls, got.model_input
            if h_grads:
                rec.h_grads = got.h_grads
