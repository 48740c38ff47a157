"""What the suites measure: each workload is a picklable description that builds its own
inputs (`setup`) and runs the measured call on them (`run`).

Picklable, so that a fresh subprocess can rebuild exactly the same inputs to measure CPU
peak memory (see measure.cpu_peak_bytes). Inputs are drawn from a fixed seed on the
workload's device, so every backend of one (device, dtype, shape) sees the same values.
"""
import dataclasses
import functools
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import vsr_kernels

# The default shapes: (B, T, C, Cv, H, W, kernel_size).
ATTENTION_SHAPES = {
    "cpu": (1, 7, 64, 64, 64, 64, 9),
    "cuda": (4, 7, 64, 64, 180, 320, 9),
}
ATTENTION_DTYPES = {"cpu": ("float32",), "cuda": ("float32", "bfloat16")}
# MANA.small training clips (B, H, W); its num_frames decides T.
MANA_SHAPES = {"cpu": (1, 32, 32), "cuda": (4, 128, 128)}

# The reference runs everywhere; these are the fused backends meant for each device type.
# Triton on CPU tensors is its interpreter, a test tool, not something to time.
FUSED_BACKENDS = {"cpu": ("cpu",), "cuda": ("cuda", "triton")}

SEED = 0


def devices():
    return ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)


def backends(device):
    return ("reference", *FUSED_BACKENDS[device])


@dataclass(frozen=True)
class Attention:
    """One pass of vsr_kernels.local_argmax_attention: forward, or forward and backward
    (gradients of out and score with respect to query, key and value)."""

    device: str
    dtype: str
    backend: str
    backward: bool
    B: int
    T: int
    C: int
    Cv: int
    H: int
    W: int
    kernel_size: int

    @property
    def pass_name(self):
        return "fwd+bwd" if self.backward else "fwd"

    @property
    def id(self):
        return f"{self.device}-{self.dtype}-{self.backend}-{self.pass_name}"

    @property
    def group(self):
        return f"attention {self.device} {self.dtype} {self.pass_name}"

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

    def run(self, inputs):
        """(out, score, index), followed by (grad_query, grad_key, grad_value) for the backward pass."""
        return attention_pass(inputs, self.backend, self.kernel_size, self.scale, self.backward)

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

    def flops(self):
        """Forward: a C-long dot product for each of the kernel_size² candidates of every
        (b, t, y, x), and the score·value product. Backward touches only the selected pair:
        d score = grad_score + <grad_out, value> (2·Cv), grad value (Cv), grad query and
        grad key (2·C each)."""
        positions = self.B * self.T * self.H * self.W
        forward = positions * (2 * self.kernel_size**2 * self.C + self.Cv)
        if not self.backward:
            return forward
        return forward + positions * (3 * self.Cv + 4 * self.C)


def attention_pass(inputs, backend, kernel_size, scale, backward):
    outputs = vsr_kernels.local_argmax_attention(
        inputs["query"], inputs["key"], inputs["value"], kernel_size=kernel_size, scale=scale, backend=backend)
    if not backward:
        return outputs
    out, score, _ = outputs
    grads = torch.autograd.grad((out, score), (inputs["query"], inputs["key"], inputs["value"]),
                                (inputs["grad_out"], inputs["grad_score"]))
    return (*outputs, *grads)


def attention_cases(backward):
    return [Attention(device, dtype, backend, backward, *ATTENTION_SHAPES[device])
            for device in devices() for dtype in ATTENTION_DTYPES[device] for backend in backends(device)]


ATTENTION_RESULTS = ("out", "score", "index", "grad_query", "grad_key", "grad_value")


def attention_errors(case, results):
    """Max abs error of each result of a forward+backward `case` against the oracle, and how
    many indices differ from it."""
    errors = {}
    oracle = _oracle(dataclasses.replace(case, backend="reference"))
    for name, got, want in zip(ATTENTION_RESULTS, results, oracle):
        got = got[:1].detach()
        if name == "index":
            errors["index_mismatches"] = int((got != want).sum())
            errors["index_positions"] = want.numel()
        else:
            errors[name] = float((got.float() - want).abs().max())
    return errors


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


@dataclass(frozen=True)
class ManaStep:
    """One training step of vsr_kernels.models.MANA.small: forward, L1(sr, target) + memory loss, backward."""

    device: str
    backend: str
    B: int
    H: int
    W: int

    @property
    def id(self):
        return f"{self.device}-{self.backend}"

    @property
    def group(self):
        return f"MANA step {self.device}"

    def setup(self):
        # Imported here: the attention suites do not need the example network.
        from vsr_kernels.models import MANA

        torch.manual_seed(SEED)
        model = MANA.small(backend=self.backend).to(self.device)
        generator = torch.Generator(self.device).manual_seed(SEED)
        frames = torch.rand(self.B, model.num_frames, 3, self.H, self.W, device=self.device, generator=generator)
        target = torch.rand(self.B, 3, 4 * self.H, 4 * self.W, device=self.device, generator=generator)
        return model, frames, target

    def run(self, state):
        model, frames, target = state
        sr, memory_loss = model(frames)
        loss = F.l1_loss(sr, target) + memory_loss
        loss.backward()
        # An optimiser would consume the gradients here; dropping them keeps every step alike.
        model.zero_grad(set_to_none=True)
        return loss


def mana_cases():
    return [ManaStep(device, backend, *MANA_SHAPES[device])
            for device in devices() for backend in backends(device)]


def describe(case):
    """The fields of a workload, for the benchmark record."""
    return dataclasses.asdict(case) | {"workload": type(case).__name__}
