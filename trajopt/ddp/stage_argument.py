r"""Whether a model's Python function reads its stage argument ``t``.

A model that ignores ``t`` is time invariant: its values and derivatives at all ``T * B``
points of a trajectory come from one batched call, where a time-varying one is
differentiated under ``vmap`` with each point's own stage (``docs/ddp.md``, "Time
invariance").  Users write ``f(x, u, t)`` out of habit, so :class:`~trajopt.Dynamics` and
:class:`~trajopt.Cost` find out themselves, by the function's bytecode: a parameter whose
name no instruction ever loads, deletes or hands to a nested scope cannot change the
result.

The test is conservative.  Anything it cannot see through answers "reads ``t``" (the
time-varying path, correct for every function): a callable that is not a plain Python
function, method or object with a Python ``__call__`` (a ``functools.partial``, a C
function), a stage inside ``*args`` (an ``nn.Module``'s ``__call__`` is read through its
class's ``forward``, unless the module has forward hooks, which see ``t``), a parameter
captured by a nested function, comprehension or lambda, and a body that names a way to
read its own frame (``locals``, ``vars``, ``eval``, ``exec``, ``sys._getframe``,
``inspect.currentframe``, ...).  What it does not guard against is a
*callee* that reads its caller's frame (``sys._getframe(1).f_locals["t"]``): no model
does that, and ``time_invariant=False`` forces the time-varying path.
"""

from __future__ import annotations

import dis
import types
from collections.abc import Callable

__all__ = ["ignores_argument", "model_ignores_stage"]

#: names (globals, attributes) through which a body may read its own locals by name
_FRAME_ACCESS = frozenset({"locals", "vars", "eval", "exec", "f_locals", "_getframe",
                           "currentframe"})

#: opcodes that name a local or a cell variable (LOAD_FAST, LOAD_FAST_LOAD_FAST in 3.13,
#: DELETE_FAST, LOAD_DEREF, LOAD_CLOSURE, MAKE_CELL, ...)
_NAMES_A_LOCAL = frozenset(dis.haslocal) | frozenset(dis.hasfree)


def ignores_argument(fn: Callable, index: int) -> bool:
    """True only where ``fn``'s bytecode provably never reads its positional argument
    ``index`` (0-based; a bound method's ``self`` not counted); False wherever that cannot
    be shown (see the module docstring).

    Examples
    --------
    >>> ignores_argument(lambda x, u, t: x + u, 2)
    True
    >>> ignores_argument(lambda x, u, t: x + t * u, 2)
    False
    """
    if not isinstance(fn, (types.FunctionType, types.MethodType)):
        # a callable object: its class's __call__ (an nn.Module's takes *args: its class's
        # forward, which module(x, u, t) calls with the same arguments, where no hook can
        # see them)
        call = _module_forward(fn) or getattr(type(fn), "__call__", None)  # noqa: B004
        if not isinstance(call, types.FunctionType):
            return False
        fn, index = call, index + 1
    elif isinstance(fn, types.MethodType):
        fn, index = fn.__func__, index + 1
    code = fn.__code__
    if index >= code.co_argcount:   # inside *args, or no such argument
        return False
    name = code.co_varnames[index]
    if name in code.co_cellvars or _FRAME_ACCESS.intersection(code.co_names):
        return False
    for ins in dis.get_instructions(code):
        if ins.opcode in _NAMES_A_LOCAL and name in _names(ins):
            return False
    return True


def _module_forward(fn: object) -> types.FunctionType | None:
    """The class's ``forward`` of an ``nn.Module`` without forward hooks (of its own or
    global: a hook is handed the arguments, ``t`` too), else None."""
    import torch.nn.modules.module as tm
    if not isinstance(fn, tm.Module) or any(getattr(fn, h, None) or getattr(
            tm, "_global" + h, None) for h in ("_forward_hooks", "_forward_pre_hooks")):
        return None
    forward = getattr(type(fn), "forward", None)
    return forward if isinstance(forward, types.FunctionType) else None


def model_ignores_stage(model: object, fn: Callable | None, base: type, method: str,
                        also: tuple[str, ...]) -> bool:
    """Whether ``model`` provably ignores its stage: nothing that could use ``t`` is
    left unread -- the wrapped function ``fn`` (where given) and ``model``'s own
    ``method`` (where its class overrides the base's, which only calls ``fn``) never
    read their ``t``, and the class overrides none of ``also`` (which could use ``t``
    another way).  False where there is nothing to read (no ``fn``, no override)."""
    cls = type(model)
    if any(getattr(cls, name) is not getattr(base, name) for name in also) or \
            method in getattr(model, "__dict__", {}):   # set on the instance: not read
        return False
    own = getattr(cls, method) is not getattr(base, method)
    if own and not ignores_argument(getattr(model, method), 2):
        return False
    return ignores_argument(fn, 2) if fn is not None else own


def _names(ins: dis.Instruction) -> tuple[str, ...]:
    """The variable names an instruction of :data:`_NAMES_A_LOCAL` refers to: one, or two
    for the paired instructions of Python 3.13 (``LOAD_FAST_LOAD_FAST``), read from both
    ``argval`` and the printed argument so that either form is seen."""
    val = ins.argval
    names = tuple(val) if isinstance(val, tuple) else (val,)
    return names + tuple(s.strip() for s in str(ins.argrepr).split(","))
