"""A value that ``forward`` reads from Python, changed after the optimizer traced the
model (an annealed temperature): the optimizers that re-run the stages (DDPNOpt and
GT-DDP with feedback, EMSA, LQRDescent) refuse the step by name where the traced graph
no longer matches, and take the rebuilt optimizer's step where it does (a user trial,
session 30: the old trace's constant was used silently, DDPNOpt 2.8e-3 and EMSA 0.45
off a rebuilt optimizer after two more steps)."""

import warnings
from types import SimpleNamespace

import pytest
import torch
from torch import nn
from torch.nn.functional import cross_entropy

import nnbridge
from trajopt.errors import UnsupportedModelError

from .conftest import closure_for

SCALE = {"T": 1.0}   # a global read by forward ("global" below)


class Tempered(nn.Module):
    def __init__(self, kind):
        super().__init__()
        self.a, self.b = nn.Linear(4, 8), nn.Linear(8, 3)
        self.drop = nn.Dropout(0.0)
        self.counter = 0          # not read by forward
        self.kind = kind
        self.cfg = SimpleNamespace(T=1.0)
        self.opts = {"T": 1.0}
        SCALE["T"] = 1.0
        if kind == "buffer":
            self.register_buffer("T", torch.tensor(1.0))
        elif kind == "tensor":
            self.T = torch.tensor(1.0)
        else:
            self.T = 1.0

    def forward(self, x):
        T = {"namespace": lambda: self.cfg.T, "dict": lambda: self.opts["T"],
             "global": lambda: SCALE["T"]}.get(self.kind, lambda: self.T)()
        return self.b(self.drop(torch.tanh(self.a(x)) / T))


CHANGES = {
    "float": ("float", lambda m: setattr(m, "T", 0.5), True),
    "buffer replaced": ("buffer", lambda m: setattr(m, "T", torch.tensor(0.5)), True),
    "tensor replaced": ("tensor", lambda m: setattr(m, "T", torch.tensor(0.5)), True),
    "buffer in place": ("buffer", lambda m: m.T.fill_(0.5), False),
    "tensor in place": ("tensor", lambda m: m.T.fill_(0.5), False),
    "unread attribute": ("float", lambda m: setattr(m, "counter", 3), False),
    "dropout p": ("float", lambda m: setattr(m.drop, "p", 0.0 + 0.0), False),
    # read through another object: not an attribute of a module, seen by the replay of
    # the stages on the recorded inputs (StageReplay; a review's finding, session 30)
    "namespace": ("namespace", lambda m: setattr(m.cfg, "T", 0.5), "replay"),
    "dict entry": ("dict", lambda m: m.opts.__setitem__("T", 0.5), "replay"),
    "global": ("global", lambda m: SCALE.__setitem__("T", 0.5), "replay"),
    "namespace unchanged": ("namespace", lambda m: setattr(m.cfg, "T", 1.0), False),
}

OPTIMIZERS = {
    "DDPNOpt": lambda m: nnbridge.DDPNOpt(m),
    "DDPNOpt(ekfac)": lambda m: nnbridge.DDPNOpt(m, curvature="ekfac"),
    "GTDDP": lambda m: nnbridge.GTDDP(m),
    "EMSA": lambda m: nnbridge.EMSA(m),
    "LQRDescent": lambda m: nnbridge.LQRDescent(m, lr=0.1),
}


def _train(name, kind, change, rebuild):
    torch.manual_seed(0)
    model = Tempered(kind)
    opt = OPTIMIZERS[name](model)
    g = torch.Generator().manual_seed(1)
    for i in range(4):
        if i == 2:
            change(model)
            if rebuild:
                state = opt.state_dict()
                opt = OPTIMIZERS[name](model)
                opt.load_state_dict(state)
        x, y = torch.randn(16, 4, generator=g), torch.randint(0, 3, (16,), generator=g)
        opt.step(closure_for(opt, model, x, y))
    return [p.detach().clone() for p in model.parameters()]


@pytest.mark.parametrize("name", list(OPTIMIZERS))
@pytest.mark.parametrize("case", list(CHANGES))
def test_a_changed_traced_value_is_refused_or_equals_the_rebuilt_optimizer(name, case):
    kind, change, refused = CHANGES[case]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        rebuilt = _train(name, kind, change, rebuild=True)
        if refused:
            match = ("changed after the optimizer traced the model" if refused == "replay"
                     else r"model: T changed after")
            with pytest.raises(UnsupportedModelError, match=match):
                _train(name, kind, change, rebuild=False)
        else:
            kept = _train(name, kind, change, rebuild=False)
            for p, q in zip(kept, rebuilt):
                assert torch.equal(p, q)


def test_the_open_loop_optimizers_do_not_trace_again():
    """Without feedback the step is torch.optim's on p.grad: nothing of the trace is
    used, nothing refused."""
    torch.manual_seed(0)
    model = Tempered("float")
    opt = nnbridge.DDPNOpt(model, feedback=False)
    x, y = torch.randn(16, 4), torch.randint(0, 3, (16,))
    for i in range(2):
        model.T = 1.0 / (i + 1)
        opt.zero_grad()
        cross_entropy(model(x), y).backward()
        opt.step()


@pytest.mark.parametrize("name", ["DDPNOpt", "GTDDP"])
def test_a_batchnorm_unfrozen_after_the_first_step(name):
    """BatchNorm1d in eval mode at the first step, in training mode after: the replay
    no longer takes it on one sample (the session's review: 'Expected more than 1 value
    per channel when training' at the second step)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    model[1].eval()
    opt = OPTIMIZERS[name](model)
    g = torch.Generator().manual_seed(1)
    for i in range(3):
        if i == 1:
            model[1].train()
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        opt.step(closure_for(opt, model, x, y))
    assert all(torch.isfinite(p).all() for p in model.parameters())


@pytest.mark.parametrize("name", ["DDPNOpt", "GTDDP"])
def test_batchnorm_under_gradient_accumulation_is_refused_for_what_it_is(name):
    """Two forward/backward passes before a step with BatchNorm in training mode: each
    pass normalized its own micro-batch; the refusal says so (it blamed 'something the
    torch.fx graph does not show', the session's review)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 3))
    opt = OPTIMIZERS[name](model)
    g = torch.Generator().manual_seed(1)
    opt.zero_grad()
    for _ in range(2):
        x, y = torch.randn(8, 4, generator=g), torch.randint(0, 3, (8,), generator=g)
        (cross_entropy(model(x), y) / 2).backward()
    with pytest.raises(UnsupportedModelError, match="recorded in 2 forward passes"):
        opt.step()
