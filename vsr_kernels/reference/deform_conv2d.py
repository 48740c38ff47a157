"""Naive deformable convolution (DCNv1 / modulated DCNv2), torchvision's semantics.

The plain PyTorch formulation: build the grid of sample points (the regular convolution
grid plus the learned offsets), gather the four bilinear neighbours of every point with
`torch.gather`, weight them by the bilinear coefficients (and the modulation mask), then
contract the sampled columns with the weight by an einsum. Autograd provides the backward
(in input, offset, mask, weight and bias; double backward included). This is the oracle of
the tests and the baseline of the benchmarks: deliberately not optimised.

Memory: it materialises the sampled columns, B * C_in * kh * kw * H_out * W_out elements
(plus, during the gathers, four index/weight tensors of B * G * kh * kw * H_out * W_out and
per-corner columns of the size of the sampled columns; autograd keeps them for the backward),
i.e. kh * kw times the input for a stride-1 'same' convolution, like an im2col buffer. The
fused backends never build it for the whole image.

`sample_bilinear` is the per-point sampling, reusable by other deformable ops (the
deformable-kernel convolution resamples its kernel with it).
"""
import math

import torch

_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _pair(value) -> tuple[int, int]:
    if isinstance(value, (tuple, list)):
        return int(value[0]), int(value[1])
    return int(value), int(value)


def output_size(height: int, width: int, kernel: tuple[int, int], stride=1, padding=0, dilation=1
                ) -> tuple[int, int]:
    """(H_out, W_out) of a convolution: floor((H + 2 p - d (k - 1) - 1) / s) + 1 per axis."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, _pair(stride), _pair(padding), _pair(dilation)
    return (height + 2 * ph - dh * (kh - 1) - 1) // sh + 1, (width + 2 * pw - dw * (kw - 1) - 1) // sw + 1


def sample_bilinear(input: torch.Tensor, y: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of `input` at fractional points, torchvision's deformable-conv rule.

    Args:
        input: (B, C, H, W).
        y, x: (B, G, *S) row and column coordinates (pixel units, 0 = first row/column), same
            shape; G must divide C: channel c is sampled at the points of group c // (C // G).
    Returns:
        (B, C, *S) in input's dtype (computed in float32 for float16/bfloat16).

    Rule, per point (y, x): if y <= -1 or y >= H or x <= -1 or x >= W (or not finite), the
    sample is 0. Otherwise, with y0 = floor(y), x0 = floor(x), ly = y - y0, lx = x - x0:
        (1-ly)(1-lx) v[y0, x0] + (1-ly) lx v[y0, x0+1] + ly (1-lx) v[y0+1, x0] + ly lx v[y0+1, x0+1]
    where a neighbour outside [0, H-1] x [0, W-1] reads 0 and a neighbour inside is always read,
    even with weight 0 (so a NaN pixel spreads to the samples next to it, as in torchvision).
    A NaN coordinate gives a NaN sample.
    Differentiable in input and in the coordinates: the coordinate gradient is the one-sided
    derivative towards +1 wherever the sample is not differentiable (at integer coordinates and
    at y == -1 or x == -1, where the sample is 0 but grows towards the image), which is what
    torchvision's backward computes.
    """
    B, C, H, W = input.shape
    G = y.shape[1]
    S = y.shape[2:]
    out_dtype = input.dtype
    if input.dtype in _LOW_PRECISION:
        input = input.float()
    y, x = y.to(input.dtype), x.to(input.dtype)
    Cg = C // G if G else 0
    P = math.prod(S)
    yf, xf = y.reshape(B, G, 1, P), x.reshape(B, G, 1, P)
    # Points on the -1 edge (y == -1 or x == -1, the other coordinate < its size) sample 0 like
    # the points outside, but keep the one-sided derivative towards +1 there (torchvision's offset
    # gradient): they go through the arithmetic with finite neighbours, which gives exactly 0.
    valid = (yf >= -1) & (yf < H) & (xf >= -1) & (xf < W)
    edge = valid & ((yf == -1) | (xf == -1))
    ys = torch.where(valid, yf, torch.zeros_like(yf))
    xs = torch.where(valid, xf, torch.zeros_like(xf))
    y0, x0 = torch.floor(ys).detach(), torch.floor(xs).detach()
    ly, lx = ys - y0, xs - x0
    hy, hx = 1 - ly, 1 - lx
    y0i, x0i = y0.long(), x0.long()
    flat = input.reshape(B, G, Cg, H * W)
    out = None
    for dy, wy in ((0, hy), (1, ly)):
        for dx, wx in ((0, hx), (1, lx)):
            iy, ix = y0i + dy, x0i + dx
            inside = valid & (iy >= 0) & (iy < H) & (ix >= 0) & (ix < W)
            index = (iy.clamp(0, max(H - 1, 0)) * W + ix.clamp(0, max(W - 1, 0))).expand(B, G, Cg, P)
            if H * W == 0:
                values = flat.new_zeros(B, G, Cg, P)
            else:
                values = torch.gather(flat, 3, index)
            values = torch.where(inside, values, torch.zeros_like(values))
            values = torch.where(edge, torch.nan_to_num(values), values)
            term = (wy * wx) * values
            out = term if out is None else out + term
    nan = torch.isnan(yf) | torch.isnan(xf)
    out = torch.where(nan, torch.full_like(out, float("nan")), out)
    return out.reshape(B, C, *S).to(out_dtype)


