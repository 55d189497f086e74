"""GT-DDP on residual and branching networks: the stage graph, and the optimizer against
DDPNOpt (chains), the torch.optim baselines (no feedback), trajopt's span-aware
GTDDPSolver and plain DDP on the explicitly augmented state (GT-DDP Eq. 26)."""

import contextlib

import pytest
import torch
import torch.nn.functional as F  # noqa: N812
from torch import nn

import nnbridge
from nnbridge.curvature import EKFAC
from tests.nnbridge.conftest import closure_for, data, mlp, record_gains, record_open_loop_gains
from tests.reference.span_augmented import augmented_problem
from trajopt import Cost, DDPSolver, GTDDPSolver, Span
from trajopt.errors import UnsupportedModelError


class Block(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.down = None
        if stride != 1 or cin != cout:
            self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False),
                                      nn.BatchNorm2d(cout))

    def forward(self, x):
        idt = x if self.down is None else self.down(x)
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + idt)


class ResNet(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.b1 = Block(4, 4)
        self.b2 = Block(4, 6, stride=2)
        self.head = nn.Linear(6, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        x = self.b2(self.b1(x))
        return self.head(F.adaptive_avg_pool2d(x, 1).flatten(1))


class ResMLP(nn.Module):
    """x1 = tanh(L0 x0); x2 = tanh(L1 x1); x3 = tanh(L2 x2) + x1; out = L3 x3 + P x2:
    an identity span (1, 2) and a parametrized shortcut span (2, 3) with player P."""

    def __init__(self, seed=0, d=4, n_in=3):
        super().__init__()
        torch.manual_seed(seed)
        self.l0, self.l1, self.l2 = nn.Linear(n_in, d), nn.Linear(d, d), nn.Linear(d, d)
        self.l3, self.p = nn.Linear(d, 3), nn.Linear(d, 3)

    def forward(self, x):
        x1 = torch.tanh(self.l0(x))
        x2 = torch.tanh(self.l1(x1))
        x3 = torch.tanh(self.l2(x2)) + x1
        return self.l3(x3) + self.p(x2)


class Inception(nn.Module):
    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.stem = nn.Conv2d(1, 3, 3, padding=1)
        self.a = nn.Conv2d(3, 2, 1)
        self.b1, self.b2 = nn.Conv2d(3, 2, 1), nn.Conv2d(2, 2, 3, padding=1)
        self.c = nn.Conv2d(3, 2, 1)
        self.fc = nn.Linear(6 * 16, 3)

    def forward(self, x):
        x = F.relu(self.stem(x))
        y = torch.cat([F.relu(self.a(x)), F.relu(self.b2(F.relu(self.b1(x)))),
                       F.relu(self.c(F.max_pool2d(x, 3, 1, 1)))], 1)
        return self.fc(y.flatten(1))


class PreAct(nn.Module):
    def __init__(self, seed=0, d=5):
        super().__init__()
        torch.manual_seed(seed)
        self.inp, self.out = nn.Linear(4, d), nn.Linear(d, 3)
        self.n1, self.f1 = nn.LayerNorm(d), nn.Linear(d, d)
        self.n2, self.f2 = nn.LayerNorm(d), nn.Linear(d, d)

    def forward(self, x):
        x = self.inp(x)
        x = x + self.f1(torch.relu(self.n1(x)))
        x = x + self.f2(torch.relu(self.n2(x)))
        return self.out(x)


# ------------------------------------------------------------------ decomposition
@pytest.mark.parametrize("make,shape,players,residuals", [
    # BatchNorm / LayerNorm affine parameters are stages too; the projection's conv and
    # BN are players of the block's last stage (its bn2)
    (ResNet, (3, 1, 4, 4), [1, 1, 1, 1, 1, 1, 1, 1, 3, 1], [0, 0, 1, 1, 1, 0, 1, 1, 1, 0]),
    (ResMLP, (3, 3), [1, 1, 1, 2], [0, 0, 1, 1]),
    (Inception, (2, 1, 4, 4), [1, 1, 3, 1], [0, 0, 1, 0]),
    (PreAct, (3, 4), [1, 1, 1, 1, 1, 1], [0, 0, 1, 0, 1, 0]),
], ids=["resnet-bn-projection", "custom-mlp", "inception", "pre-activation"])
def test_stage_graph_reproduces_the_model(make, shape, players, residuals):
    model = make()
    model.train()
    g = nnbridge.graph_stages(model)
    assert [len(s.players) for s in g.stages] == players
    assert [len(s.inputs) - 1 for s in g.stages] == residuals
    x = torch.randn(*shape)
    bn = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    with torch.no_grad():
        want = model(x)
        for m in bn:   # the second pass updates them again: compare in eval mode too
            m.eval()
        want_eval = model(x)
        got_eval = g(x)
        for m in bn:
            m.train()
        got = g(x)
    # normalizations are evaluated by hand (their per-sample derivative): rounding only
    torch.testing.assert_close(got_eval, want_eval, rtol=1e-13, atol=1e-14)
    torch.testing.assert_close(got, want, rtol=1e-13, atol=1e-14)


def test_identity_span_opens_and_merges_where_the_residual_is_used():
    g = nnbridge.graph_stages(ResMLP())
    assert g.stages[1].opens == ["tanh"] and g.stages[2].merges == ["tanh"]
    assert g.stages[2].opens == ["tanh_1"] and g.stages[3].merges == ["tanh_1"]
    assert [type(p.module) for p in g.stages[3].players] == [nn.Linear, nn.Linear]
    assert g.stages[3].players[1].module is g.stages[3].players[1].module


def test_unsupported_graphs_are_refused_with_the_node_named():
    class RawSkip(nn.Module):
        """A skip from the raw input past a parametrized input transform."""

        def __init__(self):
            super().__init__()
            self.act = nn.PReLU()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)

        def forward(self, x):
            return self.b(torch.tanh(self.a(self.act(x)))) + x

    class TiedNorm(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
            self.norm = nn.LayerNorm(4)

        def forward(self, x):
            return self.b(self.norm(torch.tanh(self.a(self.norm(x)))))

    with pytest.raises(UnsupportedModelError, match="'x'.*input transform"):
        nnbridge.graph_stages(RawSkip())
    with pytest.raises(UnsupportedModelError, match="'norm' is called 2 times"):
        nnbridge.graph_stages(TiedNorm())
    with pytest.raises(UnsupportedModelError, match="nnbridge.GTDDP"):
        nnbridge.DDPNOpt(ResMLP())


# ------------------------------------------------------------------ optimizer
def _run(model, opt, batches, loss=F.cross_entropy):
    for X, y in batches:
        def closure(X=X, y=y):
            opt.zero_grad()
            out = loss(model(X), y)
            out.backward()
            return out
        opt.step(closure)


@pytest.mark.parametrize("curvature,value_hessian,terminal", [
    ("identity", "outer", "fisher"), ("rmsprop", "outer", "ggn"), ("adam", "full", "ggn"),
    ("ekfac", "outer", "fisher"), ("exact", "full", "ggn"), ("adam", "joint", "ggn")])
def test_on_a_chain_gtddp_is_ddpnopt_step_for_step(curvature, value_hessian, terminal):
    """With the same terminal Hessian (their defaults differ in "outer" mode: GTDDP's is
    "ggn", DDPNOpt's "fisher")."""
    kw = dict(curvature=curvature, value_hessian=value_hessian, terminal_hessian=terminal)
    if curvature == "exact":
        kw["regularization"] = 2.0
    a, b = mlp(), mlp()
    oa, ob = nnbridge.DDPNOpt(a, **kw), nnbridge.GTDDP(b, **kw)
    batches = [data(B=6, seed=s) for s in range(5)]
    _run(a, oa, batches)
    _run(b, ob, batches)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-13)


def test_on_a_chain_gtddp_caps_and_marks_the_ekfac_feedback_as_ddpnopt(monkeypatch):
    """EKFAC's closed-loop rule (docs/ddpnopt.md, "EKFAC's eigenbasis under feedback") at
    a rate where it acts: GT-DDP's feedback pass measures the same gains as DDPNOpt's,
    scales and marks the same stages, and takes the same steps; its backward pass the
    same open-loop gains, renewing the same stages' bases."""
    seen = record_gains(monkeypatch)
    seen_open = record_open_loop_gains(monkeypatch)
    stale_updates = []
    update = EKFAC.update

    def counted(self, st, *a, **k):
        stale_updates.append(bool(st.get("stale")) and "refreshed" in st)
        return update(self, st, *a, **k)
    monkeypatch.setattr(EKFAC, "update", counted)
    batches = [data(B=6, seed=s) for s in range(4)]
    runs = []
    for cls in (nnbridge.DDPNOpt, nnbridge.GTDDP):
        seen.clear()
        seen_open.clear()
        stale_updates.clear()
        model = mlp()
        opt = cls(model, curvature="ekfac", lr=10.0, terminal_hessian="ggn")
        _run(model, opt, batches)
        runs.append((list(model.parameters()), list(seen),
                     [bool(opt.state[p].get("stale")) for p in opt.state], list(seen_open),
                     list(stale_updates)))
    (pa, ga, ma, oa, ra), (pb, gb, mb, ob, rb) = runs
    assert max(ga) > 1 and len(ga) == len(gb)
    for a, b in zip(ga, gb):
        assert abs(a - b) <= 1e-10 * max(1.0, a)
    assert ma == mb
    assert max(oa) > 1 and len(oa) == len(ob)
    for a, b in zip(oa, ob):
        assert abs(a - b) <= 1e-10 * max(1.0, a)
    assert ra == rb and any(ra)
    # 1e-10, not the 1e-12 of the test above: steps ~100x larger at this rate carry the
    # two implementations' different rounding (observed 7e-12)
    for p, q in zip(pa, pb):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("name,ours,theirs", [
    ("sgd", dict(curvature="identity", lr=0.05, momentum=0.9, weight_decay=1e-3),
     lambda ps: torch.optim.SGD(ps, lr=0.05, momentum=0.9, weight_decay=1e-3)),
    ("adam", dict(curvature="adam", lr=1e-2),
     lambda ps: torch.optim.Adam(ps, lr=1e-2)),
    ("rmsprop", dict(curvature="rmsprop", lr=1e-3),
     lambda ps: torch.optim.RMSprop(ps, lr=1e-3)),
])
def test_without_feedback_it_is_the_baseline_on_a_resnet(name, ours, theirs):
    """20 steps on the BatchNorm ResNet with projection shortcuts (BN affine parameters
    are stages too)."""
    a, b = ResNet(), ResNet()
    oa = nnbridge.GTDDP(a, feedback=False, **ours)
    ob = theirs(b.parameters())
    batches = [data(B=4, shape=(1, 4, 4), seed=s) for s in range(20)]
    _run(a, oa, batches)
    _run(b, ob, batches)
    for p, q in zip(a.parameters(), b.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-12, atol=1e-12)


def _as_ocp(opt, wd, target):
    """The network of ResMLP as an OCP with spans: stage dynamics without the merges,
    Span(1, 2) identity, Span(2, 3) with P's parameters as the shortcut's."""
    heads = opt._stages            # main chain l0..l3, then the player p
    shapes = [st.control().shape for st in heads]
    acts = [torch.tanh, torch.tanh, torch.tanh, lambda h: h]

    def dynamics(x, u, t):
        return acts[t](heads[t].affine(x, u.reshape(shapes[t])))

    def shortcut(r, v):
        return heads[4].affine(r, v.reshape(shapes[4]))

    spans = [Span(1, 2), Span(2, 3, shortcut=shortcut, n_params=shapes[4].numel())]
    cost = Cost(running=lambda x, u, t: 0.5 * wd * (u * u).sum(-1),
                terminal=lambda x: -torch.log_softmax(x, -1)[..., target])
    us = [st.control().reshape(1, -1).clone() for st in heads[:4]]
    us[3] = torch.cat([us[3], heads[4].control().reshape(1, -1)], -1)
    return dynamics, cost, spans, us, shapes


def _one_iteration(solver, X, us, mu):
    with torch.no_grad():
        solver.structure.setup(us)
        traj = solver.rollout(X, us)
        derivs, Vx, Vxx = solver.derivatives(traj)
        pol = solver.backward_pass(derivs, Vx, Vxx, torch.full((1,), mu), traj)
        return solver.forward_pass(traj, pol, 1.0).us


def test_exact_step_equals_span_ddp_and_augmented_ddp():
    """GT-DDP Eq. 9-15 / 26: with the exact curvature and B = 1, one GTDDP step on the
    residual MLP is one iteration of trajopt's GTDDPSolver on the network written with
    spans, and of plain DDP on the explicitly augmented state [x_t, x_r]."""
    X, y = data(B=1, shape=(3,))
    model = ResMLP()
    wd, mu = 0.05, 0.3
    opt = nnbridge.GTDDP(model, curvature="exact", value_hessian="full", weight_decay=wd,
                         regularization=mu, value_psd=False)
    dynamics, cost, spans, us, shapes = _as_ocp(opt, wd, int(y[0]))
    new_span = _one_iteration(GTDDPSolver(dynamics, cost, spans=spans), X, us, mu)
    dims = [3, 4, 4, 4, 3]
    F_aug, C_aug = augmented_problem(dynamics, cost, spans, dims, [s.numel() for s in shapes[:4]])
    x_aug = X
    new_aug = _one_iteration(DDPSolver(F_aug, C_aug, mode="ilqr"), x_aug, us, mu)
    opt.step(closure_for(opt, model, X, y))
    got = [st.control().reshape(-1) for st in opt._stages[:4]]
    got[3] = torch.cat([got[3], opt._stages[4].control().reshape(-1)])
    for g, a, b, u0 in zip(got, new_span, new_aug, us):
        scale = float((a - u0).abs().max())
        assert float((g - a[0]).abs().max()) < 1e-10 * scale
        assert float((g - b[0]).abs().max()) < 1e-10 * scale


def test_residual_feedback_changes_the_step():
    """The residual blocks matter: on the residual MLP, the step with feedback differs
    from the open-loop one, and from what it would be if the residual deviations were
    dropped (checked by zeroing the feedback's residual columns)."""
    X, y = data(B=6, shape=(3,))
    a, b = ResMLP(), ResMLP()
    oa = nnbridge.GTDDP(a, curvature="adam", lr=1e-2)
    ob = nnbridge.GTDDP(b, curvature="adam", lr=1e-2, feedback=False)
    for _ in range(3):
        oa.step(closure_for(oa, a, X, y))
        ob.step(closure_for(ob, b, X, y))
    diff = max(float((p - q).abs().max()) for p, q in zip(a.parameters(), b.parameters()))
    assert diff > 1e-6


def test_trains_a_batchnorm_resnet():
    """Digits-like task on the BN ResNet: the loss falls with every curvature, the BN
    running statistics are updated once per forward pass (not by the DDP pass)."""
    torch.manual_seed(0)
    X = torch.randn(32, 1, 4, 4)
    y = (X.mean((1, 2, 3)) > 0).long() + (X[:, 0, 0, 0] > 0).long()
    for curvature, lr in [("adam", 1e-2), ("identity", 0.1), ("ekfac", 0.05)]:
        model = ResNet()
        opt = nnbridge.GTDDP(model, curvature=curvature, lr=lr)
        first = None
        for _ in range(15):
            loss = float(opt.step(closure_for(opt, model, X, y)))
            first = loss if first is None else first
        tracked = model.b1.bn1.num_batches_tracked
        assert int(tracked) == 15
        assert loss < 0.8 * first, (curvature, first, loss)


@pytest.mark.parametrize("alignment", ["merge", "split"])
def test_trains_an_inception_block(alignment):
    """Three parallel branches (one of two layers, one behind a max-pool) merged by
    concatenation, as players of one stage (merge) or of the branches' first stage
    (split): the loss falls with adam, identity and ekfac (cooperative factors where
    the players share positions)."""
    torch.manual_seed(0)
    X = torch.randn(32, 1, 4, 4)
    y = (X.mean((1, 2, 3)) > 0).long() + (X[:, 0, 0, 0] > 0).long()
    for curvature, lr in [("adam", 1e-2), ("identity", 0.5), ("ekfac", 0.05)]:
        model = Inception()
        opt = nnbridge.GTDDP(model, curvature=curvature, lr=lr, alignment=alignment)
        losses = [float(opt.step(closure_for(opt, model, X, y))) for _ in range(15)]
        assert losses[-1] < 0.8 * losses[0], (curvature, losses)


def test_default_terminal_hessians():
    """GTDDP: the exact GGN in every value form (measured on the BN ResNet: the sampled
    Fisher collapsed GT-DDP runs, docs/experiments_gtddp.md); DDPNOpt: the sampled Fisher
    in "outer" mode (measured on MLPs, docs/ddpnopt.md), the GGN otherwise."""
    for vh in ("outer", "full", "joint"):
        assert nnbridge.GTDDP(ResMLP(), value_hessian=vh).terminal_hessian == "ggn"
        assert nnbridge.DDPNOpt(mlp(), value_hessian=vh).terminal_hessian == (
            "fisher" if vh == "outer" else "ggn")


@pytest.mark.parametrize("curvature", ["adam", "ekfac", "exact"])
def test_outer_equals_full_for_a_rank_one_terminal_hessian(curvature):
    """Prop. 6: a rank-one terminal Hessian stays rank one through the augmented
    recursion, V_{yy} = c [z_x; z_r][z_x; z_r]' (residual blocks included), so the
    factored and the dense per-sample values give the same steps."""
    X, y = data(B=6, shape=(3,))
    a = torch.randn(3)

    def factor(out):   # Hessian of 1/2 (a'x - y)^2 is a a'
        return a.expand(out.shape[0], 3)

    extra = {"regularization": 2.0} if curvature == "exact" else {"lr": 0.05}
    results = []
    for vh in ("outer", "full"):
        model = ResMLP()
        opt = nnbridge.GTDDP(model, curvature=curvature, value_hessian=vh,
                             terminal_hessian=factor, value_psd=False, **extra)

        def closure(model=model, opt=opt):
            opt.zero_grad()
            loss = 0.5 * ((model(X) @ a - y.double()) ** 2).mean()
            loss.backward()
            return loss
        for _ in range(3):
            opt.step(closure)
        results.append([p.detach().clone() for p in model.parameters()])
    for p, q in zip(*results):
        torch.testing.assert_close(p, q, rtol=1e-11, atol=1e-12)


def test_state_dict_roundtrip_and_skipped_step_on_a_resnet():
    """The torch.optim conventions DDPNOpt has: a state dict resumes exactly, a
    non-finite loss leaves parameters and state as they were."""
    import io

    from trajopt.errors import SkippedStepWarning
    batches = [data(B=4, shape=(1, 4, 4), seed=s) for s in range(6)]
    a = ResNet()
    oa = nnbridge.GTDDP(a, curvature="adam", lr=1e-2)
    _run(a, oa, batches[:3])
    buf = io.BytesIO()
    torch.save({"model": a.state_dict(), "opt": oa.state_dict()}, buf)
    buf.seek(0)
    saved = torch.load(buf, weights_only=True)
    b = ResNet(seed=5)
    ob = nnbridge.GTDDP(b, curvature="adam", lr=0.5)
    b.load_state_dict(saved["model"])
    ob.load_state_dict(saved["opt"])
    _run(a, oa, batches[3:])
    _run(b, ob, batches[3:])
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.equal(p, q)
    before = [p.detach().clone() for p in a.parameters()]
    state = {k: {n: v.clone() if torch.is_tensor(v) else v for n, v in s.items()}
             for k, s in oa.state.items()}
    Xbad, ybad = batches[0]
    Xbad = Xbad.clone()
    Xbad[0, 0, 0, 0] = float("nan")
    with pytest.warns(SkippedStepWarning):
        oa.step(closure_for(oa, a, Xbad, ybad))
    for p, q in zip(a.parameters(), before):
        assert torch.equal(p, q)
    for k, s in oa.state.items():
        for n, v in s.items():
            assert torch.equal(v, state[k][n]) if torch.is_tensor(v) else v == state[k][n]


class Coop(nn.Module):
    """Close to GT-DDP Fig. 7a: two layers whose outputs are added (two players of
    stage 0), then a head.  Fig. 7a feeds both the same input and adds the outputs
    directly; then the joint factors have null spaces of the input's / output's size and
    their eigenbases there (which the eigenvalue re-estimate depends on) are
    cooperative._breaker's in the optimizer and eigh's in the reference (docs/gtekfac.md),
    so here v reads sin(x) and its output passes a tanh."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.u, self.v, self.head = nn.Linear(4, 5), nn.Linear(4, 5), nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.u(x) + torch.tanh(self.v(torch.sin(x)))))


def test_gtekfac_equals_a_plain_reference_from_explicit_kronecker_factors():
    """GT-EKFAC (Cor. 7 without feedback) on Fig. 7a's network over 20 steps equals the
    dense reference (tests/reference/cooperative_dense.py: explicit kron of the joint
    eigenbases, per-sample gradients from autograd here), players u, v together and the
    head alone."""
    from tests.reference.cooperative_dense import CooperativeEKFACReference
    hp = dict(lr=0.1, eps=0.1, alpha=0.75, update_freq=5)
    model, ref = Coop(), Coop()
    opt = nnbridge.GTEKFAC(model, **hp)
    refs = [CooperativeEKFACReference(**hp), CooperativeEKFACReference(**hp)]
    for step in range(1, 21):
        X, y = data(B=32, seed=step)   # full-rank factors (B > sum of in' / out)
        opt.step(closure_for(opt, model, X, y))
        # the reference: pre-activation gradients and inputs from a plain forward pass
        hu, hv = ref.u(X), ref.v(torch.sin(X))
        hu.retain_grad()
        hv.retain_grad()
        a1 = torch.tanh(hu + torch.tanh(hv))
        h1 = ref.head(a1)
        h1.retain_grad()
        for p in ref.parameters():
            p.grad = None
        F.cross_entropy(h1, y).backward()
        one = torch.ones(32, 1)
        x0 = torch.cat([X, one], 1).unsqueeze(-1)
        x0v = torch.cat([torch.sin(X), one], 1).unsqueeze(-1)
        x1 = torch.cat([a1.detach(), one], 1).unsqueeze(-1)
        wu, wv, w1 = ((32 * h.grad).unsqueeze(-1) for h in (hu, hv, h1))
        refs[0].update(step, [wu, wv], [x0, x0v])
        refs[1].update(step, [w1], [x1])

        def grad(m):
            return torch.cat([m.weight.grad, m.bias.grad.unsqueeze(-1)], 1)
        du_u, du_v = refs[0].inverse([grad(ref.u), grad(ref.v)])
        (du_h,) = refs[1].inverse([grad(ref.head)])
        with torch.no_grad():
            for m, d in [(ref.u, du_u), (ref.v, du_v), (ref.head, du_h)]:
                m.weight -= d[:, :-1]
                m.bias -= d[:, -1]
    for p, q in zip(model.parameters(), ref.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-10, atol=1e-12)


def test_gtddp_ekfac_is_cooperative_with_feedback():
    """GT-DDP-EKFAC: on Fig. 7a's network the stage of u and v uses the joint Kronecker
    state (kept under u's weight); the step differs from per-player EKFAC's and trains."""
    X, y = data(B=16, shape=(4,))
    model = Coop()
    opt = nnbridge.GTDDP(model, curvature="ekfac", lr=0.1, update_freq=2)
    losses = [float(opt.step(closure_for(opt, model, X, y))) for _ in range(15)]
    st = opt.state[model.u.weight]
    assert st["A"].shape == (10, 10) and st["G"].shape == (10, 10)
    assert losses[-1] < 0.7 * losses[0]


def test_plain_ekfac_takes_residual_networks_layer_by_layer():
    """nnbridge.EKFAC on a residual network: one Kronecker pair per layer (the
    projection p has its own factors), and it trains; GT-EKFAC couples p with l3."""
    X, y = data(B=32, shape=(3,))
    model = ResMLP()
    opt = nnbridge.EKFAC(model, lr=0.1)
    losses = [float(opt.step(closure_for(opt, model, X, y))) for _ in range(10)]
    assert opt.state[model.p.weight]["A"].shape == (5, 5)     # its own factors
    assert opt.state[model.l3.weight]["A"].shape == (5, 5)
    assert losses[-1] < losses[0]
    coop = nnbridge.GTEKFAC(ResMLP(), lr=0.1)
    coop.step(closure_for(coop, coop.model, X, y))
    assert coop.state[coop.model.l3.weight]["A"].shape == (10, 10)   # joint with p


@pytest.mark.parametrize("curvature", ["identity", "adam"])
def test_each_stage_pulls_its_rows_back_once(monkeypatch, curvature):
    """The factored value's step pulls a stage's basis rows D back once, for the
    response's Gram matrix and for the new factor (:meth:`GraphLinearization.reusing`);
    served from the kept pull, the step equals the one that pulls the rows back twice,
    bitwise."""
    from nnbridge.graph_ops import GraphLinearization
    X, y = data(B=6, shape=(1, 4, 4))
    pulled = GraphLinearization._pulled
    rows: list[torch.Tensor] = []

    def counting(self, Y):
        if Y.shape[1] > 1:
            rows.append(Y)
        return pulled(self, Y)

    def step(reuse: bool) -> list[torch.Tensor]:
        model = ResNet()
        opt = nnbridge.GTDDP(model, curvature=curvature, lr=1e-2)
        with monkeypatch.context() as m:
            m.setattr(GraphLinearization, "_pulled", counting)
            if not reuse:   # a context that keeps nothing: every consumer pulls
                m.setattr(GraphLinearization, "reusing",
                          contextlib.contextmanager(lambda self, Y: iter([None])))
            rows.clear()
            opt.step(closure_for(opt, model, X, y))
        return [p.detach().clone() for p in model.parameters()], len(rows), \
            len({id(Y) for Y in rows})

    kept, count, distinct = step(True)
    assert count == distinct > 5
    twice, count2, distinct2 = step(False)
    # all but the stages whose controls mix the samples (a BatchNorm after the layer in
    # the stage: their correction takes the responses of the factor's own columns)
    assert distinct2 == distinct and count2 - distinct2 >= distinct - 2
    for p, q in zip(kept, twice):
        assert torch.equal(p, q)


def test_reusing_keeps_one_pull_of_those_rows_only():
    """Within ``reusing(Y)`` the pull-back of the tensor Y is computed once; other rows
    (even equal values) are pulled back as before, and nothing is kept after it."""
    from nnbridge.graph_ops import GraphLinearization
    model = ResNet()
    opt = nnbridge.GTDDP(model, curvature="identity", lr=1e-2)
    X, y = data(B=4, shape=(1, 4, 4))
    seen: list = []
    orig = GraphLinearization._pulled

    def spy(self, Y):
        seen.append(self)
        return orig(self, Y)

    GraphLinearization._pulled = spy
    try:
        opt.step(closure_for(opt, model, X, y))
    finally:
        GraphLinearization._pulled = orig
    lin = next(s for s in seen if s.n1 > 0)
    calls = []
    lin._pulled = lambda Y: calls.append(Y) or orig(lin, Y)
    Y = torch.randn(4, 3, lin.n1)
    with lin.reusing(Y):
        a = lin.fx_T(Y)
        ws = lin.factors(Y)
        b = lin.fx_T(Y.clone())
    assert len(calls) == 2 and calls[0] is Y and calls[1] is not Y
    assert torch.equal(a, b) and lin._kept is None
    ref = lin.factors(Y)
    assert len(calls) == 3
    for w, r in zip(ws, ref):
        assert (w is None and r is None) or torch.equal(w, r)
