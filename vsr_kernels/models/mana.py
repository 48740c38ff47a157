"""MANA, the memory-augmented non-local attention network for video super-resolution
(Yu et al., CVPR 2022), assembled from vsr_kernels.nn.

A shared encoder turns every frame into features; cross-frame non-local attention aligns
them to the centre frame and fuses them; memory-augmented attention adds what a learned
bank of features recalls; a decoder of residual blocks and two x2 pixel-shuffle stages
produce the residual to the bilinearly upsampled centre frame.
"""
import torch
import torch.nn.functional as F
from torch import nn

from vsr_kernels.nn import CrossFrameNonLocalAttention, MemoryAugmentedAttention

from ._blocks import ResidualBlock, conv3x3

SCALE = 4


class MANA(nn.Module):
    """The MANA network: x4 super-resolution of the centre frame of a clip.

    Args:
        in_channels: channels of the input frames (3 for RGB).
        channels: C, the feature width, a multiple of 32.
        num_frames: T, the frames of every clip; the centre frame is num_frames // 2.
        encoder_blocks: residual blocks of the shared frame encoder.
        decoder_blocks: residual blocks of the decoder.
        kernel_size: side of the search window of the cross-frame attention.
        memory_size: features in the memory bank.
        backend: backend of the cross-frame attention op, so the same network runs on the
            naive reference ("reference") or on a fused kernel ("cpu", "cuda", "triton", "auto").

    Shapes:
        forward(frames (B, T, in_channels, H, W)) -> (sr (B, in_channels, 4H, 4W), memory_loss (scalar))
        Train on an image loss of sr plus memory_loss, which teaches the memory bank.
    """

    def __init__(self, in_channels: int = 3, channels: int = 128, num_frames: int = 7, encoder_blocks: int = 5,
                 decoder_blocks: int = 40, kernel_size: int = 9, memory_size: int = 256, backend: str = "auto"):
        super().__init__()
        self.in_channels = in_channels
        self.num_frames = num_frames
        self.center = num_frames // 2
        self.encoder = nn.Sequential(
            conv3x3(in_channels, channels), nn.LeakyReLU(0.1),
            *(ResidualBlock(channels) for _ in range(encoder_blocks)))
        self.cross_frame_attention = CrossFrameNonLocalAttention(channels, num_frames, kernel_size,
                                                                 backend=backend)
        self.memory_attention = MemoryAugmentedAttention(channels, memory_size)
        self.decoder = nn.Sequential(*(ResidualBlock(channels) for _ in range(decoder_blocks)))
        self.upsample = nn.Sequential(
            conv3x3(channels, 4 * channels), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            conv3x3(channels, 4 * channels), nn.PixelShuffle(2), nn.LeakyReLU(0.1),
            conv3x3(channels, in_channels))

    @classmethod
    def small(cls, backend: str = "auto", **overrides) -> "MANA":
        """A configuration small enough for tests and CPU benchmarks (3 frames, C = 32)."""
        config = dict(channels=32, num_frames=3, encoder_blocks=1, decoder_blocks=2, kernel_size=5,
                      memory_size=16, backend=backend)
        return cls(**{**config, **overrides})

    def forward(self, frames: torch.Tensor):
        if not isinstance(frames, torch.Tensor):
            raise TypeError(f"frames must be a torch.Tensor of shape (B, T, C, H, W), got {type(frames).__name__}")
        expected = (self.num_frames, self.in_channels)
        if frames.dim() != 5 or tuple(frames.shape[1:3]) != expected:
            raise ValueError(f"frames must have shape (B, {self.num_frames}, {self.in_channels}, H, W), "
                             f"got {tuple(frames.shape)}")
        B, T = frames.shape[:2]
        features = self.encoder(frames.flatten(0, 1)).unflatten(0, (B, T))
        aligned = self.cross_frame_attention(features, self.center)
        recalled, memory_loss = self.memory_attention(aligned)
        residual = self.upsample(self.decoder(recalled))
        base = F.interpolate(frames[:, self.center], scale_factor=SCALE, mode="bilinear", align_corners=False)
        return base + residual, memory_loss
