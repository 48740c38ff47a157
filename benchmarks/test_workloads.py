"""The one suite: the hardware probes of every device present, then every case of every
registered workload (benchmarks/workloads/): time, peak memory and the workload's accuracy
check, into pytest-benchmark's record of the case."""
import pytest

from . import measure, workloads

# pytest-benchmark's settings: the reference takes seconds a call on CPU, so few rounds for it (at
# least 3, after one warm-up), more for the fast backends (up to ~1 s).
pytestmark = pytest.mark.benchmark(min_rounds=3, max_time=1.0, warmup=True, warmup_iterations=1)

CASES = [*(probe for device in workloads.devices() for probe in measure.probe_cases(device, workloads.QUICK)),
         *workloads.all_cases()]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_case(case, measured):
    measured(case)
