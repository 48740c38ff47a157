"""Compile checks of the GPU code that need no GPU (see DESIGN.md, "Verification without a GPU").

    python tools/check_gpu_build.py

prints one section per check and exits non-zero when any fails. Tests import the functions,
which raise on compile errors and return what the compiler reports.

CUDA section: every csrc/cuda/*.cu compiled by nvcc for each architecture with
`-Xptxas -v`, which reports per kernel its registers, stack frame and spills.
Glue section: every csrc/cuda_glue/*.cpp type-checked against the PyTorch and CUDA headers.
Triton section: every Triton op module (vsr_kernels/triton/*.py whose name does not start
with "_"), each exposing compile_all(archs, dtype_names), compiled for every launch
configuration with triton.compile.
"""
import os
import re
import shutil
import subprocess
import sys
import tempfile
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CUDA_SOURCES = tuple(sorted((ROOT / "csrc" / "cuda").glob("*.cu")))
CUDA_GLUE_SOURCES = tuple(sorted((ROOT / "csrc" / "cuda_glue").glob("*.cpp")))
TRITON_MODULES = tuple(f"vsr_kernels.triton.{path.stem}"
                       for path in sorted((ROOT / "vsr_kernels" / "triton").glob("*.py"))
                       if not path.name.startswith("_"))
ARCHES = ("80", "90")
TRITON_ARCHS = (80, 90)
TRITON_DTYPES = ("float16", "bfloat16", "float32", "float64")

# PyTorch's CUDAExtension passes these to nvcc (torch.utils.cpp_extension.COMMON_NVCC_FLAGS):
# they remove __half's and __nv_bfloat16's implicit conversions and operators, so the check
# must compile the kernels exactly as the real build does.
TORCH_NVCC_FLAGS = (
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
)


class CompileError(RuntimeError):
    pass


@dataclass(frozen=True)
class KernelReport:
    """What ptxas reports for one compiled function; sizes in bytes."""

    name: str
    registers: int
    stack_frame: int
    spill_stores: int
    spill_loads: int

    @property
    def spills(self) -> bool:
        return self.spill_stores > 0 or self.spill_loads > 0


def find_nvcc():
    """Path of nvcc on PATH or in /usr/local/cuda/bin, or None."""
    nvcc = shutil.which("nvcc")
    if nvcc is None and os.access("/usr/local/cuda/bin/nvcc", os.X_OK):
        nvcc = "/usr/local/cuda/bin/nvcc"
    return nvcc


_PROPERTIES = re.compile(r"Function properties for (\S+)\s*\n\s*(\d+) bytes stack frame, "
                         r"(\d+) bytes spill stores, (\d+) bytes spill loads")
_REGISTERS = re.compile(r"Used (\d+) registers")


def parse_ptxas(log: str) -> list:
    """The KernelReports of one `-Xptxas -v` log, in its order, names demangled."""
    reports = []
    matches = list(_PROPERTIES.finditer(log))
    for match, following in zip(matches, matches[1:] + [None]):
        # A function's "Used N registers" line sits between its properties and the next's.
        end = following.start() if following else len(log)
        registers = _REGISTERS.search(log, match.end(), end)
        name, stack, stores, loads = match.groups()
        reports.append(KernelReport(name, int(registers.group(1)) if registers else 0, int(stack),
                                    int(stores), int(loads)))
    names = _demangle([r.name for r in reports])
    return [KernelReport(n, r.registers, r.stack_frame, r.spill_stores, r.spill_loads)
            for n, r in zip(names, reports)]


def _demangle(names):
    """`void f<float, float>(...)` -> `f<float, float>`, without namespaces; names as given
    where c++filt is missing."""
    cxxfilt = shutil.which("c++filt")
    if cxxfilt is None or not names:
        return names
    out = subprocess.run([cxxfilt, "--no-params"], input="\n".join(names), capture_output=True,
                         text=True, check=True).stdout.splitlines()
    return [re.sub(r"^void |(\w+::|\(anonymous namespace\)::)", "", n) for n in out]


