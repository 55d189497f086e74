"""Stage derivatives by one reverse-mode pass over replicated points
(trajopt.ddp.reverse), against torch.func's transforms computed here independently, float64:
Jacobians, gradients and Hessians of nonlinear per-point maps (time-varying ones with a
stage tensor too), unused inputs, linear costs; the models take that path under no_grad
and the transforms with grad mode on (the result then carries the graph to a parameter)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.func import hessian, jacfwd, vmap

import trajopt
from tests._hypothesis import examples
from trajopt.ddp.reverse import all_finite, gradient_and_hessian, jacobians

F64 = dict(dtype=torch.float64)


def _data(N, n, m, seed):
    g = torch.Generator().manual_seed(seed)
    W = torch.randn(n, n + m, generator=g, **F64)
    return (torch.randn(N, n, generator=g, **F64), torch.randn(N, m, generator=g, **F64),
            torch.randint(0, 7, (N,), generator=g), W)


@settings(max_examples=examples(30), deadline=None)
@given(N=st.integers(1, 9), n=st.integers(1, 4), m=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_jacobians_equal_forward_mode(N, n, m, seed):
    x, u, t, W = _data(N, n, m, seed)

    def f(xi, ui, ti):
        z = torch.cat([xi, ui], -1)
        return torch.tanh(W @ z) * (1 + 0.1 * ti) + torch.sin(xi) * ui.sum()

    fx, fu = jacobians(f, (x, u, t), n)
    rx, ru = vmap(jacfwd(f, argnums=(0, 1)))(x, u, t)
    assert (fx - rx).abs().max() <= 1e-13 and (fu - ru).abs().max() <= 1e-13


@settings(max_examples=examples(30), deadline=None)
@given(N=st.integers(1, 9), n=st.integers(1, 4), m=st.integers(1, 3),
       seed=st.integers(0, 2**31 - 1))
def test_gradient_and_hessian_equal_the_transforms(N, n, m, seed):
    x, u, t, W = _data(N, n, m, seed)

    def cost(xi, ui, ti):
        z = torch.cat([xi, ui], -1)
        return torch.log1p((W @ z) ** 2).sum() * (1 + ti) + torch.exp(0.3 * xi).sum() * ui[0]

    g, H = gradient_and_hessian(cost, (x, u, t))

    def joint(z, ti):
        return cost(z[:n], z[n:], ti)
    z = torch.cat([x, u], -1)
    rg = vmap(torch.func.grad(joint))(z, t)
    rH = vmap(hessian(joint))(z, t)
    assert (g - rg).abs().max() <= 1e-12 * (1 + rg.abs().max())
    assert (H - rH).abs().max() <= 1e-12 * (1 + rH.abs().max())


def test_unused_inputs_and_linear_costs_give_zeros():
    x, u, t, _ = _data(5, 3, 2, 0)
    fx, fu = jacobians(lambda xi, ui, ti: 2.0 * xi, (x, u, t), 3)
    assert torch.equal(fu, torch.zeros(5, 3, 2, **F64))
    assert torch.equal(fx, 2.0 * torch.eye(3, **F64).expand(5, 3, 3))
    g, H = gradient_and_hessian(lambda xi, ui, ti: xi.sum() + 3.0 * ui.sum(), (x, u, t))
    assert torch.equal(H, torch.zeros(5, 5, 5, **F64))
    assert torch.equal(g, torch.tensor([1.0] * 3 + [3.0] * 2, **F64).expand(5, 5))
    g, H = gradient_and_hessian(lambda xi, ui, ti: torch.ones((), **F64), (x, u, t))
    assert not g.any() and not H.any()


def test_a_different_output_size_is_refused():
    x, u, t, _ = _data(4, 3, 1, 1)
    assert jacobians(lambda xi, ui, ti: xi[:2], (x, u, t), 3) is None
    assert gradient_and_hessian(lambda xi, ui, ti: xi, (x, u, t)) is None


def _pendulum_models(p):
    def f(x, u, t):
        return torch.stack([x[..., 0] + 0.1 * x[..., 1],
                            x[..., 1] + 0.1 * (u[..., 0] - p * torch.sin(x[..., 0]))], -1)

    def running(x, u, t):  # with an x-u cross term (l_ux != 0)
        return p * (torch.cos(x[..., 0]) + x[..., 1] ** 2) + (u ** 2).sum(-1) * (1 + 0.01 * t) \
            + u[..., 0] * torch.sin(x[..., 0]) * x[..., 1]

    def terminal(x):
        return p * ((x[..., 0] - math.pi) ** 2 + x[..., 1] ** 4)
    return trajopt.Dynamics(f), trajopt.Cost(running, terminal)


@pytest.mark.parametrize("t", [3, "tensor"])
def test_models_take_the_reverse_path_under_no_grad(t):
    dyn, cost = _pendulum_models(9.81)
    x, u, tt, _ = _data(6, 2, 1, 2)
    t = tt if t == "tensor" else t
    with torch.no_grad():
        d = dyn.derivatives(x, u, t)
        c = cost.derivatives(x, u, t)
        gT, HT = cost.terminal_derivatives(x)
    with torch.enable_grad():  # the transforms
        rd = dyn.derivatives(x, u, t)
        rc = cost.derivatives(x, u, t)
        rgT, rHT = cost.terminal_derivatives(x)
    for a, b in ((d.fx, rd.fx), (d.fu, rd.fu), (c.lx, rc.lx), (c.lu, rc.lu),
                 (c.lxx, rc.lxx), (c.luu, rc.luu), (c.lux, rc.lux), (gT, rgT), (HT, rHT)):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-13 * (1 + b.abs().max())
    assert rc.lux.abs().max() > 0.1  # the cross term is there to be checked
    # reverse mode agreed at the first evaluation and is taken from then on
    assert dyn._reverse_agrees is True and cost._reverse_agrees_running is True
    assert cost._reverse_agrees_terminal is True
    calls = []
    import trajopt.ddp.models as models
    original = models.jacobians

    def counted(*a, **k):
        calls.append(1)
        return original(*a, **k)
    models.jacobians = counted
    try:
        with torch.no_grad():
            again = dyn.derivatives(x, u, t)
    finally:
        models.jacobians = original
    # (the first evaluation returned the transforms' answer, this one reverse mode's)
    assert calls == [1] and (again.fx - d.fx).abs().max() <= 1e-13 * d.fx.abs().max()


def test_time_invariant_models_and_terminal_costs_are_differentiated_on_rows():
    """A time-invariant model at an int stage, a terminal cost and a discretized ``f`` are
    called once on all replicated rows (their batched call, no vmap); a time-varying
    model at an int stage still sees one point under vmap. The derivatives equal the
    transforms'."""
    seen = []
    dyn, cost = _pendulum_models(9.81)

    def recorded(fn, name):
        def wrapper(*a):
            seen.append((name, tuple(a[0].shape)))
            return fn(*a)
        return wrapper
    N, n, m = 6, 2, 1
    inv_dyn = trajopt.Dynamics(recorded(dyn.forward, "f"), time_invariant=True)
    inv_cost = trajopt.Cost(recorded(lambda x, u, t: cost.running(x, u, 0), "l"),
                            recorded(cost.terminal, "lT"), time_invariant=True)
    var_dyn = trajopt.Dynamics(recorded(dyn.forward, "f_t"))
    rk4 = trajopt.discretize(recorded(lambda x, u: dyn.forward(x, u, 0), "fc"), 0.05)
    x, u, _, _ = _data(N, n, m, 5)
    out = {}
    # reverse mode twice (the first evaluation also runs the transforms to compare),
    # then the transforms
    for key, grad in (("first", False), ("again", False), ("transforms", True)):
        seen.clear()
        with torch.set_grad_enabled(grad):
            out[key] = (inv_dyn.derivatives(x, u, 0), inv_cost.derivatives(x, u, 0),
                        inv_cost.terminal_derivatives(x), var_dyn.derivatives(x, u, 4),
                        rk4.derivatives(x, u, 0))
        if key == "again":
            assert sorted(set(seen)) == sorted({
                ("f", (n * N, n)), ("l", ((n + m) * N, n)), ("lT", (n * N, n)),
                ("fc", (n * 4 * N, n)), ("fc", (N, n)), ("fc", (N, n)),  # its RK4 stages
                ("f_t", (n,))})   # the time-varying model: one point under vmap
    (d, c, (g, H), dv, dr), (rd, rc, (rg, rH), rdv, rdr) = out["again"], out["transforms"]
    for a, b in ((d.fx, rd.fx), (d.fu, rd.fu), (c.lx, rc.lx), (c.lu, rc.lu),
                 (c.lxx, rc.lxx), (c.luu, rc.luu), (c.lux, rc.lux), (g, rg), (H, rH),
                 (dv.fx, rdv.fx), (dr.fx, rdr.fx), (dr.fu, rdr.fu)):
        assert a.shape == b.shape and (a - b).abs().max() <= 1e-13 * (1 + b.abs().max())


