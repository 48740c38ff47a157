"""Turns the suites' pytest-benchmark JSON into one report per device under benchmarks/results/:
<device>.md (the tables, also printed), <device>.json (that device's records, which this
module can read again) and <device>.png (speed-ups and peak memory).

    python -m benchmarks.report RUN.json [--out-dir DIR]
"""
import argparse
import datetime
import json
import pathlib
import re

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 -- after choosing the backend, so no display is needed
from matplotlib import ticker  # noqa: E402

RESULTS = pathlib.Path(__file__).parent / "results"
MB = 2**20
ERROR_FIELDS = ("out", "score", "grad_query", "grad_key", "grad_value")


def slug(name):
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def split_by_device(run):
    """{device name: the run restricted to that device's records}."""
    devices = {}
    for record in run["benchmarks"]:
        devices.setdefault(record["extra_info"]["device_name"], []).append(record)
    return {name: run | {"benchmarks": records,
                         "not_measured": [case for case in run["not_measured"] if case["device_name"] == name]}
            for name, records in devices.items()}


def _records(run, workload):
    return [record["extra_info"] for record in run["benchmarks"] if record["extra_info"]["workload"] == workload]


def _ms(value):
    """Three significant digits, but no exponent for thousands."""
    return "—" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _megabytes(peak_bytes):
    return _ms(None if peak_bytes is None else peak_bytes / MB)


def _ratio(numerator, denominator):
    return None if numerator is None or denominator is None else numerator / denominator


def _times(ratio):
    return "n/a" if ratio is None else f"{ratio:.3g}×"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def attention_rows(run):
    """One dict per (dtype, backend): both passes, and the ratios to the reference of the same dtype."""
    records = {(e["dtype"], e["backend"], e["backward"]): e for e in _records(run, "Attention")}
    rows = []
    for dtype, backend in dict.fromkeys((dtype, backend) for dtype, backend, _ in records):
        forward, both = records.get((dtype, backend, False), {}), records.get((dtype, backend, True), {})
        reference_forward = records.get((dtype, "reference", False), {})
        reference_both = records.get((dtype, "reference", True), {})
        errors = both.get("errors")
        rows.append({
            "backend": backend, "dtype": dtype,
            "fwd_ms": forward.get("median_ms"), "fwd_bwd_ms": both.get("median_ms"),
            "fwd_peak_bytes": forward.get("peak_bytes"), "fwd_bwd_peak_bytes": both.get("peak_bytes"),
            "speedup_fwd": _ratio(reference_forward.get("median_ms"), forward.get("median_ms")),
            "speedup_fwd_bwd": _ratio(reference_both.get("median_ms"), both.get("median_ms")),
            "memory_vs_reference": _ratio(both.get("peak_bytes"), reference_both.get("peak_bytes")),
            "max_error": None if errors is None else max(errors[field] for field in ERROR_FIELDS),
            "index_mismatches": None if errors is None
            else (errors["index_mismatches"], errors["index_positions"]),
        })
    return rows


def mana_rows(run):
    records = {e["backend"]: e for e in _records(run, "ManaStep")}
    reference = records.get("reference", {})
    return [{"backend": backend, "step_ms": e["median_ms"], "peak_bytes": e["peak_bytes"],
             "speedup": _ratio(reference.get("median_ms"), e["median_ms"]),
             "memory_vs_reference": _ratio(e["peak_bytes"], reference.get("peak_bytes")),
             "frames_shape": e["frames_shape"]}
            for backend, e in records.items()]


def _attention_section(run, rows):
    shapes = {(e["B"], e["T"], e["C"], e["Cv"], e["H"], e["W"], e["kernel_size"])
              for e in _records(run, "Attention")}
    shape_lines = [f"B={B}, T={T}, C={C}, Cv={Cv}, H={H}, W={W}, kernel_size={K}, dilation 1, scale C^-1/2, "
                   f"border \"exclude\"" for B, T, C, Cv, H, W, K in sorted(shapes)]
    table = _table(
        ("backend", "dtype", "fwd ms", "fwd+bwd ms", "fwd peak MB", "fwd+bwd peak MB", "speed-up fwd",
         "speed-up fwd+bwd", "memory vs reference", "max error", "index ≠"),
        [(row["backend"], row["dtype"], _ms(row["fwd_ms"]), _ms(row["fwd_bwd_ms"]),
          _megabytes(row["fwd_peak_bytes"]), _megabytes(row["fwd_bwd_peak_bytes"]), _times(row["speedup_fwd"]),
          _times(row["speedup_fwd_bwd"]), _times(row["memory_vs_reference"]),
          "—" if row["max_error"] is None else f"{row['max_error']:.2g}",
          "—" if row["index_mismatches"] is None else "{} / {}".format(*row["index_mismatches"]))
         for row in rows])
    return "\n\n".join(["## local_argmax_attention", *shape_lines, table])


