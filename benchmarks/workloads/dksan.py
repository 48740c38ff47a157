"""One training step of the DKSAN-style example network (DKSAN.small) with its deformable-kernel
and deformable convolutions on each backend: time and peak memory."""
from dataclasses import dataclass

import torch.nn.functional as F

from ..training_step import TrainingStep, model_class, step_cases, step_workload

NAME = "dksan"

# DKSAN.small training clips (B, H, W, scale) -> (B, 3, scale*H, scale*W); its num_frames decides T.
SHAPES = {"cpu": (1, 32, 32, 4), "cuda": (4, 64, 64, 4)}
QUICK_SHAPES = {"cpu": (1, 16, 16, 4), "cuda": (1, 32, 32, 4)}


@dataclass(frozen=True)
class DKSANStep(TrainingStep):
    """forward, L1(sr, target), backward."""

    B: int
    H: int
    W: int
    scale: int

    workload = NAME
    op = "deform_kernel_conv2d"  # DKC_Align's and DKSA's deformable-kernel convolutions
    other_ops = ("deform_conv2d",)  # DKC_Align's deformable convolution
    model_name = "DKSAN"

    def model_config(self):
        return {"scale": self.scale}

    def inputs(self, model, generator):
        frames = self.rand(generator, self.B, model.num_frames, 3, self.H, self.W)
        return frames, self.rand(generator, self.B, 3, self.scale * self.H, self.scale * self.W)

    def loss(self, model, frames, target):
        return F.l1_loss(model(frames), target)


def shape_line(record):
    shape = record["shape"]
    return (f"`DKSAN.small(backend=..., scale={shape['scale']})`, frames B={shape['B']}, "
            f"T={model_class('DKSAN').small().num_frames}, 3×{shape['H']}×{shape['W']} -> ×{shape['scale']}, "
            "float32: forward, L1(sr, target), backward.")


WORKLOAD = step_workload(NAME, step_cases(DKSANStep, SHAPES, QUICK_SHAPES), shape_line)
