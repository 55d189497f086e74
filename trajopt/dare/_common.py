r"""Shared pieces of the DARE solvers: argument checks, scaling, residual, gain, diagnostics.

The equation is scipy's ``solve_discrete_are`` form

.. math::

    A^\top X A - E^\top X E - (A^\top X B + S)(R + B^\top X B)^{-1}(B^\top X A + S^\top)
    + Q = 0 ,

and the gain is returned in the DDP sign convention ``u = K x`` with
:math:`K = -(R + B^\top X B)^{-1}(B^\top X A + S^\top)` (MATLAB's ``dlqr`` returns
:math:`-K`).

The data of one call is held either as torch tensors (any batch, dtype, device: the
general case) or, for one small float64 system on the CPU, as numpy arrays (see
``docs/dare.md``, "Per-call overhead"): the residual, gain, Newton step and stability
check below are written once over :func:`ops`, a four-function namespace that is numpy's
or torch's.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import numpy as np
import torch

from .._arrays import ArrayKind, infer_kind
from .._checks import (
    batch_shape,
    check_finite,
    check_matrix,
    check_square,
    check_symmetric,
    is_number,
    shape_str,
    symmetry_tol,
)
from .._linalg import batched_solve, finite_rows, sym
from ..errors import InvalidArgumentError, NonFiniteError, NotSymmetricError, ShapeError


class _TorchOps:
    """Array operations on (batched) torch tensors."""

    solve = staticmethod(batched_solve)
    isfinite = staticmethod(torch.isfinite)
    where = staticmethod(torch.where)
    eigvals = staticmethod(torch.linalg.eigvals)

    @staticmethod
    def T(x):
        return x.transpose(-1, -2)

    @staticmethod
    def norm(x):
        """Frobenius norm over the last two dimensions."""
        return torch.linalg.matrix_norm(x)

    @staticmethod
    def finfo(x):
        return torch.finfo(x.dtype)

    @staticmethod
    def allfinite(x):
        return finite_rows(x)

    @staticmethod
    def inv(x):
        return torch.linalg.inv(x)

    @staticmethod
    def absmax(x):
        return x.abs().amax(dim=(-2, -1))

    maximum = staticmethod(torch.maximum)

    @staticmethod
    def exponent(a):
        """The exponent e with ``a = f 2^e``, f in [0.5, 1) (0 for a = 0)."""
        return torch.frexp(a)[1]

    @staticmethod
    def ldexp(x, e):
        """``x 2^e`` for a batch of exponents (power-of-two scaling: exact unless the
        result is subnormal), as two factors so that each is a normal float for any
        exponent frexp returns (|e| <= 1074 in float64)."""
        e = e.to(x.dtype)[..., None, None]
        half = torch.floor(e / 2)
        return x * torch.pow(2.0, half) * torch.pow(2.0, e - half)


class _NumpyOps:
    """The same operations on numpy arrays (one unbatched float64 system: 2-D arrays,
    scalar norms and exponents)."""

    @staticmethod
    def solve(a, b):
        """``a^{-1} b``; NaN for a singular ``a`` (as torch's ``solve_ex`` gives garbage
        rather than raising: callers test finiteness)."""
        try:
            return np.linalg.solve(a, b)
        except np.linalg.LinAlgError:
            return np.full(np.shape(b), np.nan)

    isfinite = staticmethod(np.isfinite)
    where = staticmethod(np.where)
    eigvals = staticmethod(np.linalg.eigvals)
    inv = staticmethod(np.linalg.inv)

    @staticmethod
    def T(x):
        return np.swapaxes(x, -1, -2)

    @staticmethod
    def norm(x):
        return np.linalg.norm(x)  # Frobenius (2-D)

    @staticmethod
    def finfo(x):
        return np.finfo(x.dtype)

    @staticmethod
    def allfinite(x):
        return np.isfinite(x).all()

    @staticmethod
    def absmax(x):
        return float(np.abs(x).max())

    maximum = staticmethod(max)

    @staticmethod
    def exponent(a):
        return math.frexp(a)[1]

    @staticmethod
    def ldexp(x, e):
        # one exact multiplication while 2^e is a normal float, else numpy's ldexp; an
        # overflow to inf is the caller's to report (it names Q and R)
        with np.errstate(over="ignore"):
            return x * math.ldexp(1.0, e) if abs(e) < 1000 else np.ldexp(x, e)


def ops(x) -> type[_TorchOps] | type[_NumpyOps]:
    """The operations for ``x``'s array type."""
    return _NumpyOps if isinstance(x, np.ndarray) else _TorchOps


