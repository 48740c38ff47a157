"""vsr_kernels.deform_kernel_conv2d (depthwise deformable-kernel convolution, DKSAN's DKC; Gao
et al., ICLR 2020) with input offsets and mask: every backend against the baselines on the same
inputs, forward and forward+backward: time, peak memory, error against the reference, and the
forward's byte rate as a fraction of the same run's clone() bandwidth.

Baselines:
- "reference": vsr_kernels.reference.deform_kernel_conv2d (the kernels sampled per output pixel
  into a (B, C, kh·kw, H_out, W_out) tensor, the input sampled into another by bilinear gathers,
  multiplied and summed), the tests' oracle.
- "careful": `careful_deform_kernel_conv2d` below, what a careful user writes in plain PyTorch:
  two F.grid_sample calls (bilinear, zero padding: deform_conv2d's boundary rule), one sampling
  every channel's kernel scope at the kh·kw displaced kernel points of every output pixel, one
  sampling the input at the kh·kw displaced input points, both laid out with the taps innermost
  (B, C, H_out, W_out, kh·kw), the mask multiplied in, then one product summed over the taps.
  It computes the same function (tests/test_benchmark_baselines.py).
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vsr_kernels

from .. import report
from . import SEED, Case, Workload, max_errors

NAME = "deform_kernel_conv2d"

# (B, C, H, W, kernel_size, scope_size, offset_groups, kernel_groups): the shapes, and BENCH_QUICK's.
SHAPES = {"cpu": [(1, 64, 64, 64, 3, 5, 1, 1), (1, 64, 180, 320, 3, 5, 1, 1)],
          "cuda": [(1, 64, 64, 64, 3, 5, 1, 1), (4, 64, 180, 320, 3, 5, 1, 1)]}
QUICK_SHAPES = {"cpu": [(1, 16, 24, 24, 3, 5, 1, 1)], "cuda": [(1, 32, 64, 64, 3, 5, 1, 1)]}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
BASELINES = ("reference", "careful")
PASSES = ("fwd", "fwd+bwd")
RESULTS = ("out", "grad_input", "grad_weight", "grad_kernel_offset", "grad_offset", "grad_mask", "grad_bias")


def _pair(value):
    return tuple(value) if isinstance(value, (tuple, list)) else (value, value)


def _normalised(coordinate, size):
    """Pixel coordinate -> grid_sample's align_corners=False coordinate (also right for size 1)."""
    return (2 * coordinate + 1) / size - 1


