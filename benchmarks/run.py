"""`make bench`: runs the benchmark suites on every device present, then writes and prints
their report (benchmarks/report.py). Arguments are passed on to pytest, e.g. `-k attention`.

    python -m benchmarks.run [PYTEST ARGS...]
"""
import json
import pathlib
import subprocess
import sys
import tempfile

from . import report

SUITES = pathlib.Path(__file__).parent


def main(argv=None):
    pytest_args = sys.argv[1:] if argv is None else argv
    with tempfile.TemporaryDirectory() as scratch:
        run_json = pathlib.Path(scratch) / "run.json"
        # A separate process, so that the suites' memory and CUDA state end before the report.
        pytest = subprocess.run([
            sys.executable, "-m", "pytest", str(SUITES), "-p", "no:cacheprovider", "-q",
            f"--benchmark-json={run_json}", "--benchmark-columns=min,median,max,rounds", *pytest_args])
        if not run_json.exists() or not run_json.stat().st_size:  # pytest-benchmark saves nothing if nothing ran
            return pytest.returncode or 1
        for path in report.write(json.loads(run_json.read_text())):
            print(f"wrote {path}")
    return pytest.returncode


if __name__ == "__main__":
    sys.exit(main())
