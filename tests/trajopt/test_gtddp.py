"""Residual spans and cooperative games (GT-DDP) against plain DDP on the explicitly
augmented state / the concatenated control, and the paper's Prop. 2 and Prop. 4."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tests._hypothesis import examples
from tests.reference.span_augmented import augmented_problem
from trajopt import Cost, DDPSolver, Dynamics, GTDDPSolver, Span, solve_ddp
from trajopt.errors import InvalidArgumentError, ShapeError
from trajopt.lqr.game import cooperative_policy

DT = torch.float64


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def make_problem(seed, dims, m=2):
    """x_{t+1} = tanh(A_t x + B_t u) (n_t -> n_{t+1}), quadratic running cost, terminal
    cost pulling x_T to a goal."""
    g = _gen(seed)
    T = len(dims) - 1
    A = [torch.randn(dims[t + 1], dims[t], generator=g, dtype=DT) / dims[t] ** 0.5
         for t in range(T)]
    Bm = [torch.randn(dims[t + 1], m, generator=g, dtype=DT) for t in range(T)]
    goal = torch.randn(dims[T], generator=g, dtype=DT)

    def f(x, u, t):
        return torch.tanh(x @ A[t].T + u[..., :m] @ Bm[t].T)

    def running(x, w, t):
        return 0.05 * (x * x).sum(-1) + 0.1 * (w * w).sum(-1)

    def terminal(x):
        return 2.0 * ((x - goal) ** 2).sum(-1)

    return Dynamics(f), Cost(running, terminal)


def linear_shortcut(n_out, n_in):
    """h(r, v) = V r with V the (n_out, n_in) reshaped parameters v."""
    def h(r, v):
        V = v.reshape(*v.shape[:-1], n_out, n_in)
        return (V @ r.unsqueeze(-1)).squeeze(-1)
    return h


def solve_both(dyn, cost, spans, dims, x0, us0, max_iter=25):
    mu_sizes = [u.shape[-1] - sum(s.n_params for s in spans if s.end == t)
                for t, u in enumerate(us0)]
    F, C = augmented_problem(dyn, cost, spans, dims, mu_sizes)
    ref = DDPSolver(F, C, max_iter=max_iter).solve(x0, us0)
    out = GTDDPSolver(dyn, cost, spans=spans, max_iter=max_iter).solve(x0, us0)
    return out, ref


def _spans_strategy(T):
    pair = st.tuples(st.integers(0, T - 1), st.integers(0, T - 1)).map(sorted)
    return st.lists(st.tuples(pair, st.sampled_from(["identity", "map", "params"])),
                    min_size=1, max_size=3)


def _build_spans(raw, n, T):
    spans = []
    for (a, b), kind in raw:
        if kind == "identity":
            spans.append(Span(a, b))
        elif kind == "map":
            P = torch.randn(n, n, generator=_gen(a * 10 + b), dtype=DT) * 0.5
            spans.append(Span(a, b, shortcut=lambda r, P=P: torch.tanh(r) @ P.T))
        else:
            spans.append(Span(a, b, shortcut=linear_shortcut(n, n), n_params=n * n))
    return spans


def _controls(spans, T, m, seed, B=2):
    g = _gen(seed + 1)
    return [0.3 * torch.randn(B, m + sum(s.n_params for s in spans if s.end == t),
                              generator=g, dtype=DT) for t in range(T)]


@settings(max_examples=examples(25), deadline=None)
@given(seed=st.integers(0, 1000), raw=_spans_strategy(6))
def test_spans_equal_ddp_on_the_augmented_state(seed, raw):
    """Random spans (nested, consecutive, shared ends, start == end; identity, maps and
    parametrized shortcuts): the whole solve equals plain DDP on Eq. 26's state."""
    T, n = 6, 3
    dims = [n] * (T + 1)
    dyn, cost = make_problem(seed, dims)
    spans = _build_spans(raw, n, T)
    x0 = torch.randn(2, n, generator=_gen(seed + 2), dtype=DT)
    out, ref = solve_both(dyn, cost, spans, dims, x0, _controls(spans, T, 2, seed))
    for a, b in zip(out.us, ref.us):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
    for a, b in zip(out.xs, ref.xs):
        torch.testing.assert_close(a, b[..., :n], rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(out.cost, ref.cost, rtol=1e-10, atol=0)
    assert torch.equal(out.iterations, ref.iterations)
    assert list(out.reason.flat) == list(ref.reason.flat)
    for h1, h2 in zip(out.history, ref.history):
        torch.testing.assert_close(h1.cost, h2.cost, rtol=1e-10, atol=0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_spans_with_control_limits_equal_ddp_on_the_augmented_state(seed):
    """Box limits (DDPSolver's box QP) with nested and identity/map spans: the same
    solve as plain DDP with the same limits on the augmented state; limits hold."""
    T, n = 6, 3
    dims = [n] * (T + 1)
    dyn, cost = make_problem(seed, dims)
    P = 0.5 * torch.randn(n, n, generator=_gen(seed + 9), dtype=DT)
    spans = [Span(0, 4), Span(1, 2, shortcut=lambda r: torch.tanh(r) @ P.T), Span(3, 5)]
    x0 = torch.randn(2, n, generator=_gen(seed + 2), dtype=DT)
    us0 = _controls(spans, T, 2, seed)
    lim = (torch.full((2,), -0.3, dtype=DT), torch.full((2,), 0.4, dtype=DT))
    F, C = augmented_problem(dyn, cost, spans, dims, [2] * T)
    ref = DDPSolver(F, C, max_iter=25, control_limits=lim).solve(x0, us0)
    out = GTDDPSolver(dyn, cost, spans=spans, max_iter=25, control_limits=lim).solve(x0, us0)
    for a, b in zip(out.us, ref.us):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-10)
        assert bool((a >= lim[0] - 1e-12).all() and (a <= lim[1] + 1e-12).all())
    torch.testing.assert_close(out.cost, ref.cost, rtol=1e-10, atol=0)
    assert torch.equal(out.iterations, ref.iterations)
    assert any(bool(((u - lim[1]).abs() < 1e-12).any() | ((u - lim[0]).abs() < 1e-12)
                    .any()) for u in out.us)   # some limit is active


def test_first_backward_pass_gains_and_values_equal_the_augmented_ones():
    """Gains on [x, x_r] (K with the residual feedback G) and the state blocks of the value,
    at the initial trajectory; widths change along the chain (shortcuts map 3 -> 5 and
    4 -> 5)."""
    dims = [3, 4, 5, 5, 5, 5, 3]
    T = len(dims) - 1
    dyn, cost = make_problem(7, dims)
    spans = [Span(0, 1, shortcut=linear_shortcut(5, 3), n_params=15), Span(2, 3),
             Span(1, 4, shortcut=lambda r: torch.sin(r)[..., :4] @ torch.ones(
                 4, 5, dtype=DT)), Span(3, 3)]
    x0 = torch.randn(4, 3, generator=_gen(3), dtype=DT)
    out, ref = solve_both(dyn, cost, spans, dims, x0, _controls(spans, T, 2, 3, B=4),
                          max_iter=0)
    for t in range(T):
        torch.testing.assert_close(out.K[t], ref.K[t], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.k[t], ref.k[t], rtol=1e-9, atol=1e-11)
        n = dims[t]
        torch.testing.assert_close(out.Vx[t], ref.Vx[t][..., :n], rtol=1e-9, atol=1e-11)
        torch.testing.assert_close(out.Vxx[t], ref.Vxx[t][..., :n, :n], rtol=1e-9,
                                   atol=1e-11)
    assert out.K[1].shape == (4, 2 + 15, 4 + 3)  # [u | v] on [x_1 | x_0] (span (0, 1))
    assert out.K[2].shape == (4, 2, 5 + 4)       # on [x_2 | x_1] (span (1, 4) open)


def test_proposition_2_value_at_the_split_stage():
    """Eq. 11-12 / 32-34 for one identity span (t_s, t_f), at the first backward pass:
    V_x^{ts} = V_x^{ts,ff} + V_x^{tf+1} - sum_{t=ts}^{tf} G_t' Q_uu^t k_t and
    V_xx^{ts} = V_xx^{ts,ff} + f_x'V_{x x_r}' + V_{x_r x}'f_x + V_{x_r x_r}' - (the
    G-terms of stage ts), with V_{x_r x_r}' = V_xx^{tf+1} - sum_{t=ts+1}^{tf} G_t'Q_uu G_t;
    "ff" = the feedforward formulas on the state blocks (Eq. 4)."""
    n, T, ts, tf = 3, 6, 1, 4
    dims = [n] * (T + 1)
    dyn, cost = make_problem(11, dims)
    span = Span(ts, tf)
    x0 = torch.randn(1, n, generator=_gen(5), dtype=DT)
    us0 = _controls([span], T, 2, 5, B=1)
    out, ref = solve_both(dyn, cost, [span], dims, x0, us0, max_iter=0)
    xs = out.xs
    Quu, G, k, fx, fu = {}, {}, {}, {}, {}
    for t in range(ts, tf + 1):
        d = dyn.derivatives(xs[t], us0[t], t)
        c = cost.derivatives(xs[t], us0[t], t)
        fx[t], fu[t] = d.fx, d.fu
        Quu[t] = c.luu + fu[t].mT @ out.Vxx[t + 1] @ fu[t]
        k[t] = out.k[t]
        G[t] = out.K[t][..., n:] if t > ts else None
    # stage ts: the gain on the residual that is about to be split off: -Quu^-1 f_u'V_{x xr}'
    VxR = ref.Vxx[ts + 1][..., :n, n:]          # V_{x x_r} at ts + 1 (augmented reference)
    G[ts] = -torch.linalg.solve(Quu[ts], fu[ts].mT @ VxR)
    c = cost.derivatives(xs[ts], us0[ts], ts)
    Qux_ff = c.lux + fu[ts].mT @ out.Vxx[ts + 1] @ fx[ts]
    K_ff = -torch.linalg.solve(Quu[ts], Qux_ff)
    Vx_ff = c.lx + (fx[ts].mT @ out.Vx[ts + 1].unsqueeze(-1))[..., 0] + \
        (Qux_ff.mT @ k[ts].unsqueeze(-1))[..., 0]
    corr = sum((G[t].mT @ Quu[t] @ k[t].unsqueeze(-1))[..., 0] for t in range(ts, tf + 1))
    torch.testing.assert_close(out.Vx[ts], Vx_ff + out.Vx[tf + 1] - corr, rtol=1e-9,
                               atol=1e-11)
    Vxx_ff = c.lxx + fx[ts].mT @ out.Vxx[ts + 1] @ fx[ts] + Qux_ff.mT @ K_ff
    Vrr = out.Vxx[tf + 1] - sum(G[t].mT @ Quu[t] @ G[t] for t in range(ts + 1, tf + 1))
    torch.testing.assert_close(ref.Vxx[ts + 1][..., n:, n:], Vrr, rtol=1e-9, atol=1e-11)
    Gs, Ks = G[ts], K_ff
    Vxx = (Vxx_ff + fx[ts].mT @ VxR + VxR.mT @ fx[ts] + Vrr
           - Ks.mT @ Quu[ts] @ Gs - Gs.mT @ Quu[ts] @ Ks - Gs.mT @ Quu[ts] @ Gs)
    torch.testing.assert_close(out.Vxx[ts], Vxx, rtol=1e-9, atol=1e-11)


# ---------------------------------------------------------------- cooperative games
def _random_q(seed, B, m, ny, psd=True):
    g = _gen(seed)
    H = torch.randn(B, m + ny, m + ny, generator=g, dtype=DT)
    H = H @ H.mT + 0.5 * torch.eye(m + ny, dtype=DT)
    Qw = torch.randn(B, m, generator=g, dtype=DT)
    return Qw, H[:, :m, m:], H[:, :m, :m]


@settings(max_examples=examples(40), deadline=None)
@given(seed=st.integers(0, 10_000), sizes=st.lists(st.integers(1, 4), min_size=1,
                                                   max_size=4),
       ny=st.integers(1, 5), reg=st.sampled_from([0.0, 0.3]))
def test_cooperative_policy_equals_the_joint_block_solve(seed, sizes, ny, reg):
    m = sum(sizes)
    Qw, Qwy, Qww = _random_q(seed, 3, m, ny)
    pol = cooperative_policy(Qw, Qwy, Qww, sizes, reg=reg)
    M = Qww + reg * torch.eye(m, dtype=DT)
    joint = -torch.linalg.solve(M, torch.cat([Qw.unsqueeze(-1), Qwy], -1))
    torch.testing.assert_close(pol.k, joint[..., 0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(pol.K, joint[..., 1:], rtol=1e-9, atol=1e-11)
    assert bool(pol.ok.all())


@settings(max_examples=examples(30), deadline=None)
@given(seed=st.integers(0, 10_000), mu=st.integers(1, 4), mv=st.integers(1, 4),
       ny=st.integers(1, 4))
def test_cooperative_policy_with_approximations(seed, mu, mv, ny):
    """Eq. 40 with approximated own blocks = the block inverse of [[~Quu, Quv], [Qvu,
    ~Qvv]]; with Quv = 0 each player solves alone; Prop. 4: with Quv = 0 and no mixed
    partials (Q_wy = 0) it is the base method, k_i = -~Q_ii^{-1} Q_i, K = 0."""
    Qw, Qwy, Qww = _random_q(seed, 2, mu + mv, ny)
    g = _gen(seed + 1)
    # approximations that dominate the exact blocks (so the joint system stays PD): a
    # dense one for u, a diagonal (Gershgorin bound, RMSprop-like) one for v
    R = torch.randn(2, mu, mu, generator=g, dtype=DT)
    Au = Qww[:, :mu, :mu] + R @ R.mT
    Av = torch.diag_embed(Qww[:, mu:, mu:].abs().sum(-1) + torch.rand(2, mv, generator=g,
                                                                       dtype=DT))
    pol = cooperative_policy(Qw, Qwy, Qww, [mu, mv], approx=[Au, Av])
    assert bool(pol.ok.all())
    M = Qww.clone()
    M[:, :mu, :mu], M[:, mu:, mu:] = Au, Av
    joint = -torch.linalg.solve(M, torch.cat([Qw.unsqueeze(-1), Qwy], -1))
    torch.testing.assert_close(pol.k, joint[..., 0], rtol=1e-9, atol=1e-11)
    torch.testing.assert_close(pol.K, joint[..., 1:], rtol=1e-9, atol=1e-11)
    Qdec = Qww.clone()
    Qdec[:, :mu, mu:] = 0
    Qdec[:, mu:, :mu] = 0
    alone = cooperative_policy(Qw, Qwy, Qdec, [mu, mv], approx=[Au, Av])
    ku = -torch.linalg.solve(Au, Qw[:, :mu].unsqueeze(-1))[..., 0]
    Kv = -torch.linalg.solve(Av, Qwy[:, mu:])
    torch.testing.assert_close(alone.player(0, [mu, mv])[0], ku, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(alone.player(1, [mu, mv])[1], Kv, rtol=1e-10, atol=1e-12)
    base = cooperative_policy(Qw, torch.zeros_like(Qwy), Qdec, [mu, mv], approx=[Au, Av])
    assert float(base.K.abs().max()) == 0.0
    bad = cooperative_policy(Qw, Qwy, Qww, [mu, mv], approx=[-Au, Av])
    assert not bool(bad.ok.any())
    torch.testing.assert_close(base.k[:, mu:], -Qw[:, mu:] / torch.diagonal(Av, dim1=-2,
                                                                              dim2=-1))


def _two_carts(coupling):
    """Two carts (position, velocity each), one force each, a spring of stiffness
    ``coupling`` between them, both driven to targets; dt = 0.1."""
    goal = torch.tensor([1.0, 0.0, -0.5, 0.0], dtype=DT)

    def f(x, u, t):
        p1, v1, p2, v2 = x.unbind(-1)
        a1 = u[..., 0] + coupling * (p2 - p1) - 0.1 * v1
        a2 = u[..., 1] + coupling * (p1 - p2) - 0.1 * v2
        return torch.stack([p1 + 0.1 * v1, v1 + 0.1 * torch.tanh(a1),
                            p2 + 0.1 * v2, v2 + 0.1 * torch.tanh(a2)], -1)

    def running(x, u, t):
        return 0.01 * (u * u).sum(-1) + 0.1 * ((x - goal) ** 2).sum(-1)

    def terminal(x):
        return 10.0 * ((x - goal) ** 2).sum(-1)

    return Dynamics(f), Cost(running, terminal), goal


def test_two_player_game_equals_ddp_on_the_joint_control():
    dyn, cost, _ = _two_carts(1.0)
    x0 = torch.zeros(3, 4, dtype=DT)
    x0[1, 0] = 0.3
    us0 = torch.zeros(3, 30, 2, dtype=DT)
    game = solve_ddp(dyn, cost, x0, us0, players=(1, 1), max_iter=50)
    joint = solve_ddp(dyn, cost, x0, us0, max_iter=50)
    torch.testing.assert_close(game.us, joint.us, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(game.cost, joint.cost, rtol=1e-11, atol=0)
    assert bool(game.converged.all())


def test_uncoupled_players_equal_two_independent_solves():
    """No spring and a separable cost: Q_uv = 0 and the game's policy is that of two
    single-cart DDPs (each player's gains on its own cart, zero on the other's)."""
    dyn, cost, goal = _two_carts(0.0)
    x0 = torch.tensor([[0.2, 0.0, -0.1, 0.1]], dtype=DT)
    us0 = 0.1 * torch.randn(1, 25, 2, generator=_gen(4), dtype=DT)
    game = solve_ddp(dyn, cost, x0, us0, players=(1, 1), max_iter=0)
    for i in range(2):
        def cart(x, u, t, i=i):  # one cart: embed it in the pair, read it back
            pair = torch.cat([x, x], -1)
            return dyn(pair, torch.cat([u, u], -1), t)[..., 2 * i:2 * i + 2]

        g = goal[2 * i:2 * i + 2]
        c1 = Cost(lambda x, u, t, g=g: 0.01 * (u * u).sum(-1) + 0.1 * ((x - g) ** 2).sum(-1),
                  lambda x, g=g: 10.0 * ((x - g) ** 2).sum(-1))
        single = solve_ddp(Dynamics(cart), c1, x0[:, 2 * i:2 * i + 2], us0[..., i:i + 1],
                           max_iter=0)
        own = slice(2 * i, 2 * i + 2)
        other = slice(2 - 2 * i, 4 - 2 * i)
        torch.testing.assert_close(game.k[..., i:i + 1], single.k, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(game.K[..., i:i + 1, own], single.K, rtol=1e-10,
                                   atol=1e-13)
        assert float(game.K[..., i, other].abs().max()) < 1e-13


def test_player_curvature_hook_is_used():
    """An approximated player curvature changes the policy (and the result stays finite)."""
    dyn, cost, _ = _two_carts(1.0)

    class Scaled(GTDDPSolver):
        def player_curvature(self, t, i, block):
            return 4.0 * block if i == 1 else None

    x0 = torch.zeros(1, 4, dtype=DT)
    us0 = torch.zeros(1, 10, 2, dtype=DT)
    a = Scaled(dyn, cost, players=(1, 1), max_iter=0).solve(x0, us0)
    b = GTDDPSolver(dyn, cost, players=(1, 1), max_iter=0).solve(x0, us0)
    assert not torch.allclose(a.k, b.k)
    assert torch.isfinite(a.k).all()


def test_box_limits_with_players_equal_the_box_limited_joint_control_solve():
    """Players and control limits together: with exact player curvatures the box QP of
    the players' joint curvature is the box-limited DDP step on the joint control, so
    the whole solve equals plain DDP with the same limits (limits active)."""
    dyn, cost, _ = _two_carts(1.0)
    x0 = torch.zeros(3, 4, dtype=DT)
    x0[1, 0] = 0.3
    x0[2, 2] = -0.4
    us0 = torch.zeros(3, 30, 2, dtype=DT)
    lim = ([-0.4, -0.3], [0.4, 0.3])
    game = solve_ddp(dyn, cost, x0, us0, players=(1, 1), control_limits=lim, max_iter=60)
    joint = solve_ddp(dyn, cost, x0, us0, control_limits=lim, max_iter=60)
    assert float((game.us.abs() >= torch.tensor([0.4, 0.3], dtype=DT) - 1e-12).sum()) > 0
    torch.testing.assert_close(game.us, joint.us, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(game.cost, joint.cost, rtol=1e-11, atol=0)
    assert list(game.reason) == list(joint.reason)


def test_box_limits_with_shortcut_players_equal_ddp_on_the_augmented_state():
    """A span whose shortcut has parameters (a second player at its merge stage) under
    box limits on the whole control: equal to box-limited DDP on the augmented state."""
    dims = [3, 3, 3, 3]
    dyn, cost = make_problem(11, dims, m=2)
    # limits need one control size for all stages: 11 everywhere; the dynamics read the
    # first 2 entries, the shortcut parameters of stage 2 are the last 9, and the cost
    # keeps the unused entries of stages 0 and 1 at zero
    spans_pad = [Span(0, 2, shortcut=linear_shortcut(3, 3), n_params=9)]
    x0 = torch.randn(2, 3, generator=_gen(12), dtype=DT)
    us0 = 0.1 * torch.randn(2, 3, 11, generator=_gen(13), dtype=DT)
    lo, hi = [-0.15] * 11, [0.15] * 11
    mu_sizes = [11, 11, 2]
    F, C = augmented_problem(dyn, cost, spans_pad, dims, mu_sizes)
    ref = DDPSolver(F, C, max_iter=30, control_limits=(lo, hi)).solve(x0, us0)
    out = GTDDPSolver(dyn, cost, spans=spans_pad, max_iter=30,
                      control_limits=(lo, hi)).solve(x0, us0)
    assert float((out.us.abs() >= 0.15 - 1e-12).sum()) > 0
    torch.testing.assert_close(out.us, ref.us, rtol=1e-8, atol=1e-9)
    torch.testing.assert_close(out.cost, ref.cost, rtol=1e-10, atol=0)


def test_inactive_box_with_approximated_players_equals_the_cooperative_policy():
    """Limits that never bind, players with an approximated curvature: the box-QP gains
    of the joint curvature equal Eq. 40's Schur-complement gains (two independent
    computations of the same block inverse)."""
    dyn, cost, _ = _two_carts(1.0)

    class Scaled(GTDDPSolver):
        def player_curvature(self, t, i, block):
            return 3.0 * block if i == 0 else None

    x0 = torch.tensor([[0.3, 0.0, -0.2, 0.0]], dtype=DT)
    us0 = 0.05 * torch.randn(1, 12, 2, generator=_gen(5), dtype=DT)
    free = Scaled(dyn, cost, players=(1, 1), max_iter=0).solve(x0, us0)
    boxed = Scaled(dyn, cost, players=(1, 1), max_iter=0,
                   control_limits=([-1e6, -1e6], [1e6, 1e6])).solve(x0, us0)
    torch.testing.assert_close(boxed.k, free.k, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(boxed.K, free.K, rtol=1e-10, atol=1e-13)


def test_bad_input():
    dyn, cost = make_problem(0, [3] * 5)
    x0 = torch.zeros(1, 3, dtype=DT)
    us0 = torch.zeros(1, 4, 2, dtype=DT)
    with pytest.raises(InvalidArgumentError, match="ends past the horizon"):
        solve_ddp(dyn, cost, x0, us0, spans=[Span(1, 4)])
    with pytest.raises(InvalidArgumentError, match="start <= end"):
        Span(3, 1)
    with pytest.raises(InvalidArgumentError, match="needs a shortcut"):
        Span(0, 1, n_params=2)
    with pytest.raises(ShapeError, match="players at stage 0"):
        solve_ddp(dyn, cost, x0, us0, players=(1, 2))
    with pytest.raises(InvalidArgumentError, match="mode='ilqr' only"):
        solve_ddp(dyn, cost, x0, us0, spans=[Span(0, 1)], mode="ddp")
    with pytest.raises(TypeError, match="spans\\[0\\]"):
        GTDDPSolver(dyn, cost, spans=[(0, 1)])
    with pytest.raises(ShapeError, match="shortcut parameters"):
        solve_ddp(dyn, cost, x0, us0, spans=[Span(0, 1, shortcut=linear_shortcut(3, 3),
                                                   n_params=9)])