def _roofline_section(run):
    records = [e for e in _records(run, "Attention") if "roofline" in e]
    if not records:
        return None
    peaks = records[0]["roofline"]
    table = _table(
        ("backend", "dtype", "pass", "GB moved", "GFLOP", "memory-bound ms", "compute-bound ms", "measured ms",
         "fraction of roofline"),
        [(e["backend"], e["dtype"], "fwd+bwd" if e["backward"] else "fwd", f"{e['roofline']['bytes'] / 1e9:.3g}",
          f"{e['roofline']['flops'] / 1e9:.3g}", _ms(e["roofline"]["memory_bound_ms"]),
          _ms(e["roofline"]["compute_bound_ms"]), _ms(e["median_ms"]), f"{100 * e['roofline']['fraction']:.3g}%")
         for e in records])
    return "\n\n".join([
        "## Roofline",
        f"Measured peaks of this GPU: device-to-device copy {peaks['bandwidth_bytes_per_s'] / 1e9:.0f} GB/s "
        f"(read + write); float32 dense 8192² matmul without TF32 {peaks['flops_per_s'] / 1e12:.3g} TFLOP/s, "
        "the compute bound for every dtype since the kernels multiply in float32.",
        "Must-move bytes: forward reads query, key and value and writes out, score and index once; the backward "
        "reads grad_out, grad_score, query, key, value, score and index and writes the three gradients once. "
        "FLOPs: 2·C per candidate score (kernel_size² per position) plus the score·value product; the backward "
        "adds 3·Cv + 4·C per position. Roofline time = max(bytes / bandwidth, FLOPs / peak rate); the fraction "
        "is roofline time / measured time.",
        table])


def _mana_section(run):
    rows = mana_rows(run)
    if not rows:
        return None
    B, T, _, H, W = rows[0]["frames_shape"]
    table = _table(
        ("backend", "step ms", "peak MB", "speed-up", "memory vs reference"),
        [(row["backend"], _ms(row["step_ms"]), _megabytes(row["peak_bytes"]), _times(row["speedup"]),
          _times(row["memory_vs_reference"])) for row in rows])
    return "\n\n".join([
        "## MANA training step",
        f"`MANA.small(backend=...)`, frames B={B}, T={T}, 3×{H}×{W}, float32: forward, "
        "L1(sr, target) + memory loss, backward.",
        table])


def _case_name(case):
    pass_name = {True: "fwd+bwd", False: "fwd"}.get(case.get("backward"))
    return " ".join(filter(None, (case["workload"], case["backend"], case.get("dtype"), pass_name)))


def _not_measured_section(run):
    if not run["not_measured"]:
        return None
    cases = (f"- {_case_name(case)}: {case['reason']}" for case in run["not_measured"])
    return "\n".join(["## Not measured", *cases])


