"""Trajectory-aware attention (TTVSR): argument checks and the public function.

For now every tensor goes to the reference (`vsr_kernels.reference.trajectory_attention`);
the fused backends (cpu, cuda, triton) are wired through the op-spec registry later, behind
the same public function and the same checks.
"""
from collections.abc import Sequence

import torch

from .. import reference
from . import _checks

Values = torch.Tensor | Sequence[torch.Tensor]

# Backends this op accepts today; "cpu", "cuda" and "triton" are named in the error message.
AVAILABLE_BACKENDS = ("auto", "reference")
FUSED_BACKENDS = ("cpu", "cuda", "triton")


def _check_backend(backend) -> str:
    if backend in FUSED_BACKENDS:
        raise ValueError(f"backend {backend!r} of trajectory_attention is not built yet (the fused cpu, "
                         f"cuda and triton kernels are still to come); use backend='auto' or 'reference'")
    return _checks.choice("backend", backend, AVAILABLE_BACKENDS)


def _check_values(value, key: torch.Tensor):
    """The value tensors as a list, each checked against key; raises for an empty or mixed sequence."""
    if isinstance(value, torch.Tensor):
        named = [("value", value)]
    elif isinstance(value, (list, tuple)):
        if not value:
            raise ValueError("value must be a tensor or a non-empty sequence of tensors, "
                             "got an empty sequence")
        named = [(f"value[{i}]", v) for i, v in enumerate(value)]
    else:
        raise TypeError(f"value must be a torch.Tensor or a list/tuple of them, got {type(value).__name__}")
    for name, v in named:
        _checks.tensor(name, v, "BTCHW")
        for dim, letter in ((0, "B"), (1, "T"), (3, "h"), (4, "w")):
            _checks.same_size(name, v, dim, letter, "key", key, dim)
    return named


def check(query, key, value, location):
    """Every argument check of `trajectory_attention`, before any computation."""
    _checks.tensor("query", query, "BDHW")
    _checks.tensor("key", key, "BTDHW")
    values = _check_values(value, key)
    if not isinstance(location, torch.Tensor):
        raise TypeError(f"location must be a torch.Tensor of shape (B, T, 2, h, w), "
                        f"got {type(location).__name__}")
    if not location.is_floating_point():
        raise TypeError(f"location must have a floating-point dtype (token-grid coordinates), "
                        f"got {location.dtype}")
    _checks.tensor("location", location, "BT2HW")
    for dim, letter in ((0, "B"), (1, "D"), (2, "h"), (3, "w")):
        _checks.same_size("key", key, dim + (dim > 0), letter, "query", query, dim)
    if key.shape[1] < 1:
        raise ValueError(f"key must hold T >= 1 frames in dim 1, got shape {tuple(key.shape)}")
    for dim, letter in ((0, "B"), (1, "T"), (3, "h"), (4, "w")):
        _checks.same_size("location", location, dim, letter, "key", key, dim)
    if location.shape[2] != 2:
        raise ValueError(f"location must have 2 channels (x, y) in dim 2, got shape {tuple(location.shape)}")
    _checks.same_dtype_and_device({"query": query, "key": key, **dict(values)})
    if location.device != query.device:
        raise ValueError(f"location must be on the device of query ({query.device}), got {location.device}")


def trajectory_attention(query: torch.Tensor, key: torch.Tensor, value: Values, location: torch.Tensor,
                         backend: str = "auto"):
    """Trajectory-aware attention (TTVSR): each query token keeps the best-matching token on its
    trajectory in T earlier frames (hard attention) and the cosine similarity of that match (soft).

    Args:
        query: (B, D, h, w) tokens of the current frame on an h x w token grid (D = C*s*s for
            s x s tokens of C channels).
        key: (B, T, D, h, w) tokens of T >= 1 earlier frames.
        value: (B, T, Dv, h, w) tokens returned for the chosen frame, or a list/tuple of such
            tensors (each with its own Dv) that share one index (TTVSR's three token scales).
        location: (B, T, 2, h, w), any floating dtype (independent of query's; float32 is exact
            for grids up to 2**24 tokens wide): channel 0 = x (column), 1 = y (row), in
            token-grid coordinates, where the trajectory ending at token (i, j) of the current
            frame was in frame t.
        backend: "auto" or "reference" (the fused "cpu", "cuda" and "triton" backends are not
            built yet and raise a ValueError).

    Semantics, for every b, token (i, j) and frame t:
        (x, y) = torch.round(location[b, t, :, i, j]) (nearest, ties to even, in location's dtype).
        If 0 <= x <= w - 1 and 0 <= y <= h - 1: k_t = key[b, t, :, y, x], v_t = value[b, t, :, y, x];
        otherwise (outside the grid, or NaN/inf): k_t and v_t are zero vectors.
        sim_t = < q / max(||q||, 1e-12), k_t / max(||k_t||, 1e-12) > with q = query[b, :, i, j]
        (F.normalize's rule: a zero key gives sim_t = 0, or NaN if q holds NaN/inf).
        index[b, i, j] = the lowest t with the largest sim_t, NaN ranking highest (so the first NaN).
        score[b, i, j] = sim_index, out[b, :, i, j] = v_index.
    Computed in float32 (float64 for float64 inputs) and returned in the inputs' dtype.

    Gradients: out is differentiable in value (only the chosen token of the chosen frame gets
    gradient), score in query and key (through the normalisation, only the chosen key token).
    Not differentiable in location (rounding is piecewise constant): a location that requires
    grad is accepted and gets no gradient. index is int64 and not differentiable.

    Returns:
        (out, score, index): out (B, Dv, h, w) in value's dtype (a list of outs, one per value,
        when value is a sequence), score (B, h, w) in query's dtype, index (B, h, w) int64.
    """
    check(query, key, value, location)
    _check_backend(backend)
    return reference.trajectory_attention(query, key, value, location)
