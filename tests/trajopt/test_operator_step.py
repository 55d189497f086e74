"""The operator-form Riccati step against the dense step and explicit per-sample formulas."""

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._hypothesis import examples
from trajopt.lqr.operator_step import (
    DenseOperatorStage,
    DenseResponse,
    DenseValue,
    RankOneValue,
    operator_riccati_step,
)
from trajopt.lqr.riccati import CholeskySolver, riccati_step


def _problem(seed, B, n, n1, m):
    g = torch.Generator().manual_seed(seed)
    A = torch.randn(B, n1, n, generator=g, dtype=torch.float64)
    Bu = torch.randn(B, n1, m, generator=g, dtype=torch.float64)
    Vx = torch.randn(B, n1, generator=g, dtype=torch.float64)
    Z = torch.randn(B, n1, n1, generator=g, dtype=torch.float64)
    Vxx = Z @ Z.transpose(-1, -2) + torch.eye(n1, dtype=torch.float64)
    lu = torch.randn(m, generator=g, dtype=torch.float64)
    return A, Bu, Vx, Vxx, lu


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 10_000), n=st.integers(1, 5), n1=st.integers(1, 5),
       m=st.integers(1, 4), mu=st.sampled_from([0.0, 0.7]))
def test_single_sample_equals_dense_riccati_step(seed, n, n1, m, mu):
    """B = 1, exact curvature: the operator step is the dense Riccati step with
    l = 1/2 u'Ru + r'u (R = I), regularization mu."""
    A, Bu, Vx, Vxx, lu = _problem(seed, 1, n, n1, m)
    R = torch.eye(m, dtype=torch.float64)
    stage = DenseOperatorStage(A, Bu)
    Quu = R + Bu[0].T @ Vxx[0] @ Bu[0]

    def curvature(Qu, value):
        return DenseResponse(stage, Quu + mu * torch.eye(m, dtype=torch.float64), Quu, lu)

    out = operator_riccati_step(DenseValue(Vx, Vxx), stage, curvature)
    ref = riccati_step(Vx[0], Vxx[0], A[0], Bu[0], None, lu, torch.zeros(n, n,
                       dtype=torch.float64), R, None, solver=CholeskySolver(mu))
    torch.testing.assert_close(out.value.Vx[0], ref.Vx, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.value.Vxx[0], ref.Vxx, rtol=1e-9, atol=1e-10)
    # the applied policy: -P^{-1}(E[Q_u] + E[Q_ux dx]) == k + K dx
    dx = torch.randn(1, n, dtype=torch.float64)
    P = Quu + mu * torch.eye(m, dtype=torch.float64)
    du = -torch.linalg.solve(P, out.Qu + lu + out.feedback(dx))
    torch.testing.assert_close(du, ref.k + ref.K @ dx[0], rtol=1e-9, atol=1e-10)


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n=st.integers(1, 5),
       n1=st.integers(1, 5), m=st.integers(1, 4), eps=st.sampled_from([0.0, 0.3]))
def test_batch_equals_explicit_per_sample_formulas(seed, B, n, n1, m, eps):
    """Shared approximate curvature P over B samples: Eq. 4 written per sample."""
    A, Bu, Vx, Vxx, lu = _problem(seed, B, n, n1, m)
    g = torch.Generator().manual_seed(seed + 1)
    L = torch.randn(m, m, generator=g, dtype=torch.float64)
    P = L @ L.T + torch.eye(m, dtype=torch.float64)
    stage = DenseOperatorStage(A, Bu)
    out = operator_riccati_step(DenseValue(Vx, Vxx), stage,
                                lambda Qu, v: DenseResponse(stage, P, None, lu), tikhonov=eps)
    Pinv = torch.linalg.inv(P)
    V2 = Vxx + eps * torch.eye(n1, dtype=torch.float64)
    for i in range(B):
        Qu = lu + Bu[i].T @ Vx[i]
        Qux = Bu[i].T @ V2[i] @ A[i]
        Vx_i = A[i].T @ Vx[i] - Qux.T @ Pinv @ Qu
        Vxx_i = A[i].T @ V2[i] @ A[i] - Qux.T @ Pinv @ Qux
        torch.testing.assert_close(out.value.Vx[i], Vx_i, rtol=1e-9, atol=1e-10)
        torch.testing.assert_close(out.value.Vxx[i], Vxx_i, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.Qu, torch.einsum("bi,bij->j", Vx, Bu) / B)


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n=st.integers(1, 5),
       n1=st.integers(1, 5), m=st.integers(1, 4), scale=st.sampled_from([0.1, 10.0]),
       psd=st.booleans())
