"""`python -m benchmarks.paired`: the suite's speed-up ratios measured call by call, for hosts too
noisy for its medians.

    python -m benchmarks.paired [--quick] [--threads N] [--pairs P] [--seconds S] [--against NAMES] [-k WORDS]

For each selected case (the CPU cases of the ops' own backends, as in benchmarks.scaling) and
each of its comparisons (every baseline of its workload at the same dtype, pass and shape, and,
for a "fwd+bwd" case, its own "fwd" case), one process alternates one call of each side, the
order flipped every pair, until P pairs (default 40) or S seconds (default 20) have been timed,
after one warm-up call of each. Printed: a Markdown table with each side's median time and the
quartiles (q25 / median / q75) of the per-pair ratio: baseline time ÷ case time against a
baseline (the suite's "×" columns), and (fwd+bwd − fwd) ÷ fwd against "fwd" (the backward's
share of the forward's time). The two calls of a pair run milliseconds apart, so a shared
machine's drift cancels in each ratio; the suite's medians of the two sides, taken minutes apart,
keep it (on one such host the careful baseline's fwd+bwd median came out below its fwd median).

Options: --quick the workloads' smaller shapes (BENCH_QUICK's); --threads N torch's CPU threads
(default: torch's own choice); --against NAMES only these comparisons (comma-separated baseline
names and/or "fwd"); -k WORDS only the cases whose id contains every word (case ids as in
`benchmarks.run`).
"""
import argparse
import dataclasses
import statistics
import sys
import time

import torch

from . import measure, workloads

FWD = "fwd"  # the comparison of a fwd+bwd case with its own forward


def comparisons(quick, words, against=None):
    """[(case, other)]: the selected CPU cases of the ops' own backends, each with its workload's
    baseline cases of the same shape, dtype and pass, then (for "fwd+bwd") its own "fwd" case;
    `against`: the baseline names (and FWD) to keep, None for all."""
    pairs = []
    for workload in workloads.registered().values():
        cases = [case for case in workload.cases("cpu", quick) if case.unavailable() is None]
        for case in cases:
            if not workload.selects(case, words):
                continue
            others = [other for other in cases if other.backend in workload.baselines
                      and dataclasses.replace(other, backend=case.backend) == case]
            if case.pass_name == "fwd+bwd":
                others += [other for other in cases if other == dataclasses.replace(case, pass_name="fwd")]
            pairs += [(case, other) for other in others
                      if against is None or label(case, other) in against]
    return pairs


def label(case, other):
    return FWD if other.backend == case.backend else other.backend


def timed_pairs(case, other, pairs, seconds):
    """[(case seconds, other seconds)] of alternating single calls, each side warmed up once."""
    inputs = case.setup(), other.setup()
    calls = (lambda: case.run(inputs[0]), lambda: other.run(inputs[1]))
    for call in calls:
        call()
    times = []
    deadline = time.perf_counter() + seconds
    while len(times) < pairs and (len(times) < 3 or time.perf_counter() < deadline):
        pair = [0.0, 0.0]
        for side in ((0, 1) if len(times) % 2 == 0 else (1, 0)):
            start = time.perf_counter()
            calls[side]()
            pair[side] = time.perf_counter() - start
        times.append(tuple(pair))
    return times


def ratios(case, other, times):
    """Per pair: the other side's time ÷ the case's (a baseline), or (fwd+bwd − fwd) ÷ fwd."""
    if label(case, other) == FWD:
        return [(mine - forward) / forward for mine, forward in times]
    return [theirs / mine for mine, theirs in times]


def quartiles(values):
    """(q25, median, q75) of a non-empty list, by the nearest rank."""
    ordered = sorted(values)
    return tuple(ordered[min(len(ordered) - 1, int(q * len(ordered)))] for q in (0.25, 0.5, 0.75))


def table_row(case, other, times):
    q25, median, q75 = quartiles(ratios(case, other, times))
    mine, theirs = (statistics.median(side) * 1e3 for side in zip(*times))
    what = "(fwd+bwd − fwd) ÷ fwd" if label(case, other) == FWD else f"× {other.backend}"
    return (f"| {case.id} | {what} | {len(times)} | {mine:.3g} | {theirs:.3g} | "
            f"{q25:.3g} / {median:.3g} / {q75:.3g} |")


def main(argv=None):
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--pairs", type=int, default=40)
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--against", default=None)
    parser.add_argument("-k", dest="words", default="")
    args = parser.parse_args(argv)
    if args.threads < 1 or args.pairs < 3 or args.seconds < 0:
        parser.error("--threads must be at least 1, --pairs at least 3 and --seconds not negative")
    against = None if args.against is None else set(args.against.split(","))
    known = {FWD} | {name for workload in workloads.registered().values() for name in workload.baselines}
    if against is not None and not against <= known:
        parser.error(f"--against: unknown {', '.join(sorted(against - known))} (known: {', '.join(sorted(known))})")
    saved = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    print(f"Paired timing on {measure.device_name('cpu')}, torch {torch.__version__}, {args.threads} threads: "
          f"one call of each side alternated, up to {args.pairs} pairs or {args.seconds:g} s per comparison; "
          "ratio quartiles over the pairs.\n")
    print("| case | against | pairs | case ms (median) | other ms (median) | ratio q25 / median / q75 |")
    print("|---|---|---|---|---|---|")
    try:
        for case, other in comparisons(args.quick, args.words.split(), against):
            print(table_row(case, other, timed_pairs(case, other, args.pairs, args.seconds)), flush=True)
    finally:
        torch.set_num_threads(saved)
    return 0


if __name__ == "__main__":
    sys.exit(main())
