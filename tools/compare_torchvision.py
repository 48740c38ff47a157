"""Compare vsr_kernels' deform_conv2d reference with torchvision.ops.deform_conv2d on the float64
sweep of tests/deform_conv2d_cases.py (forward and the gradients of all five inputs), plus float32.

torchvision is a test/benchmark dependency only, and its wheels are built against a CUDA torch;
on a CPU machine it imports beside the registry's CUDA build (it runs on CPU), e.g.:

    python -m venv /tmp/tv-venv
    /tmp/tv-venv/bin/pip install torch==2.14.1 torchvision==0.29.1 numpy pytest
    PYTHONPATH=$PWD /tmp/tv-venv/bin/python tools/compare_torchvision.py

Only the reference is used (no compiled extension needed). Exits 1 if any error exceeds the
tolerance (1e-12 in float64, 1e-4 relative to the output scale in float32).
"""
import os
import sys

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, "..", "tests"))

import torchvision  # noqa: E402
import torchvision.ops  # noqa: E402
from deform_conv2d_cases import SWEEP, case_id, make_case  # noqa: E402

from vsr_kernels.reference import deform_conv2d as reference  # noqa: E402

NAMES = ("input", "offset", "weight", "bias", "mask")


def compare(case, seed, dtype):
    input, offset, weight, bias, stride, padding, dilation, mask = make_case(case, seed, dtype)
    if bias is None:
        bias = torch.zeros(weight.shape[0], dtype=dtype)
    results = []
    for fn in (torchvision.ops.deform_conv2d, reference):
        leaves = [t.detach().clone().requires_grad_() if t is not None else None
                  for t in (input, offset, weight, bias, mask)]
        out = fn(leaves[0], leaves[1], leaves[2], leaves[3], stride, padding, dilation, leaves[4])
        grad_out = torch.linspace(-1, 1, out.numel(), dtype=dtype).reshape(out.shape)
        if out.numel():
            out.backward(grad_out)
        results.append((out.detach(), [leaf.grad if leaf is not None else None for leaf in leaves]))
    (want, want_grads), (got, got_grads) = results
    errors = {"out": _err(got, want)}
    for name, g, w in zip(NAMES, got_grads, want_grads):
        if g is not None or w is not None:
            errors[f"d{name}"] = _err(_zero(g, w), _zero(w, g))
    return errors


def _zero(t, like):
    return t if t is not None else torch.zeros_like(like)


def _err(got, want):
    if got.numel() == 0:
        return 0.0, 0.0
    return (got - want).abs().max().item(), want.abs().max().item()


def main() -> int:
    print(f"torch {torch.__version__}, torchvision {torchvision.__version__}, {len(SWEEP)} cases")
    worst_failures = 0
    for dtype, rel_tol in ((torch.float64, 1e-12), (torch.float32, 1e-4)):
        worst = {}
        for index, case in enumerate(SWEEP):
            for name, (err, scale) in compare(case, index, dtype).items():
                rel = err / max(scale, 1.0)
                if rel > worst.get(name, (0.0, 0.0, ""))[1] or name not in worst:
                    worst[name] = (err, rel, case_id(case))
                if rel > rel_tol:
                    worst_failures += 1
                    print(f"  FAIL {dtype} {case_id(case)} {name}: max abs error {err:.3e} (scale {scale:.3e})")
        print(f"{dtype}: max abs error over the sweep (tolerance {rel_tol:g} relative to max(1, |max|)):")
        for name, (err, rel, where) in worst.items():
            print(f"  {name:8s} {err:.3e}  (relative {rel:.3e}, worst case {where})")
    print("OK" if not worst_failures else f"{worst_failures} comparisons over tolerance")
    return 1 if worst_failures else 0


if __name__ == "__main__":
    sys.exit(main())
