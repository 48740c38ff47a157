"""The two attention blocks of MANA (Memory-Augmented Non-local Attention for video
super-resolution, Yu et al., CVPR 2022).

`CrossFrameNonLocalAttention` lets every pixel of the centre frame pick its best match in
a local window of each frame: the one-hot argmax attention of `local_argmax_attention`.
`MemoryAugmentedAttention` lets it attend densely to a small learned bank of features
shared by all videos: plain softmax attention over the bank, through
`scaled_dot_product_attention`.
"""
import numbers

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _backend, _checks
from ..ops.local_argmax_attention import MAX_DILATION, MAX_KERNEL_SIZE, local_argmax_attention

GROUP_NORM_GROUPS = 32


def _channels(channels, divisor: int) -> int:
    channels = _checks.integer("channels", channels, 1)
    if channels % divisor:
        raise ValueError(f"channels must be a positive multiple of {divisor}, got {channels}")
    return channels


def _check_features(name: str, value, dims: str, channels: int, channel_dim: int) -> None:
    _checks.tensor(name, value, dims)
    if value.shape[channel_dim] != channels:
        raise ValueError(f"{name} must have C = {channels} channels in dim {channel_dim}, "
                         f"got shape {tuple(value.shape)}")
    if value.shape[-2] == 0 or value.shape[-1] == 0:
        raise ValueError(f"{name} must have frames of at least one pixel (H, W >= 1), "
                         f"got shape {tuple(value.shape)}")


class CrossFrameNonLocalAttention(nn.Module):
    """MANA's cross-frame non-local attention: aligns the frames of a clip to its centre frame.

    Every frame is group-normalised; the centre frame is embedded as the query and every frame
    (the centre one included) as key and value, each by a 1x1 conv C -> C/2. Each query pixel
    keeps its best-matching key in a kernel_size x kernel_size window of each frame, which
    gives T aligned maps of C/2 channels; a 1x1 conv T*C/2 -> C fuses them and the result is
    added to the un-normalised centre feature.

    The fusion conv starts at zero, so a fresh layer is exactly the identity on the centre
    feature and can be inserted into a trained network without changing it.

    Args:
        channels: C, a multiple of 32 (the GroupNorm groups).
        num_frames: T, the frames of every clip.
        kernel_size: odd side of the search window in each frame.
        dilation: spacing of the window's cells.
        backend: passed to `local_argmax_attention` ("auto", "reference", "cpu", "cuda", "triton").

    Shapes:
        forward(frames (B, T, C, H, W), center: int) -> (B, C, H, W), H, W >= 1

    Examples:
        >>> import torch
        >>> from vsr_kernels.nn import CrossFrameNonLocalAttention
        >>> layer = CrossFrameNonLocalAttention(channels=32, num_frames=3, kernel_size=5)
        >>> frames = torch.randn(2, 3, 32, 16, 16)  # (B, T, C, H, W)
        >>> aligned = layer(frames, center=1)
        >>> aligned.shape
        torch.Size([2, 32, 16, 16])
        >>> torch.equal(aligned, frames[:, 1])  # a fresh layer is the identity on the centre frame
        True
    """

    def __init__(self, channels: int, num_frames: int, kernel_size: int | tuple[int, int] = 9,
                 dilation: int | tuple[int, int] = 1, backend: str = "auto") -> None:
        super().__init__()
        self.channels = _channels(channels, GROUP_NORM_GROUPS)
        self.num_frames = _checks.integer("num_frames", num_frames, 1)
        self.kernel_size = _checks.square("kernel_size", kernel_size, 1, MAX_KERNEL_SIZE, odd=True)
        self.dilation = _checks.square("dilation", dilation, 1, MAX_DILATION)
        self.backend = _checks.choice("backend", backend, _backend.BACKENDS)
        embed = channels // 2
        # Dot products of C/2-channel embeddings grow like sqrt(C/2); scaling them keeps the
        # selected score, which multiplies the value, at the magnitude of the value itself.
        self.scale = embed ** -0.5
        self.norm = nn.GroupNorm(GROUP_NORM_GROUPS, channels)
        self.query = nn.Conv2d(channels, embed, 1)
        self.key = nn.Conv2d(channels, embed, 1)
        self.value = nn.Conv2d(channels, embed, 1)
        self.fuse = nn.Conv2d(num_frames * embed, channels, 1)
        nn.init.zeros_(self.fuse.weight)
        nn.init.zeros_(self.fuse.bias)

    def forward(self, frames: torch.Tensor, center: int) -> torch.Tensor:
        _check_features("frames", frames, "BTCHW", self.channels, 2)
        if frames.shape[1] != self.num_frames:
            raise ValueError(f"frames must have T = num_frames = {self.num_frames} in dim 1, "
                             f"got shape {tuple(frames.shape)}")
        if isinstance(center, bool) or not isinstance(center, numbers.Integral):
            raise TypeError(f"center must be an int, got {type(center).__name__}")
        if not 0 <= center < self.num_frames:
            raise ValueError(f"center must be in [0, {self.num_frames}), got {center}")
        B, T = frames.shape[:2]
        normed = self.norm(frames.flatten(0, 1))
        query = self.query(normed.unflatten(0, (B, T))[:, center])
        key = self.key(normed).unflatten(0, (B, T))
        value = self.value(normed).unflatten(0, (B, T))
        aligned, _, _ = local_argmax_attention(query, key, value, self.kernel_size, self.dilation, self.scale,
                                               backend=self.backend)
        return frames[:, center] + self.fuse(aligned.flatten(1, 2))

    def extra_repr(self) -> str:
        return (f"channels={self.channels}, num_frames={self.num_frames}, kernel_size={self.kernel_size}, "
                f"dilation={self.dilation}, backend={self.backend!r}")


