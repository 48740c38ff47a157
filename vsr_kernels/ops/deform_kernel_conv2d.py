"""Deformable-kernel convolution (DKSAN's DKC; Gao et al., ICLR 2020), depthwise: argument
checks, backend choice, autograd and fake tensors, and the public function.

Every backend is one registered torch.library op with a registered backward op (schemas in
csrc/registration.cpp for the C++ "cpu"/"cuda" ops; vsr_kernels.triton.deform_kernel_conv2d
registers the Triton ones with the same schemas); both get the fake and autograd below through
this op's OpSpec.
"""
import torch

from .. import reference
from ..reference.deform_conv2d import output_size
from . import _autocast, _backend, _checks, _spec
from .deform_conv2d import pair

NAME = "deform_kernel_conv2d"


def _fake_forward(input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation):
    B, C = input.shape[:2]
    return input.new_empty((B, C, kernel_offset.shape[2], kernel_offset.shape[3]))


def _fake_backward(grad_out, input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding,
                   dilation):
    # Every backend returns contiguous gradients; grad_offset and grad_mask are (0,) without an
    # offset or a mask, grad_bias is (C,) whether or not there is a bias.
    def like(t):
        return input.new_empty(t.shape if t is not None else (0,))

    return (input.new_empty(input.shape), input.new_empty(weight.shape), input.new_empty(kernel_offset.shape),
            like(offset), like(mask), input.new_empty((input.shape[1],)))


def _setup_context(ctx, inputs, output):
    input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation = inputs
    ctx.save_for_backward(input, weight, kernel_offset, offset, mask, bias)
    ctx.geometry = (kernel_size, stride, padding, dilation)


def _backward(backward_op, ctx, grad_out):
    input, weight, kernel_offset, offset, mask, bias = ctx.saved_tensors
    grads = backward_op(grad_out.contiguous(), input, weight, kernel_offset, offset, mask, bias, *ctx.geometry)
    grad_input, grad_weight, grad_kernel_offset, grad_offset, grad_mask, grad_bias = grads
    return (grad_input, grad_weight, grad_kernel_offset, grad_offset if offset is not None else None,
            grad_mask if mask is not None else None, grad_bias if bias is not None else None,
            None, None, None, None)


def _reference(input, weight, kernel_offset, offset, mask, bias, kernel_size, stride, padding, dilation):
    return reference.deform_kernel_conv2d(input, weight, kernel_offset, kernel_size, offset, mask, bias, stride,
                                          padding, dilation)


SPEC = _spec.register(_spec.OpSpec(
    name=NAME,
    dtypes=dict.fromkeys(_spec.BACKENDS, _checks.FLOAT_DTYPES),  # every backend: float32 accumulation
    gpu_default="triton",
    reference=_reference,
    triton_module="vsr_kernels.triton.deform_kernel_conv2d",
    fake=_fake_forward,
    fake_backward=_fake_backward,
    setup_context=_setup_context,
    backward=_backward,
))


def _groups(name: str, tensor: torch.Tensor, per_group: int, what: str, channels: int) -> int:
    """The number of groups of `tensor` (dim 1 = groups * per_group), which must divide `channels`."""
    n = tensor.shape[1]
    if n < per_group or n % per_group != 0:
        raise ValueError(f"{name} must have {what} channels in dim 1 ({per_group} per group), "
                         f"got shape {tuple(tensor.shape)}")
    groups = n // per_group
    if channels % groups != 0:
        raise ValueError(f"input channels ({channels}) must be divisible by the groups of {name} ({groups} = "
                         f"{n} / {per_group}), got {name} of shape {tuple(tensor.shape)}")
    return groups


def _output_shaped(name: str, tensor: torch.Tensor, input: torch.Tensor, size: tuple[int, int]) -> None:
    _checks.same_size(name, tensor, 0, "B", "input", input, 0)
    if tuple(tensor.shape[2:]) != size:
        raise ValueError(f"{name} must have the output's spatial size (H_out, W_out) = {size} in dims 2, 3, "
                         f"got shape {tuple(tensor.shape)}")


