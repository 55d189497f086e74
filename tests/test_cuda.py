"""The same results on a CUDA device as on the CPU (skipped without one).

float64 throughout except where a test says otherwise; each compares a GPU result with the
CPU result of the same call (the CPU paths are verified against independent references in
the other test files), so these check device placement and device-specific kernels.
"""

import math

import pytest
import torch
from torch import nn
from torch.nn import functional as F  # noqa: N812

import nnbridge
import trajopt

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
DT = torch.float64
GPU = "cuda"


def _both(fn):
    return fn("cpu"), fn(GPU)


def test_finite_lqr_on_cuda():
    g = torch.Generator().manual_seed(0)
    T, n, m, B = 30, 4, 2, 8
    A = torch.randn(B, T, n, n, generator=g, dtype=DT) / 2
    Bm = torch.randn(B, T, n, m, generator=g, dtype=DT)
    x0 = torch.randn(B, n, generator=g, dtype=DT)

    def solve(dev):
        eye_n, eye_m = (torch.eye(k, dtype=DT, device=dev) for k in (n, m))
        prob = trajopt.LQR(A=A.to(dev), B=Bm.to(dev), Q=eye_n.expand(T, n, n),
                           R=eye_m.expand(T, m, m), QT=eye_n)
        return trajopt.solve_lqr(prob, x0.to(dev))
    cpu, gpu = _both(solve)
    assert gpu.K.device.type == "cuda"
    torch.testing.assert_close(gpu.K.cpu(), cpu.K, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("method", ["doubling", "auto"])
def test_batched_dare_on_cuda(method):
    g = torch.Generator().manual_seed(1)
    A = torch.randn(64, 6, 6, generator=g, dtype=DT) / 6 ** 0.5
    Bm = torch.randn(64, 6, 2, generator=g, dtype=DT)
    cpu, gpu = _both(lambda dev: trajopt.solve_dare(
        A.to(dev), Bm.to(dev), torch.eye(6, dtype=DT, device=dev),
        torch.eye(2, dtype=DT, device=dev), method=method))
    assert gpu.P.device.type == "cuda"
    torch.testing.assert_close(gpu.P.cpu(), cpu.P, rtol=1e-9, atol=1e-10)


def _pendulum(x, u, t):
    th, dth = x[..., 0], x[..., 1]
    return torch.stack([th + 0.05 * dth,
                        dth + 0.05 * (u[..., 0] - 0.1 * dth - 9.81 * torch.sin(th))], -1)


def _swing_up(dev, B):
    """A QuadraticCost towards the upright pendulum and B initial states on ``dev``."""
    eye = torch.eye(2, dtype=DT, device=dev)
    cost = trajopt.QuadraticCost(0.01 * eye, 0.1 * torch.eye(1, dtype=DT, device=dev),
                                 100 * eye, x_ref=torch.tensor([math.pi, 0.0], dtype=DT,
                                                               device=dev))
    x0 = torch.zeros(B, 2, dtype=DT, device=dev)
    x0[:, 0] = torch.linspace(-0.3, 0.3, B, dtype=DT)
    return cost, x0


def test_ddp_on_cuda():
    """iLQR on a batch of pendulums with a user-written dynamics and a QuadraticCost."""
    def solve(dev):
        cost, x0 = _swing_up(dev, 4)
        return trajopt.solve_ddp(_pendulum, cost, x0,
                                 torch.zeros(4, 40, 1, dtype=DT, device=dev), max_iter=30)
    cpu, gpu = _both(solve)
    assert gpu.us.device.type == "cuda"
    torch.testing.assert_close(gpu.us.cpu(), cpu.us, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(gpu.cost.cpu(), cpu.cost, rtol=1e-10, atol=1e-12)



def test_ddp_warm_start_with_states_on_cuda():
    """``xs0`` on the GPU: the MPC shift of a solve (every stage but the last consistent)
    is checked on the device and gives the cold solve's answer, GPU == CPU."""
    def solve(dev):
        cost, x0 = _swing_up(dev, 3)
        solver = trajopt.DDPSolver(trajopt.Dynamics(_pendulum), cost, max_iter=5)
        r = solver.solve(x0, torch.zeros(3, 40, 1, dtype=DT, device=dev))
        x, us = r.xs[:, 1].clone(), torch.cat([r.us[:, 1:], r.us[:, -1:]], 1)
        xs = torch.cat([r.xs[:, 1:], r.xs[:, -1:]], 1)
        check, kept = solver.structure.consistent_prefix, []
        solver.structure.consistent_prefix = lambda *a: kept.append(check(*a)) or kept[-1]
        return solver.solve(x, us, xs0=xs), solver.solve(x, us), kept[-1]
    (cpu, cpu_cold, cpu_kept), (gpu, gpu_cold, gpu_kept) = _both(solve)
    assert gpu.us.device.type == "cuda"
    assert gpu_kept.cpu().tolist() == cpu_kept.tolist() == [39] * 3  # all but the last
    torch.testing.assert_close(gpu.us, gpu_cold.us, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cpu.us, cpu_cold.us, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gpu.us.cpu(), cpu.us, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(gpu.cost.cpu(), cpu.cost, rtol=1e-10, atol=1e-12)


def _mlp(dev, dtype=DT):
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Linear(8, 8), nn.ReLU(),
                         nn.Linear(8, 4)).to(dev, dtype)


@pytest.mark.parametrize("curvature", ["identity", "adam", "ekfac", "exact"])
@pytest.mark.parametrize("terminal", ["ggn", "fisher"])
def test_ddpnopt_steps_on_cuda(curvature, terminal):
    """Three DDPNOpt steps: the GPU run equals the CPU run (the sampled Fisher draws from a
    generator on the device, so "fisher" only checks that it runs and stays finite)."""
    g = torch.Generator().manual_seed(2)
    X = torch.randn(16, 6, generator=g, dtype=DT)
    y = torch.randint(0, 4, (16,), generator=g)
    extra = {"regularization": 1.0} if curvature == "exact" else {}

    def train(dev):
        model = _mlp(dev)
        opt = nnbridge.DDPNOpt(model, lr=0.05 if curvature != "adam" else 1e-2,
                               curvature=curvature, terminal_hessian=terminal, **extra)
        Xd, yd = X.to(dev), y.to(dev)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(Xd), yd).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]
    cpu, gpu = _both(train)
    for p, q in zip(cpu, gpu):
        assert q.device.type == "cuda" and bool(torch.isfinite(q).all())
        if terminal == "ggn":
            torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_ddpnopt_under_cuda_autocast(dtype):
    """An autocast forward/backward on the GPU: the DDP pass runs in float32 and the
    identity-curvature update matches the float32 step to the half type's resolution."""
    g = torch.Generator().manual_seed(3)
    X = torch.randn(64, 6, generator=g).cuda()
    y = torch.randint(0, 4, (64,), generator=g).cuda()
    steps = []
    for autocast in (False, True):
        model = _mlp("cuda", torch.float32)
        U0 = [p.detach().clone() for p in model.parameters()]
        opt = nnbridge.DDPNOpt(model, lr=0.3, curvature="identity")
        opt.zero_grad()
        with torch.autocast("cuda", dtype=dtype, enabled=autocast):
            loss = F.cross_entropy(model(X), y)
        loss.backward()
        opt.step()
        assert all(p.dtype == torch.float32 for p in model.parameters())
        steps.append(torch.cat([(p.detach() - u).flatten()
                                for p, u in zip(model.parameters(), U0)]))
    err = float((steps[1] - steps[0]).norm() / steps[0].norm())
    assert err < 2e-2, err


