"""vsr_kernels.local_argmax_attention: every backend against two baselines on the same inputs,
forward and forward+backward: time, peak memory, error against the reference, the forward's
FLOP rate as a fraction of torch.mm's float32 rate, and on GPU the roofline.

Baselines:
- "reference": vsr_kernels.reference (F.unfold + einsum + max + gather), the naive code the
  papers ship and the tests' oracle.
- "careful": `careful_local_argmax_attention` below, what a careful user writes in plain
  PyTorch: a loop over the kernel_size² shifts with a running argmax, then differentiable
  gathers of the selected key and value. Not an oracle (tests/test_benchmark_baselines.py
  checks it computes the same function as the reference).
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vsr_kernels

from .. import report
from . import SEED, Case, Workload, argmax_errors

NAME = "local_argmax_attention"

# (B, T, C, Cv, H, W, kernel_size): the issues' shapes, and BENCH_QUICK's.
SHAPES = {"cpu": (1, 7, 64, 64, 64, 64, 9), "cuda": (4, 7, 64, 64, 180, 320, 9)}
QUICK_SHAPES = {"cpu": (1, 3, 16, 16, 24, 24, 5), "cuda": (1, 3, 32, 32, 64, 64, 5)}
# A real VSR frame on CPU (issue 6's second target shape), against the careful baseline only:
# the reference's unfold at this shape needs ~8 GB and minutes per call. Its rows carry the frame
# size in their dtype label ("float32, 180×320") so that the report pairs them with their own
# baseline, and have no error columns (the accuracy is checked at the main shape).
FRAME_SHAPES = {"cpu": (1, 7, 64, 64, 180, 320, 9)}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
# The op's own backends meant for each device type. Triton on CPU tensors is its
# interpreter, a test tool, not something to time.
BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
# The Triton backend's forward formulations (vsr_kernels.triton.local_argmax_attention), timed
# side by side on a GPU: "direct" (one pixel per lane) and "tile" (tensor-core scores of a
# query tile against its key halo; float32 in tf32). Rows "triton-direct" and "triton-tile";
# plain "triton" is what its dispatcher picks.
FORMULATIONS = {"cpu": (), "cuda": ("direct", "tile")}
BASELINES = ("reference", "careful")
PASSES = ("fwd", "fwd+bwd")
RESULTS = ("out", "score", "index", "grad_query", "grad_key", "grad_value")
ERROR_FIELDS = ("out", "score", "grad_query", "grad_key", "grad_value")


def careful_local_argmax_attention(query, key, value, kernel_size=9, dilation=1, scale=1.0, border="exclude"):
    """local_argmax_attention as a careful user writes it in plain PyTorch; returns (out, score, index).

    Scores: a loop over the kernel_size² shifts of a zero-padded, channels-last copy of key
    (one copy, not kernel_size² of them), each a batched dot product with the query, kept as
    a running maximum and argmax without autograd. The tie rule is the op's: a later
    candidate replaces the best only if strictly greater, and NaN ranks highest (the first
    NaN stays). border="exclude" skips candidates outside the frame (the centre candidate is
    always inside); "zeros" scores them against the zero padding. Then out and score are
    recomputed from differentiable gathers of the one selected key and value per position,
    so autograd gives the backward.
    """
    B, T, C, H, W = key.shape
    Cv = value.shape[2]
    K, r = kernel_size, kernel_size // 2
    pad = r * dilation
    Hp, Wp = H + 2 * pad, W + 2 * pad
    device = query.device
    padded_key = F.pad(key, (pad, pad, pad, pad))  # (B, T, C, Hp, Wp), differentiable
    ys, xs = torch.arange(H, device=device), torch.arange(W, device=device)
    with torch.no_grad():
        q = query.detach().permute(0, 2, 3, 1)[:, None].contiguous()  # (B, 1, H, W, C)
        k = padded_key.detach().permute(0, 1, 3, 4, 2).contiguous()  # (B, T, Hp, Wp, C)
        best = torch.full((B, T, H, W), float("-inf"), dtype=query.dtype, device=device)
        index = torch.zeros((B, T, H, W), dtype=torch.int64, device=device)
        found = torch.zeros((H, W), dtype=torch.bool, device=device)
        for j in range(K * K):
            dy, dx = (j // K - r) * dilation, (j % K - r) * dilation
            shifted = k[:, :, pad + dy:pad + dy + H, pad + dx:pad + dx + W]
            score = scale * torch.linalg.vecdot(q, shifted)
            better = (score > best) | (score.isnan() & ~best.isnan())
            if border == "exclude":
                inside = (((ys + dy >= 0) & (ys + dy < H))[:, None] & ((xs + dx >= 0) & (xs + dx < W)))
                better = inside & (better | ~found)
                found |= inside
            best = torch.where(better, score, best)
            index.masked_fill_(better, j)
        offsets = torch.tensor([((j // K - r) * Wp + (j % K - r)) * dilation for j in range(K * K)],
                               device=device)
        centre = (ys[:, None] + pad) * Wp + (xs + pad)
        flat = (centre + offsets[index]).view(B, T, 1, H * W)
    picked_key = padded_key.view(B, T, C, Hp * Wp).gather(3, flat.expand(B, T, C, H * W)).view(B, T, C, H, W)
    score = scale * (query[:, None] * picked_key).sum(2)
    padded_value = F.pad(value, (pad, pad, pad, pad)).view(B, T, Cv, Hp * Wp)
    picked_value = padded_value.gather(3, flat.expand(B, T, Cv, H * W)).view(B, T, Cv, H, W)
    return score[:, :, None] * picked_value, score, index


@dataclass(frozen=True)
class Attention(Case):
    """One pass of local_argmax_attention: forward, or forward and backward (gradients of out
    and score with respect to query, key and value)."""

    B: int
    T: int
    C: int
    Cv: int
    H: int
    W: int
    kernel_size: int
    formulation: str = ""  # a forced Triton forward (FORMULATIONS), "" for the dispatcher's choice

    workload = NAME
    op = NAME
    bound = "compute"

    @property
    def scale(self):
        # As in attention: keeps bfloat16 scores in a well-resolved range.
        return self.C**-0.5

    def setup(self):
        """query, key, value (requiring grad, as in training) and the incoming gradients of out and score."""
        generator = torch.Generator(self.device).manual_seed(SEED)
        B, T, C, Cv, H, W = self.B, self.T, self.C, self.Cv, self.H, self.W
        # Drawn in float32 and then cast, so that every dtype sees the same values up to rounding.
        shapes = {"query": (B, C, H, W), "key": (B, T, C, H, W), "value": (B, T, Cv, H, W),
                  "grad_out": (B, T, Cv, H, W), "grad_score": (B, T, H, W)}
        dtype = getattr(torch, self.dtype)
        tensors = {name: torch.randn(shape, device=self.device, generator=generator).to(dtype)
                   for name, shape in shapes.items()}
        for name in ("query", "key", "value"):
            tensors[name].requires_grad_()
        return tensors

    @property
    def id(self):
        return (super().id + (f"-{self.formulation}" if self.formulation else "")
                + (f"-{self.H}x{self.W}" if self.frame else ""))

    def shape(self):
        return {name: value for name, value in super().shape().items() if name != "formulation"}

    @property
    def frame(self):
        """True for the FRAME_SHAPES case of this device."""
        shape = FRAME_SHAPES.get(self.device)
        return shape is not None and (self.B, self.T, self.C, self.Cv, self.H, self.W, self.kernel_size) == shape

    def describe(self):
        # The report keys its rows by (dtype, backend): a forced formulation is a row of its
        # own, and so is the frame shape (see FRAME_SHAPES).
        record = super().describe()
        if self.formulation:
            record["backend"] = f"{self.backend}-{self.formulation}"
        if self.frame:
            record["dtype"] = f"{self.dtype}, {self.H}×{self.W}"
        return record

    def run(self, inputs):
        """(out, score, index), followed by (grad_query, grad_key, grad_value) for the backward pass."""
        if not self.formulation:
            return attention_pass(inputs, self.backend, self.kernel_size, self.scale, self.backward)
        from vsr_kernels.triton import local_argmax_attention as triton_module

        forced, triton_module.forced_formulation = triton_module.forced_formulation, self.formulation
        try:
            return attention_pass(inputs, self.backend, self.kernel_size, self.scale, self.backward)
        finally:
            triton_module.forced_formulation = forced

    def flops(self):
        """Forward: 2·B·T·H·W·K²·C, a C-long dot product for each of the K² candidates of every
        (b, t, y, x) (the score·value product, Cv per position, is left out: 1/(2K²) of it).
        The backward touches only the selected pair: d score = grad_score + <grad_out, value>
        (2·Cv), grad value (Cv), grad query and grad key (2·C each)."""
        positions = self.B * self.T * self.H * self.W
        forward = positions * 2 * self.kernel_size**2 * self.C
        if not self.backward:
            return forward
        return forward + positions * (4 * self.Cv + 4 * self.C)

    def bytes_moved(self):
        """Bytes the pass must move at least: every input read once and every output written once.

        Forward reads query, key and value and writes out, score and index. The backward op
        reads grad_out, grad_score, query, key, value and the saved score and index, and writes
        grad_query, grad_key and grad_value.
        """
        item, index_item = getattr(torch, self.dtype).itemsize, torch.int64.itemsize
        query = self.B * self.C * self.H * self.W
        key = self.B * self.T * self.C * self.H * self.W
        value = self.B * self.T * self.Cv * self.H * self.W
        score = self.B * self.T * self.H * self.W
        forward = (query + key + value + value + score) * item + score * index_item
        if not self.backward:
            return forward
        backward_reads = (value + score + query + key + value + score) * item + score * index_item
        backward_writes = (query + key + value) * item
        return forward + backward_reads + backward_writes

    def errors(self, inputs):
        """Max abs error of each result of a forward+backward pass against the oracle, and how
        many indices differ from it; None for the forward pass (the same numbers)."""
        if not self.backward or self.frame:
            return None
        return argmax_errors(RESULTS, self.run(inputs), _oracle(dataclasses.replace(self, backend="reference")))


def attention_pass(inputs, backend, kernel_size, scale, backward):
    if backend == "careful":
        outputs = careful_local_argmax_attention(inputs["query"], inputs["key"], inputs["value"],
                                                 kernel_size=kernel_size, scale=scale)
    else:
        outputs = vsr_kernels.local_argmax_attention(inputs["query"], inputs["key"], inputs["value"],
                                                     kernel_size=kernel_size, scale=scale, backend=backend)
    if not backward:
        return outputs
    out, score, _ = outputs
    grads = torch.autograd.grad((out, score), (inputs["query"], inputs["key"], inputs["value"]),
                                (inputs["grad_out"], inputs["grad_score"]))
    return (*outputs, *grads)


@functools.lru_cache(maxsize=1)  # the suite runs the backends of one (device, dtype) in a row
def _oracle(case):
    """The reference in float32 on batch element 0 of `case`'s inputs.

    Batch elements are independent, and the reference on the whole CUDA shape does not fit
    in GPU memory. Float32 even for bfloat16 inputs, so that it is an oracle and not a second
    rounded result.
    """
    inputs = {name: tensor[:1].detach().float().requires_grad_(tensor.requires_grad)
              for name, tensor in case.setup().items()}
    results = attention_pass(inputs, "reference", case.kernel_size, case.scale, backward=True)
    return tuple(result.detach() for result in results)


def cases(device, quick):
    shape = (QUICK_SHAPES if quick else SHAPES)[device]
    backends = (*BASELINES, *BACKENDS[device])
    return [Attention(device, dtype, backend, pass_name, *shape)
            for pass_name in PASSES for dtype in DTYPES[device] for backend in backends] + [
        Attention(device, dtype, "triton", pass_name, *shape, formulation=formulation)
        for pass_name in PASSES for dtype in DTYPES[device] for formulation in FORMULATIONS[device]] + [
        Attention(device, dtype, backend, pass_name, *FRAME_SHAPES[device])
        for pass_name in PASSES for dtype in DTYPES[device] for backend in ("careful", *BACKENDS[device])
        if device in FRAME_SHAPES and not quick]


def shape_line(record):
    shape = record["shape"]
    return (", ".join(f"{name}={shape[name]}" for name in ("B", "T", "C", "Cv", "H", "W", "kernel_size"))
            + ", dilation 1, scale C^-1/2, border \"exclude\"")




WORKLOAD = Workload(
    name=NAME,
    cases=cases,
    baselines=BASELINES,
    passes=PASSES,
    shape_line=shape_line,
    columns=report.op_columns(error_columns=(report.max_error_column(ERROR_FIELDS), report.index_mismatch_column())),
    notes=(
        "Baselines: `reference` is vsr_kernels.reference (F.unfold + einsum + max + gather, the naive "
        "code the papers ship); `careful` is what a careful user writes in plain PyTorch: a loop over the "
        "kernel_size² shifts of a channels-last padded key with a running argmax, then differentiable "
        "gathers of the selected key and value (benchmarks/workloads/local_argmax_attention.py). "
        "× ref / × careful: that baseline's time / this row's time, same dtype and pass.",
        "% mm: the forward's 2·B·T·H·W·K²·C FLOPs per second as a fraction of torch.mm's float32 rate "
        "measured in the same run. Max error: the largest absolute difference from the reference run in "
        "float32 on batch element 0, over out, score and the gradients of query, key and value; index ≠ "
        "counts the positions where a different candidate was chosen.",
        "triton-direct / triton-tile: the Triton backend with its forward forced to one formulation "
        "(the backward is the same gathers); plain triton is what its dispatcher picks. The cost model's "
        "predictions for both (python tools/triton_cost_model.py) stand until these rows replace them.",
    ),
)
