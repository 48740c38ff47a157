"""One training step of the MANA example network (vsr_kernels/models/mana.py, small configuration),
with its attention on each backend: time and peak memory."""
import pytest

from . import measure, workloads

pytestmark = measure.ROUNDS


@pytest.mark.parametrize("case", [pytest.param(case, id=case.id) for case in workloads.mana_cases()])
def test_training_step(case, measured, benchmark):
    _, frames, _ = measured(case)
    benchmark.extra_info["frames_shape"] = list(frames.shape)