def test_rank_one_equals_dense(seed, B, n, n1, m, scale, psd):
    """Prop. 4 with a signed coefficient: identical to the dense recursion, also when an
    approximate P makes 1 - q_u'P^{-1}q_u negative (scale = 10)."""
    A, Bu, Vx, _, lu = _problem(seed, B, n, n1, m)
    z = torch.randn(B, n1, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    P = torch.eye(m, dtype=torch.float64) / scale
    stage = DenseOperatorStage(A, Bu)
    A2, Bu2, _, _, _ = _problem(seed + 2, B, 3, n, m)  # an earlier stage: 3 -> n
    stages = [stage, DenseOperatorStage(A2, Bu2)]
    low = RankOneValue(Vx, torch.ones(B, dtype=torch.float64), z)
    dense = DenseValue(Vx, low.Vxx)
    for stg in stages:
        def curv(Qu, v, stg=stg):
            return DenseResponse(stg, P, None, lu)
        low = operator_riccati_step(low, stg, curv, project_psd=psd).value
        dense = operator_riccati_step(dense, stg, curv, project_psd=psd).value
        # rtol 1e-8: with scale = 10 the value is V' - V'MV' with |c beta| >> 1, a
        # cancellation that costs both forms ~7 digits of the float64 result (observed
        # relative differences up to 1.6e-9)
        torch.testing.assert_close(low.Vx, dense.Vx, rtol=1e-8, atol=1e-9)
        torch.testing.assert_close(low.Vxx, dense.Vxx, rtol=1e-8, atol=1e-9)
    assert torch.isfinite(low.c).all()
    if psd:
        assert bool((low.c >= 0).all())


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n=st.integers(1, 4),
       n1=st.integers(1, 4), m=st.integers(1, 4), psd=st.booleans())
def test_joint_step_equals_explicit_batch_augmented_formulas(seed, B, n, n1, m, psd):
    """The batch-augmented step (trajopt.riccati.joint) on dense per-sample Jacobians:
    with the stacked F_u (B n1 x m), block-diagonal F_x and a dense joint value,
    V_X = F_x'(V_X' - V' F_u S (E[Q_u] + l_u)), V = F_x'(V' - V' F_u S F_u' V' / B) F_x,
    feedback(dX) = F_u' V' F_x dX / B."""
    from trajopt.riccati import joint_riccati_step

    A, Bu, _, _, lu = _problem(seed, B, n, n1, m)
    g = torch.Generator().manual_seed(seed + 1)
    Z = torch.randn(B * n1, B * n1, generator=g, dtype=torch.float64)
    V = Z @ Z.T
    Vx = torch.randn(1, B * n1, generator=g, dtype=torch.float64)
    P = torch.eye(m, dtype=torch.float64) * 2.0 + 0.1
    S = torch.linalg.inv(P)
    stage = DenseOperatorStage(A, Bu)
    step = joint_riccati_step(DenseValue(Vx=Vx, Vxx=V[None]), stage,
                              lambda Qu, val: DenseResponse(stage, P, lu=lu), samples=B,
                              project_psd=psd)
    Fx = torch.block_diag(*A)
    Fu = Bu.reshape(B * n1, m)
    Qu = Fu.T @ Vx[0] / B
    W = V - V @ Fu @ S @ Fu.T @ V / B
    if psd:
        lam, Q = torch.linalg.eigh(0.5 * (W + W.T))
        W = Q @ torch.diag(lam.clamp(min=0)) @ Q.T
    want_Vx = Fx.T @ (Vx[0] - V @ Fu @ S @ (Qu + lu))
    assert torch.allclose(step.Qu, Qu, atol=1e-12)
    assert torch.allclose(step.value.Vx[0], want_Vx, atol=1e-10)
    assert torch.allclose(step.value.Vxx[0], Fx.T @ W @ Fx, atol=1e-9)
    dX = torch.randn(B, n, generator=g, dtype=torch.float64)
    assert torch.allclose(step.feedback(dX), Fu.T @ V @ Fx @ dX.reshape(-1) / B,
                          atol=1e-10)
