"""benchmarks/scaling.py (`python -m benchmarks.scaling`): the thread-scaling table it prints is
made of the cases it selects, each timed at both thread counts, with the ratios of those times."""
import re

import pytest
import torch

from benchmarks import scaling

ROW = re.compile(r"^\| (\S+) \| ([\d.e+-]+) / ([\d.e+-]+) \| ([\d.e+-]+) / ([\d.e+-]+) \| ([\d.]+)× / ([\d.]+)× \|$")


def test_selection_is_the_probes_then_the_ops_own_backends():
    ids = [case.id for case in scaling.selected_cases(quick=True, words=["local_argmax_attention"])]
    assert ids[:2] == ["hardware-cpu-float32-torch.mm-probe", "hardware-cpu-uint8-copy-probe"]
    assert ids[2:] == ["local_argmax_attention-cpu-float32-cpu-fwd", "local_argmax_attention-cpu-float32-cpu-fwd+bwd"]
    # Every word must match; the probes stay.
    ids = [case.id for case in scaling.selected_cases(quick=True, words=["trajectory", "fwd+bwd"])]
    assert ids[2:] == ["trajectory_attention-cpu-float32-cpu-fwd+bwd"]


def test_scaling_alternates_the_thread_counts():
    seen = []

    class Case:
        def setup(self):
            return None

        def run(self, inputs):
            seen.append(torch.get_num_threads())

    saved = torch.get_num_threads()
    try:
        times = scaling.scaling(Case(), threads=2, rounds=3)
    finally:
        torch.set_num_threads(saved)
    assert set(times) == {1, 2} and all(len(values) == 3 and min(values) >= 0 for values in times.values())
    # Warm-up and sizing at 1 thread, then per round a warm-up call and the timed calls at each
    # count, the order flipped every round: 1, 2 | 2, 1 | 1, 2.
    calls = (len(seen) - 2) // 6 - 1
    runs = [seen[i] for i in range(2, len(seen), calls + 1)]
    assert seen[:2] == [1, 1] and runs == [1, 2, 2, 1, 1, 2]


def test_main_prints_a_row_per_case_with_its_ratios(capsys):
    saved = torch.get_num_threads()
    assert scaling.main(["--quick", "--threads", "2", "--rounds", "2", "-k", "local_argmax_attention fwd+bwd"]) == 0
    assert torch.get_num_threads() == saved
    rows = [ROW.match(line) for line in capsys.readouterr().out.splitlines() if line.startswith("| ") and "×" in line]
    assert [row.group(1) for row in rows] == ["hardware-cpu-float32-torch.mm-probe", "hardware-cpu-uint8-copy-probe",
                                              "local_argmax_attention-cpu-float32-cpu-fwd+bwd"]
    for row in rows:
        one_min, one_median, many_min, many_median, by_min, by_median = map(float, row.groups()[1:])
        assert 0 < one_min <= one_median and 0 < many_min <= many_median
        assert by_min == pytest.approx(one_min / many_min, rel=0.02, abs=0.01)
        assert by_median == pytest.approx(one_median / many_median, rel=0.02, abs=0.01)


@pytest.mark.parametrize("argv", [["--threads", "1"], ["--rounds", "0"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        scaling.main(argv)