def test_training_run_on_cuda():
    pytest.importorskip("sklearn")
    from nnbridge.training import RunConfig, run
    r = run(RunConfig(optimizer="ddpnopt-adam", dataset="iris", epochs=2, device="cuda"))
    assert 0.3 < r.test_accuracy <= 1 and math.isfinite(r.final_train_loss)


@pytest.mark.parametrize("curvature", ["identity", "adam", "ekfac"])
def test_gtddp_resnet_on_cuda(curvature):
    """Two GT-DDP steps on the BatchNorm ResNet (convolution stages, residual slots, a
    projection-shortcut player, the default GGN terminal Hessian; CholeskyQR2 on the GPU,
    Householder on the CPU): GPU == CPU.  Batch 48 so that EKFAC's Kronecker factors have
    full rank (with rank-deficient ones EKFAC's step depends on the eigenbasis each
    device's eigensolver picks inside the null space: docs/ddpnopt.md)."""
    from nnbridge.models import resnet
    g = torch.Generator().manual_seed(4)
    X = torch.randn(48, 1, 8, 8, generator=g, dtype=DT)
    y = torch.randint(0, 10, (48,), generator=g)

    def train(dev):
        torch.manual_seed(0)
        model = resnet((1, 8, 8), 10).to(dev, DT)
        opt = nnbridge.GTDDP(model, lr=0.05 if curvature != "adam" else 1e-2,
                             curvature=curvature)
        Xd, yd = X.to(dev), y.to(dev)
        for _ in range(2):
            opt.zero_grad()
            F.cross_entropy(model(Xd), yd).backward()
            opt.step()
        return [p.detach() for p in model.parameters()]
    cpu, gpu = _both(train)
    # EKFAC: 1e-7 (measured 6.7e-9 on an H200): its per-eigendirection scaling follows the
    # eigenvectors of the Kronecker factors, which amplify rounding where eigenvalues
    # nearly coincide; permuting the batch on the CPU moves the step by 1e-8 too
    tol = dict(rtol=1e-6, atol=1e-7) if curvature == "ekfac" else dict(rtol=1e-8, atol=1e-9)
    for p, q in zip(cpu, gpu):
        assert q.device.type == "cuda"
        torch.testing.assert_close(q.cpu(), p, **tol)


