"""DDPNOpt against independent references: a literal dense Alg. 3, torch.optim baselines
(Prop. 2), a plain EKFAC, and one iteration of trajopt's DDP on the network as an OCP."""

import io
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as hst
from torch import nn

import nnbridge
from tests._hypothesis import examples
from tests.reference.ddpnopt_dense import ddpnopt_step
from tests.reference.ekfac_dense import ekfac_run
from trajopt import Cost, DDPSolver
from trajopt.errors import InvalidArgumentError, SkippedStepWarning, UnsupportedModelError

from .conftest import closure_for, cnn, data, grouped_cnn, mlp, record_gains, record_open_loop_gains

LRS = {"identity": 0.3, "rmsprop": 1e-2, "adam": 1e-2, "ekfac": 0.1, "exact": 1.0}


def ce_hessian(out):
    p = out.softmax(-1)
    return torch.diag_embed(p) - p.unsqueeze(-1) * p.unsqueeze(-2)


def _rel_update_error(opt, ref, U0):
    return max(float((st.control() - r).abs().max() / (r - u0).abs().max())
               for st, r, u0 in zip(opt._stages, ref, U0))


@pytest.mark.parametrize("curvature", ["identity", "rmsprop", "adam", "ekfac", "exact"])
@pytest.mark.parametrize("recursion", ["per_sample", "mean"])
@pytest.mark.parametrize("value_hessian,terminal,tikhonov,psd",
                         [("outer", "gn", 0.0, False), ("full", "gn", 0.0, False),
                          ("full", "hessian", 0.3, False), ("outer", "gn", 0.0, True),
                          ("full", "hessian", 0.3, True), ("outer", "ggn", 0.0, False),
                          ("full", "ggn", 0.3, False)])
def test_step_equals_literal_alg3(curvature, value_hessian, terminal, tikhonov, psd,
                                  recursion):
    X, y = data(B=5)
    model = mlp()
    extra = {"regularization": 2.0} if curvature == "exact" else {}
    opt = nnbridge.DDPNOpt(model, lr=LRS[curvature], curvature=curvature,
                           value_hessian=value_hessian, weight_decay=0.01, tikhonov=tikhonov,
                           terminal_hessian={"hessian": ce_hessian, "gn": "empirical",
                                             "ggn": "ggn"}[terminal],
                           value_psd=psd, value_recursion=recursion, **extra)

    def phi(xT, i):
        return -torch.log_softmax(xT, -1)[y[i]]

    ref = ddpnopt_step(opt._stages, X, phi, curvature, dict(opt.param_groups[0]),
                       terminal="hessian" if terminal == "ggn" else terminal,
                       tikhonov=tikhonov, project_psd=psd,
                       recursion=recursion)
    U0 = [st.control().clone() for st in opt._stages]
    opt.step(closure_for(opt, model, X, y))
    # relative to the size of the update; float64 round-off through 3 layers
    assert _rel_update_error(opt, ref, U0) < 1e-11
    # the feedback really changes the update (the test could fail)
    plain = nnbridge.DDPNOpt(mlp(), lr=LRS[curvature], curvature="identity", feedback=False)
    assert max(float((a.control() - b.control()).abs().max())
               for a, b in zip(opt._stages, plain._stages)) > 1e-6


@pytest.mark.parametrize("recursion", ["per_sample", "mean"])
@pytest.mark.parametrize("value_hessian,terminal,tikhonov",
                         [("outer", "gn", 0.0), ("outer", "ggn", 0.0),
                          ("full", "hessian", 0.3)])
def test_ekfac_gain_and_capped_feedback_equal_literal_alg3(monkeypatch, value_hessian,
                                                           terminal, tikhonov, recursion):
    """EKFAC watches the feedback (under the PSD projection): each stage's closed-loop
    gain rho_t = F' P^-1 F / E_i[(f_x dx^i)' V' f_x dx^i] equals the dense reference's
    (rank one, rank r (the exact GGN), dense with Tikhonov), and where it exceeds 1 (a
    rate far above EKFAC's, so that P underestimates Q_uu) the feedback term is scaled
    by 1/rho_t: the update equals the reference with that rule and differs from the
    uncapped Alg. 3.  The first step's bases are its own (not stale): no marks; the
    second step's overshooting stages are marked.  In the backward pass each stage's
    open-loop gain equals the reference's; in the second step the stages whose open-loop
    step overshot (gain > 1, through step 1's bases) renew their bases at once."""
    psd = True
    seen = record_gains(monkeypatch)
    seen_open = record_open_loop_gains(monkeypatch)
    X, y = data(B=5)
    model = mlp()
    opt = nnbridge.DDPNOpt(model, lr=10.0, curvature="ekfac", value_hessian=value_hessian,
                           weight_decay=0.01, tikhonov=tikhonov,
                           terminal_hessian={"hessian": ce_hessian, "gn": "empirical",
                                             "ggn": "ggn"}[terminal],
                           value_psd=psd, value_recursion=recursion)
    terminal = "hessian" if terminal == "ggn" else terminal

    def phi(xT, i):
        return -torch.log_softmax(xT, -1)[y[i]]

    hp = dict(opt.param_groups[0])
    gains, open_gains = [], []
    ref = ddpnopt_step(opt._stages, X, phi, "ekfac", hp, terminal=terminal,
                       tikhonov=tikhonov, project_psd=psd, recursion=recursion,
                       gains=gains, cap_gain=True, open_loop_gains=open_gains)
    uncapped = ddpnopt_step(opt._stages, X, phi, "ekfac", hp, terminal=terminal,
                            tikhonov=tikhonov, project_psd=psd, recursion=recursion)
    U0 = [st.control().clone() for st in opt._stages]
    opt.step(closure_for(opt, model, X, y))
    assert max(gains) > 1.5
    assert len(seen) == len(gains)
    for a, b in zip(seen, gains):
        assert abs(a - b) <= 1e-9 * max(1.0, b)
    assert len(seen_open) == len(open_gains) == len(opt._stages)
    for a, b in zip(seen_open, open_gains):
        assert abs(a - b) <= 1e-9 * max(1.0, b)
    assert max(open_gains) > 1       # (step 1's bases are its own: nothing renewed)
    assert _rel_update_error(opt, ref, U0) < 1e-11
    assert max(float((st.control() - r).abs().max()) for st, r in zip(opt._stages, uncapped)
               ) > 1e-6
    def marked():
        return [bool(opt.state[st.module.weight].get("stale", False))
                for st in opt._stages[1:]]
    assert not any(marked())
    seen.clear()
    seen_open.clear()
    QA1 = [opt.state[st.module.weight]["QA"] for st in opt._stages]
    opt.step(closure_for(opt, model, X, y))   # through step 1's bases: marked where > 1
    renewed = [bool(opt.state[st.module.weight]["refreshed"]) for st in opt._stages]
    assert renewed == [g > 1 for g in reversed(seen_open)]
    for st, old, new in zip(opt._stages, QA1, renewed):
        QA = opt.state[st.module.weight]["QA"]
        assert (QA is not old) == new
    # (unless the stage's open-loop step overshot first and renewed its bases)
    assert marked() == [g > 1 and not f for g, f in zip(seen, renewed[1:])]


