"""The DDP loop under torch.inference_mode (trajopt.ddp.inference), float64: the solve's
rollouts run in the mode from the second solve with a model (the first under no_grad:
what a model makes at its first call, a lazy module's weights, is trained afterwards);
nothing that leaves the solve is an inference tensor (results, iteration logs, the
callback's logs: updated in place and used in autograd afterwards); reverse-mode stage
derivatives still run (outside the mode); a model that computes autograd gradients inside
itself is detected by the first rollout in the mode and solved outside it, with the answer
of the same model written without autograd; a model that fails either way keeps its
error."""

import math

import pytest
import torch

import trajopt
from tests.trajopt._pendulum import DT
from tests.trajopt._pendulum import pendulum as _pendulum
from trajopt.ddp.inference import forward_ad_works
from trajopt.ddp.models import DynamicsDerivatives
from trajopt.errors import ShapeError

F64 = dict(dtype=torch.float64)
#: the tests that see the mode entered; a torch without forward-mode derivatives in the
#: mode (2.11) solves outside it (the last test)
enters_the_mode = pytest.mark.skipif(
    not forward_ad_works(), reason="this torch takes no forward-mode derivatives under "
    "inference mode: every solve stays outside it")


def _cost():
    return trajopt.QuadraticCost(torch.diag(torch.tensor([1.0, 0.1], **F64)),
                                 0.05 * torch.eye(1, **F64),
                                 torch.diag(torch.tensor([50.0, 5.0], **F64)),
                                 x_ref=torch.tensor([math.pi, 0.0], **F64))


def _x0(B=3):
    return torch.linspace(-0.3, 0.3, B, **F64).unsqueeze(-1) * torch.tensor([1.0, 0.0], **F64)


@enters_the_mode
@pytest.mark.parametrize("wrapped", [True, False])
def test_rollouts_run_in_inference_mode_from_the_second_solve(wrapped):
    """The first solve with a model under no_grad (what the model makes and keeps at its
    first call must be normal tensors), every later one in inference mode -- also through
    ``solve_ddp(f, ...)``, which wraps ``f`` anew at each call."""
    seen = []

    def f(x, u, t):
        # a rollout sees the batch (3, 2); the derivatives see the points of all stages
        # (replicated, trajopt.ddp.reverse), or one point under vmap
        seen.append((x.shape == (3, 2), torch.is_inference_mode_enabled(),
                     torch.is_grad_enabled()))
        return _pendulum(x, u, t)

    dyn = trajopt.Dynamics(f, time_invariant=True) if wrapped else f
    for first in (True, False):
        seen.clear()
        trajopt.solve_ddp(dyn, _cost(), _x0(), torch.zeros(3, 40, 1, **F64), max_iter=3)
        rollouts = [(inference, grad) for batch, inference, grad in seen if batch]
        assert len(rollouts) >= 2 * 40 and not any(grad for _, grad in rollouts)
        assert all(inf != first for inf, _ in rollouts)
    # the reverse-mode derivative passes leave the mode, with grad mode on
    assert any(grad and not inf for batch, inf, grad in seen if not batch)
    assert not torch.is_inference_mode_enabled()


class _LazyPendulum(torch.nn.Module):
    """The pendulum plus a lazily built linear correction (its weights made at the first
    call): what a model keeps from its first call."""

    def __init__(self):
        super().__init__()
        self.correction = torch.nn.LazyLinear(2, dtype=torch.float64)

    def forward(self, x, u, t):
        return _pendulum(x, u, t) + 1e-3 * self.correction(torch.cat([x, u], -1))


def test_what_a_model_makes_at_its_first_call_is_trained_afterwards():
    model = _LazyPendulum()
    for _ in range(2):
        trajopt.solve_ddp(trajopt.Dynamics(model, time_invariant=True), _cost(), _x0(),
                          torch.zeros(3, 20, 1, **F64), max_iter=3)
    assert not any(p.is_inference() for p in model.parameters())
    model(_x0(), torch.ones(3, 1, **F64), 0).sum().backward()
    assert model.correction.weight.grad is not None


def test_nothing_that_leaves_is_an_inference_tensor():
    logs = []
    x0 = _x0().requires_grad_()    # as under no_grad: the solver's result has no graph
    solver = trajopt.DDPSolver(_pendulum, _cost(), max_iter=5, callback=logs.append)
    solver.solve(x0, torch.zeros(3, 40, 1, **F64))
    logs.clear()
    r = solver.solve(x0, torch.zeros(3, 40, 1, **F64))   # the second: in inference mode
    fields = [r.xs, r.us, r.K, r.k, r.Vx, r.Vxx, r.cost, r.converged, r.iterations]
    for log in r.history + logs:
        fields += [log.cost, log.regularization, log.step, log.expected, log.actual]
    assert len(logs) == len(r.history) > 0
    assert not any(v.is_inference() or v.requires_grad for v in fields)
    # what a caller does with them: update in place, differentiate through them
    r.us.add_(1.0)
    r.history[-1].cost.mul_(2.0)
    w = torch.ones(1, **F64, requires_grad=True)
    (r.us * w).sum().backward()
    assert torch.equal(w.grad, r.us.sum().reshape(1))


def test_callback_runs_outside_inference_mode_without_grad():
    modes = []
    for _ in range(2):   # the second solve in inference mode
        trajopt.solve_ddp(_pendulum, _cost(), _x0(), torch.zeros(3, 20, 1, **F64), max_iter=2,
                          callback=lambda log: modes.append((torch.is_inference_mode_enabled(),
                                                             torch.is_grad_enabled())))
    assert modes and not any(inf or grad for inf, grad in modes)   # as under no_grad