def test_joint_value_on_cuda():
    """The batch-augmented value (``value_hessian="joint"``) on the GPU == on the CPU."""
    g = torch.Generator().manual_seed(5)
    X = torch.randn(4, 6, generator=g, dtype=DT)
    y = torch.randint(0, 4, (4,), generator=g)

    def train(dev):
        model = _mlp(dev)
        opt = nnbridge.DDPNOpt(model, lr=0.05, curvature="identity", value_hessian="joint",
                               terminal_hessian="ggn")
        opt.zero_grad()
        F.cross_entropy(model(X.to(dev)), y.to(dev)).backward()
        opt.step()
        return [p.detach() for p in model.parameters()]
    cpu, gpu = _both(train)
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-10)


def test_care_sign_and_gradients_on_cuda():
    """The batched CARE (sign iteration + Newton) and the implicit DARE / CARE gradients on
    the GPU equal the CPU's."""
    g = torch.Generator().manual_seed(6)
    A = torch.randn(32, 5, 5, generator=g, dtype=DT) / 5 ** 0.5
    Bm = torch.randn(32, 5, 2, generator=g, dtype=DT)

    def run(dev, solve):
        a = A.detach().to(dev).clone().requires_grad_()
        b = Bm.detach().to(dev).clone().requires_grad_()
        sol = solve(a, b, torch.eye(5, dtype=DT, device=dev), torch.eye(2, dtype=DT,
                                                                         device=dev))
        (sol.P.sum() + sol.K.square().sum()).backward()
        return sol.P.detach(), a.grad, b.grad
    for solve in (trajopt.solve_care, trajopt.solve_dare):
        cpu, gpu = _both(lambda dev, solve=solve: run(dev, solve))
        for c, q in zip(cpu, gpu):
            assert q.device.type == "cuda"
            torch.testing.assert_close(q.cpu(), c, rtol=1e-8, atol=1e-9)


