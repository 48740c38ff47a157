"""The deform_conv2d float64 sweep (shared by tests/test_deform_conv2d_reference.py and
tools/compare_torchvision.py) and a plain per-output loop oracle of torchvision's contract
that never calls the reference's gathers."""
import math

import torch

from vsr_kernels.reference.deform_conv2d import output_size


def sample_point(plane, y, x):
    """torchvision's bilinear rule on one channel (a list of rows), in Python floats."""
    H, W = len(plane), len(plane[0]) if plane else 0
    if math.isnan(y) or math.isnan(x):
        return float("nan")
    if y <= -1 or y >= H or x <= -1 or x >= W:
        return 0.0
    y0, x0 = math.floor(y), math.floor(x)
    ly, lx = y - y0, x - x0
    total = 0.0
    for yy, wy in ((y0, 1 - ly), (y0 + 1, ly)):
        for xx, wx in ((x0, 1 - lx), (x0 + 1, lx)):
            if 0 <= yy < H and 0 <= xx < W:
                total += wy * wx * plane[yy][xx]
    return total


def oracle(input, offset, weight, bias=None, stride=1, padding=0, dilation=1, mask=None):
    """Loop over every output element, in float64."""
    pair = (lambda v: tuple(v) if isinstance(v, (tuple, list)) else (v, v))
    (sh, sw), (ph, pw), (dh, dw) = pair(stride), pair(padding), pair(dilation)
    B, C, H, W = input.shape
    Cout, Cg, kh, kw = weight.shape
    K = kh * kw
    groups, G = C // Cg, offset.shape[1] // (2 * K)
    Ho, Wo = output_size(H, W, (kh, kw), stride, padding, dilation)
    x64, off, w64 = input.double().tolist(), offset.double().tolist(), weight.double()
    m = mask.double().tolist() if mask is not None else None
    out = torch.zeros(B, Cout, Ho, Wo, dtype=torch.float64)
    for b in range(B):
        for oy in range(Ho):
            for ox in range(Wo):
                # cols[c][k]: the modulated sample of channel c at kernel point k
                cols = torch.zeros(C, K, dtype=torch.float64)
                for c in range(C):
                    g = c // (C // G)
                    for i in range(kh):
                        for j in range(kw):
                            k = i * kw + j
                            y = oy * sh - ph + i * dh + off[b][2 * (g * K + k)][oy][ox]
                            x = ox * sw - pw + j * dw + off[b][2 * (g * K + k) + 1][oy][ox]
                            v = sample_point(x64[b][c], y, x)
                            if m is not None:
                                v *= m[b][g * K + k][oy][ox]
                            cols[c, k] = v
                for o in range(Cout):
                    gi = o // (Cout // groups)
                    acc = (w64[o].reshape(Cg, K) * cols[gi * Cg:(gi + 1) * Cg]).sum()
                    out[b, o, oy, ox] = acc + (float(bias[o]) if bias is not None else 0.0)
    return out


