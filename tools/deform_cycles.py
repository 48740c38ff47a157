"""User-mode CPU cycles and instructions of one deform_conv2d call on one thread, counted in the
process around each call (perf_event_open), so the imports and the machine's load do not
enter the count the way they enter wall time or a whole-process `perf stat`: for comparisons
on a shared machine (benchmarks/NOTES.md, deform_conv2d). Linux on x86-64 only; needs
perf events for user space (kernel.perf_event_paranoid <= 2).

    PYTHONPATH=$PWD python tools/deform_cycles.py vsr fwd+bwd 64x64 30
    PYTHONPATH=$PWD python tools/deform_cycles.py conv2d fwd 180x320 20
    /tmp/tv-venv/bin/python tools/deform_cycles.py torchvision fwd 64x64 10

impl: vsr (backend cpu), reference (vsr_kernels.reference), conv2d (F.conv2d of the same
shape), torchvision; the inputs are tools/bench_torchvision_deform.py's (B=1, C_in=C_out=64,
3x3, padding 1, 8 offset groups, mask, bias, float32). Prints the minimum and median over N
calls after a warm-up call.
"""
import ctypes
import os
import statistics
import struct
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench_torchvision_deform as bench  # noqa: E402

_libc = ctypes.CDLL(None, use_errno=True)
_PERF_EVENT_OPEN = 298  # x86-64
_ENABLE, _DISABLE, _RESET = 0x2400, 0x2401, 0x2403


def _counter(config):
    """A disabled user-mode hardware counter of this thread (config 0: cycles, 1: instructions)."""
    attr = bytearray(128)
    struct.pack_into("IIQ", attr, 0, 0, len(attr), config)  # PERF_TYPE_HARDWARE, size, config
    struct.pack_into("Q", attr, 40, 1 | 1 << 5 | 1 << 6)  # disabled, exclude_kernel, exclude_hv
    fd = _libc.syscall(_PERF_EVENT_OPEN, ctypes.create_string_buffer(bytes(attr), len(attr)), 0, -1, -1, 0)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "perf_event_open failed (kernel.perf_event_paranoid?)")
    return fd


def count(call, n):
    fds = [_counter(0), _counter(1)]
    results = []
    for _ in range(n):
        for fd in fds:
            _libc.ioctl(fd, _RESET, 0)
            _libc.ioctl(fd, _ENABLE, 0)
        call()
        for fd in fds:
            _libc.ioctl(fd, _DISABLE, 0)
        results.append([struct.unpack("Q", os.read(fd, 8))[0] for fd in fds])
    return results


def main():
    impl, pass_name, shape, n = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    torch.set_num_threads(1)
    H, W = map(int, shape.split("x"))
    t, grad_out = bench.inputs(1, 64, 64, H, W, 3, 8)
    backward = pass_name == "fwd+bwd"
    if impl == "conv2d":
        x, w, b = t["input"], t["weight"], t["bias"]

        def call():
            if not backward:
                with torch.no_grad():
                    return F.conv2d(x, w, b, padding=1)
            return torch.autograd.grad(F.conv2d(x, w, b, padding=1), (x, w, b), grad_out)
    elif impl == "torchvision":
        call = bench.make_call("torchvision", None, t, grad_out, 3, backward)
    else:
        call = bench.make_call("vsr_kernels", "cpu" if impl == "vsr" else "reference", t, grad_out, 3, backward)
    call()
    results = count(call, n)
    cycles, instructions = [r[0] / 1e6 for r in results], [r[1] / 1e6 for r in results]
    print(f"{impl} {pass_name} {shape}: M cycles min {min(cycles):.2f} median {statistics.median(cycles):.2f}, "
          f"M instructions min {min(instructions):.1f}; torch {torch.__version__}, 1 thread, "
          f"load {open('/proc/loadavg').read().split()[0]}")


if __name__ == "__main__":
    main()
