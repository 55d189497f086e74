"""The operator step's per-sample shortcuts (the feedback read off the pulled-back factor,
the downdate from the response's Gram matrix in control space) are exact where the stage
acts sample by sample, and are not taken where it does not (BatchNorm in training mode
couples the samples): a step with the shortcuts forced on or off, float64."""

import warnings

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import nnbridge
from nnbridge.batchnorm import batch_coupled
from nnbridge.graph_ops import GraphLinearization
from nnbridge.models import resnet
from nnbridge.stages import StageLinearization


def _trained(model_fn, opt_fn, monkeypatch, *, batch=6, steps=2, bn_train=True):
    """The parameters after ``steps`` steps (float64, seeded), then ``monkeypatch``
    undone (what the caller patched before holds during the steps)."""
    torch.manual_seed(0)
    model = model_fn().double()
    model.train(bn_train)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = opt_fn(model)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(batch, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,), generator=g)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    monkeypatch.undo()
    return torch.cat([p.detach().flatten() for p in model.parameters()])


def _step(model_fn, opt_fn, force, monkeypatch, bn_train=True):
    if force is not None:
        for cls in (StageLinearization, GraphLinearization):
            monkeypatch.setattr(cls, "samplewise", property(lambda self, f=force: f))
    return _trained(model_fn, opt_fn, monkeypatch, bn_train=bn_train)


def _cnn():
    return torch.nn.Sequential(
        torch.nn.Conv2d(1, 4, 3, padding=1), torch.nn.Tanh(),
        torch.nn.Conv2d(4, 4, 3, padding=1, stride=2, groups=2), torch.nn.ReLU(),
        torch.nn.Flatten(), torch.nn.Linear(64, 10))


OPTS = {
    "gtddp-adam-ggn": lambda m: nnbridge.GTDDP(m, lr=1e-2, curvature="adam"),
    "gtddp-ekfac": lambda m: nnbridge.GTDDP(m, lr=0.05, curvature="ekfac"),
    "ddpnopt-adam": lambda m: nnbridge.DDPNOpt(m, lr=1e-2, curvature="adam"),
    "ddpnopt-sgd-ggn": lambda m: nnbridge.DDPNOpt(m, lr=0.1, curvature="identity",
                                                  terminal_hessian="ggn"),
}


@pytest.mark.parametrize("name", sorted(OPTS))
def test_shortcuts_are_exact_on_samplewise_stages(name, monkeypatch):
    """Without batch coupling (a CNN; the ResNet with BatchNorm in eval mode) the shortcuts
    give the step of the plain path to 1e-10, and they are taken."""
    model_fn = _cnn if name.startswith("ddpnopt") else (lambda: resnet((1, 8, 8), 10))
    on = _step(model_fn, OPTS[name], True, monkeypatch, bn_train=False)
    off = _step(model_fn, OPTS[name], False, monkeypatch, bn_train=False)
    auto = _step(model_fn, OPTS[name], None, monkeypatch, bn_train=False)
    scale = off.abs().max()
    assert (on - off).abs().max() <= 1e-10 * scale
    assert (auto - on).abs().max() <= 1e-12 * scale


def test_batchnorm_in_training_mode_is_detected(monkeypatch):
    """BatchNorm in training mode couples the samples: the per-sample shortcuts would give
    another step (so forcing them on differs), and the detected path is the plain one on
    those stages.  The stages without BatchNorm (the head) still take the shortcuts, exact
    but rounded differently, so "auto" equals "off" to the 1e-10 of the test above (1.8e-12
    seen here, under 1e-12 on an earlier machine: the BLAS code path depends on the CPU),
    four orders below the 1e-6 by which forcing them on differs."""
    fn = OPTS["gtddp-adam-ggn"]
    model_fn = lambda: resnet((1, 8, 8), 10)  # noqa: E731
    on = _step(model_fn, fn, True, monkeypatch)
    off = _step(model_fn, fn, False, monkeypatch)
    auto = _step(model_fn, fn, None, monkeypatch)
    scale = off.abs().max()
    assert (on - off).abs().max() > 1e-6 * scale
    assert (auto - off).abs().max() <= 1e-10 * scale


class _Center(torch.nn.Module):
    """A parameter-free map that mixes the samples (the batch mean subtracted)."""

    def forward(self, x):
        return x - x.mean(0, keepdim=True)


@pytest.mark.parametrize("case", ["bn-zero-weight", "bn-dead-sample", "batch-function",
                                  "plain"])
