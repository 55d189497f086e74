"""The Python values a model's torch.fx trace may have baked into the stages.

``torch.fx`` records what ``forward`` reads from Python as it traces: a float attribute
(``h / self.temperature``) becomes the constant it had, a plain tensor attribute (not a
registered buffer) the tensor object it was, a buffer the object registered then. The
stages are built from that trace once, when the optimizer is built; the training loop's
forward pass reads the current values. An annealed temperature changed after the first
step therefore left the optimizer's passes on the old dynamics, silently: DDPNOpt(adam)
1.2e-2 off after one step (its largest update entry 3.5e-3), GT-DDP 3.0e-3 off (a user
trial, session 30; the optimizers' check of the decomposition runs at the first step).

:class:`TracedValues` keeps the modules' plain Python attributes (numbers, strings,
tuples of them; ``training`` aside) and the tensors the graph holds (by identity). A step
that finds a tensor replaced is refused by name; where a plain value changed, the model
is traced again: an unchanged graph (the attribute is not read by ``forward``, or is
read by a module that runs itself, as ``Dropout.p``) takes the new values as the
reference, a changed graph is refused by name. ~35 us a step for 45 modules.
"""

from __future__ import annotations

import numbers
from typing import Any

import torch
from torch import nn

from trajopt.errors import UnsupportedModelError

from .batchnorm import batch_coupled
from .decompose import trace, traced_root
from .stages import normalizes_by_batch_in

__all__ = ["TracedValues", "StageReplay", "accumulated_batch_statistics", "mismatches"]

_PLAIN = (numbers.Number, str, bytes, type(None))


def _plain(v: Any) -> bool:
    return isinstance(v, _PLAIN) or (isinstance(v, tuple) and all(_plain(x) for x in v))


def _same(a: Any, b: Any) -> bool:
    return a is b or (type(a) is type(b) and a == b)


class TracedValues:
    """What ``forward`` may read from Python, as it was when the stages were traced.

    Parameters
    ----------
    model : nn.Module
        The model as decomposed (the stages were traced from it now).
    """

    def __init__(self, model: nn.Module):
        model = traced_root(model)   # as the decompositions trace it
        self._modules = list(model.named_modules())
        self._model = model
        self._values = self._read()
        gm = trace(model)
        self._code = gm.code
        held = set()
        for node in gm.graph.nodes:
            if node.op == "get_attr":
                obj: Any = gm
                for part in node.target.split("."):
                    obj = getattr(obj, part)
                if torch.is_tensor(obj) and not isinstance(obj, nn.Parameter):
                    held.add(id(obj))
        # the tensors the graph holds (buffers and plain tensor attributes it reads), by
        # identity: a new object in their place is not seen by the stages
        self._tensors = [(name, m, k, v) for name, m in self._modules
                         for k, v in list(vars(m).items()) + list(m._buffers.items())
                         if torch.is_tensor(v) and id(v) in held]

    def _read(self) -> list[tuple[dict, str, Any]]:
        """``(module.__dict__, name, value)`` of every plain attribute (an attribute made
        after the trace cannot be in it)."""
        return [(vars(m), k, v) for _, m in self._modules for k, v in vars(m).items()
                if k != "training" and _plain(v)]

    def check(self) -> None:
        """Raise :class:`~trajopt.errors.UnsupportedModelError` where a tensor the stages
        hold was replaced, or a Python value changed since the trace and the model's graph
        traced now differs from the stages'."""
        replaced = [(name, k) for name, m, k, v in self._tensors
                    if m._buffers.get(k, vars(m).get(k)) is not v]
        changed = [(d, k, v) for d, k, v in self._values
                   if not _same(d.get(k, _MISSING), v)]
        if not (replaced or changed):
            return
        if replaced or trace(self._model).code != self._code:
            names = {id(vars(m)): name for name, m in self._modules}
            where = ", ".join(f"{n + '.' if n else ''}{k}" for n, k in (
                replaced or [(names[id(d)], k) for d, k, _ in changed])[:4])
            raise UnsupportedModelError(
                f"model: {where} changed after the optimizer traced the model, and the "
                "stages still hold what the trace saw (torch.fx keeps a Python number "
                "read in forward as a constant of the graph, and a tensor as the object it "
                "was). Keep a value that changes during training in a registered buffer "
                "updated in place (self.register_buffer('temperature', torch.tensor(1.0)); "
                "model.temperature.fill_(0.5)), or build the optimizer again after the "
                "change (new_opt.load_state_dict(opt.state_dict()) keeps its state)")
        self._values = self._read()


_MISSING = object()