@pytest.mark.parametrize("curvature", ["identity", "rmsprop", "adam"])
@pytest.mark.parametrize("value_hessian", ["outer", "full"])
@pytest.mark.parametrize("terminal,ref_terminal,psd", [("empirical", "gn", True),
                                                       ("ggn", "hessian", False)])
@pytest.mark.parametrize("make", [cnn, grouped_cnn], ids=["cnn", "grouped"])
def test_cnn_step_equals_literal_alg3(curvature, value_hessian, terminal, ref_terminal, psd,
                                      make):
    X, y = data(B=3, shape=(1, 5, 5))
    model = make()
    opt = nnbridge.DDPNOpt(model, lr=LRS[curvature], curvature=curvature,
                           value_hessian=value_hessian, weight_decay=0.01,
                           value_recursion="mean", terminal_hessian=terminal,
                           value_psd=psd)

    def phi(xT, i):
        return -torch.log_softmax(xT, -1)[y[i]]

    ref = ddpnopt_step(opt._stages, X, phi, curvature, dict(opt.param_groups[0]),
                       terminal=ref_terminal, project_psd=psd, recursion="mean")
    U0 = [st.control().clone() for st in opt._stages]
    opt.step(closure_for(opt, model, X, y))
    assert _rel_update_error(opt, ref, U0) < 1e-11


def test_outer_equals_full_for_rank_one_terminal_hessian():
    X, y = data(B=6)
    a = torch.randn(3)

    def factor(out):  # Hessian of phi(x) = 1/2 (a'x - y)^2 is a a'
        return a.expand(out.shape[0], 3)

    results = []
    for vh in ("outer", "full"):
        model = mlp()
        opt = nnbridge.DDPNOpt(model, lr=0.05, curvature="adam", value_hessian=vh,
                               terminal_hessian=factor, value_psd=False)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = 0.5 * ((model(X) @ a - y.double()) ** 2).mean()
            loss.backward()
            return loss
        for _ in range(3):
            opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def _baseline_pairs():
    return [
        ("identity", dict(lr=0.1, momentum=0.9, weight_decay=1e-2), torch.optim.SGD),
        ("identity", dict(lr=0.1, momentum=0.9, nesterov=True), torch.optim.SGD),
        ("identity", dict(lr=0.2), torch.optim.SGD),
        ("rmsprop", dict(lr=1e-2, centered=True, momentum=0.5, weight_decay=1e-3),
         torch.optim.RMSprop),
        ("rmsprop", dict(lr=1e-2), torch.optim.RMSprop),
        ("adam", dict(lr=1e-2, amsgrad=True, weight_decay=1e-3), torch.optim.Adam),
        ("adam", dict(lr=1e-2, betas=(0.8, 0.99)), torch.optim.Adam),
    ]


