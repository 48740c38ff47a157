"""Deformable convolution (DCNv1 / modulated DCNv2), torchvision.ops.deform_conv2d's contract:
argument checks, backend choice, autograd and fake tensors, and the public function.

Every backend is one registered torch.library op with a registered backward op (schemas in
csrc/registration.cpp for the C++ "cpu"/"cuda" ops; vsr_kernels.triton.deform_conv2d registers
the Triton ones with the same schemas), so a call is one dispatcher boundary and
torch.compile traces it without graph breaks. Both get the fake and autograd below through
this op's OpSpec.
"""
import numbers

import torch

from .. import reference
from ..reference.deform_conv2d import output_size
from . import _autocast, _backend, _checks, _spec

NAME = "deform_conv2d"


def _fake_forward(input, offset, weight, mask, bias, stride, padding, dilation):
    B, _, Ho, Wo = offset.shape
    return input.new_empty((B, weight.shape[0], Ho, Wo))


def _fake_backward(grad_out, input, offset, weight, mask, bias, stride, padding, dilation):
    # Every backend returns contiguous gradients; grad_mask is (0,) without a mask, grad_bias
    # is (C_out,) whether or not there is a bias.
    grad_mask = input.new_empty(mask.shape if mask is not None else (0,))
    return (input.new_empty(input.shape), input.new_empty(offset.shape), input.new_empty(weight.shape), grad_mask,
            input.new_empty((weight.shape[0],)))


def _setup_context(ctx, inputs, output):
    input, offset, weight, mask, bias, stride, padding, dilation = inputs
    ctx.save_for_backward(input, offset, weight, mask, bias)
    ctx.geometry = (stride, padding, dilation)


def _backward(backward_op, ctx, grad_out):
    input, offset, weight, mask, bias = ctx.saved_tensors
    grad_input, grad_offset, grad_weight, grad_mask, grad_bias = backward_op(
        grad_out.contiguous(), input, offset, weight, mask, bias, *ctx.geometry)
    return (grad_input, grad_offset, grad_weight, grad_mask if mask is not None else None,
            grad_bias if bias is not None else None, None, None, None)


def _reference(input, offset, weight, mask, bias, stride, padding, dilation):
    return reference.deform_conv2d(input, offset, weight, bias, stride, padding, dilation, mask)


SPEC = _spec.register(_spec.OpSpec(
    name=NAME,
    dtypes=dict.fromkeys(_spec.BACKENDS, _checks.FLOAT_DTYPES),  # every backend: float32 accumulation
    gpu_default="triton",
    reference=_reference,
    triton_module="vsr_kernels.triton.deform_conv2d",
    fake=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
))


def pair(name: str, value, minimum: int) -> tuple[int, int]:
    """An int or a pair of ints (height, width), each >= minimum, as a tuple of two ints."""
    items = tuple(value) if isinstance(value, (tuple, list)) else (value, value)
    if len(items) != 2:
        raise ValueError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
    for v in items:
        if isinstance(v, bool) or not isinstance(v, numbers.Integral):
            raise TypeError(f"{name} must be an int or a pair of ints (height, width), got {value!r}")
        if v < minimum:
            raise ValueError(f"{name} must be >= {minimum} (an int or a pair of ints), got {value!r}")
    return int(items[0]), int(items[1])