def test_c2d_and_ddp_gradients_on_cuda():
    A = torch.randn(4, 3, 3, dtype=DT)
    Bm = torch.randn(4, 3, 1, dtype=DT)
    cpu, gpu = _both(lambda dev: trajopt.c2d(A.to(dev), Bm.to(dev), 0.1))
    for c, q in zip(cpu, gpu):
        torch.testing.assert_close(q.cpu(), c, rtol=1e-12, atol=1e-13)

    def grads(dev):
        damp = torch.tensor(0.1, dtype=DT, device=dev, requires_grad=True)

        def f(x, u, t):
            return torch.stack([x[..., 0] + 0.05 * x[..., 1], x[..., 1] + 0.05 * (
                u[..., 0] - damp * x[..., 1] - 9.81 * torch.sin(x[..., 0]))], -1)
        eye = torch.eye(2, dtype=DT, device=dev)
        cost = trajopt.QuadraticCost(0.01 * eye, 0.1 * torch.eye(1, dtype=DT, device=dev),
                                     10 * eye)
        x0 = torch.tensor([[0.3, 0.0], [-0.2, 0.1]], dtype=DT, device=dev)
        res = trajopt.solve_ddp(f, cost, x0, torch.zeros(2, 20, 1, dtype=DT, device=dev),
                                params=(damp,), tol=1e-12)
        (g,) = torch.autograd.grad(res.us.square().sum(), damp)
        return g
    cpu, gpu = _both(grads)
    torch.testing.assert_close(gpu.cpu(), cpu, rtol=1e-7, atol=1e-9)


def test_constrained_ddp_and_its_gradient_on_cuda():
    """A batch of unicycles around two obstacles, constraints by the augmented Lagrangian
    (multipliers per element on the device), and the gradient of the cost with respect to
    an obstacle's radius through the active set: the CPU's results."""
    from trajopt import problems
    radius = 0.25

    def solve(dev):
        r = torch.tensor(radius, dtype=DT, device=dev, requires_grad=True)
        p = problems.unicycle(T=40, dt=0.2)
        centre = torch.tensor([1.0, 0.1], dtype=DT, device=dev)

        def outside(x):
            return (r ** 2 - ((x[..., :2] - centre) ** 2).sum(-1))
        cons = [trajopt.Constraint(outside), trajopt.Constraint(outside, where="terminal")]
        x0 = torch.zeros(4, 3, dtype=DT, device=dev)
        x0[:, 1] = torch.linspace(-0.1, 0.1, 4, dtype=DT, device=dev)
        lim = tuple(v.to(dev) for v in p.control_limits)
        res = trajopt.solve_ddp(p.dynamics, p.cost, x0, torch.zeros(4, 40, 2, dtype=DT,
                                                                    device=dev),
                                control_limits=lim, constraints=cons, params=(r,),
                                tol=1e-12)
        return res, torch.autograd.grad(res.cost.sum(), r)[0]
    (cpu, g_cpu), (gpu, g_gpu) = _both(solve)
    assert gpu.us.device.type == "cuda" and list(gpu.reason) == list(cpu.reason)
    assert float(gpu.max_violation.max()) <= 1e-6
    torch.testing.assert_close(gpu.us.detach().cpu(), cpu.us.detach(), rtol=0, atol=1e-6)
    torch.testing.assert_close(g_gpu.cpu(), g_cpu, rtol=1e-6, atol=1e-8)


def _spy_on(monkeypatch, module, name):
    """Record, for each call of ``module.name``, whether it returned something."""
    seen, real = [], getattr(module, name)

    def spy(*a):
        out = real(*a)
        seen.append(out is not None)
        return out
    monkeypatch.setattr(module, name, spy)
    return seen


def test_linear_dynamics_scanned_rollouts_on_cuda(monkeypatch):
    """DDP with time-varying ``LinearDynamics`` (offset included) on three initial states:
    the GPU's rollouts are taken by the parallel scan (every one held its self-check) and
    its solution equals the CPU's."""
    import trajopt.ddp.chain as chain_mod
    g = torch.Generator().manual_seed(3)
    T, n, m = 40, 4, 2
    A = torch.eye(n, dtype=DT) + 0.15 * torch.randn(T, n, n, generator=g, dtype=DT)
    Bm = torch.randn(T, n, m, generator=g, dtype=DT)
    c = torch.randn(T, n, generator=g, dtype=DT)
    x0 = torch.randn(3, n, generator=g, dtype=DT)
    seen = _spy_on(monkeypatch, chain_mod, "checked_states")

    def solve(dev):
        eye_n, eye_m = (torch.eye(k, dtype=DT, device=dev) for k in (n, m))
        cost = trajopt.QuadraticCost(eye_n, 0.1 * eye_m, 10 * eye_n,
                                     x_goal=torch.ones(n, dtype=DT, device=dev))
        dyn = trajopt.LinearDynamics(A.to(dev), Bm.to(dev), c.to(dev))
        return trajopt.solve_ddp(dyn, cost, x0.to(dev), torch.zeros(3, T, m, dtype=DT,
                                                                     device=dev))
    cpu = solve("cpu")
    seen.clear()
    gpu = solve("cuda")
    assert gpu.xs.device.type == "cuda" and len(seen) >= 2 and all(seen)
    assert torch.equal(gpu.iterations.cpu(), cpu.iterations)
    scale = float(cpu.xs.abs().max())
    torch.testing.assert_close(gpu.xs.cpu(), cpu.xs, rtol=0, atol=1e-12 * scale)
    torch.testing.assert_close(gpu.us.cpu(), cpu.us, rtol=0, atol=1e-12 * scale)


