"""vsr_kernels.trajectory_attention (TTVSR): every backend against two baselines on the same
inputs, forward and forward+backward: time, peak memory, error against the reference, and the
forward's must-move bytes per second as a fraction of the copy bandwidth probed in the same run
(the op is memory bound: 2·D FLOPs per key element read).

Baselines:
- "reference": vsr_kernels.reference (grid_sample of all T key and value maps, normalize,
  matmul, max, gather), what TTVSR's code does, and the tests' oracle.
- "careful": `careful_trajectory_attention` below, what a careful user writes in plain
  PyTorch: a loop over t gathering one frame's keys at a time with a running max (no autograd),
  then the chosen key and value gathered once, differentiably. tests/test_benchmark_baselines.py
  checks it computes the reference's function.
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vsr_kernels

from .. import report
from . import SEED, Case, Workload, argmax_errors

NAME = "trajectory_attention"

# (B, T, D, Dv, h, w): the CPU shape (a 180x320 frame in 4x4 tokens of 64 channels,
# Dv = TTVSR's three value scales of 1024 in one tensor) and its GPU shape; BENCH_QUICK's.
SHAPES = {"cpu": (1, 8, 1024, 3072, 45, 80), "cuda": (4, 17, 1024, 3072, 45, 80)}
QUICK_SHAPES = {"cpu": (1, 4, 256, 512, 24, 40), "cuda": (1, 8, 1024, 3072, 45, 80)}
DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}
BASELINES = ("reference", "careful")
PASSES = ("fwd", "fwd+bwd")
RESULTS = ("out", "score", "index", "grad_query", "grad_key", "grad_value")
ERROR_FIELDS = ("out", "score", "grad_query", "grad_key", "grad_value")


def careful_trajectory_attention(query, key, value, location):
    """trajectory_attention as a careful user writes it in plain PyTorch; returns (out, score, index).

    The selection runs without autograd, one frame at a time: that frame's key tokens gathered
    at the rounded trajectory (torch.round, ties to even; outside reads zeros), normalised
    (F.normalize), dotted with the normalised query, and kept as a running max and argmax (a
    later frame replaces the best only if strictly greater, NaN ranks highest). Then the one
    chosen key and value token per query token are gathered with differentiable indexing, so
    autograd gives the backward (each into one token)."""
    many = not isinstance(value, torch.Tensor)
    values = list(value) if many else [value]
    B, T, D, h, w = key.shape
    N = h * w
    rounded = torch.round(location)
    x, y = rounded[:, :, 0], rounded[:, :, 1]
    inside = ((x >= 0) & (x <= w - 1) & (y >= 0) & (y <= h - 1)).view(B, T, N)
    flat = torch.where(inside, (y * w + x).view(B, T, N), 0).long()
    q = F.normalize(query.flatten(2), dim=1)  # (B, D, N), differentiable
    with torch.no_grad():
        qd = q.detach()
        poison = (qd * 0).sum(1)  # the similarity of a zero key: 0, or NaN for a non-finite query
        best = index = None
        for t in range(T):
            k = key.detach()[:, t].flatten(2).gather(2, flat[:, t, None].expand(B, D, N))
            sim = torch.where(inside[:, t], (qd * F.normalize(k, dim=1)).sum(1), poison)
            if best is None:
                best, index = sim, torch.zeros_like(flat[:, 0])
            else:
                better = (sim > best) | (sim.isnan() & ~best.isnan())
                best = torch.where(better, sim, best)
                index = torch.where(better, t, index)
        chosen = flat.gather(1, index[:, None])[:, 0]  # (B, N)
        chosen_inside = inside.gather(1, index[:, None])[:, 0, :, None]  # (B, N, 1)
    batch = torch.arange(B, device=key.device)[:, None]
    k = torch.where(chosen_inside, key.flatten(3)[batch, index, :, chosen], 0)  # (B, N, D)
    score = (q.transpose(1, 2) * F.normalize(k, dim=-1)).sum(-1).view(B, h, w)
    outs = [torch.where(chosen_inside, v.flatten(3)[batch, index, :, chosen], 0).transpose(1, 2)
            .reshape(B, -1, h, w) for v in values]
    return (outs if many else outs[0]), score, index.view(B, h, w)


@dataclass(frozen=True)
class Attention(Case):
    """One pass of trajectory_attention: forward, or forward and backward (gradients of out and
    score with respect to query, key and value)."""

    B: int
    T: int
    D: int
    Dv: int
    h: int
    w: int

    workload = NAME
    op = NAME
    bound = "memory"

    def setup(self):
        """query, key, value (requiring grad), location (trajectories within ±3 tokens of the
        identity, some outside the grid) and the incoming gradients of out and score."""
        generator = torch.Generator(self.device).manual_seed(SEED)
        B, T, D, Dv, h, w = self.B, self.T, self.D, self.Dv, self.h, self.w
        dtype = getattr(torch, self.dtype)
        shapes = {"query": (B, D, h, w), "key": (B, T, D, h, w), "value": (B, T, Dv, h, w),
                  "grad_out": (B, Dv, h, w), "grad_score": (B, h, w)}
        tensors = {name: torch.randn(shape, device=self.device, generator=generator).to(dtype)
                   for name, shape in shapes.items()}
        for name in ("query", "key", "value"):
            tensors[name].requires_grad_()
        ys, xs = torch.meshgrid(torch.arange(h, device=self.device), torch.arange(w, device=self.device),
                                indexing="ij")
        identity = torch.stack((xs, ys)).float()
        jitter = 3 * (2 * torch.rand((B, T, 2, h, w), device=self.device, generator=generator) - 1)
        tensors["location"] = identity + jitter
        return tensors

    def run(self, inputs):
        return attention_pass(inputs, self.backend, self.backward)

    def bytes_moved(self):
        """Bytes the pass must move at least. Forward: query, key and location read once, the
        chosen value token of every query token read once, out, score and index written. The
        backward reads grad_out, grad_score, query, index, location and the chosen key token,
        and writes grad_query and the full (mostly zero) grad_key and grad_value."""
        item, index_item = getattr(torch, self.dtype).itemsize, torch.int64.itemsize
        N = self.B * self.h * self.w
        query, key, value = N * self.D, N * self.T * self.D, N * self.T * self.Dv
        location = N * self.T * 2 * 4
        forward = (query + key + 2 * N * self.Dv + N) * item + location + N * index_item
        if not self.backward:
            return forward
        backward = ((N * self.Dv + N + query + N * self.D + query + key + value) * item + N * index_item
                    + N * 2 * 4)
        return forward + backward

    def errors(self, inputs):
        if not self.backward:
            return None
        return argmax_errors(RESULTS, self.run(inputs), _oracle(dataclasses.replace(self, backend="reference")))


def attention_pass(inputs, backend, backward):
    args = (inputs["query"], inputs["key"], inputs["value"], inputs["location"])
    if backend == "careful":
        outputs = careful_trajectory_attention(*args)
    else:
        outputs = vsr_kernels.trajectory_attention(*args, backend=backend)
    if not backward:
        return outputs
    out, score, _ = outputs
    grads = torch.autograd.grad((out, score), (inputs["query"], inputs["key"], inputs["value"]),
                                (inputs["grad_out"], inputs["grad_score"]))
    return (*outputs, *grads)


@functools.lru_cache(maxsize=1)
def _oracle(case):
    """The reference in float32 on batch element 0 of `case`'s inputs."""
    inputs = {name: tensor[:1].detach().float().requires_grad_(tensor.requires_grad)
              for name, tensor in case.setup().items()}
    results = attention_pass(inputs, "reference", backward=True)
    return tuple(result.detach() for result in results)


