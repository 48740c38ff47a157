"""The deformable blocks of one-stage space-time video super-resolution (Xiang et al., "Zooming
Slow-Mo: Fast and Accurate One-Stage Space-Time Video Super-Resolution", CVPR 2020; MEGAN builds
on the same blocks).

- `FeatureTemporalInterpolation`: the features of a missing intermediate frame from its two
  neighbours: each neighbour is aligned towards the other by PCD deformable alignment, and
  the two aligned features are blended by learned per-pixel weights.
- `DeformableConvLSTM`: a ConvLSTM whose hidden and cell states are aligned to the current
  input by modulated deformable convolution before the cell update (the state of the
  previous frame is in the previous frame's coordinates).
- `BidirectionalDeformableConvLSTM`: a forward and a backward pass of it over a sequence,
  fused per frame by a 1x1 convolution.
"""
import torch
from torch import nn

from ..ops import _backend, _checks
from .deformable import DCNv2Pack
from .edvr import PCDAlignment


def _conv(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class FeatureTemporalInterpolation(nn.Module):
    """Features of the frame between two frames (Zooming Slow-Mo's deformable feature
    temporal interpolation).

    a1 = PCD(first -> second), a2 = PCD(second -> first) (each neighbour aligned towards the
    other: for a frame halfway, both meet in the middle once trained); then
    w = softmax over the two of conv(cat(a1, a2)) per pixel, out = w1 * a1 + w2 * a2.

    Args: num_feat (C), deformable_groups, backend (of `deform_conv2d`).
    Shapes: forward(first, second): each a list of 3 pyramid levels (see `PCDAlignment`)
        -> (B, C, H, W).
    """

    def __init__(self, num_feat: int = 64, deformable_groups: int = 8, backend: str = "auto"):
        super().__init__()
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        self.align_first = PCDAlignment(num_feat, deformable_groups, backend=backend)
        self.align_second = PCDAlignment(num_feat, deformable_groups, backend=backend)
        self.blend = nn.Sequential(_conv(2 * num_feat, num_feat), nn.LeakyReLU(0.1), _conv(num_feat, 2))

    def forward(self, first: list, second: list) -> torch.Tensor:
        a1 = self.align_first(first, second)
        a2 = self.align_second(second, first)
        weights = torch.softmax(self.blend(torch.cat([a1, a2], 1)), dim=1)
        return weights[:, :1] * a1 + weights[:, 1:] * a2


class DeformableConvLSTM(nn.Module):
    """ConvLSTM with deformable alignment of its state (Zooming Slow-Mo's DConvLSTM).

    Per step, with input x_t and state (h, c) of the previous step:
        o = offset features from cat(x_t, h) (two 3x3 convs with LeakyReLU),
        h' = DCNv2Pack_h(h, o), c' = DCNv2Pack_c(c, o)   (state aligned to x_t),
        i, f, g, u = split(conv(cat(x_t, h'))),
        c_t = sigmoid(f) * c' + sigmoid(i) * tanh(g),  h_t = sigmoid(u) * tanh(c_t).
    The state starts at zero.

    Args: input_channels, hidden_channels, deformable_groups (divides hidden_channels),
        kernel_size (odd, of the gate convolution), backend.
    Shapes:
        forward(inputs (B, T, input_channels, H, W), state=None or (h, c) each
        (B, hidden_channels, H, W)) -> (outputs (B, T, hidden_channels, H, W), (h_T, c_T)).
        step(x (B, input_channels, H, W), state) -> (h, c).
    """

    def __init__(self, input_channels: int, hidden_channels: int, deformable_groups: int = 8,
                 kernel_size: int = 3, backend: str = "auto"):
        super().__init__()
        self.input_channels = _checks.integer("input_channels", input_channels, 1)
        self.hidden_channels = _checks.integer("hidden_channels", hidden_channels, 1)
        kernel_size = _checks.integer("kernel_size", kernel_size, 1, odd=True)
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        self.offset_feat = nn.Sequential(_conv(input_channels + hidden_channels, hidden_channels),
                                         nn.LeakyReLU(0.1), _conv(hidden_channels, hidden_channels),
                                         nn.LeakyReLU(0.1))
        self.align_h = DCNv2Pack(hidden_channels, hidden_channels, 3, padding=1,
                                 deformable_groups=deformable_groups, backend=backend)
        self.align_c = DCNv2Pack(hidden_channels, hidden_channels, 3, padding=1,
                                 deformable_groups=deformable_groups, backend=backend)
        self.gates = nn.Conv2d(input_channels + hidden_channels, 4 * hidden_channels, kernel_size,
                               padding=kernel_size // 2)

    def step(self, x: torch.Tensor, state: tuple | None) -> tuple[torch.Tensor, torch.Tensor]:
        if state is None:
            zeros = x.new_zeros(x.shape[0], self.hidden_channels, *x.shape[2:])
            h, c = zeros, zeros
        else:
            h, c = state
            o = self.offset_feat(torch.cat([x, h], 1))
            h, c = self.align_h(h, o), self.align_c(c, o)
        i, f, g, u = torch.chunk(self.gates(torch.cat([x, h], 1)), 4, dim=1)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        h = torch.sigmoid(u) * torch.tanh(c)
        return h, c

    def forward(self, inputs: torch.Tensor, state: tuple | None = None):
        _checks.tensor("inputs", inputs, "BTCHW")
        if inputs.shape[2] != self.input_channels:
            raise ValueError(f"inputs must have C = input_channels = {self.input_channels} in dim 2, "
                             f"got shape {tuple(inputs.shape)}")
        outputs = []
        for t in range(inputs.shape[1]):
            state = self.step(inputs[:, t], state)
            outputs.append(state[0])
        if not outputs:
            raise ValueError(f"inputs must hold at least one frame, got shape {tuple(inputs.shape)}")
        return torch.stack(outputs, 1), state


class BidirectionalDeformableConvLSTM(nn.Module):
    """Two DeformableConvLSTMs, one over the sequence forward and one backward; each frame's
    two hidden states are fused by a 1x1 convolution (Zooming Slow-Mo's BiDConvLSTM).

    Shapes: forward((B, T, input_channels, H, W)) -> (B, T, hidden_channels, H, W).
    """

    def __init__(self, input_channels: int, hidden_channels: int, deformable_groups: int = 8,
                 kernel_size: int = 3, backend: str = "auto"):
        super().__init__()
        args = (input_channels, hidden_channels, deformable_groups, kernel_size)
        self.forward_lstm = DeformableConvLSTM(*args, backend=backend)
        self.backward_lstm = DeformableConvLSTM(*args, backend=backend)
        self.fusion = nn.Conv2d(2 * hidden_channels, hidden_channels, 1)

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        forward_out, _ = self.forward_lstm(inputs)
        backward_out, _ = self.backward_lstm(inputs.flip(1))
        both = torch.cat([forward_out, backward_out.flip(1)], 2)
        return self.fusion(both.flatten(0, 1)).unflatten(0, inputs.shape[:2])

