"""Local argmax attention (MANA): argument checks, backend choice, autograd and fake tensors.

Every backend is one registered torch.library op with a registered backward op, so a call
is one dispatcher boundary and torch.compile traces it without graph breaks. The C++ ops
(schemas in csrc/registration.cpp) serve CPU and CUDA tensors; the Triton ops are
registered by vsr_kernels.triton.local_argmax_attention with the same schemas and share
the autograd and fake implementations below.
"""
import torch

from .. import _extension, reference
from . import _autocast, _backend, _checks

BORDERS = ("exclude", "zeros")

# The faster GPU backend at the benchmark shapes: see README, "Backend choice".
GPU_DEFAULT = "triton"


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


def _autograd_backward(backward_op):
    def backward(ctx, grad_out, grad_score, _grad_index):
        query, key, value, score, index = ctx.saved_tensors
        out_shape, map_shape = _output_shapes(query, key, value)
        if grad_out is None:
            grad_out = value.new_zeros(out_shape)
        if grad_score is None:
            grad_score = query.new_zeros(map_shape)
        grads = backward_op(grad_out, grad_score, query, key, value, score, index, *ctx.window)
        return (*grads, None, None, None, None)

    return backward


def register_autograd_and_fake(forward: str, backward: str) -> None:
    """Registers fake tensors and autograd for a (forward, backward) pair of ops with the
    local_argmax_attention schemas, given by qualified name ("vsr_kernels::...")."""
    torch.library.register_fake(forward)(_fake_forward)
    torch.library.register_fake(backward)(_fake_backward)
    namespace, name = backward.split("::")
    backward_op = getattr(getattr(torch.ops, namespace), name)
    torch.library.register_autograd(forward, _autograd_backward(backward_op), setup_context=_setup_context)


if _extension.LOAD_ERROR is None:
    register_autograd_and_fake("vsr_kernels::local_argmax_attention",
                               "vsr_kernels::local_argmax_attention_backward")


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
    _checks.integer("kernel_size", kernel_size, 1, odd=True)
    _checks.integer("dilation", dilation, 1)
    _checks.choice("border", border, BORDERS)
    return _checks.real("scale", scale)


def local_argmax_attention(query, key, value, kernel_size=9, dilation=1, scale=1.0, border="exclude",
                           backend="auto"):
    """One-hot local attention: each query pixel keeps its best-matching key in a window.

    Args:
        query: (B, C, H, W) features of the centre frame.
        key: (B, T, C, H, W) features of the T frames searched (the centre frame included).
        value: (B, T, Cv, H, W) features returned for the selected positions.
        kernel_size: odd window side K >= 1; candidate j = (dy + r) * K + (dx + r), r = K // 2,
            lies at (y + dy * dilation, x + dx * dilation).
        dilation: spacing of the window's cells, >= 1.
        scale: multiplies every dot product.
        border: "exclude" skips candidates outside the frame; "zeros" scores them 0 with value 0,
            as F.unfold's zero padding does.
        backend: "auto", "reference", "cpu", "cuda" or "triton".

    Inside torch.autocast, query, key and value run in the region's dtype on GPU and in
    float32 on CPU (float64 inputs are left alone); outside it their dtypes must match.

    Returns:
        out (B, T, Cv, H, W) = score * value at the selected candidate,
        score (B, T, H, W) = scale * <query, key> of the selected candidate,
        index (B, T, H, W) int64 = the lowest j with the largest score (NaN ranks highest).
        out and score are differentiable in query, key and value; index is not.
    """
    _check_tensors(query, key, value)
    query, key, value = _autocast.cast_inputs(query, key, value)
    scale = _check(query, key, value, kernel_size, dilation, scale, border)
    backend = _backend.choose(backend, query, GPU_DEFAULT)
    if backend == "reference":
        return reference.local_argmax_attention(query, key, value, kernel_size, dilation, scale, border)
    if backend == "triton":
        from ..triton import local_argmax_attention as triton_module

        op = triton_module.local_argmax_attention
    else:
        op = torch.ops.vsr_kernels.local_argmax_attention
    return op(query, key, value, kernel_size, dilation, scale, border == "zeros")