def test_solve_lqr_scanned_rollout_on_cuda(monkeypatch):
    """``solve_lqr``'s optimal rollout of 16 initial states (time-varying stages shared by
    the batch) by the scan on the GPU: the CPU's states, controls and costs."""
    import trajopt.lqr.finite as finite
    g = torch.Generator().manual_seed(4)
    T, n, m = 60, 6, 2
    A = torch.eye(n, dtype=DT) + 0.1 * torch.randn(T, n, n, generator=g, dtype=DT)
    Bm = torch.randn(T, n, m, generator=g, dtype=DT)
    x0 = torch.randn(16, n, generator=g, dtype=DT)
    seen = _spy_on(monkeypatch, finite, "scan_closed_loop")

    def solve(dev):
        eye_n, eye_m = (torch.eye(k, dtype=DT, device=dev) for k in (n, m))
        prob = trajopt.LQR(A=A.to(dev), B=Bm.to(dev), Q=eye_n.expand(T, n, n),
                           R=eye_m.expand(T, m, m), QT=eye_n)
        return trajopt.solve_lqr(prob, x0.to(dev))
    cpu = solve("cpu")
    seen.clear()
    gpu = solve("cuda")
    assert seen == [True]
    for name in ("xs", "us", "cost"):
        ref, got = getattr(cpu, name), getattr(gpu, name)
        assert got.device.type == "cuda"
        torch.testing.assert_close(got.cpu(), ref, rtol=0,
                                   atol=1e-12 * float(ref.abs().max()))


@pytest.mark.parametrize("solve", ["cg", "auto"])
def test_lqr_descent_output_space_solve_on_cuda(monkeypatch, solve):
    """The natural-gradient direction's output-space system (B n_out = 2,560) on the GPU:
    "cg" (conjugate gradients) equals the CPU's direct solve; "auto" runs no CG there (a
    GPU's per-launch cost leaves CG less than CG_PATIENCE iterations of the direct solve's
    time at this size: ``OP_COST_CUDA``) and is bitwise the GPU's "direct".  Then one
    ``LQRDescent`` step per device agrees to the same tolerance (CG stops at 10 eps
    relative residual; the Gramian's condition is ~1e3 here)."""
    import nnbridge.gramian as gramian
    from nnbridge.models import mlp
    runs = []
    real = gramian.conjugate_gradient
    monkeypatch.setattr(gramian, "conjugate_gradient",
                        lambda *a, **kw: runs.append(real(*a, **kw)) or runs[-1])
    g = torch.Generator().manual_seed(8)
    X = torch.randn(256, 64, generator=g, dtype=DT)
    y = torch.randint(0, 10, (256,), generator=g)

    def direction(dev, how):
        torch.manual_seed(0)
        model = mlp(64, 10).to(dev, DT)
        d = nnbridge.lqr_direction(model, X.to(dev), y.to(dev), F.cross_entropy,
                                   divergence="kl", damping=1e-3, solve=how)
        return torch.cat([v.reshape(-1) for v in d])
    ref = direction("cpu", "direct")
    got = direction("cuda", solve)
    assert got.device.type == "cuda"
    if solve == "cg":
        assert len(runs) == 1 and runs[0].converged
    else:
        assert runs == [] and torch.equal(got, direction("cuda", "direct"))
    err = float((got.cpu() - ref).norm() / ref.norm())
    assert err < 1e-10, err

    def step(dev):
        torch.manual_seed(0)
        model = mlp(64, 10).to(dev, DT)
        opt = nnbridge.LQRDescent(model, lr=0.3, solve=solve)
        Xd, yd = X.to(dev), y.to(dev)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(model(Xd), yd)
            loss.backward()
            return loss
        opt.step(closure)
        return [p.detach() for p in model.parameters()]
    cpu, gpu = _both(step)
    for p, q in zip(cpu, gpu):
        torch.testing.assert_close(q.cpu(), p, rtol=1e-9, atol=1e-11)


