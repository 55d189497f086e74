"""Layer alignment (GT-DDP's placement of the layers off the main chain) and the EXP3++
bandit that chooses it (OCNOpt Sec. VI-B)."""

import math

import pytest
import torch
import torch.nn.functional as F  # noqa: N812

import nnbridge
from nnbridge.models import resnet
from tests.nnbridge.conftest import closure_for, data
from tests.nnbridge.test_gtddp import Inception, ResMLP
from tests.reference.shared_unrolled import affine, cross_entropy, flat_control, unrolled_step
from trajopt.errors import InvalidArgumentError


# ------------------------------------------------------------------ the stage graph
@pytest.mark.parametrize("make,shape,merge,split", [
    (ResMLP, (3,), [1, 1, 1, 2], [1, 1, 2, 1]),
    (Inception, (1, 4, 4), [1, 1, 3, 1], [1, 3, 1, 1]),
], ids=["resmlp", "inception"])
def test_split_alignment_moves_the_players_and_keeps_the_network(make, shape, merge, split):
    model = make()
    X, _ = data(B=3, shape=shape)
    for al, players in (("merge", merge), ("split", split)):
        g = nnbridge.graph_stages(model, al)
        assert [len(s.players) for s in g.stages] == players
        assert torch.equal(g(X), model(X))


def test_split_alignment_of_a_batchnorm_resnet_carries_the_projection():
    model = resnet((1, 8, 8), 10)
    X = torch.randn(4, 1, 8, 8)
    g = nnbridge.graph_stages(model, "split")
    moved = next(s for s in g.stages if len(s.players) == 3)   # conv, projection, its BN
    # the projected shortcut is carried (not the block input it was computed from)
    assert len(moved.opens) == 1 and "shortcut" in moved.opens[0]
    merge = nnbridge.graph_stages(model, "merge")
    assert all(len(s.players) == 1 or s.merges for s in merge.stages)
    for train in (True, False):     # (BatchNorm's reductions round differently: 1e-16)
        model.train(train)
        assert torch.allclose(g(X), model(X), rtol=0, atol=1e-13)


def test_per_layer_alignment_and_bad_alignments_are_named():
    model = Inception()
    g = nnbridge.graph_stages(model, {"a": "split"})
    assert [len(s.players) for s in g.stages] == [1, 2, 2, 1]
    for bad, what in ((("merge",), "alignment must be"), ({"zz": "split"}, r"keys .*got \[.zz.\]"),
                      ({"a": "early"}, "values must be")):
        with pytest.raises(InvalidArgumentError, match=what):
            nnbridge.graph_stages(model, bad)


# ------------------------------------------------------------------ the step

@pytest.mark.parametrize("B", [1, 3])
def test_split_step_is_ddp_with_the_shortcut_decided_at_the_split(B):
    """ResMLP's shortcut P placed at the split (stage 2, beside L2): one exact-curvature
    GT-DDP step is the DDP step of the OCP whose stage 2 decides (L2, P) and carries
    P x2 to the output (tests/reference/shared_unrolled.py, dense Jacobians)."""
    X, y = data(B=B, shape=(3,))
    model = ResMLP()
    lam, mu, lr = 0.05, 0.3, 0.8

    fs = [lambda x, th: torch.tanh(affine(th["l0"], x, 4)),
          lambda x, th: torch.cat([torch.tanh(affine(th["l1"], x, 4)), x]),        # [x2, x1]
          lambda z, th: torch.cat([torch.tanh(affine(th["l2"], z[:4], 4)) + z[4:],
                                   affine(th["p"], z[:4], 3)]),                    # [x3, P x2]
          lambda z, th: affine(th["l3"], z[:4], 3) + z[4:]]
    uses = [["l0"], ["l1"], ["l2", "p"], ["l3"]]
    params = {k: flat_control(getattr(model, k)) for k in ("l0", "l1", "l2", "l3", "p")}

    phi = cross_entropy(y)

    want = unrolled_step(fs, uses, {0: ["l0"], 1: ["l1"], 2: ["l2", "p"], 3: ["l3"]},
                         params, X, phi, lam=lam, mu=mu, lr=lr, recursion="mean")
    fs_merge = fs[:2] + [
        lambda z, th: torch.cat([torch.tanh(affine(th["l2"], z[:4], 4)) + z[4:], z[:4]]),
        lambda z, th: affine(th["l3"], z[:4], 3) + affine(th["p"], z[4:], 3)]   # [x3, x2]
    merge = unrolled_step(fs_merge, [["l0"], ["l1"], ["l2"], ["l3", "p"]],
                          {0: ["l0"], 1: ["l1"], 2: ["l2"], 3: ["l3", "p"]},
                          params, X, phi, lam=lam, mu=mu, lr=lr, recursion="mean")
    assert float((want["p"] - merge["p"]).abs().max()) > 1e-6   # the placements differ
    opt = nnbridge.GTDDP(model, curvature="exact", value_hessian="full", weight_decay=lam,
                         regularization=mu, lr=lr, value_psd=False, alignment="split")
    opt.step(closure_for(opt, model, X, y))
    for k in params:
        scale = float((want[k] - params[k]).abs().max())
        assert float((flat_control(getattr(model, k)) - want[k]).abs().max()) < 1e-10 * scale, k