def test_samplewise_detection(case):
    """BatchNorm in training mode mixes the samples whatever its weights (zero-initialized,
    or with sample 0's units dead after it: the probe alone would see nothing leak); a
    function of the batch is found by the probe; a plain stage is sample by sample.
    (BatchNorm in eval mode: the ResNet test above takes the shortcuts.)"""
    torch.manual_seed(0)
    post = {"bn-zero-weight": (torch.nn.BatchNorm1d(3), torch.nn.ReLU()),
            "bn-dead-sample": (torch.nn.BatchNorm1d(3, affine=False), torch.nn.ReLU()),
            "batch-function": (_Center(), torch.nn.Tanh()),
            "plain": (torch.nn.Tanh(),)}[case]
    model = torch.nn.Sequential(torch.nn.Linear(4, 3), *post, torch.nn.Linear(3, 2)).double()
    if case == "bn-zero-weight":
        torch.nn.init.zeros_(model[1].weight)
    _, stages = nnbridge.stages(model)
    x = torch.randn(5, 4, dtype=torch.float64)
    if case == "bn-dead-sample":
        x[0] = -100.0 * model[0].weight.detach().sum(0).sign()   # far below the others
    k = 1 if case == "bn-zero-weight" else 0      # an affine BatchNorm is its own stage
    if k:
        x = stages[0].forward(x).detach()
    with batch_coupled(list(model.modules())):   # as the optimizers run their DDP pass
        lin = StageLinearization(stages[k], x)
        assert lin.samplewise == (case == "plain")
        # the controls: an affine BatchNorm normalizes before its own control acts (its
        # statistics are part of the nominal input), a BatchNorm or a function of the
        # batch after the layer mixes what the layer's control changes
        assert lin.response_samplewise == (case in ("plain", "bn-zero-weight"))


