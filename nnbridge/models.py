"""The networks of the DDPNOpt paper's classification experiments (App. A.3.1), as
``nn.Sequential`` so that :func:`nnbridge.stages` decomposes them, and the small residual
network of the GT-DDP paper's experiments (its Sec. 5 / App. C.1) as a custom module that
:func:`nnbridge.graph_stages` decomposes.

The DDPNOpt paper states: 5-6 layers, hidden width 10-32 for feedforward networks, Tanh
on WINE and DIGITS (ReLU elsewhere), an identity last layer except a sigmoid on WINE, 3 x 3
convolutions for CNNs.  It does not state the exact widths, depths or the CNN layout; the
defaults of :func:`default_model` are our choices within those ranges (``docs/training.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from trajopt.errors import InvalidArgumentError

from .ode import ODEBlock

__all__ = ["ACTIVATIONS", "MODELS", "mlp", "cnn", "resnet", "BasicBlock", "ResNet",
           "ODEFunc", "ODENet", "odenet", "default_model"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "elu": nn.ELU}
MODELS = ("mlp", "cnn", "resnet", "odenet")


def _activation(name: str) -> type[nn.Module]:
    if name not in ACTIVATIONS:
        raise InvalidArgumentError(
            f"activation must be one of {', '.join(ACTIVATIONS)}; got {name!r}")
    return ACTIVATIONS[name]


def mlp(n_features: int, n_classes: int, *, hidden: int = 32, layers: int = 5,
        activation: str = "tanh", head: str | None = None) -> nn.Sequential:
    """Feedforward network of ``layers`` Linear layers, ``hidden`` units each.

    ``head="sigmoid"`` ends with a sigmoid on the logits (the paper's WINE network).
    """
    if layers < 1 or hidden < 1:
        raise InvalidArgumentError(f"layers and hidden must be >= 1; got {layers}, {hidden}")
    act = _activation(activation)
    mods: list[nn.Module] = []
    width = n_features
    for _ in range(layers - 1):
        mods += [nn.Linear(width, hidden), act()]
        width = hidden
    mods.append(nn.Linear(width, n_classes))
    if head is not None:
        mods.append(_activation(head)())
    return nn.Sequential(*mods)


def cnn(image_shape: tuple[int, ...], n_classes: int, *, channels: int = 16,
        activation: str = "relu") -> nn.Sequential:
    """Three 3 x 3 convolutions (the last two with stride 2) and two Linear layers:
    ``C -> channels -> channels -> 2 channels`` then ``-> 64 -> n_classes``; for a 1-D
    signal (``image_shape`` (C, L)) the same with Conv1d and a first kernel of 5."""
    act = _activation(activation)
    if len(image_shape) == 2:
        conv, first = nn.Conv1d, 5
    else:
        conv, first = nn.Conv2d, 3
    body = nn.Sequential(
        conv(image_shape[0], channels, first, padding=first // 2), act(),
        conv(channels, channels, 3, padding=1, stride=2), act(),
        conv(channels, 2 * channels, 3, padding=1, stride=2), act(), nn.Flatten())
    with torch.no_grad():
        flat = body(torch.zeros(1, *image_shape)).shape[1]
    return nn.Sequential(*body, nn.Linear(flat, 64), act(), nn.Linear(64, n_classes))


class BasicBlock(nn.Module):
    """conv3x3-BN-ReLU-conv3x3-BN plus the shortcut, ReLU after the sum (He et al. 2016).
    The shortcut is the identity, or a projection (1x1 convolution with the block's
    stride, then BN) where the stride or the number of channels changes."""

    def __init__(self, cin: int, cout: int, stride: int = 1, dim: int = 2):
        super().__init__()
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        self.conv1 = conv(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = norm(cout)
        self.conv2 = conv(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = norm(cout)
        self.shortcut = None
        if stride != 1 or cin != cout:
            self.shortcut = nn.Sequential(conv(cin, cout, 1, stride, bias=False), norm(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        idt = x if self.shortcut is None else self.shortcut(x)
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + idt)


class ResNet(nn.Module):
    """Stem (conv3x3-BN-ReLU), stages of :class:`BasicBlock` (stage s: ``channels * 2**s``
    channels; every stage after the first opens with a stride-2 block whose shortcut is a
    projection), global average pooling, then the fully connected head: ``Linear ->
    ReLU -> Linear`` (``hidden`` units) or one ``Linear`` (``hidden=None``)."""

    def __init__(self, image_shape: tuple[int, ...], n_classes: int, *, channels: int = 16,
                 blocks: tuple[int, ...] = (1, 1), hidden: int | None = 32):
        super().__init__()
        if len(image_shape) not in (2, 3):
            raise InvalidArgumentError(
                f"image_shape must be (C, H, W) or (C, L); got {tuple(image_shape)}")
        blocks = tuple(int(b) for b in blocks)
        if channels < 1 or not blocks or min(blocks) < 1 or (hidden is not None
                                                             and hidden < 1):
            raise InvalidArgumentError(f"channels, hidden and every entry of blocks must be "
                                       f">= 1; got {channels}, {hidden}, {blocks}")
        dim = len(image_shape) - 1
        conv = nn.Conv2d if dim == 2 else nn.Conv1d
        norm = nn.BatchNorm2d if dim == 2 else nn.BatchNorm1d
        self.image_shape = tuple(image_shape)
        self.stem = conv(image_shape[0], channels, 3, 1, 1, bias=False)
        self.bn = norm(channels)
        layers: list[nn.Module] = []
        width = channels
        for s, n in enumerate(blocks):
            out = channels * 2 ** s
            for b in range(n):
                layers.append(BasicBlock(width, out, 2 if s > 0 and b == 0 else 1, dim))
                width = out
        self.layers = nn.ModuleList(layers)
        self.pool = nn.AdaptiveAvgPool2d(1) if dim == 2 else nn.AdaptiveAvgPool1d(1)
        if hidden is None:
            self.fc, self.head = None, nn.Linear(width, n_classes)
        else:
            self.fc, self.head = nn.Linear(width, hidden), nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.bn(self.stem(x)))
        for block in self.layers:
            x = block(x)
        x = self.pool(x).flatten(1)
        if self.fc is not None:
            x = torch.relu(self.fc(x))
        return self.head(x)


def resnet(image_shape: tuple[int, ...], n_classes: int, *, channels: int = 16,
           blocks: tuple[int, ...] = (1, 1), hidden: int | None = 32) -> ResNet:
    """A small ResNet (:class:`ResNet`) for images ``(C, H, W)`` (Conv2d) or 1-D signals
    ``(C, L)`` (Conv1d).  The default: stem 1 -> 16, an identity block at 16 channels, a
    stride-2 block 16 -> 32 with a projection shortcut, average pooling, Linear 32 -> 32
    -> ReLU -> Linear 32 -> n_classes (the GT-DDP paper's layout where it states it:
    ``docs/training.md``)."""
    return ResNet(image_shape, n_classes, channels=channels, blocks=blocks, hidden=hidden)


class ODEFunc(nn.Module):
    r""":math:`f(t, x) = W_2 \tanh(W_1 [x; t] + b_1) + b_2`, time-dependent, (B, n) ->
    (B, n)."""

    def __init__(self, n: int, hidden: int):
        super().__init__()
        self.inner, self.outer = nn.Linear(n + 1, hidden), nn.Linear(hidden, n)

    def forward(self, t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        return self.outer(torch.tanh(self.inner(torch.cat([x, t.expand(x.shape[0], 1)], 1))))


class ODENet(nn.Module):
    """Linear -> Tanh -> ``blocks`` Neural-ODE blocks -> Linear: block k integrates
    :class:`ODEFunc` k (its own parameters, piecewise constant in time) over
    ``[k/blocks, (k+1)/blocks]`` with ``steps`` fixed steps of ``method``."""

    def __init__(self, n_features: int, n_classes: int, *, hidden: int = 32,
                 blocks: int = 1, steps: int = 4, method: str = "rk4"):
        super().__init__()
        if blocks < 1 or hidden < 1:
            raise InvalidArgumentError(f"blocks and hidden must be >= 1; got {blocks}, "
                                       f"{hidden}")
        self.inp = nn.Linear(n_features, hidden)
        self.blocks = nn.ModuleList([
            ODEBlock(ODEFunc(hidden, hidden), k / blocks, (k + 1) / blocks, steps=steps,
                     method=method) for k in range(blocks)])
        self.out = nn.Linear(hidden, n_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.tanh(self.inp(x.flatten(1)))
        for b in self.blocks:
            x = b(x)
        return self.out(x)


def odenet(n_features: int, n_classes: int, **kw) -> ODENet:
    """:class:`ODENet` (defaults: hidden 32, one RK4 block of 4 steps on [0, 1])."""
    return ODENet(n_features, n_classes, **kw)


def default_model(name: str, dataset) -> nn.Module:
    """The network used for ``dataset`` (a :class:`nnbridge.data.Dataset`) by the training
    command: MLP 5 Linear layers, hidden 32, Tanh on digits / wine (wine: hidden 16 and a
    sigmoid head, as in the paper), ReLU on breast_cancer / iris / mnist1d; CNN on digits
    (Conv2d) and mnist1d (Conv1d); the ResNet of :func:`resnet` (its defaults) on the
    same two; the ODE network of :func:`odenet` (its defaults) on any."""
    if name in ("cnn", "resnet"):
        if dataset.image_shape is None:
            raise InvalidArgumentError(
                f"model {name!r} needs image or signal data (digits, mnist1d); dataset "
                f"{dataset.name!r} has none")
        build = cnn if name == "cnn" else resnet
        return build(dataset.image_shape, dataset.n_classes)
    if name == "odenet":
        return odenet(dataset.n_features, dataset.n_classes)
    if name != "mlp":
        raise InvalidArgumentError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    if dataset.name == "wine":
        return mlp(dataset.n_features, dataset.n_classes, hidden=16, activation="tanh",
                   head="sigmoid")
    act = "tanh" if dataset.name == "digits" else "relu"
    return mlp(dataset.n_features, dataset.n_classes, hidden=32, activation=act)