@pytest.mark.parametrize("special", [None, math.nan, math.inf, -math.inf, 3e38])
def test_the_step_check_on_cuda(special):
    """DDPNOpt's finiteness check takes torch's foreach norm on a GPU (one launch per
    dtype) and one ``aminmax`` a tensor on the CPU: both give the plain max |x|, NaN where
    an entry is NaN (float32 and float64 mixed, an empty tensor among them)."""
    from nnbridge.ddpnopt import _largest_magnitude
    g = torch.Generator().manual_seed(9)
    ts = [torch.randn(7, 5, generator=g), torch.randn(0), torch.randn(4, generator=g,
                                                                       dtype=DT)]
    if special is not None:
        ts[0][3, 2] = special
    cpu = float(_largest_magnitude(ts))
    gpu = _largest_magnitude([t.cuda() for t in ts])
    ref = float(torch.cat([t.double().reshape(-1) for t in ts]).abs().max())
    assert gpu.device.type == "cuda"
    if special is not None and math.isnan(special):
        assert math.isnan(cpu) and math.isnan(float(gpu))
    else:
        assert cpu == ref and float(gpu) == ref


@pytest.mark.parametrize("method", ["doubling", "auto"])
def test_descriptor_dare_with_cross_term_on_cuda(method):
    """A batch of DAREs with E and S on the GPU (the torch doubling loop; on the CPU float64
    data of n <= 24 take the compiled loop): the CPU's solutions and gains."""
    g = torch.Generator().manual_seed(10)
    n, m, batch = 5, 2, 32
    A = torch.randn(batch, n, n, generator=g, dtype=DT) / n ** 0.5
    Bm = torch.randn(batch, n, m, generator=g, dtype=DT)
    E = torch.eye(n, dtype=DT) + 0.2 * torch.randn(batch, n, n, generator=g, dtype=DT)
    S = 0.1 * torch.randn(batch, n, m, generator=g, dtype=DT)
    cpu, gpu = _both(lambda dev: trajopt.solve_dare(
        A.to(dev), Bm.to(dev), torch.eye(n, dtype=DT, device=dev),
        torch.eye(m, dtype=DT, device=dev), E.to(dev), S.to(dev), method=method))
    assert gpu.P.device.type == GPU
    scale = float(cpu.P.abs().max())
    torch.testing.assert_close(gpu.P.cpu(), cpu.P, rtol=0, atol=1e-10 * scale)
    torch.testing.assert_close(gpu.K.cpu(), cpu.K, rtol=0,
                               atol=1e-10 * float(cpu.K.abs().max()))