def test_grad_mode_keeps_the_graph_to_parameters():
    p = torch.tensor(9.81, **F64, requires_grad=True)
    dyn, cost = _pendulum_models(p)
    x, u, t, _ = _data(4, 2, 1, 3)
    d = dyn.derivatives(x, u, 0)
    c = cost.derivatives(x, u, 0)
    (dp,) = torch.autograd.grad(d.fx.sum() + c.lxx.sum(), p)
    # d/dp of sum f_x (-0.1 p cos th) and of sum l_xx (diag(-p cos th, 2 p))
    expected = (-0.1 * torch.cos(x[:, 0])).sum() + (2.0 - torch.cos(x[:, 0])).sum()
    assert torch.allclose(dp, expected, rtol=1e-12, atol=0)


def test_rk4_discretization_derivatives_equal_the_transforms():
    def fc(x, u):
        return torch.stack([x[..., 1], -torch.sin(x[..., 0]) + u[..., 0] * x[..., 1]], -1)
    dyn = trajopt.discretize(fc, 0.05)
    x, u, _, _ = _data(7, 2, 1, 4)
    with torch.no_grad():
        d = dyn.derivatives(x, u, 0)
    rx, ru = vmap(jacfwd(lambda xi, ui: dyn(xi, ui, 0), argnums=(0, 1)))(x, u)
    assert (d.fx - rx).abs().max() <= 1e-13 and (d.fu - ru).abs().max() <= 1e-13


