"""The blocks of DKSAN, the deformable kernel spatial attention network (Xu, Xiong, Wang and Li,
"Deformable Kernel Convolutional Network for Video Extreme Super-Resolution", ECCVW / AIM 2020,
arXiv:2010.00154; code not public), over `vsr_kernels.deform_kernel_conv2d` and
`vsr_kernels.deform_conv2d`.

- `DeformKernelConv2d`: a depthwise deformable-kernel convolution (Gao et al., "Deformable
  Kernels: Adapting Effective Receptive Fields for Object Deformation", ICLR 2020): each output
  pixel resamples its channel's kernel from a larger kernel scope at kernel offsets predicted by
  a small convolution of a conditioning feature.
- `DKCAlign`: DKSAN's alignment of a neighbour frame's features to the reference frame's: a
  deformable-kernel convolution, then a modulated deformable convolution (DCNv2), both driven by
  the concatenated neighbour and reference features.
- `DeformKernelSpatialAttention` (DKSA): a spatial attention map from stacked deformable-kernel
  convolutions, multiplied into the features; `DeformKernelSpatialAttention.light` is the
  one-layer variant.
- `ChannelAttention` / `ResidualChannelAttentionBlock` (RCAB, Zhang et al., "Image
  Super-Resolution Using Very Deep Residual Channel Attention Networks", ECCV 2018) and
  `DKSAReconstruction`, DKSAN's reconstruction module: RCAB stack + DKSA + residual.

What follows the paper: the names and roles of the modules (DKC_Align = deformable kernel
convolution followed by deformable convolution, its offsets from the reference and the neighbour
together; DKSA = a spatial attention whose map comes from deformable-kernel convolutions instead
of rigid ones; the reconstruction module = RCABs followed by DKSA with a residual connection; a
light DKSA at the first level). What is an assumption (the paper's text gives no layer-level
detail we could read, and its code is not public): the depth and widths below, where the
LeakyReLU(0.1)s sit, the per-channel (C-channel, as EDVR's TSA spatial attention) rather than
single-channel attention map, the kernel-offset generator being a rigid convolution with the
deformable-kernel convolution's own geometry (as in Gao et al.), and the initialisations.
"""
import math

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..ops import _backend, _checks
from ..ops.deform_kernel_conv2d import deform_kernel_conv2d
from .deformable import DCNv2Pack