@pytest.mark.parametrize("curvature,hp,baseline", _baseline_pairs())
@pytest.mark.parametrize("model_fn,shape", [(mlp, (4,)), (cnn, (1, 5, 5))])
def test_without_feedback_equals_torch_optim(curvature, hp, baseline, model_fn, shape):
    """Prop. 2 / Table 2: with Q_ux = 0 DDPNOpt is its baseline, step for step."""
    ours, theirs = model_fn(), model_fn()
    opt = nnbridge.DDPNOpt(ours, curvature=curvature, feedback=False, **hp)
    ref = baseline(theirs.parameters(), **hp)
    for k in range(20):
        X, y = data(B=8, shape=shape, seed=k)
        opt.step(closure_for(opt, ours, X, y))
        ref.step(closure_for(ref, theirs, X, y))
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def test_ekfac_equals_plain_reference():
    model, ref_model = mlp(inplace=False), mlp(inplace=False)
    hp = dict(lr=0.05, eps=0.1, alpha=0.75, update_freq=3)
    opt = nnbridge.EKFAC(model, **hp)
    batches = [data(B=8, seed=k) for k in range(8)]
    for X, y in batches:
        opt.step(closure_for(opt, model, X, y))

    def loss_fn(out, t):
        return nn.functional.cross_entropy(out.unsqueeze(0), t.unsqueeze(0))

    ekfac_run(ref_model, batches, loss_fn, steps=len(batches), **hp)
    for p, q in zip(model.parameters(), ref_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("terminal", [{"terminal_hessian": ce_hessian}, {}],
                         ids=["explicit-hessian", "default"])
def test_full_exact_equals_one_trajopt_ddp_iteration(terminal):
    """DESIGN.md: with curvature 'exact' and B = 1 a DDPNOpt step is one iteration of
    trajopt's DDP (iLQR, same regularization, step 1) on the network written as an OCP;
    the default terminal Hessian is the loss's true one, so this holds at the defaults."""
    X, y = data(B=1)
    model = mlp(inplace=False)
    wd, mu = 0.05, 0.3
    opt = nnbridge.DDPNOpt(model, curvature="exact", value_hessian="full", weight_decay=wd,
                           regularization=mu, value_psd=False, **terminal)
    st_list = opt._stages
    shapes = [st.control().shape for st in st_list]

    def dynamics(x, u, t):
        return st_list[t].forward(x, u.reshape(shapes[t]))

    cost = Cost(running=lambda x, u, t: 0.5 * wd * (u * u).sum(-1),
                terminal=lambda x: -torch.log_softmax(x, -1)[..., int(y[0])])
    solver = DDPSolver(dynamics, cost, mode="ilqr")
    us = [st.control().reshape(1, -1).clone() for st in st_list]
    with torch.no_grad():
        traj = solver.rollout(X, us)
        derivs, Vx, Vxx = solver.derivatives(traj)
        pol = solver.backward_pass(derivs, Vx, Vxx, torch.full((1,), mu), traj)
        new = solver.forward_pass(traj, pol, 1.0)
    opt.step(closure_for(opt, model, X, y))
    for st, u_new, u_old in zip(st_list, new.us, us):
        diff = (st.control().reshape(-1) - u_new[0]).abs().max()
        assert float(diff / (u_new - u_old).abs().max()) < 1e-10


def test_state_dict_roundtrip_and_scheduler():
    X, y = data(B=8)
    model = mlp()
    opt = nnbridge.DDPNOpt(model, lr=0.01, curvature="ekfac")
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
    for _ in range(3):
        opt.step(closure_for(opt, model, X, y))
        sched.step()
    assert opt.param_groups[0]["lr"] == pytest.approx(0.01 / 8)
    buf = io.BytesIO()
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    twin = mlp(seed=7)
    twin.load_state_dict(saved["model"])
    opt2 = nnbridge.DDPNOpt(twin, lr=0.5, curvature="ekfac")
    opt2.load_state_dict(saved["opt"])
    assert opt2.param_groups[0]["lr"] == pytest.approx(0.01 / 8)
    for k in range(3):
        Xk, yk = data(B=8, seed=10 + k)
        opt.step(closure_for(opt, model, Xk, yk))
        opt2.step(closure_for(opt2, twin, Xk, yk))
    for p, q in zip(model.parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=0)


def test_nonfinite_loss_skips_step_and_keeps_state():
    X, y = data(B=8)
    model = mlp()
    opt = nnbridge.DDPNOpt(model, lr=0.01, curvature="adam")
    opt.step(closure_for(opt, model, X, y))
    before = [p.detach().clone() for p in model.parameters()]
    state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
             for k, s in opt.state.items()}
    Xbad = X.clone()
    Xbad[0, 0] = float("nan")
    with pytest.warns(SkippedStepWarning):
        opt.step(closure_for(opt, model, Xbad, y))
    for p, q in zip(model.parameters(), before):
        assert torch.equal(p, q)
    for k, s in opt.state.items():
        for n, v in s.items():
            assert (torch.equal(v, state[k][n]) if torch.is_tensor(v) else v == state[k][n])


def test_nonfinite_update_is_skipped():
    X, y = data(B=8)
    model = mlp()
    opt = nnbridge.DDPNOpt(model, lr=1e308, curvature="identity")
    before = [p.detach().clone() for p in model.parameters()]
    with pytest.warns(SkippedStepWarning):
        opt.step(closure_for(opt, model, X, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    assert not opt.state
    assert "fisher_rng" not in opt.state_dict()   # the sampled Fisher's generator too


def test_bad_input():
    with pytest.raises(TypeError, match="supported: Linear, Conv1d, Conv2d"):
        nnbridge.DDPNOpt(nn.Sequential(nn.Linear(2, 2), nn.LSTM(2, 2)))
    with pytest.raises(UnsupportedModelError, match="nothing to optimize"):
        nnbridge.DDPNOpt(nn.Sequential(nn.ReLU()))
    with pytest.raises(TypeError, match="needs the model"):
        nnbridge.DDPNOpt(mlp().parameters())
    with pytest.raises(ValueError, match="learning rate"):
        nnbridge.DDPNOpt(mlp(), lr=-1.0)
    with pytest.raises(TypeError, match="betas"):
        nnbridge.DDPNOpt(mlp(), curvature="rmsprop", betas=(0.9, 0.9))
    with pytest.raises(ValueError, match="curvature"):
        nnbridge.DDPNOpt(mlp(), curvature="lbfgs")
    opt = nnbridge.DDPNOpt(mlp())
    with pytest.raises(RuntimeError, match="no forward and backward pass"):
        opt.step()
    with pytest.raises(TypeError, match="closure"):
        opt.step(1.0)
    drop = nn.Sequential(nn.Linear(4, 4), nn.Dropout(0.5), nn.Linear(4, 3))
    opt = nnbridge.DDPNOpt(drop)
    X, y = data(B=4)
    with pytest.raises(ValueError, match="Dropout"):
        opt.step(closure_for(opt, drop, X, y))


def test_closure_returning_a_number_or_nothing_steps_like_a_tensor():
    """A closure returning ``loss.item()`` (or nothing) is an ordinary step, not a
    "non-finite loss" skip; any other return value is a TypeError naming it."""
    X, y = data(B=6)
    results = []
    for wrap in (lambda loss: loss, lambda loss: loss.item(), lambda loss: None):
        torch.manual_seed(0)
        model = mlp()
        opt = nnbridge.DDPNOpt(model, lr=0.1, curvature="identity")

        def closure(model=model, opt=opt, wrap=wrap):
            opt.zero_grad()
            loss = nn.functional.cross_entropy(model(X), y)
            loss.backward()
            return wrap(loss)

        opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for other in results[1:]:
        assert all(torch.equal(p, q) for p, q in zip(results[0], other))
    opt = nnbridge.DDPNOpt(mlp(), lr=0.1)
    with pytest.raises(TypeError, match="got str"):
        opt.step(lambda: "loss")


@pytest.mark.parametrize("curvature", ["identity", "adam", "ekfac"])
@pytest.mark.parametrize("feedback", [True, False])
def test_a_frozen_first_layer_is_data(curvature, feedback):
    """All parameters of the first layer frozen: they stay bit for bit, and the rest
    trains exactly as the sub-network on the first stage's outputs would (a stage without
    control whose state, the data, is never perturbed)."""
    X, y = data(B=6)
    full = mlp()
    for p in full[0].parameters():
        p.requires_grad_(False)
    frozen = [p.detach().clone() for p in full[0].parameters()]
    sub = mlp()
    sub = nn.Sequential(*list(sub.children())[2:])   # Linear(5, 4), ReLU, Linear(4, 3)
    with torch.no_grad():
        H = full[1](full[0](X))
    hp = dict(lr=LRS[curvature], curvature=curvature, feedback=feedback, weight_decay=0.01)
    if curvature == "identity":
        hp["momentum"] = 0.9
    a, b = nnbridge.DDPNOpt(full, **hp), nnbridge.DDPNOpt(sub, **hp)
    for _ in range(3):
        a.step(closure_for(a, full, X, y))
        b.step(closure_for(b, sub, H, y))
    assert all(torch.equal(p, q) for p, q in zip(full[0].parameters(), frozen))
    for p, q in zip(list(full.parameters())[2:], sub.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)
    assert all(full[0].weight is not k for k in a.state)


def test_a_frozen_middle_layer_stays_and_partial_freezing_is_refused():
    X, y = data(B=6)
    model = mlp()
    for p in model[2].parameters():
        p.requires_grad_(False)
    before = [p.detach().clone() for p in model.parameters()]
    opt = nnbridge.DDPNOpt(model, lr=0.01, curvature="adam")
    for _ in range(2):
        opt.step(closure_for(opt, model, X, y))
    after = list(model.parameters())
    assert torch.equal(after[2], before[2]) and torch.equal(after[3], before[3])
    assert not torch.equal(after[0], before[0]) and not torch.equal(after[4], before[4])
    model[0].bias.requires_grad_(False)
    with pytest.raises(InvalidArgumentError, match="stage 0 .* frozen in part"):
        opt.step(closure_for(opt, model, X, y))


def test_tied_weights_and_extra_parameter_groups_are_refused():
    lin = nn.Linear(4, 4)
    tied = nn.Sequential(lin, nn.Tanh(), lin, nn.Tanh(), nn.Linear(4, 3))
    with pytest.raises(UnsupportedModelError, match="called at stages 0 and 1.*GTDDP"):
        nnbridge.DDPNOpt(tied)
    for cls in (nnbridge.EMSA, nnbridge.LQRDescent):
        with pytest.raises(UnsupportedModelError, match="called at stages 0 and 1"):
            cls(tied)
    assert [gs.calls for gs in nnbridge.GTDDP(tied)._graph.stages] == [[2], [1]]

    class SharedTensor(nn.Module):     # two modules, one weight: refused by every optimizer
        def __init__(self):
            super().__init__()
            self.a, self.b, self.c = nn.Linear(4, 4), nn.Linear(4, 4), nn.Linear(4, 3)
            self.b.weight = self.a.weight

        def forward(self, x):
            return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))

    for cls in (nnbridge.DDPNOpt, nnbridge.GTDDP):
        with pytest.raises(InvalidArgumentError, match="stages 0 and 1 share a parameter"):
            cls(SharedTensor())
    opt = nnbridge.DDPNOpt(mlp(), lr=0.1)
    with pytest.raises(InvalidArgumentError, match="one parameter group"):
        opt.add_param_group({"params": [torch.zeros(2, requires_grad=True)]})
    assert len(opt.param_groups) == 1


