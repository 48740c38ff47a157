"""Times torchvision.ops.deform_conv2d and vsr_kernels.deform_conv2d the same way, at the
issue's shapes (float32, B=1, C_in=C_out=64, 3x3, padding 1, 8 offset groups, mask, bias;
64x64 and 180x320): forward and forward+backward (min and median of N runs after a warm-up)
and the extra peak resident memory of one forward+backward call (a fresh process: VmHWM after
the call minus VmRSS before it, inputs and a warm-up call already made).

torchvision's wheels need a CUDA build of torch, which cannot load vsr_kernels' extension
(built against the system torch), so each implementation runs under its own interpreter:

    /tmp/tv-venv/bin/python tools/bench_torchvision_deform.py --impl torchvision
    PYTHONPATH=$PWD python tools/bench_torchvision_deform.py --impl vsr_kernels [--backend cpu]

Both print one JSON line per (shape, pass) with torch's version and thread count: compare
them on the same machine, close in time, and say which torch each ran on.
"""
import argparse
import json
import os
import statistics
import subprocess
import sys
import time

import torch

SHAPES = [(1, 64, 64, 64, 64, 3, 8), (1, 64, 64, 180, 320, 3, 8)]

def inputs(B, C, Co, H, W, k, G, seed=0):
    g = torch.Generator().manual_seed(seed)
    K = k * k
    t = {"input": torch.randn(B, C, H, W, generator=g), "offset": 2 * torch.randn(B, 2 * G * K, H, W, generator=g),
         "weight": torch.randn(Co, C, k, k, generator=g) * (C * K) ** -0.5, "bias": torch.randn(Co, generator=g),
         "mask": torch.rand(B, G * K, H, W, generator=g)}
    for v in t.values():
        v.requires_grad_()
    return t, torch.randn(B, Co, H, W, generator=g)

def make_call(impl, backend, t, grad_out, k, backward):
    if impl == "torchvision":
        import torchvision.ops

        def fwd():
            return torchvision.ops.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], padding=k // 2,
                                                 mask=t["mask"])
    else:
        import vsr_kernels

        def fwd():
            return vsr_kernels.deform_conv2d(t["input"], t["offset"], t["weight"], t["bias"], padding=k // 2,
                                             mask=t["mask"], backend=backend)
    wrt = [t[n] for n in ("input", "offset", "weight", "bias", "mask")]

    def call():
        if not backward:
            with torch.no_grad():
                return fwd()
        return torch.autograd.grad(fwd(), wrt, grad_out)

    return call

def rss(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    return 0

def peak_fresh(impl, backend, shape):
    """Extra peak RSS of the first forward+backward call at `shape`, after a warm-up at a tiny shape."""
    code = (f"import sys; sys.argv=['x']; sys.path.insert(0, {os.path.dirname(os.path.abspath(__file__))!r});"
            f"import bench_torchvision_deform as b; b.first_call_peak({impl!r}, {backend!r}, {tuple(shape)!r})")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["peak_extra_bytes"]

def first_call_peak(impl, backend, shape):
    tiny = (1, shape[1], shape[2], 8, 8, shape[5], shape[6])
    t, g = inputs(*tiny)
    make_call(impl, backend, t, g, shape[5], True)()  # imports, kernels, allocator warm
    t, grad_out = inputs(*shape)
    call = make_call(impl, backend, t, grad_out, shape[5], True)
    before = rss("VmRSS")
    call()
    print(json.dumps({"peak_extra_bytes": max(0, rss("VmHWM") - before)}))

def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impl", choices=["torchvision", "vsr_kernels"], required=True)
    parser.add_argument("--backend", default="cpu", help="vsr_kernels backend (default cpu)")
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--small-only", action="store_true", help="only the 64x64 shape")
    args = parser.parse_args()
    shapes = SHAPES[:1] if args.small_only else SHAPES
    for shape in shapes:
        for backward in (False, True):
            t, grad_out = inputs(*shape)
            call = make_call(args.impl, args.backend, t, grad_out, shape[5], backward)
            call()
            times = []
            for _ in range(args.runs if shape[3] * shape[4] < 10000 else max(3, args.runs // 2)):
                t0 = time.perf_counter()
                call()
                times.append((time.perf_counter() - t0) * 1e3)
            record = {"impl": args.impl, "backend": args.backend if args.impl == "vsr_kernels" else "torchvision",
                      "torch": torch.__version__, "threads": torch.get_num_threads(),
                      "shape": dict(zip(("B", "C_in", "C_out", "H", "W", "k", "offset_groups"), shape)),
                      "pass": "fwd+bwd" if backward else "fwd", "min_ms": round(min(times), 3),
                      "median_ms": round(statistics.median(times), 3),
                      "loadavg": open("/proc/loadavg").read().split()[0]}
            if backward:
                record["peak_extra_MB"] = round(peak_fresh(args.impl, args.backend, shape) / 2**20, 2)
            print(json.dumps(record), flush=True)

if __name__ == "__main__":
    main()
