"""The kernel's value-Hessian plug: the rank-r representation Z C Z' against the dense one
and against the rank-one form (float64), through the operator-form step."""

import dataclasses

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._hypothesis import examples
from trajopt.riccati import (
    Carried,
    DenseOperatorStage,
    DenseResponse,
    DenseValue,
    RankOneValue,
    RankRValue,
    operator_riccati_step,
)

DT = torch.float64


def _chain(seed, B, dims, m):
    """Two dense operator stages dims[0] -> dims[1] -> dims[2] (backward order: the last
    stage first), a value at dims[2], and a shared SPD curvature."""
    g = torch.Generator().manual_seed(seed)
    stages = []
    for n, n1 in zip(dims[:-1], dims[1:]):
        A = torch.randn(B, n1, n, generator=g, dtype=DT) / n ** 0.5
        Bu = torch.randn(B, n1, m, generator=g, dtype=DT) / m ** 0.5
        stages.append(DenseOperatorStage(A, Bu))
    Vx = torch.randn(B, dims[-1], generator=g, dtype=DT)
    L = torch.randn(m, m, generator=g, dtype=DT)
    P = L @ L.T / m + torch.eye(m, dtype=DT)
    lu = torch.randn(m, generator=g, dtype=DT)
    return stages[::-1], Vx, P, lu, g


def _run(value, stages, P, lu, **kw):
    out = []
    for stg in stages:
        step = operator_riccati_step(value, stg, lambda Qu, v, s=stg: DenseResponse(s, P, None,
                                                                                      lu), **kw)
        out.append(step)
        value = step.value
    return out


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n0=st.integers(1, 5),
       n1=st.integers(1, 5), n2=st.integers(1, 6), r=st.integers(1, 4),
       m=st.integers(1, 4), recursion=st.sampled_from(["per_sample", "mean"]),
       signed=st.booleans())
def test_rank_r_equals_dense(seed, B, n0, n1, n2, r, m, recursion, signed):
    """Two stages of the recursion from V'' = Z C Z' (C = I, or a signed symmetric core):
    the rank-r form gives the dense form's V_x, V_xx and feedback to 1e-12."""
    stages, Vx, P, lu, g = _chain(seed, B, [n0, n1, n2], m)
    Z = torch.randn(B, n2, r, generator=g, dtype=DT)
    C = None
    if signed:
        S = torch.randn(B, r, r, generator=g, dtype=DT)
        C = 0.5 * (S + S.transpose(-1, -2))
    low = RankRValue(Vx, Z, C)
    dense = DenseValue(Vx, low.Vxx)
    a = _run(low, stages, P, lu, recursion=recursion)
    b = _run(dense, stages, P, lu, recursion=recursion)
    dx = torch.randn(B, n1, generator=g, dtype=DT)
    for sa, sb in zip(a, b):
        torch.testing.assert_close(sa.value.Vx, sb.value.Vx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sa.value.Vxx, sb.value.Vxx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sa.Qu, sb.Qu, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(a[0].feedback(dx), b[0].feedback(dx), rtol=1e-12, atol=1e-12)
    assert a[-1].value.Z.shape == (B, n0, r)


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n1=st.integers(1, 5),
       n2=st.integers(1, 5), m=st.integers(1, 4), psd=st.booleans(),
       scale=st.sampled_from([0.1, 1.0, 10.0]),
       recursion=st.sampled_from(["per_sample", "mean"]))