def compile_cuda_source(source: Path, arch: str, out_dir: str, nvcc: str) -> list:
    """Compiles one .cu for sm_<arch> into out_dir; returns its KernelReports."""
    obj = Path(out_dir) / f"{source.stem}.sm_{arch}.o"
    cmd = [nvcc, "-c", "-std=c++17", "-O3", "-gencode", f"arch=compute_{arch},code=sm_{arch}",
           "-Xptxas", "-v", *TORCH_NVCC_FLAGS, "-I", str(ROOT / "csrc"), str(source), "-o", str(obj)]
    result = subprocess.run(cmd, capture_output=True, text=True)
    if result.returncode != 0:
        raise CompileError(f"nvcc failed on {source.relative_to(ROOT)} for sm_{arch}:\n"
                           f"{' '.join(cmd)}\n{result.stdout}{result.stderr}")
    return parse_ptxas(result.stdout + result.stderr)


def compile_cuda_sources(arches=ARCHES, sources=CUDA_SOURCES) -> dict:
    """{(source path relative to the repo, arch): [KernelReport, ...]} for every source and
    architecture, compiled in parallel; raises CompileError on the first failure and
    FileNotFoundError where nvcc is absent."""
    nvcc = find_nvcc()
    if nvcc is None:
        raise FileNotFoundError("nvcc not found on PATH or in /usr/local/cuda/bin")
    jobs = [(source, arch) for source in sources for arch in arches]
    with tempfile.TemporaryDirectory() as out_dir, ThreadPoolExecutor(os.cpu_count()) as pool:
        reports = pool.map(lambda job: compile_cuda_source(*job, out_dir, nvcc), jobs)
        return {(str(source.relative_to(ROOT)), arch): report
                for (source, arch), report in zip(jobs, reports)}


def find_cuda_include():
    """The CUDA toolkit's include folder, or None. nvcc may be a wrapper script, so its own
    folder is the last place tried."""
    nvcc = find_nvcc()
    homes = [os.environ.get("CUDA_HOME"), "/usr/local/cuda", nvcc and Path(nvcc).resolve().parent.parent]
    for home in filter(None, homes):
        if (Path(home) / "include" / "cuda_runtime.h").is_file():
            return Path(home) / "include"
    return None


def check_cuda_glue(glue: Path, include_from: Path | None = None) -> None:
    """Type-checks one torch glue file of the CUDA kernels with the host compiler (g++
    -fsyntax-only) against this PyTorch's headers and the CUDA toolkit's, so that it is
    checked on machines whose PyTorch has no CUDA; raises CompileError on errors and
    FileNotFoundError where nvcc (hence the CUDA headers) is absent.

    Its relative includes ("../torch_glue.h") are resolved from its own folder, then from
    `include_from` (default csrc/cuda_glue): a modified copy elsewhere checks the same way.
    VSR_WITH_CUDA is defined as the CUDA build defines it. A CPU build of PyTorch ships
    c10/cuda without its generated cuda_cmake_macros.h; C10_CUDA_NO_CMAKE_CONFIGURE_FILE
    tells c10 to do without it."""
    import sysconfig

    from torch.utils.cpp_extension import include_paths

    cuda_include = find_cuda_include()
    if cuda_include is None:
        raise FileNotFoundError("no CUDA toolkit headers (cuda_runtime.h) in $CUDA_HOME, /usr/local/cuda "
                                "or beside nvcc")
    includes = [*include_paths(), sysconfig.get_paths()["include"], str(cuda_include)]
    command = ["g++", "-std=c++17", "-fsyntax-only", "-w", "-DC10_CUDA_NO_CMAKE_CONFIGURE_FILE",
               "-DVSR_WITH_CUDA", "-iquote", str(include_from or ROOT / "csrc" / "cuda_glue"),
               *(f"-I{path}" for path in includes), str(glue)]
    result = subprocess.run(command, capture_output=True, text=True)
    if result.returncode != 0:
        raise CompileError(f"{glue} does not compile:\n{result.stderr}")


