"""vsr_kernels.deform_conv2d (modulated deformable convolution, DCNv2): every backend against
the baselines on the same inputs, forward and forward+backward: time, peak memory, error
against the reference, and the forward's FLOP rate as a fraction of torch.mm's float32 rate.

Baselines:
- "reference": vsr_kernels.reference.deform_conv2d (grid of sample points, bilinear gathers,
  einsum), the tests' oracle.
- "careful": `careful_deform_conv2d` below, what a careful user writes in plain PyTorch:
  F.grid_sample (bilinear, zero padding, whose boundary rule is torchvision's) of every offset
  group at its kh·kw displaced grids, the mask, then one einsum with the weight. It computes
  the same function (tests/test_benchmark_baselines.py).
- "conv2d": F.conv2d of the same shape (no sampling): not the same function, the floor the
  issue measures the sampling overhead against (forward ≤ 5× it).
torchvision.ops.deform_conv2d is timed apart (tools/bench_torchvision_deform.py) because it
only imports with another torch build here.
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vsr_kernels

from .. import report
from . import SEED, Case, Workload

NAME = "deform_conv2d"

# (B, C_in, C_out, H, W, k, offset_groups): the shapes, and BENCH_QUICK's.
SHAPES = {"cpu": [(1, 64, 64, 64, 64, 3, 8), (1, 64, 64, 180, 320, 3, 8)],
          "cuda": [(1, 64, 64, 64, 64, 3, 8), (4, 64, 64, 180, 320, 3, 8)]}
QUICK_SHAPES = {"cpu": [(1, 16, 16, 24, 24, 3, 4)], "cuda": [(1, 32, 32, 64, 64, 3, 8)]}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
BASELINES = ("reference", "careful", "conv2d")
PASSES = ("fwd", "fwd+bwd")
RESULTS = ("out", "grad_input", "grad_offset", "grad_weight", "grad_mask", "grad_bias")


def careful_deform_conv2d(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """deform_conv2d as a careful user writes it in plain PyTorch, on F.grid_sample.

    grid_sample with mode="bilinear", padding_mode="zeros" reads 0 for every neighbour outside
    the image, which is torchvision's rule (a point at y <= -1 or y >= H has no neighbour
    inside). Coordinates are normalised with align_corners=False, x_n = (2 x + 1) / W - 1, which
    also serves W = 1.
    """
    pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    B, C, H, W = input.shape
    Cout, cin_g, kh, kw = weight.shape
    K = kh * kw
    groups, G = C // cin_g, offset.shape[1] // (2 * K)
    Ho, Wo = offset.shape[2:]
    dev, dt = input.device, input.dtype
    ky = (torch.arange(kh, device=dev, dtype=dt) * dh).repeat_interleave(kw)
    kx = (torch.arange(kw, device=dev, dtype=dt) * dw).repeat(kh)
    oy = torch.arange(Ho, device=dev, dtype=dt) * sh - ph
    ox = torch.arange(Wo, device=dev, dtype=dt) * sw - pw
    off = offset.view(B, G, K, 2, Ho, Wo)
    y = oy[:, None] + ky[:, None, None] + off[:, :, :, 0]  # (B, G, K, Ho, Wo)
    x = ox + kx[:, None, None] + off[:, :, :, 1]
    grid = torch.stack(((2 * x + 1) / W - 1, (2 * y + 1) / H - 1), -1).view(B * G, K * Ho, Wo, 2)
    cols = F.grid_sample(input.reshape(B * G, C // G, H, W), grid, mode="bilinear", padding_mode="zeros",
                         align_corners=False).view(B, G, C // G, K, Ho, Wo)
    if mask is not None:
        cols = cols * mask.view(B, G, 1, K, Ho, Wo)
    cols = cols.reshape(B, groups, cin_g, K, Ho, Wo)
    out = torch.einsum("bgckyx,gock->bgoyx", cols, weight.view(groups, Cout // groups, cin_g, K))
    out = out.reshape(B, Cout, Ho, Wo)
    return out if bias is None else out + bias[:, None, None]


@dataclass(frozen=True)
class DeformConv(Case):
    """One pass: forward, or forward and backward (gradients of all five inputs)."""

    B: int
    C_in: int
    C_out: int
    H: int
    W: int
    kernel_size: int
    offset_groups: int

    workload = NAME
    op = NAME
    bound = "compute"

    def unavailable(self):
        if self.backend == "conv2d":
            return None
        return super().unavailable()

    def setup(self):
        generator = torch.Generator(self.device).manual_seed(SEED)
        B, C, Co, H, W, k, G = self.B, self.C_in, self.C_out, self.H, self.W, self.kernel_size, self.offset_groups
        K = k * k

        def rand(*shape, scale=1.0):
            return (scale * torch.randn(shape, device=self.device, generator=generator)).to(getattr(torch, self.dtype))

        tensors = {"input": rand(B, C, H, W), "offset": rand(B, 2 * G * K, H, W, scale=2.0),
                   "weight": rand(Co, C, k, k, scale=(C * K) ** -0.5), "bias": rand(Co),
                   "mask": torch.rand((B, G * K, H, W), device=self.device, generator=generator).to(
                       getattr(torch, self.dtype)), "grad_out": rand(B, Co, H, W)}
        for name in ("input", "offset", "weight", "bias", "mask"):
            tensors[name].requires_grad_()
        return tensors

    def run(self, inputs):
        return deform_pass(inputs, self.backend, self.kernel_size // 2, self.backward)

    def flops(self):
        """Forward: 2·B·H·W·C_out·C_in·k² (the GEMM; the bilinear sampling, 8·B·C_in·k²·H·W, is
        left out). Backward: twice that again (column gradient and weight gradient)."""
        forward = 2 * self.B * self.H * self.W * self.C_out * self.C_in * self.kernel_size**2
        return forward * (3 if self.backward else 1)

    def errors(self, inputs):
        if not self.backward or self.backend == "conv2d":
            return None
        results = self.run(inputs)
        oracle = _oracle(dataclasses.replace(self, backend="reference"))
        return {name: float((got.detach().float() - want).abs().max()) for name, got, want in
                zip(RESULTS, results, oracle)}


def deform_pass(inputs, backend, padding, backward):
    x, off, w, b, m = (inputs[n] for n in ("input", "offset", "weight", "bias", "mask"))
    if backend == "conv2d":
        out = F.conv2d(x, w, b, padding=padding)
        wrt = (x, w, b)
    elif backend == "careful":
        out = careful_deform_conv2d(x, off, w, b, 1, padding, 1, m)
        wrt = (x, off, w, m, b)
    else:
        out = vsr_kernels.deform_conv2d(x, off, w, b, 1, padding, 1, m, backend=backend)
        wrt = (x, off, w, m, b)
    if not backward:
        return (out,)
    return (out, *torch.autograd.grad(out, wrt, inputs["grad_out"]))


@functools.lru_cache(maxsize=1)
def _oracle(case):
    """The reference in float32 on the case's inputs (batch element 0)."""
    inputs = {name: t[:1].detach().float().requires_grad_(t.requires_grad) for name, t in case.setup().items()}
    inputs["weight"] = case.setup()["weight"].detach().float().requires_grad_()
    inputs["bias"] = case.setup()["bias"].detach().float().requires_grad_()
    return tuple(r.detach() for r in deform_pass(inputs, "reference", case.kernel_size // 2, True))


def cases(device, quick):
    shapes = (QUICK_SHAPES if quick else SHAPES)[device]
    backends = (*BASELINES, *BACKENDS[device])
    return [DeformConv(device, dtype, backend, pass_name, *shape)
            for shape in shapes for pass_name in PASSES for dtype in DTYPES[device] for backend in backends]


def shape_line(record):
    s = record["shape"]
    return (f"B={s['B']}, C_in={s['C_in']}, C_out={s['C_out']}, {s['H']}×{s['W']}, {s['kernel_size']}×"
            f"{s['kernel_size']}, padding {s['kernel_size'] // 2}, {s['offset_groups']} offset groups, mask, bias")



WORKLOAD = Workload(
    name=NAME,
    cases=cases,
    baselines=BASELINES,
    passes=PASSES,
    shape_line=shape_line,
    columns=report.op_columns(extra_baselines=("conv2d",), error_columns=(report.max_error_column(),)),
    notes=(
        "Baselines: `reference` is vsr_kernels.reference (sample grid, bilinear gathers, einsum); `careful` "
        "is F.grid_sample at the kh·kw displaced grids + einsum (same function); `conv2d` is F.conv2d of "
        "the same shape, no sampling: the floor (× conv2d below 1 is the sampling overhead; the issue's "
        "target is ≥ 0.2×). torchvision: tools/bench_torchvision_deform.py (another torch build).",
        "% mm: the forward's 2·B·H·W·C_out·C_in·k² FLOPs per second as a fraction of torch.mm's float32 rate. "
        "Max error: largest absolute difference from the reference in float32 over the output and the five "
        "gradients.",
    ),
)
