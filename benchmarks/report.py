"""Turns the suite's pytest-benchmark JSON into one report per device under benchmarks/results/:
<device>.md (the tables, also printed), <device>.json (that device's records, which this
module can read again) and <device>.png (times and peak memory).

Generic: the hardware probes, the roofline (GPU) and the cases not measured are sections of
their own; every registered workload (benchmarks/workloads/) gets a section with its shape
lines, its table (its columns, built from the column helpers below) and its notes.

    python -m benchmarks.report RUN.json [--out-dir DIR]
"""
import argparse
import datetime
import json
import pathlib
import re
from dataclasses import dataclass, field

from . import workloads as registry
from .workloads import Column

RESULTS = pathlib.Path(__file__).parent / "results"
MB = 2**20
PROBES = "hardware"


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


def peaks(run):
    """The probes' measured rates, {"flops_per_s": ..., "bandwidth_bytes_per_s": ...}, and their
    records ("flops_probe", "bandwidth_bytes_probe")."""
    from .measure import probe_rate

    found = {}
    for record in _records(run, PROBES):
        name, rate = probe_rate(record)
        found[name] = rate
        found[name.replace("_per_s", "_probe")] = record
    return found


# Cells ---------------------------------------------------------------------------------------------

def _ms(value):
    """Three significant digits, but no exponent for thousands."""
    return "—" if value is None else f"{value:.3g}" if value < 100 else f"{value:.0f}"


def _megabytes(peak_bytes):
    return _ms(None if peak_bytes is None else peak_bytes / MB)


def _ratio(numerator, denominator):
    return None if not numerator or not denominator else numerator / denominator


def _times(ratio):
    return "n/a" if ratio is None else f"{ratio:.3g}×"


def _percent(fraction):
    return "—" if fraction is None else f"{100 * fraction:.3g}%"


def _table(header, rows):
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


@dataclass
class Row:
    """One (dtype, backend) of a workload: its record per pass, and the baselines' records of
    the same dtype per (baseline, pass); peaks: the device's probes (see peaks())."""

    backend: str
    dtype: str
    records: dict = field(default_factory=dict)
    baselines: dict = field(default_factory=dict)
    peaks: dict = field(default_factory=dict)

    def get(self, pass_name, name):
        return self.records.get(pass_name, {}).get(name)

    def speedup(self, pass_name, baseline):
        baseline_ms = self.baselines.get((baseline, pass_name), {}).get("median_ms")
        return _ratio(baseline_ms, self.get(pass_name, "median_ms"))

    def memory_ratio(self, pass_name, baseline):
        return _ratio(self.get(pass_name, "peak_bytes"),
                      self.baselines.get((baseline, pass_name), {}).get("peak_bytes"))

    def rate_fraction(self, pass_name, bound=None):
        """The pass's FLOP rate / torch.mm's (compute-bound), or its byte rate / the copy's
        bandwidth (memory-bound), as the case declares or `bound` asks; None where not counted
        or not probed."""
        return rate_fraction(self.records.get(pass_name, {}), self.peaks, bound)


def rate_fraction(record, peaks, bound=None):
    if not record.get("median_ms"):
        return None
    seconds = record["median_ms"] * 1e-3
    bound = bound or record.get("bound")
    if bound == "compute" and record.get("flops") and peaks.get("flops_per_s"):
        return record["flops"] / seconds / peaks["flops_per_s"]
    if bound == "memory" and record.get("bytes") and peaks.get("bandwidth_bytes_per_s"):
        return record["bytes"] / seconds / peaks["bandwidth_bytes_per_s"]
    return None


# Columns a workload builds its table from -------------------------------------------------------------

def field_column(name, header=None):
    return Column(header or name, lambda row: str(getattr(row, name)))


def ms_column(pass_name):
    return Column(f"{pass_name} ms", lambda row: _ms(row.get(pass_name, "median_ms")))


def peak_column(pass_name):
    return Column(f"{pass_name} peak MB", lambda row: _megabytes(row.get(pass_name, "peak_bytes")))


