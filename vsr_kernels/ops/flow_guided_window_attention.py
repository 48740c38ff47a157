"""Flow-guided window attention (IART's implicit alignment): argument checks, backend choice,
autograd and fake tensors.

Every pixel of the current frame attends, with softmax attention, to a w x w window of the
reference frame placed where the optical flow points; the positional encodings of the window
cells enter as per-cell biases of the keys and values.

Every fused backend is one registered torch.library op with a registered backward op: the C++
ops (schemas in csrc/registration.cpp) serve CPU and CUDA tensors, the Triton ops are
registered by vsr_kernels.triton.flow_guided_window_attention with the same schemas. The
forward returns (out, lse): lse (B, num_heads, H, W), float32 (float64 for float64 inputs), is
the log-sum-exp of each pixel's logits per head, saved for the backward (which recomputes the
probabilities from it) and not differentiable.
"""
import torch

from .. import reference
from . import _autocast, _backend, _checks, _spec

NAME = "flow_guided_window_attention"
MAX_WINDOW_SIZE = 1024  # the C++ and Triton kernels' bound (w * w cells and their offsets fit an int)


def _lse_dtype(query):
    return torch.float64 if query.dtype == torch.float64 else torch.float32


def _fake_forward(query, key, value, flow, window_size, num_heads, key_bias, value_bias, scale):
    B, C, H, W = query.shape
    return query.new_empty(query.shape), query.new_empty((B, num_heads, H, W), dtype=_lse_dtype(query))


def _fake_backward(grad_out, query, key, value, flow, lse, window_size, num_heads, key_bias, value_bias, scale):
    # Every backend returns contiguous gradients; the bias gradients are (w * w, C) whether or
    # not the biases are given (zeros when not).
    cells = window_size * window_size
    C = query.shape[1]
    return (query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape),
            query.new_empty((cells, C)), query.new_empty((cells, C)))


def _setup_context(ctx, inputs, output):
    query, key, value, flow, window_size, num_heads, key_bias, value_bias, scale = inputs
    _, lse = output
    ctx.mark_non_differentiable(lse)
    ctx.save_for_backward(query, key, value, flow, lse, key_bias, value_bias)
    ctx.window = (window_size, num_heads)
    ctx.scale = scale


def _backward(backward_op, ctx, grad_out, _grad_lse):
    query, key, value, flow, lse, key_bias, value_bias = ctx.saved_tensors
    if grad_out is None:
        grad_out = query.new_zeros(query.shape)
    gq, gk, gv, gkb, gvb = backward_op(grad_out, query, key, value, flow, lse, *ctx.window, key_bias, value_bias,
                                       ctx.scale)
    return (gq, gk, gv, None, None, None, gkb if key_bias is not None else None,
            gvb if value_bias is not None else None, None)


def _reference(query, key, value, flow, window_size, num_heads, key_bias, value_bias, scale):
    """The reference as an implementation of the op schema: (out, lse), lse computed apart."""
    out = reference.flow_guided_window_attention(query, key, value, flow, window_size, num_heads, key_bias,
                                                 value_bias, scale)
    return out, None


SPEC = _spec.register(_spec.OpSpec(
    name=NAME,
    dtypes=dict.fromkeys(_spec.BACKENDS, _checks.FLOAT_DTYPES),  # every backend: float32 accumulation
    gpu_default="triton",
    reference=_reference,
    triton_module="vsr_kernels.triton.flow_guided_window_attention",
    fake=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
))


def _autocast_enabled(device_type: str) -> bool:
    """Whether an autocast region is active for `device_type` (never, for devices autocast does
    not know, such as "meta")."""
    try:
        return torch.is_autocast_enabled(device_type)
    except RuntimeError:
        return False


def _check_tensors(query, key, value, flow, key_bias, value_bias):
    _checks.tensor("query", query, "BCHW")
    _checks.tensor("key", key, "BCHW")
    _checks.tensor("value", value, "BCHW")
    _checks.tensor("flow", flow, "BCHW")
    for name, bias in (("key_bias", key_bias), ("value_bias", value_bias)):
        if bias is not None:
            _checks.tensor(name, bias, "NC")


