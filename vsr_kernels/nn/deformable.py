"""Deformable convolution layers over `vsr_kernels.deform_conv2d`.

- `DeformConv2d`: torchvision.ops.DeformConv2d's module API (DCNv1, or DCNv2 when a mask is
  passed to forward); same parameter names, shapes and initialisation.
- `ModulatedDeformConv2d`: the modulated deformable convolution of DCNv2 (Zhu et al., CVPR
  2019) with the module API of BasicSR's `ModulatedDeformConv` / mmcv's
  `ModulatedDeformConv2d`: forward(x, offset, mask), `deformable_groups` offset groups.
- `DCNv2Pack`: BasicSR's alignment block (EDVR, Wang et al., CVPRW 2019; the "pack" of mmcv's
  `ModulatedDeformConv2dPack`): a zero-initialised convolution `conv_offset` predicts offsets
  and mask from a conditioning feature; its output is split in three equal chunks (o1, o2, m),
  offset = cat(o1, o2), mask = sigmoid(m), as those codebases do; a warning when the mean
  absolute offset exceeds 50 (alignment diverging). Its state_dict keys are BasicSR's:
  `weight`, `bias`, `conv_offset.weight`, `conv_offset.bias`.

Every layer calls `vsr_kernels.deform_conv2d(..., backend=self.backend)`.
"""
import math
import warnings

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops import _backend, _checks
from ..ops.deform_conv2d import deform_conv2d

# BasicSR's DCNv2Pack (and mmcv's pack) warn above this mean absolute offset, in pixels.
OFFSET_WARNING_THRESHOLD = 50.0


def _init_convolution(layer: nn.Module, in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                      bias, backend) -> None:
    """The arguments, weight and bias every layer here shares, checked as nn.Conv2d checks them
    (the parameters left uninitialised: each layer initialises as its original does)."""
    layer.in_channels = _checks.integer("in_channels", in_channels, 1)
    layer.out_channels = _checks.integer("out_channels", out_channels, 1)
    layer.groups = _checks.integer("groups", groups, 1)
    if in_channels % groups:
        raise ValueError(f"in_channels ({in_channels}) must be divisible by groups ({groups})")
    if out_channels % groups:
        raise ValueError(f"out_channels ({out_channels}) must be divisible by groups ({groups})")
    layer.kernel_size = _pair(kernel_size)
    layer.stride, layer.padding, layer.dilation = _pair(stride), _pair(padding), _pair(dilation)
    layer.backend = _checks.choice("backend", backend, _backend.BACKENDS)
    layer.weight = nn.Parameter(torch.empty(out_channels, in_channels // groups, *layer.kernel_size))
    layer.bias = nn.Parameter(torch.empty(out_channels)) if bias else None


class DeformConv2d(nn.Module):
    """torchvision.ops.DeformConv2d over `vsr_kernels.deform_conv2d`.

    Args: in_channels, out_channels, kernel_size (int or pair), stride, padding, dilation (int or
        pair), groups, bias (as nn.Conv2d), backend (of `deform_conv2d`).
    Parameters: weight (out_channels, in_channels / groups, kh, kw), bias (out_channels,) or None;
        initialised like torchvision's (kaiming_uniform_ with a = sqrt(5), bias uniform in
        +-1/sqrt(fan_in)).
    Shapes: forward(input (B, in_channels, H, W), offset (B, 2*G*kh*kw, H_out, W_out),
        mask (B, G*kh*kw, H_out, W_out) or None) -> (B, out_channels, H_out, W_out);
        G, the offset groups, follows from offset's channels.
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, bias: bool = True, backend: str = "auto"):
        super().__init__()
        _init_convolution(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                          backend)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.weight.shape[1] * self.weight.shape[2] * self.weight.shape[3]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, input: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor | None = None
                ) -> torch.Tensor:
        return deform_conv2d(input, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                             mask, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"bias={self.bias is not None}, backend={self.backend!r}")


class ModulatedDeformConv2d(nn.Module):
    """Modulated deformable convolution (DCNv2), BasicSR's / mmcv's module API.

    Args: in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
        deformable_groups (G: the input channels are split in G groups, each with its own
        offsets and mask), bias, backend.
    Parameters: weight (out_channels, in_channels / groups, kh, kw), bias (out_channels,) or
        None; initialised like BasicSR/mmcv: weight uniform in +-1/sqrt(in_channels*kh*kw),
        bias zero.
    Shapes: forward(x (B, in_channels, H, W), offset (B, 2*G*kh*kw, H_out, W_out),
        mask (B, G*kh*kw, H_out, W_out)) -> (B, out_channels, H_out, W_out).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deformable_groups: int = 1, bias: bool = True, backend: str = "auto"):
        super().__init__()
        _init_convolution(self, in_channels, out_channels, kernel_size, stride, padding, dilation, groups, bias,
                          backend)
        self.deformable_groups = _checks.integer("deformable_groups", deformable_groups, 1)
        if in_channels % deformable_groups:
            raise ValueError(f"in_channels ({in_channels}) must be divisible by deformable_groups "
                             f"({deformable_groups})")
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.in_channels * self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor, offset: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                             mask,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
                f"stride={self.stride}, "
                f"padding={self.padding}, dilation={self.dilation}, groups={self.groups}, "
                f"deformable_groups={self.deformable_groups}, bias={self.bias is not None}, "
                f"backend={self.backend!r}")