def test_sampled_fisher_default_is_reproducible_and_resumes_exactly():
    """The default terminal Hessian of "outer" mode is the sampled Fisher, drawn from the
    optimizer's own generator: it leaves the global random stream alone, and a state_dict
    round trip in the middle of training continues exactly as an uninterrupted run."""
    X, y = data(B=6)

    def train(steps, resume_at=None):
        torch.manual_seed(7)
        model = mlp()
        opt = nnbridge.DDPNOpt(model, lr=0.05, curvature="adam")
        for i in range(steps):
            if i == resume_at:
                buf = io.BytesIO()
                torch.save(opt.state_dict(), buf)
                buf.seek(0)
                opt = nnbridge.DDPNOpt(model, lr=0.05, curvature="adam")
                opt.load_state_dict(torch.load(buf, weights_only=True))
            opt.step(closure_for(opt, model, X, y))
        return [p.detach().clone() for p in model.parameters()], torch.rand(1)

    a, ra = train(4)
    b, rb = train(4, resume_at=2)
    assert all(torch.equal(p, q) for p, q in zip(a, b))
    assert torch.equal(ra, rb)       # the global stream was not consumed differently
    torch.manual_seed(7)
    mlp()
    assert torch.equal(ra, torch.rand(1))   # ... nor at all


def test_bad_hyper_parameters_are_named():
    with pytest.raises(InvalidArgumentError, match="update_freq"):
        nnbridge.EKFAC(mlp(), update_freq=float("nan"))
    with pytest.raises(InvalidArgumentError, match="update_freq"):
        nnbridge.DDPNOpt(mlp(), curvature="ekfac", update_freq=2.5)
    with pytest.raises(InvalidArgumentError, match="neumann_terms"):
        nnbridge.LQRDescent(mlp(), neumann_terms=-1)


def test_state_dict_of_another_curvature_is_refused():
    """Adam's state loaded into an RMSprop DDPNOpt: refused at load, naming state_dict and
    the curvature (it used to fail at the next step with KeyError: 'alpha')."""
    X, y = data(B=4)
    model = mlp()
    adam = nnbridge.DDPNOpt(model, curvature="adam")
    adam.step(closure_for(adam, model, X, y))
    rms = nnbridge.DDPNOpt(mlp(), curvature="rmsprop")
    with pytest.raises(InvalidArgumentError, match="^state_dict: .*curvature 'rmsprop'"):
        rms.load_state_dict(adam.state_dict())
    twin = nnbridge.DDPNOpt(mlp(), curvature="adam")
    twin.load_state_dict(adam.state_dict())   # the same curvature loads


def test_state_dict_of_torch_adam_is_refused_at_load():
    """torch.optim.Adam's state (Adam's hyper-parameters, none of DDPNOpt's own): refused
    at load naming the missing ones (it used to load and fail at the next step with a
    bare KeyError: 'feedback')."""
    X, y = data(B=4)
    model = mlp()
    adam = torch.optim.Adam(model.parameters(), lr=5e-3)
    adam.zero_grad()
    nn.functional.cross_entropy(model(X), y).backward()
    adam.step()
    opt = nnbridge.DDPNOpt(model, curvature="adam", feedback=False)
    with pytest.raises(InvalidArgumentError, match=r"^state_dict: .*'feedback'"):
        opt.load_state_dict(adam.state_dict())


