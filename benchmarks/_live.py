"""Live bytes on the CPU: the CPU counterpart of ``torch.cuda.max_memory_allocated``.

torch keeps no allocation counter for CPU tensors, and a process's peak resident set size
follows the C allocator's arenas and the math libraries' buffers more than the tensors
alive (``docs/performance.md``: Adam's step grows RSS by ~15 MB with 0.6 MB of live
tensors).  glibc's ``mallinfo2()`` reports the bytes the allocator has handed out and not
taken back (arenas plus mmapped blocks), which is where torch's CPU tensors live; read after
every aten operation of a step (a ``TorchDispatchMode``), its maximum is the step's peak of
live bytes -- tensors and the small Python-side allocations beside them.
"""

from __future__ import annotations

import ctypes
import ctypes.util
from collections.abc import Callable

from torch.utils._python_dispatch import TorchDispatchMode

_FIELDS = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks",
           "fordblks", "keepcost")


class _Mallinfo2(ctypes.Structure):
    _fields_ = [(name, ctypes.c_size_t) for name in _FIELDS]


def _mallinfo2():
    """glibc's ``mallinfo2`` (None elsewhere: musl, macOS, Windows, glibc < 2.33)."""
    try:
        fn = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallinfo2
    except (OSError, AttributeError):
        return None
    fn.restype = _Mallinfo2
    return fn


_INFO = _mallinfo2()


def in_use() -> int | None:
    """Bytes handed out by the C allocator and not freed (None without glibc)."""
    if _INFO is None:
        return None
    info = _INFO()
    return info.uordblks + info.hblkhd


class _PeakMode(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.peak = in_use()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.peak = max(self.peak, in_use())
        return out


def live_peak(fn: Callable[[], object]) -> tuple[object, int | None]:
    """``fn()`` and the largest :func:`in_use` seen after any of its aten operations
    (None without glibc)."""
    if _INFO is None:
        return fn(), None
    mode = _PeakMode()
    with mode:
        out = fn()
    return out, mode.peak
