"""vsr_kernels.flow_guided_window_attention: every backend against two baselines on the same inputs,
forward and forward+backward: time, peak memory, error against the reference, and the
forward's minimal bytes per second as a fraction of the same run's clone() bandwidth (the op
is memory-bound: 2·w²·C multiply-adds per pixel and head-channel for 4 reads/writes of C).

Baselines:
- "reference": vsr_kernels.reference (IART's formulation: an int64 gather index w² times the
  size of a feature map, gathered windows of keys and values, softmax attention).
- "careful": `careful_flow_guided_window_attention` below, what a careful user writes in plain
  PyTorch: one loop over the w² cells, each an `index_select` of a channels-last view of the
  keys and values with a (B·H·W,) int64 index built by integer arithmetic on the flattened
  frame (no index of the features' size), logits per head, softmax over the cells, and the
  weighted sum. Autograd gives the backward. tests/test_benchmark_baselines.py checks it
  against the reference.
"""
import functools
from dataclasses import dataclass

import torch

import vsr_kernels

from .. import report
from . import SEED, Case, Workload

NAME = "flow_guided_window_attention"

# (B, C, heads, H, W, window_size): the shapes, and BENCH_QUICK's.
SHAPES = {"cpu": (1, 120, 6, 180, 320, 2), "cuda": (4, 120, 6, 180, 320, 2)}
QUICK_SHAPES = {"cpu": (1, 24, 2, 32, 48, 2), "cuda": (1, 120, 6, 64, 96, 2)}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
BASELINES = ("reference", "careful")
PASSES = ("fwd", "fwd+bwd")
RESULTS = ("out", "grad_query", "grad_key", "grad_value", "grad_key_bias", "grad_value_bias")