class MemoryAugmentedAttention(nn.Module):
    """MANA's memory-augmented attention: each pixel reads from a learned bank of features.

    The bank M holds N = memory_size features of C/2 channels. The input is embedded by a
    1x1 conv C -> C/2 into queries Q, one per pixel, which read
    Ŷ = softmax(Q M / sqrt(C/2)) Mᵀ; a 1x1 conv C/2 -> C maps Ŷ back and is added to the
    input. The bank learns from the returned loss mean|Q - Ŷ|, which asks it to reconstruct
    the queries it is shown.

    The output conv starts at zero, so a fresh layer returns its input exactly.

    Args:
        channels: C, even.
        memory_size: N, the features in the bank.

    Shapes:
        forward(x (B, C, H, W)) -> (y (B, C, H, W), loss (scalar)), H, W >= 1

    Examples:
        >>> import torch
        >>> from vsr_kernels.nn import MemoryAugmentedAttention
        >>> layer = MemoryAugmentedAttention(channels=16, memory_size=32)
        >>> x = torch.randn(2, 16, 8, 8)  # (B, C, H, W)
        >>> y, loss = layer(x)
        >>> y.shape, loss.dim()
        (torch.Size([2, 16, 8, 8]), 0)
    """

    def __init__(self, channels: int, memory_size: int = 256) -> None:
        super().__init__()
        self.channels = _channels(channels, 2)
        self.memory_size = _checks.integer("memory_size", memory_size, 1)
        embed = channels // 2
        self.query = nn.Conv2d(channels, embed, 1)
        # Unit-variance entries give logits of unit variance for unit-variance queries: the
        # softmax starts neither one-hot nor uniform.
        self.memory = nn.Parameter(torch.randn(embed, memory_size))
        self.project = nn.Conv2d(embed, channels, 1)
        nn.init.zeros_(self.project.weight)
        nn.init.zeros_(self.project.bias)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        _check_features("x", x, "BCHW", self.channels, 1)
        B, _, H, W = x.shape
        query = self.query(x).flatten(2).transpose(1, 2)  # (B, HW, C/2)
        # Under autocast the queries leave the conv in half precision while the bank stays float32.
        bank = self.memory.t().to(query.dtype).expand(B, 1, -1, -1)  # (B, 1, N, C/2)
        embed = query.shape[-1]
        read = F.scaled_dot_product_attention(query[:, None], bank, bank, scale=embed ** -0.5)[:, 0]
        loss = (query - read).abs().mean()
        read = read.transpose(1, 2).unflatten(2, (H, W))
        return x + self.project(read), loss

    def extra_repr(self) -> str:
        return f"channels={self.channels}, memory_size={self.memory_size}"
