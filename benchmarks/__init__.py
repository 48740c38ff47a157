"""Benchmarks of vsr_kernels: pytest-benchmark suites, the report writer and `python -m benchmarks.run`.

Measurements, not tests: `pytest tests` never collects them.
"""