class StageReplay:
    """Each step: the stages, applied to the inputs the training loop's forward pass fed
    them, give what that pass fed the next stage (the output, for the last stage).

    :class:`TracedValues` sees the modules' own attributes; a number ``forward`` reads
    through another object (``self.cfg.T`` of a namespace, a dict or list entry, a
    global) is baked into the trace as well, and changing it afterwards left the stages
    on the old dynamics (a review's finding, session 30). The replay sees any such
    change by its effect. At the first step every stage is replayed on the whole batch
    (the decomposition's check); afterwards on the first sample only, for the stages
    whose first-sample replay agreed then (a stage that mixes the samples -- batch
    statistics, a function of the batch -- is replayed on the whole batch at the first
    step only): 0.4-0.6 ms a step on a 6 x 256 ReLU MLP at batch 128 (6 stages; ~2-2.5 %
    of its DDPNOpt(adam) step, session 31's VM). The tolerance is the
    decomposition check's, ``1e-2 (1 + max |x|)``: a recorded pass under autocast differs
    from the stages' float32 by its rounding; a drifting value is refused once its
    effect reaches that.
    """

    def __init__(self, stages) -> None:
        self._stages = stages
        self._one: list[bool] | None = None   # per stage: replayed on one sample

    def check(self, inputs: list[torch.Tensor], output: torch.Tensor,
              passes: int = 1) -> None:
        """Raise :class:`~trajopt.errors.UnsupportedModelError` naming the first stage
        whose replay differs (``inputs``: the recorded inputs of the stages, concatenated
        over ``passes`` forward passes)."""
        wants = list(inputs[1:]) + [output]
        # BatchNorm in training mode on the batch's statistics, running ones left alone
        with torch.no_grad(), batch_coupled([m for st in self._stages
                                             for m in (st.module, *st.post)]):
            if self._one is None:
                for t, (st, x, want) in enumerate(zip(self._stages, inputs, wants)):
                    _compare(t, st, st.forward(x), want, first=True, passes=passes)
                self._one = [_one_sample_agrees(st, x, want)
                             for st, x, want in zip(self._stages, inputs, wants)]
                return
            # a BatchNorm put in training mode since (a frozen one unfrozen) is no
            # longer replayed on one sample (BatchNorm1d would not even run)
            pairs = [(t, st.forward(x[:1]), want[:1]) for t, (st, x, want) in
                     enumerate(zip(self._stages, inputs, wants)) if self._one[t]
                     and not normalizes_by_batch_in([st.module, *st.post])]
            bad = mismatches([(got, want) for _, got, want in pairs])
            if any(bad):
                t, got, want = pairs[bad.index(True)]
                _compare(t, self._stages[t], got, want, first=False, passes=passes)


def accumulated_batch_statistics(what: str, passes: int) -> UnsupportedModelError:
    """The error for a stage normalizing by the batch in a step recorded in several
    passes (``what``: the mismatch found)."""
    return UnsupportedModelError(
        f"{what}: the step's batch was recorded in {passes} forward passes (gradient "
        "accumulation) and this stage normalizes by the batch (BatchNorm in training "
        "mode): each pass normalized its own micro-batch, which the optimizer's passes "
        "over the whole batch cannot reproduce. Run one forward/backward pass per step, "
        "or use GroupNorm / LayerNorm (or BatchNorm in eval mode)")


def _one_sample_agrees(st, x: torch.Tensor, want: torch.Tensor) -> bool:
    """The stage replayed on the first sample gives the first sample's output (not
    asked where a BatchNorm normalizes by the batch: one sample may not even run)."""
    if x.shape[0] < 2 or normalizes_by_batch_in([st.module, *st.post]):
        return False
    return _agrees(st.forward(x[:1]), want[:1])


def mismatches(pairs) -> list[bool]:
    """Per ``(got, want)`` pair: the shapes differ, or ``got`` is off ``want`` by more
    than the decomposition check's tolerance ``1e-2 (1 + max |want|)`` (a recorded pass
    under autocast differs by its rounding); one host sync for all pairs.  Shared by
    :class:`StageReplay` and GT-DDP's per-step check of its stage graph."""
    same = [a.shape == b.shape and a.numel() > 0 for a, b in pairs]
    off = [((a - b).abs().amax() - 1e-2 * (1.0 + b.abs().amax())).float()
           for (a, b), s in zip(pairs, same) if s]
    far = iter((torch.stack(off) > 0).tolist() if off else [])
    return [next(far) if s else a.shape != b.shape for (a, b), s in zip(pairs, same)]


def _agrees(got: torch.Tensor, want: torch.Tensor) -> bool:
    return not mismatches([(got, want)])[0]


def _compare(t: int, st, got: torch.Tensor, want: torch.Tensor, first: bool,
             passes: int) -> None:
    if _agrees(got, want):
        return
    what = (f"model: stage {t} ({type(st.module).__name__}) applied to the input it "
            f"recorded does not give what the forward pass fed the next stage (shapes "
            f"{tuple(got.shape)} and {tuple(want.shape)})")
    if passes > 1 and normalizes_by_batch_in([st.module, *st.post]):
        raise accumulated_batch_statistics(what, passes)
    if first:
        raise UnsupportedModelError(
            f"{what}: the forward pass does something its torch.fx graph does not show (a "
            "branch on self.training or a Python value, a module whose forward was changed "
            "after the optimizer was built)")
    raise UnsupportedModelError(
        f"{what} any more: something forward reads changed after the optimizer traced the "
        "model (torch.fx keeps a number read through another object -- self.cfg.T, a "
        "dict or list entry, a global -- as a constant of the graph). Keep a value that "
        "changes during training in a registered buffer updated in place "
        "(self.register_buffer('temperature', torch.tensor(1.0)); "
        "model.temperature.fill_(0.5)), or build the optimizer again after the change "
        "(new_opt.load_state_dict(opt.state_dict()) keeps its state)")
