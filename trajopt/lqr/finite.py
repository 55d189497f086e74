r"""Finite-horizon, time-varying LQR (thesis Sec. 2.3.1, Eq. 2.3.3-2.3.6, App. B).

.. math::

    \min_{u_0..u_{T-1}} \; \sum_{t=0}^{T-1} \Big[\tfrac12 x_t^\top Q_t x_t
        + \tfrac12 u_t^\top R_t u_t + u_t^\top M_t x_t + q_t^\top x_t + r_t^\top u_t\Big]
        + \tfrac12 x_T^\top Q_T x_T + q_T^\top x_T
    \quad\text{s.t.}\quad x_{t+1} = A_t x_t + B_t u_t + c_t .

The backward pass is :func:`trajopt.riccati.riccati_step_joint` applied stage by stage, or,
for a few small problems over many stages, once over all stages with the values from the
parallel scan of :mod:`trajopt.riccati.scan`, and for small problems on the CPU by the
compiled loop of :mod:`trajopt.riccati.compiled` (the same values up to rounding;
:mod:`trajopt.lqr.exact_pass`, ``docs/performance.md``); the optimal policy is
:math:`u_t = K_t x_t + k_t` and the value is
:math:`V_t(x) = \tfrac12 x^\top P_t x + p_t^\top x + \text{const}`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .._arrays import ArrayKind, as_tensors
from .._checks import batch_shape, check_finite, check_vector, shape_str
from .._linalg import mv as _mv
from ..errors import InvalidArgumentError, NotPositiveDefiniteError, NumericalError, ShapeError
from ..riccati.expansion import DenseStage, joint_blocks
from ..riccati.solvers import CholeskySolver, QuuSolver
from ..riccati.step import riccati_step_joint
from .affine_scan import scan_closed_loop
from .exact_pass import compiled_backward, scan_backward, stacked_for_pass, under_functorch
from .implicit import lqr_trajectory
from .stages import (
    RANK,
    STAGE_ARGS,
    Stage,
    batch_args,
    split_stages,
    stage_cost,
    terminal_cost,
    validate_shapes,
    validate_values,
)

__all__ = ["LQR", "LQRSolution", "Trajectory", "solve_lqr", "rollout", "dense_stages",
           "Stage"]

@dataclass(frozen=True, kw_only=True)
class LQR:
    r"""A finite-horizon LQR problem (cost convention of ``docs/notation.md``).

    Each stage argument is either a sequence of ``T`` per-stage arrays (stage sizes may
    differ: ``A_t`` is ``(n_{t+1}, n_t)``) or one stacked array with the time axis right
    before the matrix axes, e.g. ``A`` of shape ``(..., T, n, n)``.  Leading dimensions
    are batch dimensions and broadcast.  numpy input gives numpy results in float64;
    torch input gives torch results of its dtype and device.

    Parameters
    ----------
    A : (..., T, n, n) or sequence of (..., n_{t+1}, n_t)
    B : (..., T, n, m) or sequence of (..., n_{t+1}, m_t)
    Q : (..., T, n, n) or sequence of (..., n_t, n_t), symmetric
    R : (..., T, m, m) or sequence of (..., m_t, m_t), symmetric
    M : (..., T, m, n) or sequence of (..., m_t, n_t), optional
        Cross term ``u'Mx`` (the Q_ux block; scipy's ``S`` is ``M'``).
    q : (..., T, n) or sequence of (..., n_t), optional
    r : (..., T, m) or sequence of (..., m_t), optional
    c : (..., T, n) or sequence of (..., n_{t+1}), optional
        Affine offset of the dynamics.
    QT : (..., n_T, n_T)
        Terminal Hessian, symmetric.
    qT : (..., n_T), optional
        Terminal gradient.
    """

    A: Any
    B: Any
    Q: Any
    R: Any
    M: Any = None
    q: Any = None
    r: Any = None
    c: Any = None
    QT: Any
    qT: Any = None
    stages: list[Stage] = field(init=False, repr=False, compare=False)
    arrays: dict[str, torch.Tensor | None] | None = field(init=False, repr=False,
                                                          compare=False)
    terminal: tuple[torch.Tensor, torch.Tensor | None] = field(
        init=False, repr=False, compare=False)
    kind: ArrayKind = field(init=False, repr=False, compare=False)
    stacked: bool = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        raw = {name: getattr(self, name) for name in STAGE_ARGS}
        raw["QT"], raw["qT"] = self.QT, self.qT
        tensors, kind = as_tensors(raw, whole=("QT", "qT"))
        stacked = not isinstance(self.A, (list, tuple))
        if stacked and tensors["A"].ndim < 3:
            raise ShapeError(
                f"A must be a sequence of T matrices or a stacked array (..., T, n, n); "
                f"got shape {shape_str(tensors['A'])}")
        listed = [name for name in STAGE_ARGS if isinstance(tensors[name], list)]
        if stacked and listed:
            raise ShapeError(f"A is a stacked array but {', '.join(listed)} given as "
                             f"sequences of stages: stack them too, or give A as a sequence")
        T = tensors["A"].shape[-3] if stacked else len(tensors["A"])
        if T < 1:
            raise ShapeError("A must hold at least one stage (T >= 1)")
        QT, qT = tensors["QT"], tensors["qT"]
        if QT is None:
            raise ShapeError("QT (terminal Hessian) is required")
        per_stage = {name: split_stages(tensors[name], name, T) for name in STAGE_ARGS}
        stages = [Stage(**{name: per_stage[name][t] for name in STAGE_ARGS})
                  for t in range(T)]
        validate_shapes(stages, QT, qT)
        if stacked:  # one check per argument instead of one per stage
            validate_values({n: tensors[n] for n in STAGE_ARGS}, QT, qT, "")
        else:
            for t, st_ in enumerate(stages):
                validate_values({n: getattr(st_, n) for n in STAGE_ARGS}, None, None,
                                 f"[{t}]")
            validate_values({}, QT, qT, "")
        object.__setattr__(self, "arrays", {n: tensors[n] for n in STAGE_ARGS}
                           if stacked else None)
        object.__setattr__(self, "stages", stages)
        object.__setattr__(self, "terminal", (QT, qT))
        object.__setattr__(self, "kind", kind)
        uniform = all(s.n == stages[0].n and s.m == stages[0].m for s in stages) and (
            stages[-1].A.shape[-2] == stages[0].n)
        object.__setattr__(self, "stacked", stacked and uniform)

    @property
    def T(self) -> int:
        """Number of stages (horizon)."""
        return len(self.stages)

    @classmethod
    def time_invariant(cls, A: Any, B: Any, Q: Any, R: Any, T: int, *, M: Any = None,
                       q: Any = None, r: Any = None, c: Any = None, QT: Any = None,
                       qT: Any = None) -> LQR:
        """The same stage matrices at each of ``T`` stages, without stacking them by hand:
        ``LQR.time_invariant(A, B, Q, R, T=50, QT=P)``.

        Stage arguments are one stage's arrays (``A`` (..., n, n), ``q`` (..., n), ...);
        they are repeated along a new time axis (a broadcast view for torch input, no
        copy).  ``QT`` defaults to ``Q``; e.g. the DARE solution
        (``solve_dare(A, B, Q, R).P``) makes the finite horizon's gains those of the
        infinite one.
        """
        if isinstance(T, bool) or not isinstance(T, int) or T < 1:
            raise InvalidArgumentError(f"T must be a positive integer; got {T!r}")
        named = {"A": A, "B": B, "Q": Q, "R": R, "M": M, "q": q, "r": r, "c": c}
        for name, v in named.items():
            if isinstance(v, (list, tuple)):
                raise InvalidArgumentError(
                    f"{name}: LQR.time_invariant takes one stage's array, not a sequence; "
                    f"for stages that differ use LQR(...) with a sequence or a stacked array")
        tensors, kind = as_tensors({**named, "QT": Q if QT is None else QT, "qT": qT},
                                   sequences=False)

        def repeat(name: str, v: torch.Tensor | None) -> Any:
            if v is None:
                return None
            rank = RANK[name]
            if v.ndim < rank:
                raise ShapeError(f"{name} must have at least {rank} dimensions; got "
                                 f"{shape_str(v)}")
            v = v.unsqueeze(-rank - 1)
            v = v.expand(*v.shape[:-rank - 1], T, *v.shape[-rank:])
            return v.contiguous().numpy() if kind.numpy else v
        def back(v: torch.Tensor | None) -> Any:
            return None if v is None else (v.numpy() if kind.numpy else v)
        out = {name: repeat(name, tensors[name]) for name in named}
        return cls(**out, QT=back(tensors["QT"]), qT=back(tensors["qT"]))


def dense_stages(problem: LQR) -> list[DenseStage]:
    """The problem's stages as the kernel's dense expansion plug
    (:class:`~trajopt.riccati.expansion.DenseStage`); a stacked problem is packed with
    two ``cat`` calls for all stages."""
    if problem.arrays is not None:
        a = problem.arrays
        packed = joint_blocks(a["A"], a["B"], a["q"], a["r"], a["Q"], a["R"], a["M"])
        # time-major contiguous copies: per-stage views of a batch-major array are
        # strided, and every batched matmul on them would copy them again
        Fs, Ls = (list(v.movedim(-3, 0).contiguous().unbind(0)) for v in packed)
    else:
        packed = [joint_blocks(s.A, s.B, s.q, s.r, s.Q, s.R, s.M) for s in problem.stages]
        Fs, Ls = [p[0] for p in packed], [p[1] for p in packed]
    return [DenseStage(F, L, s.n, s.c) for s, F, L in zip(problem.stages, Fs, Ls)]


@dataclass(frozen=True)
class LQRSolution:
    """Solution of :func:`solve_lqr`.

    Arrays are stacked along a time axis when the problem was given stacked, otherwise
    they are lists with one entry per stage.

    Attributes
    ----------
    K : (..., T, m, n)
        Feedback gains, ``u_t = K_t x_t + k_t``.
    k : (..., T, m)
        Feedforward terms.
    P : (..., T+1, n, n)
        Value Hessians ``P_0 .. P_T`` (``P_T = Q_T``).
    p : (..., T+1, n)
        Value gradients ``p_0 .. p_T`` (``p_T = q_T``).
    xs : (..., T+1, n) or None
        Optimal states from ``x0`` (None when no x0 was given).
    us : (..., T, m) or None
        Optimal controls.
    cost : (...) or None
        Total cost of the optimal trajectory.
    """

    K: Any
    k: Any
    P: Any
    p: Any
    xs: Any = None
    us: Any = None
    cost: Any = None


@dataclass(frozen=True)
class Trajectory:
    """A rolled-out trajectory: ``xs`` (..., T+1, n), ``us`` (..., T, m), ``cost`` (...)."""

    xs: Any
    us: Any
    cost: Any


def _step(s: Stage, x: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    x1 = _mv(s.A, x) + _mv(s.B, u)
    return x1 if s.c is None else x1 + s.c


def _simulate(problem: LQR, x: torch.Tensor, control) -> tuple[list, list, torch.Tensor]:
    """Roll the dynamics out from ``x`` with ``u_t = control(t, x_t)``; returns the state
    list (T+1), the control list (T) and the total cost (...)."""
    xs, us, total = [x], [], 0.0
    for t, s in enumerate(problem.stages):
        u = control(t, x)
        total = total + stage_cost(s, x, u)
        x = _step(s, x, u)
        xs.append(x)
        us.append(u)
    return xs, us, total + terminal_cost(*problem.terminal, x)


def _stack(values: list[torch.Tensor], rank: int, problem: LQR, kind: ArrayKind) -> Any:
    """Stack per-stage tensors along a time axis placed before the ``rank`` core axes."""
    if not problem.stacked:
        return kind.out(list(values))
    shape = torch.broadcast_shapes(*(v.shape for v in values))
    return kind.out(torch.stack([v.expand(shape) for v in values], dim=-rank - 1))


def _x0_tensor(problem: LQR, x0: Any) -> torch.Tensor:
    x0t = problem.kind.tensor(x0, "x0")
    check_vector(x0t, "x0", problem.stages[0].n)
    check_finite(x0t, "x0")
    batch_shape(*batch_args(problem.stages, *problem.terminal), (x0t, 1, "x0"))
    return x0t


def solve_lqr(problem: LQR, x0: Any = None, *, reg: float = 0.0,
              solver: QuuSolver | None = None) -> LQRSolution:
    r"""Solve a finite-horizon LQR by the backward Riccati recursion.

    Parameters
    ----------
    problem : LQR
    x0 : (..., n_0), optional
        Initial state(s).  When given, the optimal trajectory and its cost are returned.
    reg : float
        Tikhonov regularization added to ``R_t + B_t'P_{t+1}B_t`` before it is solved
        (0 = exact LQR).  The returned value derivatives are those of the regularized
        policy.
    solver : QuuSolver, optional
        Any Q_uu plug of the kernel (:mod:`trajopt.riccati.solvers`), e.g.
        :class:`trajopt.steepest.NeumannSolver`; default
        ``CholeskySolver(reg=reg)``.  A solver's ``value_damping(stage)`` is part of the cost
        the returned value derivatives describe.  Give ``reg`` or ``solver``, not both.

    Returns
    -------
    LQRSolution
        Differentiable (torch inputs that require grad): ``xs``, ``us``, ``cost`` by one
        adjoint LQR solve (:mod:`trajopt.lqr.implicit`, first order), ``K, k, P, p`` by
        autograd through the recursion.  With ``reg``, a ``solver`` (including an
        explicit ``CholeskySolver()``: the way to second derivatives) or inside a
        torch.func transform, the trajectory is differentiated through the recursion
        and the rollout.

    Raises
    ------
    NotPositiveDefiniteError
        When ``R_t + B_t'P_{t+1}B_t + reg I`` is not positive definite; names the stage.
    """
    kind = problem.kind
    QT, qT = problem.terminal
    P = QT
    p = torch.zeros_like(QT[..., 0]) if qT is None else qT
    Ps, ps, Ks, ks = [P], [p], [], []
    if solver is not None and reg:
        raise InvalidArgumentError("give reg or solver, not both (a CholeskySolver "
                                   "takes reg itself)")
    # the trajectory's gradient by the adjoint LQR needs the exact optimum: no reg, no
    # other Q_uu solver (an explicit CholeskySolver() asks for autograd through the
    # recursion and rollout, e.g. for second derivatives)
    exact = solver is None and not reg
    solver = CholeskySolver(reg=float(reg) if isinstance(reg, (int, float)) else reg) \
        if solver is None else solver
    stages = dense_stages(problem)
    pre = stacked_for_pass(stages, P, p) if exact else None  # stacked once for both
    scanned = None if pre is None else (compiled_backward(*pre, stages[0].n, P, p)
                                        or scan_backward(*pre, stages[0].n, P, p))
    if scanned is not None:
        Ks, ks, Ps, ps = scanned
    else:
        try:
            for t, s in reversed(list(enumerate(stages))):
                step = riccati_step_joint(p, P, s.F, s.L, s.n, s.c, solver=solver, stage=t)
                P, p = step.Vxx, step.Vx
                Ps.append(P)
                ps.append(p)
                Ks.append(step.K)
                ks.append(step.k)
        except NotPositiveDefiniteError as e:   # R + B'PB of an overflowed P is NaN
            if not bool(torch.isfinite(P).all()):
                raise _overflow("the value matrix P", Ps[::-1], True,
                                len(stages) + 1 - len(Ps)) from e
            raise
        for seq in (Ps, ps, Ks, ks):
            seq.reverse()
    if not (bool(torch.isfinite(Ps[0]).all()) and bool(torch.isfinite(ps[0]).all())):
        raise _overflow("the value function (P, p)",
                        [torch.cat([P.flatten(), p.flatten()]) for P, p in zip(Ps, ps)], True)
    xs = us = cost = None
    if x0 is not None:
        x0t = _x0_tensor(problem, x0)

        def closed_loop(K, k, x):
            scanned = None if under_functorch() else scan_closed_loop(problem, K, k, x)
            return scanned or _simulate(problem, x, lambda t, x: _mv(K[t], x) + k[t])
        if exact and torch.is_grad_enabled() and _requires_grad(problem, x0t) and \
                not under_functorch():
            xs_l, us_l, total = lqr_trajectory(problem, x0t, Ks, ks, Ps, ps, closed_loop,
                                               _adjoint_solver(problem))
        else:
            xs_l, us_l, total = closed_loop(Ks, ks, x0t)
        if not bool(torch.isfinite(total).all()):
            raise _overflow("the optimal trajectory", xs_l, False)
        xs, us, cost = _stack(xs_l, 1, problem, kind), _stack(us_l, 1, problem, kind), \
            kind.out(total)
    return LQRSolution(
        K=_stack(Ks, 2, problem, kind), k=_stack(ks, 1, problem, kind),
        P=_stack(Ps, 2, problem, kind), p=_stack(ps, 1, problem, kind),
        xs=xs, us=us, cost=cost)


def _overflow(what: str, values: list, backward: bool, first: int = 0) -> NumericalError:
    """The error for a pass whose values stopped being finite, naming the stage where
    they first did in the pass's order (``values[i]`` is stage ``first + i``; a backward
    pass runs from the last stage down)."""
    bad = [i for i, v in enumerate(values) if not bool(torch.isfinite(v).all())]
    # every value finite: the cost summed over them overflowed (a huge x0)
    i = (bad[-1] if backward else bad[0]) if bad else len(values) - 1
    dtype = values[i].dtype
    what, where = (what, f"at stage {first + i}") if bad else (
        f"the cost of {what}", "(every stage finite: their sum)")
    return NumericalError(
        f"{what} overflows {str(dtype).replace('torch.', '')} {where}: over "
        "this horizon the problem's values grow without bound (an unstable mode of A that "
        "the controls cannot reach or do not hold, weighed by the cost); shorten the "
        "horizon or rescale the problem" + (" (or solve in float64)"
                                            if dtype != torch.float64 else ""))


def _requires_grad(problem: LQR, x0: torch.Tensor) -> bool:
    QT, qT = problem.terminal
    return x0.requires_grad or QT.requires_grad or (qT is not None and qT.requires_grad) \
        or any(v is not None and v.requires_grad for s in problem.stages
               for v in vars(s).values())


def _adjoint_solver(problem: LQR):
    """``solve(q, r, qT)``: the problem's LQR (detached) with the linear terms replaced,
    solved from x0 = 0 (the adjoint of :mod:`trajopt.lqr.implicit`); lists per stage."""
    st = [{k: (None if v is None else v.detach()) for k, v in vars(s).items()}
          for s in problem.stages]
    QT = problem.terminal[0].detach()

    def solve(q, r, qT):
        adjoint = LQR(A=[d["A"] for d in st], B=[d["B"] for d in st],
                      Q=[d["Q"] for d in st], R=[d["R"] for d in st],
                      M=None if st[0]["M"] is None else [d["M"] for d in st],
                      q=q, r=r, QT=QT, qT=qT)
        return solve_lqr(adjoint, torch.zeros_like(q[0]))
    return solve


def rollout(problem: LQR, x0: Any, us: Any) -> Trajectory:
    """Simulate the problem's dynamics open loop from ``x0`` under controls ``us``.

    Parameters
    ----------
    problem : LQR
    x0 : (..., n_0)
    us : (..., T, m) or sequence of T arrays (..., m_t)

    Returns
    -------
    Trajectory
        States ``xs`` (..., T+1, n), the controls, and the total cost (...).
    """
    kind = problem.kind
    x = _x0_tensor(problem, x0)
    if isinstance(us, (list, tuple)):
        u_list = [kind.tensor(u, f"us[{t}]") for t, u in enumerate(us)]
    else:
        ut = kind.tensor(us, "us")
        if ut.ndim < 2 or ut.shape[-2] != problem.T:
            raise ShapeError(f"us must have shape (..., T={problem.T}, m); got "
                             f"{shape_str(ut)}")
        u_list = list(ut.unbind(-2))
    if len(u_list) != problem.T:
        raise ShapeError(f"us has {len(u_list)} stages but the problem has {problem.T}")
    for t, (s, u) in enumerate(zip(problem.stages, u_list)):
        check_vector(u, f"us[{t}]", s.m)
        check_finite(u, f"us[{t}]")
    batch_shape(*batch_args(problem.stages, *problem.terminal), (x, 1, "x0"),
                *((u_list[t], 1, f"us[{t}]") for t in sorted({0, len(u_list) - 1})))
    xs_l, _, total = _simulate(problem, x, lambda t, x: u_list[t])
    if not bool(torch.isfinite(total).all()):
        raise _overflow("the state", xs_l, False)
    return Trajectory(xs=_stack(xs_l, 1, problem, kind), us=_stack(u_list, 1, problem, kind),
                      cost=kind.out(total))
