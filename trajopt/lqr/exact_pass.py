"""The exact backward pass of :func:`trajopt.solve_lqr` by the compiled loop
(:mod:`trajopt.riccati.compiled`) or the parallel scan (:mod:`trajopt.riccati.scan`), where
each applies and pays; :func:`trajopt.solve_lqr` runs the stage-by-stage recursion where
both return None (and that recursion names a stage that is not positive definite)."""

from __future__ import annotations

import torch

from ..errors import NotPositiveDefiniteError
from ..riccati.compiled import compiled_pays, compiled_recursion
from ..riccati.expansion import DenseStage
from ..riccati.scan import broadcast_stages, scan_batch, scan_pays, scanned_step, stacked_stages
from ..riccati.solvers import CholeskySolver
from ..riccati.step import riccati_step_joint

__all__ = ["stacked_for_pass", "compiled_backward", "scan_backward", "under_functorch"]


def stacked_for_pass(stages: list[DenseStage], P: torch.Tensor, p: torch.Tensor):
    """``(F, L, c)`` stacked over the stages and the one batch they and the terminal value
    ``P``, ``p`` broadcast to, what both passes below read (stacked once); None where the
    stages are not stacked alike or do not broadcast."""
    if not stages or (stacked := stacked_stages(stages)) is None:
        return None
    try:  # the batch scanned_step brings stages and terminal value to (one QT, say)
        return stacked, scan_batch(stacked, p, P)
    except RuntimeError:
        return None


def _lists(K, k, Vxx, Vx, P, p):
    """``(K, k, P, p)`` lists over the stages from stacked (T, ...) tensors, the terminal
    value appended."""
    return (list(K.unbind(0)), list(k.unbind(0)), list(Vxx.unbind(0)) + [P],
            list(Vx.unbind(0)) + [p])


def compiled_backward(stacked: tuple, batch: torch.Size, n: int, P: torch.Tensor,
                      p: torch.Tensor):
    """``(K, k, P, p)`` lists of the exact backward pass by the compiled loop
    (:mod:`trajopt.riccati.compiled`) on the stages of :func:`stacked_for_pass`, where its
    rule allows (CPU, small problems, no input that requires grad, outside torch.func
    transforms); else None, as where some Q_uu is not positive definite (the recursion
    then runs, and names the stage)."""
    F, L, c = stacked
    T, N, m = F.shape[0], batch.numel(), F.shape[-1] - n
    if not compiled_pays(T, N, n, m, *(v for v in (F, L, c, P, p) if v is not None)):
        return None

    def flat(v, core):  # (T, ..., *core) -> (T, N, *core)
        return broadcast_stages(v, batch, core).reshape(T, N, *v.shape[-core:])
    done = compiled_recursion(flat(F, 2), flat(L, 2), None if c is None else flat(c, 1),
                              p.expand(*batch, n).reshape(N, n),
                              P.expand(*batch, n, n).reshape(N, n, n),
                              torch.zeros(N, dtype=F.dtype))
    if not bool(done.ok.all()):
        return None
    kK = done.kK.reshape(T, *batch, m, 1 + n)
    return _lists(kK[..., 1:], kK[..., 0], done.Vxx.reshape(T, *batch, n, n),
                  done.Vx.reshape(T, *batch, n), P, p)


def scan_backward(stacked: tuple, batch: torch.Size, n: int, P: torch.Tensor,
                  p: torch.Tensor):
    """``(K, k, P, p)`` lists of the exact backward pass with the values from the parallel
    scan (:mod:`trajopt.riccati.scan`) and the Riccati step run once over all stages of
    :func:`stacked_for_pass`, where :func:`~trajopt.riccati.scan.scan_pays`; else None, as
    where the scan's values disagree with the step's or some Q_uu is not positive
    definite (the recursion then runs, and names the stage)."""
    F = stacked[0]
    if under_functorch() or not scan_pays(F.shape[0], batch.numel(), F.shape[-1], F.device):
        return None

    def step(Vx1, Vxx1, F, L, n, c):
        try:
            out = riccati_step_joint(Vx1, Vxx1, F, L, n, c, solver=CholeskySolver())
        except NotPositiveDefiniteError:
            return None
        return out, torch.ones(batch, dtype=torch.bool, device=F.device)

    done = scanned_step(stacked, n, p, P, step)
    if done is None:
        return None
    return _lists(done.K, done.k, done.Vxx, done.Vx, P, p)


def under_functorch() -> bool:
    """Inside a torch.func transform (jacrev, vmap, ...), which a custom
    autograd.Function without ``setup_context`` cannot enter."""
    try:
        return torch._C._functorch.peek_interpreter_stack() is not None
    except AttributeError:  # pragma: no cover - older torch
        return False
