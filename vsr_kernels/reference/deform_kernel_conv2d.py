"""Naive deformable-kernel convolution (Gao et al., ICLR 2020; DKSAN's DKC), what a user writes today.

Depthwise: every output pixel resamples each channel's kernel from a larger kernel scope at
learned kernel offsets, and samples the input either at the regular grid (`F.unfold`) or, with
input offsets and a mask, as `deform_conv2d` does. The plain formulation materialises both
sampled tensors, each (B, C, kh*kw, H_out, W_out) — kh*kw times the output, kept by autograd for
the backward — multiplies them and sums over the taps. Autograd provides the backward in all six
inputs. This is the oracle of the tests and the baseline of the benchmarks: deliberately not
optimised.
"""
import torch
import torch.nn.functional as F

from .deform_conv2d import _LOW_PRECISION, _pair, sample_bilinear, sample_points


def kernel_points(kernel_offset: torch.Tensor, kernel_size: tuple[int, int], scope: tuple[int, int]
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Where each tap reads the kernel scope: (ky, kx), each (B, Gk, kh*kw, H_out, W_out).

    kernel_offset: (B, 2*Gk*kh*kw, H_out, W_out), channel 2*(g*kh*kw + k) = dky and +1 = dkx of
    tap k = i*kw + j of kernel group g. Tap (i, j) reads the scope (Sh, Sw) at
        ky = i + (Sh - kh) / 2 + dky,  kx = j + (Sw - kw) / 2 + dkx
    (the centre crop of the scope when the offsets are zero; a half-integer centre when Sh - kh
    is odd, as in the official code).
    """
    (kh, kw), (Sh, Sw) = kernel_size, scope
    B, _, Ho, Wo = kernel_offset.shape
    K = kh * kw
    Gk = kernel_offset.shape[1] // (2 * K)
    off = kernel_offset.reshape(B, Gk, K, 2, Ho, Wo)
    dev, dtype = kernel_offset.device, kernel_offset.dtype
    ty = (torch.arange(kh, device=dev, dtype=dtype) + (Sh - kh) / 2).repeat_interleave(kw)  # (K,)
    tx = (torch.arange(kw, device=dev, dtype=dtype) + (Sw - kw) / 2).repeat(kh)
    return ty[None, None, :, None, None] + off[:, :, :, 0], tx[None, None, :, None, None] + off[:, :, :, 1]


def deform_kernel_conv2d(input: torch.Tensor, weight: torch.Tensor, kernel_offset: torch.Tensor,
                         kernel_size, offset: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                         bias: torch.Tensor | None = None, stride=1, padding=0, dilation=1) -> torch.Tensor:
    """Reference for `vsr_kernels.deform_kernel_conv2d` (no argument checks: the public function
    does them).

    input (B, C, H, W); weight (C, 1, Sh, Sw), the kernel scope; kernel_offset (B, 2*Gk*kh*kw,
    H_out, W_out); offset (B, 2*G*kh*kw, H_out, W_out) or None; mask (B, G*kh*kw, H_out, W_out) or
    None; bias (C,) or None. G comes from offset, else from mask, else 1.

        out[b, c, oy, ox] = bias[c] + sum_k  scope_c(ky, kx) * mask[b, g*K + k, oy, ox] * input_c(y, x)

    with scope_c(ky, kx) the bilinear sample of weight[c, 0] at `kernel_points` (kernel group
    c // (C/Gk)), and input_c(y, x) the sample of `deform_conv2d` at its point (offset group
    c // (C/G)), or input[b, c] at the regular grid point (zero outside) without an offset.
    Both samples follow `sample_bilinear`'s rule. Computed in float32 for float16/bfloat16
    (returned in input's dtype), else in input's dtype.
    """
    kh, kw = _pair(kernel_size)
    K = kh * kw
    B, C, H, W = input.shape
    Sh, Sw = weight.shape[2], weight.shape[3]
    Ho, Wo = kernel_offset.shape[2], kernel_offset.shape[3]
    out_dtype = input.dtype
    compute = torch.float32 if input.dtype in _LOW_PRECISION else input.dtype
    input, weight, kernel_offset = input.to(compute), weight.to(compute), kernel_offset.to(compute)

    ky, kx = kernel_points(kernel_offset, (kh, kw), (Sh, Sw))
    scope = weight.reshape(1, C, Sh, Sw).expand(B, C, Sh, Sw)
    kernels = sample_bilinear(scope, ky, kx)  # (B, C, K, H_out, W_out): one kernel per output pixel

    if offset is not None:
        y, x = sample_points(offset.to(compute), (kh, kw), stride, padding, dilation)
        cols = sample_bilinear(input, y, x)  # (B, C, K, H_out, W_out)
    else:
        cols = F.unfold(input, (kh, kw), dilation=dilation, padding=padding, stride=stride).reshape(B, C, K, Ho, Wo)
    if mask is not None:
        G = mask.shape[1] // K
        m = mask.to(compute).reshape(B, G, 1, K, Ho, Wo)
        cols = (cols.reshape(B, G, C // G, K, Ho, Wo) * m).reshape(B, C, K, Ho, Wo)
    out = (kernels * cols).sum(2)
    if bias is not None:
        out = out + bias.to(compute)[None, :, None, None]
    return out.to(out_dtype)
