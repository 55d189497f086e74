r"""Any torch network to stages, from its torch.fx graph.

:func:`stages` traces the model with :mod:`torch.fx` (``torch.nn`` modules are leaves,
custom modules are traced through, so a hand-written ``forward`` is fine) and walks the
graph once:

* every call of a parametrized affine module (``AFFINE``; grouped convolutions too) or
  of a BatchNorm / LayerNorm with affine parameters (:class:`~nnbridge.stages.NormStage`)
  opens a stage :math:`x_{t+1} = \sigma_t(g_t(x_t, u_t))`;
* the parameter-free nodes between the call of stage t's module and the input of stage
  t+1's module -- activations as modules (``nn.ReLU``) or functions (``F.relu``,
  ``torch.tanh``, ``x.relu()``), ``flatten`` / ``view`` / pooling -- are its
  :math:`\sigma_t`: the common activations become their ``nn`` modules (closed-form
  derivatives), anything else one opaque map differentiated by ``torch.func``;
* the nodes before the first stage are a fixed input transform (``pre``).

Other parametrized modules have no DDP model: before the first stage any module (an
``Embedding``), between stages those whose derivative acts sample by sample
(``PER_SAMPLE``: GroupNorm, InstanceNorm, RMSNorm, PReLU) are part of the maps, held
fixed in the DDP pass; the optimizers update their parameters from ``p.grad``.

What the walk refuses, naming the node (``UnsupportedModelError``): a tensor that skips
a stage (a residual ``x + f(x)``, a concatenation of branches: residual and branching
networks are :func:`nnbridge.graph_stages`' and :class:`nnbridge.GTDDP`'s), a parameter
used outside a module (``F.linear(x, self.weight)``), a parametrized module between
stages whose derivative need not act sample by sample (RNNs, attention), ``F.dropout``
and its variants in ``forward`` (torch.fx fixes their ``training`` flag when tracing: use
``nn.Dropout`` / ``nn.Dropout2d`` / ...), more than one input or output, and a
``forward`` that torch.fx cannot trace (data-dependent Python control flow).  A random
operation after the first stage began (``torch.randn_like`` noise, ``bernoulli``,
``x.normal_()``) is kept in its stage and refused by the optimizers that re-run the
stages (feedback, EMSA, LQRDescent: they would draw other numbers), when they would.

``nn.Sequential`` models decompose to the same stages as before (their modules are the
graph's nodes in order).  DistributedDataParallel / DataParallel wrappers and
``torch.compile``'d modules are unwrapped first.
"""

from __future__ import annotations

import builtins
import dataclasses
import operator
from collections.abc import Callable
from contextlib import contextmanager

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)
from torch import fx, nn
from torch.nn.utils import parametrize

from trajopt.errors import InvalidArgumentError, UnsupportedModelError

from .distributed import unwrap
from .stages import AFFINE, Stage, is_layer, make_stage
from .tracing import DROPOUT_FUNCTIONS, drop_concrete, forward_defaults

__all__ = ["stages"]

#: parametrized modules whose derivative acts sample by sample (BatchNorm in training mode
#: only with its batch statistics held fixed: nnbridge.batchnorm)
PER_SAMPLE = tuple(c for c in (nn.LayerNorm, nn.GroupNorm, nn.modules.batchnorm._BatchNorm,
                               nn.modules.instancenorm._InstanceNorm, nn.PReLU,
                               getattr(nn, "RMSNorm", None)) if c is not None)


def _activation(fn: Callable, args: tuple, kwargs: dict) -> nn.Module | None:
    """The ``nn`` module equivalent to an activation call ``fn(x, *args, **kwargs)``."""
    inplace = bool(kwargs.get("inplace", False))
    if fn in (F.relu, torch.relu, "relu"):
        return nn.ReLU(inplace=inplace)
    if fn in (torch.tanh, F.tanh, "tanh"):
        return nn.Tanh()
    if fn in (torch.sigmoid, F.sigmoid, "sigmoid"):
        return nn.Sigmoid()
    if fn is F.leaky_relu:
        slope = args[0] if args else kwargs.get("negative_slope", 0.01)
        return nn.LeakyReLU(slope, inplace=inplace)
    if fn is F.gelu:
        return nn.GELU(approximate=kwargs.get("approximate", "none"))
    if fn is F.silu:
        return nn.SiLU(inplace=inplace)
    if fn is F.elu:
        return nn.ELU(args[0] if args else kwargs.get("alpha", 1.0), inplace=inplace)
    if fn in (torch.flatten, "flatten"):
        start = args[0] if args else kwargs.get("start_dim", 0)
        end = args[1] if len(args) > 1 else kwargs.get("end_dim", -1)
        return nn.Flatten(start, end)
    return None


