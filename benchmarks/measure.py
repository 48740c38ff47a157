"""How the suite measures: time, peak memory, the device, and the hardware probes (torch.mm's
float32 rate, a large copy's bandwidth) that the report divides the cases' rates by."""
import concurrent.futures
import ctypes
import gc
import multiprocessing
import platform
import re

from dataclasses import dataclass

import torch

from .workloads import Case


def time_ms(benchmark, fn, device):
    """Median milliseconds of fn(), and the timer that measured it.

    CPU: pytest-benchmark's rounds (set by the `benchmark` marker in test_workloads.py). CUDA:
    CUDA events through triton.testing.do_bench, after its warm-up, with the L2 cache flushed
    before each call. pytest-benchmark then also times the synchronised call on the host clock,
    for its own table: that number includes the launch overhead the events leave out.
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
    """(peak, returned): the peak memory of workload.run beyond what its inputs already hold, and
    how much of it the tensors the call returns occupy (peak − returned is the call's own working
    memory: an op that must return dense gradients cannot have a peak below their size)."""
    if workload.device == "cpu":
        return cpu_peak_bytes(workload)
    return cuda_peak_bytes(workload)


def returned_bytes(results):
    """Bytes of the storages of the tensors in `results` (nested tuples, lists, dicts), each
    storage once."""
    storages = {}

    def visit(value):
        if isinstance(value, torch.Tensor):
            storage = value.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
        elif isinstance(value, (tuple, list)):
            for item in value:
                visit(item)
        elif isinstance(value, dict):
            for item in value.values():
                visit(item)

    visit(results)
    return sum(storages.values())


def cuda_peak_bytes(workload):
    """From the caching allocator's counters, after a warm-up call: Triton compilation and
    autotuning, cuBLAS workspaces and the like are not the workload's memory."""
    inputs = workload.setup()
    workload.run(inputs)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    results = workload.run(inputs)
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - before, returned_bytes(results)


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
        return pool.submit(_peak_rss_of_one_call, workload, torch.get_num_threads()).result()


def _peak_rss_of_one_call(workload, threads):
    torch.set_num_threads(threads)
    inputs = workload.setup()
    workload.run(inputs)
    gc.collect()
    ctypes.CDLL(None).malloc_trim(0)
    # Writing 5 resets the peak (VmHWM) to the current resident size (Linux >= 4.0).
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")
    before = _proc_status_bytes("VmRSS")
    results = workload.run(inputs)
    return _proc_status_bytes("VmHWM") - before, returned_bytes(results)


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


# The hardware probes: torch.mm's float32 rate (compute-bound cases) and a large copy's
# bandwidth (memory-bound cases), measured in the same run and timed the same way as every
# case. Sizes: (matmul n, copy bytes) by device type, and BENCH_QUICK's.
PROBE_SIZES = {"cpu": (2048, 2**27), "cuda": (8192, 2**30)}
QUICK_PROBE_SIZES = {"cpu": (512, 2**24), "cuda": (2048, 2**26)}
MATMUL, COPY = "torch.mm", "copy"


@dataclass(frozen=True)
class Probe(Case):
    """A hardware probe, measured like a case.

    "torch.mm": an n×n float32 matmul (TF32 off on CUDA), 2·n³ FLOPs. The kernels multiply in
    float32 whatever the storage dtype, so this rate bounds their arithmetic in every dtype; a
    bfloat16 tensor-core rate would understate the compute-bound time about tenfold.
    "copy": a copy of n bytes into a preallocated tensor (a clone without the allocation,
    whose page faults on CPU would be counted as bandwidth), a read and a write per byte.
    """

    n: int

    workload = "hardware"
    measure_peak = False

    def setup(self):
        generator = torch.Generator(self.device).manual_seed(0)
        if self.backend == MATMUL:
            return [torch.randn(self.n, self.n, device=self.device, generator=generator) for _ in range(2)]
        source = torch.randint(0, 256, (self.n,), dtype=torch.uint8, device=self.device, generator=generator)
        return source, torch.empty_like(source)

    def run(self, inputs):
        if self.backend == COPY:
            source, destination = inputs
            return destination.copy_(source)
        allow_tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        try:
            return torch.mm(*inputs)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = allow_tf32

    def flops(self):
        return 2 * self.n**3 if self.backend == MATMUL else None

    def bytes_moved(self):
        return 2 * self.n if self.backend == COPY else None


def probe_cases(device, quick):
    n, copy_bytes = (QUICK_PROBE_SIZES if quick else PROBE_SIZES)[device]
    return [Probe(device, "float32", MATMUL, "probe", n), Probe(device, "uint8", COPY, "probe", copy_bytes)]


def probe_rate(record):
    """What a probe record measured: ("flops_per_s" or "bandwidth_bytes_per_s", value)."""
    seconds = record["median_ms"] * 1e-3
    if record["backend"] == MATMUL:
        return "flops_per_s", record["flops"] / seconds
    return "bandwidth_bytes_per_s", record["bytes"] / seconds
