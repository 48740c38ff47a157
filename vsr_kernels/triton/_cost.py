"""A roofline cost model for choosing between kernel formulations without a GPU.

A kernel's predicted time is the largest of the times its resources need, assuming they
overlap (enough warps in flight):

- DRAM: the bytes that must cross device memory (each input read once, each output written
  once) over the bandwidth;
- L2: the bytes the programs pull from L2 (halo re-reads, gathers) over L2's bandwidth;
- LSU: the warp-wide load/store instructions over the SMs' issue rate of one per SM-cycle (a
  scalar 2-byte load per lane moves 64 bytes an instruction, far under L1's 128 bytes/cycle);
- math: tensor-core FLOPs over the tensor-core rate, plus FMA FLOPs and the other per-lane
  ALU operations (masks, compares, selects, address arithmetic, conversions) over the lanes'
  rate. Math is one term (the same warps issue both), not overlapped with itself.

The fraction of the DRAM roofline is the DRAM time over the predicted time. These are
predictions: the rates below are datasheet or measured figures (marked), the instruction counts
come from reading the kernels, and a GPU run replaces them (benchmarks/workloads/*.py time the
formulations side by side).
"""
from typing import NamedTuple


class Hardware(NamedTuple):
    name: str
    sms: int
    clock_hz: float  # boost clock of the SMs
    dram_bytes_per_s: float  # measured device-to-device copy where known (read + written)
    l2_bytes_per_s: float  # not measured here: a lead from public microbenchmarks
    tensor_flops: dict  # dense tensor-core FLOP/s per operand dtype name ("bfloat16", ...)
    fma_lanes_per_sm: int  # fp32 lanes per SM per cycle (an FMA is 2 FLOPs)
    alu_ops_per_sm: int  # blended int32/fp32 simple ops per SM per cycle (int32 issues at half the fp32 rate)
    lsu_instructions_per_sm: float = 1.0  # warp-wide memory instructions per SM per cycle

    @property
    def fma_flops(self) -> float:
        return 2 * self.fma_lanes_per_sm * self.sms * self.clock_hz

    @property
    def alu_ops_per_s(self) -> float:
        return self.alu_ops_per_sm * self.sms * self.clock_hz

    @property
    def lsu_per_s(self) -> float:
        return self.lsu_instructions_per_sm * self.sms * self.clock_hz


# Measured on this workplace's machines (/work/.library/device/KINDS.md): H100 80GB HBM3 copy
# 3.0 TB/s and bf16 matrix product 798 TFLOP/s; H200 copy 4.3 TB/s and 788 TFLOP/s. float16
# runs at the bf16 rate, tf32 at half of it, float64 on the DMMA units (67 TFLOP/s datasheet).
# The rest are datasheet figures (H100 SXM: 132 SMs at 1.98 GHz, 128 fp32 lanes per SM).
H100 = Hardware("H100 SXM", 132, 1.98e9, 3.0e12, 7.5e12,
                {"float16": 798e12, "bfloat16": 798e12, "float32": 399e12, "float64": 67e12}, 128, 96)
H200 = Hardware("H200", 132, 1.98e9, 4.3e12, 7.5e12,
                {"float16": 788e12, "bfloat16": 788e12, "float32": 394e12, "float64": 67e12}, 128, 96)
TARGETS = {"H100": H100, "H200": H200}

# Tensor-core efficiency of small in-kernel tiles (M <= 128 rows, 16 to 64 channels deep, the
# operands staged through shared memory by the kernel itself) relative to a large GEMM's rate.
SMALL_TILE_TENSOR_EFFICIENCY = 0.5


class Work(NamedTuple):
    """What one kernel launch must do."""
    dram_bytes: float
    l2_bytes: float
    memory_instructions: float  # warp-wide loads and stores
    tensor_flops: float
    tensor_dtype: str  # the tensor-core operand dtype of tensor_flops
    fma_flops: float
    alu_ops: float  # per-lane operations besides the FMAs


class Prediction(NamedTuple):
    seconds: float
    dram_seconds: float
    l2_seconds: float
    lsu_seconds: float
    math_seconds: float

    @property
    def dram_fraction(self) -> float:
        """The fraction of the DRAM roofline: DRAM time over the predicted time."""
        return self.dram_seconds / self.seconds if self.seconds > 0 else 1.0

    @property
    def bound(self) -> str:
        terms = {"DRAM": self.dram_seconds, "L2": self.l2_seconds, "LSU": self.lsu_seconds,
                 "math": self.math_seconds}
        return max(terms, key=terms.get)


def predict(work: Work, hw: Hardware) -> Prediction:
    dram = work.dram_bytes / hw.dram_bytes_per_s
    l2 = work.l2_bytes / hw.l2_bytes_per_s
    lsu = work.memory_instructions / hw.lsu_per_s
    tensor = 0.0
    if work.tensor_flops:
        tensor = work.tensor_flops / (hw.tensor_flops[work.tensor_dtype] * SMALL_TILE_TENSOR_EFFICIENCY)
    math = tensor + work.fma_flops / hw.fma_flops + work.alu_ops / hw.alu_ops_per_s
    return Prediction(max(dram, l2, lsu, math), dram, l2, lsu, math)
