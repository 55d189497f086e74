"""The DDP loop under torch.inference_mode (trajopt.ddp.inference), float64: the solve's
rollouts run in the mode; nothing that leaves the solve is an inference tensor (results,
iteration logs, the callback's logs: updated in place and used in autograd afterwards);
reverse-mode stage derivatives still run (outside the mode); a model that computes
autograd gradients inside itself is detected by the first rollout and solved outside the
mode, with the answer of the same model written without autograd; a model that fails
either way keeps its error."""

import math

import pytest
import torch

import trajopt
from tests.trajopt._pendulum import DT
from tests.trajopt._pendulum import pendulum as _pendulum
from trajopt.ddp.models import DynamicsDerivatives
from trajopt.errors import ShapeError

F64 = dict(dtype=torch.float64)


def _cost():
    return trajopt.QuadraticCost(torch.diag(torch.tensor([1.0, 0.1], **F64)),
                                 0.05 * torch.eye(1, **F64),
                                 torch.diag(torch.tensor([50.0, 5.0], **F64)),
                                 x_ref=torch.tensor([math.pi, 0.0], **F64))


def _x0(B=3):
    return torch.linspace(-0.3, 0.3, B, **F64).unsqueeze(-1) * torch.tensor([1.0, 0.0], **F64)


def test_rollouts_run_in_inference_mode():
    seen = []

    def f(x, u, t):
        # a rollout sees the batch (3, 2); the derivatives see one point under vmap
        seen.append((x.dim() == 2, torch.is_inference_mode_enabled(),
                     torch.is_grad_enabled()))
        return _pendulum(x, u, t)

    trajopt.solve_ddp(trajopt.Dynamics(f, time_invariant=True), _cost(), _x0(),
                      torch.zeros(3, 40, 1, **F64), max_iter=3)
    rollouts = [(inference, grad) for batch, inference, grad in seen if batch]
    assert len(rollouts) >= 2 * 40 and all(inf and not grad for inf, grad in rollouts)
    # the reverse-mode derivative passes leave the mode, with grad mode on
    assert any(grad and not inf for batch, inf, grad in seen if not batch)
    assert not torch.is_inference_mode_enabled()


def test_nothing_that_leaves_is_an_inference_tensor():
    logs = []
    x0 = _x0().requires_grad_()    # as under no_grad: the solver's result has no graph
    r = trajopt.DDPSolver(_pendulum, _cost(), max_iter=5, callback=logs.append).solve(
        x0, torch.zeros(3, 40, 1, **F64))
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
    trajopt.solve_ddp(_pendulum, _cost(), _x0(), torch.zeros(3, 20, 1, **F64), max_iter=2,
                      callback=lambda log: modes.append((torch.is_inference_mode_enabled(),
                                                         torch.is_grad_enabled())))
    assert modes and not any(inf or grad for inf, grad in modes)   # as under no_grad


def test_reverse_mode_derivatives_still_taken():
    dyn = trajopt.Dynamics(_pendulum, time_invariant=True)
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


def test_model_with_autograd_inside_is_solved_outside_the_mode():
    us0 = torch.zeros(3, 30, 1, **F64)
    inside = _Analytic(_hamiltonian_step, time_invariant=True)
    ref = trajopt.solve_ddp(_Analytic(_explicit_step, time_invariant=True), _cost(), _x0(),
                            us0)
    first = trajopt.solve_ddp(inside, _cost(), _x0(), us0)
    assert inside._trajopt_needs_autograd is True
    again = trajopt.solve_ddp(inside, _cost(), _x0(), us0)   # marked: no second try
    for r in (first, again):
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
