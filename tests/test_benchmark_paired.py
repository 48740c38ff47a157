"""benchmarks/paired.py (`python -m benchmarks.paired`): each op case is paired with its workload's
baselines of the same shape, dtype and pass (and a fwd+bwd case with its own forward), the two
sides' calls alternate, and the printed ratios are those of the pairs."""
import re
import time
from dataclasses import dataclass

import pytest
import torch

from benchmarks import paired

ROW = re.compile(r"^\| (\S+) \| (.+?) \| (\d+) \| ([\d.e+-]+) \| ([\d.e+-]+) \| ([\d.e+-]+) / ([\d.e+-]+) / ([\d.e+-]+) \|$")
OP = "local_argmax_attention-cpu-float32-cpu"


def test_comparisons_pair_each_case_with_its_baselines_and_its_forward():
    found = [(case.id, other.id) for case, other in paired.comparisons(quick=True, words=["local_argmax_attention"])]
    assert found == [
        (f"{OP}-fwd", "local_argmax_attention-cpu-float32-reference-fwd"),
        (f"{OP}-fwd", "local_argmax_attention-cpu-float32-careful-fwd"),
        (f"{OP}-fwd+bwd", "local_argmax_attention-cpu-float32-reference-fwd+bwd"),
        (f"{OP}-fwd+bwd", "local_argmax_attention-cpu-float32-careful-fwd+bwd"),
        (f"{OP}-fwd+bwd", f"{OP}-fwd"),
    ]
    # The same shape only: the full shapes add the 180x320 frame, whose one baseline is careful.
    full = [(case.id, other.id) for case, other in paired.comparisons(False, ["local_argmax_attention", "180x320"])]
    assert full == [(f"{OP}-fwd-180x320", "local_argmax_attention-cpu-float32-careful-fwd-180x320"),
                    (f"{OP}-fwd+bwd-180x320", "local_argmax_attention-cpu-float32-careful-fwd+bwd-180x320"),
                    (f"{OP}-fwd+bwd-180x320", f"{OP}-fwd-180x320")]
    kept = paired.comparisons(True, ["local_argmax_attention", "fwd+bwd"], against={"careful", "fwd"})
    assert [other.id for _, other in kept] == ["local_argmax_attention-cpu-float32-careful-fwd+bwd", f"{OP}-fwd"]


@dataclass(frozen=True)
class Sleeper:
    """A case whose call takes `ms` milliseconds and logs its backend."""
    backend: str
    pass_name: str
    ms: float
    log: list

    def setup(self):
        return self.backend

    def run(self, inputs):
        self.log.append(inputs)
        time.sleep(self.ms / 1e3)


def test_pairs_alternate_the_order_and_the_ratios_are_the_pairs():
    log = []
    case, other = Sleeper("cpu", "fwd", 2.0, log), Sleeper("careful", "fwd", 8.0, log)
    times = paired.timed_pairs(case, other, pairs=4, seconds=60)
    # One warm-up call each, then the pairs with the order flipped every pair.
    assert log == ["cpu", "careful", "cpu", "careful", "careful", "cpu", "cpu", "careful", "careful", "cpu"]
    assert len(times) == 4 and all(mine >= 2e-3 and theirs >= 8e-3 for mine, theirs in times)
    assert paired.ratios(case, other, [(1.0, 4.0), (2.0, 5.0)]) == [4.0, 2.5]
    forward = Sleeper("cpu", "fwd", 1.0, log)
    step = Sleeper("cpu", "fwd+bwd", 1.0, log)
    assert paired.ratios(step, forward, [(3.0, 2.0), (6.0, 3.0)]) == [0.5, 1.0]
    assert paired.quartiles([5.0, 1.0, 3.0, 2.0, 4.0]) == (2.0, 3.0, 4.0)


def test_a_time_budget_still_times_three_pairs():
    log = []
    assert len(paired.timed_pairs(Sleeper("cpu", "fwd", 1.0, log), Sleeper("careful", "fwd", 1.0, log),
                                  pairs=40, seconds=0)) == 3


def test_main_prints_a_row_per_comparison_with_its_ratios(capsys):
    saved = torch.get_num_threads()
    argv = ["--quick", "--threads", "1", "--pairs", "3", "--seconds", "0", "--against", "careful,fwd",
            "-k", "local_argmax_attention fwd+bwd"]
    assert paired.main(argv) == 0
    assert torch.get_num_threads() == saved
    rows = [ROW.match(line) for line in capsys.readouterr().out.splitlines() if line.startswith(f"| {OP}")]
    assert [(row.group(1), row.group(2), row.group(3)) for row in rows] == [
        (f"{OP}-fwd+bwd", "× careful", "3"), (f"{OP}-fwd+bwd", "(fwd+bwd − fwd) ÷ fwd", "3")]
    for row in rows:
        mine, theirs, q25, median, q75 = map(float, row.groups()[3:])
        assert mine > 0 and theirs > 0 and q25 <= median <= q75
    # The careful baseline is slower than the op, and a backward costs something.
    assert float(rows[0].group(7)) > 1 and float(rows[1].group(7)) > 0


@pytest.mark.parametrize("argv", [["--threads", "0"], ["--pairs", "2"], ["--seconds", "-1"],
                                  ["--against", "careful,carefull"]])
def test_bad_arguments(argv):
    with pytest.raises(SystemExit):
        paired.main(argv)