def test_reverse_mode_derivatives_still_taken():
    dyn = trajopt.Dynamics(_pendulum, time_invariant=True)
    for _ in range(2):   # the second solve in inference mode
        trajopt.solve_ddp(dyn, _cost(), _x0(), torch.zeros(3, 20, 1, **F64), max_iter=2)
    # set by the first evaluation of the reverse-mode pass against the transforms
    assert dyn._reverse_agrees is True


def _energy(q, p):
    return 0.5 * p ** 2 + 9.81 * (1 - torch.cos(q))


def _hamiltonian_step(x, u, t):
    """A symplectic-Euler-like step whose vector field is autograd's gradient of H."""
    with torch.enable_grad():
        z = x.detach().requires_grad_()
        (g,) = torch.autograd.grad(_energy(z[..., 0], z[..., 1]).sum(), z)
    return x + DT * torch.stack([g[..., 1], -g[..., 0] + u[..., 0]], -1)


def _explicit_step(x, u, t):
    """The same map with the gradient of H written out."""
    return x + DT * torch.stack([x[..., 1], -9.81 * torch.sin(x[..., 0]) + u[..., 0]], -1)


class _Analytic(trajopt.Dynamics):
    """``f`` with its Jacobians written out (what a user with an autograd-inside model
    gives: torch.func cannot differentiate through torch.autograd.grad)."""

    def derivatives(self, x, u, t, *, second_order=False):
        N = x.shape[0]
        fx = torch.eye(2, **F64).repeat(N, 1, 1)
        fx[:, 0, 1] += DT
        fx[:, 1, 0] -= DT * 9.81 * torch.cos(x[:, 0])
        fu = torch.zeros(N, 2, 1, **F64)
        fu[:, 1, 0] = DT
        return DynamicsDerivatives(fx=fx, fu=fu)


@enters_the_mode
def test_model_with_autograd_inside_is_solved_outside_the_mode():
    us0 = torch.zeros(3, 30, 1, **F64)
    inside = _Analytic(_hamiltonian_step, time_invariant=True)
    ref = trajopt.solve_ddp(_Analytic(_explicit_step, time_invariant=True), _cost(), _x0(),
                            us0)
    first = trajopt.solve_ddp(inside, _cost(), _x0(), us0)    # under no_grad
    second = trajopt.solve_ddp(inside, _cost(), _x0(), us0)   # refused, solved outside
    assert inside._trajopt_needs_autograd is True
    again = trajopt.solve_ddp(inside, _cost(), _x0(), us0)   # marked: no second try
    for r in (first, second, again):
        assert list(r.reason) == list(ref.reason)
        torch.testing.assert_close(r.us, ref.us, rtol=0, atol=1e-12)
        torch.testing.assert_close(r.cost, ref.cost, rtol=1e-14, atol=0)


def test_model_failing_either_way_keeps_its_error():
    def broken(x, u, t):
        return x @ torch.ones(5, 2, **F64)     # wrong inner size, in any mode

    dyn = trajopt.Dynamics(broken, time_invariant=True)
    with pytest.raises(ShapeError, match="the dynamics or cost failed on x0"):
        trajopt.solve_ddp(dyn, _cost(), _x0(), torch.zeros(3, 10, 1, **F64))
    assert not getattr(dyn, "_trajopt_needs_autograd", False)


def test_a_torch_without_forward_derivatives_in_the_mode_solves_outside_it(monkeypatch):
    """torch 2.11 raises for ``vmap(jacfwd(f))`` under inference mode ("Batching rule not
    implemented for aten::_make_dual"; seen on a GPU machine): the probe says so, and then
    every solve stays out of the mode -- a constrained solve, whose constraint Jacobians
    are forward-mode, included -- with the answer of the solve in the mode."""
    import trajopt.ddp.inference as inference
    real = torch.func.jacfwd

    def jacfwd_of_torch_2_11(*a, **kw):
        fn = real(*a, **kw)

        def jac(*args):
            if torch.is_inference_mode_enabled():
                raise RuntimeError("Batching rule not implemented for aten::_make_dual")
            return fn(*args)
        return jac
    monkeypatch.setattr(torch.func, "jacfwd", jacfwd_of_torch_2_11)
    assert inference.forward_ad_works.__wrapped__() is False
    monkeypatch.setattr(torch.func, "jacfwd", real)

    seen = []

    def f(x, u, t):
        seen.append(torch.is_inference_mode_enabled())
        return _pendulum(x, u, t)
    cons = [trajopt.Constraint(lambda x, u: u[..., 0] - 2.0)]

    def solve():
        return trajopt.solve_ddp(f, _cost(), _x0(), torch.zeros(3, 40, 1, **F64),
                                 constraints=cons, max_iter=5)
    solve()
    in_mode = solve()    # in the mode where this torch allows (2.13), else outside
    assert any(seen) == forward_ad_works()
    seen.clear()
    monkeypatch.setattr(inference, "forward_ad_works", lambda: False)
    for module in ("constraints", "models", "lagrangian", "spans"):
        monkeypatch.setattr(f"trajopt.ddp.{module}.jacfwd", jacfwd_of_torch_2_11)
    outside = solve()
    assert seen and not any(seen)   # and no RuntimeError from the constraint's Jacobian
    assert torch.equal(outside.us, in_mode.us) and torch.equal(outside.cost, in_mode.cost)