def check(input, offset, weight, bias, stride, padding, dilation, mask):
    """Every argument check of `deform_conv2d`, before any computation.

    Returns (stride, padding, dilation) as pairs, groups and offset_groups."""
    _checks.tensor("input", input, "BCHW")
    _checks.tensor("offset", offset, "BOHW")
    _checks.tensor("weight", weight, "OCHW")
    stride, padding, dilation = pair("stride", stride, 1), pair("padding", padding, 0), pair("dilation", dilation, 1)
    B, C_in, H, W = input.shape
    C_out, C_in_g, kh, kw = weight.shape
    if kh < 1 or kw < 1:
        raise ValueError(f"weight must have a kernel of at least 1 x 1 (kh, kw in dims 2, 3), "
                         f"got shape {tuple(weight.shape)}")
    if C_in < 1 or C_in_g < 1:
        raise ValueError(f"input and weight need at least one input channel, got input of shape "
                         f"{tuple(input.shape)} and weight of shape {tuple(weight.shape)}")
    if C_in % C_in_g != 0:
        raise ValueError(f"input channels ({C_in}) must be a multiple of weight.shape[1] ({C_in_g}, the input "
                         f"channels per group): groups = C_in / weight.shape[1]; got input of shape "
                         f"{tuple(input.shape)} and weight of shape {tuple(weight.shape)}")
    groups = C_in // C_in_g
    if C_out < 1 or C_out % groups != 0:
        raise ValueError(f"weight's output channels ({C_out}) must be a positive multiple of groups ({groups} "
                         f"= C_in {C_in} / weight.shape[1] {C_in_g}), got weight of shape {tuple(weight.shape)}")
    K = kh * kw
    if offset.shape[1] < 2 * K or offset.shape[1] % (2 * K) != 0:
        raise ValueError(f"offset must have 2*kh*kw*offset_groups channels (2*{kh}*{kw} = {2 * K} per offset "
                         f"group: (dy, dx) per kernel point) in dim 1, got shape {tuple(offset.shape)}")
    offset_groups = offset.shape[1] // (2 * K)
    if C_in % offset_groups != 0:
        raise ValueError(f"input channels ({C_in}) must be divisible by the offset groups ({offset_groups} = "
                         f"offset.shape[1] {offset.shape[1]} / (2*{kh}*{kw})), got input of shape "
                         f"{tuple(input.shape)} and offset of shape {tuple(offset.shape)}")
    H_out, W_out = output_size(H, W, (kh, kw), stride, padding, dilation)
    if H_out < 1 or W_out < 1:
        raise ValueError(f"the output would be empty ({H_out} x {W_out}): input of {H} x {W} with padding "
                         f"{padding} is smaller than the dilated kernel {kh} x {kw} (dilation {dilation})")
    _checks.same_size("offset", offset, 0, "B", "input", input, 0)
    if tuple(offset.shape[2:]) != (H_out, W_out):
        raise ValueError(f"offset must have the output's spatial size (H_out, W_out) = ({H_out}, {W_out}) in "
                         f"dims 2, 3 (from input {tuple(input.shape)}, weight {tuple(weight.shape)}, stride "
                         f"{stride}, padding {padding}, dilation {dilation}), got shape {tuple(offset.shape)}")
    tensors = {"input": input, "offset": offset, "weight": weight}
    if bias is not None:
        _checks.tensor("bias", bias, "O")
        if bias.shape[0] != C_out:
            raise ValueError(f"bias must have shape ({C_out},) (weight's output channels), "
                             f"got shape {tuple(bias.shape)}")
        tensors["bias"] = bias
    if mask is not None:
        _checks.tensor("mask", mask, "BMHW")
        _checks.same_size("mask", mask, 0, "B", "input", input, 0)
        if mask.shape[1] != offset_groups * K:
            raise ValueError(f"mask must have kh*kw*offset_groups = {kh}*{kw}*{offset_groups} = "
                             f"{offset_groups * K} channels in dim 1, got shape {tuple(mask.shape)}")
        if tuple(mask.shape[2:]) != (H_out, W_out):
            raise ValueError(f"mask must have the output's spatial size (H_out, W_out) = ({H_out}, {W_out}) "
                             f"in dims 2, 3, got shape {tuple(mask.shape)}")
        tensors["mask"] = mask
    _checks.same_dtype_and_device(tensors)
    return stride, padding, dilation, groups, offset_groups


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
                  stride=1, padding=0, dilation=1, mask: torch.Tensor | None = None,
                  backend: str = "auto") -> torch.Tensor:
    """Deformable convolution v1, or modulated deformable convolution v2 when `mask` is given:
    `torchvision.ops.deform_conv2d`'s signature, layout and semantics.

    Args:
        input: (B, C_in, H, W).
        offset: (B, 2*G*kh*kw, H_out, W_out); channel 2*(g*kh*kw + i*kw + j) is the row offset dy
            and the next channel the column offset dx of kernel point (i, j) of offset group g
            (G = offset.shape[1] // (2*kh*kw) offset groups; input channel c belongs to offset
            group c // (C_in / G)).
        weight: (C_out, C_in / groups, kh, kw); groups = C_in // weight.shape[1].
        bias: (C_out,) or None.
        stride, padding, dilation: int or (height, width) pair; stride, dilation >= 1, padding >= 0.
        mask: (B, G*kh*kw, H_out, W_out) or None (no modulation, DCNv1); channel g*kh*kw + i*kw + j
            multiplies the samples of kernel point (i, j) of offset group g.
        backend: "auto", "reference", "cpu", "cuda" or "triton". "auto" is "cpu" on CPU tensors,
            the faster GPU backend on CUDA tensors, and the reference (with a warning saying why)
            where those are missing from the installation, or on meta tensors.

    Semantics: H_out = (H + 2*ph - dh*(kh-1) - 1) // sh + 1 (W_out alike);
        out[b, o, oy, ox] = bias[o] + sum over c in o's group, i < kh, j < kw of
            weight[o, c mod (C_in/groups), i, j] * mask[b, g*kh*kw + k, oy, ox] * sample(input[b, c], y, x)
        with k = i*kw + j, g = c // (C_in/G), y = oy*sh - ph + i*dh + dy, x = ox*sw - pw + j*dw + dx.
        sample(v, y, x) is 0 if y <= -1, y >= H, x <= -1 or x >= W; otherwise bilinear
        interpolation of the four neighbours floor(y)+{0,1}, floor(x)+{0,1}, a neighbour outside
        the image reading 0 (torchvision's rule). A NaN offset gives a NaN output.
    Differentiable in input, offset, mask, weight and bias (at an integer sample coordinate the
    offset gradient is the one-sided derivative towards +1, as torchvision's).
    dtypes: float16, bfloat16, float32, float64, all tensors alike; computed in float32
    (float64 for float64) and returned in input's dtype. Under torch.autocast the floating inputs
    other than float64 run in the region's dtype on GPU and in float32 on CPU.

    Returns:
        (B, C_out, H_out, W_out).
    """
    present = [t for t in (input, offset, weight, bias, mask) if isinstance(t, torch.Tensor)]
    if isinstance(input, torch.Tensor) and all(isinstance(t, torch.Tensor) or t is None
                                               for t in (offset, weight, bias, mask)):
        cast = iter(_autocast.cast_inputs(*present))
        input, offset, weight = next(cast), next(cast), next(cast)
        bias = next(cast) if bias is not None else None
        mask = next(cast) if mask is not None else None
    stride, padding, dilation, _, _ = check(input, offset, weight, bias, stride, padding, dilation, mask)
    backend = _backend.choose(NAME, backend, input)
    return _backend.op_for(NAME, backend)(input, offset, weight, mask, bias, list(stride), list(padding),
                                          list(dilation))
