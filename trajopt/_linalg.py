"""Small batched linear-algebra helpers shared by the solvers."""

from __future__ import annotations

import torch


def mv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched matrix-vector product ``A v``: (..., r, c) x (..., c) -> (..., r)."""
    return (A @ v.unsqueeze(-1)).squeeze(-1)


def mtv(A: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Batched ``A' v``: (..., r, c) x (..., r) -> (..., c)."""
    return (A.transpose(-1, -2) @ v.unsqueeze(-1)).squeeze(-1)


def sym(X: torch.Tensor) -> torch.Tensor:
    """Symmetric part 1/2 (X + X')."""
    return 0.5 * (X + X.transpose(-1, -2))


def batched_solve(M: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``M^{-1} rhs`` for a batch of small square systems.

    torch's batched LU solve on the CPU runs one LAPACK triangular solve per matrix and is
    ~5x slower than a batched inverse for thousands of 10 x 10 systems (measured with
    torch 2.13), so large CPU batches go through ``inv_ex``; small batches and other
    devices use ``torch.linalg.solve`` (partial-pivoting LU, the more accurate path).
    """
    batch = M.shape[:-2].numel()
    if M.device.type == "cpu" and batch >= 32:
        return torch.linalg.inv_ex(M)[0] @ rhs
    return torch.linalg.solve_ex(M, rhs)[0]
