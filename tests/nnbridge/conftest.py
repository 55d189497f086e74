import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True)
def float64():
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    yield
    torch.set_default_dtype(old)


def mlp(seed=1, inplace=True):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 5), nn.Tanh(), nn.Linear(5, 4), nn.ReLU(inplace=inplace),
                         nn.Linear(4, 3))


def cnn(seed=1):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 2, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(2, 2, 3, stride=2), nn.Tanh(), nn.Flatten(),
                         nn.Linear(8, 3))


def grouped_cnn(seed=1):
    """A grouped (groups=2) and a depthwise convolution between ordinary layers."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(inplace=True),
                         nn.Conv2d(4, 4, 3, stride=2, groups=2), nn.Tanh(),
                         nn.Conv2d(4, 4, 1, groups=4), nn.Tanh(), nn.Flatten(),
                         nn.Linear(16, 3))


def data(B=5, shape=(4,), seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(B, *shape, generator=g), torch.randint(0, classes, (B,), generator=g)


def closure_for(opt, model, X, y):
    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(model(X), y)
        loss.backward()
        return loss
    return closure


def record_gains(monkeypatch) -> list:
    """The closed-loop gains EKFAC is handed (``EKFAC.closed_loop``), in call order."""
    from nnbridge.curvature import EKFAC
    seen = []
    closed_loop = EKFAC.closed_loop

    def record(self, st, gain):
        seen.append(gain)
        return closed_loop(self, st, gain)
    monkeypatch.setattr(EKFAC, "closed_loop", record)
    return seen


def record_open_loop_gains(monkeypatch) -> list:
    """The open-loop gains EKFAC is handed in the backward pass (``EKFAC.overshot``), in
    call order (the last stage first)."""
    from nnbridge.curvature import EKFAC
    seen = []
    overshot = EKFAC.overshot

    def record(self, before, after, gain):
        seen.append(gain)
        return overshot(self, before, after, gain)
    monkeypatch.setattr(EKFAC, "overshot", record)
    return seen
