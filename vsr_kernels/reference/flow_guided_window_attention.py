"""Naive flow-guided window attention, written the way IART's implicit alignment does it.

IART (Xu et al., CVPR 2024, `ImplicitWarpModule`) builds, for every pixel, the integer
coordinates of the w x w window cells of the reference frame around where the flow points,
turns them into one linear int64 index per cell, repeats that index over the channels,
gathers the windowed keys and values with it, and runs softmax attention of each pixel's
query over its w * w cells. Autograd provides the backward. This is the oracle of the tests
and the baseline of the benchmarks: it is deliberately not optimised (the repeated index
alone is w * w times the size of a feature map, in int64).

Unlike IART's code it runs on any device, centres windows of odd size (see `window_cells`)
and honours an explicit `scale` of 0.
"""
import torch


def window_cells(window_size: int) -> range:
    """Offsets a (rows) and b (columns) of the window cells from the base pixel:
    lo, ..., lo + w - 1 with lo = -((w - 1) // 2), i.e. 0, 1 for w = 2 (the four bilinear
    neighbours) and -1, 0, 1 for w = 3 (a centred 3 x 3)."""
    lo = -((window_size - 1) // 2)
    return range(lo, lo + window_size)


def coordinate_dtype(flow: torch.Tensor) -> torch.dtype:
    """The dtype of the sampling coordinates y + dy, x + dx: float64 for float64 flow,
    float32 for every other flow dtype."""
    return torch.float64 if flow.dtype == torch.float64 else torch.float32


def flow_guided_window_attention(query, key, value, flow, window_size=2, num_heads=1, key_bias=None,
                                 value_bias=None, scale=None):
    """Reference for `vsr_kernels.flow_guided_window_attention` (no argument checks here).

    query, key, value: (B, C, H, W), C = num_heads * head_dim, heads = contiguous channel blocks.
    flow: (B, 2, H, W), channel 0 = dx, channel 1 = dy (current frame -> reference frame).
    key_bias, value_bias: (w * w, C) or None. Returns out (B, C, H, W), contiguous.
    """
    B, C, H, W = query.shape
    w = window_size
    cells = w * w
    head_dim = C // num_heads
    if scale is None:
        scale = head_dim ** -0.5
    device = query.device

    # Sampling coordinates (float32, float64 for float64 flow); a pixel with non-finite flow
    # samples as if its flow were 0 and gets NaN at the end.
    flow = flow.detach().to(coordinate_dtype(flow))
    finite = torch.isfinite(flow).all(dim=1)  # (B, H, W)
    flow = torch.where(finite[:, None], flow, torch.zeros((), dtype=flow.dtype, device=device))
    grid_y = torch.arange(H, dtype=flow.dtype, device=device).view(1, H, 1)
    grid_x = torch.arange(W, dtype=flow.dtype, device=device).view(1, 1, W)
    # Clamping the coordinate a window beyond the frame changes no clamped cell and keeps
    # the integer conversion of huge flows in range.
    base_y = (grid_y + flow[:, 1]).clamp(-(w + 1), H + w).floor().long()  # (B, H, W)
    base_x = (grid_x + flow[:, 0]).clamp(-(w + 1), W + w).floor().long()

    # Cell n = (a - lo) * w + (b - lo) of pixel p: replicate-clamped coordinates, linearised.
    offsets = torch.tensor(list(window_cells(w)), dtype=torch.long, device=device)
    cell_y = (base_y[..., None, None] + offsets.view(w, 1)).clamp(0, H - 1)  # (B, H, W, w, 1)
    cell_x = (base_x[..., None, None] + offsets.view(1, w)).clamp(0, W - 1)  # (B, H, W, 1, w)
    index = (cell_y * W + cell_x).reshape(B, 1, H * W * cells)
    index = index.repeat(1, C, 1)  # (B, C, H*W*cells), as IART's gather_hw does

    def windows(frames, bias):
        """(B, C, H, W) -> (B*H*W, heads, cells, head_dim): each pixel's window cells (+ bias)."""
        gathered = frames.reshape(B, C, H * W).gather(2, index).view(B, C, H * W, cells)
        gathered = gathered.permute(0, 2, 3, 1)  # (B, HW, cells, C)
        if bias is not None:
            gathered = gathered + bias
        return gathered.reshape(B * H * W, cells, num_heads, head_dim).permute(0, 2, 1, 3)

    keys = windows(key, key_bias)
    values = windows(value, value_bias)
    queries = query.permute(0, 2, 3, 1).reshape(B * H * W, num_heads, 1, head_dim)

    attn = (queries * scale) @ keys.transpose(-2, -1)  # (BHW, heads, 1, cells)
    attn = attn.softmax(dim=-1)
    out = (attn @ values).reshape(B, H, W, C)
    out = torch.where(finite[..., None], out, torch.full((), float("nan"), dtype=out.dtype, device=device))
    return out.permute(0, 3, 1, 2).contiguous()