def _conv(in_channels: int, out_channels: int, kernel_size: int = 3) -> nn.Conv2d:
    return nn.Conv2d(in_channels, out_channels, kernel_size, padding=kernel_size // 2)


def _same_padding(kernel_size: tuple[int, int], dilation: tuple[int, int]) -> tuple[int, int]:
    return tuple(d * (k - 1) // 2 for k, d in zip(kernel_size, dilation))


class DeformKernelConv2d(nn.Module):
    """Depthwise deformable-kernel convolution with predicted kernel offsets.

        kernel_offset = conv_kernel_offset(cond)          (cond defaults to x)
        out = deform_kernel_conv2d(x, weight, kernel_offset, kernel_size, offset, mask, bias,
                                   stride, padding, dilation)

    conv_kernel_offset = Conv2d(offset_channels, 2*kernel_groups*kh*kw, kernel_size, stride,
    padding, dilation) (the output grid of the main convolution), zero-initialised: a fresh layer
    reads the centre kh x kw crop of its scope, i.e. it is F.conv2d(x, weight[:, :, ch:ch+kh,
    cw:cw+kw], bias, stride, padding, dilation, groups=C) with ch = (Sh - kh) // 2 (Sh - kh even).
    Channel 2*(g*kh*kw + k) of the predicted offsets is dky, the next one dkx, of tap k of kernel
    group g; channel c belongs to kernel group c // (C / kernel_groups) (contiguous blocks; the
    official deformable-kernels code interleaves its groups, c % Gk).

    Args:
        channels: C (input = output channels: the convolution is depthwise).
        kernel_size: (kh, kw) taps, int or pair.
        scope_size: (Sh, Sw) of the kernel scope each tap is sampled from, >= kernel_size.
        stride, dilation: int or pair.
        padding: int or pair; None (default) for dilation*(k-1)//2 ("same" at stride 1, odd k).
        kernel_groups: Gk, groups of channels sharing kernel offsets (divides C).
        bias: learn a (C,) bias.
        offset_channels: channels of the conditioning feature `cond` (default C).
        backend: backend of `deform_kernel_conv2d`.
    Parameters: weight (C, 1, Sh, Sw), the scopes, uniform in +-1/sqrt(kh*kw) (nn.Conv2d's default
        bound for a depthwise kh x kw kernel), bias (C,) in the same bound, conv_kernel_offset
        (zero).
    Shapes: forward(x (B, C, H, W), offset (B, 2*G*kh*kw, H_out, W_out) or None, mask
        (B, G*kh*kw, H_out, W_out) or None, cond (B, offset_channels, H, W) or None)
        -> (B, C, H_out, W_out). offset and mask are the input offsets and modulation of
        deform_conv2d (torchvision's layout), passed through to the op.
    """

    def __init__(self, channels: int, kernel_size=3, scope_size=5, stride=1, padding=None, dilation=1,
                 kernel_groups: int = 1, bias: bool = True, offset_channels: int | None = None,
                 backend: str = "auto"):
        super().__init__()
        self.channels = _checks.integer("channels", channels, 1)
        self.kernel_groups = _checks.integer("kernel_groups", kernel_groups, 1)
        if channels % kernel_groups:
            raise ValueError(f"channels ({channels}) must be divisible by kernel_groups ({kernel_groups})")
        self.kernel_size, self.scope_size = _pair(kernel_size), _pair(scope_size)
        for name, pair in (("kernel_size", self.kernel_size), ("scope_size", self.scope_size)):
            for value in pair:
                _checks.integer(name, value, 1)
        if any(s < k for s, k in zip(self.scope_size, self.kernel_size)):
            raise ValueError(f"scope_size {self.scope_size} must be at least kernel_size {self.kernel_size}")
        self.stride, self.dilation = _pair(stride), _pair(dilation)
        self.padding = _same_padding(self.kernel_size, self.dilation) if padding is None else _pair(padding)
        offset_channels = channels if offset_channels is None else offset_channels
        self.offset_channels = _checks.integer("offset_channels", offset_channels, 1)
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        kh, kw = self.kernel_size
        self.weight = nn.Parameter(torch.empty(channels, 1, *self.scope_size))
        self.bias = nn.Parameter(torch.empty(channels)) if bias else None
        self.conv_kernel_offset = nn.Conv2d(offset_channels, 2 * kernel_groups * kh * kw, self.kernel_size,
                                            self.stride, self.padding, self.dilation)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        bound = 1.0 / math.sqrt(self.kernel_size[0] * self.kernel_size[1])
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)
        nn.init.zeros_(self.conv_kernel_offset.weight)
        nn.init.zeros_(self.conv_kernel_offset.bias)

    def centre_kernel(self) -> torch.Tensor:
        """The (C, 1, kh, kw) centre crop of the scopes: the kernel of a fresh layer (even Sh - kh)."""
        (kh, kw), (Sh, Sw) = self.kernel_size, self.scope_size
        top, left = (Sh - kh) // 2, (Sw - kw) // 2
        return self.weight[:, :, top:top + kh, left:left + kw]

    def forward(self, x: torch.Tensor, offset: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        _checks.tensor("x", x, "BCHW")
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have C = channels = {self.channels} channels, "
                             f"got shape {tuple(x.shape)}")
        if cond is not None:
            _checks.tensor("cond", cond, "BCHW")
            if cond.shape[1] != self.offset_channels or cond.shape[2:] != x.shape[2:]:
                raise ValueError(f"cond must have shape (B, offset_channels = {self.offset_channels}, "
                                 f"{x.shape[2]}, {x.shape[3]}) (x's H, W), got {tuple(cond.shape)}")
        kernel_offset = self.conv_kernel_offset(x if cond is None else cond)
        return deform_kernel_conv2d(x, self.weight, kernel_offset, self.kernel_size, offset, mask, self.bias,
                                    self.stride, self.padding, self.dilation, backend=self.backend)

    def extra_repr(self) -> str:
        return (f"{self.channels}, kernel_size={self.kernel_size}, scope_size={self.scope_size}, "
                f"stride={self.stride}, padding={self.padding}, dilation={self.dilation}, "
                f"kernel_groups={self.kernel_groups}, bias={self.bias is not None}, backend={self.backend!r}")


class DKCAlign(nn.Module):
    """DKSAN's DKC_Align: a neighbour's features aligned to the reference's.

        o = lrelu(offset_conv2(lrelu(offset_conv1(cat(nbr, ref)))))     (C channels)
        a = lrelu(dkconv(nbr, cond=o))       deformable-kernel conv, kernel offsets from o
        out = lrelu(dcn_pack(a, o))          DCNv2 (deform_conv2d), offsets and mask from o

    Follows the paper: a deformable-kernel convolution followed by a deformable convolution,
    offsets predicted from the concatenated reference and neighbour features. Assumptions: the
    two-conv offset feature o shared by both stages (as EDVR's PCD level), the LeakyReLU(0.1)s,
    the order (kernel deformation first). Fresh: the kernel offsets are zero (dkconv is a
    depthwise conv with the centre crops) and the DCN samples the regular grid with mask 1/2
    (DCNv2Pack's zero-initialised conv_offset).

    Args: num_feat (C), kernel_size and scope_size of the deformable-kernel conv, kernel_groups,
        deformable_groups (offset groups of the DCN; divides C), warn_offset (DCNv2Pack's divergence
        warning, which reads a value back from the device), backend (of both ops).
    Shapes: forward(nbr (B, C, H, W), ref (B, C, H, W)) -> (B, C, H, W).
    """

    def __init__(self, num_feat: int = 64, kernel_size: int = 3, scope_size: int = 5, kernel_groups: int = 1,
                 deformable_groups: int = 8, warn_offset: bool = True, backend: str = "auto"):
        super().__init__()
        self.num_feat = _checks.integer("num_feat", num_feat, 1)
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        self.offset_conv1 = _conv(2 * num_feat, num_feat)
        self.offset_conv2 = _conv(num_feat, num_feat)
        self.dkconv = DeformKernelConv2d(num_feat, kernel_size, scope_size, kernel_groups=kernel_groups,
                                         backend=backend)
        self.dcn_pack = DCNv2Pack(num_feat, num_feat, 3, padding=1, deformable_groups=deformable_groups,
                                  warn_offset=warn_offset, backend=backend)
        self.lrelu = nn.LeakyReLU(0.1)

    def forward(self, nbr: torch.Tensor, ref: torch.Tensor) -> torch.Tensor:
        for name, feat in (("nbr", nbr), ("ref", ref)):
            _checks.tensor(name, feat, "BCHW")
            if feat.shape[1] != self.num_feat:
                raise ValueError(f"{name} must have C = num_feat = {self.num_feat} channels, "
                                 f"got shape {tuple(feat.shape)}")
        if nbr.shape != ref.shape:
            raise ValueError(f"nbr and ref must have the same shape, "
                             f"got {tuple(nbr.shape)} and {tuple(ref.shape)}")
        o = self.lrelu(self.offset_conv2(self.lrelu(self.offset_conv1(torch.cat([nbr, ref], 1)))))
        aligned = self.lrelu(self.dkconv(nbr, cond=o))
        return self.lrelu(self.dcn_pack(aligned, o))


class DeformKernelSpatialAttention(nn.Module):
    """DKSA: features multiplied by a spatial attention map from deformable-kernel convolutions.

        a = lrelu(conv(x))                                   (3x3, C -> C)
        a = lrelu(dk_i(a)) for the first num_layers - 1 layers, then a = dk_last(a)
        out = x * sigmoid(a)                                 (a per-pixel, per-channel map)

    Each dk_i is a `DeformKernelConv2d` (depthwise, same padding) predicting its kernel offsets
    from its own input. Follows the paper: one conv, then stacked deformable-kernel convs, a
    sigmoid map multiplied into the features; a light variant (`light`, one deformable-kernel
    conv) at DKSAN's first level. Assumptions: the layer count (default 2; light 1), the
    LeakyReLU(0.1)s, the C-channel map (EDVR's TSA spatial attention, which DKSA replaces, is
    C-channel too).

    Args: channels (C), num_layers (deformable-kernel convs, >= 1), kernel_size, scope_size,
        kernel_groups, backend.
    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, num_layers: int = 2, kernel_size: int = 3, scope_size: int = 5,
                 kernel_groups: int = 1, backend: str = "auto"):
        super().__init__()
        self.channels = _checks.integer("channels", channels, 1)
        self.num_layers = _checks.integer("num_layers", num_layers, 1)
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        self.conv = _conv(channels, channels)
        self.dk_layers = nn.ModuleList(
            DeformKernelConv2d(channels, kernel_size, scope_size, kernel_groups=kernel_groups,
                               backend=backend)
            for _ in range(num_layers))
        self.lrelu = nn.LeakyReLU(0.1)

    @classmethod
    def light(cls, channels: int, **kwargs) -> "DeformKernelSpatialAttention":
        """The light variant (DKSAN's first level): one deformable-kernel convolution."""
        return cls(channels, num_layers=1, **kwargs)

    def attention(self, x: torch.Tensor) -> torch.Tensor:
        """The (B, C, H, W) attention map in (0, 1)."""
        a = self.lrelu(self.conv(x))
        for i, layer in enumerate(self.dk_layers):
            a = layer(a)
            if i + 1 < len(self.dk_layers):
                a = self.lrelu(a)
        return torch.sigmoid(a)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        _checks.tensor("x", x, "BCHW")
        if x.shape[1] != self.channels:
            raise ValueError(f"x must have C = channels = {self.channels} channels, "
                             f"got shape {tuple(x.shape)}")
        return x * self.attention(x)


class ChannelAttention(nn.Module):
    """RCAN's channel attention: x * sigmoid(conv1x1(relu(conv1x1(mean over H, W of x)))),
    squeezed to max(C // reduction, 1) channels. Shapes: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        hidden = max(channels // _checks.integer("reduction", reduction, 1), 1)
        self.squeeze = nn.Conv2d(channels, hidden, 1)
        self.excite = nn.Conv2d(hidden, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = x.mean((2, 3), keepdim=True)
        return x * torch.sigmoid(self.excite(torch.relu(self.squeeze(w))))


class ResidualChannelAttentionBlock(nn.Module):
    """RCAB (RCAN): x + CA(conv(relu(conv(x)))). Shapes: (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        self.conv1, self.conv2 = _conv(channels, channels), _conv(channels, channels)
        self.attention = ChannelAttention(channels, reduction)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attention(self.conv2(torch.relu(self.conv1(x))))


class DKSAReconstruction(nn.Module):
    """DKSAN's reconstruction module (a residual group): x + DKSA(RCAB_n(...RCAB_1(x))).

    Follows the paper: an RCAB stack, then DKSA, with a residual connection. Assumptions: no
    extra conv before the residual sum, the RCAB count and reduction.

    Args: channels (C), num_blocks (RCABs, >= 0), reduction (of the channel attention),
        light (use `DeformKernelSpatialAttention.light`), num_layers, kernel_size, scope_size,
        kernel_groups (of the DKSA, num_layers ignored with light), backend.
    Shapes: (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, num_blocks: int = 2, reduction: int = 16, light: bool = False,
                 num_layers: int = 2, kernel_size: int = 3, scope_size: int = 5, kernel_groups: int = 1,
                 backend: str = "auto"):
        super().__init__()
        _checks.integer("num_blocks", num_blocks, 0)
        self.blocks = nn.Sequential(*(ResidualChannelAttentionBlock(channels, reduction)
                                      for _ in range(num_blocks)))
        self.dksa = DeformKernelSpatialAttention(channels, 1 if light else num_layers, kernel_size,
                                                 scope_size, kernel_groups, backend=backend)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.dksa(self.blocks(x))