def test_rank_r_with_r_1_equals_rank_one(seed, B, n1, n2, m, psd, scale, recursion):
    """r = 1: Z = z, C = c is the rank-one form c z z' (including a sign change of c
    under an over-large preconditioner, scale = 10, and its projection)."""
    stages, Vx, P, lu, g = _chain(seed, B, [3, n1, n2], m)
    P = P / scale
    z = torch.randn(B, n2, generator=g, dtype=DT)
    one = _run(RankOneValue(Vx, torch.ones(B, dtype=DT), z), stages, P, lu,
               project_psd=psd, recursion=recursion)
    rr = _run(RankRValue(Vx, z.unsqueeze(-1)), stages, P, lu, project_psd=psd,
              recursion=recursion)
    for a, b in zip(one, rr):
        torch.testing.assert_close(b.value.Vx, a.value.Vx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(b.value.Vxx, a.value.Vxx, rtol=1e-12, atol=1e-12)
        if not psd:  # the projection re-orthonormalizes the factor: same matrix
            torch.testing.assert_close(b.value.Z[..., 0], a.value.z, rtol=1e-12, atol=1e-12)
            torch.testing.assert_close(b.value.C[..., 0, 0], a.value.c, rtol=1e-12,
                                       atol=1e-12)
    if psd:
        assert bool((rr[-1].value.C[..., 0, 0] >= 0).all())


@pytest.mark.parametrize("eps", [0.0, 0.4])
def test_hess_apply_equals_the_dense_product(eps):
    g = torch.Generator().manual_seed(3)
    B, n, r, J = 3, 6, 4, 5
    Z = torch.randn(B, n, r, generator=g, dtype=DT)
    S = torch.randn(B, r, r, generator=g, dtype=DT)
    v = RankRValue(torch.zeros(B, n, dtype=DT), Z, S + S.transpose(-1, -2))
    Y = torch.randn(B, J, n, generator=g, dtype=DT)
    ref = Y @ (v.Vxx + eps * torch.eye(n, dtype=DT)).transpose(-1, -2)
    torch.testing.assert_close(v.hess_apply(Y, eps), ref, rtol=1e-13, atol=1e-13)


def test_projection_keeps_the_rank_r_hessian_psd():
    """An approximate curvature far too small (P = I/100) drives V' - V'MV' indefinite;
    project_psd keeps every propagated Hessian positive semidefinite."""
    stages, Vx, P, lu, g = _chain(5, 3, [4, 5, 6], 3)
    Z = torch.randn(3, 6, 3, generator=g, dtype=DT)
    free = _run(RankRValue(Vx, Z), stages, P / 100.0, lu)
    proj = _run(RankRValue(Vx, Z), stages, P / 100.0, lu, project_psd=True)
    assert float(torch.linalg.eigvalsh(free[0].value.Vxx).min()) < -1e-6
    for s in proj:
        lam = torch.linalg.eigvalsh(s.value.Vxx)
        assert float(lam.min()) >= -1e-10 * float(lam.abs().max())


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 3), r=st.integers(1, 4),
       scale=st.sampled_from([0.01, 1.0, 10.0]),
       recursion=st.sampled_from(["per_sample", "mean"]))
def test_rank_r_projection_is_the_dense_projection(seed, B, r, scale, recursion):
    """project_psd on Z C Z' gives the matrix the dense projection (eigenvalues of the
    n x n Hessian clamped at 0) gives, also for a rank-deficient factor; scale = 0.01 makes
    the curvature far too small, so the projection is active."""
    stages, Vx, P, lu, g = _chain(seed, B, [3, 4, 5], 2)
    Z = torch.randn(B, 5, r, generator=g, dtype=DT)
    if r > 1:
        Z[..., -1] = Z[..., 0]  # rank r - 1
    low = _run(RankRValue(Vx, Z), stages, P * scale, lu, project_psd=True,
               recursion=recursion)
    dense = _run(DenseValue(Vx, RankRValue(Vx, Z).Vxx), stages, P * scale, lu,
                 project_psd=True, recursion=recursion)
    # relative to the largest entry; a curvature 1/scale too small makes V' M V' ~1/scale^2
    # larger than what survives the projection, and both eigensolvers round at that size
    # (observed 1e-10 at scale 0.01, 1e-15 at 1)
    tol = 1e-12 * max(1.0, scale ** -2)
    for a, b in zip(low, dense):
        for x, y in ((a.value.Vx, b.value.Vx), (a.value.Vxx, b.value.Vxx)):
            assert float((x - y).abs().max()) <= tol * (1 + float(y.abs().max()))


