"""How the suites measure: time, peak memory, the device, and the GPU's roofline."""
import concurrent.futures
import ctypes
import gc
import multiprocessing
import platform
import re

import pytest
import torch

# pytest-benchmark settings of every suite: the reference takes seconds a call on CPU, so few
# rounds for it (at least 3, after one warm-up), more for the fast backends (up to ~1 s).
ROUNDS = pytest.mark.benchmark(min_rounds=3, max_time=1.0, warmup=True, warmup_iterations=1)


def time_ms(benchmark, fn, device):
    """Median milliseconds of fn(), and the timer that measured it.

    CPU: pytest-benchmark's rounds (set by the suites' `benchmark` marker). CUDA: CUDA events
    through triton.testing.do_bench, after its warm-up, with the L2 cache flushed before each
    call. pytest-benchmark then also times the synchronised call on the host clock, for its
    own table: that number includes the launch overhead the events leave out.
    """
    if device == "cpu":
        benchmark(fn)
        return benchmark.stats.stats.median * 1e3, "pytest-benchmark, host clock"
    import triton.testing

    median = triton.testing.do_bench(fn, return_mode="median")

    def synchronised():
        fn()
        torch.cuda.synchronize()

    benchmark(synchronised)
    return median, "triton.testing.do_bench, CUDA events"


def peak_bytes(workload):
    """Peak memory of workload.run beyond what its inputs already hold."""
    if workload.device == "cpu":
        return cpu_peak_bytes(workload)
    return cuda_peak_bytes(workload)


def cuda_peak_bytes(workload):
    """From the caching allocator's counters, after a warm-up call: Triton compilation and
    autotuning, cuBLAS workspaces and the like are not the workload's memory."""
    inputs = workload.setup()
    workload.run(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    workload.run(inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before


def cpu_peak_bytes(workload):
    """CPU tensors have no allocator counter, so this measures the operating system's view:
    peak resident memory during one call, minus resident memory just before it.

    In a fresh process, after a warm-up call whose freed memory is handed back to the
    operating system (glibc's malloc_trim): so neither earlier cases' leftovers nor
    one-time costs (thread pools, code pages faulted in) count, and a call reusing memory
    that malloc kept cannot hide its peak.
    """
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=1, mp_context=context) as pool:
        return pool.submit(_peak_rss_of_one_call, workload).result()


def _peak_rss_of_one_call(workload):
    inputs = workload.setup()
    workload.run(inputs)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    # Writing 5 resets the peak (VmHWM) to the current resident size (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _proc_status_bytes("VmRSS")
    workload.run(inputs)
    return _proc_status_bytes("VmHWM") - before


def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        kilobytes = re.search(rf"^{field}:\s+(\d+) kB", status.read(), re.MULTILINE).group(1)
    return int(kilobytes) * 1024


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            return re.search(r"^model name\s*:\s*(.+)$", cpuinfo.read(), re.MULTILINE).group(1).strip()
    except (OSError, AttributeError):  # not Linux, or an architecture whose cpuinfo has no model name
        return platform.processor() or platform.machine()


def gpu_peaks():
    """Measured, not datasheet, peaks of the current GPU: device-to-device copy bandwidth
    (bytes/s, a read and a write per element) and the float32 dense matmul rate without
    TF32 (FLOP/s). The kernels multiply in float32 whatever the storage dtype, on the CUDA
    cores, so that rate bounds their arithmetic in every dtype; a bfloat16 tensor-core rate
    would understate the compute-bound time about tenfold."""
    import triton.testing

    source = torch.empty(2**30, dtype=torch.uint8, device="cuda")
    destination = torch.empty_like(source)
    copy_ms = triton.testing.do_bench(lambda: destination.copy_(source), return_mode="median")
    bandwidth = 2 * source.numel() / (copy_ms * 1e-3)
    del source, destination
    n = 8192
    a, b = (torch.randn(n, n, device="cuda", dtype=torch.float32) for _ in range(2))
    allow_tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        matmul_ms = triton.testing.do_bench(lambda: a @ b, return_mode="median")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = allow_tf32
    return {"bandwidth_bytes_per_s": bandwidth, "flops_per_s": 2 * n**3 / (matmul_ms * 1e-3)}


def roofline(case, measured_ms, peaks):
    """The time the pass cannot beat on this GPU, max(bytes / bandwidth, FLOPs / peak rate),
    and the fraction of it the measured time reaches."""
    memory_ms = case.bytes_moved() / peaks["bandwidth_bytes_per_s"] * 1e3
    compute_ms = case.flops() / peaks["flops_per_s"] * 1e3
    return {
        "bytes": case.bytes_moved(),
        "flops": case.flops(),
        "bandwidth_bytes_per_s": peaks["bandwidth_bytes_per_s"],
        "flops_per_s": peaks["flops_per_s"],
        "memory_bound_ms": memory_ms,
        "compute_bound_ms": compute_ms,
        "fraction": max(memory_ms, compute_ms) / measured_ms,
    }