def test_data_parallel_is_refused_by_name():
    with pytest.raises(InvalidArgumentError, match="DistributedDataParallel"):
        nnbridge.DDPNOpt(nn.DataParallel(mlp()))


def test_ekfac_eigenbasis_falls_back_to_float64_then_to_a_skipped_step(monkeypatch):
    """float32 eigh that does not converge (an ill-conditioned Kronecker factor; a raw
    LinAlgError mid-training in the MNIST-1D experiment) is retried in float64; where
    that fails too, or the factor is not finite, the basis is NaN, which the step's
    non-finite check turns into a skipped step with the state intact."""
    from nnbridge.eigenbasis import eigenbasis as _eigenbasis
    M = torch.randn(5, 5, dtype=torch.float64)
    M = (M @ M.T).float()
    real = torch.linalg.eigh

    def float32_fails(A):
        if A.dtype == torch.float32:
            raise torch.linalg.LinAlgError("linalg.eigh: The algorithm failed to converge")
        return real(A)
    monkeypatch.setattr(torch.linalg, "eigh", float32_fails)
    Q = _eigenbasis(M)
    assert Q.dtype == torch.float32
    torch.testing.assert_close(Q @ Q.T, torch.eye(5, dtype=torch.float32), rtol=0, atol=1e-6)
    D = Q.T @ M @ Q
    torch.testing.assert_close(D, torch.diag(torch.diagonal(D)), rtol=0, atol=1e-4)

    def always_fails(A):
        raise torch.linalg.LinAlgError("no convergence")
    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    assert torch.isnan(_eigenbasis(M)).all()
    monkeypatch.setattr(torch.linalg, "eigh", real)
    assert torch.isnan(_eigenbasis(M * float("inf"))).all()
    # end to end: the NaN basis makes the step skip with the state intact
    model = mlp()
    opt = nnbridge.DDPNOpt(model, lr=0.1, curvature="ekfac", update_freq=1)
    X, y = data(B=6)
    opt.step(closure_for(opt, model, X, y))
    before = [p.clone() for p in model.parameters()]
    state = {k: {n: v.clone() for n, v in s.items() if torch.is_tensor(v)}
             for k, s in opt.state.items()}
    monkeypatch.setattr(torch.linalg, "eigh", always_fails)
    with pytest.warns(SkippedStepWarning, match="non-finite update"):
        opt.step(closure_for(opt, model, X, y))
    assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
    for k, s in opt.state.items():
        assert all(torch.equal(v, state[k][n]) for n, v in s.items() if torch.is_tensor(v))


@pytest.mark.parametrize("norm", [lambda: nn.LayerNorm(6), lambda: nn.GroupNorm(3, 6)])
@pytest.mark.parametrize("curvature", ["identity", "rmsprop", "adam"])
@pytest.mark.parametrize("value_hessian", ["outer", "full"])
def test_layernorm_stage_step_equals_literal_alg3(curvature, value_hessian, norm):
    """A LayerNorm's / GroupNorm's affine parameters as a stage (h = gamma n(x) + beta, n
    the exact per-sample normalization): the step equals the literal dense Alg. 3."""
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(4, 6), norm(), nn.Tanh(), nn.Linear(6, 3))
    X, y = data(B=5)
    opt = nnbridge.DDPNOpt(model, lr=LRS[curvature], curvature=curvature,
                           value_hessian=value_hessian, weight_decay=0.01,
                           value_recursion="mean", terminal_hessian="empirical",
                           value_psd=False)

    def phi(xT, i):
        return -torch.log_softmax(xT, -1)[y[i]]

    ref = ddpnopt_step(opt._stages, X, phi, curvature, dict(opt.param_groups[0]),
                       terminal="gn", recursion="mean")
    U0 = [st.control().clone() for st in opt._stages]
    opt.step(closure_for(opt, model, X, y))
    assert _rel_update_error(opt, ref, U0) < 1e-11


@pytest.mark.parametrize("cls", ["DDPNOpt", "GTDDP", "EKFAC", "LQRDescent"])
def test_a_linear_layer_applied_over_positions_is_refused_by_name(cls):
    """A Linear on (batch, positions, features) (token by token) is not a stage the
    optimizers' layouts cover: the step names the layer and the shape, before it
    changes a weight (it crashed inside an einsum before)."""
    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.Tanh(), nn.Flatten(), nn.Linear(15, 4))
    opt = getattr(nnbridge, cls)(net)
    before = [p.detach().clone() for p in net.parameters()]
    x, y = torch.randn(8, 3, 6), torch.randint(0, 4, (8,))

    def closure():
        opt.zero_grad()
        loss = nn.functional.cross_entropy(net(x), y)
        loss.backward()
        return loss
    with pytest.raises(UnsupportedModelError, match=r"Linear of stage 0 .* shape \(8, 3, 6\)"):
        opt.step(closure)
    assert all(torch.equal(a, p) for a, p in zip(before, net.parameters()))


@pytest.mark.parametrize("curvature,extra", [("ekfac", {}), ("ekfac", {"weight_decay": 0.1}),
                                             ("identity", {}), ("rmsprop", {})])
