# The two commands of the README. Each installs what is missing, builds the package in
# place, then runs. Where torch is already importable (a CUDA machine) it is used as is.
PYTHON ?= python3
PIP = $(PYTHON) -m pip
# Packages the tests and benchmarks need besides torch, installed only when missing.
DEPS = triton numpy pytest pytest-xdist pytest-benchmark ninja pybind11 matplotlib build
# Test processes (pytest-xdist): most tests run one Python thread (Triton's interpreter,
# gradcheck, small shapes), so one process per CPU nearly halves the suite's time on two cores.
TEST_WORKERS ?= $(shell $(PYTHON) -c "import os; print(os.cpu_count() or 1)")

.PHONY: setup build test bench clean

setup:
	@$(PYTHON) -c "import torch" 2>/dev/null || $(PIP) install torch==2.13.0
	@missing=$$($(PYTHON) tools/missing_packages.py $(DEPS)); \
	 if [ -n "$$missing" ]; then $(PIP) install $$missing; fi

build: setup
	$(PIP) install --no-build-isolation --no-deps -e .

# The packaging test (sdist -> wheel -> fresh venv) is run by .ci/run, not here. pytest-benchmark
# is for `make bench` (it switches itself off under xdist, with a warning).
test: build
	$(PYTHON) -m pytest -q -n $(TEST_WORKERS) -p no:benchmark -m "not packaging" tests

bench: build
	$(PYTHON) -m benchmarks.run

clean:
	rm -rf build dist *.egg-info vsr_kernels/*.so vsr_kernels/_build_info.py .pytest_cache .benchmarks
