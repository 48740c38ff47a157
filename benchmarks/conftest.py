"""What every suite shares: measuring a workload into its pytest-benchmark record, the GPU's
measured peaks, and the cases that could not be measured, kept in the JSON for the report."""
import gc
import importlib.metadata
import re

import pytest
import torch

from vsr_kernels.ops import _backend

from . import measure, workloads

NOT_MEASURED = pytest.StashKey[list]()


def pytest_configure(config):
    config.stash[NOT_MEASURED] = []


@pytest.fixture(scope="session")
def gpu_peaks():
    return measure.gpu_peaks()


@pytest.fixture
def measured(benchmark):
    """measured(case) times case.run and measures its peak memory into the benchmark record,
    and returns the inputs it was timed on; skips cases that cannot run here."""

    def measure_case(case):
        reason = _backend.unavailable("local_argmax_attention", case.backend, torch.device(case.device))
        if reason is not None:
            pytest.skip(f"backend {case.backend!r} cannot run: {reason}")
        benchmark.group = case.group
        benchmark.extra_info.update(workloads.describe(case), device_name=measure.device_name(case.device))
        try:
            peak = measure.peak_bytes(case)
            inputs = case.setup()
            median_ms, timer = measure.time_ms(benchmark, lambda: case.run(inputs), case.device)
        except torch.OutOfMemoryError as error:
            allocation = re.search(r"tried to allocate [\d.]+ \w+", str(error), re.IGNORECASE)
            pytest.skip("out of memory" + (f" ({allocation.group()})" if allocation else ""))
        benchmark.extra_info.update(median_ms=median_ms, timer=timer, peak_bytes=peak)
        return inputs

    yield measure_case
    if torch.cuda.is_available():
        # Free and hand back what this case held, so that the next one (the reference is huge) fits:
        # a skip for lack of memory keeps the failed call's frames, and their tensors, in a cycle.
        gc.collect()
        torch.cuda.empty_cache()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    case = getattr(item, "callspec", None) and item.callspec.params.get("case")
    if report.skipped and case is not None:
        reason = report.longrepr[2].removeprefix("Skipped: ")
        item.config.stash[NOT_MEASURED].append(
            workloads.describe(case) | {"device_name": measure.device_name(case.device), "reason": reason})


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["not_measured"] = config.stash[NOT_MEASURED]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["devices"] = {device: measure.device_name(device) for device in workloads.devices()}
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    try:
        machine_info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        machine_info["triton"] = None