class _Segment(nn.Module):
    """A part of the graph without stages (activations, views, normalizations held
    fixed) as one map of the stage's pre-activation."""

    def __init__(self, gm: fx.GraphModule, description: str):
        super().__init__()
        self.gm = gm
        self.description = description

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return self.gm(h)

    def extra_repr(self) -> str:
        return self.description


def node_name(node: fx.Node) -> str:
    target = node.target
    what = target if isinstance(target, str) else getattr(target, "__name__", str(target))
    return f"node {node.name!r} ({node.op} {what})"


@contextmanager
def _len_of_proxies():
    """While tracing, ``len(x)`` of a traced tensor is ``x.size(0)`` (a graph node), as
    in eager mode; torch.fx refuses ``len`` unless the model's module calls
    ``torch.fx.wrap("len")``, and ``len(x)`` for the batch size is common in forward
    passes (e.g. ``t.expand(len(x), 1)`` in an ODE field).  Other objects are passed to
    the builtin.  The builtin is restored on exit."""
    builtin = builtins.len

    def traced_len(obj):
        return obj.size(0) if isinstance(obj, fx.Proxy) else builtin(obj)

    builtins.len = traced_len
    try:
        yield
    finally:
        builtins.len = builtin


def check_output(out_node: fx.Node | None) -> fx.Node:
    """The node ``forward`` returns; refuse another return value than one tensor (a
    tuple, dict, namedtuple or dataclass), naming its type."""
    value = None if out_node is None else out_node.args[0]
    what = None
    if not isinstance(value, fx.Node):
        what = type(value).__name__.replace("immutable_", "")   # fx's containers
    elif value.op == "call_function" and isinstance(value.target, type) and \
            not issubclass(value.target, torch.Tensor):
        kind = ("a namedtuple" if issubclass(value.target, tuple) else "a dataclass"
                if dataclasses.is_dataclass(value.target) else "an object")
        what = f"{value.target.__name__} ({kind})"
    if what is not None:
        raise UnsupportedModelError(
            f"model: forward must return one tensor; it returns a {what}: the loss must "
            "be a function of one output tensor (the last stage's); return it, or wrap "
            "the model in a module whose forward returns the tensor the loss uses "
            "(e.g. model(x).logits)")
    return value


def traced_root(model: nn.Module) -> nn.Module:
    """The module the stages are traced from: the network inside its wrappers
    (``unwrap``), one layer as a one-stage ``nn.Sequential``."""
    model = unwrap(model)
    return nn.Sequential(model) if is_layer(model) else model


