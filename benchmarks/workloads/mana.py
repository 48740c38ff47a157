"""One training step of the MANA example network (MANA.small) with its attention on each
backend: time and peak memory."""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .. import report
from . import SEED, Case, Workload

NAME = "mana"

# MANA.small training clips (B, H, W); its num_frames decides T.
SHAPES = {"cpu": (1, 32, 32), "cuda": (4, 128, 128)}
QUICK_SHAPES = {"cpu": (1, 16, 16), "cuda": (1, 32, 32)}
BACKENDS = {"cpu": ("reference", "cpu"), "cuda": ("reference", "cuda", "triton")}


def _mana():
    """The network class: the one place that says where the example networks live."""
    from vsr_kernels.models import MANA

    return MANA


@dataclass(frozen=True)
class ManaStep(Case):
    """forward, L1(sr, target) + memory loss, backward."""

    B: int
    H: int
    W: int

    workload = NAME
    op = "local_argmax_attention"  # the op whose backend the network's attention layers run

    def setup(self):
        torch.manual_seed(SEED)
        model = _mana().small(backend=self.backend).to(self.device)
        generator = torch.Generator(self.device).manual_seed(SEED)
        frames = torch.rand(self.B, model.num_frames, 3, self.H, self.W, device=self.device, generator=generator)
        target = torch.rand(self.B, 3, 4 * self.H, 4 * self.W, device=self.device, generator=generator)
        return model, frames, target

    def run(self, state):
        model, frames, target = state
        sr, memory_loss = model(frames)
        loss = F.l1_loss(sr, target) + memory_loss
        loss.backward()
        # An optimiser would consume the gradients here; dropping them keeps every step alike.
        model.zero_grad(set_to_none=True)
        return loss


def cases(device, quick):
    B, H, W = (QUICK_SHAPES if quick else SHAPES)[device]
    return [ManaStep(device, "float32", backend, "step", B, H, W) for backend in BACKENDS[device]]


def shape_line(record):
    shape = record["shape"]
    return (f"`MANA.small(backend=...)`, frames B={shape['B']}, T={_mana().small().num_frames}, "
            f"3×{shape['H']}×{shape['W']}, float32: forward, L1(sr, target) + memory loss, backward.")


WORKLOAD = Workload(
    name=NAME,
    cases=cases,
    baselines=("reference",),
    passes=("step",),
    shape_line=shape_line,
    columns=(report.field_column("backend"), report.ms_column("step"), report.peak_column("step"),
             report.speedup_column("step", "reference"), report.memory_column("step", "reference")),
)
