"""Triton kernels of deform_conv2d (modulated deformable convolution, torchvision's contract).

Registered with `torch.library.custom_op` as "vsr_kernels::deform_conv2d_triton" and
"vsr_kernels::deform_conv2d_triton_backward" (the schemas of the C++ ops); fake tensors and
autograd come from vsr_kernels.ops.deform_conv2d's OpSpec.

Implicit GEMM: no column buffer. A program gathers bilinear samples straight into a
[BLOCK_P positions, BLOCK_R] register tile of the column matrix (R = (input channel, kernel
point) of one weight group, torchvision's weight order) and multiplies it by a weight tile
with `tl.dot`, accumulating in float32 (float16, bfloat16, float32 with
input_precision="ieee": no TF32, so results match the oracle) or float64 (a broadcast
multiply-sum: tl.dot has no float64).

Backward, deterministic (no float atomics):
- `_input_grad_kernel`, one program per (batch element, offset group), owning that group's
  input channels: per block of positions and kernel point, the column gradient
  grad_out tileᵀ · weight (tl.dot), the offset and mask gradients (reduced over the group's
  channels inside the program, so written once), and the bilinear scatter into grad_input,
  done one position at a time in a fixed order through a per-program scratch tile (vectorised
  over channels, which are distinct addresses).
- `_weight_grad_kernel`, one program per (weight group, output-channel block, R block):
  Σ over batch elements and position blocks, in order, of grad_out tile · gathered columns.
The bias gradient is grad_out summed over (B, Ho, Wo) by torch.
"""

import torch
import triton
import triton.language as tl

from . import _launch


@triton.jit
def _columns(input_ptr, offset_ptr, mask_ptr, b, p, r, c0, C, H, W, Wo, HoWo, cin_g, cpg, G,
             KH: tl.constexpr, KW: tl.constexpr, sh, sw, ph, pw, dh, dw, HAS_MASK: tl.constexpr,
             ACC: tl.constexpr):
    """The [BLOCK_P, BLOCK_R] tile of modulated samples: position p, column r = c_local * kh kw
    + k of the weight group whose first input channel is c0 (r >= cin_g kh kw or p >= HoWo: 0)."""
    KK: tl.constexpr = KH * KW
    p_ok = p < HoWo
    r_ok = r < cin_g * KK
    c = c0 + r // KK
    k = r % KK
    og = c // cpg
    ho = p // Wo
    wo = p % Wo
    ok = p_ok[:, None] & r_ok[None, :]
    ch = 2 * (og * KK + k)  # channel of dy
    b64 = tl.cast(b, tl.int64)
    off_base = offset_ptr + b64 * (2 * G * KK * HoWo)
    pos = p[:, None].to(tl.int64)
    dy = tl.load(off_base + ch[None, :].to(tl.int64) * HoWo + pos, mask=ok, other=0.0).to(ACC)
    dx = tl.load(off_base + (ch + 1)[None, :].to(tl.int64) * HoWo + pos, mask=ok, other=0.0).to(ACC)
    y = (ho * sh - ph)[:, None].to(ACC) + (k // KW * dh)[None, :].to(ACC) + dy
    x = (wo * sw - pw)[:, None].to(ACC) + (k % KW * dw)[None, :].to(ACC) + dx
    v = _launch.bilinear_sample(input_ptr + b64 * C * H * W, c[None, :].to(tl.int64) * H * W, y, x, H, W, ok, ACC)
    if HAS_MASK:
        m = tl.load(mask_ptr + b64 * (G * KK * HoWo) + (og * KK + k)[None, :].to(tl.int64) * HoWo + pos,
                    mask=ok, other=0.0).to(ACC)
        v = v * m
    return tl.where(ok, v, 0.0)


@triton.jit
def _forward_kernel(input_ptr, offset_ptr, weight_ptr, mask_ptr, bias_ptr, out_ptr,
                    C, H, W, Cout, Wo, HoWo, cin_g, cout_g, cpg, G, sh, sw, ph, pw, dh, dw,
                    KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr, HAS_BIAS: tl.constexpr,
                    BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                    USE_DOT: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr = False):
    pid_p = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_bg = tl.program_id(2)
    groups = C // cin_g
    b = pid_bg // groups
    gr = pid_bg % groups
    p = pid_p * BLOCK_P + tl.arange(0, BLOCK_P)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < cout_g
    o = gr * cout_g + n
    R = cin_g * KH * KW
    acc = tl.zeros((BLOCK_P, BLOCK_N), ACC)
    for r0 in range(0, R, BLOCK_R):
        r = r0 + tl.arange(0, BLOCK_R)
        cols = _columns(input_ptr, offset_ptr, mask_ptr, b, p, r, gr * cin_g, C, H, W, Wo, HoWo, cin_g, cpg, G,
                        KH, KW, sh, sw, ph, pw, dh, dw, HAS_MASK, ACC)
        w = tl.load(weight_ptr + o[None, :].to(tl.int64) * R + r[:, None], mask=(r < R)[:, None] & n_ok[None, :],
                    other=0.0)
        if USE_DOT:
            acc += tl.dot(_launch.dot_operand(cols.to(w.dtype), ACC, INTERPRETED), _launch.dot_operand(w, ACC, INTERPRETED),
                          input_precision="ieee", out_dtype=tl.float32)
        else:
            acc += tl.sum(cols[:, :, None] * w.to(ACC)[None, :, :], axis=1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + o, mask=n_ok, other=0.0).to(ACC)[None, :]
    ok = (p < HoWo)[:, None] & n_ok[None, :]
    dst = out_ptr + b.to(tl.int64) * Cout * HoWo + o[None, :].to(tl.int64) * HoWo + p[:, None]
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=ok)


