"""One training step of the Zooming Slow-Mo / MEGAN-style space-time network
(ZoomingSlowMo.small) with its deformable convolutions on each backend: time and peak memory."""
from dataclasses import dataclass

import torch.nn.functional as F

from ..training_step import TrainingStep, step_cases, step_workload

NAME = "zooming_slowmo"

# ZoomingSlowMo.small training clips (B, T, H, W) -> (B, 2T-1, 3, 4H, 4W).
SHAPES = {"cpu": (1, 3, 32, 32), "cuda": (4, 5, 64, 64)}
QUICK_SHAPES = {"cpu": (1, 2, 16, 16), "cuda": (1, 3, 32, 32)}


@dataclass(frozen=True)
class ZoomingSlowMoStep(TrainingStep):
    """forward, L1(sr, target), backward."""

    B: int
    T: int
    H: int
    W: int

    workload = NAME
    op = "deform_conv2d"  # the op whose backend the network's deformable layers run
    model_name = "ZoomingSlowMo"

    def inputs(self, model, generator):
        frames = self.rand(generator, self.B, self.T, 3, self.H, self.W)
        return frames, self.rand(generator, self.B, 2 * self.T - 1, 3, 4 * self.H, 4 * self.W)

    def loss(self, model, frames, target):
        return F.l1_loss(model(frames), target)


def shape_line(record):
    shape = record["shape"]
    return (f"`ZoomingSlowMo.small(backend=...)`, frames B={shape['B']}, T={shape['T']}, "
            f"3×{shape['H']}×{shape['W']} -> {2 * shape['T'] - 1} frames ×4, float32: forward, "
            f"L1(sr, target), backward.")


WORKLOAD = step_workload(NAME, step_cases(ZoomingSlowMoStep, SHAPES, QUICK_SHAPES), shape_line)
