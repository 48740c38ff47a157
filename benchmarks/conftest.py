"""What the suite shares: measuring a case into its pytest-benchmark record, one printed line
per case as it finishes, and the cases that could not be measured, kept in the JSON for the
report. BENCH_THREADS=N sets torch's CPU threads (see run.py)."""
import gc
import importlib.metadata
import os
import re

import pytest
import torch

from . import measure, workloads

NOT_MEASURED = pytest.StashKey[list]()
RECORD = pytest.StashKey[dict]()
MB = 2**20


LOAD_AT_START = pytest.StashKey[tuple]()


def pytest_configure(config):
    config.stash[NOT_MEASURED] = []
    config.stash[LOAD_AT_START] = os.getloadavg()
    if os.environ.get("BENCH_THREADS"):
        torch.set_num_threads(int(os.environ["BENCH_THREADS"]))


@pytest.fixture
def measured(benchmark, request):
    """measured(case) times case.run, measures its peak memory and its errors into the benchmark
    record; skips cases that cannot run here."""

    def measure_case(case):
        reason = case.unavailable()
        if reason is not None:
            pytest.skip(f"backend {case.backend!r} cannot run: {reason}")
        benchmark.group = case.group
        benchmark.extra_info.update(case.describe(), device_name=measure.device_name(case.device))
        try:
            peak, returned = measure.peak_bytes(case) if case.measure_peak else (None, None)
            inputs = case.setup()
            median_ms, timer = measure.time_ms(benchmark, lambda: case.run(inputs), case.device)
            errors = case.errors(inputs)
        except torch.OutOfMemoryError as error:
            allocation = re.search(r"tried to allocate [\d.]+ \w+", str(error), re.IGNORECASE)
            pytest.skip("out of memory" + (f" ({allocation.group()})" if allocation else ""))
        benchmark.extra_info.update(median_ms=median_ms, timer=timer, peak_bytes=peak,
                                    returned_bytes=returned, errors=errors)
        request.node.stash[RECORD] = benchmark.extra_info
        return inputs

    yield measure_case
    if torch.cuda.is_available():
        # Free and hand back what this case held, so that the next one (the reference is huge) fits:
        # a skip for lack of memory keeps the failed call's frames, and their tensors, in a cycle.
        gc.collect()
        torch.cuda.empty_cache()


def _line(case, record=None, reason=None):
    """op, backend, dtype, pass, then the median and the peak (or the probe's rate, or why not)."""
    head = f"{case.workload:<24} {case.device:<4} {case.backend:<9} {case.dtype:<8} {case.pass_name:<7}"
    if record is None:
        return f"{head} not measured: {reason}"
    tail = f"{record['median_ms']:10.3f} ms"
    if record["peak_bytes"] is not None:
        tail += f"  peak {record['peak_bytes'] / MB:8.1f} MB"
    if case.workload == measure.Probe.workload:
        name, rate = measure.probe_rate(record)
        tail += f"  {rate / 1e9:8.1f} {'GFLOP/s' if name == 'flops_per_s' else 'GB/s'}"
    if record.get("errors"):
        error = max(value for name, value in record["errors"].items() if not name.startswith("index"))
        tail += f"  max error {error:.2g}"
    return f"{head} {tail}"


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    report = (yield).get_result()
    case = getattr(item, "callspec", None) and item.callspec.params.get("case")
    if case is None:
        return
    terminal = item.config.pluginmanager.get_plugin("terminalreporter")
    line = None
    if report.skipped:
        reason = report.longrepr[2].removeprefix("Skipped: ")
        item.config.stash[NOT_MEASURED].append(
            case.describe() | {"device_name": measure.device_name(case.device), "reason": reason})
        line = _line(case, reason=reason)
    elif report.when == "call" and report.passed and RECORD in item.stash:
        line = _line(case, item.stash[RECORD])
    elif report.failed:
        line = _line(case, reason=f"FAILED in {report.when}")
    if line and terminal is not None:
        terminal.ensure_newline()
        terminal.write_line(line, flush=True)


def pytest_report_teststatus(report, config):
    """No progress dots: every case prints its own line (above)."""
    if report.when == "call" and report.passed:
        return "passed", "", ""
    if report.skipped:
        return "skipped", "", ""
    return None


def pytest_benchmark_update_json(config, benchmarks, output_json):
    output_json["not_measured"] = config.stash[NOT_MEASURED]


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["devices"] = {device: measure.device_name(device) for device in workloads.devices()}
    machine_info["torch"] = torch.__version__
    machine_info["torch_threads"] = torch.get_num_threads()
    machine_info["quick"] = workloads.QUICK
    # Other processes on the machine perturb CPU timings: the 1-minute load average when the
    # suite started and when it ended, for the report to show beside the thread count.
    machine_info["load_average"] = [config.stash[LOAD_AT_START][0], os.getloadavg()[0]]
    try:
        machine_info["triton"] = importlib.metadata.version("triton")
    except importlib.metadata.PackageNotFoundError:
        machine_info["triton"] = None