@triton.jit
def _input_grad_kernel(grad_out_ptr, input_ptr, offset_ptr, weight_ptr, mask_ptr, grad_input_ptr,
                       grad_offset_ptr, grad_mask_ptr, scratch_ptr,
                       C, H, W, Cout, Wo, HoWo, cin_g, cout_g, cpg, G, sh, sw, ph, pw, dh, dw,
                       KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
                       BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_O: tl.constexpr,
                       USE_DOT: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr = False):
    KK: tl.constexpr = KH * KW
    pid = tl.program_id(0)
    b = pid // G
    og = pid % G
    b64 = tl.cast(b, tl.int64)
    R = cin_g * KK
    in_base = input_ptr + b64 * C * H * W
    gin_base = grad_input_ptr + b64 * C * H * W
    off_base = offset_ptr + b64 * (2 * G * KK * HoWo)
    scratch = scratch_ptr + pid.to(tl.int64) * BLOCK_P * BLOCK_C
    sp = tl.arange(0, BLOCK_P)
    sc = tl.arange(0, BLOCK_C)
    for p0 in range(0, HoWo, BLOCK_P):
        p = p0 + sp
        p_ok = p < HoWo
        ho = p // Wo
        wo = p % Wo
        for k in range(KK):
            dy = tl.load(off_base + (2 * (og * KK + k)) * HoWo + p, mask=p_ok, other=0.0).to(ACC)
            dx = tl.load(off_base + (2 * (og * KK + k) + 1) * HoWo + p, mask=p_ok, other=0.0).to(ACC)
            if HAS_MASK:
                m = tl.load(mask_ptr + b64 * (G * KK * HoWo) + (og * KK + k) * HoWo + p, mask=p_ok,
                            other=0.0).to(ACC)
            else:
                m = tl.full((BLOCK_P,), 1.0, ACC)
            y = (ho * sh - ph + k // KW * dh).to(ACC) + dy
            x = (wo * sw - pw + k % KW * dw).to(ACC) + dx
            g_y = tl.zeros((BLOCK_P,), ACC)
            g_x = tl.zeros((BLOCK_P,), ACC)
            g_m = tl.zeros((BLOCK_P,), ACC)
            for c0 in range(og * cpg, og * cpg + cpg, BLOCK_C):
                c = c0 + sc
                c_ok = c < og * cpg + cpg
                gr_c = c // cin_g
                # Column gradient [P, C]: Σ_o grad_out[o, p] weight[o, c - gr cin_g, k] over o of c's group.
                gcol = tl.zeros((BLOCK_P, BLOCK_C), ACC)
                for o0 in range(0, Cout, BLOCK_O):
                    o = o0 + tl.arange(0, BLOCK_O)
                    o_ok = o < Cout
                    go = tl.load(grad_out_ptr + b64 * Cout * HoWo + o[None, :].to(tl.int64) * HoWo + p[:, None],
                                 mask=p_ok[:, None] & o_ok[None, :], other=0.0)
                    same = (o[:, None] // cout_g) == gr_c[None, :]
                    w = tl.load(weight_ptr + o[:, None].to(tl.int64) * R + ((c - gr_c * cin_g) * KK + k)[None, :],
                                mask=o_ok[:, None] & c_ok[None, :] & same, other=0.0)
                    if USE_DOT:
                        gcol += tl.dot(_launch.dot_operand(go.to(w.dtype), ACC, INTERPRETED),
                                       _launch.dot_operand(w, ACC, INTERPRETED), input_precision="ieee",
                                       out_dtype=tl.float32)
                    else:
                        gcol += tl.sum(go.to(ACC)[:, :, None] * w.to(ACC)[None, :, :], axis=1)
                ok = p_ok[:, None] & c_ok[None, :]
                plane = c[None, :].to(tl.int64) * H * W
                # The samples and their coordinate gradients (NaN coordinates: NaN in all three).
                val, vy, vx = _launch.bilinear_sample_grad(in_base, plane, y[:, None], x[:, None], H, W, ok, ACC)
                gcol = tl.where(ok, gcol, 0.0)
                g_m += tl.sum(gcol * val, axis=1)
                gs = gcol * m[:, None]
                g_y += tl.sum(gs * vy, axis=1)
                g_x += tl.sum(gs * vx, axis=1)
                # Scatter gs * weight into grad_input, one position at a time (fixed order).
                tl.store(scratch + sp[:, None] * BLOCK_C + sc[None, :], gs)
                tl.debug_barrier()
                for i in range(0, BLOCK_P):
                    pi = p0 + i
                    if pi < HoWo:
                        # Position i's coordinates, broadcast over the channel vector.
                        yi = tl.zeros((BLOCK_C,), ACC) + tl.sum(tl.where(sp == i, y, 0.0), axis=0)
                        xi = tl.zeros((BLOCK_C,), ACC) + tl.sum(tl.where(sp == i, x, 0.0), axis=0)
                        gi = tl.load(scratch + i * BLOCK_C + sc)
                        ins = (yi > -1.0) & (yi < H) & (xi > -1.0) & (xi < W)
                        yfi = tl.floor(yi)
                        xfi = tl.floor(xi)
                        lyi = yi - yfi
                        lxi = xi - xfi
                        y0i = tl.where(ins, yfi, 0.0).to(tl.int32)
                        x0i = tl.where(ins, xfi, 0.0).to(tl.int32)
                        for n in tl.static_range(4):
                            ys_ = y0i + n // 2
                            xs_ = x0i + n % 2
                            wys = lyi if n // 2 == 1 else 1.0 - lyi
                            wxs = lxi if n % 2 == 1 else 1.0 - lxi
                            ok_s = ins & (ys_ >= 0) & (ys_ < H) & (xs_ >= 0) & (xs_ < W)
                            dst = gin_base + c.to(tl.int64) * H * W + (ys_ * W + xs_).to(tl.int64)
                            cur = tl.load(dst, mask=c_ok & ok_s, other=0.0)
                            tl.store(dst, cur + gi * (wys * wxs), mask=c_ok & ok_s)
                        tl.debug_barrier()
            go_base = grad_offset_ptr + b64 * (2 * G * KK * HoWo)
            tl.store(go_base + (2 * (og * KK + k)) * HoWo + p, g_y, mask=p_ok)
            tl.store(go_base + (2 * (og * KK + k) + 1) * HoWo + p, g_x, mask=p_ok)
            if HAS_MASK:
                tl.store(grad_mask_ptr + b64 * (G * KK * HoWo) + (og * KK + k) * HoWo + p, g_m, mask=p_ok)


@triton.jit
def _weight_grad_kernel(grad_out_ptr, input_ptr, offset_ptr, mask_ptr, grad_weight_ptr,
                        B, C, H, W, Cout, Wo, HoWo, cin_g, cout_g, cpg, G, sh, sw, ph, pw, dh, dw,
                        KH: tl.constexpr, KW: tl.constexpr, HAS_MASK: tl.constexpr,
                        BLOCK_P: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                        USE_DOT: tl.constexpr, ACC: tl.constexpr, INTERPRETED: tl.constexpr = False):
    pid_n = tl.program_id(0)
    pid_r = tl.program_id(1)
    gr = tl.program_id(2)
    R = cin_g * KH * KW
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    r = pid_r * BLOCK_R + tl.arange(0, BLOCK_R)
    n_ok = n < cout_g
    o = gr * cout_g + n
    acc = tl.zeros((BLOCK_N, BLOCK_R), ACC)
    for b in range(0, B):
        for p0 in range(0, HoWo, BLOCK_P):
            p = p0 + tl.arange(0, BLOCK_P)
            cols = _columns(input_ptr, offset_ptr, mask_ptr, b, p, r, gr * cin_g, C, H, W, Wo, HoWo, cin_g, cpg, G,
                            KH, KW, sh, sw, ph, pw, dh, dw, HAS_MASK, ACC)
            go = tl.load(grad_out_ptr + tl.cast(b, tl.int64) * Cout * HoWo + o[:, None].to(tl.int64) * HoWo + p[None, :],
                         mask=n_ok[:, None] & (p < HoWo)[None, :], other=0.0)
            if USE_DOT:
                acc += tl.dot(_launch.dot_operand(go, ACC, INTERPRETED), _launch.dot_operand(cols.to(go.dtype), ACC, INTERPRETED),
                              input_precision="ieee", out_dtype=tl.float32)
            else:
                acc += tl.sum(go.to(ACC)[:, :, None] * cols[None, :, :], axis=1)
    dst = grad_weight_ptr + o[:, None].to(tl.int64) * R + r[None, :]
    tl.store(dst, acc, mask=n_ok[:, None] & (r < R)[None, :])


# ---------------------------------------------------------------------------------------
# Dispatch.

KERNELS = {"forward": _forward_kernel, "input_grad": _input_grad_kernel, "weight_grad": _weight_grad_kernel}
# Warps per program, by kernel and dtype: what compiles without spills on sm_80 / sm_90
# (tools/check_gpu_build.py); ptxas caps registers lower at 8 warps for some kernels.
_H, _B, _F, _D = torch.float16, torch.bfloat16, torch.float32, torch.float64
NUM_WARPS = {
    "forward": {_H: 4, _B: 4, _F: 8, _D: 4},
    "input_grad": {_H: 8, _B: 8, _F: 8, _D: 8},
    "weight_grad": {_H: 4, _B: 4, _F: 4, _D: 4},
}
DTYPES = (_H, _B, _F, _D)
# Tiles: tl.dot needs every dimension >= 16. float64 (no tl.dot) uses a broadcast product of
# BLOCK_P x BLOCK_R x BLOCK_N values, so its tiles are smaller.
TILES = {
    "forward": dict(BLOCK_P=64, BLOCK_N=32, BLOCK_R=16),
    "input_grad": dict(BLOCK_P=32, BLOCK_C=16, BLOCK_O=32),
    "weight_grad": dict(BLOCK_P=16, BLOCK_N=32, BLOCK_R=16),
}
TILES_FLOAT64 = {
    "forward": dict(BLOCK_P=32, BLOCK_N=16, BLOCK_R=16),
    "input_grad": dict(BLOCK_P=16, BLOCK_C=16, BLOCK_O=16),
    "weight_grad": dict(BLOCK_P=16, BLOCK_N=16, BLOCK_R=16),
}
SCALAR_TYPES = {}
KERNEL_SIZES = ((1, 1), (3, 3), (5, 5), (1, 3), (3, 1))  # compiled by compile_all; others compile on demand


def launch_config(kernel: str, dtype: torch.dtype, kh: int, kw: int, has_mask: bool,
                  has_bias: bool = False) -> _launch.LaunchConfig:
    tiles = TILES_FLOAT64 if dtype == torch.float64 else TILES
    # tl.dot has no float64. (Under the interpreter, whose tl.dot mishandles bfloat16, the
    # launcher's INTERPRETED flag widens the operands: see _launch.dot_operand.)
    use_dot = dtype != torch.float64
    constexprs = dict(tiles[kernel], KH=kh, KW=kw, HAS_MASK=has_mask, USE_DOT=use_dot)
    if kernel == "forward":
        constexprs["HAS_BIAS"] = has_bias
    # Narrower tiles where the default ones spill (tools/check_gpu_build.py): the half-precision
    # input gradient on sm_80 (8 bytes) and the float32 weight gradient on sm_90 (10 bytes).
    if kernel == "input_grad" and dtype in (_H, _B):
        constexprs.update(BLOCK_O=16, BLOCK_P=16)
    if kernel == "weight_grad" and dtype == _F:
        constexprs["BLOCK_N"] = 16
    return _launch.LaunchConfig(kernel, tuple(sorted(constexprs.items())), NUM_WARPS[kernel][dtype])


def _dtype_configs(dtype: torch.dtype) -> set:
    """Every config the ops launch in `dtype` (warps, tiles and tl.dot depend on the dtype)."""
    return {launch_config(kernel, dtype, kh, kw, mask, has_bias=mask) for kernel in KERNELS
            for kh, kw in KERNEL_SIZES for mask in (False, True)}


all_launch_configs, config_dtype_names = _launch.configs_by_dtype(_dtype_configs, DTYPES)


launch = _launch.launcher(KERNELS)


def _pointer_types(kernel: str, dtype: torch.dtype) -> list:
    data, acc = str(_launch.TL_DTYPES[dtype]), str(_launch.TL_DTYPES[_launch.accumulation_dtype(dtype)])
    if kernel == "forward":
        return [dict(input_ptr=data, offset_ptr=data, weight_ptr=data, mask_ptr=data, bias_ptr=data, out_ptr=data)]
    if kernel == "input_grad":
        return [dict(grad_out_ptr=data, input_ptr=data, offset_ptr=data, weight_ptr=data, mask_ptr=data,
                     grad_input_ptr=acc, grad_offset_ptr=acc, grad_mask_ptr=acc, scratch_ptr=acc)]
    return [dict(grad_out_ptr=data, input_ptr=data, offset_ptr=data, mask_ptr=data, grad_weight_ptr=acc)]


def compile_all(archs=(80, 90), dtype_names=_launch.FLOAT_DTYPE_NAMES) -> list:
    """Compiles every launch config in the dtypes it is launched in (of `dtype_names`) for
    `archs`. See _launch.compile_all."""
    return _launch.compile_all(KERNELS, all_launch_configs(), _pointer_types, SCALAR_TYPES, archs, dtype_names,
                               config_dtype_names)


def _check(op, input, offset, weight, mask, bias, stride, padding, dilation, grad_out=None):
    """What the kernels index by, checked: a direct torch.ops call bypasses the public checks.
    Raises ValueError (sizes, values) or TypeError (dtypes) naming the argument."""
    named = {"input": input, "offset": offset, "weight": weight, "mask": mask, "bias": bias, "grad_out": grad_out}
    for name, t in named.items():
        if t is not None and t.dim() != (1 if name == "bias" else 4):
            raise ValueError(f"{op}: {name} must be {1 if name == 'bias' else 4}-D, got shape {tuple(t.shape)}")
    for name, v, lo in (("stride", stride, 1), ("padding", padding, 0), ("dilation", dilation, 1)):
        if len(v) != 2 or min(v) < lo or max(v) > 2**31 - 1:
            raise ValueError(f"{op}: {name} must be two integers in [{lo}, 2**31 - 1], got {list(v)}")
    B, C, H, W = input.shape
    Cout, cin_g, kh, kw = weight.shape
    if kh < 1 or kw < 1 or cin_g < 1 or C % cin_g or Cout % (C // cin_g or 1) or C == 0:
        raise ValueError(f"{op}: weight {tuple(weight.shape)} does not fit input {tuple(input.shape)} "
                         "(C must be a positive multiple of weight.size(1), weight.size(0) of the groups)")
    K = kh * kw
    G = offset.shape[1] // (2 * K)
    if G < 1 or offset.shape[1] != 2 * K * G or C % G:
        raise ValueError(f"{op}: offset channels ({offset.shape[1]}) must be 2 kh kw G with G dividing C = {C}")
    Ho = (H + 2 * padding[0] - dilation[0] * (kh - 1) - 1) // stride[0] + 1
    Wo = (W + 2 * padding[1] - dilation[1] * (kw - 1) - 1) // stride[1] + 1
    if Ho < 1 or Wo < 1:
        raise ValueError(f"{op}: the dilated kernel does not fit the padded input (output {Ho} x {Wo})")
    want = {"offset": (B, 2 * K * G, Ho, Wo), "mask": (B, K * G, Ho, Wo), "bias": (Cout,),
            "grad_out": (B, Cout, Ho, Wo)}
    for name, shape in want.items():
        t = named[name]
        if t is not None and tuple(t.shape) != shape:
            raise ValueError(f"{op}: {name} must have shape {shape}, got {tuple(t.shape)}")
    for name, t in named.items():
        if t is not None and (t.dtype != input.dtype or t.device != input.device):
            raise TypeError(f"{op}: {name} must have input's dtype and device ({input.dtype}, {input.device}), "
                            f"got {t.dtype}, {t.device}")
    if input.dtype not in _launch.TL_DTYPES:
        raise TypeError(f"{op}: input must be float16, bfloat16, float32 or float64, got {input.dtype}")


def _geometry(input, offset, weight, stride, padding, dilation):
    B, C, H, W = input.shape
    Cout, cin_g, kh, kw = weight.shape
    Ho, Wo = offset.shape[2], offset.shape[3]
    G = offset.shape[1] // (2 * kh * kw)
    return (B, C, H, W, Cout, Ho, Wo, cin_g, Cout // (C // cin_g), C // G, G, kh, kw,
            (*stride, *padding, *dilation))


@torch.library.custom_op("vsr_kernels::deform_conv2d_triton", mutates_args=())
def deform_conv2d(input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor, mask: torch.Tensor | None,
                  bias: torch.Tensor | None, stride: list[int], padding: list[int], dilation: list[int]
                  ) -> torch.Tensor:
    _check("vsr_kernels.deform_conv2d_triton", input, offset, weight, mask, bias, stride, padding, dilation)
    B, C, H, W, Cout, Ho, Wo, cin_g, cout_g, cpg, G, kh, kw, hyper = _geometry(input, offset, weight, stride,
                                                                               padding, dilation)
    out = input.new_empty((B, Cout, Ho, Wo))
    if out.numel() == 0:
        return out
    x, off, w = input.contiguous(), offset.contiguous(), weight.contiguous()
    m = mask.contiguous() if mask is not None else x
    bi = bias.contiguous() if bias is not None else x
    config = launch_config("forward", input.dtype, kh, kw, mask is not None, bias is not None)
    tiles = dict(config.constexprs)
    groups = C // cin_g
    grid = (triton.cdiv(Ho * Wo, tiles["BLOCK_P"]), triton.cdiv(cout_g, tiles["BLOCK_N"]), B * groups)
    with _launch.device_guard(input):
        launch(config, grid, x, off, w, m, bi, out, C, H, W, Cout, Wo, Ho * Wo, cin_g, cout_g, cpg, G, *hyper,
               dtype=input.dtype)
    return out


@torch.library.custom_op("vsr_kernels::deform_conv2d_triton_backward", mutates_args=())
def deform_conv2d_backward(grad_out: torch.Tensor, input: torch.Tensor, offset: torch.Tensor, weight: torch.Tensor,
                           mask: torch.Tensor | None, bias: torch.Tensor | None, stride: list[int],
                           padding: list[int], dilation: list[int]
                           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    _check("vsr_kernels.deform_conv2d_triton_backward", input, offset, weight, mask, bias, stride, padding,
           dilation, grad_out)
    B, C, H, W, Cout, Ho, Wo, cin_g, cout_g, cpg, G, kh, kw, hyper = _geometry(input, offset, weight, stride,
                                                                               padding, dilation)
    acc = _launch.accumulation_dtype(input.dtype)
    opts = dict(dtype=acc, device=input.device)
    grad_input = torch.zeros((B, C, H, W), **opts)
    grad_offset = torch.zeros(offset.shape, **opts)
    grad_mask = torch.zeros(mask.shape if mask is not None else (0,), **opts)
    grad_weight = torch.zeros(weight.shape, **opts)
    go = grad_out.contiguous()
    grad_bias = go.to(acc).sum((0, 2, 3)) if go.numel() else torch.zeros((Cout,), **opts)
    if B * Ho * Wo > 0 and C > 0:
        x, off, w = input.contiguous(), offset.contiguous(), weight.contiguous()
        m = mask.contiguous() if mask is not None else x
        has_mask = mask is not None
        config = launch_config("input_grad", input.dtype, kh, kw, has_mask)
        t = dict(config.constexprs)
        scratch = torch.empty((B * G, t["BLOCK_P"], t["BLOCK_C"]), **opts)
        sizes = (C, H, W, Cout, Wo, Ho * Wo, cin_g, cout_g, cpg, G, *hyper)
        with _launch.device_guard(input):
            launch(config, (B * G,), go, x, off, w, m, grad_input, grad_offset,
                   grad_mask if has_mask else grad_offset, scratch, *sizes, dtype=input.dtype)
            config = launch_config("weight_grad", input.dtype, kh, kw, has_mask)
            t = dict(config.constexprs)
            grid = (triton.cdiv(cout_g, t["BLOCK_N"]), triton.cdiv(cin_g * kh * kw, t["BLOCK_R"]), C // cin_g)
            launch(config, grid, go, x, off, m, grad_weight, B, *sizes, dtype=input.dtype)
    dtype = input.dtype
    return (grad_input.to(dtype), grad_offset.to(dtype), grad_weight.to(dtype), grad_mask.to(dtype),
            grad_bias.to(dtype))
