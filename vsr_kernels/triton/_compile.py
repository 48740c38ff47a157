"""Compiling Triton kernels for real GPU targets on a machine without a GPU.

`triton.compile(ASTSource(...), target=GPUTarget(...))` runs the whole pipeline (TTIR, TTGIR,
LLVM, PTX, ptxas to cubin) for any target, and catches what the interpreter forgives:
unsupported dtypes or shapes, shared memory, register spills. It needs the kernels built as
real `JITFunction`s, i.e. imported in a process where TRITON_INTERPRET is not "1":
`call_without_interpreter` provides one.

Registers and spills come from the cubin (cuobjdump -res-usage), since `CompiledKernel.n_regs`
and `n_spills` are only filled in when the kernel is loaded onto a GPU; n_spills follows
Triton's definition there (local memory bytes / 4).
"""
import inspect
import json
import os
import re
import subprocess
import sys
import tempfile

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.runtime.jit import JITFunction

# Parameters Triton would specialize at launch time for contiguous channels-first tensors:
# an int argument equal to 1 becomes a constant, which tells the compiler that loads along
# x are contiguous.
UNIT_STRIDE_SUFFIX = "_sx"


def signature(kernel, pointer_types: dict, scalar_types: dict, constexprs: dict) -> dict:
    """The ASTSource signature of `kernel`: pointers typed by `pointer_types` (name -> element
    type, e.g. "fp32"), named scalars by `scalar_types`, `*_sx` strides and the entries of
    `constexprs` as constants, every other argument int32."""
    sig = {}
    for name in kernel.arg_names:
        if name in constexprs or name.endswith(UNIT_STRIDE_SUFFIX):
            sig[name] = "constexpr"
        elif name in pointer_types:
            sig[name] = "*" + pointer_types[name]
        else:
            sig[name] = scalar_types.get(name, "i32")
    return sig


def compile_kernel(kernel, pointer_types: dict, scalar_types: dict, constexprs: dict, arch: int,
                   num_warps: int) -> dict:
    """Compiles `kernel` for CUDA compute capability `arch` (80, 90, ...) and reports its
    resources: {"kernel", "arch", "num_warps", "n_regs", "n_spills", "shared", "mma"}, "mma" the
    tensor-core instructions in its PTX (see tensor_core_instructions)."""
    if not isinstance(kernel, JITFunction):
        raise RuntimeError(f"{kernel!r} is not a JITFunction: compile in a process without "
                           "TRITON_INTERPRET=1 (see vsr_kernels.triton._compile.call_without_interpreter)")
    # Constexprs with a default (such as INTERPRETED) take it unless `constexprs` names them.
    defaults = {name: p.default for name, p in inspect.signature(kernel.fn).parameters.items()
                if p.default is not inspect.Parameter.empty}
    unit_strides = {name: 1 for name in kernel.arg_names if name.endswith(UNIT_STRIDE_SUFFIX)}
    constants = unit_strides | defaults | constexprs
    source = ASTSource(fn=kernel, signature=signature(kernel, pointer_types, scalar_types, constants),
                       constexprs=constants)
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})
    regs, local_bytes = _resource_usage(compiled.kernel)
    return {"kernel": kernel.__name__, "arch": arch, "num_warps": num_warps, "n_regs": regs,
            "n_spills": local_bytes // 4, "shared": compiled.metadata.shared,
            "mma": tensor_core_instructions(compiled.asm["ptx"])}


def tensor_core_instructions(ptx: str) -> list:
    """The distinct tensor-core instructions in `ptx` ("mma.sync.aligned.m16n8k16...",
    "wgmma.mma_async..."), without their operands: empty for a kernel on the FMA units."""
    return sorted(set(re.findall(r"\b((?:wgmma\.mma_async|mma\.sync)[\w.]*)", ptx)))


def _resource_usage(cubin: bytes) -> tuple:
    """(registers per thread, local memory bytes per thread) of the single kernel in `cubin`."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        listing = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "-res-usage", f.name], check=True,
                                 capture_output=True, text=True).stdout
    return parse_resource_usage(listing)


def parse_resource_usage(listing: str) -> tuple:
    """(registers, local memory bytes) from `cuobjdump -res-usage` output. Spilled registers
    show as STACK (the ptxas bundled with Triton 3.6) or LOCAL: both count."""
    match = re.search(r"REG:(\d+) STACK:(\d+) SHARED:\d+ LOCAL:(\d+)", listing)
    if match is None:
        raise RuntimeError(f"unexpected cuobjdump -res-usage output:\n{listing}")
    return int(match.group(1)), int(match.group(2)) + int(match.group(3))


def call_without_interpreter(module: str, function: str, *args, timeout: float = 900):
    """`module.function(*args)` run in a fresh Python process with TRITON_INTERPRET unset, so
    that its kernels are compilable JITFunctions; arguments and result travel as JSON."""
    code = (f"import json, sys; from {module} import {function}; "
            f"print(json.dumps({function}(*json.loads(sys.argv[1]))))")
    env = {name: value for name, value in os.environ.items() if name != "TRITON_INTERPRET"}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(args)], env=env, capture_output=True,
                          text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"{module}.{function}{args} failed in a subprocess:\n{done.stderr}")
    return json.loads(done.stdout.splitlines()[-1])  # the result is the last line, whatever else was printed