def own_memory_column(pass_name):
    """The pass's peak memory less the tensors it returns (outputs, gradients): its working memory."""
    def cell(row):
        peak, returned = row.get(pass_name, "peak_bytes"), row.get(pass_name, "returned_bytes")
        return _megabytes(None if peak is None or returned is None else max(peak - returned, 0))

    return Column(f"{pass_name} own MB", cell)


def speedup_column(pass_name, baseline):
    short = "ref" if baseline == "reference" else baseline
    return Column(f"{pass_name} × {short}", lambda row: _times(row.speedup(pass_name, baseline)))


def memory_column(pass_name, baseline):
    return Column(f"memory vs {baseline}", lambda row: _times(row.memory_ratio(pass_name, baseline)))


def rate_column(pass_name, header=None, bound=None):
    """Fraction of the probe's rate that applies to the case (torch.mm's or the copy's), or to
    `bound` ("compute" or "memory") for an op whose bound depends on the device."""
    return Column(header or f"{pass_name} % mm", lambda row: _percent(row.rate_fraction(pass_name, bound)))


def max_error_column(fields=None):
    """The largest error of the fwd+bwd pass against the oracle, over the error `fields` (every
    recorded one when None)."""
    def cell(row):
        errors = row.get("fwd+bwd", "errors")
        if not errors:
            return "—"
        return f"{max(errors[name] for name in fields) if fields else max(errors.values()):.2g}"

    return Column("max error", cell)


def index_mismatch_column():
    """Positions where the fwd+bwd pass chose another candidate than the oracle, of all positions."""
    def cell(row):
        errors = row.get("fwd+bwd", "errors")
        return "—" if errors is None else f"{errors['index_mismatches']} / {errors['index_positions']}"

    return Column("index ≠", cell)


def op_columns(rate_header=None, extra_baselines=(), error_columns=(), extra_rates=()):
    """The table of an op against its two baselines: backend, dtype, ms per pass, speed-ups against
    the reference and the careful-user formulation (and `extra_baselines`, forward only), the
    forward's fraction of the hardware rate (and of the `extra_rates`, (header, bound) pairs),
    peak memory per pass, then `error_columns`."""
    return (field_column("backend"), field_column("dtype"), ms_column("fwd"), ms_column("fwd+bwd"),
            speedup_column("fwd", "reference"), speedup_column("fwd+bwd", "reference"),
            speedup_column("fwd", "careful"), speedup_column("fwd+bwd", "careful"),
            *(speedup_column("fwd", baseline) for baseline in extra_baselines),
            rate_column("fwd", rate_header), *(rate_column("fwd", header, bound) for header, bound in extra_rates),
            peak_column("fwd"), peak_column("fwd+bwd"), own_memory_column("fwd+bwd"), *error_columns)


def default_columns(workload):
    columns = [field_column("backend"), field_column("dtype")]
    columns += [ms_column(pass_name) for pass_name in workload.passes]
    columns += [speedup_column(pass_name, baseline) for baseline in workload.baselines
                for pass_name in workload.passes]
    return columns + [peak_column(pass_name) for pass_name in workload.passes]


# Sections -------------------------------------------------------------------------------------------

def rows(workload, records, device_peaks):
    """One Row per (dtype, backend), in the order measured."""
    by_key = {}
    for record in records:
        row = by_key.setdefault((record["dtype"], record["backend"]),
                                Row(record["backend"], record["dtype"], peaks=device_peaks))
        row.records[record["pass_name"]] = record
    for row in by_key.values():
        for (dtype, backend), other in by_key.items():
            if dtype == row.dtype and backend in workload.baselines:
                row.baselines.update({(backend, pass_name): record
                                      for pass_name, record in other.records.items()})
    return list(by_key.values())


def shape_groups(workload, records):
    """{shape line: its records}, sorted by shape line: rows are built per shape, so a row is
    compared only with the baselines of its own shape (rows() keys by dtype and backend)."""
    groups = {}
    for record in records:
        groups.setdefault(workload.shape_line(record), []).append(record)
    return dict(sorted(groups.items()))


def workload_section(workload, records, device_peaks):
    """The workload's heading, then per shape its line and its table, then the workload's notes."""
    columns = workload.columns or default_columns(workload)
    parts = [f"## {workload.name}"]
    for shape_line, shape_records in shape_groups(workload, records).items():
        cells = [[column.cell(row) for column in columns] for row in rows(workload, shape_records, device_peaks)]
        parts += [shape_line, _table([column.header for column in columns], cells)]
    return "\n\n".join([*parts, *workload.notes])