def test_softmax_cross_entropy_gauss_newton_factor():
    """The factor of DESIGN.md: Z = diag(sqrt p) - p sqrt(p)' gives Z Z' = diag(p) - p p',
    the exact Hessian of softmax cross-entropy in the logits (checked by autograd)."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(4, 7, generator=g, dtype=DT)
    y = torch.tensor([0, 3, 6, 2])
    p = torch.softmax(logits, -1)
    sp = p.sqrt()
    Z = torch.diag_embed(sp) - p.unsqueeze(-1) * sp.unsqueeze(-2)
    v = RankRValue(torch.zeros_like(p), Z)
    H = torch.stack([torch.autograd.functional.hessian(
        lambda s, i=i: torch.nn.functional.cross_entropy(s[None], y[i:i + 1]), logits[i])
        for i in range(4)])
    torch.testing.assert_close(v.Vxx, H, rtol=1e-13, atol=1e-14)


def _psd_under(monkeypatch, eigh_float32, size=(3, 4, 4)):
    """``_psd`` of a random symmetric float32 matrix with float32 ``eigh`` replaced by
    ``eigh_float32(real_eigh, M)``; returns (result, the float64 projection)."""
    from trajopt.riccati import value as v
    real = torch.linalg.eigh
    W = torch.randn(*size, dtype=torch.float64)
    W = W + W.transpose(-1, -2)
    lam, Q = real(W)
    want = (Q * lam.clamp(min=0).unsqueeze(-2)) @ Q.transpose(-1, -2)
    monkeypatch.setattr(torch.linalg, "eigh", lambda M: eigh_float32(real, M)
                        if M.dtype == torch.float32 else real(M))
    return v._psd(W.float()), want


def test_psd_projection_survives_an_eigensolver_failure(monkeypatch):
    """float32 eigh can fail to converge (found on a 512-wide BN ResNet value): the
    projection is then computed in float64; where that fails too the result is NaN (the
    optimizer's finiteness check skips the step), never a raw LinAlgError."""
    from trajopt.riccati import value as v

    def flaky(real, M):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
    got, want = _psd_under(monkeypatch, flaky)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)

    def broken(M):
        raise torch.linalg.LinAlgError("linalg.eigh: failed to converge")
    monkeypatch.setattr(torch.linalg, "eigh", broken)
    assert torch.isnan(v._psd(want)).all()


def test_psd_projection_retries_when_the_eigensolver_returns_nan(monkeypatch):
    """float32 eigh can also return NaN without raising (found on a 1024 x 1024
    batch-augmented value of a BatchNorm MLP, which then skipped a step): the projection
    is computed in float64 then, and is finite."""
    def silent(real, M):
        lam, Q = real(M)
        return torch.full_like(lam, float("nan")), Q
    got, want = _psd_under(monkeypatch, silent, size=(2, 5, 5))
    assert bool(torch.isfinite(got).all())
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-5)


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n0=st.integers(1, 5),
       n1=st.integers(1, 5), n2=st.integers(1, 6), r=st.integers(1, 4),
       m=st.integers(1, 4), psd=st.booleans(), rank_one=st.booleans())
def test_feedback_from_the_pulled_back_factor(seed, B, n0, n1, n2, r, m, psd, rank_one):
    """The feedback of a factored value read off the pull-back (its directions' f_x'
    product, times R where the PSD projection replaced Z by Q = Z R^-1) equals the
    feedback through f_x, for a signed core and with the projection on and off."""
    stages, Vx, P, lu, g = _chain(seed, B, [n0, n1, n2], m)
    if rank_one:
        value = RankOneValue(Vx, torch.randn(B, generator=g, dtype=DT),
                             torch.randn(B, n2, generator=g, dtype=DT))
    else:
        S = torch.randn(B, r, r, generator=g, dtype=DT)
        value = RankRValue(Vx, torch.randn(B, n2, r, generator=g, dtype=DT),
                           0.5 * (S + S.transpose(-1, -2)))
    steps = _run(value, stages, P, lu, project_psd=psd, recursion="mean")
    for step, n in zip(steps, (n1, n0)):
        assert step.next_value.factored
        assert (step.factor_map is not None) == (psd and not rank_one)
        dx = torch.randn(B, n, generator=g, dtype=DT)
        nv = step.next_value          # the same matrix, dense: the feedback through f_x
        plain = dataclasses.replace(step, next_value=DenseValue(nv.Vx, nv.Vxx))
        torch.testing.assert_close(step.feedback(dx), plain.feedback(dx), rtol=1e-11,
                                   atol=1e-11)