def cases(device, quick):
    shape = (QUICK_SHAPES if quick else SHAPES)[device]
    backends = (*BASELINES, *BACKENDS[device])
    return [Attention(device, dtype, backend, pass_name, *shape)
            for pass_name in PASSES for dtype in DTYPES[device] for backend in backends]


def shape_line(record):
    shape = record["shape"]
    return ", ".join(f"{name}={shape[name]}" for name in ("B", "T", "D", "Dv", "h", "w")) + \
        ", trajectories within ±3 tokens of the identity"




WORKLOAD = Workload(
    name=NAME,
    cases=cases,
    baselines=BASELINES,
    passes=PASSES,
    shape_line=shape_line,
    columns=report.op_columns("fwd % copy bw", error_columns=(report.max_error_column(ERROR_FIELDS),
                                                            report.index_mismatch_column())),
    notes=(
        "Baselines: `reference` is vsr_kernels.reference (grid_sample of all T key and value maps, "
        "normalize, matmul, max, gather: TTVSR's code); `careful` gathers one frame's keys at a time with a "
        "running max, then the chosen key and value once (benchmarks/workloads/trajectory_attention.py).",
        "% copy bw: the forward's must-move bytes (query, key, location, the chosen value tokens, out, "
        "score, index) per second as a fraction of a large clone()'s bandwidth measured in the same run.",
    ),
)
