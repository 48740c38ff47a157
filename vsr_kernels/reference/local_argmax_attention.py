"""Naive local argmax attention, written the way MANA-style code does it today.

`F.unfold` materialises kernel_size**2 shifted copies of key and value, an einsum scores
every candidate, an argmax picks the best and `gather` fetches its score and value. Autograd
provides the backward (double backward included). This is the oracle of the tests and the
baseline of the benchmarks: it is deliberately not optimised, but it follows the contract of
`vsr_kernels.local_argmax_attention` exactly, edge cases included: the lowest candidate index
among the largest scores, NaN ranking highest, candidates outside the frame never picked with
border="exclude" (even when every score inside is -inf), empty results for empty dimensions,
and meta tensors (shapes only).
"""
import torch
import torch.nn.functional as F


def _unfold_frames(frames: torch.Tensor, kernel_size: int, dilation: int) -> torch.Tensor:
    """(B, T, C, H, W) -> (B, T, C, kernel_size**2, H, W), zero outside the frame."""
    B, T, C, H, W = frames.shape
    if frames.numel() == 0:  # F.unfold rejects empty channels or frames; an empty view keeps the graph
        return frames.unsqueeze(3).expand(B, T, C, kernel_size * kernel_size, H, W)
    pad = (kernel_size // 2) * dilation
    cols = F.unfold(frames.reshape(B * T, C, H, W), kernel_size, dilation=dilation, padding=pad)
    return cols.view(B, T, C, kernel_size * kernel_size, H, W)


def _inside_frame(H: int, W: int, kernel_size: int, dilation: int, device: torch.device) -> torch.Tensor:
    """(kernel_size**2, H, W) bool: True where candidate j of pixel (y, x) lies inside the frame."""
    r = kernel_size // 2
    steps = (torch.arange(kernel_size, device=device) - r) * dilation
    y = torch.arange(H, device=device)[None, :] + steps[:, None]  # (K, H): y + dy
    x = torch.arange(W, device=device)[None, :] + steps[:, None]  # (K, W): x + dx
    inside_y, inside_x = (y >= 0) & (y < H), (x >= 0) & (x < W)
    return (inside_y[:, None, :, None] & inside_x[None, :, None, :]).reshape(kernel_size * kernel_size, H, W)


def local_argmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, kernel_size: int = 9,
                           dilation: int = 1, scale: float = 1.0, border: str = "exclude"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Reference for `vsr_kernels.local_argmax_attention` (same arguments, int window
    parameters, no checks); returns (out, score, index).

    Examples:
        >>> import torch
        >>> from vsr_kernels import reference
        >>> query = torch.randn(1, 4, 6, 6)  # (B, C, H, W)
        >>> key, value = torch.randn(1, 2, 4, 6, 6), torch.randn(1, 2, 3, 6, 6)  # (B, T, C or Cv, H, W)
        >>> out, score, index = reference.local_argmax_attention(query, key, value, kernel_size=3)
        >>> out.shape, score.shape, index.shape
        (torch.Size([1, 2, 3, 6, 6]), torch.Size([1, 2, 6, 6]), torch.Size([1, 2, 6, 6]))
        >>> query = torch.zeros(1, 4, 6, 6)  # every candidate ties: the first one inside the frame wins
        >>> int(reference.local_argmax_attention(query, key, value, 3)[2][0, 0, 0, 0])
        4
    """
    B, T, _, H, W = key.shape
    keys = _unfold_frames(key, kernel_size, dilation)
    scores = scale * torch.einsum("bchw,btckhw->btkhw", query, keys)
    # The best candidate: the lowest j whose score equals the largest (NaN ranking highest),
    # among the candidates inside the frame with border="exclude". A boolean mask, not a -inf
    # fill, decides, since an excluded candidate filled with -inf would tie with in-frame -inf scores.
    ranked = scores
    if border == "exclude":
        inside = _inside_frame(H, W, kernel_size, dilation, query.device)
        ranked = scores.masked_fill(~inside, float("-inf"))
    best = ranked.amax(dim=2, keepdim=True)  # NaN if any candidate is NaN
    is_best = (ranked == best) | ranked.isnan()
    if border == "exclude":
        is_best &= inside
    index = is_best.to(torch.uint8).argmax(dim=2)  # the first True
    score = scores.gather(2, index[:, :, None]).squeeze(2)  # the gradient goes to the selected candidate only
    values = _unfold_frames(value, kernel_size, dilation)
    Cv = value.shape[2]
    picked = values.gather(3, index[:, :, None, None].expand(B, T, Cv, 1, H, W)).squeeze(3)
    out = score[:, :, None] * picked
    return out, score, index
