"""Benchmarks of vsr_kernels: one pytest-benchmark suite over the workloads in benchmarks/workloads/,
the report writer and `python -m benchmarks.run` (see its docstring).

Measurements, not tests: `pytest tests` never collects them.
"""
