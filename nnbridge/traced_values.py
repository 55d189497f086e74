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

from .decompose import trace, traced_root

__all__ = ["TracedValues"]

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


class _Missing:
    pass


_MISSING = _Missing()
