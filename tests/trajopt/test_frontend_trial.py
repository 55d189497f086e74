"""Defects of the DDP front end found by a user trial (trial 30b), one test group each:
non-finite stage derivatives, the dtype of a numpy ``x0``, ``nn.Module`` models, a
terminal-only :class:`trajopt.Cost` and a cost holding per-element data."""

import pytest
import torch

import trajopt
from trajopt.errors import NonFiniteError

T, DT = 30, 0.1
DTYPE = torch.float64
GOAL = torch.tensor([1.0, 1.0, 0.0, 0.0], dtype=DTYPE)


def drag(x, u, t):
    """Quadratic drag v |v| written as v sqrt(v.v): torch's Jacobian at v = 0 is NaN."""
    v = x[..., 2:4]
    a = u - 0.5 * v * torch.sqrt((v ** 2).sum(-1, keepdim=True))
    return torch.cat([x[..., :2] + DT * v, v + DT * a], -1)


def smooth(x, u, t):
    v = x[..., 2:4]
    return torch.cat([x[..., :2] + DT * v, v + DT * u], -1)


def quad(x, u, t):
    return ((x - GOAL) ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1)


COST = trajopt.Cost(quad, lambda x: 10 * ((x - GOAL) ** 2).sum(-1))


# ---------------------------------------------------------------- 1. NaN derivatives
@pytest.mark.parametrize("us0", [0.0, 1e-3])
def test_nan_jacobian_of_the_dynamics_is_named(us0):
    # was: reason 'regularization_limit' after 0 iterations, no error
    x0 = torch.zeros(4, dtype=DTYPE)
    with pytest.raises(NonFiniteError, match=r"fx .* of the dynamics .* stage 0.*sqrt"):
        trajopt.solve_ddp(drag, COST, x0, torch.full((T, 2), us0, dtype=DTYPE))


def test_nan_jacobian_names_the_batch_element():
    x0 = torch.tensor([[0, 0, 1, 1], [0, 0, 0, 0], [0, 0, 1, 0]], dtype=DTYPE)
    with pytest.raises(NonFiniteError, match=r"dynamics .* stage 0, flat batch element 1"):
        trajopt.solve_ddp(drag, COST, x0, torch.zeros(T, 2, dtype=DTYPE))


def test_nan_jacobian_under_full_ddp_is_named():
    with pytest.raises(NonFiniteError, match="of the dynamics .* stage 0"):
        trajopt.solve_ddp(drag, COST, torch.zeros(4, dtype=DTYPE),
                          torch.zeros(T, 2, dtype=DTYPE), mode="ddp")


def test_nan_gradient_of_the_running_cost_is_named():
    cost = trajopt.Cost(lambda x, u, t: torch.sqrt((x ** 2).sum(-1)) + (u ** 2).sum(-1),
                        lambda x: ((x - GOAL) ** 2).sum(-1))
    with pytest.raises(NonFiniteError, match=r"lx \(dl/dx\) of the running cost .* stage 0"):
        trajopt.solve_ddp(smooth, cost, torch.zeros(4, dtype=DTYPE),
                          torch.zeros(T, 2, dtype=DTYPE))


def test_nan_gradient_of_the_terminal_cost_is_named():
    cost = trajopt.Cost(lambda x, u, t: (u ** 2).sum(-1),
                        lambda x: torch.sqrt((x ** 2).sum(-1)))
    # at rest at the origin the state never moves: the terminal state is 0
    with pytest.raises(NonFiniteError, match=f"lx .* of the terminal cost .* stage {T}"):
        trajopt.solve_ddp(smooth, cost, torch.zeros(4, dtype=DTYPE),
                          torch.zeros(T, 2, dtype=DTYPE))


def test_finite_derivatives_solve_as_before():
    res = trajopt.solve_ddp(drag, COST, torch.tensor([0, 0, 0.5, -0.3], dtype=DTYPE),
                            torch.zeros(T, 2, dtype=DTYPE))
    assert res.reason == "converged" and torch.isfinite(res.cost)