@pytest.mark.parametrize("make,shape", [(mlp, (4,)), (cnn, (1, 5, 5))])
def test_the_open_loop_step_is_taken_from_the_value_response(monkeypatch, curvature, extra,
                                                             make, shape):
    """Where the open-loop step is -P^-1 g for the g whose S g = P^-1 g the value's
    response formed (no momentum, no first moment), the feedback pass takes it from there:
    P^-1 applied T - 1 times fewer a step (once per stage past the first; EKFAC: four
    products each), and the parameters are bitwise those of the path that applies it
    again.  (EKFAC's Linear stages keep that step in the eigenbasis where it pays: that
    path is switched off here, and tested below.)"""
    from nnbridge.curvature import Curvature, Preconditioner
    monkeypatch.setattr(Preconditioner, "eigen_step_pays", lambda self, X: False)
    calls = []
    inverse = Preconditioner.inverse

    def counted(self, G):
        calls.append(1)
        return inverse(self, G)
    monkeypatch.setattr(Preconditioner, "inverse", counted)
    X, y = data(6, shape)
    params, counts = [], []
    kept = []
    feedback = nnbridge.DDPNOpt._feedback_pass

    def inspect(self, rec, out, *a):
        kept.append([r.get("g") is not None for r in out])
        return feedback(self, rec, out, *a)
    monkeypatch.setattr(nnbridge.DDPNOpt, "_feedback_pass", inspect)
    for reuse in (True, False):
        if not reuse:
            monkeypatch.setattr(Curvature, "reuses_response", lambda self, st, hp: False)
            for cls in Curvature.__subclasses__():
                monkeypatch.setattr(cls, "reuses_response", lambda self, st, hp: False,
                                    raising=False)
        model = make()
        opt = nnbridge.DDPNOpt(model, curvature=curvature, lr=0.05, **extra)
        T = len(opt._stages)
        for _ in range(2):
            calls.clear()
            opt.step(closure_for(opt, model, X, y))
        counts.append(len(calls))
        params.append([p.detach().clone() for p in model.parameters()])
    # EKFAC forms S g at the first stage too, whose value is not formed, for its
    # open-loop gain (nnbridge.feedback.open_loop_gain): the step is taken from it there
    first = int(curvature == "ekfac")
    assert counts[0] == counts[1] - (T - 1 + first)
    assert all(torch.equal(a, b) for a, b in zip(*params))
    # S g is kept in place of g (memory); without the reuse g at every stage
    assert kept[0] == [not first] + [False] * (T - 1) and kept[-1] == [True] * T


@pytest.mark.parametrize("extra", [{}, {"weight_decay": 0.1}, {"tikhonov": 1e-3},
                                   {"value_hessian": "joint"}, {"value_hessian": "full"}])
def test_ekfac_step_in_the_eigenbasis_equals_the_plain_step(monkeypatch, extra):
    """EKFAC on Linear stages narrower than the batch is wide keeps the open-loop step in
    the eigenbasis (``Preconditioner.eigen_step_pays``): ``R = (Q_G' g Q_A) * D`` from the
    value's response (whose ``g_u S g`` comes from ``x Q_A``), the feedback term from the
    rotated cotangents ``(h Q_G)' x Q_A`` (rotated itself where the step gives no
    cotangent: the joint value), one rotation back for both.  Over 3 steps the parameters
    equal the plain path's (``S g``, ``P^-1 F``) to 1e-12 (float64); the path is taken
    at every stage; without the feedback term the step differs."""
    from nnbridge import ddpnopt
    from nnbridge.curvature import Preconditioner
    X, y = data(4, (4,))   # batch 4: every stage past the first narrow enough to pay
    kept, params = [], []
    feedback = nnbridge.DDPNOpt._feedback_pass

    def inspect(self, rec, out, *a):
        kept.append(["Rg" in r for r in out])
        return feedback(self, rec, out, *a)
    monkeypatch.setattr(nnbridge.DDPNOpt, "_feedback_pass", inspect)
    pays = Preconditioner.eigen_step_pays
    rotated_feedback = ddpnopt._rotated_feedback
    for variant in ("eigen", "plain", "no feedback term"):
        monkeypatch.setattr(Preconditioner, "eigen_step_pays",
                            pays if variant != "plain" else lambda self, X: False)
        if variant == "no feedback term":
            monkeypatch.setattr(ddpnopt, "_rotated_feedback",
                                lambda step, dX, pre, curvature: (
                                    torch.zeros_like(pre.D), dX.new_zeros(dX.shape[0])))
        model = mlp()
        opt = nnbridge.DDPNOpt(model, curvature="ekfac", lr=0.05, **extra)
        T = len(opt._stages)
        kept.clear()
        for _ in range(3):
            opt.step(closure_for(opt, model, X, y))
        # (the first stage too: EKFAC forms its step there for the open-loop gain)
        assert kept[-1] == ([True] * T if variant != "plain" else [False] * T)
        params.append([p.detach().clone() for p in model.parameters()])
    monkeypatch.setattr(ddpnopt, "_rotated_feedback", rotated_feedback)
    for a, b in zip(params[0], params[1]):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    assert max(float((a - b).abs().max()) for a, b in zip(params[1], params[2])) > 1e-6


def test_ekfac_rotated_inputs_are_computed_once_a_stage(monkeypatch):
    """EKFAC's update forms ``x Q_A`` of a Linear stage for its eigenvalue estimate, and
    hands it to the stage's preconditioner, whose response and feedback pass read it
    (``Preconditioner.rotated_inputs``): one product a stage, no recomputation; the
    parameters over 3 steps are bitwise those of recomputing it."""
    from nnbridge.curvature import Preconditioner
    X, y = data(4, (4,))
    computed, params = [], []
    rotated = Preconditioner.rotated_inputs

    def counting(self, X):
        if self._xr.get("X") is not X:
            computed.append(1)
        return rotated(self, X)
    monkeypatch.setattr(Preconditioner, "rotated_inputs", counting)
    seed = Preconditioner.seed_rotated_inputs
    for variant in ("handed over", "recomputed"):
        if variant == "recomputed":
            monkeypatch.setattr(Preconditioner, "seed_rotated_inputs", lambda *a: None)
        model = mlp()
        opt = nnbridge.DDPNOpt(model, curvature="ekfac", lr=0.05)
        computed.clear()
        for _ in range(3):
            opt.step(closure_for(opt, model, X, y))
        if variant == "handed over":
            assert computed == []
        else:   # every stage that pays the eigenbasis path, every step
            assert len(computed) >= 3 * (len(opt._stages) - 1)
        params.append([p.detach().clone() for p in model.parameters()])
    monkeypatch.setattr(Preconditioner, "seed_rotated_inputs", seed)
    assert all(torch.equal(a, b) for a, b in zip(*params))