def test_a_where_guarded_singularity_keeps_forward_modes_finite_answer():
    """torch.where(w != 0, sin(w)/w, 1) at w = 0: reverse mode sends a zero cotangent into
    the unselected branch (0 * NaN = NaN); the models recompute such derivatives with the
    transforms, as before."""
    def f(x, u, t):
        w = u[..., 1]
        safe = torch.where(w.abs() > 1e-6, w, torch.ones_like(w))
        sinc = torch.where(w.abs() > 1e-6, torch.sin(safe) / safe, torch.ones_like(w))
        return torch.stack([x[..., 0] + 0.1 * u[..., 0] * sinc, x[..., 1] + 0.1 * w], -1)

    def f_unsafe(x, u, t):  # the branch divides by w itself: NaN in reverse mode
        w = u[..., 1]
        sinc = torch.where(w.abs() > 1e-6, torch.sin(w) / w, torch.ones_like(w))
        return torch.stack([x[..., 0] + 0.1 * u[..., 0] * sinc, x[..., 1] + 0.1 * w], -1)
    x = torch.zeros(3, 2, **F64)
    u = torch.tensor([[1.0, 0.0], [0.5, 0.3], [0.0, 0.0]], **F64)
    for fn in (f, f_unsafe):
        with torch.no_grad():
            d = trajopt.Dynamics(fn).derivatives(x, u, 0)
        rx, ru = vmap(jacfwd(lambda xi, ui, fn=fn: fn(xi, ui, 0), argnums=(0, 1)))(x, u)
        assert torch.isfinite(d.fu).all() and torch.isfinite(ru).all()
        assert (d.fu - ru).abs().max() <= 1e-15 and (d.fx - rx).abs().max() <= 1e-15


