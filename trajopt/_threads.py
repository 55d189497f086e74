"""Intra-op threads for loops of tiny ops, and threads of our own for batches cut in slices.

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

Work that runs on one thread outside torch -- a compiled loop (numba, which releases the
GIL) -- can be cut along its batch into slices run on threads of a pool of ours
(:func:`in_slices`): as many as the caller's intra-op thread count
(:func:`caller_threads`), each slice given at least a minimum of work
(:func:`slices_for`). Not torch operations: each thread that calls into torch's OpenMP
gets its own team of workers, and once a pool thread had run torch operations every later
torch call of the process was slower (measured: ``docs/performance.md``, "Eleventh
round").
"""

from __future__ import annotations

import concurrent.futures
import functools
import os
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import torch

__all__ = ["GRAIN", "threads_for", "caller_threads", "slices_for", "in_slices"]

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


def slices_for(work: int, batch: int, min_work: int) -> int:
    """Into how many slices a batch of ``batch`` elements doing ``work`` in all is cut:
    one a thread of :func:`caller_threads` (at most one a core), each with at least
    ``min_work``."""
    most = min(batch, work // max(1, min_work))
    if most < 2:   # the common small case: no lock, no system call
        return 1
    return max(1, min(caller_threads(), os.cpu_count() or 1, most))


def in_slices(run: Callable[[int, int], object], batch: int, parts: int) -> list:
    """``run(b0, b1)`` over ``parts`` contiguous slices of ``range(batch)``: the first on
    the calling thread, the others on a pool's threads (``run`` must release the GIL for
    this to pay, and should not call torch: numba's ``nogil`` code). Returns the results in the
    slices' order; the first exception raised is raised here, after every slice ended."""
    if parts <= 1:
        return [run(0, batch)]
    edges = [batch * i // parts for i in range(parts + 1)]
    futures = [_pool().submit(run, edges[i], edges[i + 1]) for i in range(1, parts)]
    try:
        first = run(edges[0], edges[1])
    finally:
        concurrent.futures.wait(futures)
    return [first] + [f.result() for f in futures]


@functools.cache
def _pool() -> concurrent.futures.ThreadPoolExecutor:
    """The threads of :func:`in_slices` (made on first use)."""
    return concurrent.futures.ThreadPoolExecutor(max(1, (os.cpu_count() or 2) - 1),
                                                 thread_name_prefix="trajopt")


# a forked child has none of the parent's threads: it makes its own pool
os.register_at_fork(after_in_child=_pool.cache_clear)