def test_a_stage_and_response_without_the_new_methods():
    """An OperatorStage / ControlResponse written to the older protocol (fu_T_mean,
    apply_control and response_const only) gives the same step."""
    from trajopt.riccati import (
        DenseOperatorStage,
        DenseResponse,
        RankOneValue,
        operator_riccati_step,
    )
    g = torch.Generator().manual_seed(0)
    dt = torch.float64
    st = DenseOperatorStage(torch.randn(3, 4, 5, generator=g, dtype=dt),
                            torch.randn(3, 4, 2, generator=g, dtype=dt))
    P = torch.eye(2, dtype=dt) * 2
    lu = torch.randn(2, generator=g, dtype=dt)

    class Old:
        def __init__(self, s):
            self.s = s

        def fx_T(self, Y):
            return self.s.fx_T(Y)

        def fx(self, dX):
            return self.s.fx(dX)

        def fu_T_mean(self, Y):
            return self.s.fu_T_mean(Y)

    class OldResponse:
        def __init__(self, r):
            self.r = r

        def response(self, Y):
            return self.r.response(Y)

        def response_const(self):
            return self.r.response_const()

        def apply_control(self, G):
            return self.r.apply_control(G)

    value = RankOneValue(torch.randn(3, 4, generator=g, dtype=dt),
                         torch.rand(3, generator=g, dtype=dt),
                         torch.randn(3, 4, generator=g, dtype=dt))
    new = operator_riccati_step(value, st, lambda Qu, v: DenseResponse(st, P, None, lu),
                                recursion="mean")
    old = operator_riccati_step(value, Old(st),
                                lambda Qu, v: OldResponse(DenseResponse(st, P, None, lu)),
                                recursion="mean")
    torch.testing.assert_close(old.value.Vx, new.value.Vx, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(old.value.c, new.value.c, rtol=1e-12, atol=1e-12)
    dX = torch.randn(3, 5, generator=g, dtype=dt)
    torch.testing.assert_close(old.feedback(dX), new.feedback(dX), rtol=1e-12, atol=1e-12)


def _graph_lins(model):
    """The graph linearizations of one GTDDP(adam) step of ``model`` (float64, 6 samples)."""
    from nnbridge import graph_ops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        opt = nnbridge.GTDDP(model, lr=1e-2, curvature="adam")
    g = torch.Generator().manual_seed(1)
    X = torch.randn(6, 1, 8, 8, generator=g, dtype=torch.float64)
    y = torch.randint(0, 10, (6,), generator=g)
    lins, orig = [], graph_ops.GraphLinearization.__init__

    def init(self, *a, **k):
        orig(self, *a, **k)
        lins.append(self)
    graph_ops.GraphLinearization.__init__ = init
    try:
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
        opt.step()
    finally:
        graph_ops.GraphLinearization.__init__ = orig
    return lins


def test_controls_act_sample_by_sample_under_batch_statistics():
    """A BatchNorm player normalizes before its own affine map: its stage's F_y mixes the
    samples (batch statistics) but its controls act sample by sample, so the response is
    block diagonal and the Gram downdate applies; the projection stage (a convolution
    followed by BatchNorm in the same stage) mixes them in its controls too."""
    torch.manual_seed(0)
    model = resnet((1, 8, 8), 10).double()
    found = {}
    for lin in _graph_lins(model):
        kinds = "+".join(type(p.module).__name__ for p in lin.stage.players)
        if kinds in ("BatchNorm2d", "BatchNorm2d+Conv2d+BatchNorm2d"):
            found.setdefault(kinds, set()).add((lin.samplewise, lin.response_samplewise))
    assert found == {"BatchNorm2d": {(False, True)},
                     "BatchNorm2d+Conv2d+BatchNorm2d": {(False, False)}}


def test_controls_probe_inconclusive_counts_as_mixing(monkeypatch):
    """Zero BatchNorm weights after the projection's convolution pass nothing back to it:
    the probe cannot tell, counts as mixing and is not cached.  (Its gradient is zero,
    so the step keeps that convolution as frozen since session 26,
    ``nnbridge.stages.zeroed_gradient``: kept active here, where the probe is the
    subject.)"""
    import nnbridge.ddpnopt
    monkeypatch.setattr(nnbridge.ddpnopt, "zeroed_gradient", lambda st: False)
    torch.manual_seed(0)
    model = resnet((1, 8, 8), 10).double()
    bn = next(m for n, m in model.named_modules()
              if n.endswith("shortcut.1") and isinstance(m, torch.nn.BatchNorm2d))
    torch.nn.init.zeros_(bn.weight)
    lin = next(lin for lin in _graph_lins(model)
               if "Conv2d" in [type(p.module).__name__ for p in lin.stage.players]
               and len(lin.stage.players) == 3)
    assert lin.response_samplewise is False
    assert lin.stage.__dict__.get("_controls_samplewise", {}) == {}


@pytest.mark.parametrize("curvature", ["adam", "identity", "ekfac"])
def test_gram_downdate_under_batch_statistics_is_exact(curvature, monkeypatch):
    """GT-DDP on the BatchNorm ResNet in training mode: the step with the Gram downdate
    on the stages whose controls act sample by sample equals the step through the
    response mapped back to the state (forced), to 1e-10; forcing the Gram downdate on
    the mixing stage too gives another step, by over 1,000 times that rounding (the test
    can fail)."""
    from nnbridge import graph_ops

    def run(force):
        if force is not None:
            monkeypatch.setattr(graph_ops.GraphLinearization, "response_samplewise",
                                property(lambda self: force or self.samplewise))
        return _trained(lambda: resnet((1, 8, 8), 10),
                        lambda m: nnbridge.GTDDP(m, lr=0.05, curvature=curvature),
                        monkeypatch, batch=12)

    auto, off, on = run(None), run(False), run(True)
    scale = off.abs().max()
    exact = (auto - off).abs().max()
    assert exact <= 1e-10 * scale
    # the coupling's share of the mixing stage's downdate: 1e-6 relative with Adam's
    # curvature, 4e-10 with SGD's here; either is over 1,000 times the rounding above
    assert (on - off).abs().max() > 1e3 * max(float(exact), 1e-15 * float(scale))


@pytest.mark.parametrize("curvature,terminal", [("adam", "ggn"), ("identity", "ggn"),
                                                ("ekfac", "fisher")])
def test_gram_downdate_on_chain_batchnorm_stages_is_exact(curvature, terminal, monkeypatch):
    """DDPNOpt on a chain CNN with BatchNorm in training mode: its normalization stages
    take the Gram downdate (their controls act sample by sample), the same step as the
    response mapped back through the stage (forced) to 1e-12.  (The convolutions have no
    bias: a bias before BatchNorm has a zero gradient, whose rounding noise Adam scales
    to steps of 1e-11 relative that grow over the steps.)"""
    from nnbridge.curvature import NetworkResponse
    mapped = []

    def run(force):
        if force:
            monkeypatch.setattr(StageLinearization, "response_samplewise",
                                property(lambda self: self.samplewise))
        response = NetworkResponse.response
        monkeypatch.setattr(NetworkResponse, "response",
                            lambda self, Y: mapped.append(force) or response(self, Y))
        return _trained(lambda: torch.nn.Sequential(
            torch.nn.Conv2d(1, 4, 3, padding=1, bias=False), torch.nn.BatchNorm2d(4),
            torch.nn.ReLU(), torch.nn.Conv2d(4, 4, 3, padding=1, stride=2, bias=False),
            torch.nn.BatchNorm2d(4), torch.nn.Tanh(), torch.nn.Flatten(),
            torch.nn.Linear(64, 10)),
            lambda m: nnbridge.DDPNOpt(m, lr=1e-2, curvature=curvature,
                                       terminal_hessian=terminal),
            monkeypatch, batch=12, steps=3)

    auto, plain = run(False), run(True)
    assert (auto - plain).abs().max() <= 1e-12 * plain.abs().max()
    assert mapped and all(mapped)   # only the forced run maps responses back
