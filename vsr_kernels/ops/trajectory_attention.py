"""Trajectory-aware attention (TTVSR): argument checks, backend choice, autograd and fake tensors.

Every backend is one registered torch.library op pair, as for local_argmax_attention:
`vsr_kernels::trajectory_attention(Tensor query, Tensor key, Tensor[] values, Tensor location)
-> (Tensor[] outs, Tensor score, Tensor index)` and its backward (schemas in
csrc/registration.cpp; the Triton pair, `..._triton` and `..._triton_backward`, is registered by
vsr_kernels.triton.trajectory_attention with the same schemas). The value argument is always a
list at the op level; the public function returns one out or a list, as it was given.
"""
from collections.abc import Sequence

import torch

from .. import reference
from . import _autocast, _backend, _checks, _spec

NAME = "trajectory_attention"
Values = torch.Tensor | Sequence[torch.Tensor]


def _fake_forward(query, key, values, location):
    B, _, _, h, w = key.shape
    return ([v.new_empty((B, v.shape[2], h, w)) for v in values], query.new_empty((B, h, w)),
            query.new_empty((B, h, w), dtype=torch.int64))


def _fake_backward(grad_outs, grad_score, query, key, values, location, index):
    # Every backend returns contiguous gradients, whatever the inputs' layout.
    return query.new_empty(query.shape), key.new_empty(key.shape), [v.new_empty(v.shape) for v in values]


def _setup_context(ctx, inputs, output):
    query, key, values, location = inputs
    _, _, index = output
    ctx.mark_non_differentiable(index)
    ctx.n_values = len(values)
    ctx.save_for_backward(query, key, location, index, *values)


def _backward(backward_op, ctx, grad_outs, grad_score, _grad_index):
    query, key, location, index, *values = ctx.saved_tensors
    B, _, _, h, w = key.shape
    grad_outs = [query.new_zeros((B, v.shape[2], h, w), dtype=v.dtype) if g is None else g
                 for g, v in zip(grad_outs, values)]
    if grad_score is None:
        grad_score = query.new_zeros((B, h, w))
    grad_query, grad_key, grad_values = backward_op(grad_outs, grad_score, query, key, values, location,
                                                    index)
    return grad_query, grad_key, list(grad_values), None


def _reference(query, key, values, location):
    outs, score, index = reference.trajectory_attention(query, key, list(values), location)
    return list(outs), score, index


SPEC = _spec.register(_spec.OpSpec(
    name=NAME,
    dtypes=dict.fromkeys(_spec.BACKENDS, _checks.FLOAT_DTYPES),  # every backend: float32 accumulation
    # Unmeasured (no GPU yet): at the GPU shape there are only B*h*w = 14400 tokens; the
    # CUDA kernels run one thread per token over D channels one at a time, the Triton kernels
    # one lane per token with 16-channel tiles (16 loads in flight per lane), so Triton first.
    gpu_default="triton",
    reference=_reference,
    triton_module="vsr_kernels.triton.trajectory_attention",
    fake=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
))


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
        backend: "auto", "reference", "cpu", "cuda" or "triton". "auto" is "cpu" on CPU
            tensors, "triton" on CUDA tensors (then "cuda"), and the reference (with a warning
            saying why) where those are missing from the installation, or on meta tensors.

    Semantics, for every b, token (i, j) and frame t:
        (x, y) = torch.round(location[b, t, :, i, j]) (nearest, ties to even, in location's dtype).
        If 0 <= x <= w - 1 and 0 <= y <= h - 1: k_t = key[b, t, :, y, x], v_t = value[b, t, :, y, x];
        otherwise (outside the grid, or NaN/inf): k_t and v_t are zero vectors.
        sim_t = < q / max(||q||, 1e-12), k_t / max(||k_t||, 1e-12) > with q = query[b, :, i, j]
        (F.normalize's rule: a zero key gives sim_t = 0, or NaN if q holds NaN/inf).
        index[b, i, j] = the lowest t with the largest sim_t, NaN ranking highest (so the first NaN).
        score[b, i, j] = sim_index, out[b, :, i, j] = v_index.
    Computed in float32 (float64 for float64 inputs) and returned in the inputs' dtype. Every
    backend takes float16, bfloat16, float32 and float64 (query, key and values alike). Inside
    torch.autocast, query, key and values run in the region's dtype on GPU and in float32 on
    CPU (float64 left alone); location keeps its dtype. Gradients are first-order: a double
    backward raises. The fused backends' backward is deterministic (same bits every run and
    for any thread count).

    Gradients: out is differentiable in value (only the chosen token of the chosen frame gets
    gradient), score in query and key (through the normalisation, only the chosen key token).
    Not differentiable in location (rounding is piecewise constant): a location that requires
    grad is accepted and gets no gradient. index is int64 and not differentiable.

    Returns:
        (out, score, index): out (B, Dv, h, w) in value's dtype (a list of outs, one per value,
        when value is a sequence), score (B, h, w) in query's dtype, index (B, h, w) int64.
    """
    _checks.tensor("query", query, "BDHW")
    _checks.tensor("key", key, "BTDHW")
    named = _check_values(value, key)
    many = not isinstance(value, torch.Tensor)
    query, key, *values = _autocast.cast_inputs(query, key, *(v for _, v in named))
    value = values if many else values[0]
    check(query, key, value, location)
    backend = _backend.choose(NAME, backend, query)
    outs, score, index = _backend.op_for(NAME, backend)(query, key, list(values), location)
    return (list(outs) if many else outs[0]), score, index