def _hardware_section(device_peaks):
    if not device_peaks:
        return None
    lines = ["## Hardware probes (same run, timed like the cases)", ""]
    if "flops_per_s" in device_peaks:
        n = device_peaks["flops_probe"]["shape"]["n"]
        lines.append(f"- torch.mm float32 {n}×{n}: {device_peaks['flops_per_s'] / 1e9:.4g} GFLOP/s "
                     f"({device_peaks['flops_probe']['median_ms']:.3g} ms), the rate compute-bound cases are "
                     "compared with (\"% mm\")")
    if "bandwidth_bytes_per_s" in device_peaks:
        n = device_peaks["bandwidth_bytes_probe"]["shape"]["n"]
        lines.append(f"- copy of {n / MB:.0f} MB into a preallocated tensor: "
                     f"{device_peaks['bandwidth_bytes_per_s'] / 1e9:.4g} GB/s (read + write), the rate "
                     "memory-bound cases are compared with")
    return "\n".join(lines)


def _roofline_section(run, device_peaks):
    """GPU only: max(bytes / bandwidth, FLOPs / torch.mm rate) and the fraction of it reached."""
    if "flops_per_s" not in device_peaks or "bandwidth_bytes_per_s" not in device_peaks:
        return None
    table = []
    for record in run["benchmarks"]:
        e = record["extra_info"]
        if e["device"] != "cuda" or e["workload"] == PROBES or not e.get("flops") or not e.get("bytes"):
            continue
        memory_ms = e["bytes"] / device_peaks["bandwidth_bytes_per_s"] * 1e3
        compute_ms = e["flops"] / device_peaks["flops_per_s"] * 1e3
        table.append((e["workload"], e["backend"], e["dtype"], e["pass_name"], f"{e['bytes'] / 1e9:.3g}",
                      f"{e['flops'] / 1e9:.3g}", _ms(memory_ms), _ms(compute_ms), _ms(e["median_ms"]),
                      _percent(max(memory_ms, compute_ms) / e["median_ms"])))
    if not table:
        return None
    return "\n\n".join([
        "## Roofline",
        "Roofline time = max(must-move bytes / copy bandwidth, FLOPs / torch.mm float32 rate), both probed "
        "above; the fraction is roofline time / measured time. Each workload's case documents its byte and "
        "FLOP counts (benchmarks/workloads/).",
        _table(("workload", "backend", "dtype", "pass", "GB moved", "GFLOP", "memory-bound ms",
                "compute-bound ms", "measured ms", "fraction of roofline"), table)])


def _not_measured_section(run):
    if not run["not_measured"]:
        return None
    cases = (f"- {case['workload']} {case['backend']} {case['dtype']} {case['pass_name']}: {case['reason']}"
             for case in run["not_measured"])
    return "\n".join(["## Not measured", *cases])


def _load(machine):
    """The machine's load beside the thread count: above its core count, other processes shared the cores."""
    if "load_average" not in machine:
        return ""
    start, end = machine["load_average"]
    text = f"; 1-minute load average {start:.1f} at the start and {end:.1f} at the end"
    if max(start, end) > 1.2 * (machine.get("cpu", {}).get("count") or 1):
        text += " (other processes shared the CPU: its times are perturbed)"
    return text