# (B, C_in, C_out, H, W, (kh, kw), groups, offset_groups, stride, padding, dilation, mask, offsets)
# offsets: "random" (within ~2 px), "outside" (a third far outside the image), "integer" (whole
# pixels), "boundary" (points exactly on -1, 0, H-1, H and just inside -1 / H), "mixed".
SWEEP = [
    (1, 2, 2, 5, 5, (3, 3), 1, 1, 1, 1, 1, False, "random"),
    (2, 4, 4, 6, 5, (3, 3), 1, 1, 1, 1, 1, True, "random"),
    (1, 4, 6, 7, 6, (3, 3), 2, 1, 1, 1, 1, True, "random"),
    (1, 4, 4, 6, 6, (3, 3), 1, 2, 1, 1, 1, True, "random"),
    (1, 4, 4, 6, 6, (3, 3), 2, 2, 1, 1, 1, False, "random"),
    (1, 4, 8, 6, 7, (3, 3), 4, 2, 1, 1, 1, True, "random"),
    (1, 4, 4, 6, 7, (3, 3), 2, 4, 1, 1, 1, True, "random"),
    (1, 6, 3, 5, 6, (3, 3), 3, 3, 1, 1, 1, True, "random"),
    (2, 3, 2, 7, 7, (3, 3), 1, 1, 2, 1, 1, True, "random"),
    (1, 3, 2, 7, 8, (3, 3), 1, 1, 1, 2, 1, False, "random"),
    (1, 3, 2, 8, 7, (3, 3), 1, 1, 1, 2, 2, True, "random"),
    (1, 2, 2, 9, 8, (3, 3), 1, 1, 2, 2, 2, True, "random"),
    (1, 2, 3, 7, 9, (3, 3), 1, 1, (1, 2), (2, 1), (2, 1), True, "random"),
    (1, 2, 3, 9, 7, (3, 3), 1, 1, (2, 1), (0, 2), (1, 2), False, "random"),
    (1, 3, 2, 6, 6, (3, 3), 1, 1, 1, 0, 1, True, "random"),
    (1, 2, 2, 5, 6, (1, 1), 1, 1, 1, 0, 1, False, "random"),
    (2, 4, 4, 5, 4, (1, 1), 2, 2, 1, 0, 1, True, "random"),
    (1, 2, 3, 6, 5, (1, 1), 1, 1, 2, 1, 1, True, "outside"),
    (1, 2, 2, 7, 7, (5, 5), 1, 1, 1, 2, 1, True, "random"),
    (1, 2, 2, 7, 8, (5, 5), 1, 2, 1, 2, 1, False, "outside"),
    (1, 2, 4, 9, 9, (5, 5), 2, 1, 2, 2, 1, True, "random"),
    (1, 1, 2, 9, 9, (5, 5), 1, 1, 1, 4, 2, True, "integer"),
    (1, 3, 2, 5, 7, (1, 3), 1, 1, 1, (0, 1), 1, True, "random"),
    (1, 3, 3, 5, 7, (1, 3), 3, 3, 1, (0, 1), 1, False, "random"),
    (1, 2, 2, 5, 7, (1, 3), 1, 1, (1, 2), (1, 2), (1, 2), True, "outside"),
    (1, 2, 2, 7, 5, (3, 1), 1, 2, 1, (1, 0), 1, True, "random"),
    (1, 2, 2, 6, 6, (3, 3), 1, 1, 1, 1, 1, True, "outside"),
    (2, 4, 4, 5, 5, (3, 3), 2, 2, 1, 1, 1, False, "outside"),
    (1, 2, 2, 6, 5, (3, 3), 1, 1, 1, 1, 1, True, "integer"),
    (1, 4, 4, 5, 6, (3, 3), 1, 2, 2, 1, 2, True, "integer"),
    (1, 2, 2, 6, 6, (3, 3), 1, 1, 1, 1, 1, True, "boundary"),
    (1, 2, 2, 5, 7, (3, 3), 1, 2, 1, 1, 1, False, "boundary"),
    (1, 2, 2, 6, 6, (5, 5), 1, 1, 1, 2, 1, True, "boundary"),
    (1, 2, 2, 5, 5, (1, 1), 1, 1, 1, 0, 1, True, "boundary"),
    (1, 2, 2, 6, 5, (1, 3), 1, 1, 2, 1, 1, True, "boundary"),
    (2, 4, 4, 6, 6, (3, 3), 2, 4, 1, 1, 1, True, "mixed"),
    (1, 3, 3, 1, 1, (3, 3), 1, 1, 1, 1, 1, True, "random"),
    (1, 2, 2, 1, 6, (1, 3), 1, 1, 1, (0, 1), 1, True, "outside"),
    (1, 2, 2, 6, 1, (3, 1), 1, 1, 1, (1, 0), 1, True, "boundary"),
    (1, 2, 2, 3, 3, (3, 3), 1, 1, 1, 0, 1, True, "random"),
    (0, 2, 2, 5, 5, (3, 3), 1, 1, 1, 1, 1, True, "random"),
    (0, 4, 2, 4, 4, (1, 1), 2, 2, 1, 0, 1, False, "random"),
    (33, 2, 2, 3, 3, (3, 3), 1, 1, 1, 1, 1, True, "mixed"),
    (33, 2, 3, 4, 3, (1, 1), 1, 2, 1, 0, 1, False, "outside"),
    (1, 8, 4, 4, 4, (3, 3), 4, 8, 1, 1, 1, True, "mixed"),
    (1, 2, 2, 6, 6, (3, 3), 1, 1, 2, 2, 2, True, "mixed"),
]


