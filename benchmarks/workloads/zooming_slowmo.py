"""One training step of the Zooming Slow-Mo / MEGAN-style space-time network
(ZoomingSlowMo.small) with its deformable convolutions on each backend: time and peak memory."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import report
from . import SEED, Case, Workload

NAME = "zooming_slowmo"
OP = "deform_conv2d"

# ZoomingSlowMo.small training clips (B, T, H, W) -> (B, 2T-1, 3, 4H, 4W).
SHAPES = {"cpu": (1, 3, 32, 32), "cuda": (4, 5, 64, 64)}
QUICK_SHAPES = {"cpu": (1, 2, 16, 16), "cuda": (1, 3, 32, 32)}
BACKENDS = {"cpu": ("reference", "cpu"), "cuda": ("reference", "cuda", "triton")}


def _model():
    """The network class: the one place that says where the example networks live."""
    from vsr_kernels.models import ZoomingSlowMo

    return ZoomingSlowMo


@dataclass(frozen=True)
class ZoomingSlowMoStep(Case):
    """forward, L1(sr, target), backward."""

    B: int
    T: int
    H: int
    W: int

    workload = NAME
    op = OP  # the op whose backend the network's deformable layers run

    def setup(self):
        torch.manual_seed(SEED)
        model = _model().small(backend=self.backend).to(self.device)
        generator = torch.Generator(self.device).manual_seed(SEED)
        frames = torch.rand(self.B, self.T, 3, self.H, self.W, device=self.device, generator=generator)
        target = torch.rand(self.B, 2 * self.T - 1, 3, 4 * self.H, 4 * self.W, device=self.device,
                            generator=generator)
        return model, frames, target

    def run(self, state):
        model, frames, target = state
        loss = F.l1_loss(model(frames), target)
        loss.backward()
        # An optimiser would consume the gradients here; dropping them keeps every step alike.
        model.zero_grad(set_to_none=True)
        return loss


def cases(device, quick):
    B, T, H, W = (QUICK_SHAPES if quick else SHAPES)[device]
    return [ZoomingSlowMoStep(device, "float32", backend, "step", B, T, H, W) for backend in BACKENDS[device]]


def shape_line(record):
    shape = record["shape"]
    return (f"`ZoomingSlowMo.small(backend=...)`, frames B={shape['B']}, T={shape['T']}, "
            f"3×{shape['H']}×{shape['W']} -> {2 * shape['T'] - 1} frames ×4, float32: forward, "
            f"L1(sr, target), backward.")


WORKLOAD = Workload(
    name=NAME,
    cases=cases,
    baselines=("reference",),
    passes=("step",),
    shape_line=shape_line,
    columns=(report.field_column("backend"), report.ms_column("step"), report.peak_column("step"),
             report.speedup_column("step", "reference"), report.memory_column("step", "reference")),
)
