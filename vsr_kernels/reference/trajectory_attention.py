"""Naive trajectory-aware attention, written the way TTVSR's code does it.

TTVSR (Liu et al., CVPR 2022) lets every token of the current frame look only at the tokens
that lie on its motion trajectory in T earlier frames. Its code `grid_sample`s all T key and
value token maps at the trajectory (mode="nearest", padding_mode="zeros",
align_corners=True), normalises, multiplies, takes the max over t and gathers the chosen
value. This module does the same: it materialises the T sampled key and value maps, which is
exactly the cost the fused kernels avoid. It is the oracle of the tests and the baseline of
the benchmarks, deliberately not optimised; autograd provides the backward.

Where the sampling is rounded
-----------------------------
The op's contract rounds each location to the nearest token with ties to even
(`torch.round`), and a rounded location outside the h x w grid (or a NaN one) reads zero
vectors. `grid_sample` alone does not implement that contract, for two reasons found by
probing it (torch 2.13, CPU):

- At .5 positions it does not follow `torch.round`. Its nearest mode itself rounds ties to
  even (`nearbyint`), but TTVSR's normalisation x -> 2x / (w - 1) - 1 and grid_sample's
  un-normalisation g -> (g + 1) / 2 * (w - 1) round-trip the coordinate through inexact
  arithmetic, which moves a .5 position one ulp up or down. Over the widths w = 2..199 and
  every position k + .5, about 11% of them (2145 of 20097 in float32, 2258 in float64) land
  on the other neighbour than `torch.round` picks, depending on w and the dtype
  (e.g. w = 12, x = 0.5 picks column 1; w = 13, x = 2.5 picks 3 in float64).
- On a grid of width (or height) 1, align_corners=True un-normalises every coordinate to 0,
  so every location, however far outside, reads column 0 instead of zeros.

Integer positions do survive the round trip exactly (checked for every position of every 7th
width from 1 to 2997, in float32). So this reference first rounds the locations with
`torch.round` in their own dtype, marks the rounded locations outside the grid (or NaN) and
points them at token (0, 0), lets `grid_sample` sample at those integer positions (in float32,
float64 for float64 inputs, so the coordinates are exact whatever the feature dtype), and
zeroes what it read at the outside locations with `torch.where` (so a NaN/inf token under an
outside location does not leak). Everything else is TTVSR's arithmetic.
"""
from collections.abc import Sequence

import torch
import torch.nn.functional as F

Values = torch.Tensor | Sequence[torch.Tensor]


def _compute_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _grid(location: torch.Tensor, h: int, w: int, dtype: torch.dtype):
    """location (B, T, 2, h, w) -> (grid (B*T, h, w, 2) in `dtype`, inside (B, T, h, w) bool).

    The grid holds grid_sample coordinates (TTVSR's normalisation) of the rounded locations,
    with every outside or NaN location replaced by token (0, 0)."""
    rounded = torch.round(location)
    x, y = rounded[:, :, 0], rounded[:, :, 1]
    inside = (x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)  # False for NaN
    x = torch.where(inside, x, torch.zeros_like(x)).to(dtype)
    y = torch.where(inside, y, torch.zeros_like(y)).to(dtype)
    grid = torch.stack((2.0 * x / max(w - 1, 1) - 1.0, 2.0 * y / max(h - 1, 1) - 1.0), dim=-1)
    return grid.flatten(0, 1), inside


def _sample(maps: torch.Tensor, grid: torch.Tensor, inside: torch.Tensor) -> torch.Tensor:
    """maps (B, T, C, h, w) read at the trajectory -> (B, T, C, h, w) in grid's dtype, zero outside."""
    B, T, C, h, w = maps.shape
    if h == 0 or w == 0:  # grid_sample refuses empty maps; there is nothing to read
        return maps.to(grid.dtype)
    flat = maps.reshape(B * T, C, h, w).to(grid.dtype)
    sampled = F.grid_sample(flat, grid, mode="nearest", padding_mode="zeros", align_corners=True)
    sampled = sampled.view(B, T, C, h, w)
    zero = torch.zeros((), dtype=sampled.dtype, device=sampled.device)
    return torch.where(inside[:, :, None], sampled, zero)


def trajectory_attention(query: torch.Tensor, key: torch.Tensor, value: Values, location: torch.Tensor):
    """Reference for `vsr_kernels.trajectory_attention`.

    Args:
        query: (B, D, h, w) tokens of the current frame.
        key: (B, T, D, h, w) tokens of T earlier frames, T >= 1.
        value: (B, T, Dv, h, w), or a sequence of such tensors (Dv may differ between them).
        location: (B, T, 2, h, w) floating point; channel 0 = x (column), 1 = y (row) in
            token-grid coordinates of where the trajectory ending at each token was in frame t.

    Returns:
        (out, score, index), out (B, Dv, h, w) (a list of them when value is a sequence),
        score (B, h, w) in query's dtype, index (B, h, w) int64: the docstring of
        `vsr_kernels.trajectory_attention` states the exact contract.
    """
    many = not isinstance(value, torch.Tensor)
    values = list(value) if many else [value]
    B, _, _, h, w = key.shape
    dtype = _compute_dtype(query.dtype)
    grid, inside = _grid(location, h, w, dtype)
    keys = _sample(key, grid, inside)  # (B, T, D, h, w)
    # F.normalize: x / max(||x||, 1e-12); a zero (outside) key stays zero, so its sim is 0.
    q = F.normalize(query.to(dtype), dim=1)
    k = F.normalize(keys, dim=2)
    # TTVSR's matmul of the normalised sampled keys with the normalised query, per token.
    sim = torch.matmul(k.permute(0, 3, 4, 1, 2), q.permute(0, 2, 3, 1)[..., None])[..., 0]  # (B, h, w, T)
    # TTVSR's torch.max over t, with its tie rules spelled out: torch.max documents the first
    # maximal index for ties but not which NaN it reports, so NaN is ranked highest here and
    # the lowest t among the maxima is taken explicitly (on every device).
    ranked = torch.where(sim.isnan(), torch.full_like(sim, float("inf")), sim)
    best = ranked.amax(dim=-1, keepdim=True)
    frames = torch.arange(sim.shape[-1], device=sim.device)
    index = torch.where(ranked == best, frames, sim.shape[-1]).amin(dim=-1)
    score = sim.gather(-1, index[..., None])[..., 0]
    outs = []
    for v in values:
        picked = _sample(v, grid, inside)  # (B, T, Dv, h, w)
        gathered = picked.gather(1, index[:, None, None].expand(B, 1, v.shape[2], h, w)).squeeze(1)
        outs.append(gathered.to(v.dtype))
    score = score.to(query.dtype)
    return (outs if many else outs[0]), score, index