def check(input, weight, kernel_offset, kernel_size, offset, mask, bias, stride, padding, dilation):
    """Every argument check of `deform_kernel_conv2d`, before any computation.

    Returns kernel_size, stride, padding and dilation as pairs."""
    _checks.tensor("input", input, "BCHW")
    _checks.tensor("weight", weight, "C1HW")
    _checks.tensor("kernel_offset", kernel_offset, "BOHW")
    kernel_size = pair("kernel_size", kernel_size, 1)
    stride, padding, dilation = pair("stride", stride, 1), pair("padding", padding, 0), pair("dilation", dilation, 1)
    B, C, H, W = input.shape
    kh, kw = kernel_size
    K = kh * kw
    if C < 1:
        raise ValueError(f"input needs at least one channel, got shape {tuple(input.shape)}")
    if weight.shape[0] != C or weight.shape[1] != 1:
        raise ValueError(f"weight must have shape (C, 1, Sh, Sw) = ({C}, 1, Sh, Sw) (one kernel scope per input "
                         f"channel: the convolution is depthwise), got shape {tuple(weight.shape)}")
    if weight.shape[2] < kh or weight.shape[3] < kw:
        raise ValueError(f"weight's kernel scope (Sh, Sw) = {tuple(weight.shape[2:])} must be at least "
                         f"kernel_size {kernel_size}, got weight of shape {tuple(weight.shape)}")
    H_out, W_out = output_size(H, W, kernel_size, stride, padding, dilation)
    if H_out < 1 or W_out < 1:
        raise ValueError(f"the output would be empty ({H_out} x {W_out}): input of {H} x {W} with padding "
                         f"{padding} is smaller than the dilated kernel {kh} x {kw} (dilation {dilation})")
    _groups("kernel_offset", kernel_offset, 2 * K, f"2*kh*kw*kernel_groups (2*{kh}*{kw} = {2 * K} per kernel "
            "group: (dky, dkx) per tap)", C)
    _output_shaped("kernel_offset", kernel_offset, input, (H_out, W_out))
    tensors = {"input": input, "weight": weight, "kernel_offset": kernel_offset}
    offset_groups = None
    if offset is not None:
        _checks.tensor("offset", offset, "BOHW")
        offset_groups = _groups("offset", offset, 2 * K, f"2*kh*kw*offset_groups (2*{kh}*{kw} = {2 * K} per "
                                "offset group: (dy, dx) per tap)", C)
        _output_shaped("offset", offset, input, (H_out, W_out))
        tensors["offset"] = offset
    if mask is not None:
        _checks.tensor("mask", mask, "BMHW")
        mask_groups = _groups("mask", mask, K, f"kh*kw*offset_groups ({kh}*{kw} = {K} per offset group)", C)
        if offset_groups is not None and mask_groups != offset_groups:
            raise ValueError(f"mask must have kh*kw*offset_groups = {kh}*{kw}*{offset_groups} = {K * offset_groups} "
                             f"channels in dim 1 (offset_groups from offset of shape {tuple(offset.shape)}), "
                             f"got shape {tuple(mask.shape)}")
        _output_shaped("mask", mask, input, (H_out, W_out))
        tensors["mask"] = mask
    if bias is not None:
        _checks.tensor("bias", bias, "C")
        if bias.shape[0] != C:
            raise ValueError(f"bias must have shape ({C},) (input's channels), got shape {tuple(bias.shape)}")
        tensors["bias"] = bias
    _checks.same_dtype_and_device(tensors)
    return kernel_size, stride, padding, dilation


