"""One training step of the TTVSR-style example network (TTVSR.small) with its trajectory
attention on each backend: time and peak memory."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import report
from . import SEED, Case, Workload

NAME = "ttvsr"

SHAPES = {"cpu": (1, 4, 32, 32), "cuda": (4, 10, 128, 128)}  # B, T, H, W
QUICK_SHAPES = {"cpu": (1, 3, 16, 16), "cuda": (1, 6, 64, 64)}
BACKENDS = {"cpu": ("reference", "cpu"), "cuda": ("reference", "cuda", "triton")}


def _ttvsr():
    from vsr_kernels.models import TTVSR

    return TTVSR


@dataclass(frozen=True)
class TTVSRStep(Case):
    """forward with given flows (a smooth random motion of about a pixel), L1(sr, target), backward."""

    B: int
    T: int
    H: int
    W: int

    workload = NAME
    op = "trajectory_attention"

    def setup(self):
        torch.manual_seed(SEED)
        model = _ttvsr().small(backend=self.backend).to(self.device)
        generator = torch.Generator(self.device).manual_seed(SEED)
        frames = torch.rand(self.B, self.T, 3, self.H, self.W, device=self.device, generator=generator)
        target = torch.rand(self.B, self.T, 3, 4 * self.H, 4 * self.W, device=self.device,
                            generator=generator)
        coarse = torch.randn(self.B * (self.T - 1), 2, self.H // 8, self.W // 8, device=self.device,
                             generator=generator)
        motion = F.interpolate(coarse, size=(self.H, self.W), mode="bilinear", align_corners=False)
        motion = motion.view(self.B, self.T - 1, 2, self.H, self.W)
        return model, frames, (motion, -motion), target

    def run(self, state):
        model, frames, flows, target = state
        loss = F.l1_loss(model(frames, flows), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss


def cases(device, quick):
    B, T, H, W = (QUICK_SHAPES if quick else SHAPES)[device]
    return [TTVSRStep(device, "float32", backend, "step", B, T, H, W) for backend in BACKENDS[device]]


def shape_line(record):
    shape = record["shape"]
    return (f"`TTVSR.small(backend=...)`, frames B={shape['B']}, T={shape['T']}, "
            f"3×{shape['H']}×{shape['W']}, "
            "float32, given flows: forward, L1(sr, target), backward.")


WORKLOAD = Workload(
    name=NAME,
    cases=cases,
    baselines=("reference",),
    passes=("step",),
    shape_line=shape_line,
    columns=(report.field_column("backend"), report.ms_column("step"), report.peak_column("step"),
             report.speedup_column("step", "reference"), report.memory_column("step", "reference")),
)