# ---------------------------------------------------------------- 2. dtype of a numpy x0
def _unicycle(x, u, t):
    th = x[..., 2]
    return x + 0.1 * torch.stack([u[..., 0] * torch.cos(th), u[..., 0] * torch.sin(th),
                                  u[..., 1]], -1)


_UNICYCLE_COST = trajopt.Cost(lambda x, u, t: 0.5 * (100 * (x ** 2).sum(-1) + (u ** 2).sum(-1)),
                              lambda x: 50 * (x ** 2).sum(-1))


@pytest.mark.parametrize("x0", ["numpy", "list"])
def test_numpy_x0_runs_in_float64_beside_a_float32_us0(x0):
    import numpy as np
    x0n = np.array([-1.0, -1.0, 1.0 + 1e-9])
    given = x0n if x0 == "numpy" else x0n.tolist()
    r = trajopt.solve_ddp(_unicycle, _UNICYCLE_COST, given, torch.zeros(20, 2))  # float32 us0
    ref = trajopt.solve_ddp(_unicycle, _UNICYCLE_COST, x0n, np.zeros((20, 2)))
    assert torch.is_tensor(r.xs) and r.xs.dtype == r.us.dtype == torch.float64
    assert float(r.xs[0, 2]) == x0n[2]                  # was rounded to float32: 1.0
    assert np.array_equal(r.us.numpy(), ref.us) and float(r.cost) == float(ref.cost)


def test_torch_inputs_keep_their_dtype():
    x0 = torch.tensor([-1.0, -1.0, 1.0])
    r = trajopt.solve_ddp(_unicycle, _UNICYCLE_COST, x0, torch.zeros(20, 2))
    assert r.xs.dtype == torch.float32


# ---------------------------------------------------------------- 3. nn.Module models
def _net(*middle):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 16), *middle, torch.nn.Tanh(),
                               torch.nn.Linear(16, 2)).double()


_MODULE_COST = trajopt.Cost(lambda x, u: (x ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1),
                            lambda x: 10 * (x ** 2).sum(-1))
_X0 = torch.tensor([[1.0, 0.0], [0.5, 0.2]], dtype=DTYPE)
_US0 = torch.zeros(20, 1, dtype=DTYPE)


class _TwoArg(torch.nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x, u):
        return x + 0.1 * self.net(torch.cat([x, u], -1))


class _ThreeArg(_TwoArg):
    def forward(self, x, u, t):
        return x + 0.1 * self.net(torch.cat([x, u], -1))


@pytest.mark.parametrize("wrap", [False, True])
def test_module_with_two_argument_forward_is_a_time_invariant_dynamics(wrap):
    net = _net()
    module = _TwoArg(net)
    ref = trajopt.solve_ddp(lambda x, u: x + 0.1 * net(torch.cat([x, u], -1)), _MODULE_COST,
                            _X0, _US0)
    dyn = trajopt.Dynamics(module) if wrap else module
    res = trajopt.solve_ddp(dyn, _MODULE_COST, _X0, _US0)   # was: ShapeError (4 arguments)
    assert list(res.reason) == ["converged"] * 2
    assert torch.equal(res.us, ref.us) and torch.equal(res.cost, ref.cost)
    assert trajopt.Dynamics(module).time_invariant


@pytest.mark.parametrize("cls", [_TwoArg, _ThreeArg])
def test_batchnorm_module_in_eval_mode_solves(cls):
    module = cls(_net(torch.nn.BatchNorm1d(16))).eval()
    with torch.no_grad():   # running statistics that are not the identity
        module.net[1].running_mean.uniform_(-0.5, 0.5)
        module.net[1].running_var.uniform_(0.5, 2.0)
    assert trajopt.Dynamics(module).time_invariant   # forward never reads t
    res = trajopt.solve_ddp(module, _MODULE_COST, _X0, _US0)  # was: "expected 2D or 3D input"
    assert list(res.reason) == ["converged"] * 2
    ref = trajopt.solve_ddp(lambda x, u: module(x, u, 0) if cls is _ThreeArg else module(x, u),
                            _MODULE_COST, _X0, _US0)
    assert torch.allclose(res.us, ref.us, atol=1e-9)