def careful_flow_guided_window_attention(query, key, value, flow, window_size=2, num_heads=1, key_bias=None,
                                         value_bias=None, scale=None):
    """flow_guided_window_attention as a careful user writes it in plain PyTorch (see the module
    docstring); the same function as the reference, NaN for non-finite flow included."""
    B, C, H, W = query.shape
    w = window_size
    D = C // num_heads
    scale = D**-0.5 if scale is None else scale
    device = query.device
    lo = -((w - 1) // 2)
    flow = flow.detach().to(torch.float64 if flow.dtype == torch.float64 else torch.float32)
    finite = torch.isfinite(flow).all(dim=1)  # (B, H, W)
    flow = torch.where(finite[:, None], flow, torch.zeros((), dtype=flow.dtype, device=device))
    ys = torch.arange(H, dtype=flow.dtype, device=device).view(1, H, 1)
    xs = torch.arange(W, dtype=flow.dtype, device=device).view(1, 1, W)
    base_y = (ys + flow[:, 1]).clamp(-(w + 1), H + w).floor().long()
    base_x = (xs + flow[:, 0]).clamp(-(w + 1), W + w).floor().long()
    batch = (torch.arange(B, device=device) * (H * W)).view(B, 1, 1)
    q = query.permute(0, 2, 3, 1).reshape(B * H * W, num_heads, D)
    k = key.permute(0, 2, 3, 1).reshape(B * H * W, C)
    v = value.permute(0, 2, 3, 1).reshape(B * H * W, C)
    logits, indices = [], []
    for a in range(lo, lo + w):
        cy = (base_y + a).clamp(0, H - 1) * W + batch
        for b in range(lo, lo + w):
            index = (cy + (base_x + b).clamp(0, W - 1)).view(-1)  # (B*H*W,) int64
            cell = len(indices)
            kn = k.index_select(0, index)
            if key_bias is not None:
                kn = kn + key_bias[cell]
            logits.append((q * kn.view(-1, num_heads, D)).sum(-1) * scale)  # (BHW, heads)
            indices.append(index)
    attn = torch.stack(logits, -1).softmax(-1)  # (BHW, heads, cells)
    out = 0
    for cell, index in enumerate(indices):
        vn = v.index_select(0, index)
        if value_bias is not None:
            vn = vn + value_bias[cell]
        out = out + attn[..., cell, None] * vn.view(-1, num_heads, D)
    out = out.reshape(B, H, W, C)
    out = torch.where(finite[..., None], out, torch.full((), float("nan"), dtype=out.dtype, device=device))
    return out.permute(0, 3, 1, 2).contiguous()


def attention_pass(inputs, backend, window_size, num_heads, backward):
    args = (inputs["query"], inputs["key"], inputs["value"], inputs["flow"], window_size, num_heads,
            inputs["key_bias"], inputs["value_bias"])
    if backend == "careful":
        out = careful_flow_guided_window_attention(*args)
    else:
        out = vsr_kernels.flow_guided_window_attention(*args, backend=backend)
    if not backward:
        return (out,)
    names = ("query", "key", "value", "key_bias", "value_bias")
    grads = torch.autograd.grad(out, [inputs[n] for n in names], inputs["grad_out"])
    return (out, *grads)


@dataclass(frozen=True)
class Attention(Case):
    """One pass: forward, or forward and backward (gradients of out with respect to query, key,
    value and both biases)."""

    B: int
    C: int
    heads: int
    H: int
    W: int
    window_size: int

    workload = NAME
    op = NAME
    bound = "memory"

    def setup(self):
        generator = torch.Generator(self.device).manual_seed(SEED)
        B, C, H, W, w = self.B, self.C, self.H, self.W, self.window_size
        dtype = getattr(torch, self.dtype)
        tensors = {name: torch.randn(shape, device=self.device, generator=generator).to(dtype)
                   for name, shape in (("query", (B, C, H, W)), ("key", (B, C, H, W)), ("value", (B, C, H, W)),
                                       ("key_bias", (w * w, C)), ("value_bias", (w * w, C)),
                                       ("grad_out", (B, C, H, W)))}
        # A smooth flow of a few pixels, as optical flow between neighbouring frames.
        ys = torch.linspace(-1, 1, H, device=self.device).view(1, 1, H, 1)
        xs = torch.linspace(-1, 1, W, device=self.device).view(1, 1, 1, W)
        noise = torch.rand(B, 2, H, W, device=self.device, generator=generator)
        tensors["flow"] = torch.cat([3 * torch.sin(3 * ys + xs).expand(B, 1, H, W),
                                     2 * torch.cos(2 * xs - ys).expand(B, 1, H, W)], 1) + noise
        for name in ("query", "key", "value", "key_bias", "value_bias"):
            tensors[name].requires_grad_()
        return tensors

    def run(self, inputs):
        return attention_pass(inputs, self.backend, self.window_size, self.heads, self.backward)

    def bytes_moved(self):
        """Every input read once, every output written once. Forward: query, key, value and flow
        read, out and lse (float32, per head) written. Backward op: grad_out, query, key, value,
        flow and lse read; grad_query, grad_key and grad_value written (biases negligible)."""
        item = getattr(torch, self.dtype).itemsize
        feature = self.B * self.C * self.H * self.W * item
        flow = self.B * 2 * self.H * self.W * 4
        lse = self.B * self.heads * self.H * self.W * 4
        forward = 4 * feature + flow + lse
        if not self.backward:
            return forward
        return forward + 7 * feature + flow + lse

    def errors(self, inputs):
        if not self.backward:
            return None
        results = self.run(inputs)
        oracle = _oracle(self.device, self.dtype, self.B, self.C, self.heads, self.H, self.W, self.window_size)
        return {name: float((got[:1].detach().float() if got.dim() == 4 else got.detach().float()).sub(want)
                            .abs().nan_to_num(0).max())
                for name, got, want in zip(RESULTS, results, oracle)}


@functools.lru_cache(maxsize=1)
def _oracle(device, dtype, B, C, heads, H, W, w):
    """The reference in float32 on batch element 0 (bias gradients: of the whole batch when B = 1)."""
    case = Attention(device, dtype, "reference", "fwd+bwd", 1, C, heads, H, W, w)
    inputs = {name: t[:1].detach().float().requires_grad_(t.requires_grad) if t.dim() == 4 else
              t.detach().float().requires_grad_(t.requires_grad) for name, t in case.setup().items()}
    return tuple(r.detach() for r in attention_pass(inputs, "reference", w, heads, backward=True))


@dataclass(frozen=True)
class IartStep(Case):
    """One training step of ImplicitAlignmentVSR.small: forward, L1 loss, backward."""

    B: int
    T: int
    H: int
    W: int

    workload = NAME
    op = NAME

    def setup(self):
        from vsr_kernels.models.iart import ImplicitAlignmentVSR

        torch.manual_seed(SEED)
        model = ImplicitAlignmentVSR.small(backend=self.backend).to(self.device)
        generator = torch.Generator(self.device).manual_seed(SEED)
        B, T, H, W = self.B, self.T, self.H, self.W
        frames = torch.rand(B, T, 3, H, W, device=self.device, generator=generator)
        flows = [2 * torch.randn(B, T - 1, 2, H, W, device=self.device, generator=generator) for _ in range(2)]
        target = torch.rand(B, T, 3, 4 * H, 4 * W, device=self.device, generator=generator)
        return model, frames, flows, target

    def run(self, state):
        model, frames, flows, target = state
        loss = torch.nn.functional.l1_loss(model(frames, *flows), target)
        loss.backward()
        model.zero_grad(set_to_none=True)
        return loss


STEP_SHAPES = {"cpu": (1, 5, 64, 64), "cuda": (4, 7, 128, 128)}
QUICK_STEP_SHAPES = {"cpu": (1, 3, 16, 16), "cuda": (1, 3, 32, 32)}


def cases(device, quick):
    shape = (QUICK_SHAPES if quick else SHAPES)[device]
    backends = (*BASELINES, *BACKENDS[device])
    attention = [Attention(device, dtype, backend, pass_name, *shape)
                 for pass_name in PASSES for dtype in DTYPES[device] for backend in backends]
    step = (QUICK_STEP_SHAPES if quick else STEP_SHAPES)[device]
    return attention + [IartStep(device, "float32", backend, "step", *step)
                        for backend in ("reference", *BACKENDS[device])]


def shape_line(record):
    shape = record["shape"]
    if "T" in shape:
        return (f"`ImplicitAlignmentVSR.small(backend=...)` training step, frames B={shape['B']}, T={shape['T']}, "
                f"3×{shape['H']}×{shape['W']}, float32: forward, L1, backward")
    return ", ".join(f"{name}={shape[name]}" for name in ("B", "C", "heads", "H", "W", "window_size")) + \
        ", biases given, smooth flow of a few pixels"



WORKLOAD = Workload(
    name=NAME,
    cases=cases,
    baselines=BASELINES,
    passes=(*PASSES, "step"),
    shape_line=shape_line,
    columns=(
        report.field_column("backend"), report.field_column("dtype"),
        report.ms_column("fwd"), report.ms_column("fwd+bwd"), report.ms_column("step"),
        report.speedup_column("fwd", "reference"), report.speedup_column("fwd+bwd", "reference"),
        report.speedup_column("fwd", "careful"), report.speedup_column("fwd+bwd", "careful"),
        report.speedup_column("step", "reference"),
        report.rate_column("fwd", "fwd % copy"),
        report.peak_column("fwd"), report.peak_column("fwd+bwd"), report.peak_column("step"),
        report.max_error_column(),
    ),
    notes=(
        "Baselines: `reference` is vsr_kernels.reference (IART's int64 gather index and gathered windows); "
        "`careful` loops over the w² cells with an index_select of a channels-last view per cell "
        "(benchmarks/workloads/flow_guided_window_attention.py). × ref / × careful: that baseline's time / "
        "this row's time, same dtype and pass.",
        "% copy: the forward's minimal bytes (query, key, value, flow read; out, lse written) per second "
        "as a fraction of clone()'s bandwidth in the same run. Max error: largest absolute difference from "
        "the float32 reference on batch element 0 over out and the five gradients.",
    ),
)
