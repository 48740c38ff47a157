"""One training step of the MANA example network (MANA.small) with its attention on each
backend: time and peak memory."""
from dataclasses import dataclass

import torch.nn.functional as F

from ..training_step import TrainingStep, model_class, step_cases, step_workload

NAME = "mana"

# MANA.small training clips (B, H, W); its num_frames decides T.
SHAPES = {"cpu": (1, 32, 32), "cuda": (4, 128, 128)}
QUICK_SHAPES = {"cpu": (1, 16, 16), "cuda": (1, 32, 32)}


@dataclass(frozen=True)
class ManaStep(TrainingStep):
    """forward, L1(sr, target) + memory loss, backward."""

    B: int
    H: int
    W: int

    workload = NAME
    op = "local_argmax_attention"  # the op whose backend the network's attention layers run
    model_name = "MANA"

    def inputs(self, model, generator):
        frames = self.rand(generator, self.B, model.num_frames, 3, self.H, self.W)
        return frames, self.rand(generator, self.B, 3, 4 * self.H, 4 * self.W)

    def loss(self, model, frames, target):
        sr, memory_loss = model(frames)
        return F.l1_loss(sr, target) + memory_loss


def shape_line(record):
    shape = record["shape"]
    return (f"`MANA.small(backend=...)`, frames B={shape['B']}, T={model_class('MANA').small().num_frames}, "
            f"3×{shape['H']}×{shape['W']}, float32: forward, L1(sr, target) + memory loss, backward.")


WORKLOAD = step_workload(NAME, step_cases(ManaStep, SHAPES, QUICK_SHAPES), shape_line)