def trace(model: nn.Module) -> fx.GraphModule:
    lazy = [n for n, p in model.named_parameters() if nn.parameter.is_lazy(p)]
    if lazy:
        raise InvalidArgumentError(
            f"model: {lazy[0]!r} is not initialized yet (a lazy module, nn.LazyLinear / "
            f"nn.LazyConv2d, ...): the stages take the layers' shapes from their "
            f"parameters; run one forward pass with a batch first (the dry run torch's "
            f"lazy modules ask for before an optimizer is built), then build the optimizer")
    for name, m in model.named_modules():
        computed = [k for k in ("weight", "bias") if torch.is_tensor(getattr(m, k, None))
                    and not isinstance(getattr(m, k), nn.Parameter)]
        if is_layer(m) and (parametrize.is_parametrized(m) or computed):
            raise UnsupportedModelError(
                f"model: layer {name!r} ({type(m).__name__}) has a computed "
                f"{(computed or ['weight'])[0]} (weight_norm, spectral_norm or another "
                "parametrization): a layer's parameters are its DDP control, and these are "
                "functions of other parameters; remove the parametrization "
                "(torch.nn.utils.parametrize.remove_parametrizations) or train the model "
                "with a torch.optim optimizer")

    class Tracer(fx.Tracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return is_layer(m) or super().is_leaf_module(m, qualname)

    concrete = forward_defaults(model)
    try:
        with _len_of_proxies():
            graph = Tracer().trace(model, concrete_args=concrete or None)
    except Exception as exc:  # fx raises TraceError, TypeError, RuntimeError, ...
        raise UnsupportedModelError(
            f"model: torch.fx cannot trace {type(model).__name__}.forward ({exc}); "
            "nnbridge decomposes a network from its traced graph (torch.fx symbolic "
            "tracing), so forward must run on symbolic tensors: no branch on tensor "
            "values (write such branches with torch.where), no shapes passed to "
            "factories (torch.zeros(x.shape[0], n): use x.new_zeros((x.shape[0], n))), "
            "no packed sequences or other tensor-wrapping objects; optional "
            f"arguments are traced with their defaults {concrete})") from exc
    drop_concrete(graph, concrete)
    return fx.GraphModule(model, graph)


def check_node(node: fx.Node, modules: dict[str, nn.Module], params: set[str],
               in_stages: bool) -> None:
    """Refuse what no decomposition can take at ``node`` (module docstring): a parameter
    used outside its module, ``F.dropout`` and its variants with p > 0, and --
    ``in_stages``: after the first stage began -- a parametrized module that is neither
    affine nor known to act sample by sample.  A random operation after the first stage
    is refused by the optimizers that re-run the stages, when they would
    (:func:`~nnbridge.stages.random_function`, ``GraphStage.random_nodes``): EKFAC and
    ``feedback=False`` take it (session 31)."""
    if node.op == "get_attr" and node.target in params:
        raise UnsupportedModelError(
            f"model: {node_name(node)} uses the parameter {node.target!r} outside its "
            f"module; call the module (e.g. self.fc(x), not F.linear(x, "
            f"self.fc.weight)) so that it is a stage")
    if node.op == "call_function" and node.target in DROPOUT_FUNCTIONS:
        p = node.args[1] if len(node.args) > 1 else node.kwargs.get("p", 0.5)
        if p:
            module, name = DROPOUT_FUNCTIONS[node.target], node.target.__name__
            space = "F" if getattr(F, name, None) is node.target else "torch"
            raise UnsupportedModelError(
                f"model: {node_name(node)}: torch.fx fixes {space}.{name}'s `training` "
                f"flag when it traces (the graph would drop in eval mode, or not in "
                f"training mode); use an "
                f"nn.{module} module (it follows model.eval(); with feedback, and for "
                f"EMSA / LQRDescent, in eval mode)")
    module = modules.get(node.target) if node.op == "call_module" else None
    if (in_stages and module is not None and not is_layer(module)
            and not isinstance(module, PER_SAMPLE) and any(True for _ in module.parameters())):
        # no DDP model: a fixed map inside the DDP pass, its parameters updated by the
        # base optimizer; between stages its derivative must be per sample
        raise UnsupportedModelError(
            f"model: module {node.target!r} ({type(module).__name__}) has "
            f"parameters, is not an affine layer nnbridge takes as a stage "
            f"(supported: {', '.join(c.__name__ for c in AFFINE)}) and, after "
            f"the first stage, not one whose derivative is known to act sample "
            f"by sample ({', '.join(c.__name__ for c in PER_SAMPLE)}); before "
            f"the first stage any module is fine")


def stages(model: nn.Module) -> tuple[list[nn.Module], list[Stage]]:
    """Decompose ``model`` into ``(pre, stages)`` from its torch.fx graph.

    Parameters
    ----------
    model : nn.Module
        Any network whose graph is a chain through its affine layers (module
        docstring); ``nn.Sequential`` and custom ``forward`` alike.

    Returns
    -------
    pre : list of nn.Module
        Parameter-free ops before the first stage (applied to the raw input).
    stages : list of Stage
        The stage modules are the model's own (hooks and parameter updates reach it).

    Raises
    ------
    UnsupportedModelError
        (a ``TypeError``) naming the node or module that cannot be decomposed.
    """
    model = traced_root(model)
    gm = trace(model)
    modules = dict(gm.named_modules())
    params = {name for name, _ in gm.named_parameters()}
    seg: dict[fx.Node, int] = {}   # the segment a value belongs to: -1 = pre, t = stage t
    heads: list[fx.Node] = []      # the call of each stage's module
    inputs: list[fx.Node] = []     # the argument of each stage's module
    current, out_node, placeholder = -1, None, None
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            if placeholder is not None:
                raise UnsupportedModelError(
                    f"model: forward takes more than one input ({placeholder.name!r}, "
                    f"{node.name!r}); a network as dynamics maps one state x_0")
            placeholder = node
            seg[node] = -1
            continue
        if node.op == "get_attr":
            check_node(node, modules, params, current >= 0)
            continue  # a buffer or constant: part of the map it feeds
        if node.op == "output":
            out_node = node
            break
        sources = {seg[a] for a in node.all_input_nodes if a in seg}
        if any(s < current for s in sources) and current >= 0:
            sources = _batch_sizes_from_here(gm, node, seg, current, heads[current])
        if any(s < current for s in sources):
            early = min(s for s in sources if s < current)
            where = "the input transform" if early < 0 else f"stage {early}"
            raise UnsupportedModelError(
                f"model: {node_name(node)} uses a value of {where} after stage {current} "
                f"began: a skip connection or a branch (residual x + f(x), concatenated "
                f"branches) is not a chain of stages; use nnbridge.GTDDP "
                f"(nnbridge.graph_stages: residual spans and players)")
        module = modules.get(node.target) if node.op == "call_module" else None
        check_node(node, modules, params, current >= 0)
        if module is not None and is_layer(module):
            if len(node.all_input_nodes) != 1:
                raise UnsupportedModelError(f"model: {node_name(node)} takes more than one "
                                            "tensor")
            current += 1
            heads.append(node)
            inputs.append(node.all_input_nodes[0])
            seg[node] = current
            continue
        seg[node] = current
    if not heads:
        raise UnsupportedModelError(
            f"model has no {' or '.join(c.__name__ for c in AFFINE)} layer: "
            "nothing to optimize")
    targets = [h.target for h in heads]
    for t, target in enumerate(targets):
        if target in targets[:t]:
            raise UnsupportedModelError(
                f"model: the layer {target!r} is called at stages {targets.index(target)} "
                f"and {t} (a control shared by stages: tied weights, a Neural-ODE block); "
                "a chain of stages has one control each; nnbridge.GTDDP takes it "
                "(docs/ode.md)")
    ends = inputs[1:] + [check_output(out_node)]
    if seg.get(ends[-1], -2) != current:
        raise UnsupportedModelError(
            f"model: the output {ends[-1].name!r} does not come from the last stage "
            f"({heads[-1].target!r})")
    pre = _chain(gm, modules, placeholder, inputs[0], "the input transform")
    out = []
    for t, (head, end) in enumerate(zip(heads, ends)):
        post = _chain(gm, modules, head, end, f"stage {t}")
        out.append(make_stage(t, modules[head.target], tuple(post)))
    return pre, out


def _is_batch_size(node: fx.Node) -> bool:
    """``node`` is the batch size of a value: ``v.size(0)``, ``v.shape[0]``,
    ``v.size()[0]``."""
    if node.op == "call_method" and node.target == "size":
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        return dim == 0
    if node.op == "call_function" and node.target is operator.getitem and \
            node.args[1] == 0 and isinstance(node.args[0], fx.Node):
        base = node.args[0]
        return (base.op == "call_method" and base.target == "size" and len(base.args) == 1
                and not base.kwargs) or (base.op == "call_function" and base.target is
                                         builtins.getattr and base.args[1] == "shape")
    return False


def _batch_sizes_from_here(gm: fx.GraphModule, node: fx.Node, seg: dict[fx.Node, int],
                           current: int, head: fx.Node) -> set[int]:
    """Where ``node`` (in stage ``current``) reads the batch size of an earlier value --
    ``B = x.size(0)`` at the top of ``forward``, used in a later ``h.view(B, -1)`` -- read
    it from the stage's own value (``head``, the call of its module: every stage keeps
    the batch dimension) instead, so that the value is no skip connection.  Returns the
    segments ``node`` then reads."""
    for arg in node.all_input_nodes:
        if seg.get(arg, current) < current and _is_batch_size(arg):
            with gm.graph.inserting_before(node):
                own = gm.graph.call_method("size", (head, 0))
            seg[own] = current
            node.replace_input_with(arg, own)
    return {seg[a] for a in node.all_input_nodes if a in seg}


def _chain(gm: fx.GraphModule, modules: dict[str, nn.Module], start: fx.Node, end: fx.Node,
           label: str) -> list[nn.Module]:
    """The map from the value of ``start`` to the value of ``end`` as a list of modules:
    the nodes' own modules / equivalent ``nn`` activations when they form a chain, else
    one :class:`_Segment` of the sub-graph."""
    todo, seen = [end], set()
    while todo:  # the ancestors of ``end`` down to ``start``
        node = todo.pop()
        if node is start or node in seen:
            continue
        if node.op == "placeholder":
            raise UnsupportedModelError(f"model: {label} depends on the raw input")
        seen.add(node)
        todo.extend(node.all_input_nodes)
    live = [n for n in gm.graph.nodes if n in seen]
    chain: list[nn.Module] = []
    prev = start
    for node in live:
        args = node.args
        mod = None
        if node.all_input_nodes == [prev] and args and args[0] is prev:
            if node.op == "call_module":
                mod = modules[node.target]
            elif node.op in ("call_function", "call_method"):
                mod = _activation(node.target, tuple(args[1:]), dict(node.kwargs))
        if mod is None:
            break
        chain.append(mod)
        prev = node
    else:
        return chain
    # not a chain of known modules: one opaque map of the sub-graph
    graph = fx.Graph()
    env = {start: graph.placeholder("h")}
    for node in live:
        env[node] = graph.node_copy(node, lambda n: env[n])
    graph.output(env[end])
    names = ", ".join(n.name for n in live)
    return [_Segment(fx.GraphModule(gm, graph), f"{label}: {names}")]

