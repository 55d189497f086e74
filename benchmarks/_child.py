"""Run one benchmark configuration in a fresh process (so peak-memory figures are its
own) and read back the JSON line it prints; time the steps of an optimizer there."""

from __future__ import annotations

import json
import resource
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

from _live import in_use, live_peak


def measure_steps(step: Callable[[], object], steps: int, warmup: int) -> dict:
    """Median seconds of ``steps`` calls of ``step()`` after ``warmup`` untimed ones, the
    growth of the peak resident set size over all of them (MB; a fresh process's own,
    see ``bench_gtddp_nn.py`` for why RSS), the peak of live bytes of one more, untimed
    call above what was live before the first (``"live_mb"``, :mod:`_live`: the CPU
    counterpart of ``torch.cuda.max_memory_allocated``; None without glibc) and the last
    call's result as ``"loss"`` (a float when it is a tensor)."""
    live_peak(lambda: None)  # the dispatch mode's first use imports and caches (~20 MB)
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    live0 = in_use()
    times, out = [], None
    for k in range(steps + warmup):
        t0 = time.perf_counter()
        out = step()
        if k >= warmup:
            times.append(time.perf_counter() - t0)
    rss1 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out, peak = live_peak(step)
    loss = float(out.detach()) if hasattr(out, "detach") else out
    return {"time": statistics.median(times), "mem_mb": (rss1 - rss0) / 1024, "loss": loss,
            "live_mb": None if peak is None else (peak - live0) / 2 ** 20}


def run_child(script: str, cfg: dict) -> dict:
    """``python script --child '<cfg json>'``; returns the dict of its last output line."""
    out = subprocess.run([sys.executable, script, "--child", json.dumps(cfg)],
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def run_alternating(script: str, cfgs: list[dict], rounds: int) -> list[dict]:
    """Each configuration of ``cfgs`` in ``rounds`` fresh processes, the configurations
    alternating (A B A B ...), so that the load of a shared machine falls on all of
    them alike; per configuration the last round's result with the minimum ``time``
    and minimum memory figures over the rounds (``"times"``: every round's)."""
    runs: list[list[dict]] = [[] for _ in cfgs]
    for _ in range(max(1, rounds)):
        for got, cfg in zip(runs, cfgs):
            got.append(run_child(script, cfg))
    out = []
    for got in runs:
        best = dict(got[-1])
        best["times"] = [g["time"] for g in got]
        best["time"] = min(best["times"])
        for key in ("mem_mb", "mem_kb", "live_mb"):
            if best.get(key) is not None:
                best[key] = min(g[key] for g in got)
        out.append(best)
    return out