class _Folded(torch.nn.Module):
    """The BatchNorm1d of ``module.net[1]`` in eval mode written out as its affine map."""

    def __init__(self, module):
        super().__init__()
        self.m = module

    def forward(self, x, u):
        net = self.m.net
        bn = net[1]
        h = net[0](torch.cat([x, u], -1))
        h = (h - bn.running_mean) / torch.sqrt(bn.running_var + bn.eps) * bn.weight + bn.bias
        return x + 0.1 * net[3](net[2](h))


@pytest.mark.parametrize("time_invariant", [True, False])
def test_batchnorm_module_in_eval_mode_under_full_ddp(time_invariant):
    """mode="ddp" (second derivatives point by point under vmap) and time-varying models
    (first derivatives likewise): BatchNorm1d refuses one point ("expected 2D or 3D
    input", session 30's trial); the point is now a batch of one row. Equal to the same
    network with the normalization written out."""
    module = _TwoArg(_net(torch.nn.BatchNorm1d(16))).eval()
    with torch.no_grad():
        module.net[1].running_mean.uniform_(-0.5, 0.5)
        module.net[1].running_var.uniform_(0.5, 2.0)
        module.net[1].weight.uniform_(0.5, 1.5)
    kw = dict(mode="ddp", tol=1e-12)
    res = trajopt.solve_ddp(trajopt.Dynamics(module, time_invariant=time_invariant),
                            _MODULE_COST, _X0, _US0, **kw)
    ref = trajopt.solve_ddp(trajopt.Dynamics(_Folded(module), time_invariant=time_invariant),
                            _MODULE_COST, _X0, _US0, **kw)
    assert list(res.reason) == ["converged"] * 2
    torch.testing.assert_close(res.us, ref.us, rtol=0, atol=1e-10)
    torch.testing.assert_close(res.cost, ref.cost, rtol=1e-12, atol=0)


def test_module_with_hooks_or_reading_t_stays_time_varying():
    class ReadsT(_TwoArg):
        def forward(self, x, u, t):
            return x + 0.1 * t * self.net(torch.cat([x, u], -1))
    assert not trajopt.Dynamics(ReadsT(_net())).time_invariant
    hooked = _ThreeArg(_net())
    hooked.register_forward_pre_hook(lambda mod, args: None)
    assert not trajopt.Dynamics(hooked).time_invariant


@pytest.mark.parametrize("layer", [torch.nn.Dropout(0.1), torch.nn.BatchNorm1d(16)])
def test_module_in_training_mode_is_refused_by_name(layer):
    module = _ThreeArg(_net(layer)).train()
    name = type(layer).__name__
    with pytest.raises(trajopt.errors.InvalidArgumentError,
                       match=rf"the dynamics is an nn.Module \(_ThreeArg\) in training mode.*"
                             rf"_ThreeArg.net.1 \({name}\).*eval\(\)"):
        trajopt.solve_ddp(module, _MODULE_COST, _X0, _US0)
    closure = _net(layer).train()    # a module closed over by a function, in the cost
    cost = trajopt.Cost(lambda x, u, t: (closure(torch.cat([x, u], -1)) ** 2).sum(-1))
    with pytest.raises(trajopt.errors.InvalidArgumentError, match="the cost is an nn.Module"):
        trajopt.solve_ddp(lambda x, u: x + u, cost, _X0, _US0)


# ---------------------------------------------------------------- 4. terminal cost only
def _double_integrator(x, u, t):
    return torch.stack([x[..., 0] + DT * x[..., 1], x[..., 1] + DT * u[..., 0]], -1)


def _terminal(x):
    return 50 * (x ** 2).sum(-1)


@pytest.mark.parametrize("mode", ["ilqr", "ddp"])
def test_terminal_only_cost_equals_an_explicit_zero_running_cost(mode):
    x0 = torch.tensor([[1.0, 0.0], [-0.5, 0.3]], dtype=DTYPE)
    us0 = torch.zeros(T, 1, dtype=DTYPE)
    kw = dict(control_limits=(-1.0, 1.0), max_iter=300, mode=mode)
    only = trajopt.Cost(terminal=_terminal)              # was: ShapeError
    assert only.time_invariant
    res = trajopt.solve_ddp(_double_integrator, only, x0, us0, **kw)
    ref = trajopt.solve_ddp(_double_integrator,
                            trajopt.Cost(lambda x, u, t: 0.0 * u.sum(-1), _terminal), x0, us0,
                            **kw)
    assert list(res.reason) == list(ref.reason) == ["converged"] * 2
    for a, b in ((res.xs, ref.xs), (res.us, ref.us), (res.cost, ref.cost), (res.K, ref.K)):
        assert torch.equal(a, b)
    assert float(res.cost.max()) < 1e-12                 # the goal is reached