# ------------------------------------------------------------------ EXP3++
def _reference_probabilities(K, t, weighted, total, pulls, alpha=3.0, beta=256.0):
    """Seldin & Lugosi's EXP3++ distribution of round t + 1, written out scalar by scalar."""
    t1 = t + 1
    eta = 0.5 * math.sqrt(math.log(K) / (t1 * K))
    eps = []
    ucb, lcb = [], []
    for a in range(K):
        if pulls[a] == 0:
            ucb.append(1.0)
            lcb.append(0.0)
            continue
        m = total[a] / pulls[a]
        w = math.sqrt(alpha * math.log(t1 * K ** (1 / alpha)) / (2 * pulls[a]))
        ucb.append(min(1.0, m + w))
        lcb.append(max(0.0, m - w))
    for a in range(K):
        e = min(1 / (2 * K), eta)
        gap = max(0.0, lcb[a] - min(ucb))
        if t > 0 and gap > 0:
            e = min(e, beta * math.log(t1) / (t1 * gap * gap))
        eps.append(e)
    z = [math.exp(-eta * w) for w in weighted]
    rho = [v / sum(z) for v in z]
    return [(1 - sum(eps)) * r + e for r, e in zip(rho, eps)]


def test_exp3pp_probabilities_follow_the_formulas():
    b = nnbridge.EXP3PP(3, alpha=3.0, beta=0.05, seed=1)   # small beta: xi active early
    weighted, total, pulls = [0.0] * 3, [0.0] * 3, [0] * 3
    losses = [0.9, 0.1, 0.5]
    for t in range(40):
        p = b.probabilities()
        ref = _reference_probabilities(3, t, weighted, total, pulls, beta=0.05)
        assert torch.allclose(p, torch.tensor(ref, dtype=torch.float64), atol=1e-14)
        a = b.draw()
        b.update(a, losses[a])
        weighted[a] += losses[a] / ref[a]
        total[a] += losses[a]
        pulls[a] += 1


def test_exp3pp_prefers_the_best_arm_of_a_stochastic_bandit():
    g = torch.Generator().manual_seed(0)
    means = [0.6, 0.3, 0.55]
    b = nnbridge.EXP3PP(3, seed=0)
    for _ in range(4000):
        a = b.draw()
        b.update(a, float(torch.rand((), generator=g) < means[a]))
    assert int(b.pulls.argmax()) == 1
    assert float(b.probabilities()[1]) > 0.6


def test_exp3pp_state_round_trip_and_errors():
    a, b = nnbridge.EXP3PP(2, seed=4), nnbridge.EXP3PP(2, seed=9)
    for _ in range(7):
        a.update(a.draw(), 0.25)
    b.load_state_dict(a.state_dict())
    assert [a.draw() for _ in range(5)] == [b.draw() for _ in range(5)]
    with pytest.raises(InvalidArgumentError, match="arms"):
        nnbridge.EXP3PP(1)
    with pytest.raises(InvalidArgumentError, match="loss"):
        a.update(a.draw(), 1.5)


# ------------------------------------------------------------------ the optimizer
def _loop(opt, model, X, y, steps, sched=None):
    for _ in range(steps):
        opt.step(closure_for(opt, model, X, y))
        if sched is not None:
            sched.step()