def markdown(device_name, run):
    machine, commit = run["machine_info"], run["commit_info"]
    timers = sorted({record["extra_info"]["timer"] for record in run["benchmarks"]})
    measured_at = datetime.datetime.fromisoformat(run["datetime"]).strftime("%Y-%m-%d %H:%M UTC")
    device_peaks = peaks(run)
    header = "\n".join([
        f"# Benchmarks on {device_name}",
        "",
        f"Measured {measured_at} at commit {commit.get('id', 'unknown')[:12]}"
        f"{' with uncommitted changes' if commit.get('dirty') else ''}; torch {machine['torch']}, "
        f"triton {machine['triton']}, {machine['torch_threads']} CPU threads"
        f"{_load(machine)}{'; BENCH_QUICK shapes (a smoke run)' if machine.get('quick') else ''}.",
        "",
        f"Times are medians ({'; '.join(timers)}). Peak MB (2^20 bytes) is the extra peak memory of one call "
        "over its inputs, after a warm-up call: on CUDA the caching allocator's peak; on CPU the peak resident "
        "memory of a fresh process. Own MB is that peak less the tensors the call returns (outputs and "
        "gradients, which any implementation must hold): the call's working memory. Speed-ups (×) are "
        "baseline time / row time for the same dtype and pass.",
    ])
    sections = [_hardware_section(device_peaks)]
    for name, workload in registry.registered().items():
        records = _records(run, name)
        if records:
            sections.append(workload_section(workload, records, device_peaks))
    sections += [_roofline_section(run, device_peaks), _not_measured_section(run)]
    return "\n\n".join([header, *filter(None, sections)]) + "\n"


# Chart ----------------------------------------------------------------------------------------------

def chart(device_name, run, path):
    """Median time and extra peak memory of every measured (workload, backend, dtype), one bar
    per pass, on log scales."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    bars, passes = [], {}
    for name, workload in registry.registered().items():
        groups = shape_groups(workload, _records(run, name))
        for number, shape_records in enumerate(groups.values(), 1):
            shape = f" (shape {number}/{len(groups)})" if len(groups) > 1 else ""  # the tables' order
            for row in rows(workload, shape_records, {}):
                bars.append((f"{name}{shape} {row.backend} {row.dtype}",
                             {p: (r.get("median_ms"), r.get("peak_bytes")) for p, r in row.records.items()}))
                passes.update(dict.fromkeys(row.records))
    if not bars:
        return
    figure, (speed, memory) = plt.subplots(1, 2, figsize=(14, 1.6 + 0.55 * len(bars)), sharey=True,
                                           layout="constrained")
    _bars(speed, bars, list(passes), 0, 1, lambda ms: f"{_ms(ms)} ms")
    _bars(memory, bars, list(passes), 1, MB, lambda megabytes: f"{_megabytes(megabytes * MB)} MB")
    speed.set_xlabel("median time, ms (lower is better)")
    memory.set_xlabel("extra peak memory, MB (lower is better)")
    figure.legend(*speed.get_legend_handles_labels(), loc="outside lower center", ncol=len(passes),
                  fontsize=8)
    speed.set_yticks(range(len(bars)), [label for label, _ in bars])
    speed.invert_yaxis()
    figure.suptitle(f"vsr_kernels on {device_name}")
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _bars(axes, bars, passes, column, unit, label):
    from matplotlib import ticker

    height = 0.8 / len(passes)
    colours = ("tab:blue", "tab:orange", "tab:green", "tab:red")
    any_measured = False
    for k, pass_name in enumerate(passes):
        cells = []
        for y, (_, measures) in enumerate(bars):
            if pass_name in measures:
                present = [name for name in passes if name in measures]  # centred on the row's passes
                offset = (present.index(pass_name) - (len(present) - 1) / 2) * height
                cells.append((y + offset, measures[pass_name][column]))
        measured = [(y, value / unit) for y, value in cells if value]
        any_measured = any_measured or bool(measured)
        drawn = axes.barh([y for y, _ in measured], [value for _, value in measured], height=height,
                          color=colours[k % len(colours)], label=pass_name)
        axes.bar_label(drawn, labels=[label(value) for _, value in measured], padding=3, fontsize=7)
        for y, value in cells:
            if not value:
                axes.text(0.01, y, "n/a", va="center", fontsize=7, transform=axes.get_yaxis_transform())
    if any_measured:  # a log axis needs data
        axes.set_xscale("log")
        axes.xaxis.set_major_formatter(ticker.LogFormatter())
        axes.margins(x=0.3)


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
    parser.add_argument("run", type=pathlib.Path, help="pytest-benchmark JSON of the suite")
    parser.add_argument("--out-dir", type=pathlib.Path, default=RESULTS)
    args = parser.parse_args(argv)
    write(json.loads(args.run.read_text()), args.out_dir)


if __name__ == "__main__":
    main()
