"""The one suite: the hardware probes of every device present, then every case of every
registered workload (benchmarks/workloads/): time, peak memory and the workload's accuracy
check, into pytest-benchmark's record of the case."""
import pytest

from . import measure, workloads

pytestmark = measure.ROUNDS

CASES = [*(probe for device in workloads.devices() for probe in measure.probe_cases(device, workloads.QUICK)),
         *workloads.all_cases()]


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in CASES])
def test_case(case, measured):
    measured(case)
