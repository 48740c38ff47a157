"""MEGAN's non-local residual block (NLRB; "Memory Enhanced Graph Attention Network for
Space-Time Video Super-Resolution", the seed paper; code not public), an embedded-Gaussian
non-local block (Wang et al., "Non-local Neural Networks", CVPR 2018) with a residual
connection, computed with `torch.nn.functional.scaled_dot_product_attention` (dense attention
needs no custom kernel: SDPA picks a fused, memory-efficient implementation where one exists).
"""
import torch
import torch.nn.functional as F
from torch import nn

from ..ops import _checks


class NonLocalResidualBlock(nn.Module):
    """x + W(softmax(theta(x) phi(x)^T * scale) g(x)) over every position of the input.

    theta, phi, g are 1x1 convolutions to `inner_channels` (split in `num_heads` heads), W a
    1x1 convolution back to `channels`, zero-initialised so a fresh block is the identity (the
    non-local paper zero-initialises the BN after W for the same reason). The attention runs
    over all positions of a frame, or of all frames of a clip for (B, T, C, H, W) inputs (the
    spatio-temporal non-local block). With `sub_sample`, keys and values are 2x2 max-pooled
    (per frame) first, as in the non-local paper, to cut the quadratic cost by 4.
    scale: None for SDPA's 1/sqrt(head dim); 1.0 for the original embedded Gaussian.

    Shapes: (B, C, H, W) -> (B, C, H, W), or (B, T, C, H, W) -> (B, T, C, H, W).
    Memory: SDPA's math fallback (CPU float64, odd dtypes) materialises the (N x N) scores
    for N = T*H*W positions; keep N modest or use sub_sample.
    """

    def __init__(self, channels: int, inner_channels: int | None = None, num_heads: int = 1,
                 sub_sample: bool = False, scale: float | None = None):
        super().__init__()
        self.channels = _checks.integer("channels", channels, 1)
        inner_channels = max(channels // 2, 1) if inner_channels is None else inner_channels
        self.inner_channels = _checks.integer("inner_channels", inner_channels, 1)
        self.num_heads = _checks.integer("num_heads", num_heads, 1)
        if inner_channels % num_heads:
            raise ValueError(f"inner_channels ({inner_channels}) must be divisible by num_heads "
                             f"({num_heads})")
        self.sub_sample = bool(sub_sample)
        self.scale = None if scale is None else _checks.real("scale", scale)
        self.theta = nn.Conv2d(channels, inner_channels, 1)
        self.phi = nn.Conv2d(channels, inner_channels, 1)
        self.g = nn.Conv2d(channels, inner_channels, 1)
        self.out = nn.Conv2d(inner_channels, channels, 1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def _heads(self, x: torch.Tensor, B: int) -> torch.Tensor:
        """(B*T, D, h, w) -> (B, heads, T*h*w, D/heads)."""
        BT, D, h, w = x.shape
        T = BT // B
        x = x.view(B, T, self.num_heads, D // self.num_heads, h * w)
        return x.permute(0, 2, 1, 4, 3).reshape(B, self.num_heads, T * h * w, D // self.num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dim() not in (4, 5):
            raise ValueError("x must be a (B, C, H, W) or (B, T, C, H, W) tensor")
        frames = x if x.dim() == 5 else x.unsqueeze(1)
        B, T, C, H, W = frames.shape
        if C != self.channels:
            raise ValueError(f"x must have {self.channels} channels, got shape {tuple(x.shape)}")
        flat = frames.flatten(0, 1)
        keys_in = F.max_pool2d(flat, 2) if self.sub_sample and H >= 2 and W >= 2 else flat
        q = self._heads(self.theta(flat), B)
        k = self._heads(self.phi(keys_in), B)
        v = self._heads(self.g(keys_in), B)
        y = F.scaled_dot_product_attention(q, k, v, scale=self.scale)  # (B, heads, T*H*W, D/heads)
        y = y.view(B, self.num_heads, T, H * W, -1).permute(0, 2, 1, 4, 3).reshape(B * T, -1, H, W)
        out = frames + self.out(y).view(B, T, C, H, W)
        return out if x.dim() == 5 else out.squeeze(1)
