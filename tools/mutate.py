"""Mutation check: do an op's tests catch small, realistic bugs?

Applies each single-line mutant of tools/mutants/<op>.py, one at a time, to a scratch copy
of the working tree (tracked and untracked files, plus the built extension), rebuilds the
extension there only when a C++ file is mutated (C++ mutants run last), runs the op's tests
(`tests/test_<op>.py -x -q`) and prints each mutant killed or survived, then the mutation
score per op. Tests that already fail on the unmutated tree (a baseline run) are deselected,
so a mutant is killed only by a test that passed before it.

Run by hand before an op issue is resolved, not in CI:

    python tools/mutate.py                      # every op with a mutant list
    python tools/mutate.py local_argmax_attention --only triton-tie-last
    python tools/mutate.py --list

Mutants of a backend this machine cannot run (CUDA without a GPU) are reported as "not run".
"""
from __future__ import annotations

import argparse
import importlib
import os
import pkgutil
import re
import shlex
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))

import mutants as mutant_lists  # noqa: E402


def op_lists() -> dict:
    return {m.name: importlib.import_module(f"mutants.{m.name}").MUTANTS
            for m in pkgutil.iter_modules(mutant_lists.__path__)}


def is_cpp(path: str) -> bool:
    return path.startswith("csrc/")


def has_cuda() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


def scratch_copy(dest: Path) -> None:
    """The working tree as git sees it (tracked + untracked, not ignored), plus the built
    extension and its build folder (so a C++ rebuild is incremental)."""
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=ROOT, check=True,
                           capture_output=True).stdout.decode().split("\0")
    for name in filter(None, files):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    package = ROOT / "vsr_kernels"
    for built in [*package.glob("_C*.so"), *package.glob("_build_info.py")]:
        shutil.copy2(built, dest / "vsr_kernels" / built.name)
    if (ROOT / "build").is_dir():
        shutil.copytree(ROOT / "build", dest / "build", symlinks=True)


def build(tree: Path, log: Path) -> bool:
    with open(log, "a") as out:
        command = [sys.executable, "setup.py", "build_ext", "--inplace", "--force"]
        return subprocess.run(command, cwd=tree, stdout=out,
                              stderr=subprocess.STDOUT).returncode == 0


def run_tests(tree: Path, op: str, deselect: list, timeout: float, extra: list) -> tuple[int, str]:
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-rf", f"tests/test_{op}.py",
           *extra]
    for test_id in deselect:
        cmd += ["--deselect", test_id]
    try:
        done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return -1, "timeout"
    return done.returncode, done.stdout + done.stderr


def baseline_failures(tree: Path, op: str, timeout: float, extra: list) -> list:
    """Ids of the tests that fail on the unmutated tree (run without -x)."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rf", f"tests/test_{op}.py",
           *extra]
    done = subprocess.run(cmd, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
    return re.findall(r"^FAILED (\S+)", done.stdout, re.M)


def first_failure(output: str) -> str:
    found = re.search(r"^FAILED (\S+)", output, re.M)
    if found:
        return found.group(1).split("::", 1)[-1]
    found = re.search(r"^ERROR (\S+)", output, re.M)
    return found.group(1) if found else output.strip().splitlines()[-1][:100] if output.strip() else "?"


def main(argv=None) -> int:
    lists = op_lists()
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("ops", nargs="*", help=f"ops to mutate (default: all of {', '.join(lists)})")
    parser.add_argument("--only", action="append", default=[], help="mutant id (repeatable)")
    parser.add_argument("--list", action="store_true", help="list the mutants and exit")
    parser.add_argument("--no-baseline", action="store_true", help="skip the baseline run (assume it passes)")
    parser.add_argument("--timeout", type=float, default=3600, help="seconds per test run")
    parser.add_argument("--keep", action="store_true", help="keep the scratch copy")
    parser.add_argument("--pytest-args", default="", help="extra pytest arguments, e.g. \"-k 'not gpu'\"")
    args = parser.parse_args(argv)
    extra = shlex.split(args.pytest_args)
    ops = args.ops or list(lists)
    cuda = has_cuda()
    scores = {}
    for op in ops:
        mutants = [m for m in lists[op] if not args.only or m.id in args.only]
        mutants.sort(key=lambda m: is_cpp(m.file))  # C++ last: one rebuild each, then one to restore
        if args.list:
            for m in mutants:
                print(f"{op:24} {m.id:28} {m.backend:10} {m.kind:17} {m.file}")
            continue
        tree = Path(tempfile.mkdtemp(prefix=f"mutate-{op}-"))
        log = tree / "build.log"
        try:
            scratch_copy(tree)
            deselect = [] if args.no_baseline else baseline_failures(tree, op, args.timeout, extra)
            if deselect:
                print(f"{op}: {len(deselect)} tests fail before any mutant; deselected (see --no-baseline)")
            killed = survived = 0
            dirty_build = False
            for m in mutants:
                path = tree / m.file
                text = path.read_text() if path.exists() else ""
                if text.count(m.original) != 1:
                    print(f"  STALE     {m.id:28} fragment found {text.count(m.original)} times in {m.file}")
                    continue
                if m.backend == "cuda" and not cuda:
                    print(f"  NOT RUN   {m.id:28} needs a CUDA device")
                    continue
                start = time.time()
                path.write_text(text.replace(m.original, m.replacement))
                try:
                    if is_cpp(m.file) or dirty_build:
                        dirty_build = is_cpp(m.file)
                        if not build(tree, log):
                            print(f"  INVALID   {m.id:28} does not compile (see {log})")
                            continue
                    rc, output = run_tests(tree, op, deselect, args.timeout, extra)
                finally:
                    path.write_text(text)
                seconds = time.time() - start
                if rc == 0:
                    survived += 1
                    print(f"  SURVIVED  {m.id:28} {m.backend:9} {m.kind:17} ({seconds:.0f} s)"
                          + (f"  [{m.note}]" if m.note else ""), flush=True)
                else:
                    killed += 1
                    print(f"  killed    {m.id:28} {m.backend:9} {m.kind:17} ({seconds:.0f} s) by "
                          f"{first_failure(output)}", flush=True)
            total = killed + survived
            scores[op] = (killed, total)
            percent = f" = {100 * killed / total:.0f}%" if total else ""
            print(f"{op}: mutation score {killed}/{total}{percent}",
                  flush=True)
        finally:
            if args.keep:
                print(f"scratch copy kept: {tree}")
            else:
                shutil.rmtree(tree, ignore_errors=True)
    if scores:
        print("mutation scores: " + ", ".join(f"{op} {k}/{t}" for op, (k, t) in scores.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
