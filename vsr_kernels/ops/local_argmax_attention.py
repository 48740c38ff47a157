"""Local argmax attention (MANA): argument checks, backend choice, autograd and fake tensors.

Every backend is one registered torch.library op with a registered backward op, so a call
is one dispatcher boundary and torch.compile traces it without graph breaks. The C++ ops
(schemas in csrc/registration.cpp) serve CPU and CUDA tensors; the Triton ops are
registered by vsr_kernels.triton.local_argmax_attention with the same schemas. Both get the
fake and autograd implementations below through this op's OpSpec (see _spec.register_ops).
"""
import torch

from .. import reference
from . import _autocast, _backend, _checks, _spec

NAME = "local_argmax_attention"
BORDERS = ("exclude", "zeros")
# Bounds of the window parameters: candidate numbers j < K*K are int32 in every kernel, and
# dilation is passed as int32 (offsets it multiplies are computed in int64).
MAX_KERNEL_SIZE = 32767  # the largest odd K with K*K < 2**31
MAX_DILATION = 2**31 - 1


def _output_shapes(query, key, value):
    B, T, _, H, W = key.shape
    return (B, T, value.shape[2], H, W), (B, T, H, W)


def _fake_forward(query, key, value, kernel_size, dilation, scale, zero_border):
    out_shape, map_shape = _output_shapes(query, key, value)
    return (value.new_empty(out_shape), query.new_empty(map_shape),
            query.new_empty(map_shape, dtype=torch.int64))


def _fake_backward(grad_out, grad_score, query, key, value, score, index, kernel_size, dilation, scale,
                   zero_border):
    # Every backend returns contiguous gradients, whatever the inputs' layout.
    return query.new_empty(query.shape), key.new_empty(key.shape), value.new_empty(value.shape)


def _setup_context(ctx, inputs, output):
    query, key, value, kernel_size, dilation, scale, zero_border = inputs
    _, score, index = output
    ctx.mark_non_differentiable(index)
    ctx.save_for_backward(query, key, value, score, index)
    ctx.window = (kernel_size, dilation, scale, zero_border)


def _backward(backward_op, ctx, grad_out, grad_score, _grad_index):
    query, key, value, score, index = ctx.saved_tensors
    out_shape, map_shape = _output_shapes(query, key, value)
    if grad_out is None:
        grad_out = value.new_zeros(out_shape)
    if grad_score is None:
        grad_score = query.new_zeros(map_shape)
    grads = backward_op(grad_out, grad_score, query, key, value, score, index, *ctx.window)
    return (*grads, None, None, None, None)


def _reference(query, key, value, kernel_size, dilation, scale, zero_border):
    return reference.local_argmax_attention(query, key, value, kernel_size, dilation, scale,
                                            "zeros" if zero_border else "exclude")


SPEC = _spec.register(_spec.OpSpec(
    name=NAME,
    dtypes=dict.fromkeys(_spec.BACKENDS, _checks.FLOAT_DTYPES),  # every backend: float32 accumulation
    gpu_default="triton",  # the faster GPU backend at the benchmark shapes: see README, "Backend choice"
    reference=_reference,
    triton_module="vsr_kernels.triton.local_argmax_attention",
    fake=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
))


def _check_tensors(query, key, value):
    _checks.tensor("query", query, "BCHW")
    _checks.tensor("key", key, "BTCHW")
    _checks.tensor("value", value, "BTCHW")


def _check(query, key, value, kernel_size, dilation, scale, border):
    for dim, letter in ((0, "B"), (1, "C"), (2, "H"), (3, "W")):
        _checks.same_size("key", key, dim + (dim > 0), letter, "query", query, dim)
    for dim, letter in ((0, "B"), (1, "T"), (3, "H"), (4, "W")):
        _checks.same_size("value", value, dim, letter, "key", key, dim)
    _checks.same_dtype_and_device({"query": query, "key": key, "value": value})
    kernel_size = _checks.square("kernel_size", kernel_size, 1, MAX_KERNEL_SIZE, odd=True)
    dilation = _checks.square("dilation", dilation, 1, MAX_DILATION)
    _checks.choice("border", border, BORDERS)
    return kernel_size, dilation, _checks.real("scale", scale)


def local_argmax_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                           kernel_size: int | tuple[int, int] = 9, dilation: int | tuple[int, int] = 1,
                           scale: float = 1.0, border: str = "exclude", backend: str = "auto"
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One-hot local attention: each query pixel keeps its best-matching key in a window.

    Args:
        query: (B, C, H, W) features of the centre frame.
        key: (B, T, C, H, W) features of the T frames searched (the centre frame included).
        value: (B, T, Cv, H, W) features returned for the selected positions.
        kernel_size: odd window side K in [1, 32767], or a pair of equal ones; candidate
            j = (dy + r) * K + (dx + r), r = K // 2, lies at (y + dy * dilation, x + dx * dilation).
        dilation: spacing of the window's cells, in [1, 2**31 - 1], or a pair of equal ones.
        scale: multiplies every dot product.
        border: "exclude" skips candidates outside the frame; "zeros" scores them 0 with value 0,
            as F.unfold's zero padding does.
        backend: "auto", "reference", "cpu", "cuda" or "triton". "auto" is "cpu" on CPU
            tensors, the faster GPU backend on CUDA tensors, and the reference (with a
            warning saying why) where those are missing from the installation, or on meta tensors.

    Every backend takes float16, bfloat16, float32 and float64 and accumulates in float32
    (float64 for float64). Inside torch.autocast, query, key and value run in the region's
    dtype on GPU and in float32 on CPU (float64 inputs are left alone); outside it their
    dtypes must match. Gradients are first-order: a double backward raises.

    Returns:
        out (B, T, Cv, H, W) = score * value at the selected candidate,
        score (B, T, H, W) = scale * <query, key> of the selected candidate,
        index (B, T, H, W) int64 = the lowest j with the largest score (NaN ranks highest).
        out and score are differentiable in query, key and value; index is not.

    Examples:
        >>> import torch
        >>> from vsr_kernels import local_argmax_attention
        >>> query = torch.randn(2, 16, 32, 32)  # (B, C, H, W)
        >>> key = torch.randn(2, 3, 16, 32, 32)  # (B, T, C, H, W)
        >>> value = torch.randn(2, 3, 8, 32, 32)  # (B, T, Cv, H, W)
        >>> out, score, index = local_argmax_attention(query, key, value, kernel_size=5, scale=16 ** -0.5)
        >>> out.shape, score.shape, index.dtype
        (torch.Size([2, 3, 8, 32, 32]), torch.Size([2, 3, 32, 32]), torch.int64)
        >>> int(index.max()) < 5 * 5
        True
    """
    _check_tensors(query, key, value)
    query, key, value = _autocast.cast_inputs(query, key, value)
    kernel_size, dilation, scale = _check(query, key, value, kernel_size, dilation, scale, border)
    backend = _backend.choose(NAME, backend, query)
    return _backend.op_for(NAME, backend)(query, key, value, kernel_size, dilation, scale, border == "zeros")
