"""Generic Triton machinery shared by the op modules (vsr_kernels.triton.<op>).

Host side: LaunchConfig (what a kernel is launched with), the dtype maps, `launcher` (the
launch function of a module's KERNELS), `strides` of frame tensors, the device guard, the
program count of row-blocked pixel kernels, and `compile_all`, which compiles every launch
configuration of a module for real GPU targets (see _compile.py).

Device side, @triton.jit helpers for per-pixel kernels over (B, T, C, H, W) frame stacks:
`pixel_block` (a program's pixels), `in_frame`, int64 `offsets` of channel x pixel tiles,
`channel_block`, and `map_offset` into a contiguous (frames, H, W) map.

An op module defines KERNELS ({name: JITFunction}), its config table and
all_launch_configs(), `launch = _launch.launcher(KERNELS)`, and
compile_all(archs, dtype_names) through this module's compile_all.
"""
import contextlib
import os
from collections.abc import Callable, Iterable
from typing import NamedTuple

import torch
import triton
import triton.language as tl

TL_DTYPES = {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16, torch.float32: tl.float32,
             torch.float64: tl.float64}
FLOAT_DTYPE_NAMES = ("float16", "bfloat16", "float32", "float64")


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """What kernels accumulate `dtype` data in: float64 for float64, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class LaunchConfig(NamedTuple):
    """One way a kernel is launched: its constexprs (the accumulation type ACC, which follows
    the data's dtype, excepted) and warps. Hashable, so configs can be collected in sets."""

    kernel: str  # a key of the module's KERNELS
    constexprs: tuple  # sorted (name, value) pairs
    num_warps: int

    @property
    def block_c(self) -> int:
        """The channel tile BLOCK_C (a constexpr of every channel-tiled kernel)."""
        return dict(self.constexprs)["BLOCK_C"]


def check_inputs(op: str, tensors: dict, dtype_of: str) -> None:
    """Validates the tensor arguments of a registered Triton op before any kernel reads them.

    The ops are public entry points (torch.ops.vsr_kernels.<op>_triton) with no Python checks
    in front, and a kernel indexes every tensor by sizes taken from one of them: a mismatch
    would read or write out of bounds. `tensors` maps each argument's name to (tensor, its
    dimension letters, e.g. "B T C H W"): every tensor must have that rank and each letter one
    size across all of them. Floating tensors share the dtype and every tensor the device of
    the argument named `dtype_of`. Raises ValueError naming the argument."""
    first, _ = tensors[dtype_of]
    sizes = {}
    for name, (t, dims) in tensors.items():
        letters = dims.split()
        if t.dim() != len(letters):
            raise ValueError(f"{op}: {name} must be {len(letters)}-D ({dims}), got shape {tuple(t.shape)}")
        if t.device != first.device:
            raise ValueError(f"{op}: {name} must be on {first.device} like {dtype_of}, got {t.device}")
        if t.is_floating_point() and t.dtype != first.dtype:
            raise ValueError(f"{op}: {name} must have dtype {first.dtype} like {dtype_of}, got {t.dtype}")
        for letter, size in zip(letters, t.shape):
            owner, expected = sizes.setdefault(letter, (name, size))
            if size != expected:
                raise ValueError(f"{op}: {name} must have {letter} = {expected} like {owner}, "
                                 f"got shape {tuple(t.shape)}")


def interpreting() -> bool:
    """Whether Triton kernels run in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


def launcher(kernels: dict) -> Callable:
    """launch(config, grid, *args, dtype): runs kernels[config.kernel] on `grid` with the
    config's constexprs and the accumulation type of `dtype`; an empty grid launches nothing.
    A kernel with an INTERPRETED constexpr gets INTERPRETED=True under the interpreter (see
    `dot_operand`)."""

    def launch(config: LaunchConfig, grid: tuple, *args, dtype: torch.dtype) -> None:
        if 0 in grid:  # no frames or no channels: nothing to compute
            return
        kernel = kernels[config.kernel]
        extra = {"INTERPRETED": True} if interpreting() and "INTERPRETED" in kernel.arg_names else {}
        kernel[grid](*args, ACC=TL_DTYPES[accumulation_dtype(dtype)], num_warps=config.num_warps,
                     **dict(config.constexprs), **extra)

    return launch


def strides(t: torch.Tensor) -> tuple:
    """(batch, frame, channel, y, x) strides of a (B, T, C, H, W) or (B, C, H, W) tensor
    (frame stride 0)."""
    if t.dim() == 4:
        return (t.stride(0), 0, *t.stride()[1:])
    return t.stride()


def device_guard(t: torch.Tensor):
    """Triton launches on the current device: make it the tensor's device."""
    return torch.cuda.device(t.device) if t.device.type == "cuda" else contextlib.nullcontext()


def row_blocks(H: int, W: int, block_p: int) -> int:
    """Programs per frame of `pixel_block` kernels: H rows of cdiv(W, block_p) blocks."""
    return H * triton.cdiv(W, block_p)


def configs_by_dtype(dtype_configs: Callable, dtypes: Iterable[torch.dtype]) -> tuple[Callable, Callable]:
    """all_launch_configs() and config_dtype_names(config) of an op module whose launch configs
    in each dtype are the set dtype_configs(dtype) (tests/test_gpu_build.py and
    tools/check_gpu_build.py compile every config, in the dtypes it is launched in only)."""
    dtypes = tuple(dtypes)

    def all_launch_configs() -> list:
        return sorted(set().union(*(dtype_configs(dtype) for dtype in dtypes)))

    def config_dtype_names(config: LaunchConfig) -> list:
        return [str(dtype).removeprefix("torch.") for dtype in dtypes if config in dtype_configs(dtype)]

    return all_launch_configs, config_dtype_names


def compile_all(kernels: dict, configs: Iterable[LaunchConfig], pointer_types: Callable, scalar_types: dict,
                archs: Iterable[int], dtype_names: Iterable[str],
                config_dtype_names: Callable | None = None) -> list:
    """Compiles every config in `configs` for every dtype in `dtype_names` ("float16", ...)
    and CUDA compute capability in `archs` (80, 90, ...): one report per compiled kernel (see
    _compile.compile_kernel) with its "dtype", "constexprs" and "pointers" types.
    pointer_types(kernel name, torch dtype) lists the pointer element types ({argument:
    "fp32", ...}) of each way the ops launch that kernel; scalar_types types the non-int32
    scalar arguments; config_dtype_names(config), if given, the dtype names a config is ever
    launched with (others are skipped). Needs a process without TRITON_INTERPRET=1, such as
    _compile.call_without_interpreter gives."""
    from . import _compile

    reports = []
    for config in configs:
        launched = dtype_names if config_dtype_names is None else config_dtype_names(config)
        for dtype in (getattr(torch, name) for name in dtype_names if name in launched):
            constexprs = dict(config.constexprs, ACC=TL_DTYPES[accumulation_dtype(dtype)])
            for pointers in pointer_types(config.kernel, dtype):
                for arch in archs:
                    report = _compile.compile_kernel(kernels[config.kernel], pointers, scalar_types,
                                                     constexprs, arch, config.num_warps)
                    reports.append(dict(report, dtype=str(dtype).removeprefix("torch."),
                                        constexprs=dict(config.constexprs), pointers=pointers))
    return reports


# ---------------------------------------------------------------------------------------
# @triton.jit helpers. Kernels read a feature tensor through five strides (batch, frame,
# channel, y, x); a (B, C, H, W) tensor has frame stride 0. Maps are contiguous (frames, H, W).

@triton.jit
def pixel_block(pid, H, W, BLOCK_P: tl.constexpr):
    """(frame number, y, x, in-frame mask) of program `pid`'s pixels: BLOCK_P consecutive
    pixels of one row (y is that row, broadcast). Frames are numbered b * T + t (or b for per-batch
    programs) and pixel blocks vary fastest, so neighbouring programs share their key rows
    in L2. Whole rows, not runs of the flattened frame, so that x is visibly contiguous
    (an arange, no modulo): the compiler then lays pixels, not channels, across the lanes."""
    blocks = tl.cdiv(W, BLOCK_P)
    block = pid % (H * blocks)
    x = (block % blocks) * BLOCK_P + tl.arange(0, BLOCK_P)
    y = tl.zeros([BLOCK_P], tl.int32) + block // blocks
    return pid // (H * blocks), y, x, x < W


@triton.jit
def in_frame(y, x, H, W):
    return (y >= 0) & (y < H) & (x >= 0) & (x < W)


@triton.jit
def offsets(c, y, x, sc, sy, sx):
    """int64 offsets (channel, pixel) of a [channels, pixels] tile."""
    pixel = y.to(tl.int64) * sy + x.to(tl.int64) * sx
    return c.to(tl.int64)[:, None] * sc + pixel[None, :]


@triton.jit
def channel_block(ptr, c0, sc):
    """`ptr` moved to channel c0, in int64."""
    return ptr + tl.cast(c0, tl.int64) * sc


@triton.jit
def map_offset(frame, y, x, H, W):
    """int64 offset of pixel (y, x) of frame `frame` in a contiguous (frames, H, W) map."""
    return (frame.to(tl.int64) * H + y) * W + x


@triton.jit
def dot_operand(x, ACC: tl.constexpr, INTERPRETED: tl.constexpr):
    """`x` ready for tl.dot. The interpreter stores bfloat16 as uint16 and its tl.dot multiplies
    those integers: there every operand is widened to the accumulation type ACC first, which
    gives the exact products the tensor cores accumulate. Compiled kernels take `x` as it is."""
    if INTERPRETED:
        x = x.to(ACC)
    return x


# Bilinear sampling with torchvision's deformable-convolution rule (csrc/common/bilinear.h is
# the C++ twin), shared by the deformable ops (deform_conv2d, deform_kernel_conv2d). A plane
# is (H, W), contiguous, at plane_ptr + plane_offset; y, x and plane_offset broadcast
# together (e.g. points [1, P] and planes [C, 1]); `ok` masks the lanes that may be read.

@triton.jit
def bilinear_sample(plane_ptr, plane_offset, y, x, H, W, ok, ACC: tl.constexpr):
    """The sample at (y, x): 0 outside (-1, H) x (-1, W), each neighbour outside reads 0 (one
    inside is read even at weight 0, so a NaN pixel spreads to its neighbours' samples); a NaN
    coordinate gives NaN. The geometry is computed in the points' shape, once for every plane."""
    inside = (y > -1.0) & (y < H) & (x > -1.0) & (x < W)
    y0f = tl.floor(y)
    x0f = tl.floor(x)
    ly = y - y0f
    lx = x - x0f
    y0 = tl.where(inside, y0f, 0.0).to(tl.int32)
    x0 = tl.where(inside, x0f, 0.0).to(tl.int32)
    v = tl.zeros((ok & inside).shape, ACC)
    for n in tl.static_range(4):
        yy = y0 + n // 2
        xx = x0 + n % 2
        wy = ly if n // 2 == 1 else 1.0 - ly
        wx = lx if n % 2 == 1 else 1.0 - lx
        valid = inside & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        val = tl.load(plane_ptr + plane_offset + (yy * W + xx).to(tl.int64), mask=ok & valid, other=0.0).to(ACC)
        v += tl.where(valid, wy * wx, 0.0) * val  # val is 0 where not read
    nan = (y != y) | (x != x)
    return tl.where(nan & ok, y + x, v)


@triton.jit
def bilinear_sample_grad(plane_ptr, plane_offset, y, x, H, W, ok, ACC: tl.constexpr):
    """(sample, d sample / dy, d sample / dx) at (y, x), `bilinear_sample`'s rule. The
    coordinate gradient is the one-sided derivative towards +1 where the sample is not
    differentiable, the -1 edge included (where the sample is 0 but grows towards the plane);
    a NaN coordinate gives NaN in all three, in every lane (callers weight the lanes ~ok by 0
    and sum them with lanes at the same point, which are NaN too)."""
    region = (y >= -1.0) & (y < H) & (x >= -1.0) & (x < W)
    inside = region & (y > -1.0) & (x > -1.0)
    y0f = tl.floor(y)
    x0f = tl.floor(x)
    ly = y - y0f
    lx = x - x0f
    y0 = tl.where(region, y0f, 0.0).to(tl.int32)
    x0 = tl.where(region, x0f, 0.0).to(tl.int32)
    val = tl.zeros((ok & region).shape, ACC)
    vy = tl.zeros((ok & region).shape, ACC)
    vx = tl.zeros((ok & region).shape, ACC)
    for n in tl.static_range(4):
        yy = y0 + n // 2
        xx = x0 + n % 2
        wy = ly if n // 2 == 1 else 1.0 - ly
        wx = lx if n % 2 == 1 else 1.0 - lx
        sy = 1.0 if n // 2 == 1 else -1.0
        sx = 1.0 if n % 2 == 1 else -1.0
        valid = region & (yy >= 0) & (yy < H) & (xx >= 0) & (xx < W)
        v = tl.load(plane_ptr + plane_offset + (yy * W + xx).to(tl.int64), mask=ok & valid, other=0.0).to(ACC)
        # On the -1 edge the sample is 0 even next to a NaN pixel; the gradients read it.
        val += tl.where(valid & inside, (wy * wx) * v, 0.0)
        vy += (sy * wx) * v  # v is 0 where not read
        vx += (wy * sx) * v
    poison = tl.where((y != y) | (x != x), y + x, 0.0)  # in the points' shape (lanes ~ok: see above)
    return val + poison, vy + poison, vx + poison