def compile_triton_module(module: str, archs=TRITON_ARCHS, dtype_names=TRITON_DTYPES) -> list:
    """`module.compile_all(archs, dtype_names)` in a process without TRITON_INTERPRET: one
    report per compiled kernel (vsr_kernels.triton._compile.compile_kernel's, with "dtype" and
    "constexprs"); raises RuntimeError on compile errors."""
    from vsr_kernels.triton import _compile

    return _compile.call_without_interpreter(module, "compile_all", list(archs), list(dtype_names))


def _print_table(header, rows):
    widths = [max(len(str(cell)) for cell in column) for column in zip(header, *rows)]
    for row in (header, ["-" * w for w in widths], *rows):
        print("  ".join(str(cell).ljust(w) for cell, w in zip(row, widths)).rstrip())


def cuda_section() -> bool:
    """Prints the ptxas report of every CUDA kernel; False on compile errors or spills."""
    try:
        results = compile_cuda_sources()
    except (CompileError, FileNotFoundError) as error:
        print(error)
        return False
    rows = [(source, f"sm_{arch}", k.name, k.registers, k.stack_frame, k.spill_stores, k.spill_loads)
            for (source, arch), kernels in results.items() for k in kernels]
    _print_table(("file", "arch", "kernel", "registers", "stack B", "spill st B", "spill ld B"), rows)
    spilled = [(source, arch, k.name) for (source, arch), kernels in results.items()
               for k in kernels if k.spills]
    for source, arch, name in spilled:
        print(f"SPILLS: {name} in {source} for sm_{arch}")
    return not spilled


def glue_section() -> bool:
    """Type-checks every csrc/cuda_glue/*.cpp; False on errors."""
    if not CUDA_GLUE_SOURCES:
        print("no csrc/cuda_glue/*.cpp found")
        return False
    passed = True
    for glue in CUDA_GLUE_SOURCES:
        try:
            check_cuda_glue(glue)
        except (CompileError, FileNotFoundError) as error:
            print(error)
            passed = False
        else:
            print(f"{glue.relative_to(ROOT)}: compiles")
    return passed


def triton_section() -> bool:
    """Compiles every launch configuration of every Triton op module with triton.compile;
    False on errors or spills."""
    if not TRITON_MODULES:
        print("no Triton op module (vsr_kernels/triton/*.py not starting with '_') found")
        return False
    rows, passed = [], True
    for module in TRITON_MODULES:
        try:
            reports = compile_triton_module(module)
        except Exception as error:  # the subprocess's compile error, shown as the section's result
            print(error)
            passed = False
            continue
        rows += [(module.rsplit(".", 1)[1], r["kernel"],
                  " ".join(f"{k}={v}" for k, v in r["constexprs"].items()), r["dtype"], f"sm_{r['arch']}",
                  r["n_regs"], r["n_spills"], r["shared"],
                  ",".join(i.split(".")[0] for i in r.get("mma", [])) or "-") for r in reports]
        passed &= all(r["n_spills"] == 0 for r in reports)
    _print_table(("module", "kernel", "constexprs", "dtype", "arch", "registers", "spills", "shared B",
                  "tensor cores"), rows)
    return passed


# (title, function printing the section and returning whether it passed)
SECTIONS = [
    ("CUDA kernels: nvcc -Xptxas -v", cuda_section),
    ("CUDA glue: g++ -fsyntax-only against the PyTorch and CUDA headers", glue_section),
    ("Triton kernels: triton.compile for sm_80 and sm_90", triton_section),
]


def main() -> int:
    failed = []
    for title, section in SECTIONS:
        print(f"== {title}")
        if not section():
            failed.append(title)
        print()
    if failed:
        print("FAILED: " + "; ".join(failed))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
