"""The registry of workloads: one module per op (or example network) in this package.

Every module here whose name does not start with "_" is a workload module and defines
`WORKLOAD = Workload(...)`: the cases it measures on a device, the baselines its speed-ups
are against, and its section of the report (shape line and table columns). The suite
(benchmarks/test_workloads.py), the runner and the report find them by scanning this
package, so adding an op's benchmarks means adding `workloads/<op>.py` and nothing else.

A case is a picklable description (a frozen dataclass deriving from `Case`) that builds its
own inputs (`setup`) and runs the measured call on them (`run`). Picklable, so that a fresh
subprocess can rebuild exactly the same inputs to measure CPU peak memory (see
measure.cpu_peak_bytes). Inputs are drawn from a fixed seed on the case's device, so every
backend of one (device, dtype, shape) sees the same values.

Adding an op's benchmarks (nothing else changes):
1. benchmarks/workloads/<op>.py with a frozen dataclass `class MyCase(Case)` holding the shape
   fields, `workload = "<op>"`, `op = "<op>"` (so `unavailable()` asks
   vsr_kernels.ops._backend), `bound = "compute"` or `"memory"`, and setup(), run(inputs),
   flops(), bytes_moved() and, optionally, errors(inputs) (accuracy against the oracle);
2. `cases(device, quick)`: the cases per device type (backends, baselines, dtypes, passes,
   the full and the BENCH_QUICK shapes);
3. `WORKLOAD = Workload(name="<op>", cases=cases, baselines=(...), passes=(...),
   shape_line=..., columns=(...), notes=(...))`, the columns built with report's helpers
   (field_column, ms_column, speedup_column, rate_column, peak_column, memory_column) or
   left None for report.default_columns.
"""
import dataclasses
import importlib
import os
import pkgutil
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

SEED = 0

# BENCH_QUICK=1: each workload's smaller shapes, for smoke runs of the whole suite.
QUICK = os.environ.get("BENCH_QUICK", "0") not in ("", "0")


def devices():
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


@dataclass(frozen=True)
class Case:
    """One measured call: `run(setup())` on `device`, in `dtype`, with `backend`.

    Subclasses add their shape fields and implement setup and run. The class attributes and
    methods below have defaults that a workload overrides where they apply.
    """

    device: str
    dtype: str
    backend: str
    pass_name: str  # "fwd", "fwd+bwd", "step", ...: a column group of the workload's table

    workload: ClassVar[str]  # the registry name of the workload module
    op: ClassVar[str | None] = None  # the vsr_kernels op whose `backend` this case runs, if any
    # "compute" or "memory": which hardware probe (torch.mm's float32 rate or a large copy's
    # bandwidth) the report divides this case's flops() or bytes_moved() rate by.
    bound: ClassVar[str | None] = None
    measure_peak: ClassVar[bool] = True

    @property
    def backward(self) -> bool:
        """Whether the pass runs the backward too (pass "fwd+bwd")."""
        return self.pass_name == "fwd+bwd"

    @property
    def id(self):
        return "-".join((self.workload, self.device, self.dtype, self.backend, self.pass_name))

    @property
    def group(self):
        return f"{self.workload} {self.device} {self.dtype} {self.pass_name}"

    def unavailable(self):
        """Why this case cannot run here, or None. Backends that are not the op's own
        (baselines written in plain PyTorch) always run."""
        from vsr_kernels.ops import _backend

        if self.op is None or self.backend not in _backend.BACKENDS:
            return None
        return _backend.unavailable(self.op, self.backend, torch.device(self.device))

    def setup(self) -> Any:
        raise NotImplementedError

    def run(self, inputs) -> Any:
        raise NotImplementedError

    def flops(self) -> int | None:
        """Arithmetic the call must do, for the fraction of the hardware's rate; None if not counted."""
        return None

    def bytes_moved(self) -> int | None:
        """Bytes the call must move at least, for the roofline; None if not counted."""
        return None

    def shape(self) -> dict:
        """The shape fields: every dataclass field but the generic ones."""
        generic = {field.name for field in dataclasses.fields(Case)}
        return {field.name: getattr(self, field.name) for field in dataclasses.fields(self)
                if field.name not in generic}

    def errors(self, inputs) -> dict | None:
        """Accuracy of this case against its oracle on `inputs` (it may run the case again), or None."""
        return None

    def describe(self):
        """The fields of the case, for the benchmark record."""
        return dataclasses.asdict(self) | {"workload": self.workload, "op": self.op, "bound": self.bound,
                                           "flops": self.flops(), "bytes": self.bytes_moved(),
                                           "shape": self.shape()}


def max_errors(names, results, oracle) -> dict:
    """{name: the largest absolute difference of each result from its oracle}, in float32."""
    return {name: float((got.detach().float() - want).abs().max()) for name, got, want in
            zip(names, results, oracle)}


def argmax_errors(names, results, oracle) -> dict:
    """Errors of an argmax op's results against its oracle's (computed on batch element 0): the
    max abs error of each floating result, and how many of the "index" result's positions differ."""
    errors = {}
    for name, got, want in zip(names, results, oracle):
        got = got[:1].detach()
        if name == "index":
            errors["index_mismatches"] = int((got != want).sum())
            errors["index_positions"] = want.numel()
        else:
            errors[name] = float((got.float() - want).abs().max())
    return errors


@dataclass(frozen=True)
class Column:
    """One column of a workload's table: its header and the cell of a report row (report.Row)."""

    header: str
    cell: Callable[[Any], str]


@dataclass(frozen=True)
class Workload:
    """What a workload module registers.

    name: the module's name, also the report section's heading.
    cases: cases(device, quick) -> the cases to measure on that device type.
    baselines: backends the speed-ups are against, in the order of the columns.
    passes: the pass_name values, in the order of the columns.
    shape_line: shape_line(record) -> a line describing a measured shape (record: a case's
        describe() plus the measurements).
    columns: the table's columns; None for report.default_columns(workload).
    notes: paragraphs printed under the table.
    """

    name: str
    cases: Callable[[str, bool], list[Case]]
    baselines: Sequence[str] = ("reference",)
    passes: Sequence[str] = ("fwd",)
    shape_line: Callable[[dict], str] = lambda record: ", ".join(
        f"{name}={size}" for name, size in record["shape"].items())
    columns: Sequence[Column] | None = None
    notes: Sequence[str] = ()

    def selects(self, case, words):
        """Whether `case` runs one of the op's own backends (not a baseline) and its id contains
        every word: the cases benchmarks.scaling and benchmarks.paired time."""
        return case.backend not in self.baselines and all(word in case.id for word in words)


def registered() -> dict[str, Workload]:
    """{name: Workload} of every workload module in this package, by module name."""
    found = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda info: info.name):
        if info.name.startswith("_"):
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        workload = module.WORKLOAD
        if workload.name != info.name:
            raise ValueError(f"{module.__name__}.WORKLOAD.name is {workload.name!r}, expected {info.name!r}")
        found[workload.name] = workload
    return found


def all_cases(quick=QUICK):
    return [case for workload in registered().values() for device in devices()
            for case in workload.cases(device, quick)]