def test_the_eigenbasis_step_is_taken_where_it_pays():
    """The rule: a Linear stage (X (B, in', 1)) with an eigenbasis and a tensor D, when
    ``B (in'^2 + 2 out^2) < 2 out in' (out + in')``; not for convolutions, scalar or
    rotation-free curvatures."""
    from nnbridge.curvature import Preconditioner

    def pre(o, i, rot=True, D=True):
        Q = (torch.eye(o), torch.eye(i)) if rot else None
        return Preconditioner(D=torch.ones(o, i) if D else 0.1, rot=Q)
    assert pre(256, 257).eigen_step_pays(torch.zeros(128, 257, 1))
    assert pre(256, 257).eigen_step_pays(torch.zeros(342, 257, 1))
    assert not pre(256, 257).eigen_step_pays(torch.zeros(343, 257, 1))
    assert not pre(10, 257).eigen_step_pays(torch.zeros(128, 257, 1))     # a narrow head
    assert not pre(16, 145).eigen_step_pays(torch.zeros(8, 145, 64))      # a convolution
    assert not pre(256, 257, rot=False).eigen_step_pays(torch.zeros(8, 257, 1))
    assert not pre(256, 257, D=False).eigen_step_pays(torch.zeros(8, 257, 1))


def test_momentum_and_adam_do_not_take_the_open_loop_step_from_the_response():
    from nnbridge.curvature import CURVATURES
    assert not CURVATURES["identity"]().reuses_response({}, {"momentum": 0.9})
    assert not CURVATURES["rmsprop"]().reuses_response({}, {"momentum": 0.5})
    assert not CURVATURES["adam"]().reuses_response({}, {})
    assert CURVATURES["ekfac"]().reuses_response({}, {})


def test_large_finite_parameters_are_not_taken_for_a_non_finite_step():
    """The step's finiteness check is the largest magnitude over the new controls and
    states; it was their sum, which overflowed float32 on large finite entries (three
    of 1.5e38 in one layer) and skipped a good step."""
    import warnings
    torch.set_default_dtype(torch.float32)
    model = mlp()
    X, y = data(6, (4,))
    X = X.clamp(-1, 1) * 0.1
    with torch.no_grad():
        model[0].weight[:3, 0] = 1.5e38
    opt = nnbridge.DDPNOpt(model, curvature="identity", lr=0.01)
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings():
        warnings.simplefilter("error", SkippedStepWarning)
        opt.step(closure_for(opt, model, X, y))
    assert all(bool(torch.isfinite(p).all()) for p in model.parameters())
    assert not all(torch.equal(p, q) for p, q in zip(model.parameters(), before))


@settings(max_examples=examples(60), deadline=None)
@given(hst.lists(hst.tuples(hst.integers(0, 5), hst.sampled_from(
    [torch.float16, torch.bfloat16, torch.float32, torch.float64]),
    hst.lists(hst.sampled_from([0.0, 1.0, -2.5, 3e38, -1e300, math.inf, -math.inf, math.nan]),
             max_size=3)), min_size=1, max_size=5), hst.integers(0, 2**31 - 1))
def test_the_largest_magnitude_is_the_plain_max_abs(specs, seed):
    """The step's finiteness check (``_largest_magnitude``, one ``aminmax`` a tensor)
    against the plain ``max |x|`` over all entries in float64: equal, NaN where an entry
    is NaN, inf where one is infinite (or overflows its dtype), empty tensors skipped,
    mixed dtypes."""
    from nnbridge.ddpnopt import _largest_magnitude
    g = torch.Generator().manual_seed(seed)
    tensors = []
    for size, dtype, specials in specs:
        t = torch.randn(size, generator=g, dtype=torch.float64) * 10
        for i, v in enumerate(specials[:size]):
            t[i] = v
        tensors.append(t.to(dtype))
    flat = torch.cat([t.double().reshape(-1) for t in tensors])
    got = float(_largest_magnitude(tensors))
    if flat.numel() == 0:
        assert got == 0.0
    elif bool(flat.isnan().any()):
        assert math.isnan(got)
    else:
        assert got == float(flat.abs().max())


def test_the_largest_magnitude_without_an_aminmax_kernel(monkeypatch):
    """torch 2.1 has no CPU ``aminmax`` for float16 (a half-precision step raised): the
    check takes ``amin`` / ``amax`` there, NaN and inf kept."""
    from nnbridge.ddpnopt import _largest_magnitude

    def no_kernel(t):
        raise RuntimeError('"aminmax_cpu" not implemented for \'Half\'')
    monkeypatch.setattr(torch, "aminmax", no_kernel)
    t = torch.tensor([1.0, -7.5, 3.0], dtype=torch.float16)
    assert float(_largest_magnitude([t, torch.tensor([2.0])])) == 7.5
    assert math.isnan(float(_largest_magnitude([t, torch.tensor([math.nan])])))
    assert float(_largest_magnitude([t, torch.tensor([-math.inf])])) == math.inf


def _orthogonal(*shape, g):
    return torch.linalg.qr(torch.randn(*shape, generator=g, dtype=torch.float64))[0]


@pytest.mark.parametrize("w_shape,x_shape,rotates", [
    ((5, 9, 16, 64), (5, 145, 64), (True, True)),        # a 3x3 convolution, 16 channels
    ((5, 9, 16, 64), (5, 10, 64), (False, False)),       # a first convolution, 1 channel
    ((5, 9, 16, 1, 64), (5, 16, 2, 64), (False, False)),  # BatchNorm, 16 channels
    ((5, 3, 4, 2, 9), (5, 4, 7, 9), (True, True)),        # grouped, few positions
    ((5, 1, 16, 16), (5, 10, 16), (False, True))])         # its Gram pays, not the response