def test_zero_running_cost_value():
    x, u = torch.ones(5, 3, 2, dtype=DTYPE), torch.ones(5, 3, 1, dtype=DTYPE)
    v = trajopt.Cost(terminal=_terminal).running(x, u, 0)
    assert v.shape == (5, 3) and v.dtype == DTYPE and not bool(v.any())


# ---------------------------------------------------------------- 5. per-element data
_GOALS = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [2.0, 0.0], [0.5, 0.0]], dtype=DTYPE)


def _goal_cost(declared=None, reads_t=False, running=True):
    if reads_t:
        def run(x, u, t):
            return ((x - _GOALS) ** 2).sum(-1) * (1 + 0 * t) + 0.1 * (u ** 2).sum(-1)
    elif running:       # ignores t: found time invariant unless declared
        def run(x, u, t):
            return ((x - _GOALS) ** 2).sum(-1) + 0.1 * (u ** 2).sum(-1)
    else:
        def run(x, u, t):
            return 0.1 * (u ** 2).sum(-1)
    return trajopt.Cost(run, lambda x: 10 * ((x - _GOALS) ** 2).sum(-1),
                        time_invariant=declared)


@pytest.mark.parametrize("declared", [None, True])
def test_per_element_reference_in_the_running_cost_is_named(declared):
    # was: torch's raw "Attempting to broadcast a dimension" RuntimeError
    with pytest.raises(trajopt.errors.ShapeError,
                       match=r"the running cost failed on the rows of all 30 stages stacked "
                             r"\(120 rows\) but not on the 4 rows of one stage.*bind_rows") as e:
        trajopt.solve_ddp(_double_integrator, _goal_cost(declared), torch.zeros(4, 2,
                          dtype=DTYPE), torch.zeros(T, 1, dtype=DTYPE))
    assert isinstance(e.value.__cause__, RuntimeError)   # the cost's own error, chained


@pytest.mark.parametrize("reads_t, running, who", [(True, True, "the running cost"),
                                                   (False, False, "the terminal cost")])
def test_per_element_reference_seen_in_the_derivatives_is_named(reads_t, running, who):
    with pytest.raises(trajopt.errors.ShapeError, match=f"{who} must map one point .*"
                                                        "bind_rows"):
        trajopt.solve_ddp(_double_integrator, _goal_cost(reads_t=reads_t, running=running),
                          torch.zeros(4, 2, dtype=DTYPE), torch.zeros(T, 1, dtype=DTYPE))


def test_a_module_with_dropout_zero_in_training_mode_solves():
    """``nn.Dropout(0.0)`` (a configured default) is the identity: a module in train()
    mode holding it solves as in eval() mode (a review of session 30 found it refused)."""
    class Dyn(torch.nn.Module):
        def __init__(self):
            super().__init__()
            torch.manual_seed(0)
            self.lin = torch.nn.Linear(3, 2).double()
            self.drop = torch.nn.Dropout(0.0)

        def forward(self, x, u, t):
            return x + 0.1 * torch.tanh(self.drop(self.lin(torch.cat([x, u], -1))))

    cost = trajopt.Cost(lambda x, u: (x ** 2).sum(-1) + (u ** 2).sum(-1),
                        terminal=lambda x: (x ** 2).sum(-1))
    costs = []
    for mode in ("train", "eval"):
        dyn = Dyn()
        getattr(dyn, mode)()
        res = trajopt.solve_ddp(dyn, cost, torch.ones(2, dtype=torch.float64),
                                torch.zeros(10, 1, dtype=torch.float64), max_iter=5)
        costs.append(float(res.cost))
    assert costs[0] == costs[1]