def sample_points(offset: torch.Tensor, kernel: tuple[int, int], stride=1, padding=0, dilation=1
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """The sample points of a deformable convolution: (y, x), each (B, G, kh*kw, H_out, W_out).

    offset: (B, 2*G*kh*kw, H_out, W_out) with channel 2*(g*kh*kw + k) = dy and +1 = dx of
    kernel point k = i*kw + j of offset group g. Point (g, k, oy, ox) is at
        y = oy*sh - ph + i*dh + dy,  x = ox*sw - pw + j*dw + dx.
    """
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, _pair(stride), _pair(padding), _pair(dilation)
    B, _, Ho, Wo = offset.shape
    K = kh * kw
    G = offset.shape[1] // (2 * K) if K else 0
    dtype = offset.dtype if offset.dtype not in _LOW_PRECISION else torch.float32
    off = offset.to(dtype).reshape(B, G, K, 2, Ho, Wo)
    dev = offset.device
    ky = (torch.arange(kh, device=dev, dtype=dtype) * dh).repeat_interleave(kw)  # (K,): i*dh
    kx = (torch.arange(kw, device=dev, dtype=dtype) * dw).repeat(kh)  # (K,): j*dw
    oy = torch.arange(Ho, device=dev, dtype=dtype) * sh - ph
    ox = torch.arange(Wo, device=dev, dtype=dtype) * sw - pw
    y = oy[None, None, None, :, None] + ky[None, None, :, None, None] + off[:, :, :, 0]
    x = ox[None, None, None, None, :] + kx[None, None, :, None, None] + off[:, :, :, 1]
    return y, x


def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                  bias: torch.Tensor | None = None,
                  stride=1, padding=0, dilation=1, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Reference for `vsr_kernels.deform_conv2d` (torchvision.ops.deform_conv2d's contract; no
    argument checks: the public function does them).

    input (B, C_in, H, W); offset (B, 2*G*kh*kw, H_out, W_out); weight (C_out, C_in/groups, kh, kw);
    bias (C_out,) or None; mask (B, G*kh*kw, H_out, W_out) or None (all ones). groups =
    C_in // weight.shape[1], G (offset groups) = offset.shape[1] // (2*kh*kw).

        out[b, o, oy, ox] = bias[o] + sum_{c in group(o), i, j} weight[o, c', i, j]
                            * mask[b, g(c)*kh*kw + k, oy, ox] * sample(input[b, c], y, x)
    with k = i*kw + j, c' = c mod (C_in/groups), g(c) = c // (C_in/G), (y, x) the point of
    `sample_points` and sample the rule of `sample_bilinear`. Computed in float32 for
    float16/bfloat16 (returned in input's dtype), else in input's dtype.
    """
    B, C, H, W = input.shape
    Cout, Cin_g, kh, kw = weight.shape
    K = kh * kw
    groups = C // Cin_g if Cin_g else 1
    Ho, Wo = offset.shape[2], offset.shape[3]
    G = offset.shape[1] // (2 * K)
    out_dtype = input.dtype
    compute = torch.float32 if input.dtype in _LOW_PRECISION else input.dtype
    y, x = sample_points(offset.to(compute), (kh, kw), stride, padding, dilation)
    cols = sample_bilinear(input.to(compute), y, x)  # (B, C_in, kh*kw, H_out, W_out): the sampled columns
    if mask is not None:
        m = mask.to(compute).reshape(B, G, 1, K, Ho, Wo)
        cols = (cols.reshape(B, G, C // G, K, Ho, Wo) * m).reshape(B, C, K, Ho, Wo)
    cols = cols.reshape(B, groups, Cin_g, K, Ho, Wo)
    w = weight.to(compute).reshape(groups, Cout // groups, Cin_g, K)
    out = torch.einsum("bgckyx,gock->bgoyx", cols, w).reshape(B, Cout, Ho, Wo)
    if bias is not None:
        out = out + bias.to(compute)[None, :, None, None]
    return out.to(out_dtype)