def unravel(flat: int, shape: torch.Size) -> tuple[int, ...]:
    """The index of position ``flat`` of a flattened batch of ``shape`` (``()`` for an
    unbatched one); numpy's, since ``torch.unravel_index`` needs torch >= 2.2."""
    return tuple(int(i) for i in np.unravel_index(flat, tuple(shape))) if len(shape) else ()


@dataclass(frozen=True)
class DAREData:
    """Validated, broadcast DARE data (batch shape ``batch``): torch tensors, or numpy
    arrays for one unbatched float64 system (:func:`prepare_numpy`)."""

    A: Any
    B: Any
    Q: Any
    R: Any
    E: Any | None
    S: Any | None
    #: for a :meth:`subset`: its elements' flat indices (CPU) in the caller's batch, and
    #: that batch's shape (:meth:`label`: what errors name)
    origin: tuple[torch.Tensor, torch.Size] | None = None

    @property
    def batch(self) -> torch.Size:
        return torch.Size(self.A.shape[:-2])

    @property
    def n(self) -> int:
        return self.A.shape[-1]

    @property
    def m(self) -> int:
        return self.B.shape[-1]

    @property
    def is_numpy(self) -> bool:
        return isinstance(self.A, np.ndarray)

    def torch(self) -> DAREData:
        """The same data as float64 CPU tensors (identity for tensor data)."""
        if not self.is_numpy:
            return self

        def conv(t):
            return None if t is None else torch.from_numpy(t)
        return DAREData(conv(self.A), conv(self.B), conv(self.Q), conv(self.R),
                        conv(self.E), conv(self.S), self.origin)

    def subset(self, index) -> DAREData:
        """The elements ``index`` (a list or mask over the flattened batch, on any device),
        as a flat batch that remembers where they came from (:meth:`label`)."""
        def pick(t):
            return None if t is None else t.reshape(-1, *t.shape[-2:])[index]
        where = torch.as_tensor(index).cpu()
        if where.is_floating_point():  # an empty list
            where = where.long()
        flat, shape = self.origin or (torch.arange(self.batch.numel()), self.batch)
        return DAREData(pick(self.A), pick(self.B), pick(self.Q), pick(self.R),
                        pick(self.E), pick(self.S), (flat[where], shape))

    def label(self, index: tuple[int, ...]) -> tuple[int, ...]:
        """The index in the caller's batch of this data's element ``index``."""
        if self.origin is None:
            return index
        flat, shape = self.origin
        return unravel(int(flat[index[0]]), shape)

    def element(self, index: tuple[int, ...]) -> DAREData:
        """One batch element (unbatched tensors)."""
        def pick(t):
            return None if t is None else t[index]
        return DAREData(pick(self.A), pick(self.B), pick(self.Q), pick(self.R),
                        pick(self.E), pick(self.S))


def riccati_arguments(A: Any, B: Any, Q: Any, R: Any, E: Any, S: Any) -> dict[str, Any]:
    """The matrix arguments of ``solve_dare`` / ``solve_care`` by name, the required ones
    checked (None raised an ``AttributeError`` deep inside), numbers as 1 x 1 matrices."""
    for name, v in (("A", A), ("B", B), ("Q", Q), ("R", R)):
        if v is None:
            raise InvalidArgumentError(f"{name} is required; got None")
    return scalars_as_matrices({"A": A, "B": B, "Q": Q, "R": R, "E": E, "S": S})


