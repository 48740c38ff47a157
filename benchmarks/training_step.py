"""What every training-step workload (benchmarks/workloads/{mana,ttvsr,zooming_slowmo,dksan}.py)
shares: one training step of an example network's small configuration, with its fused layers on
each backend, timed with its peak memory against the same step on the reference.

A workload subclasses `TrainingStep` (a frozen dataclass: its shape fields, `workload`, `op`,
`model_name`, and `inputs` + `loss`), then registers
`step_workload(NAME, cases=step_cases(MyStep, SHAPES, QUICK_SHAPES), shape_line=...)`.
"""
import importlib
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from . import report
from .workloads import SEED, Case, Workload

# The backends each device's step runs on: the reference (the baseline) and the fused ones.
BACKENDS = {"cpu": ("reference", "cpu"), "cuda": ("reference", "cuda", "triton")}


def model_class(name: str):
    """vsr_kernels.models.<name>: the one place that says where the example networks live."""
    return getattr(importlib.import_module("vsr_kernels.models"), name)


@dataclass(frozen=True)
class TrainingStep(Case):
    """forward, loss, backward of `model_class(model_name).small(backend=..., **model_config())` on
    the device.

    setup: the model (parameters from the fixed seed) and `inputs(model, generator)`, drawn on
    the device from a generator seeded with the fixed seed (`self.rand(generator, *shape)`);
    run: `loss(model, *inputs)`,
    backward, then the gradients are dropped (an optimiser would consume them here; dropping them
    keeps every step alike).
    """

    model_name: ClassVar[str]
    # Other ops the network's layers run on the same backend (besides `op`): the case runs only
    # where the backend serves all of them.
    other_ops: ClassVar[tuple[str, ...]] = ()

    def unavailable(self):
        from vsr_kernels.ops import _backend

        reason = super().unavailable()
        if reason is None and self.backend in _backend.BACKENDS:
            for op in self.other_ops:
                reason = _backend.unavailable(op, self.backend, torch.device(self.device))
                if reason is not None:
                    return f"{op}: {reason}"
        return reason

    def model_config(self) -> dict:
        """Arguments of the network's small() besides the backend."""
        return {}

    def inputs(self, model, generator) -> tuple:
        raise NotImplementedError

    def rand(self, generator, *shape) -> torch.Tensor:
        """torch.rand on the case's device from `generator`."""
        return torch.rand(shape, device=self.device, generator=generator)

    def loss(self, model, *inputs) -> torch.Tensor:
        raise NotImplementedError

    def setup(self) -> Any:
        torch.manual_seed(SEED)
        model = model_class(self.model_name).small(backend=self.backend, **self.model_config())
        model = model.to(self.device)
        generator = torch.Generator(self.device).manual_seed(SEED)
        return model, self.inputs(model, generator)

    def run(self, state):
        model, inputs = state
        loss = self.loss(model, *inputs)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss


def step_cases(case_class, shapes, quick_shapes, backends=BACKENDS):
    """cases(device, quick) of a training-step workload: one float32 "step" per backend, at the
    device's shape (a tuple of the case's shape fields)."""
    def cases(device, quick):
        shape = (quick_shapes if quick else shapes)[device]
        return [case_class(device, "float32", backend, "step", *shape) for backend in backends[device]]

    return cases


def step_workload(name, cases, shape_line) -> Workload:
    """The Workload of a training step: its time and peak memory per backend, against the reference's."""
    return Workload(
        name=name,
        cases=cases,
        baselines=("reference",),
        passes=("step",),
        shape_line=shape_line,
        columns=(report.field_column("backend"), report.ms_column("step"), report.peak_column("step"),
                 report.speedup_column("step", "reference"), report.memory_column("step", "reference")),
    )