def test_multiple_shooting_and_mpc_on_cuda():
    """Multiple shooting from crocoddyl's start (every state x0) and three MPC steps with
    a warm start, pendulums on the GPU: the CPU's controls and costs."""
    def solve(dev):
        cost, x0 = _swing_up(dev, 3)
        us0 = torch.zeros(3, 40, 1, dtype=DT, device=dev)
        xs0 = x0[:, None].expand(3, 41, 2).clone()
        shot = trajopt.solve_ddp(_pendulum, cost, x0, us0, xs0=xs0, shooting="multiple",
                                 max_iter=60)
        mpc = trajopt.MPC(_pendulum, cost, horizon=30, n_controls=1)
        x, us = x0, []
        for _ in range(3):
            u = mpc.step(x)
            us.append(u)
            x = _pendulum(x, u, 0)
        return shot, torch.stack(us, 1), x
    (cpu, cpu_us, cpu_x), (gpu, gpu_us, gpu_x) = _both(solve)
    assert gpu.us.device.type == GPU and gpu_us.device.type == GPU
    assert list(gpu.reason) == list(cpu.reason)
    assert float(gpu.max_gap.max()) == 0.0
    torch.testing.assert_close(gpu.us.cpu(), cpu.us, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(gpu.cost.cpu(), cpu.cost, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gpu_us.cpu(), cpu_us, rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(gpu_x.cpu(), cpu_x, rtol=1e-9, atol=1e-10)


class _ConvNet(nn.Module):
    """A model written the way people write them: convolutions with GroupNorm, a residual
    addition in forward where asked, a pooled linear head."""

    def __init__(self, residual):
        super().__init__()
        self.residual = residual
        self.conv1 = nn.Conv2d(1, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.conv2 = nn.Conv2d(4, 4, 3, padding=1)
        self.head = nn.Linear(4 * 4 * 4, 3)

    def forward(self, x):
        h = F.relu(self.norm(self.conv1(x)))
        h = h + F.relu(self.conv2(h)) if self.residual else F.relu(self.conv2(h))
        return self.head(F.max_pool2d(h, 2).flatten(1))


@pytest.mark.parametrize("optimizer,curvature", [("DDPNOpt", "adam"), ("DDPNOpt", "ekfac"),
                                                 ("GTDDP", "adam")])
def test_custom_module_training_loop_on_cuda(optimizer, curvature):
    """DDPNOpt on a custom ``nn.Module`` with GroupNorm, GT-DDP on the same with a residual
    addition (feedback, the GGN terminal Hessian: DDPNOpt's default, the sampled Fisher,
    draws from each device's generator), in an ordinary loop (a scheduler, gradient
    clipping): three steps on the GPU equal the CPU's."""
    g = torch.Generator().manual_seed(11)
    X = torch.randn(40, 1, 8, 8, generator=g, dtype=DT)
    y = torch.randint(0, 3, (40,), generator=g)

    def train(dev):
        torch.manual_seed(0)
        model = _ConvNet(residual=optimizer == "GTDDP").to(dev, DT)
        opt = getattr(nnbridge, optimizer)(model, lr=1e-2 if curvature == "adam" else 0.05,
                                           curvature=curvature, terminal_hessian="ggn")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        Xd, yd = X.to(dev), y.to(dev)
        for _ in range(3):
            opt.zero_grad()
            F.cross_entropy(model(Xd), yd).backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 0.1)   # clips: |g| ~ 0.5
            opt.step()
            sched.step()
        return [p.detach() for p in model.parameters()]
    cpu, gpu = _both(train)
    tol = dict(rtol=1e-6, atol=1e-7) if curvature == "ekfac" else dict(rtol=1e-8, atol=1e-9)
    for p, q in zip(cpu, gpu):
        assert q.device.type == GPU
        torch.testing.assert_close(q.cpu(), p, **tol)


def test_deq_on_cuda():
    """A deep equilibrium layer's fixed point and its gradient through the DARE (the
    infinite-horizon LQR of the fixed point) on the GPU: the CPU's."""
    g = torch.Generator().manual_seed(12)
    x = torch.randn(6, 3, generator=g, dtype=DT)
    w = torch.randn(6, 5, generator=g, dtype=DT)

    def run(dev):
        torch.manual_seed(0)
        lin, inj = nn.Linear(5, 5).to(dev, DT), nn.Linear(3, 5).to(dev, DT)
        with torch.no_grad():
            lin.weight.mul_(0.5)

        class Cell(nn.Module):
            def __init__(self):
                super().__init__()
                self.lin, self.inj = lin, inj

            def forward(self, z, x):
                return torch.tanh(self.lin(z) + self.inj(x))
        cell = Cell()
        deq = nnbridge.DEQ(cell, (5,), tol=1e-13, max_iter=500)
        xd = x.detach().to(dev).requires_grad_()
        z = deq(xd)
        (z * w.to(dev)).sum().backward()
        return [z.detach(), xd.grad] + [p.grad for p in cell.parameters()]
    cpu, gpu = _both(run)
    for c, q in zip(cpu, gpu):
        assert q.device.type == GPU
        torch.testing.assert_close(q.cpu(), c, rtol=1e-9, atol=1e-11)
