"""Intra-op threads for loops of tiny ops.

A sequential Riccati / rollout loop on a small problem (one cart-pole, an 8-state LQ
problem) runs thousands of ops on a few dozen numbers each.  Threads cannot speed those up,
but some kernels open a parallel region anyway -- MKL's Cholesky (``potrf``) does for a
3 x 3 matrix -- and on a machine whose other cores are busy each such region waits for a
descheduled worker: measured 8-12 ms per 3 x 3 Cholesky on a loaded 2-core machine,
against 4 us single-threaded.  :func:`threads_for` runs such a loop with one intra-op
thread when its largest per-stage tensor is below torch's own parallel grain size
(``GRAIN``, 32768 elements: below it torch's elementwise kernels are single-threaded
anyway), and restores the caller's setting afterwards.

``torch.set_num_threads`` is process-wide: while a small solve runs, other Python threads
of the process also see one intra-op thread.  Nested and concurrent solves are counted,
and the last one to leave restores the setting of the first one to enter.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager

import torch

__all__ = ["GRAIN", "threads_for", "caller_threads"]

GRAIN = 32768  # at::internal::GRAIN_SIZE

_lock = threading.Lock()
_depth = 0
_saved = 1


@contextmanager
def threads_for(work: int) -> Iterator[None]:
    """One intra-op thread while the block runs if ``work`` (elements of the largest
    per-stage tensor) is below :data:`GRAIN`; otherwise the caller's setting."""
    global _depth, _saved
    if work >= GRAIN:
        yield
        return
    with _lock:
        if _depth == 0:
            _saved = torch.get_num_threads()
            if _saved != 1:
                torch.set_num_threads(1)
        _depth += 1
    try:
        yield
    finally:
        with _lock:
            _depth -= 1
            if _depth == 0 and _saved != 1:
                torch.set_num_threads(_saved)


def caller_threads() -> int:
    """The intra-op thread count the caller set: torch's setting, or the one
    :func:`threads_for` saved while a block runs with one thread (for code of ours that
    runs its own threads, the compiled loops of :mod:`trajopt.riccati.compiled`)."""
    with _lock:
        return _saved if _depth > 0 else torch.get_num_threads()