def careful_deform_kernel_conv2d(input, weight, kernel_offset, kernel_size, offset=None, mask=None, bias=None,
                                 stride=1, padding=0, dilation=1):
    """deform_kernel_conv2d as a careful user writes it in plain PyTorch, on F.grid_sample.

    Same arguments and semantics as vsr_kernels.deform_kernel_conv2d. grid_sample with
    mode="bilinear", padding_mode="zeros" reads 0 for every neighbour outside the image (the
    kernel scope, or the input), which is the op's rule. Both samplings put the kh·kw taps in
    the innermost dimension, so the product-and-sum over the taps runs over contiguous memory.
    """
    (kh, kw), (sh, sw) = _pair(kernel_size), _pair(stride)
    (ph, pw), (dh, dw) = _pair(padding), _pair(dilation)
    B, C, H, W = input.shape
    Sh, Sw = weight.shape[2:]
    Ho, Wo = kernel_offset.shape[2:]
    K = kh * kw
    dev, dt = input.device, input.dtype
    ti = torch.arange(kh, device=dev, dtype=dt).repeat_interleave(kw)  # (K,) tap rows
    tj = torch.arange(kw, device=dev, dtype=dt).repeat(kh)  # (K,) tap columns

    # Kernels: the scope of every channel sampled at (i + (Sh-kh)/2 + dky, j + (Sw-kw)/2 + dkx).
    Gk = kernel_offset.shape[1] // (2 * K)
    koff = kernel_offset.view(B, Gk, K, 2, Ho, Wo).permute(0, 1, 4, 5, 2, 3)  # (B, Gk, Ho, Wo, K, 2)
    ky = ti + (Sh - kh) / 2 + koff[..., 0]
    kx = tj + (Sw - kw) / 2 + koff[..., 1]
    grid = torch.stack((_normalised(kx, Sw), _normalised(ky, Sh)), -1).view(B * Gk, Ho, Wo * K, 2)
    scope = weight.view(1, Gk, C // Gk, Sh, Sw).expand(B, -1, -1, -1, -1).reshape(B * Gk, C // Gk, Sh, Sw)
    kernels = F.grid_sample(scope, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
    kernels = kernels.view(B, C, Ho, Wo, K)

    # Input: sampled at (oy*sh - ph + i*dh + dy, ox*sw - pw + j*dw + dx) per offset group.
    G = offset.shape[1] // (2 * K) if offset is not None else (mask.shape[1] // K if mask is not None else 1)
    oy = (torch.arange(Ho, device=dev, dtype=dt) * sh - ph)[:, None, None]  # (Ho, 1, 1)
    ox = (torch.arange(Wo, device=dev, dtype=dt) * sw - pw)[:, None]  # (Wo, 1)
    y, x = oy + ti * dh, ox + tj * dw  # (Ho, 1, K), (Wo, K)
    if offset is not None:
        off = offset.view(B, G, K, 2, Ho, Wo).permute(0, 1, 4, 5, 2, 3)  # (B, G, Ho, Wo, K, 2)
        y, x = y + off[..., 0], x + off[..., 1]
    y, x = torch.broadcast_tensors(y, x)
    grid = torch.stack((_normalised(x, W), _normalised(y, H)), -1).expand(B, G, Ho, Wo, K, 2)
    cols = F.grid_sample(input.reshape(B * G, C // G, H, W), grid.reshape(B * G, Ho, Wo * K, 2),
                         mode="bilinear", padding_mode="zeros", align_corners=False)
    cols = cols.view(B, G, C // G, Ho, Wo, K)
    if mask is not None:
        cols = cols * mask.view(B, G, 1, K, Ho, Wo).permute(0, 1, 2, 4, 5, 3)
    out = (kernels * cols.view(B, C, Ho, Wo, K)).sum(-1)
    return out if bias is None else out + bias[:, None, None]


@dataclass(frozen=True)
class DeformKernelConv(Case):
    """One pass: forward, or forward and backward (gradients of all six inputs)."""

    B: int
    C: int
    H: int
    W: int
    kernel_size: int
    scope_size: int
    offset_groups: int
    kernel_groups: int

    workload = NAME
    op = NAME
    bound = "memory"

    def setup(self):
        generator = torch.Generator(self.device).manual_seed(SEED)
        B, C, H, W, S = self.B, self.C, self.H, self.W, self.scope_size
        G, Gk, K = self.offset_groups, self.kernel_groups, self.kernel_size ** 2

        dtype = getattr(torch, self.dtype)

        def rand(*shape, scale=1.0):
            return (scale * torch.randn(shape, device=self.device, generator=generator)).to(dtype)

        # Kernel offsets of about a scope cell (some point outside the scope), input offsets of
        # about two pixels, as a trained alignment layer's.
        tensors = {"input": rand(B, C, H, W), "weight": rand(C, 1, S, S, scale=K ** -0.5),
                   "kernel_offset": rand(B, 2 * Gk * K, H, W), "offset": rand(B, 2 * G * K, H, W, scale=2.0),
                   "mask": torch.rand((B, G * K, H, W), device=self.device, generator=generator).to(dtype),
                   "bias": rand(C), "grad_out": rand(B, C, H, W)}
        for name in ("input", "weight", "kernel_offset", "offset", "mask", "bias"):
            tensors[name].requires_grad_()
        return tensors

    def run(self, inputs):
        return kernel_conv_pass(inputs, self.backend, self.kernel_size, self.backward)

    def flops(self):
        """The least arithmetic per (output position, tap, channel), the bilinear weights (channel-
        independent) not counted. Forward: the kernel's bilinear sample from the scope (4 FMAs), the
        input's (4 FMAs, the mask folded into its weights), the product accumulated (1 FMA): 18 FLOPs.
        Backward: both samples again (16), the input and scope gradients spread over 4 corners each
        (2 × 10), the kernel-offset and offset gradients from the corner differences (2 × 10), the
        mask's (2): 58."""
        elements = self.B * self.C * self.H * self.W * self.kernel_size ** 2
        return elements * (18 + (58 if self.backward else 0))

    def bytes_moved(self):
        """Every tensor read or written once. Forward: input, weight, kernel offsets, offsets, mask
        and bias read, out written. Backward op: grad_out and the six inputs read again, the six
        gradients written."""
        item = getattr(torch, self.dtype).itemsize
        K, pixels = self.kernel_size ** 2, self.B * self.H * self.W
        inputs = (self.B * self.C * self.H * self.W + self.C * self.scope_size ** 2 + self.C
                  + pixels * K * (2 * self.kernel_groups + 3 * self.offset_groups)) * item
        out = self.B * self.C * self.H * self.W * item
        forward = inputs + out
        return forward + (out + 2 * inputs if self.backward else 0)

    def errors(self, inputs):
        if not self.backward:
            return None
        results = self.run(inputs)
        return max_errors(RESULTS, results, _oracle(dataclasses.replace(self, backend="reference")))


def kernel_conv_pass(inputs, backend, kernel_size, backward):
    names = ("input", "weight", "kernel_offset", "offset", "mask", "bias")
    x, w, ko, off, m, b = (inputs[n] for n in names)
    padding = kernel_size // 2
    if backend == "careful":
        out = careful_deform_kernel_conv2d(x, w, ko, kernel_size, off, m, b, 1, padding, 1)
    else:
        out = vsr_kernels.deform_kernel_conv2d(x, w, ko, kernel_size, off, m, b, 1, padding, 1,
                                               backend=backend)
    if not backward:
        return (out,)
    return (out, *torch.autograd.grad(out, (x, w, ko, off, m, b), inputs["grad_out"]))


@functools.lru_cache(maxsize=1)
def _oracle(case):
    """The reference in float32 on the case's inputs (batch element 0; weight and bias whole)."""
    tensors = case.setup()
    inputs = {name: t[:1].detach().float().requires_grad_(t.requires_grad) for name, t in tensors.items()}
    for name in ("weight", "bias"):
        inputs[name] = tensors[name].detach().float().requires_grad_()
    return tuple(r.detach() for r in kernel_conv_pass(inputs, "reference", case.kernel_size, True))


def cases(device, quick):
    shapes = (QUICK_SHAPES if quick else SHAPES)[device]
    backends = (*BASELINES, *BACKENDS[device])
    return [DeformKernelConv(device, dtype, backend, pass_name, *shape)
            for shape in shapes for pass_name in PASSES for dtype in DTYPES[device] for backend in backends]


def shape_line(record):
    s = record["shape"]
    k, S = s["kernel_size"], s["scope_size"]
    return (f"B={s['B']}, C={s['C']} (depthwise), {s['H']}×{s['W']}, {k}×{k} taps from a {S}×{S} scope, "
            f"padding {k // 2}, {s['kernel_groups']} kernel group(s), input offsets and mask with "
            f"{s['offset_groups']} offset group(s), bias")


WORKLOAD = Workload(
    name=NAME,
    cases=cases,
    baselines=BASELINES,
    passes=PASSES,
    shape_line=shape_line,
    columns=report.op_columns(rate_header="fwd % copy", extra_rates=(("fwd % mm", "compute"),),
                              error_columns=(report.max_error_column(),)),
    notes=(
        "Baselines: `reference` is vsr_kernels.reference (kernels and input sampled into two "
        "(B, C, k², H, W) tensors by bilinear gathers, multiplied, summed); `careful` is two F.grid_sample "
        "calls (the kernel scopes at the displaced kernel points, the input at the displaced input points, "
        "taps innermost), "
        "the mask, one product summed over the taps (same function). × ref / × careful: that baseline's "
        "time / this row's time, same dtype and pass.",
        "% copy: the forward's minimal bytes (input, weight, kernel offsets, offsets, mask, bias read; out "
        "written) per second as a fraction of clone()'s bandwidth in the same run. % mm: its 18 FLOPs per "
        "(position, tap, channel) — two 4-point bilinear samples and the product — per second as a fraction of "
        "torch.mm's float32 rate: on a CPU this op is compute-bound (0.6 GFLOP against 40 MB at 180×320; the "
        "copy target would need 2.4× torch.mm's rate), on a GPU memory-bound. Max error: largest "
        "absolute difference from the float32 reference over the output and the six gradients.",
    ),
)