def markdown(device_name, run):
    machine, commit = run["machine_info"], run["commit_info"]
    timers = sorted({record["extra_info"]["timer"] for record in run["benchmarks"]})
    measured_at = datetime.datetime.fromisoformat(run["datetime"]).strftime("%Y-%m-%d %H:%M UTC")
    header = "\n".join([
        f"# Benchmarks on {device_name}",
        "",
        f"Measured {measured_at} at commit {commit.get('id', 'unknown')[:12]}"
        f"{' with uncommitted changes' if commit.get('dirty') else ''}; torch {machine['torch']}, "
        f"triton {machine['triton']}, {machine['torch_threads']} CPU threads.",
        "",
        f"Times are medians ({'; '.join(timers)}). Peak MB (2^20 bytes) is the extra peak memory of one call "
        "over its inputs, after a warm-up call: on CUDA the caching allocator's peak; on CPU the peak resident "
        "memory of a fresh process. Speed-up is reference time / backend time, memory is backend peak / "
        "reference peak (forward+backward), both against the reference of the same dtype. Max error is the "
        "largest absolute difference from the reference run in float32 on batch element 0, over out, score and "
        "the gradients of query, key and value; index ≠ counts the positions where a different candidate was "
        "chosen.",
    ])
    sections = (_attention_section(run, attention_rows(run)), _roofline_section(run), _mana_section(run),
                _not_measured_section(run))
    return "\n\n".join([header, *filter(None, sections)]) + "\n"


def chart(device_name, run, path):
    """Speed-up over the reference and peak memory of every measured row, forward and
    forward+backward side by side, on log scales."""
    rows = [(f"attention {row['backend']} {row['dtype']}",
             {"forward": (row["speedup_fwd"], row["fwd_peak_bytes"]),
              "forward+backward": (row["speedup_fwd_bwd"], row["fwd_bwd_peak_bytes"])})
            for row in attention_rows(run)]
    rows += [(f"MANA step {row['backend']}", {"forward+backward": (row["speedup"], row["peak_bytes"])})
             for row in mana_rows(run)]
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(13, 1.6 + 0.55 * len(rows)), sharey=True,
                                           layout="constrained")
    _bars(speed, rows, 0, 1, _times)
    _bars(memory, rows, 1, MB, lambda megabytes: f"{_megabytes(megabytes * MB)} MB")
    speed.axvline(1, color="black", linewidth=0.8)
    speed.set_xlabel("speed-up over the reference (higher is better)")
    memory.set_xlabel("extra peak memory, MB (lower is better)")
    figure.legend(*speed.get_legend_handles_labels(), loc="outside lower center", ncol=2, fontsize=8)
    speed.set_yticks(range(len(rows)), [label for label, _ in rows])
    speed.invert_yaxis()
    figure.suptitle(f"vsr_kernels on {device_name}")
    figure.savefig(path, dpi=120)
    plt.close(figure)


def _bars(axes, rows, column, unit, label):
    """One bar per (row, pass) of measures[pass][column] / unit; "n/a" where it is missing."""
    any_measured = False
    for offset, kind, colour in ((-0.2, "forward", "tab:blue"), (0.2, "forward+backward", "tab:orange")):
        cells = [(position + offset, measures[kind][column]) for position, (_, measures) in enumerate(rows)
                 if kind in measures]
        measured = [(y, value / unit) for y, value in cells if value is not None]
        any_measured = any_measured or bool(measured)
        drawn = axes.barh([y for y, _ in measured], [value for _, value in measured], height=0.4, color=colour,
                          label=kind if kind == "forward" else "forward+backward (MANA: training step)")
        axes.bar_label(drawn, labels=[label(value) for _, value in measured], padding=3, fontsize=8)
        for y, value in cells:
            if value is None:
                axes.text(0.01, y, "n/a: not measured", va="center", fontsize=8,
                          transform=axes.get_yaxis_transform())
    if any_measured:  # a log axis needs data
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(ticker.LogFormatter())
        axes.xaxis.set_minor_formatter(ticker.LogFormatter(labelOnlyBase=False, minor_thresholds=(1, 0.4)))
        axes.margins(x=0.25)


def write(run, out_dir=RESULTS):
    """Writes and prints each device's report; returns the paths written."""
    out_dir = pathlib.Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for device_name, device_run in split_by_device(run).items():
        stem = out_dir / slug(device_name)
        text = markdown(device_name, device_run)
        print(text)
        stem.with_suffix(".md").write_text(text)
        stem.with_suffix(".json").write_text(json.dumps(device_run, indent=1) + "\n")
        chart(device_name, device_run, stem.with_suffix(".png"))
        written += [stem.with_suffix(suffix) for suffix in (".md", ".json", ".png")]
    return written


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", type=pathlib.Path, help="pytest-benchmark JSON of the suites")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    write(json.loads(args.run.read_text()), args.out_dir)


if __name__ == "__main__":
    main()