def test_arms_share_the_curvature_state():
    """Two identical arms: whichever the bandit draws, the steps are plain GT-DDP's (Adam's
    moments and step counts are one state, not one per arm)."""
    X, y = data(B=6, shape=(3,))
    a, b = ResMLP(), ResMLP()
    bandit = nnbridge.AlignmentBandit(a, 1e-2, arms=("merge", "merge"), seed=3)
    plain = nnbridge.GTDDP(b, 1e-2)
    _loop(bandit, a, X, y, 6)
    _loop(plain, b, X, y, 6)
    assert len({arm for arm, _, _ in bandit.history}) == 2     # both arms were drawn
    for p, q in zip(a.parameters(), b.parameters()):
        assert torch.allclose(p, q, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("terminal", [None, "fisher"])
def test_bandit_trains_with_a_scheduler_and_resumes_exactly(terminal):
    """Also with the sampled Fisher: every arm's generator is saved (only the first
    arm's was, and a resumed run drew other samples on the others: 3.6e-4 off)."""
    X, y = data(B=16, shape=(3,))
    model = ResMLP()
    kw = {} if terminal is None else {"terminal_hessian": terminal}
    opt = nnbridge.AlignmentBandit(model, 1e-2, seed=0, **kw)
    sched = torch.optim.lr_scheduler.StepLR(opt, 3, 0.5)
    _loop(opt, model, X, y, 6, sched)
    assert all(o.param_groups[0]["lr"] == pytest.approx(2.5e-3) for o in opt.optimizers)
    assert opt.history[-1][2] < opt.history[0][1]
    assert int(opt.bandit.pulls.sum()) == 6
    saved = opt.state_dict()
    twin = ResMLP()
    twin.load_state_dict(model.state_dict())
    opt2 = nnbridge.AlignmentBandit(twin, 1e-2, seed=5, **kw)
    opt2.load_state_dict(saved)
    _loop(opt, model, X, y, 3)
    _loop(opt2, twin, X, y, 3)
    for p, q in zip(model.parameters(), twin.parameters()):
        assert torch.equal(p, q)


def test_the_measuring_pass_leaves_batchnorm_statistics_alone():
    """The extra closure evaluation of each step restores the running statistics: with
    two identical arms on a BatchNorm ResNet, the bandit's parameters *and buffers* are
    plain GT-DDP's."""
    X = torch.randn(8, 1, 8, 8)
    y = torch.arange(8) % 10
    torch.manual_seed(0)
    a = resnet((1, 8, 8), 10)
    torch.manual_seed(0)
    b = resnet((1, 8, 8), 10)
    bandit = nnbridge.AlignmentBandit(a, 1e-2, arms=("merge", "merge"))
    plain = nnbridge.GTDDP(b, 1e-2)
    _loop(bandit, a, X, y, 3)
    _loop(plain, b, X, y, 3)
    for p, q in zip(list(a.parameters()) + list(a.buffers()),
                    list(b.parameters()) + list(b.buffers())):
        assert torch.allclose(p.double(), q.double(), rtol=1e-10, atol=1e-12)


def test_bandit_refuses_what_it_cannot_do():
    with pytest.raises(InvalidArgumentError, match="ekfac"):
        nnbridge.AlignmentBandit(ResMLP(), curvature="ekfac")
    with pytest.raises(InvalidArgumentError, match="at least two"):
        nnbridge.AlignmentBandit(ResMLP(), arms=("merge",))
    with pytest.raises(InvalidArgumentError, match="the string 'merge'"):  # said "got 'm'"
        nnbridge.AlignmentBandit(ResMLP(), arms="merge")
    with pytest.raises(InvalidArgumentError, match="seed"):  # a raw torch RuntimeError
        nnbridge.AlignmentBandit(ResMLP(), seed="x")
    model = ResMLP()
    opt = nnbridge.AlignmentBandit(model)
    with pytest.raises(TypeError, match="closure"):
        opt.step()
    X, y = data(B=4, shape=(3,))

    def silent():
        opt.zero_grad()
        F.cross_entropy(model(X), y).backward()
    with pytest.raises(TypeError, match="must return the loss"):
        opt.step(silent)
