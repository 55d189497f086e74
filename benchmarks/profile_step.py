"""Where one GT-DDP step's time goes: ``torch.profiler`` over a few steps on the digits
ResNet, the top operators by self time and the kernel-launch count, on the CPU or a GPU.

    python benchmarks/profile_step.py [--device cuda] [--curvature adam] [--batch 128]

Prints the profiler's table (self CPU time, and self CUDA time on a GPU) sorted by the
device's self time, and per step: the wall time, the number of operator calls and, on a
GPU, of kernel launches -- on a GPU a step of small ops is bound by launches, not FLOPs.
"""

from __future__ import annotations

import argparse
import sys
import time
import warnings
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import nnbridge  # noqa: E402
from nnbridge.models import resnet  # noqa: E402


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--curvature", default="adam")
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--rows", type=int, default=25)
    a = ap.parse_args(argv)
    dev = torch.device(a.device)
    g = torch.Generator().manual_seed(1)
    X = torch.randn(a.batch, 1, 8, 8, generator=g).to(dev)
    y = torch.randint(0, 10, (a.batch,), generator=g).to(dev)
    torch.manual_seed(0)
    model = resnet((1, 8, 8), 10).to(dev)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "GTDDP: the parameters", UserWarning)
        opt = nnbridge.GTDDP(model, lr=1e-3, curvature=a.curvature)

    def step():
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(X), y).backward()
        opt.step()
        if dev.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(2):
        step()
    t0 = time.perf_counter()
    for _ in range(a.steps):
        step()
    wall = (time.perf_counter() - t0) / a.steps
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if dev.type == "cuda" else [])
    with profile(activities=acts) as prof:
        for _ in range(a.steps):
            step()
    events = prof.key_averages()
    ops = sum(e.count for e in events if e.key.startswith("aten::"))
    key = "self_cuda_time_total" if dev.type == "cuda" else "self_cpu_time_total"
    print(events.table(sort_by=key, row_limit=a.rows))
    line = (f"GTDDP({a.curvature}) on the digits ResNet, batch {a.batch}, {dev}: "
            f"{1e3 * wall:.1f} ms a step (unprofiled), {ops / a.steps:.0f} aten calls a step")
    if dev.type == "cuda":
        kernels = sum(e.count for e in prof.events() if e.device_type.name == "CUDA")
        line += f", {kernels / a.steps:.0f} kernels a step ({torch.cuda.get_device_name()})"
    print(line)


if __name__ == "__main__":
    main()
