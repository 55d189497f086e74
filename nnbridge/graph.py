r"""Residual and branching networks as stages on an augmented state (GT-DDP Sec. 3).

:func:`graph_stages` decomposes any network whose torch.fx graph is a DAG through its
affine layers (``nnbridge.stages.AFFINE``):

* the **main chain** is the path from the input to the output through the most affine
  layers (ties: the first argument of a merge); its layers are the stages
  :math:`t = 0..T-1`, and :math:`x_t` is the input of stage t's layer;
* a value used past the next stage is a **residual** (GT-DDP Eq. 8): it is carried as
  part of the augmented state :math:`y_t = [x_t, x_{r_1}, \dots]` of every stage it
  crosses (Eq. 26) and merged where it is used -- an identity shortcut ``x + f(x)``
  carries ``x`` from the block's first stage to its last;
* every affine layer off the main chain (a 1x1 projection shortcut, an inception branch)
  is a **player** of the stage where its output is used (Sec. 3.2): it is computed from a
  residual inside that stage, so the residuals themselves never hold parameters, and the
  stage's control is the tuple of its players' controls (player 0: the main layer).

So stage t is a map :math:`y_{t+1} = F_t(y_t, u_t, v_t, \dots)` of tuples of tensors
(:meth:`GraphStage.run`), the parameter-free parts being the graph's own nodes; the
DDP pass differentiates it with ``torch.func`` (:mod:`nnbridge.graph_ops`).  A chain
network has no residuals and one player per stage: the stages of :func:`nnbridge.stages`.

A layer called at several positions of the chain (a Neural-ODE block's field, tied
weights) is a control shared by those stages: every stage from its first call to its
last is joined into one stage (overlapping ranges merge), whose players are the layers it
calls, each with all its calls (``docs/ode.md`` derives why this is DDP on the unrolled
network with the shared control decided where the block starts).  When a parameter-free
input transform has a value used by a stage (a skip from the raw input), :math:`x_0` is
the network's input and the transform is part of stage 0 (``StageGraph.raw_input``).

Refused, with the node named (``UnsupportedModelError``): what :func:`nnbridge.stages`
refuses (a parameter used outside its module, ``F.dropout`` and its variants, a random
operation after the first stage, parametrized modules without a per-sample derivative
between stages, several inputs or outputs), a
normalization layer called twice, and a value of a *parametrized* input transform other
than :math:`x_0` used after the first stage.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field

import torch
from torch import fx, nn

from trajopt.errors import InvalidArgumentError, UnsupportedModelError

from .decompose import _chain, check_node, check_output, node_name, trace, traced_root
from .stages import AFFINE, Stage, combine_calls, is_layer, make_stage, normalizes_by_batch
from .tracing import random_node_names

__all__ = ["GraphStage", "StageGraph", "graph_stages", "Alignment"]

#: where the players off the main chain act (:func:`graph_stages`)
Alignment = str | dict


@dataclass(eq=False)
class GraphStage:
    """Stage t of a network with residuals: :math:`y_{t+1} = F_t(y_t, u_t, \\dots)`.

    Attributes
    ----------
    index : int
    players : list of Stage
        The affine layers of the stage (``players[0]`` the main chain's layer); each a
        :class:`~nnbridge.stages.Stage` with an empty ``post`` (the graph holds the maps).
    inputs, outputs : list of str
        The names of the graph values forming :math:`y_t` and :math:`y_{t+1}` (``[0]``:
        :math:`x_t`, :math:`x_{t+1}`; the rest: residuals, in graph order).
    """

    index: int
    players: list[Stage]
    inputs: list[str]
    outputs: list[str]
    _nodes: list[fx.Node] = field(repr=False)
    _in_nodes: list[fx.Node] = field(repr=False)
    _out_nodes: list[fx.Node] = field(repr=False)
    _heads: dict = field(repr=False)       # head node -> player index
    _root: nn.Module = field(repr=False)

    @property
    def opens(self) -> list[str]:
        """Residuals that start here (carried past this stage's output)."""
        return [n for n in self.outputs[1:] if n not in self.inputs[1:]]

    @property
    def merges(self) -> list[str]:
        """Residuals used (and dropped) here."""
        return [n for n in self.inputs[1:] if n not in self.outputs[1:]]

    @property
    def calls(self) -> list[int]:
        """Per player, how many times the stage calls its layer."""
        n = [0] * len(self.players)
        for j in self._heads.values():
            n[j] += 1
        return n

    def unfold(self, j: int, xs: list[torch.Tensor]) -> torch.Tensor:
        """Player j's unfolded inputs :math:`\\tilde x` of all its calls, (B, in', P)
        with the calls' positions concatenated."""
        return self.players[j].unfold_calls(xs)

    def bias_before_batchnorm(self, j: int) -> bool:
        """Player j has a bias, one call, and its output goes only into a BatchNorm that
        normalizes with the batch's statistics, which removes the bias from every
        sample (``DDPNOpt._bias_cancelled``, ``docs/ddpnopt.md``, "A bias before
        BatchNorm")."""
        heads = [n for n, k in self._heads.items() if k == j]
        if not self.players[j].has_bias or len(heads) != 1 or len(heads[0].users) != 1:
            return False
        user = next(iter(heads[0].users))
        return user.op == "call_module" and normalizes_by_batch(
            self._root.get_submodule(user.target))

    def random_nodes(self) -> list[str]:
        """The stage's operations that draw random numbers in every mode (a function or
        tensor method: ``torch.randn_like``), as errors name them."""
        return random_node_names(self._nodes)

    def modules(self) -> list[nn.Module]:
        """The modules this stage calls (players and fixed maps)."""
        return [self._root.get_submodule(n.target) for n in self._nodes
                if n.op == "call_module"]

    def run(self, ys: list[torch.Tensor], Us: list[torch.Tensor | None] | None = None,
            dh: list[torch.Tensor | None] | None = None, *, record: dict | None = None
            ) -> list[torch.Tensor]:
        """:math:`y_{t+1} = F_t(y_t, \\dots)`.

        Parameters
        ----------
        ys : list of Tensor
            :math:`y_t`, one (B, ...) tensor per entry of ``inputs``.
        Us : list, optional
            Each player's control (``Stage.control()`` layout; None: the module's own).
        dh : list, optional
            Perturbations added to each player's pre-activation (for derivatives).
        record : dict, optional
            Filled with ``("x", j)``: the list of player j's inputs, one per call, and
            ``("h", j)``: its pre-activation (several calls:
            :func:`~nnbridge.stages.combine_calls`).

        Notes
        -----
        A player called several times (a control shared by the stage's steps) has one
        pre-activation made of all its calls'
        (:func:`~nnbridge.stages.combine_calls`); ``dh[j]`` is laid out the same way.
        """
        env: dict[fx.Node, torch.Tensor] = dict(zip(self._in_nodes, ys))
        calls = self.calls
        off = [0] * len(self.players)
        hs: list[list[torch.Tensor]] = [[] for _ in self.players]
        for node in self._nodes:
            args = fx.node.map_arg(node.args, env.__getitem__)
            kwargs = fx.node.map_arg(node.kwargs, env.__getitem__)
            j = self._heads.get(node)
            if j is not None:
                st = self.players[j]
                out = st.affine(args[0], None if Us is None else Us[j])
                if dh is not None and dh[j] is not None:
                    if calls[j] == 1:
                        out = out + dh[j]
                    else:   # this call's positions of the combined pre-activation
                        P = out[0, 0].numel()
                        out = out + dh[j][..., off[j]:off[j] + P].reshape(out.shape)
                        off[j] += P
                if record is not None:
                    record.setdefault(("x", j), []).append(args[0])
                    hs[j].append(out)
            elif node.op == "call_module":
                out = self._root.get_submodule(node.target)(*args, **kwargs)
            elif node.op == "call_function":
                out = node.target(*args, **kwargs)
            elif node.op == "call_method":
                out = getattr(args[0], node.target)(*args[1:], **kwargs)
            else:  # get_attr: a buffer or constant
                out = _attr(self._root, node.target)
            env[node] = out
        if record is not None:
            for j, h in enumerate(hs):
                record["h", j] = h[0] if len(h) == 1 else combine_calls(h)
        return [env[n] for n in self._out_nodes]


def _attr(root: nn.Module, target: str):
    obj = root
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


@dataclass(eq=False)
class StageGraph:
    """A network as :class:`GraphStage` s (:func:`graph_stages`).

    Attributes
    ----------
    pre : list of nn.Module
        The input transform (before the first stage's layer).
    stages : list of GraphStage
    raw_input : bool
        :math:`x_0` is the network's input (the parameter-free input transform is part of
        stage 0); else the first layer's input.
    first_call : int
        Which call of the first stage's main layer is the main chain's (its input is
        :math:`x_0`): the layer may also be called off the chain, earlier.
    """

    pre: list[nn.Module]
    stages: list[GraphStage]
    raw_input: bool = False
    first_call: int = 0

    @property
    def players(self) -> list[Stage]:
        """All affine layers: the main chain's in order, then the other players."""
        main = [s.players[0] for s in self.stages]
        return main + [p for s in self.stages for p in s.players[1:]]

    @property
    def has_residuals(self) -> bool:
        return any(len(s.players) > 1 or len(s.inputs) > 1 for s in self.stages)

    def forward(self, x0: torch.Tensor) -> list[list[torch.Tensor]]:
        """:math:`y_0 = [x_0], y_1, \\dots, y_T` from the first layer's input."""
        ys = [[x0]]
        for st in self.stages:
            ys.append(st.run(ys[-1]))
        return ys

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """The network: the input transform, then the stages; the output."""
        for m in self.pre:
            x = m(x)
        return self.forward(x)[-1][0]


def graph_stages(model: nn.Module, alignment: Alignment = "merge") -> StageGraph:
    """Decompose ``model`` into stages on an augmented state (module docstring).

    Parameters
    ----------
    model : nn.Module
        Any network (custom ``forward``, residual blocks, projection shortcuts, parallel
        branches); DDP / compiled wrappers are unwrapped.
    alignment : {"merge", "split"} or dict
        Where each affine layer off the main chain (a projection shortcut, a parallel
        branch's layer) is a player: ``"merge"`` at the stage where its output is used
        (its output is computed there), ``"split"`` at the first stage whose state holds
        its input (its output is then carried as a residual to the merge).  A dict maps
        layer names (``model.named_modules()``) to either; layers it omits are
        ``"merge"``.  GT-DDP paper, remark under Eq. 15: the OCP is the same, the
        policies differ (``docs/alignment.md``).

    Returns
    -------
    StageGraph

    Raises
    ------
    UnsupportedModelError
        (a ``TypeError``) naming the node that cannot be decomposed.
    InvalidArgumentError
        ``alignment`` neither "merge", "split" nor a dict of them naming off-chain layers.
    """
    model = traced_root(model)
    gm = trace(model)
    modules = dict(gm.named_modules())
    params = {name for name, _ in gm.named_parameters()}
    nodes = list(gm.graph.nodes)
    places = [n for n in nodes if n.op == "placeholder"]
    if len(places) != 1:
        raise UnsupportedModelError(
            f"model: forward takes {len(places)} inputs "
            f"({[n.name for n in places]}); a network as dynamics maps one state x_0")
    result = check_output(next(n for n in nodes if n.op == "output"))
    live = _ancestors(result)
    order = [n for n in nodes if n in live]
    is_head = {n: n.op == "call_module" and is_layer(modules[n.target])
               for n in order}
    # the main chain: the path through the most affine layers (first argument on ties)
    count: dict[fx.Node, int] = {}
    for n in order:
        count[n] = max((count[a] for a in n.all_input_nodes), default=0) + is_head[n]
    chain, n = [], result
    while n is not None:
        if is_head[n]:
            chain.append(n)
        best = max((count[a] for a in n.all_input_nodes), default=None)
        n = next((a for a in n.all_input_nodes if count[a] == best), None)
    chain.reverse()
    if not chain:
        raise UnsupportedModelError(
            f"model has no {' or '.join(c.__name__ for c in AFFINE)} layer: "
            "nothing to optimize")
    T = len(chain)
    index = {h: t for t, h in enumerate(chain)}
    for h in chain + [n for n in order if is_head[n] and n not in index]:
        if len(h.all_input_nodes) != 1:
            raise UnsupportedModelError(f"model: {node_name(h)} takes more than one tensor")
    calls: dict[str, list[fx.Node]] = {}
    for h in order:
        if is_head[h]:
            calls.setdefault(h.target, []).append(h)
    shared = [target for target, hs in calls.items() if len(hs) > 1]
    for target, hs in calls.items():
        if len(hs) > 1 and not isinstance(modules[target], AFFINE):
            raise UnsupportedModelError(
                f"model: the normalization layer {target!r} is called {len(hs)} times; a "
                f"control shared by several stages is supported for "
                f"{', '.join(c.__name__ for c in AFFINE)} layers")
    xs = [h.all_input_nodes[0] for h in chain] + [result]   # x_0 .. x_T
    users: dict[fx.Node, list[fx.Node]] = {n: [] for n in order}
    for n in order:
        for a in n.all_input_nodes:
            users[a].append(n)
    pre_nodes = _ancestors(xs[0]) & live
    raw = _raw_input(pre_nodes, xs[0], users, modules)
    if raw:   # a parameter-free input transform used later: x_0 is the raw input
        xs[0] = places[0]
        pre_nodes = {places[0]}
    # stage of each node: the main segments t (descendants of layer t up to x_{t+1}),
    # the input transform -1, everything else as late as its users allow
    depth: dict[fx.Node, int] = {}
    for n in order:
        depth[n] = max([depth[a] for a in n.all_input_nodes]
                       + [index[n] + 1 if n in index else 0])
    sched: dict[fx.Node, int] = {}
    for n in pre_nodes:
        sched[n] = -1
    for t in range(T):
        seg = _ancestors(xs[t + 1], stop=xs[t]) if xs[t + 1] is not xs[t] else set()
        for n in seg:
            if depth[n] == t + 1:
                sched[n] = t
    late: list[fx.Node] = []
    for n in reversed(order):
        if n not in sched:
            later = [sched[u] for u in users[n]]
            sched[n] = min(later) if later else T - 1
            late.append(n)
    _align(order, sched, set(late), [h for h in order if is_head[h] and h not in index],
           xs, alignment)
    for n in order:
        check_node(n, modules, params, sched[n] >= 0)
    # residual slots crossing into each stage
    slots: list[list[fx.Node]] = []
    for t in range(T + 1):
        s = [n for n in order if sched[n] < t and n is not xs[t]
             and any(sched[u] >= t for u in users[n])]
        bad = [n for n in s if sched[n] < 0 and n is not xs[0]]
        if bad:
            raise UnsupportedModelError(
                f"model: {node_name(bad[0])} of the input transform is used after the "
                "first stage (a skip from the raw input); start the shortcut at the "
                "first layer's input")
        slots.append(s)
    if slots[T]:
        raise UnsupportedModelError(f"model: {node_name(slots[T][0])} is used after the "
                                    "output")
    out = []
    for a, b in _blocks(T, [[sched[h] for h in hs] for hs in calls.values()]):
        mine = [n for n in order if a <= sched[n] <= b]
        first = [chain[a]] + [n for n in mine if is_head[n] and n is not chain[a]]
        unique: dict[str, fx.Node] = {}
        for h in first:
            unique.setdefault(h.target, h)
        players = list(unique.values())
        slot = {h.target: j for j, h in enumerate(players)}
        ins, outs = [xs[a]] + slots[a], [xs[b + 1]] + slots[b + 1]
        heads = {h: slot[h.target] for h in mine if is_head[h]}
        out.append(GraphStage(
            len(out), [make_stage(len(out), modules[h.target], ()) for h in players],
            [n.name for n in ins], [n.name for n in outs], mine, ins, outs, heads, gm))
    pre = _chain(gm, modules, places[0], xs[0], "the input transform")
    if len(out) == 1 and T > 1:
        warnings.warn(
            f"graph_stages: the layers called at several stages ({sorted(shared)}) join all "
            f"{T} stages of the network into one: GT-DDP's step has no feedback (the one "
            "stage's state is the data), only its cost", UserWarning, stacklevel=2)
    return StageGraph(pre, out, raw_input=raw,
                      first_call=calls[chain[0].target].index(chain[0]))


def _align(order: list[fx.Node], sched: dict, late: set, off_chain: list[fx.Node],
           xs: list[fx.Node], alignment: Alignment) -> None:
    """Move the off-chain layers ``alignment`` places at the split (and the parameter-free
    nodes they need that were scheduled late) to the first stage whose state holds
    their input, in ``sched``."""
    names = {h.target for h in off_chain}
    if isinstance(alignment, dict):
        bad = {k: v for k, v in alignment.items() if v not in ("merge", "split")}
        unknown = sorted(set(alignment) - names)
        if bad:
            raise InvalidArgumentError(f"alignment: values must be 'merge' or 'split'; got "
                                       f"{bad}")
        if unknown:
            raise InvalidArgumentError(f"alignment: keys must be layers off the main chain, "
                                       f"{sorted(names)}; got {unknown}")
        split = {k for k, v in alignment.items() if v == "split"}
    elif alignment in ("merge", "split"):
        split = names if alignment == "split" else set()
    else:
        raise InvalidArgumentError(f"alignment must be 'merge', 'split' or a dict of them "
                                   f"by layer name; got {alignment!r}")
    move: set[fx.Node] = set()
    for h in off_chain:
        if h.target in split:
            move |= _ancestors(h) & late
    state = {x: t for t, x in enumerate(xs)}
    for n in order:
        if n in move:
            # x_t is produced by stage t - 1 and is the state of stage t
            sched[n] = max([max(0, state[a]) if a in state else max(0, sched[a])
                            for a in n.all_input_nodes] + [0])


def _raw_input(pre_nodes: set[fx.Node], x0: fx.Node, users: dict, modules: dict) -> bool:
    """Whether :math:`x_0` must be the raw input: a value of the input transform other
    than the first layer's input is used by a stage, and the transform holds no
    parameters (so it can be replayed inside stage 0, whose state is never perturbed)."""
    used = any(u not in pre_nodes for n in pre_nodes if n is not x0 for u in users[n])
    if not used:
        return False
    return not any(n.op == "call_module" and any(True for _ in modules[n.target].parameters())
                   for n in pre_nodes)


def _blocks(T: int, uses: list[list[int]]) -> list[tuple[int, int]]:
    """The stages ``[a, b]`` of the chain positions ``0..T-1``: a layer called at several
    positions (a control shared by stages: a Neural-ODE block, tied weights) joins every
    position from its first call to its last into one stage; overlapping ranges merge."""
    end = list(range(T))
    for pos in uses:
        lo, hi = min(pos), max(pos)
        for t in range(lo, hi + 1):
            end[t] = max(end[t], hi)
    blocks, a = [], 0
    while a < T:
        b = end[a]
        t = a
        while t <= b:          # ranges starting inside the block extend it
            b = max(b, end[t])
            t += 1
        blocks.append((a, b))
        a = b + 1
    return blocks


def _ancestors(node: fx.Node, stop: fx.Node | None = None) -> set[fx.Node]:
    """``node`` and the nodes it depends on (not looking past ``stop``, excluded)."""
    seen, todo = set(), [node]
    while todo:
        n = todo.pop()
        if n in seen or n is stop:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return seen

