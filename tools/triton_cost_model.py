"""Prints the Triton cost model's predictions for local_argmax_attention's forward formulations.

For each target (H100, H200) and dtype at the benchmark shape (B=4, T=7, C=Cv=64, 180x320,
K=9, dilation 1): the predicted time of the direct and the tile forward, each resource's time
(DRAM, L2, load/store issue, math), the bound, and the fraction of the DRAM roofline (DRAM
time over predicted time). float32 tiles are tf32 (behind allow_tf32). These are predictions
from vsr_kernels/triton/_cost.py and the counts in vsr_kernels/triton/local_argmax_attention.py
(predicted_work), not measurements: `make bench` on a GPU times both formulations.

    python tools/triton_cost_model.py                 # the benchmark shape
    python tools/triton_cost_model.py --kernel-size 5 --channels 32
"""
import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from vsr_kernels.triton import _cost  # noqa: E402
from vsr_kernels.triton import local_argmax_attention as op  # noqa: E402


def rows(B, T, C, Cv, H, W, K, dtypes):
    for target, hardware in _cost.TARGETS.items():
        for dtype in dtypes:
            tile = op.best_tile(dtype, C, K)
            for formulation in op.FORMULATIONS:
                p = op.predict(formulation, dtype, B, T, C, Cv, H, W, K, tile=tile, hardware=hardware)
                name = formulation if formulation == "direct" else f"tile {tile[0]}x{tile[1]}"
                if formulation == "tile" and dtype == "float32":
                    name += " (tf32)"
                yield (target, dtype, name, p)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--frames", type=int, default=7)
    parser.add_argument("--channels", type=int, default=64)
    parser.add_argument("--value-channels", type=int, default=None)
    parser.add_argument("--height", type=int, default=180)
    parser.add_argument("--width", type=int, default=320)
    parser.add_argument("--kernel-size", type=int, default=9)
    parser.add_argument("--dtypes", default="bfloat16,float32")
    args = parser.parse_args(argv)
    Cv = args.value_channels or args.channels
    shape = (args.batch, args.frames, args.channels, Cv, args.height, args.width, args.kernel_size)
    print(f"local_argmax_attention forward, predicted (not measured): B={shape[0]}, T={shape[1]}, "
          f"C={shape[2]}, Cv={shape[3]}, {shape[4]}x{shape[5]}, K={shape[6]}, dilation 1")
    header = ("target", "dtype", "formulation", "ms", "DRAM ms", "L2 ms", "LSU ms", "math ms", "bound",
              "DRAM roofline")
    table = [header]
    for target, dtype, name, p in rows(*shape, args.dtypes.split(",")):
        table.append((target, dtype, name, f"{p.seconds * 1e3:.3f}", f"{p.dram_seconds * 1e3:.3f}",
                      f"{p.l2_seconds * 1e3:.3f}", f"{p.lsu_seconds * 1e3:.3f}",
                      f"{p.math_seconds * 1e3:.3f}",
                      p.bound, f"{p.dram_fraction:.0%}"))
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    for i, r in enumerate(table):
        print("| " + " | ".join(c.ljust(w) for c, w in zip(r, widths)) + " |")
        if i == 0:
            print("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    for name, hw in _cost.TARGETS.items():
        print(f"{name}: DRAM {hw.dram_bytes_per_s / 1e12:.1f} TB/s, L2 {hw.l2_bytes_per_s / 1e12:.1f} TB/s, "
              f"bf16 tensor {hw.tensor_flops['bfloat16'] / 1e12:.0f} TFLOP/s "
              f"(x{_cost.SMALL_TILE_TENSOR_EFFICIENCY} for small tiles), "
              f"FMA {hw.fma_flops / 1e12:.0f} TFLOP/s, "
              f"ALU {hw.alu_ops_per_s / 1e12:.1f} Tops/s, "
              f"LSU {hw.lsu_per_s / 1e9:.0f} G warp-instructions/s")


if __name__ == "__main__":
    main()