def scalars_as_matrices(named: dict[str, Any]) -> dict[str, Any]:
    """Python numbers and 0-d arrays / tensors among the matrix arguments as 1 x 1
    matrices (scipy's and python-control's ``R = 1`` for one input); everything else as
    it is (its shape is checked later, naming the argument)."""
    def one(v):
        if not is_number(v):
            return v    # a bool among them is refused later, by name
        return v.reshape(1, 1) if isinstance(v, (np.ndarray, torch.Tensor)) else \
            np.array([[v]], dtype=float)
    return {k: one(v) for k, v in named.items()}


def _check_shapes(A, B, Q, R, E, S) -> None:
    """Shape checks (they read only ``.ndim`` and ``.shape``: numpy or torch)."""
    n = check_square(A, "A")
    if n == 0:
        raise ShapeError(f"A must have at least one state (n >= 1); got {shape_str(A)}")
    check_matrix(B, "B", n, None)
    m = B.shape[-1]
    if m == 0:
        raise ShapeError(f"B must have at least one column; got {shape_str(B)}")
    for name, t in {"A": A, "B": B, "Q": Q, "R": R, "E": E, "S": S}.items():
        if t is not None and 0 in tuple(t.shape[:-2]):
            raise ShapeError(f"{name} has an empty batch dimension (shape {shape_str(t)}): "
                             "give at least one system")
    check_square(Q, "Q", n)
    check_square(R, "R", m)
    if E is not None:
        check_square(E, "E", n)
    if S is not None:
        check_matrix(S, "S", n, m)


def prepare(A, B, Q, R, E, S) -> DAREData:
    """Check shapes, finiteness and symmetry; broadcast all batch dimensions."""
    _check_shapes(A, B, Q, R, E, S)
    named = {"A": A, "B": B, "Q": Q, "R": R, "E": E, "S": S}
    for name, t in named.items():
        if t is not None:
            check_finite(t, name)
    check_symmetric(Q, "Q")
    check_symmetric(R, "R")
    batch = batch_shape(*((t, 2, name) for name, t in named.items()))

    def bc(t):
        return None if t is None else t.expand(*batch, *t.shape[-2:])
    return DAREData(bc(A), bc(B), sym(bc(Q)), sym(bc(R)), bc(E), bc(S))


def prepare_numpy(A, B, Q, R, E, S) -> DAREData:
    """:func:`prepare` for one unbatched system given as 2-D float64 numpy arrays: the
    same checks, with the same messages, without the torch round trip."""
    _check_shapes(A, B, Q, R, E, S)
    for name, t in {"A": A, "B": B, "Q": Q, "R": R, "E": E, "S": S}.items():
        if t is not None and not np.isfinite(t).all():
            raise NonFiniteError(f"{name} contains NaN or infinity (shape {shape_str(t)})")
    for name, t in (("Q", Q), ("R", R)):
        asym = float(np.abs(t - t.T).max())
        scale = max(float(np.abs(t).max()), np.finfo(np.float64).tiny)
        if asym > symmetry_tol(torch.float64) * scale:
            raise NotSymmetricError(
                f"{name} must be symmetric; relative asymmetry {asym / scale:.2e} "
                f"(shape {shape_str(t)})")
    return DAREData(A, B, 0.5 * (Q + Q.T), 0.5 * (R + R.T), E, S)


def scale(d: DAREData) -> tuple[DAREData, Any]:
    r"""Scale the cost ``(Q, R, S)`` of every element by the power of two ``2^-e`` that
    brings its largest entry into [0.5, 1).

    The stabilizing solution scales with the cost, :math:`X(cQ, cR, cS) = c X(Q, R, S)`,
    and the gain does not change, so the scaled problem (whose entries are O(1) where
    products of the data cannot overflow or underflow) is solved and its solution
    multiplied by ``2^e``.  Power-of-two scaling is exact: ordinary data give the same
    bits of the relative residual as before.  Returns the scaled data and ``e`` (batch).
    """
    o = ops(d.A)
    big = o.maximum(o.absmax(d.Q), o.absmax(d.R))
    if d.S is not None:
        big = o.maximum(big, o.absmax(d.S))
    e = o.exponent(big)

    def sc(t):
        return None if t is None else o.ldexp(t, -e)
    return replace(d, Q=sc(d.Q), R=sc(d.R), S=sc(d.S)), e