@dataclasses.dataclass(frozen=True)
class _CarryingStage:
    """A dense stage that holds f_x' K for one cotangent K (as a network stage holds the
    gradient autograd sent to its input) and counts the rows it pulls back."""

    inner: DenseOperatorStage
    K_next: torch.Tensor
    K: torch.Tensor
    rows: list

    samplewise = True

    @property
    def Bu(self):   # noqa: N802  (DenseResponse reads the stage's control Jacobian)
        return self.inner.Bu

    def fx_T(self, Y):
        self.rows.append(Y.shape[1])
        return self.inner.fx_T(Y)

    def fx(self, dX):
        return self.inner.fx(dX)

    def fu_T_mean(self, Y):
        return self.inner.fu_T_mean(Y)

    value_gradient = fu_T_mean

    def carried_pullback(self, K):
        return self.K if K is self.K_next else None


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 10_000), B=st.integers(1, 4), n0=st.integers(1, 5),
       n1=st.integers(1, 5), n2=st.integers(1, 6), r=st.integers(1, 3),
       m=st.integers(1, 4), psd=st.booleans(), rank_one=st.booleans(),
       recursion=st.sampled_from(["per_sample", "mean"]))
def test_carried_gradient_equals_the_pulled_back_gradient(seed, B, n0, n1, n2, r, m, psd,
                                                          rank_one, recursion):
    """V_x = K + Z a with f_x' K held by the stages: the step pulls back only the r
    directions and gives the V_x, V_xx, Q_u and feedback of the plain pull-back of
    V_x - V r (signed core, projection on and off, both recursions) to 1e-12."""
    stages, _, P, lu, g = _chain(seed, B, [n0, n1, n2], m)
    r = 1 if rank_one else r
    K2 = torch.randn(B, n2, generator=g, dtype=DT)
    Ks = [K2]
    for stg in stages:
        Ks.append(stg.fx_T(Ks[-1].unsqueeze(1)).squeeze(1))
    rows = []
    carrying = [_CarryingStage(stg, Ks[i], Ks[i + 1], rows) for i, stg in enumerate(stages)]
    a = torch.randn(B, r, generator=g, dtype=DT)
    if rank_one:
        z = torch.randn(B, n2, generator=g, dtype=DT)
        c = torch.randn(B, generator=g, dtype=DT)
        plain = RankOneValue(K2 + a * z, c, z)
    else:
        Z = torch.randn(B, n2, r, generator=g, dtype=DT)
        S = torch.randn(B, r, r, generator=g, dtype=DT)
        plain = RankRValue(K2 + (Z @ a.unsqueeze(-1)).squeeze(-1), Z,
                           0.5 * (S + S.transpose(-1, -2)))
    carried = dataclasses.replace(plain, carried=Carried(K2, a))
    got = _run(carried, carrying, P, lu, project_psd=psd, recursion=recursion)
    want = _run(plain, stages, P, lu, project_psd=psd, recursion=recursion)
    # the directions only (r of them, fewer where the projection's QR found fewer)
    assert rows == [s_.value.directions().shape[1] for s_ in got]
    for sa, sb, n in zip(got, want, (n1, n0)):
        assert sa.value.carried is not None
        torch.testing.assert_close(sa.value.Vx, sb.value.Vx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sa.value.Vxx, sb.value.Vxx, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(sa.Qu, sb.Qu, rtol=1e-12, atol=1e-12)
        dx = torch.randn(B, n, generator=g, dtype=DT)
        torch.testing.assert_close(sa.feedback(dx), sb.feedback(dx), rtol=1e-12, atol=1e-12)


def test_carried_gradient_falls_back_to_the_pull_back():
    """A Tikhonov term (eps r leaves the span of K and Z) or a stage that does not hold
    the cotangent: V_x - V r is pulled back after the directions (r rows, then one) and
    the result no longer carries K."""
    stages, _, P, lu, g = _chain(0, 3, [2, 3, 4], 2)
    K2 = torch.randn(3, 4, generator=g, dtype=DT)
    z = torch.randn(3, 4, generator=g, dtype=DT)
    a = torch.randn(3, 1, generator=g, dtype=DT)
    value = RankOneValue(K2 + a * z, torch.ones(3, dtype=DT), z, carried=Carried(K2, a))
    K1 = stages[0].fx_T(K2.unsqueeze(1)).squeeze(1)
    for stage_K, tik in ((K1, 0.3), (None, 0.0)):
        rows = []
        stg = _CarryingStage(stages[0], K2 if stage_K is not None else K2.clone(), K1, rows)
        step = operator_riccati_step(value, stg, lambda Qu, v, s_=stg: DenseResponse(
                                         s_, P, None, lu),
                                     tikhonov=tik, recursion="mean")
        ref = operator_riccati_step(dataclasses.replace(value, carried=None), stages[0],
                                    lambda Qu, v: DenseResponse(stages[0], P, None, lu),
                                    tikhonov=tik, recursion="mean")
        assert rows == [1, 1] and step.value.carried is None
        torch.testing.assert_close(step.value.Vx, ref.value.Vx, rtol=0, atol=0)


class _MixingStage:
    """A stage whose f_x couples the samples (a batch mean, as BatchNorm's statistics):
    ``f_x' Y = Y A + mean_i(Y) Bm``; its controls mix the samples too."""
    samplewise = False
    response_samplewise = False

    def __init__(self, A, Bm, Bu):
        self.A, self.Bm, self.Bu = A, Bm, Bu

    def fx_T(self, Y):
        return Y @ self.A + Y.mean(0, keepdim=True) @ self.Bm

    def fu_T_mean(self, Y):
        return (Y.unsqueeze(-2) @ self.Bu).squeeze(-2).mean(0)


class _MixingResponse:
    """``M Y = Y S + mean_i(Y) T``, a response that couples the samples; S l_u-free."""

    def __init__(self, S, Tm, r):
        self.S, self.Tm, self.r = S, Tm, r

    def response(self, Y):
        return Y @ self.S + Y.mean(0, keepdim=True) @ self.Tm

    def response_const(self):
        return None

    def apply_control(self, G):
        return self.r

    def response_gram(self, Y):   # present, but the stage's controls mix the samples
        raise AssertionError("the Gram matrix in control space must not be used here")


@pytest.mark.parametrize("psd", [False, True])
@pytest.mark.parametrize("recursion", ["mean", "per_sample"])
def test_a_stage_that_mixes_the_samples_downdates_by_the_factors_own_responses(psd,
                                                                            recursion):
    """Where f_x and the response couple the samples, the per-sample correction is not
    invariant under a per-sample change of basis: the step takes it from the responses of
    the factor's own columns Z (G = Z'MZ, then R C_new R' under the projection, Z = QR)
    and pulls back Q -- literally, against this plain formula (float64, 1e-12).  A version
    that took the responses of Q's columns moved GT-DDP(adam) on the BatchNorm ResNet by
    12 % in 4 steps."""
    from trajopt._linalg import thin_qr
    from trajopt.riccati.value import _psd
    g = torch.Generator().manual_seed(5)
    B, n, n1, r, m = 5, 3, 4, 2, 2

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=DT)
    Z, S0 = rnd(B, n1, r), rnd(B, r, r)
    value = RankRValue(Vx=rnd(B, n1), Z=Z, C=0.5 * (S0 + S0.transpose(-1, -2)))
    S1, T1 = rnd(n1, n1), rnd(n1, n1)
    stage = _MixingStage(rnd(n1, n), 0.5 * rnd(n1, n), rnd(n1, m))
    resp = _MixingResponse(S1 @ S1.T, 0.3 * (T1 + T1.T), rnd(B, n1))
    step = operator_riccati_step(value, stage, lambda Qu, v: resp, project_psd=psd,
                                 recursion=recursion)
    Dz = Z.transpose(-1, -2)
    if recursion == "mean":
        w, rr, MD = 1.0 / B, resp.r, resp.response(Dz)
    else:
        w = 1.0
        RD = resp.response(torch.cat([value.Vx.unsqueeze(1), Dz], 1))
        rr, MD = RD[:, 0], RD[:, 1:]
    G = Dz @ MD.transpose(-1, -2)
    G = 0.5 * (G + G.transpose(-1, -2))
    C = value.C - w * value.C @ G @ value.C
    C = 0.5 * (C + C.transpose(-1, -2))
    basis = Z
    if psd:
        basis, R = thin_qr(Z)
        C = _psd(R @ C @ R.transpose(-1, -2))
    gvec = value.Vx - (Z @ (value.C @ (Z.transpose(-1, -2) @ rr.unsqueeze(-1)))).squeeze(-1)
    torch.testing.assert_close(step.value.Vx, stage.fx_T(gvec.unsqueeze(1))[:, 0],
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.value.Z,
                               stage.fx_T(basis.transpose(-1, -2)).transpose(-1, -2),
                               rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(step.value.C, C, rtol=1e-12, atol=1e-12)
