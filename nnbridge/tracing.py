"""What :mod:`nnbridge.decompose` needs to know about a traced ``forward``: the
operations that draw random numbers (refused between stages: the optimizers re-run the
stages on the recorded batch) and the optional arguments bound to their defaults when
tracing (``concrete_args``), so that the graph is the call ``model(x)``."""

from __future__ import annotations

import inspect

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)
from torch import fx, nn

__all__ = ["DROPOUT_FUNCTIONS", "is_random", "random_node_names", "forward_defaults",
           "drop_concrete", "other_call"]

#: dropout functions (torch.fx fixes their ``training`` flag) -> the module to use instead
DROPOUT_FUNCTIONS = {
    F.dropout: "Dropout", F.dropout1d: "Dropout1d", F.dropout2d: "Dropout2d",
    F.dropout3d: "Dropout3d", F.alpha_dropout: "AlphaDropout",
    F.feature_alpha_dropout: "FeatureAlphaDropout", torch.dropout: "Dropout",
    torch.alpha_dropout: "AlphaDropout", torch.feature_dropout: "Dropout2d",
    torch.feature_alpha_dropout: "FeatureAlphaDropout"}
#: functions and tensor methods that draw random numbers whatever the module's mode
_RANDOM_FUNCTIONS = frozenset((
    torch.randn_like, torch.rand_like, torch.randint_like, torch.randn, torch.rand,
    torch.randint, torch.randperm, torch.bernoulli, torch.normal, torch.poisson,
    torch.multinomial, F.gumbel_softmax))
_RANDOM_METHODS = frozenset((
    "bernoulli", "bernoulli_", "normal_", "uniform_", "random_", "exponential_",
    "geometric_", "cauchy_", "log_normal_", "multinomial"))


def is_random(node: fx.Node) -> bool:
    """``node`` draws random numbers: a random function or tensor method, or RReLU's
    function traced with ``training=True``."""
    if node.op == "call_method":
        return node.target in _RANDOM_METHODS
    if node.op != "call_function":
        return False
    if node.target in (F.rrelu, F.rrelu_):
        return bool(node.args[3] if len(node.args) > 3 else node.kwargs.get("training"))
    return node.target in _RANDOM_FUNCTIONS


def random_node_names(nodes) -> list[str]:
    """The nodes among ``nodes`` that draw random numbers (:func:`is_random`), as errors
    name them: ``node 'randn_like' (call_function randn_like)``."""
    return [f"node {n.name!r} ({n.op} {getattr(n.target, '__name__', n.target)})"
            for n in nodes if is_random(n)]


def forward_defaults(model: nn.Module) -> dict:
    """The parameters of ``model.forward`` after its first that have defaults (``return_
    features=False``, ``mask=None``), with them: :func:`trace` binds them (torch.fx's
    ``concrete_args``), so the traced graph is the call ``model(x)``."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):  # a builtin forward: nothing to bind
        return {}
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    return {q.name: q.default for q in params[1:]
            if q.kind in kinds and q.default is not inspect.Parameter.empty}


def drop_concrete(graph: fx.Graph, names) -> None:
    """Remove the placeholders torch.fx keeps for the ``concrete_args`` ``names`` and the
    checks it hangs on them (``_assert(x == value)``, ``_assert_is_none``): the graph's one
    input is the first argument."""
    places = [n for n in graph.nodes if n.op == "placeholder"][1:]
    doomed: list[fx.Node] = []
    for ph in places:
        if not any(ph.target == k or ph.target.startswith(f"{k}_") for k in names):
            continue
        todo, seen = [ph], []
        while todo:
            n = todo.pop()
            if n not in seen:
                seen.append(n)
                todo.extend(n.users)
        if any(n.op == "output" for n in seen):
            continue   # returned as is: leave it to the checks of one output
        doomed.extend(seen)
    order = {n: i for i, n in enumerate(graph.nodes)}
    for n in sorted(set(doomed), key=order.__getitem__, reverse=True):
        graph.erase_node(n)


def other_call(signature: inspect.Signature | None, defaults: dict, args: tuple,
               kwargs: dict) -> str | None:
    """The first optional argument of a call of ``forward`` (``args``, ``kwargs``) that
    differs from its default in ``defaults`` (:func:`forward_defaults`: the traced
    graph's), as ``"name=value"``, or None."""
    if signature is None or (len(args) < 2 and not kwargs):
        return None
    try:
        bound = signature.bind(*args, **kwargs).arguments
    except TypeError:
        return None   # forward itself raises
    for name, value in bound.items():
        default = defaults.get(name, value)
        if not (value is default or (type(value) is type(default) and isinstance(
                default, (bool, int, float, str)) and value == default)):
            shown = f"<{type(value).__name__}>" if torch.is_tensor(value) else repr(value)
            return f"{name}={shown}"
    return None
