"""vsr_kernels.local_argmax_attention: every backend and the reference on the same inputs,
forward and forward+backward: time, peak memory, error against the reference, and on GPU
the roofline."""
import pytest

from . import measure, workloads

pytestmark = measure.ROUNDS


def _params(backward):
    return [pytest.param(case, id=case.id) for case in workloads.attention_cases(backward)]


@pytest.mark.parametrize("case", _params(backward=False))
def test_forward(case, measured, benchmark, request):
    measured(case)
    _add_roofline(case, benchmark, request)


@pytest.mark.parametrize("case", _params(backward=True))
def test_forward_backward(case, measured, benchmark, request):
    inputs = measured(case)
    benchmark.extra_info["errors"] = workloads.attention_errors(case, case.run(inputs))
    _add_roofline(case, benchmark, request)


def _add_roofline(case, benchmark, request):
    if case.device == "cuda":
        peaks = request.getfixturevalue("gpu_peaks")
        benchmark.extra_info["roofline"] = measure.roofline(case, benchmark.extra_info["median_ms"], peaks)
