"""The networks of the DDPNOpt paper's classification experiments (App. A.3.1), as
``nn.Sequential`` so that :func:`nnbridge.stages` decomposes them.

The paper states: 5-6 layers, hidden width 10-32 for feedforward networks, Tanh on WINE
and DIGITS (ReLU elsewhere), an identity last layer except a sigmoid on WINE, 3 x 3
convolutions for CNNs.  It does not state the exact widths, depths or the CNN layout; the
defaults of :func:`default_model` are our choices within those ranges (``docs/training.md``).
"""

from __future__ import annotations

import torch
from torch import nn

from trajopt.errors import InvalidArgumentError

__all__ = ["ACTIVATIONS", "MODELS", "mlp", "cnn", "default_model"]

ACTIVATIONS = {"tanh": nn.Tanh, "relu": nn.ReLU, "sigmoid": nn.Sigmoid, "elu": nn.ELU}
MODELS = ("mlp", "cnn")


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


def default_model(name: str, dataset) -> nn.Sequential:
    """The network used for ``dataset`` (a :class:`nnbridge.data.Dataset`) by the training
    command: MLP 5 Linear layers, hidden 32, Tanh on digits / wine (wine: hidden 16 and a
    sigmoid head, as in the paper), ReLU on breast_cancer / iris / mnist1d; CNN on digits
    (Conv2d) and mnist1d (Conv1d)."""
    if name == "cnn":
        if dataset.image_shape is None:
            raise InvalidArgumentError(
                f"model 'cnn' needs image or signal data (digits, mnist1d); dataset "
                f"{dataset.name!r} has none")
        return cnn(dataset.image_shape, dataset.n_classes)
    if name != "mlp":
        raise InvalidArgumentError(f"model must be one of {', '.join(MODELS)}; got {name!r}")
    if dataset.name == "wine":
        return mlp(dataset.n_features, dataset.n_classes, hidden=16, activation="tanh",
                   head="sigmoid")
    act = "tanh" if dataset.name == "digits" else "relu"
    return mlp(dataset.n_features, dataset.n_classes, hidden=32, activation=act)