def gain(d: DAREData, X):
    """``K = -(R + B'XB)^{-1} (B'XA + S')`` (..., m, n)."""
    o = ops(X)
    BtX = o.T(d.B) @ X
    G = d.R + BtX @ d.B
    G = 0.5 * (G + o.T(G))
    H = BtX @ d.A
    if d.S is not None:
        H = H + o.T(d.S)
    return -o.solve(G, H)


def residual_matrix(d: DAREData, X, K=None):
    """The Riccati residual and the sum of the norms of its terms (for scaling).  ``K``:
    X's gain from :func:`gain`, when the caller has it -- the correction term
    ``H' G^-1 H`` is then ``-H'K``, the same numbers without a second solve."""
    o = ops(X)
    AXA = o.T(d.A) @ X @ d.A
    EXE = X if d.E is None else o.T(d.E) @ X @ d.E
    H = o.T(d.B) @ X @ d.A
    if d.S is not None:
        H = H + o.T(d.S)
    if K is None:
        G = d.R + o.T(d.B) @ X @ d.B
        G = 0.5 * (G + o.T(G))
        corr = o.T(H) @ o.solve(G, H)
    else:
        corr = -(o.T(H) @ K)
    res = AXA - EXE - corr + d.Q
    res = 0.5 * (res + o.T(res))
    scale_ = o.norm(AXA) + o.norm(EXE) + o.norm(corr) + o.norm(d.Q)
    return res, scale_


def relative_residual(d: DAREData, X, K=None):
    r"""``||Ric(X)||_F / (||A'XA||_F + ||E'XE||_F + ||(..)G^{-1}(..)||_F + ||Q||_F)``.

    NaN-free: a non-finite X gives ``inf``.  Scale-invariant: solvers evaluate it on the
    scaled problem (:func:`scale`), where its terms cannot overflow.  ``K``: X's gain,
    when the caller has it (:func:`residual_matrix`).
    """
    o = ops(X)
    res, scale_ = residual_matrix(d, X, K)
    tiny = o.finfo(X).tiny
    rel = o.norm(res) / o.where(scale_ > tiny, scale_, tiny)
    return o.where(o.isfinite(rel), rel, float("inf"))


def closed_loop_eigvals(d: DAREData, K):
    """Eigenvalues of the pencil ``(A + BK, E)`` (..., n), complex."""
    o = ops(K)
    Acl = d.A + d.B @ K
    if d.E is not None:
        Acl = o.solve(d.E, Acl)
    return o.eigvals(Acl)


def numpy_single(named: dict[str, Any], max_n: int) -> tuple[dict[str, Any], ArrayKind] | None:
    """The arguments as 2-D float64 numpy arrays when they are one float64 CPU system
    with n <= ``max_n`` (numpy arrays, nested lists, or CPU float64 tensors without
    gradient), else None (the general torch path, which also names every bad input)."""
    kind = infer_kind(*named.values())
    if not (kind.numpy or (kind.dtype == torch.float64 and kind.device.type == "cpu")):
        return None
    out: dict[str, Any] = {}
    for name, v in named.items():
        if v is None:
            out[name] = None
            continue
        if isinstance(v, torch.Tensor):
            if v.dtype != torch.float64 or v.device.type != "cpu" or v.requires_grad:
                return None
            a = v.resolve_conj().resolve_neg().numpy()
        else:
            try:
                a = np.asarray(v)
            except (TypeError, ValueError):
                return None
            if a.dtype.kind not in "biuf":
                return None
            a = np.ascontiguousarray(a, dtype=np.float64)
        if a.ndim != 2:
            return None
        out[name] = a
    if out["A"].shape[-1] > max_n:
        return None
    return out, kind
