r"""One stage of a torch network, :math:`x_{t+1} = \sigma_t(g_t(x_t, u_t))`, and its
operator-form derivatives.

:func:`nnbridge.stages` (:mod:`nnbridge.decompose`) finds the stages of a network from its
torch.fx graph: every parametrized affine op (``nn.Linear``, ``nn.Conv2d``; bias
included) opens a stage and the parameter-free ops after it (activations, ``Flatten``,
pooling, ``Dropout``, or any parameter-free sub-graph) form its :math:`\sigma_t`.

Controls are kept as the *augmented weight matrix* :math:`\tilde U = [W \mid b]` of shape
(out, in') with ``in' = in_features (+1 with bias)`` for Linear and
``in' = C_in k_h k_w (+1)`` for Conv2d, acting on the *unfolded input*
:math:`\tilde x` of shape (B, in', P) (P = 1 for Linear, the output positions for a
convolution): :math:`h = \tilde U \tilde x` position by position.  Per-sample control
cotangents are kept factored, :math:`f_u^{i\top} y = \sum_p w_p \tilde x_p^\top` with
:math:`w = \sigma_h^\top y` (Eq. 10-11 of the DDPNOpt paper), never as (B, out, in')
tensors unless a curvature asks for them.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F  # noqa: N812  (the torch idiom)
from torch import fx, nn

from trajopt.errors import InvalidArgumentError, UnsupportedModelError

from .tracing import random_node_names

__all__ = ["Stage", "NormStage", "StageLinearization", "SUPPORTED", "AFFINE", "combine_calls",
           "outer_sum", "is_layer", "is_norm_layer", "make_stage", "samplewise",
           "normalizes_by_batch_in", "random_function",
           "controls_samplewise"]

AFFINE = (nn.Linear, nn.Conv1d, nn.Conv2d)
_ELEMENTWISE = (nn.ReLU, nn.Tanh, nn.Sigmoid, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Softplus,
                nn.SiLU, nn.Hardtanh, nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d,
                nn.Dropout3d, nn.AlphaDropout, nn.FeatureAlphaDropout)
_STRUCTURAL = (nn.Flatten, nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d)
SUPPORTED = tuple(c.__name__ for c in AFFINE + _ELEMENTWISE + _STRUCTURAL)


@dataclass(frozen=True)
class ConvGeometry:
    """A Conv1d / Conv2d as a 2-D convolution (Conv1d: height 1) whose padding is either
    symmetric zeros inside the convolution (``inner``) or an explicit ``F.pad`` first
    (``pads`` in F.pad's order, for ``padding="same"`` with an even kernel and for the
    reflect / replicate / circular modes), so that unfolding, the convolution and its
    transpose all see the same padded input."""

    one_d: bool
    kernel: tuple[int, int]
    stride: tuple[int, int]
    dilation: tuple[int, int]
    inner: tuple[int, int]
    pads: tuple[int, int, int, int] | None
    mode: str

    @classmethod
    def of(cls, m: nn.Module) -> ConvGeometry:
        one_d = isinstance(m, nn.Conv1d)

        def two(v):
            return (1, *v) if one_d else tuple(v)
        rev = list(m._reversed_padding_repeated_twice)  # F.pad order, last dim first
        pads = tuple(rev + [0, 0]) if one_d else tuple(rev)
        symmetric = pads[0] == pads[1] and pads[2] == pads[3]
        inner = (pads[2], pads[0]) if symmetric and m.padding_mode == "zeros" else (0, 0)
        explicit = None if inner != (0, 0) or not any(pads) else pads
        mode = "constant" if m.padding_mode == "zeros" else m.padding_mode
        return cls(one_d, two(m.kernel_size), two(m.stride), two(m.dilation), inner,
                   explicit, mode)

    def input(self, x: torch.Tensor) -> torch.Tensor:
        """The (padded) 2-D input the convolution runs on."""
        if self.one_d:
            x = x.unsqueeze(-2)
        return x if self.pads is None else F.pad(x, self.pads, mode=self.mode)

    def weight(self, W: torch.Tensor) -> torch.Tensor:
        return W.unsqueeze(-2) if self.one_d else W

    def unfold(self, x: torch.Tensor, groups: int, bias: bool) -> torch.Tensor:
        """``F.unfold`` of the (padded) input with the bias row of ones appended: (B, in',
        P), or (B, groups, in'_g, P).  One copy of a strided view of the padded input into
        a buffer that already holds the ones (``F.unfold`` + ``torch.cat``: two copies,
        measured 2-3x slower on the CPU); the same numbers, in F.unfold's order."""
        xin = self.input(x)
        ih, iw = self.inner
        if ih or iw:
            xin = F.pad(xin, (iw, iw, ih, ih))
        B, C, H, W = xin.shape
        (kh, kw), (sh, sw), (dh, dw) = self.kernel, self.stride, self.dilation
        ho, wo = (H - dh * (kh - 1) - 1) // sh + 1, (W - dw * (kw - 1) - 1) // sw + 1
        xin = xin.contiguous()
        b, c, r, q = xin.stride()
        cg = C // groups
        view = xin.as_strided((B, groups, cg, kh, kw, ho, wo),
                              (b, cg * c, c, r * dh, q * dw, r * sh, q * sw))
        out = xin.new_empty(B, groups, cg * kh * kw + int(bias), ho * wo)
        out[:, :, :cg * kh * kw].view(B, groups, cg, kh, kw, ho, wo).copy_(view)
        if bias:
            out[:, :, -1] = 1
        return out[:, 0] if groups == 1 else out

    def output(self, y: torch.Tensor) -> torch.Tensor:
        return y.squeeze(-2) if self.one_d else y

    def input_adjoint(self, g: torch.Tensor, x_shape: tuple) -> torch.Tensor:
        """The adjoint of :meth:`input` (cropping for zero padding, the pad's vector-
        Jacobian product otherwise): a cotangent of the padded 2-D input -> of x."""
        if self.pads is not None:
            if self.mode == "constant":
                lw, rw, th, bh = self.pads
                g = g[..., th:g.shape[-2] - bh, lw:g.shape[-1] - rw]
            else:
                shape = (g.shape[0], *x_shape) if not self.one_d else (
                    g.shape[0], x_shape[0], 1, x_shape[1])
                _, vjp = torch.func.vjp(
                    lambda z: F.pad(z, self.pads, mode=self.mode),
                    g.new_zeros(shape))
                g = vjp(g)[0]
        return g.squeeze(-2) if self.one_d else g


@dataclass(eq=False)
class Stage:
    """One stage: ``module`` (Linear, Conv1d or Conv2d) followed by the parameter-free
    ``post``."""

    index: int
    module: nn.Module
    post: tuple[nn.Module, ...]
    elementwise: bool = field(init=False)

    def __post_init__(self):
        self.elementwise = all(isinstance(p, _ELEMENTWISE) for p in self.post)
        self._inplace = any(getattr(p, "inplace", False) for p in self.post)
        #: grouped / depthwise convolution: the control is block diagonal over the groups
        #: and is kept as (groups, out_g, in'_g) (module docstring)
        self.groups = int(getattr(self.module, "groups", 1))
        self.conv = ConvGeometry.of(self.module) if self.is_conv else None

    @property
    def is_conv(self) -> bool:
        return isinstance(self.module, (nn.Conv1d, nn.Conv2d))

    @property
    def has_bias(self) -> bool:
        return self.module.bias is not None

    def params(self) -> list[torch.Tensor]:
        return [p for p in (self.module.weight, self.module.bias) if p is not None]

    # ------------------------------------------------------------- control layout
    def control(self) -> torch.Tensor:
        """:math:`\\tilde U = [W \\mid b]`, (out, in'); (groups, out_g, in'_g) for a
        grouped convolution."""
        return self.join([p.detach() for p in self.params()])

    def split(self, U: torch.Tensor) -> list[torch.Tensor]:
        """The parameter-shaped tensors of an (out, in') control-shaped tensor."""
        shape = self.module.weight.shape
        if self.has_bias:
            w, b = U[..., :-1], U[..., -1]
            return [_shaped(w, shape), b if b.dim() == 1 else b.reshape(-1)]
        return [_shaped(U, shape)]

    def join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        """Inverse of :meth:`split` (e.g. for ``p.grad``)."""
        lead = (tensors[0].shape[0],) if self.groups == 1 else (
            self.groups, tensors[0].shape[0] // self.groups)
        W = _shaped(tensors[0], (*lead, math.prod(tensors[0].shape[1:])))
        return torch.cat([W, tensors[1].reshape(*lead, 1)], -1) if self.has_bias else W

    def factor_view(self, h: torch.Tensor, lead: int = 1) -> torch.Tensor:
        """A pre-activation-shaped tensor (``lead`` leading dims, then out, spatial...)
        as control-cotangent factors: (..., out, P), or (..., groups, out_g, P)."""
        head = h.shape[:lead]
        if self.groups == 1:
            return h.reshape(*head, h.shape[lead], -1)
        return h.reshape(*head, self.groups, h.shape[lead] // self.groups, -1)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        """Unfolded, bias-augmented input :math:`\\tilde x`, (B, in', P)."""
        if self.is_conv:
            return self.conv.unfold(x, self.groups, self.has_bias)
        if x.dim() != 2:
            raise UnsupportedModelError(
                f"model: the {type(self.module).__name__} of stage {self.index} is applied "
                f"to an input of shape {tuple(x.shape)}; a Linear stage takes (batch, "
                f"in_features): positions before the features (a Linear applied token by "
                f"token) are not supported. Write it as nn.Conv1d(in, out, 1) on (batch, "
                f"features, positions), the same map at every position, or flatten the "
                f"positions into the features before the layer")
        X = x.unsqueeze(-1)
        if self.has_bias:
            X = torch.cat([X, X.new_ones(*X.shape[:-2], 1, X.shape[-1])], -2)
        return X

    def unfold_calls(self, xs: list[torch.Tensor]) -> torch.Tensor:
        """:meth:`unfold` of every call's input, the calls' positions concatenated, (B,
        in', sum P): the layout of :func:`combine_calls` (a layer called several times)."""
        return self.unfold(xs[0]) if len(xs) == 1 else torch.cat(
            [self.unfold(x) for x in xs], -1)

    # ------------------------------------------------------------- evaluation
    def affine(self, x: torch.Tensor, U: torch.Tensor | None = None,
               bias: bool = True) -> torch.Tensor:
        """:math:`h = g(x, u)` with the module's weights or the control ``U``
        (``bias=False``: the linear part only, :math:`g_x x`)."""
        if U is None:
            W, b = self.module.weight, self.module.bias
        else:
            W, *rest = self.split(U)
            b = rest[0] if rest else None
        if not bias:
            b = None
        if self.is_conv:
            g = self.conv
            return g.output(F.conv2d(g.input(x), g.weight(W), b, g.stride, g.inner,
                                     g.dilation, self.groups))
        return F.linear(x, W, b)

    def post_fn(self, h: torch.Tensor) -> torch.Tensor:
        """:math:`\\sigma(h)` (never modifies ``h``)."""
        if self._inplace:
            h = h.clone()
        for p in self.post:
            h = p(h)
        return h

    def forward(self, x: torch.Tensor, U: torch.Tensor | None = None) -> torch.Tensor:
        return self.post_fn(self.affine(x, U))


def _is_identity(p: nn.Module) -> bool:
    return isinstance(p, nn.Identity) or (isinstance(p, nn.modules.dropout._DropoutNd)
                                          and (p.p == 0 or not p.training))


def draws_random(m: nn.Module) -> str | None:
    """What ``m`` draws at random in its current mode, as errors name it (every dropout
    module -- ``nn.Dropout``, ``Dropout1d/2d/3d``, ``AlphaDropout``,
    ``FeatureAlphaDropout`` -- with p > 0, and ``RReLU``, in training mode), or None."""
    if isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0 and m.training:
        return f"{type(m).__name__}(p={m.p})"
    if isinstance(m, nn.RReLU) and m.training:
        return f"RReLU(lower={m.lower}, upper={m.upper})"
    return None


def random_function(m: nn.Module) -> str | None:
    """A function or tensor method drawing random numbers in ``m`` when it is a stage's
    segment of ``forward`` (a torch.fx graph: ``h + s * torch.randn_like(h)``), as errors
    name it, or None.  Random in every mode: a re-run of the stage draws other numbers
    than the recorded pass (refused where stages are re-run, not at construction)."""
    names = random_node_names(m.graph.nodes) if isinstance(m, fx.GraphModule) else []
    return names[0] if names else None


def _closed_form(p: nn.Module):
    """``(sigma, sigma' as a function of the output)`` for Tanh / Sigmoid / ReLU /
    LeakyReLU (never in place), or None."""
    if isinstance(p, nn.Tanh):
        return torch.tanh, lambda y: 1 - y * y
    if isinstance(p, nn.Sigmoid):
        return torch.sigmoid, lambda y: y * (1 - y)
    if isinstance(p, nn.ReLU):
        return torch.relu, lambda y: (y > 0).to(y.dtype)
    if isinstance(p, nn.LeakyReLU):
        slope = p.negative_slope
        return (lambda h: F.leaky_relu(h, slope),
                lambda y: torch.where(y > 0, 1.0, slope).to(y.dtype))
    return None


def _elementwise_derivative(post, h: torch.Tensor):
    """``(sigma(h), sigma'(h))`` in closed form for a chain of the common activations (a
    few tensor ops instead of a torch.func.jvp); None when a module has no closed form."""
    y, s = h, None
    for p in post:
        if _is_identity(p):
            continue
        form = _closed_form(p)
        if form is None:
            return None
        y = form[0](y)
        d = form[1](y)
        s = d if s is None else s * d
    return y, (torch.ones_like(h) if s is None else s)


def _derivative_from_output(post, y: torch.Tensor) -> torch.Tensor | None:
    """sigma'(h) from y = sigma(h) alone, for a single closed-form activation (or none)."""
    acts = [p for p in post if not _is_identity(p)]
    if not acts:
        return torch.ones_like(y)
    form = _closed_form(acts[0]) if len(acts) == 1 else None
    return None if form is None else form[1](y)


def _is_flatten(p: nn.Module) -> bool:
    return isinstance(p, nn.Flatten) and p.start_dim == 1 and p.end_dim == -1


def _unflatten_post(post):
    """The stage's post-activation modules without a final ``nn.Flatten()``."""
    return post[:-1] if post and _is_flatten(post[-1]) else post


def _unflattened(stage, x: torch.Tensor, U: torch.Tensor,
                 x_next: torch.Tensor) -> torch.Tensor | None:
    """The captured output ``x_next`` in the shape of the pre-activation when the stage's
    post ends with ``nn.Flatten()`` (a convolution before the classifier): sigma'(h)
    then comes from the output alone, the Flatten being a reshape; the shape from the
    layer on one sample (not for a Norm stage, whose batch statistics one sample would
    not give: None, the derivative then comes from the recomputed pre-activation)."""
    if not (stage.post and _is_flatten(stage.post[-1])):
        return x_next
    if isinstance(stage, NormStage):
        return None
    h_shape = tuple(stage.affine(x[:1], U).shape[1:])
    if math.prod(h_shape) != x_next[0].numel():
        return None
    return x_next.reshape(x_next.shape[0], *h_shape)


def _shaped(t: torch.Tensor, shape) -> torch.Tensor:
    """``t.reshape(shape)``, or ``t`` itself when it has that shape already (a reshape to
    the same shape is a view of the same numbers, but one more dispatched operation)."""
    return t if t.shape == shape else t.reshape(shape)


def combine_calls(hs: list[torch.Tensor]) -> torch.Tensor:
    """The pre-activations of a layer's calls (B, out, ...) as one (B, out, P): each
    call's positions flattened, the calls concatenated (a Linear call is one position).
    The control cotangent of the shared control is then :math:`w \\tilde x^\\top`
    with the unfolded inputs laid out alike (:meth:`nnbridge.graph.GraphStage.unfold`), as for a
    convolution's positions."""
    return torch.cat([h.reshape(h.shape[0], h.shape[1], -1) for h in hs], -1)


def outer_sum(w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """:math:`\\sum_{i,p} w_{i,\\cdot,p} X_{i,\\cdot,p}^\\top`: w (B, out, P), X (B, in', P)
    -> (out, in'); with a group dimension, (B, G, out_g, P), (B, G, in'_g, P) -> (G, out_g,
    in'_g)."""
    if X.dim() == 3:
        if X.shape[-1] == 1:
            return w[..., 0].T @ X[..., 0]
        # one (out, B P) @ (B P, in') product: faster than einsum on CPU (1.4-2.6x)
        return (w.transpose(0, 1).reshape(w.shape[1], -1)
                @ X.transpose(0, 1).reshape(X.shape[1], -1).T)
    return torch.einsum("bgop,bgip->goi", w, X)


def outer_sum_rows(w: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """:func:`outer_sum` for J cotangents: w (B, J, [G,] out, P), X (B, [G,] in', P) ->
    (J, [G,] out, in')."""
    return torch.einsum("bj...op,b...ip->j...oi", w, X)


def spread(G: torch.Tensor, X: torch.Tensor) -> torch.Tensor:
    """J shared controls on every sample's inputs: G (J, [G,] out, in'), X (B, [G,] in',
    P) -> pre-activation changes (B, J, [G,] out, P)."""
    return torch.einsum("j...oi,b...ip->bj...op", G, X)


def samplewise(key_owner, modules, fx_T, B: int, n1: int, like: torch.Tensor) -> bool:
    """Whether a stage's :math:`f_x` acts sample by sample (no batch statistics, nothing
    that mixes the samples), so that the kernel may read per-sample quantities off
    per-sample pull-backs (:class:`trajopt.riccati.operator.OperatorStep`).

    A BatchNorm among ``modules`` using batch statistics mixes the samples, whatever its
    weights (zero-initialized ones pass nothing back at first).  Otherwise one pull-back
    of a cotangent on sample 0 alone must reach sample 0 and leave every other sample
    exactly zero (a function of the batch in the stage's graph does not); that answer is
    cached on ``key_owner`` per training mode of ``modules``, and an inconclusive probe
    (nothing reaches sample 0: a dead unit) is not cached and counts as mixing."""
    if B == 1:
        return True
    if normalizes_by_batch_in(modules):
        return False
    return _probed(key_owner, "_samplewise", modules, lambda Y: [fx_T(Y)], B, n1, like)


def normalizes_by_batch(m: nn.Module | None) -> bool:
    """``m`` is a BatchNorm normalizing with the statistics of the batch (training mode,
    or no running statistics): it mixes the samples, and removes a bias added before it."""
    return isinstance(m, _BN) and (m.training or m.running_mean is None)


def normalizes_by_batch_in(modules) -> bool:
    """A BatchNorm among ``modules`` (or inside them) normalizes with the statistics of
    the batch: it mixes the samples."""
    return any(normalizes_by_batch(m) for mod in modules for m in mod.modules())


def check_rerun_deterministic(stages, who: str) -> None:
    """Refuse a stage whose ``post`` modules draw random numbers (:func:`draws_random`:
    dropout with p > 0 in training mode) for an optimizer that re-runs the stages on the
    recorded batch (``who``): its derivatives would be those of another mask than the
    recorded pass's."""
    for st in stages:
        for m in (m for post in st.post for m in post.modules()):
            what = draws_random(m)
            if what is not None:
                raise InvalidArgumentError(
                    f"stage {st.index}: {what} in training mode; {who} re-runs "
                    "the stages on the recorded batch, which would draw another mask "
                    "than the pass it recorded: use model.eval() for the dropout layers, "
                    "or a torch.optim optimizer")
            what = random_function(m)
            if what is not None:
                raise InvalidArgumentError(
                    f"stage {st.index}: {what} draws random numbers in every mode; {who} "
                    "re-runs the stages on the recorded batch, which would draw other "
                    "numbers than the pass it recorded: add the noise before the first "
                    "layer or to the batch in the training loop, or use a torch.optim "
                    "optimizer")


def check_no_frozen(stages, who: str) -> None:
    """Refuse a stage with a parameter of ``requires_grad=False`` for an optimizer whose
    direction couples every layer (``who``): a frozen layer would move with the rest."""
    for st in stages:
        names = [n for n, p in st.module.named_parameters() if not p.requires_grad]
        if names:
            raise UnsupportedModelError(
                f"stage {st.index} ({type(st.module).__name__}): {who} does not support "
                f"frozen parameters ({names} have requires_grad=False); train the others "
                "with DDPNOpt, or a torch.optim optimizer")


def check_unshared(stages) -> None:
    """Refuse two stages whose modules share a parameter tensor (tied weights: ``b.weight
    = a.weight``): each stage's control is its own, so the tensor would get the step of
    the last stage that writes it (EMSA and LQRDescent applied only the last use's
    gradient)."""
    owner: dict[int, int] = {}
    for st in stages:
        for p in st.params():
            if id(p) in owner:
                raise InvalidArgumentError(
                    f"stages {owner[id(p)]} and {st.index} share a parameter (two modules "
                    f"with one tensor, shape {tuple(p.shape)}): not supported; one module "
                    "called at several stages is (nnbridge.GTDDP, docs/ode.md)")
            owner[id(p)] = st.index


def without_gradient(stage) -> bool:
    """The stage's trainable parameters all have no gradient (``p.grad is None``) after
    the recorded backward pass: the forward pass ran the layer under ``torch.no_grad()``
    or cut the graph after it (a backbone under ``no_grad`` for linear probing).
    torch.optim skips such parameters; the DDP optimizers keep the layer too, as a frozen
    one (it carries the value through its dynamics, its control stays)."""
    params = [p for p in stage.params() if p.requires_grad]
    return bool(params) and all(p.grad is None for p in params)


def zeroed_gradient(stage) -> bool:
    """The stage's trainable parameters' gradients are all None or exactly zero: the loop
    zeroed them (``p.grad.zero_()``, a mask) to keep the layer where it is.  The DDP
    pass keeps such a layer as a frozen one: its feedback gain would act on it with the
    adaptive curvatures' rate at a zero second moment, ``lr / eps`` (a user trial: the
    layer moved 2.4 where Adam's step moves it 0).  A layer whose parameters have a
    gradient in part (``weight.grad = None``, the bias's kept) is refused before, by
    :func:`check_whole_gradients`."""
    params = [p for p in stage.params() if p.requires_grad]
    return bool(params) and all(p.grad is None or not bool(p.grad.any()) for p in params)


def check_whole_gradients(stages) -> None:
    """Refuse a stage whose parameters have a gradient in part (:func:`zeroed_gradient`);
    called before the step takes the recorded batch, so that a corrected retry finds it."""
    for stage in stages:
        params = [p for p in stage.params() if p.requires_grad]
        none = [p.grad is None for p in params]
        if any(none) and not all(none):
            names = [n for n, p in stage.module.named_parameters()
                     if p.requires_grad and p.grad is None]
            raise InvalidArgumentError(
                f"stage {stage.index} ({type(stage.module).__name__}): {names} have no "
                "gradient and its other parameters do; the DDP step moves a layer's "
                "parameters together: zero or drop all of a layer's gradients, or none, "
                "or freeze the layer with requires_grad_(False)")


def check_gradients(stages, who: str) -> None:
    """Refuse a stage without a gradient (:func:`without_gradient`) for an optimizer whose
    direction couples every layer (``who``): the layer would move with the rest."""
    for st in stages:
        if without_gradient(st):
            raise UnsupportedModelError(
                f"stage {st.index} ({type(st.module).__name__}) got no gradient from the "
                f"backward pass (run under torch.no_grad() in forward, or cut from the "
                f"loss); {who} moves every layer together: train with DDPNOpt or EMSA "
                "(which keep such a layer), or a torch.optim optimizer")


def without_bias_row(X: torch.Tensor) -> torch.Tensor:
    """A copy of the unfolded input ``X`` (..., in', P) with its bias row (the last of
    in') set to 0: the per-sample factors of a bias that a following BatchNorm removes
    (:class:`StageLinearization`'s ``cancelled_bias``)."""
    X = X.clone()
    X[..., -1, :] = 0
    return X


def controls_samplewise(key_owner, modules, pull_h, B: int, n1: int,
                        like: torch.Tensor) -> bool:
    r"""Whether the map from a stage's players' pre-activations to its output mixes no
    samples (the response :math:`f_u^i S f_u^{i\top}` is then block diagonal, also where
    :math:`f_x` is not: :attr:`nnbridge.graph_ops.GraphLinearization.response_samplewise`).

    ``pull_h(Y)`` gives the active players' pre-activation cotangents (B, J, ...) of
    output cotangents Y (B, J, n1).  One cotangent on sample 0 alone must reach sample 0
    of every active player and leave every other sample exactly zero; the answer is cached
    on ``key_owner`` per training mode of ``modules``.  An inconclusive probe (a player
    that nothing reaches on sample 0: zero weights after it, a dead unit) is not cached and
    counts as mixing, as :func:`samplewise`'s does."""
    if B == 1:
        return True
    return _probed(key_owner, "_controls_samplewise", modules, pull_h, B, n1, like)


def _probed(key_owner, name: str, modules, pull, B: int, n1: int,
            like: torch.Tensor) -> bool:
    """The probe of :func:`samplewise` / :func:`controls_samplewise`: ``pull(Y)`` (a
    list of (B, J, ...) tensors) of a cotangent Y (B, 1, n1) on sample 0 alone reaches
    sample 0 in every tensor and no other sample; cached on ``key_owner`` under ``name``
    per training mode of ``modules``, except an inconclusive answer (nothing reached
    sample 0 somewhere), which is False."""
    key = tuple(m.training for m in modules)
    cache = key_owner.__dict__.setdefault(name, {})
    if key not in cache:
        Y = torch.zeros(B, 1, n1, dtype=like.dtype, device=like.device)
        Y[0, 0] = torch.linspace(1.0, 2.0, n1, dtype=like.dtype, device=like.device)
        with torch.no_grad():
            out = pull(Y)
        if not out or not all(bool(g[0].any()) for g in out):
            return False
        cache[key] = not any(bool(g[1:].any()) for g in out)
    return cache[key]


class StageLinearization:
    """First-order operators of one stage around nominal inputs ``x`` (B, ...): implements
    :class:`trajopt.riccati.operator.OperatorStage` on flattened states.

    Attributes
    ----------
    X : (B, in', P)
        Unfolded, bias-augmented nominal input; with ``cancelled_bias`` its bias row is
        0: the stage's bias is followed by a BatchNorm normalizing with the batch's
        statistics, which removes it from every sample's output (its gradient is zero),
        so in the joint dynamics of the batch it moves nothing; the per-sample factors
        of the DDP pass then leave it out (``docs/ddpnopt.md``, "A bias before
        BatchNorm").
    h_shape : tuple
        Per-sample shape of the pre-activation.
    """

    def __init__(self, stage: Stage, x: torch.Tensor, U: torch.Tensor | None = None,
                 x_next: torch.Tensor | None = None,
                 mean: Callable[[torch.Tensor], torch.Tensor] | None = None,
                 sent: torch.Tensor | None = None,
                 carry: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
                 cancelled_bias: bool = False):
        self.stage = stage
        #: ``(K_next, K, h_grad)``: B times the gradients the next stage's module and
        #: this one's sent to their inputs, (B, n1) and (B, n), and the recorded
        #: pre-activation gradient (:meth:`carried_pullback`), or None
        self.carry = carry
        #: the recorded gradient ``(B, *h_shape)`` of the batch-mean loss at the
        #: pre-activation (the training loop's backward pass): the caller already holds
        #: the control gradient of its per-sample cotangents (B times it), and
        #: :meth:`value_gradient` leaves them out
        self.sent = sent
        self.x = x
        self.x_shape = tuple(x.shape[1:])
        self.B = x.shape[0]
        #: batch mean from a sum over the local samples (:class:`nnbridge.distributed.
        #: BatchMean` when the batch is split over ranks)
        self.mean = mean if mean is not None else self._local_mean
        self.U = stage.control() if U is None else U
        self.W = stage.split(self.U)[0]
        self._vjp = None
        self.cancelled_bias = cancelled_bias
        with torch.no_grad():
            self.X = stage.unfold(x)
            if cancelled_bias:   # a BatchNorm with batch statistics removes the bias
                self.X = without_bias_row(self.X)
            y = None if x_next is None else _unflattened(stage, x, self.U, x_next)
            s = None if y is None else _derivative_from_output(_unflatten_post(stage.post), y)
            if s is not None:  # the captured output suffices: no recomputation of h
                self.x_next, self.s, self._h = x_next, s, None
                self.h_shape = tuple(y.shape[1:])
                self.n1 = self.x_next[0].numel()
                return
            self._h = stage.affine(x, self.U)
            self.h_shape = tuple(self._h.shape[1:])
            fast = _elementwise_derivative(stage.post, self.h) if stage.elementwise else None
            if fast is not None:
                self.x_next, self.s = fast
                self._vjp = None
            elif stage.elementwise:
                ones = torch.ones_like(self.h)
                self.x_next, self.s = torch.func.jvp(stage.post_fn, (self.h,), (ones,))
                self._vjp = None
            else:
                self.x_next, self._vjp = torch.func.vjp(stage.post_fn, self.h)
                self.s = None
        self.n1 = self.x_next[0].numel()

    @property
    def _conv_input_size(self) -> tuple[int, int]:
        """Spatial size of the 2-D input the convolution sees (after explicit padding)."""
        g = self.stage.conv
        h, w = (1, self.x_shape[1]) if g.one_d else self.x_shape[1:]
        if g.pads is not None:
            h, w = h + g.pads[2] + g.pads[3], w + g.pads[0] + g.pads[1]
        return h, w

    def _local_mean(self, local_sum: torch.Tensor) -> torch.Tensor:
        return local_sum / self.B

    @property
    def h(self) -> torch.Tensor:
        """Nominal pre-activation (recomputed on first use when it was not needed)."""
        if self._h is None:
            with torch.no_grad():
                self._h = self.stage.affine(self.x, self.U)
        return self._h

    # ------------------------------------------------------------- sigma_h
    def sigma_T(self, Y: torch.Tensor) -> torch.Tensor:
        """:math:`\\sigma_h^\\top Y`, (B, J, n1) -> ``(B, J, *h_shape)``."""
        B, J = Y.shape[:2]
        if self.s is not None:
            return _shaped(Y, (B, J, *self.h_shape)) * self._s_rows
        Yt = Y.transpose(0, 1).reshape(J, B, *self.x_next.shape[1:])
        out = torch.func.vmap(self._vjp)(Yt)[0]
        return out.transpose(0, 1)

    def sigma(self, D: torch.Tensor) -> torch.Tensor:
        """:math:`\\sigma_h D`, ``(B, J, *h_shape)`` -> (B, J, n1)."""
        B, J = D.shape[:2]
        if self.s is not None:
            out = D * self._s_rows
            return out if out.dim() == 3 else out.reshape(B, J, -1)
        fn = self.stage.post_fn
        Dt = D.transpose(0, 1)
        out = torch.func.vmap(lambda d: torch.func.jvp(fn, (self.h,), (d,))[1])(Dt)
        return out.transpose(0, 1).reshape(B, J, -1)

    @functools.cached_property
    def _s_rows(self) -> torch.Tensor:
        """:math:`\\sigma'` with a row dimension, (B, 1, *h_shape)."""
        return self.s.unsqueeze(1)

    # ------------------------------------------------------------- g_x, g_u
    def _gx_T(self, Wh: torch.Tensor) -> torch.Tensor:
        """:math:`g_x^\\top w`: ``(B, J, *h_shape)`` -> (B, J, n)."""
        B, J = Wh.shape[:2]
        if isinstance(self.stage, NormStage):
            _, vjp = torch.func.vjp(lambda z: self.stage.affine(z, self.U, bias=False),
                                    self.x)
            out = torch.func.vmap(vjp, in_dims=1, out_dims=1)(Wh.reshape(B, J, *self.h_shape))
            return out[0].reshape(B, J, -1)
        flat = Wh.reshape(B * J, *self.h_shape)
        if self.stage.is_conv:
            g = self.stage.conv
            # the transposed convolution with the output padding that restores the
            # (padded) input size (CPU: 1.1-2.5x faster than torch.nn.grad.conv2d_input),
            # then the adjoint of the explicit padding
            size = self._conv_input_size
            hs = (1, *self.h_shape[1:]) if g.one_d else self.h_shape[1:]
            pad = [size[d] - ((hs[d] - 1) * g.stride[d] - 2 * g.inner[d]
                              + g.dilation[d] * (g.kernel[d] - 1) + 1) for d in range(2)]
            flat2 = flat.unsqueeze(-2) if g.one_d else flat
            out = F.conv_transpose2d(flat2, g.weight(self.W), None, g.stride, g.inner, pad,
                                     self.stage.groups, g.dilation)
            out = g.input_adjoint(out, self.x_shape)
        else:
            out = flat @ self.W
        return out.reshape(B, J, -1)

    def factors(self, Y: torch.Tensor) -> torch.Tensor:
        """Per-sample cotangent factors ``w`` (B, J, out, P) with
        :math:`f_u^{i\\top} Y^i = w^i \\tilde x^{i\\top}`."""
        return self.stage.factor_view(self.sigma_T(Y), lead=2)

    def from_h(self, D: torch.Tensor) -> torch.Tensor:
        """(B, J, out, P) h-space factors -> (B, J, n1) through :math:`\\sigma_h`."""
        B, J = D.shape[:2]
        return self.sigma(D.reshape(B, J, *self.h_shape))

    # ------------------------------------------------------------- OperatorStage
    def fx_T(self, Y: torch.Tensor) -> torch.Tensor:
        return self._gx_T(self.sigma_T(Y))

    @functools.cached_property
    def samplewise(self) -> bool:
        """:math:`f_x` acts sample by sample (:func:`samplewise`).
        Once per linearization: the step asks at its Gram downdate and its feedback."""
        return samplewise(self.stage, [self.stage.module, *self.stage.post], self.fx_T,
                          self.B, self.n1, self.x)

    @functools.cached_property
    def response_samplewise(self) -> bool:
        """:math:`f_u^i = \\sigma_h^i\\,(\\cdot\\;\\tilde x^i)` acts sample by sample: the
        response :math:`f_u^i S f_u^{i\\top}` is then block diagonal and the kernel may
        downdate from its Gram matrix in control space, also where :math:`f_x` mixes the
        samples (a normalization stage's batch statistics are part of its nominal
        :math:`\\tilde x`).  True when :attr:`samplewise`, or when the ``post`` modules
        are elementwise; a BatchNorm with batch statistics in the ``post`` mixes; other
        ``post`` modules by the probe of :func:`controls_samplewise` through
        :math:`\\sigma_h^\\top`."""
        post = self.stage.post
        if self.stage.elementwise or self.samplewise:
            return True
        if normalizes_by_batch_in(post):
            return False
        return controls_samplewise(self.stage, list(post), lambda Y: [self.sigma_T(Y)],
                                   self.B, self.n1, self.x_next)

    def carried_pullback(self, K: torch.Tensor) -> torch.Tensor | None:
        r""":math:`f_x^\top K` without a product, when ``K`` is the recorded
        :math:`K_{t+1} = B\,\nabla_{x_{t+1}}` the next stage's module sent back: then
        :math:`f_x^\top K = g_x^\top(\sigma_h^\top K)`, and autograd computed
        :math:`g_x^\top (B \nabla_h)` for this module's input (recorded, ``carry``).  The
        two are the same vector exactly when :math:`\sigma_h^\top K = B \nabla_h`
        elementwise (to 8 eps of :math:`|\sigma_h K| + |B \nabla_h| + |K|`, the last
        for the rounding of :math:`\sigma_h` itself): nothing else used :math:`h` or
        :math:`x_{t+1}` (a penalty on the activations, a second consumer would show
        there).
        None otherwise (no record, an activation without a closed-form derivative, a
        mismatch): the step then pulls the gradient back itself."""
        if self.carry is None or self.s is None or isinstance(self.stage, NormStage):
            return None
        K_next, K_own, h = self.carry
        if K is not K_next or K_own is None or h is None:
            return None
        Kh = K.reshape(self.s.shape)
        sK = Kh * self.s
        Bh = h.reshape(self.s.shape) * self.B
        if not torch.equal(sK, Bh):   # (bitwise with ReLU and a power-of-two batch)
            # sigma' itself is rounded (1 - y^2 near saturation: an absolute error of
            # ~eps, autograd's and ours in another order), hence the |K| term
            eps = torch.finfo(sK.dtype).eps
            bound = sK.abs().add_(Bh.abs()).add_(Kh.abs()).mul_(8 * eps)
            if not bool(((sK - Bh).abs_() <= bound).all()):
                return None
        return K_own

    def fx(self, dX: torch.Tensor) -> torch.Tensor:
        dx = dX.reshape(self.B, *self.x_shape)
        if isinstance(self.stage, NormStage):   # g_x of the normalization at x
            D = torch.func.jvp(lambda z: self.stage.affine(z, self.U, bias=False),
                               (self.x,), (dx,))[1]
        else:
            D = self.stage.affine(dx, self.U, bias=False)
        return self.sigma(D.unsqueeze(1)).squeeze(1)

    def _sigma_T_one(self, Y: torch.Tensor) -> torch.Tensor:
        """:meth:`sigma_T` of one row per sample, (B, n1) -> ``(B, *h_shape)``."""
        if self.s is not None:
            return _shaped(Y, self.s.shape) * self.s
        return self.sigma_T(Y.unsqueeze(1)).squeeze(1)

    def fu_T_mean(self, Y: torch.Tensor) -> torch.Tensor:
        return self.mean(self.control_gradient(self._sigma_T_one(Y)))

    def fu_T_mean_rotated(self, Y: torch.Tensor, QG: torch.Tensor, Xr: torch.Tensor
                          ) -> torch.Tensor:
        r""":math:`Q_G^\top` ``fu_T_mean(Y)`` :math:`Q_A` of a Linear stage from its
        rotated inputs ``Xr`` = :math:`x Q_A` (B, in'): the pre-activation cotangents
        rotated, :math:`(h Q_G)^\top \tilde x`, one product each (not the (out, in')
        gradient and two rotations of it)."""
        return self.mean((self._sigma_T_one(Y) @ QG).T @ Xr)

    def value_gradient(self, Vx: torch.Tensor) -> torch.Tensor:
        """``fu_T_mean(Vx)``, less the mean control gradient of :attr:`sent` (one product
        of the difference of the cotangents)."""
        if self.sent is None:
            return self.fu_T_mean(Vx)
        h = torch.sub(self._sigma_T_one(Vx), self.sent, alpha=self.B)
        return self.mean(self.control_gradient(h))

    def control_gradient(self, h_grad: torch.Tensor) -> torch.Tensor:
        r""":math:`\sum_i g^i \tilde x^{i\top}` (out, in') for pre-activation cotangents
        ``h_grad`` ``(B, *h_shape)``: the sum over the local samples of the parameter
        gradient they give (a sum, not a mean).  A convolution's is its weight gradient
        (``convolution_backward`` on the input: no unfolded input, 3-4x faster on the
        CPU than the product with it)."""
        st = self.stage
        if not st.is_conv:
            if h_grad.dim() == 2 and st.groups == 1:   # Linear: (B, out)' (B, in')
                return h_grad.T @ self.X.select(-1, 0)
            return outer_sum(st.factor_view(h_grad), self.X)
        g, W = st.conv, self.W
        gy = h_grad.unsqueeze(-2) if g.one_d else h_grad
        bias = [W.shape[0]] if st.has_bias else None
        _, gw, gb = torch.ops.aten.convolution_backward(
            gy, g.input(self.x), g.weight(W), bias, g.stride, g.inner, g.dilation, False,
            (0, 0), st.groups, (False, True, st.has_bias))
        if self.cancelled_bias:   # the bias row of X is 0 (__init__)
            gb = torch.zeros_like(gb)
        return st.join([gw, gb] if st.has_bias else [gw])

    def gu(self, G: torch.Tensor) -> torch.Tensor:
        """:math:`g_u G` for one control-shaped G (out, in') shared by the samples: the
        pre-activation change (B, out, P)."""
        X = self.X
        if X.shape[-1] == 1 and X.dim() == 3:
            return (X[..., 0] @ G.T).unsqueeze(-1)
        return G @ X     # (CPU: 2-4x faster than the convolution with G's weights)

    # ------------------------------------------------------------- dense (tests, small)
    def jacobians(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Dense per-sample Jacobians ``(fx (B, n1, n), fu (B, n1, out*in'))`` from
        torch.func (column order of ``fu`` = row-major flattening of (out, in'))."""
        st = self.stage

        def f(xi, U):
            return st.forward(xi.unsqueeze(0), U).reshape(-1)

        x = self.x
        jx, ju = torch.func.vmap(torch.func.jacrev(f, argnums=(0, 1)), in_dims=(0, None))(
            x, self.U)
        return jx.reshape(self.B, self.n1, -1), ju.reshape(self.B, self.n1, -1)


_BN = nn.modules.batchnorm._BatchNorm


def is_norm_layer(m: nn.Module) -> bool:
    """A normalization whose affine parameters are a stage: BatchNorm (not SyncBatchNorm)
    and GroupNorm with ``affine=True``, LayerNorm with ``elementwise_affine=True``."""
    return ((isinstance(m, (_BN, nn.GroupNorm)) and not isinstance(m, nn.SyncBatchNorm)
             and m.affine) or (isinstance(m, nn.LayerNorm) and m.elementwise_affine))


def is_layer(m: nn.Module) -> bool:
    """A module that is a stage: an affine layer (``AFFINE``) or a normalization's affine
    parameters (:func:`is_norm_layer`)."""
    return isinstance(m, AFFINE) or is_norm_layer(m)


def make_stage(index: int, module: nn.Module, post: tuple[nn.Module, ...]) -> Stage:
    """The :class:`Stage` of ``module`` (a :class:`NormStage` for a normalization)."""
    return (NormStage if is_norm_layer(module) else Stage)(index, module, post)


@dataclass(eq=False)
class NormStage(Stage):
    r"""The affine parameters of a BatchNorm / GroupNorm / LayerNorm as a stage:
    :math:`h = \gamma \odot n(x) + \beta` with :math:`n` the normalization.

    The control is block diagonal, one (1, 2) block :math:`[\gamma_c \mid \beta_c]` per
    channel (BatchNorm, GroupNorm) or per normalized feature (LayerNorm): ``groups`` =
    that count, the unfolded input :math:`\tilde x = [n(x); 1]` of shape (B, groups, 2,
    P), P the positions a channel is shared over (BatchNorm2d, GroupNorm on images: H W;
    LayerNorm: 1, so LayerNorm must normalize all non-batch dimensions).  :math:`n` is
    differentiated by ``torch.func`` (LayerNorm, GroupNorm: per sample; BatchNorm in
    training mode: through the statistics of the batch, which couple the samples,
    :mod:`nnbridge.batchnorm`).
    """

    def __post_init__(self):
        super().__post_init__()
        self.groups = self.module.weight.numel()

    @property
    def is_conv(self) -> bool:
        return False

    def join(self, tensors: list[torch.Tensor]) -> torch.Tensor:
        W = tensors[0].reshape(self.groups, 1, 1)
        return torch.cat([W, tensors[1].reshape(self.groups, 1, 1)], -1) \
            if self.has_bias else W

    def split(self, U: torch.Tensor) -> list[torch.Tensor]:
        out = [U[..., 0].reshape(self.module.weight.shape)]
        if self.has_bias:
            out.append(U[..., 1].reshape(self.module.bias.shape))
        return out

    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """:math:`n(x)`; BatchNorm in training mode with the statistics of ``x`` itself
        (what its forward pass used), never touching the running statistics.  That case is
        ``F.batch_norm`` without running statistics: one native operation whose backward
        is one too (also under ``vmap``), where ``x.var`` over several dimensions takes
        torch's slow CPU reduction (~0.6 ms for 128 x 16 x 8 x 8) and its decomposed
        backward a dozen elementwise operations (``docs/performance.md``, session 18)."""
        m = self.module
        if isinstance(m, nn.LayerNorm):
            if tuple(x.shape[1:]) != tuple(m.normalized_shape):
                raise UnsupportedModelError(
                    f"stage {self.index}: LayerNorm{tuple(m.normalized_shape)} on inputs of "
                    f"shape {tuple(x.shape[1:])}: as a stage it must normalize all "
                    "non-batch dimensions (positions sharing its parameters are not "
                    "supported yet)")
            return F.layer_norm(x, m.normalized_shape, None, None, m.eps)
        if isinstance(m, nn.GroupNorm):
            return F.group_norm(x, m.num_groups, None, None, m.eps)
        if m.training or m.running_mean is None:
            return F.batch_norm(x, None, None, training=True, eps=m.eps)
        mean, var = m.running_mean, m.running_var
        shape = [1, -1] + [1] * (x.ndim - 2)
        return (x - mean.reshape(shape)) / torch.sqrt(var.reshape(shape) + m.eps)

    def unfold(self, x: torch.Tensor) -> torch.Tensor:
        z = self.normalize(x).reshape(x.shape[0], self.groups, 1, -1)
        if self.has_bias:
            z = torch.cat([z, torch.ones_like(z)], -2)
        return z

    def affine(self, x: torch.Tensor, U: torch.Tensor | None = None,
               bias: bool = True) -> torch.Tensor:
        if U is None:
            g, b = self.module.weight, self.module.bias
        else:
            g, *rest = self.split(U)
            b = rest[0] if rest else None
        z = self.normalize(x)
        shape = [-1] + [1] * (x.ndim - 2) if isinstance(self.module, (_BN, nn.GroupNorm)) \
            else list(g.shape)
        out = z * g.reshape(shape)
        return out + b.reshape(shape) if (bias and b is not None) else out
