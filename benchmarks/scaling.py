"""`python -m benchmarks.scaling`: how the ops' own CPU backends scale from 1 thread to N, beside
how far the machine itself scales (torch.mm's float32 rate and a large copy's bandwidth).

    python -m benchmarks.scaling [--quick] [--threads N] [--rounds R] [-k WORDS]

For each selected case (the CPU cases of every workload in benchmarks/workloads/ whose backend
is an op's own, not a baseline) and for the suite's two hardware probes, one process alternates
rounds at 1 thread and at N threads (default: torch's own thread count), each round the minimum
of enough calls to fill ~0.3 s, the order of the two flipped every round. Timing the two
counts minutes apart, as two runs of `benchmarks.run` would, lets a shared machine's drift
decide the ratio; alternating them case by case does not. Printed: a Markdown table of the
minimum and median of the rounds per thread count, and the scaling (1-thread time / N-thread
time) of the minima and of the medians. A memory-bound pass cannot scale further than the copy
probe does on the same machine, nor a compute-bound one further than torch.mm.

Options: --quick the workloads' smaller shapes (BENCH_QUICK's); --rounds R rounds per thread
count (default 5); -k WORDS only the cases whose id contains every word (case ids are
<workload>-<device>-<dtype>-<backend>-<pass>, as in `benchmarks.run`); the probes always run.
"""
import argparse
import math
import statistics
import sys
import time

import torch

from . import measure, workloads

ROUND_SECONDS = 0.3
MAX_CALLS = 50


def selected_cases(quick, words):
    """The probes, then the CPU cases of the ops' own backends whose id contains every word."""
    probes = measure.probe_cases("cpu", quick)
    cases = [case for workload in workloads.registered().values() for case in workload.cases("cpu", quick)
             if workload.selects(case, words)]
    return probes + [case for case in cases if case.unavailable() is None]


def round_ms(fn, calls):
    """The fastest of `calls` calls of fn, in milliseconds."""
    best = math.inf
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best * 1e3


def scaling(case, threads, rounds):
    """{thread count: [round minima, ms]} for 1 and `threads` threads, alternating."""
    inputs = case.setup()

    def fn():
        return case.run(inputs)

    counts = (1, threads)
    times = {count: [] for count in counts}
    torch.set_num_threads(1)
    fn()  # warm-up, and the call that sizes the rounds (at 1 thread: the slower count)
    calls = max(1, min(MAX_CALLS, math.ceil(ROUND_SECONDS * 1e3 / round_ms(fn, 1))))
    for r in range(rounds):
        for count in counts if r % 2 == 0 else counts[::-1]:
            torch.set_num_threads(count)
            fn()
            times[count].append(round_ms(fn, calls))
    return times


def table_row(name, times, threads):
    one, many = times[1], times[threads]
    cells = [name]
    for values in (one, many):
        cells.append(f"{min(values):.3g} / {statistics.median(values):.3g}")
    cells.append(f"{min(one) / min(many):.2f}× / {statistics.median(one) / statistics.median(many):.2f}×")
    return "| " + " | ".join(cells) + " |"


def main(argv=None):
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("-k", dest="words", default="")
    args = parser.parse_args(argv)
    if args.threads < 2 or args.rounds < 1:
        parser.error("--threads must be at least 2 and --rounds at least 1")
    saved = torch.get_num_threads()
    print(f"CPU thread scaling on {measure.device_name('cpu')}, torch {torch.__version__}: 1 and {args.threads} "
          f"threads alternated, {args.rounds} rounds each (min / median of the rounds' minima, ms).\n")
    print(f"| case | 1 thread | {args.threads} threads | scaling (min / median) |")
    print("|---|---|---|---|")
    try:
        for case in selected_cases(args.quick, args.words.split()):
            print(table_row(case.id, scaling(case, args.threads, args.rounds), args.threads), flush=True)
    finally:
        torch.set_num_threads(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
