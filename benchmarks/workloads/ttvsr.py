"""One training step of the TTVSR-style example network (TTVSR.small) with its trajectory
attention on each backend: time and peak memory."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..training_step import TrainingStep, step_cases, step_workload

NAME = "ttvsr"

SHAPES = {"cpu": (1, 4, 32, 32), "cuda": (4, 10, 128, 128)}  # B, T, H, W
QUICK_SHAPES = {"cpu": (1, 3, 16, 16), "cuda": (1, 6, 64, 64)}


@dataclass(frozen=True)
class TTVSRStep(TrainingStep):
    """forward with given flows (a smooth random motion of about a pixel), L1(sr, target), backward."""

    B: int
    T: int
    H: int
    W: int

    workload = NAME
    op = "trajectory_attention"
    model_name = "TTVSR"

    def inputs(self, model, generator):
        frames = self.rand(generator, self.B, self.T, 3, self.H, self.W)
        target = self.rand(generator, self.B, self.T, 3, 4 * self.H, 4 * self.W)
        coarse = torch.randn(self.B * (self.T - 1), 2, self.H // 8, self.W // 8, device=self.device,
                             generator=generator)
        motion = F.interpolate(coarse, size=(self.H, self.W), mode="bilinear", align_corners=False)
        motion = motion.view(self.B, self.T - 1, 2, self.H, self.W)
        return frames, (motion, -motion), target

    def loss(self, model, frames, flows, target):
        return F.l1_loss(model(frames, flows), target)


def shape_line(record):
    shape = record["shape"]
    return (f"`TTVSR.small(backend=...)`, frames B={shape['B']}, T={shape['T']}, "
            f"3×{shape['H']}×{shape['W']}, "
            "float32, given flows: forward, L1(sr, target), backward.")


WORKLOAD = step_workload(NAME, step_cases(TTVSRStep, SHAPES, QUICK_SHAPES), shape_line)