def test_ekfac_response_by_either_route_equals_the_dense_kronecker(
        monkeypatch, w_shape, x_shape, rotates):
    """An eigenbasis preconditioner (EKFAC) maps per-sample cotangents through the rotated
    factors or through per-sample gradients rotated there and back, whichever costs fewer
    multiply-adds (``Preconditioner._rotates_factors``, decided apart for the response and
    its Gram matrix); both equal the dense operator
    ``S = (Q_G kron Q_A) diag(vec D) (Q_G kron Q_A)'`` on each sample's (out x in')
    gradient ``w x'``, float64 to 1e-12."""
    from nnbridge import curvature
    g = torch.Generator().manual_seed(11)
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64)
    X = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    groups = w_shape[2:-2]                  # () or (G,)
    out, inp = w_shape[-2], x_shape[-2]
    QG, QA = _orthogonal(*groups, out, out, g=g), _orthogonal(*groups, inp, inp, g=g)
    D = torch.rand(*groups, out, inp, generator=g, dtype=torch.float64) + 0.1
    pre = curvature.Preconditioner(D=D, rot=(QG, QA))
    assert (pre._rotates_factors(w, X, back=True),
            pre._rotates_factors(w, X, back=False)) == rotates
    # the dense reference, group by group
    wg, Xg = (w, X) if groups else (w.unsqueeze(2), X.unsqueeze(1))
    QGg, QAg, Dg = (QG, QA, D) if groups else (QG[None], QA[None], D[None])
    resp, gram = torch.zeros_like(wg), torch.zeros(w.shape[:2] + w.shape[1:2],
                                                   dtype=torch.float64)
    for k in range(wg.shape[2]):
        U = torch.kron(QGg[k], QAg[k])
        S = U @ torch.diag(Dg[k].reshape(-1)) @ U.T
        G = torch.einsum("bjop,bip->bjoi", wg[:, :, k], Xg[:, k]).flatten(2)   # (B, J, o i)
        SG = (G @ S).reshape(*G.shape[:2], out, inp)     # S symmetric
        resp[:, :, k] = torch.einsum("bjoi,bip->bjop", SG, Xg[:, k])
        gram += G @ S @ G.transpose(-1, -2)
    resp = resp if groups else resp.squeeze(2)
    for forced in (None, True, False):
        if forced is not None:
            monkeypatch.setattr(curvature.Preconditioner, "_rotates_factors",
                                lambda self, w, X, back, f=forced: f)
        torch.testing.assert_close(pre.per_sample(w, X), resp, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(pre.gram(w, X), gram, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("w_shape,x_shape,gram_pays", [
    ((6, 10, 16, 1, 64), (6, 16, 2, 64), False),   # BatchNorm, 16 channels: in' = 2
    ((6, 10, 16, 64), (6, 10, 64), False),          # a first convolution, 1 channel + bias
    ((6, 10, 16, 64), (6, 145, 64), True),          # a 3x3 convolution on 16 channels
    ((6, 3, 4, 2, 9), (6, 4, 7, 9), False)])        # a grouped convolution, few positions
def test_sgd_response_by_either_route_is_the_same(monkeypatch, w_shape, x_shape, gram_pays):
    """A scalar S (SGD) maps per-sample cotangents through each sample's P x P Gram matrix
    of positions or through per-sample (out x in') gradients, whichever costs fewer
    multiply-adds (``curvature._positions_gram_pays``); both routes give the same response
    and response Gram (float64, 1e-12)."""
    from nnbridge import curvature
    g = torch.Generator().manual_seed(7)
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64)
    X = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    pre = curvature.Preconditioner(D=0.3)
    real = curvature._positions_gram_pays
    assert real(w, X) == gram_pays
    a, ga = pre.per_sample(w, X), pre.gram(w, X)
    monkeypatch.setattr(curvature, "_positions_gram_pays", lambda w, X: not real(w, X))
    b, gb = pre.per_sample(w, X), pre.gram(w, X)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(ga, gb, rtol=1e-12, atol=1e-10)


@pytest.mark.parametrize("w_shape,x_shape", [
    ((6, 10, 16, 64), (6, 145, 64)),                # a 3x3 convolution on 16 channels
    ((6, 3, 4, 2, 9), (6, 4, 7, 9))])               # a grouped convolution
@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_diagonal_response_gram_against_the_per_sample_gradients(w_shape, x_shape, sign):
    """A diagonal S = D (Adam, RMSprop): the response Gram <G_j, D G_k> of the per-sample
    gradients G, taken as <G_j sqrt D, G_k sqrt D> in place where D >= 0 and as before
    otherwise, against the plain sum (float64, 1e-12); the inputs are not written."""
    from nnbridge import curvature
    g = torch.Generator().manual_seed(3)
    w = torch.randn(*w_shape, generator=g, dtype=torch.float64)
    X = torch.randn(*x_shape, generator=g, dtype=torch.float64)
    D = sign * (torch.rand(*w_shape[2:-2], w_shape[-2], x_shape[-2], generator=g,
                           dtype=torch.float64) + 0.1)
    w0, X0 = w.clone(), X.clone()
    got = curvature.Preconditioner(D=D).gram(w, X)
    G = torch.einsum("bj...op,b...ip->bj...oi", w, X).flatten(2)
    want = torch.einsum("bjm,m,bkm->bjk", G, D.reshape(-1), G)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-10)
    assert torch.equal(w, w0) and torch.equal(X, X0)


def test_exact_curvature_refuses_a_non_linear_stage_at_construction():
    """A LayerNorm stage under curvature='exact': refused when the optimizer is built,
    naming the stage's module (it used to fail at the first step, blaming a Conv2d)."""
    model = nn.Sequential(nn.Linear(8, 16), nn.LayerNorm(16), nn.Tanh(), nn.Linear(16, 3))
    with pytest.raises(InvalidArgumentError, match="stage 1 is a LayerNorm"):
        nnbridge.DDPNOpt(model, curvature="exact")
    nnbridge.DDPNOpt(nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 3)),
                     curvature="exact")


def test_the_loss_checks_name_the_usual_causes():
    """PyTorch's MNIST example (log_softmax + nll_loss) was told to pass loss='mse', which
    then ran with the wrong terminal Hessian; a mean scaled by 2 (a loss weight,
    distillation's T^2) was asked whether it was summed.  The messages name them."""
    import torch.nn.functional as F  # noqa: N812

    class LogProbs(nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.a, self.b = nn.Linear(4, 6), nn.Linear(6, 3)

        def forward(self, x):
            return F.log_softmax(self.b(torch.tanh(self.a(x))), 1)
    X, y = data(B=8)
    for make, loss_fn, match in ((LogProbs, lambda o: F.nll_loss(o, y),
                                  "log_softmax.*F.cross_entropy"),
                                 (mlp, lambda o: 2.0 * F.cross_entropy(o, y),
                                  "scaled by a factor")):
        model = make()
        opt = nnbridge.DDPNOpt(model)
        before = [p.detach().clone() for p in model.parameters()]
        loss_fn(model(X)).backward()
        with pytest.raises(InvalidArgumentError, match=match):
            opt.step()
        assert all(torch.equal(p, q) for p, q in zip(model.parameters(), before))