class DCNv2Pack(ModulatedDeformConv2d):
    """Modulated deformable convolution whose offsets and mask are predicted from a
    conditioning feature (BasicSR's `DCNv2Pack`, mmcv's `ModulatedDeformConv2dPack`).

    conv_offset = Conv2d(offset_channels, 3*G*kh*kw, kernel_size, stride, padding, dilation),
    zero-initialised (so a fresh pack samples the regular grid with mask 0.5). Its output is
    chunked in three along channels: (o1, o2, m); offset = cat(o1, o2) (so channel
    2*(g*kh*kw + k) / +1 of it is dy / dx of kernel point k of offset group g, torchvision's
    layout), mask = sigmoid(m). When the mean absolute offset exceeds 50 pixels a
    RuntimeWarning is issued (BasicSR logs the same; set `warn_offset=False` to skip the check,
    which reads a value back from the device, and it is skipped under torch.compile).

    Args: as ModulatedDeformConv2d, plus offset_channels (channels of the conditioning
        feature; default in_channels) and warn_offset.
    Shapes: forward(x (B, in_channels, H, W), feat (B, offset_channels, H, W))
        -> (B, out_channels, H_out, W_out).
    """

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0, dilation=1,
                 groups: int = 1, deformable_groups: int = 1, bias: bool = True,
                 offset_channels: int | None = None,
                 warn_offset: bool = True, backend: str = "auto"):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         deformable_groups, bias, backend)
        offset_channels = in_channels if offset_channels is None else offset_channels
        self.offset_channels = _checks.integer("offset_channels", offset_channels, 1)
        self.warn_offset = bool(warn_offset)
        kh, kw = self.kernel_size
        self.conv_offset = nn.Conv2d(offset_channels, 3 * self.deformable_groups * kh * kw, self.kernel_size,
                                     self.stride, self.padding, self.dilation, bias=True)
        self.init_offset()

    def init_offset(self) -> None:
        nn.init.zeros_(self.conv_offset.weight)
        nn.init.zeros_(self.conv_offset.bias)

    def offset_and_mask(self, feat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(offset, mask) predicted from the conditioning feature, in BasicSR's channel order."""
        o1, o2, mask = torch.chunk(self.conv_offset(feat), 3, dim=1)
        offset = torch.cat((o1, o2), dim=1)
        if self.warn_offset and not torch.compiler.is_compiling() and offset.numel():
            magnitude = float(offset.detach().abs().mean())
            if magnitude > OFFSET_WARNING_THRESHOLD:
                warnings.warn(f"DCNv2Pack: the mean absolute offset is {magnitude:.1f} pixels, larger than "
                              f"{OFFSET_WARNING_THRESHOLD:g}: the alignment may be diverging", RuntimeWarning,
                              stacklevel=3)
        return offset, torch.sigmoid(mask)

    def forward(self, x: torch.Tensor, feat: torch.Tensor) -> torch.Tensor:
        offset, mask = self.offset_and_mask(feat)
        return deform_conv2d(x, offset, self.weight, self.bias, self.stride, self.padding, self.dilation,
                             mask,
                             backend=self.backend)