def case_id(case) -> str:
    B, C, Co, H, W, (kh, kw), g, G, s, p, d, m, kind = case
    return f"B{B}-C{C}-O{Co}-{H}x{W}-k{kh}x{kw}-g{g}-G{G}-s{s}-p{p}-d{d}-{'mask' if m else 'nomask'}-{kind}"


def make_case(case, seed: int, dtype=torch.float64):
    """(input, offset, weight, bias, stride, padding, dilation, mask) for one sweep entry."""
    B, C, Co, H, W, (kh, kw), groups, G, stride, padding, dilation, with_mask, kind = case
    gen = torch.Generator().manual_seed(seed)
    Ho, Wo = output_size(H, W, (kh, kw), stride, padding, dilation)
    K = kh * kw

    def rand(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64)

    input = rand(B, C, H, W)
    weight = rand(Co, C // groups, kh, kw)
    bias = rand(Co) if seed % 3 else None
    mask = torch.rand(B, G * K, Ho, Wo, generator=gen, dtype=torch.float64) if with_mask else None
    offset = 2 * rand(B, 2 * G * K, Ho, Wo)
    if kind in ("outside", "mixed"):
        far = torch.rand(B, 2 * G * K, Ho, Wo, generator=gen) < 1 / 3
        sign = torch.where(torch.rand(B, 2 * G * K, Ho, Wo, generator=gen) < 0.5, -1.0, 1.0).double()
        reach = max(H, W) + 3 * torch.rand(far.shape, generator=gen, dtype=torch.float64)
        offset = torch.where(far, offset + sign * reach, offset)
    if kind == "integer":
        offset = torch.round(offset)
    if kind in ("boundary", "mixed"):
        # Put points exactly on a chosen target coordinate: offset = target - grid point.
        from vsr_kernels.reference.deform_conv2d import sample_points
        zero = torch.zeros(B, 2 * G * K, Ho, Wo, dtype=torch.float64)
        y, x = sample_points(zero, (kh, kw), stride, padding, dilation)  # (B, G, K, Ho, Wo)
        targets_y = torch.tensor([-1.0, -1 + 1e-3, -0.5, 0.0, H - 1.0, H - 0.5, H - 1e-3, H, H + 0.25],
                                 dtype=torch.float64)
        targets_x = torch.tensor([-1.0, -1 + 1e-3, -0.5, 0.0, W - 1.0, W - 0.5, W - 1e-3, W, 1.5],
                                 dtype=torch.float64)
        iy = torch.randint(len(targets_y), y.shape, generator=gen)
        ix = torch.randint(len(targets_x), x.shape, generator=gen)
        dy, dx = targets_y[iy] - y, targets_x[ix] - x
        target = torch.stack((dy, dx), 3).reshape(B, 2 * G * K, Ho, Wo)
        offset = target if kind == "boundary" else torch.where(
            torch.rand(offset.shape, generator=gen) < 0.5, target, offset)
    cast = (lambda t: None if t is None else t.to(dtype))
    return (cast(input), cast(offset), cast(weight), cast(bias), stride, padding, dilation, cast(mask))
