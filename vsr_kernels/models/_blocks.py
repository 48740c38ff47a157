"""Plain convolutional pieces the example networks share."""
import torch
import torch.nn.functional as F
from torch import nn


def conv3x3(in_channels: int, out_channels: int) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, 3, padding=1)


class ResidualBlock(nn.Module):
    """x + conv3x3(relu(conv3x3(x))), without normalisation (EDVR, BasicVSR and their descendants).

    Args:
        channels: C.
        small_init: initialise as the BasicVSR family does, Kaiming-normal weights scaled by 0.1
            and zero biases, so that a deep stack starts close to the identity; otherwise
            PyTorch's default initialisation.

    Shapes: (B, C, H, W) -> (B, C, H, W)
    """

    def __init__(self, channels: int, small_init: bool = False):
        super().__init__()
        self.conv1 = conv3x3(channels, channels)
        self.conv2 = conv3x3(channels, channels)
        if small_init:
            for conv in (self.conv1, self.conv2):
                nn.init.kaiming_normal_(conv.weight)
                with torch.no_grad():
                    conv.weight.mul_(0.1)
                nn.init.zeros_(conv.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.conv2(F.relu(self.conv1(x)))