def deform_kernel_conv2d(input: torch.Tensor, weight: torch.Tensor, kernel_offset: torch.Tensor, kernel_size,
                         offset: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1,
                         backend: str = "auto") -> torch.Tensor:
    """Depthwise deformable-kernel convolution: each output pixel resamples every channel's kernel
    from a larger kernel scope at learned kernel offsets, and samples the input at the regular
    grid or, with `offset`/`mask`, as `deform_conv2d` does.

    Args:
        input: (B, C, H, W).
        weight: (C, 1, Sh, Sw), the kernel scope of each channel, Sh >= kh, Sw >= kw.
        kernel_offset: (B, 2*Gk*kh*kw, H_out, W_out); channel 2*(g*kh*kw + i*kw + j) is the row
            offset dky and the next channel the column offset dkx of tap (i, j) of kernel group g.
            Channel c belongs to kernel group c // (C / Gk) (contiguous blocks, like the offset
            groups of deform_conv2d; the official deformable-kernels code interleaves its
            rotation groups, c % Gk: permute the channels to convert).
        kernel_size: int or (kh, kw) pair, the taps of the convolution.
        offset: (B, 2*G*kh*kw, H_out, W_out) or None: the input offsets, torchvision's layout
            (offset group of channel c: c // (C / G)). None samples the regular grid.
        mask: (B, G*kh*kw, H_out, W_out) or None (all ones): multiplies tap k of offset group g.
            Allowed without `offset` (G then comes from the mask).
        bias: (C,) or None.
        stride, padding, dilation: int or (height, width) pair; stride, dilation >= 1, padding >= 0.
        backend: "auto", "reference", "cpu", "cuda" or "triton" ("auto": "cpu" on CPU tensors, the
            faster GPU backend on CUDA tensors, the reference with a warning where those are missing).

    Semantics: H_out = (H + 2*ph - dh*(kh-1) - 1) // sh + 1 (W_out alike);
        out[b, c, oy, ox] = bias[c] + sum over taps k = i*kw + j of
            scope(weight[c, 0], ky, kx) * mask[b, g*kh*kw + k, oy, ox] * sample(input[b, c], y, x)
        with ky = i + (Sh - kh)/2 + dky, kx = j + (Sw - kw)/2 + dkx (the kernel offsets of c's kernel
        group at (oy, ox)), y = oy*sh - ph + i*dh + dy, x = ox*sw - pw + j*dw + dx (dy = dx = 0
        without offset). Both the kernel scope and the input are sampled with deform_conv2d's
        bilinear rule: 0 outside (-1, size) per axis, a neighbour outside reading 0, a NaN
        coordinate giving NaN. Zero kernel offsets give a depthwise convolution with the centre
        crop of the scope (exactly, when Sh - kh and Sw - kw are even).
    Differentiable in input, weight, kernel_offset, offset, mask and bias (at integer sample
    coordinates the coordinate gradients are the one-sided derivatives towards +1, as in
    deform_conv2d). The backward recomputes both samplings; nothing per output pixel is stored.
    dtypes: float16, bfloat16, float32, float64, all tensors alike; computed in float32 (float64
    for float64) and returned in input's dtype; autocast as for deform_conv2d.

    Returns:
        (B, C, H_out, W_out).
    """
    optional = (offset, mask, bias)
    if isinstance(input, torch.Tensor) and isinstance(weight, torch.Tensor) and \
            isinstance(kernel_offset, torch.Tensor) and all(isinstance(t, torch.Tensor) or t is None for t in optional):
        present = [t for t in (input, weight, kernel_offset, *optional) if t is not None]
        cast = iter(_autocast.cast_inputs(*present))
        input, weight, kernel_offset = next(cast), next(cast), next(cast)
        offset, mask, bias = (next(cast) if t is not None else None for t in optional)
    kernel_size, stride, padding, dilation = check(input, weight, kernel_offset, kernel_size, offset, mask, bias,
                                                   stride, padding, dilation)
    backend = _backend.choose(NAME, backend, input)
    return _backend.op_for(NAME, backend)(input, weight, kernel_offset, offset, mask, bias, list(kernel_size),
                                          list(stride), list(padding), list(dilation))
