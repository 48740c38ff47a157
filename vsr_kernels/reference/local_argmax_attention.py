"""Naive local argmax attention, written the way MANA-style code does it today.

`F.unfold` materialises kernel_size**2 shifted copies of key and value, an einsum scores
every candidate, `max` picks the best and `gather` fetches its value. Autograd provides
the backward. This is the oracle of the tests and the baseline of the benchmarks: it is
deliberately not optimised.
"""
import torch
import torch.nn.functional as F


def _unfold_frames(frames: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, C, kernel_size**2, H, W), zero outside the frame."""
    B, T, C, H, W = frames.shape
    pad = (kernel_size // 2) * dilation
    cols = F.unfold(frames.reshape(B * T, C, H, W), kernel_size, dilation=dilation, padding=pad)
    return cols.view(B, T, C, kernel_size * kernel_size, H, W)


def _outside_frame(H: int, W: int, kernel_size: int, dilation: int, device) -> torch.Tensor:
    """(kernel_size**2, H, W) bool: True where candidate j of pixel (y, x) lies outside the frame."""
    ones = torch.ones(1, 1, 1, H, W, device=device)
    return _unfold_frames(ones, kernel_size, dilation)[0, 0, 0] == 0


def local_argmax_attention(query, key, value, kernel_size=9, dilation=1, scale=1.0, border="exclude"):
    """Reference for `vsr_kernels.local_argmax_attention`; returns (out, score, index)."""
    B, T, _, H, W = key.shape
    keys = _unfold_frames(key, kernel_size, dilation)
    scores = scale * torch.einsum("bchw,btckhw->btkhw", query, keys)
    if border == "exclude":
        outside = _outside_frame(H, W, kernel_size, dilation, query.device)
        scores = scores.masked_fill(outside, float("-inf"))
    score, index = scores.max(dim=2)
    values = _unfold_frames(value, kernel_size, dilation)
    Cv = value.shape[2]
    picked = values.gather(3, index[:, :, None, None].expand(B, T, Cv, 1, H, W)).squeeze(3)
    out = score[:, :, None] * picked
    return out, score, index