def test_inference_mode_solves_as_no_grad_does():
    dyn, cost = _pendulum_models(9.81)
    x0 = torch.tensor([0.1, 0.0], **F64)
    with torch.no_grad():
        ref = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(30, 1, **F64))
    with torch.inference_mode():
        res = trajopt.solve_ddp(dyn, cost, x0, torch.zeros(30, 1, **F64))
    # inference mode takes the transforms (no graph can be recorded there): rounding only
    assert res.reason == ref.reason == "converged"
    assert (res.us - ref.us).abs().max() <= 1e-10 * ref.us.abs().max()


def test_a_part_hidden_from_reverse_mode_keeps_the_transforms():
    """A torch.no_grad() block inside f is seen by forward mode (the transforms) and not by
    reverse mode: the first evaluation compares the two, and the model keeps the
    transforms; a model where they agree takes reverse mode from then on."""
    def f(x, u, t):
        with torch.no_grad():  # e.g. a frozen sub-model
            drag = 0.1 * x[..., 1] * x[..., 1].abs()
        return torch.stack([x[..., 0] + 0.1 * x[..., 1], x[..., 1] + 0.1 * (u[..., 0] - drag)],
                           -1)

    def g(x, u, t):
        drag = 0.1 * x[..., 1] * x[..., 1].abs()
        return torch.stack([x[..., 0] + 0.1 * x[..., 1], x[..., 1] + 0.1 * (u[..., 0] - drag)],
                           -1)
    x = torch.tensor([[0.0, 2.0], [0.3, -1.0]], **F64)
    u = torch.zeros(2, 1, **F64)
    for fn, agrees in ((f, False), (g, True)):
        dyn = trajopt.Dynamics(fn)
        rx, ru = vmap(jacfwd(lambda xi, ui, fn=fn: fn(xi, ui, 0), argnums=(0, 1)))(x, u)
        for _ in range(2):  # the first call decides, the second follows the decision
            with torch.no_grad():
                d = dyn.derivatives(x, u, 0)
            assert (d.fx - rx).abs().max() <= 1e-15 and (d.fu - ru).abs().max() <= 1e-15
        assert dyn._reverse_agrees is agrees
    assert rx[0, 1, 1] == 1 - 0.1 * 0.1 * 2 * 2.0  # the drag's derivative is in the answer


def test_a_hidden_part_that_vanishes_at_the_first_points_is_still_seen():
    """The drag v|v| under no_grad has a zero derivative at rest, where the first
    evaluation happens (a rollout from rest with zero controls): the check at moved points
    sees it, and later evaluations away from rest keep the transforms' answer."""
    def f(x, u, t):
        with torch.no_grad():
            drag = 0.5 * x[..., 1] * x[..., 1].abs()
        return torch.stack([x[..., 0] + 0.1 * x[..., 1], x[..., 1] + 0.1 * (u[..., 0] - drag)],
                           -1)
    dyn = trajopt.Dynamics(f)
    with torch.no_grad():
        dyn.derivatives(torch.zeros(4, 2, **F64), torch.zeros(4, 1, **F64), 0)
        d = dyn.derivatives(torch.tensor([[0.0, 2.0]], **F64), torch.zeros(1, 1, **F64), 0)
    assert dyn._reverse_agrees is False
    assert torch.allclose(d.fx[0], torch.tensor([[1.0, 0.1], [0.0, 0.8]], **F64), rtol=0,
                          atol=1e-15)



_SPECIAL = st.sampled_from([0.0, -0.0, 1.0, -2.5, 1e308, -1.7976931348623157e308, 5e-324,
                            math.inf, -math.inf, math.nan])


@settings(max_examples=examples(200), deadline=None)
@given(parts=st.lists(st.lists(st.one_of(_SPECIAL, st.floats(allow_nan=True,
                                                               allow_infinity=True)),
                               min_size=0, max_size=6), min_size=0, max_size=3),
       dtype=st.sampled_from([torch.float64, torch.float32]))
def test_all_finite_equals_isfinite(parts, dtype):
    """The one-synchronization check equals ``isfinite(v).all()`` over every tensor, also
    for the largest finite values (``v - v`` is 0, not an overflow) and float32."""
    tensors = [torch.tensor(p, dtype=torch.float64).to(dtype) for p in parts]
    assert all_finite(tensors) == all(bool(torch.isfinite(v).all()) for v in tensors)
