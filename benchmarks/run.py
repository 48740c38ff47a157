"""`make bench`: runs the benchmark suite (benchmarks/test_workloads.py: the hardware probes,
then every case of every workload in benchmarks/workloads/) on every device present, printing
one line per case as it finishes, then writes and prints the report (benchmarks/report.py)
to benchmarks/results/<device>.{md,json,png}.

    python -m benchmarks.run [--quick] [--threads N] [--out-dir DIR] [PYTEST ARGS...]

Options (each also an environment variable):
    --quick, BENCH_QUICK=1   each workload's smaller shapes and smaller probes: a smoke run of
                             the whole suite in about a minute on CPU. Its report goes to a
                             temporary directory (printed) unless --out-dir/BENCH_OUT is given,
                             so that smoke numbers never replace the committed results.
    --threads N, BENCH_THREADS=N   torch's CPU threads (default: torch's own choice).
    --out-dir DIR, BENCH_OUT=DIR   where the report goes (default benchmarks/results/).
Other arguments go to pytest, e.g. `-k "local_argmax_attention and cpu"` (case ids are
<workload>-<device>-<dtype>-<backend>-<pass>).

Nothing is written into the checkout but the report: pytest runs without its cache
(-p no:cacheprovider), and pytest-benchmark's JSON and storage folder go to a temporary
directory.
"""
import argparse
import json
import os
import pathlib
import subprocess
import sys
import tempfile

from . import report

SUITE = pathlib.Path(__file__).parent / "test_workloads.py"


def main(argv=None):
    parser = argparse.ArgumentParser(usage=__doc__)
    parser.add_argument("--quick", action="store_true",
                        default=os.environ.get("BENCH_QUICK", "0") not in ("", "0"))
    parser.add_argument("--threads", type=int, default=os.environ.get("BENCH_THREADS") or None)
    parser.add_argument("--out-dir", type=pathlib.Path, default=os.environ.get("BENCH_OUT") or None)
    args, pytest_args = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ, BENCH_QUICK="1" if args.quick else "0")
    if args.threads:
        env["BENCH_THREADS"] = str(args.threads)
    with tempfile.TemporaryDirectory(prefix="vsr-bench-") as scratch:
        run_json = pathlib.Path(scratch) / "run.json"
        # A separate process, so that the suite's memory and CUDA state end before the report.
        pytest = subprocess.run([
            sys.executable, "-m", "pytest", str(SUITE), "-p", "no:cacheprovider", "-q", "-rfE",
            "--benchmark-quiet", f"--benchmark-json={run_json}",
            # pytest-benchmark creates its storage folder (.benchmarks/ in the working directory) even unused.
            f"--benchmark-storage=file://{scratch}/storage", *pytest_args], env=env)
        if not run_json.exists() or not run_json.stat().st_size:  # pytest-benchmark saves nothing if nothing ran
            return pytest.returncode or 1
        run = json.loads(run_json.read_text())
        out_dir = args.out_dir
        if out_dir is None:
            out_dir = report.RESULTS if not args.quick else pathlib.Path(tempfile.mkdtemp(prefix="vsr-bench-"))
        for path in report.write(run, out_dir):
            print(f"wrote {path}")
    return pytest.returncode


if __name__ == "__main__":
    sys.exit(main())