def _check(query, key, value, flow, window_size, num_heads, key_bias, value_bias, scale):
    """Checks everything but the backend; returns (window_size, num_heads, scale or None)."""
    for name, tensor in (("key", key), ("value", value)):
        if tensor.shape != query.shape:
            raise ValueError(f"{name} must have the shape of query {tuple(query.shape)} (B, C, H, W), "
                             f"got shape {tuple(tensor.shape)}")
    B, C, H, W = query.shape
    if flow.shape != (B, 2, H, W):
        raise ValueError(f"flow must have shape (B, 2, H, W) = {(B, 2, H, W)} (channel 0 = dx, 1 = dy; "
                         f"B, H, W from query of shape {tuple(query.shape)}), got shape {tuple(flow.shape)}")
    tensors = {"query": query, "key": key, "value": value}
    for name, bias in (("key_bias", key_bias), ("value_bias", value_bias)):
        if bias is not None:
            tensors[name] = bias
    _checks.same_dtype_and_device(tensors)
    if flow.device != query.device:
        raise ValueError(f"flow must be on the device of query ({query.device}), got {flow.device}")
    window_size = _checks.integer("window_size", window_size, 1, maximum=MAX_WINDOW_SIZE)
    num_heads = _checks.integer("num_heads", num_heads, 1)
    if C < 1 or C % num_heads:
        raise ValueError(f"the channels C = {C} of query (shape {tuple(query.shape)}) must be a positive "
                         f"multiple of num_heads = {num_heads}")
    cells = window_size * window_size
    for name, bias in (("key_bias", key_bias), ("value_bias", value_bias)):
        if bias is not None and bias.shape != (cells, C):
            raise ValueError(f"{name} must have shape (window_size**2, C) = {(cells, C)}, "
                             f"got shape {tuple(bias.shape)}")
    if scale is not None:
        scale = _checks.real("scale", scale)
    return window_size, num_heads, scale


def flow_guided_window_attention(query, key, value, flow, window_size=2, num_heads=1, key_bias=None,
                                 value_bias=None, scale=None, backend="auto"):
    """Each pixel attends to a window_size x window_size window of the reference frame placed by flow.

    For pixel (y, x) of batch item b and head h (head h = channels [h*D, (h+1)*D), D = C / num_heads):

        base = (floor(y + dy), floor(x + dx)),  dx = flow[b, 0, y, x], dy = flow[b, 1, y, x]
        cell n = (a - lo) * w + (b' - lo) for a, b' in lo .. lo + w - 1, lo = -((w - 1) // 2),
                 at (clamp(base_y + a, 0, H - 1), clamp(base_x + b', 0, W - 1))   (replicate border)
        logit_n = scale * <query_h(y, x), key_h(cell n) + key_bias[n]_h>
        p = softmax_n(logit)
        out_h(y, x) = sum_n p_n * (value_h(cell n) + value_bias[n]_h)

    w = 2 gives the four bilinear neighbours of the flow target (IART); w = 3 a 3 x 3 window
    centred on its floor. The coordinates y + dy, x + dx are computed in float32 (float64 for
    float64 flow). A pixel whose flow is not finite gets NaN in every channel (its window is
    undefined; nothing outside the frame is read) and passes no gradient.

    Args:
        query: (B, C, H, W) features of the current frame (the queries, already projected;
            IART adds the encoding of the sub-pixel offset y + dy - base_y, x + dx - base_x
            before the projection).
        key, value: (B, C, H, W) features of the reference frame, already projected (without
            bias: the bias goes into key_bias / value_bias).
        flow: (B, 2, H, W) displacement from each current-frame pixel to its match in the
            reference frame, channel 0 = dx, channel 1 = dy; any floating dtype; not differentiated.
        window_size: w >= 1.
        num_heads: heads, dividing C.
        key_bias, value_bias: (w * w, C) or None, added to the keys / values of cell n. They
            carry the projected positional encodings of the window cells: a projection of
            x + PE_n is W x + (W PE_n + b).
        scale: multiplies the dot products; None means head_dim ** -0.5.
        backend: "auto", "reference", "cpu", "cuda" or "triton". "auto" is "cpu" on CPU
            tensors, the faster GPU backend on CUDA tensors, and the reference (with a warning
            saying why) where those are missing from the installation, or on meta tensors.

    Every backend takes float16, bfloat16, float32 and float64 and accumulates in float32
    (float64 for float64). Fused backends store only the log-sum-exp per pixel and head for
    the backward, which is deterministic. Gradients are first-order on the fused backends.

    Inside torch.autocast, query, key, value and the biases run in the region's dtype on GPU
    and in float32 on CPU (float64 is left alone); outside it their dtypes must match.

    Returns:
        out (B, C, H, W), differentiable in query, key, value, key_bias and value_bias.
    """
    _check_tensors(query, key, value, flow, key_bias, value_bias)
    autocast = _autocast_enabled(query.device.type)
    if autocast:
        query, key, value = _autocast.cast_inputs(query, key, value)
        if key_bias is not None:
            (key_bias,) = _autocast.cast_inputs(key_bias)
        if value_bias is not None:
            (value_bias,) = _autocast.cast_inputs(value_bias)
    window_size, num_heads, scale = _check(query, key, value, flow, window_size, num_heads, key_bias,
                                           value_bias, scale)
    backend = _backend.choose(NAME, backend, query)
    if backend != "reference":
        if scale is None:
            scale = (query.shape[1] // num_heads) ** -0.5
        return _backend.op_for(NAME, backend)(query, key, value, flow, window_size, num_heads, key_bias,
                                              value_bias, scale)[0]
    args = (query, key, value, flow, window_size, num_heads, key_bias, value_bias, scale)
    if not autocast:
        return reference.flow_guided_window_attention(*args)
    # The reference's own matmuls would be autocast again: run it in the dtype chosen above,
    # as a fused kernel would.
    with torch.autocast(query.device.type, enabled=False):
        return reference.flow_guided_window_attention(*args)
