"""The package as a user gets it: sdist -> wheel built from that sdist -> a fresh virtual
environment holding only torch and that wheel -> the op run from outside the repository.

Marked `packaging` (a few minutes: one extension build and one torch install): `make test`
deselects it, `.ci/run` runs it after `make test`.
"""
import email.parser
import json
import os
import pathlib
import subprocess
import sys
import tarfile
import textwrap
import venv
import zipfile

import pytest
import torch

pytestmark = pytest.mark.packaging

ROOT = pathlib.Path(__file__).resolve().parents[1]
TORCH_RELEASE = torch.__version__.split("+")[0]
SOURCE_SUFFIXES = {".h", ".cuh", ".cu", ".cpp"}


def _run(command, cwd, env=None, timeout=900):
    result = subprocess.run([str(part) for part in command], cwd=cwd, env=env, capture_output=True,
                            text=True, timeout=timeout)
    assert result.returncode == 0, (
        f"{' '.join(map(str, command))} failed ({result.returncode}) in {cwd}:\n"
        f"--- stdout\n{result.stdout[-6000:]}\n--- stderr\n{result.stderr[-6000:]}")
    return result.stdout


def _outside_env():
    """The environment for commands that must not see the checkout."""
    env = dict(os.environ)
    env.pop("PYTHONPATH", None)
    env.pop("PYTHONHOME", None)
    return env


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """(sdist, wheel): the sdist of the checkout and the wheel built from the unpacked sdist."""
    work = tmp_path_factory.mktemp("packaging")
    dist = work / "dist"
    _run([sys.executable, "-m", "build", "--sdist", "--no-isolation", "--outdir", dist, ROOT], cwd=ROOT)
    (sdist,) = dist.glob("*.tar.gz")
    unpacked = work / "unpacked"
    with tarfile.open(sdist) as archive:
        try:
            archive.extractall(unpacked, filter="data")
        except TypeError:  # a Python without tarfile extraction filters
            archive.extractall(unpacked)
    (source,) = unpacked.iterdir()
    _run([sys.executable, "-m", "build", "--wheel", "--no-isolation", "--outdir", dist, source], cwd=source)
    (wheel,) = dist.glob("*.whl")
    return sdist, wheel


@pytest.fixture(scope="module")
def environment(built, tmp_path_factory):
    """A fresh venv (no system site-packages) with torch==<this torch's release> and the wheel."""
    _, wheel = built
    home = tmp_path_factory.mktemp("venv")
    venv.EnvBuilder(with_pip=True, system_site_packages=False).create(home / "venv")
    python = home / "venv" / "bin" / "python"
    # The wheel requires torch==<the release it was built against>: pip resolves it from the same
    # sources as any torch install here (on this project's machines the local torch 2.13.0 file).
    _run([python, "-m", "pip", "install", "--disable-pip-version-check", f"torch=={TORCH_RELEASE}", wheel],
         cwd=home, env=_outside_env())
    return python, home


def test_sdist_carries_every_source(built):
    sdist, _ = built
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    sources = {path.relative_to(ROOT).as_posix() for path in (ROOT / "csrc").rglob("*")
               if path.suffix in SOURCE_SUFFIXES}
    assert sources, "no C++/CUDA sources found in the checkout"
    wanted = sources | {"README.md", "LICENSE", "setup.py", "pyproject.toml", "MANIFEST.in",
                        "vsr_kernels/models/mana.py", "tools/check_gpu_build.py"}
    assert not wanted - names, f"missing from the sdist: {sorted(wanted - names)}"
    assert "vsr_kernels/_build_info.py" not in names, "the sdist must not carry a build's _build_info.py"
    with tarfile.open(sdist) as archive:
        pkg_info = archive.extractfile(f"{sdist.name[:-len('.tar.gz')]}/PKG-INFO").read().decode()
    metadata = email.parser.Parser().parsestr(pkg_info)
    assert "torch>=2.4" in metadata.get_all("Requires-Dist")


def test_wheel_contents_and_metadata(built):
    _, wheel = built
    with zipfile.ZipFile(wheel) as archive:
        names = set(archive.namelist())
        (metadata_name,) = [name for name in names if name.endswith(".dist-info/METADATA")]
        metadata = email.parser.Parser().parsestr(archive.read(metadata_name).decode())
        build_info = archive.read("vsr_kernels/_build_info.py").decode()
    assert any(name.startswith("vsr_kernels/_C.") for name in names)
    assert {"vsr_kernels/models/__init__.py", "vsr_kernels/models/mana.py"} <= names
    assert f"TORCH_VERSION = {torch.__version__!r}" in build_info
    assert f"torch=={TORCH_RELEASE}" in metadata.get_all("Requires-Dist")
    assert metadata["License-Expression"] == "MIT"
    assert metadata["Requires-Python"] == ">=3.10"
    assert "## Installing" in metadata.get_payload(), "the long description is the README"


RUN_OP = textwrap.dedent("""
    import json, pathlib, sys
    import torch
    import vsr_kernels
    from vsr_kernels import _extension
    from vsr_kernels.models import MANA

    generator = torch.Generator().manual_seed(0)
    def make(*shape):
        return torch.randn(*shape, generator=generator, dtype=torch.float64, requires_grad=True)
    query, key, value = make(1, 3, 5, 6), make(1, 2, 3, 5, 6), make(1, 2, 4, 5, 6)
    results = {}
    for backend in ("cpu", "reference"):
        out, score, index = vsr_kernels.local_argmax_attention(query, key, value, kernel_size=3,
                                                               backend=backend)
        grads = torch.autograd.grad((out.sin().sum() + score.cos().sum()), (query, key, value))
        results[backend] = (out, score, index, grads)
    cpu, ref = results["cpu"], results["reference"]
    torch.testing.assert_close(cpu[0], ref[0])
    torch.testing.assert_close(cpu[1], ref[1])
    assert torch.equal(cpu[2], ref[2])
    for mine, theirs in zip(cpu[3], ref[3]):
        torch.testing.assert_close(mine, theirs)
    print(json.dumps({"package": vsr_kernels.__file__, "load_error": repr(_extension.LOAD_ERROR),
                      "model": MANA.__name__, "torch": torch.__version__}))
""")


def test_op_runs_from_the_installed_wheel(environment):
    python, home = environment
    (home / "run_op.py").write_text(RUN_OP)
    report = json.loads(_run([python, "run_op.py"], cwd=home, env=_outside_env()).strip().splitlines()[-1])
    assert pathlib.Path(report["package"]).is_relative_to(home / "venv"), report
    assert ROOT not in pathlib.Path(report["package"]).parents
    assert report["load_error"] == "None"
    assert report["model"] == "MANA"


def test_mismatched_build_info_is_refused(environment):
    python, home = environment
    site = _run([python, "-c", "import vsr_kernels, os; print(os.path.dirname(vsr_kernels.__file__))"],
                cwd=home, env=_outside_env()).strip()
    package = pathlib.Path(site)
    if "_build_info" not in (package / "_extension.py").read_text():
        pytest.skip("vsr_kernels/_extension.py does not read _build_info yet (another branch adds that check)")
    info = package / "_build_info.py"
    original = info.read_text()
    try:
        info.write_text(original.replace(f"TORCH_VERSION = {torch.__version__!r}", "TORCH_VERSION = '0.0.0'"))
        for cached in (package / "__pycache__").glob("_build_info.*"):
            cached.unlink()
        probe = ("import vsr_kernels\n"
                 "from vsr_kernels import _extension\n"
                 "raise SystemExit(str(_extension.LOAD_ERROR))\n")
        result = subprocess.run([python, "-c", probe], cwd=home, env=_outside_env(), capture_output=True,
                                text=True, timeout=300)
        message = result.stdout + result.stderr
        assert "0.0.0" in message and TORCH_RELEASE in message, message
        assert "rebuild" in message.lower() or "reinstall" in message.lower() or "pip install" in message, message
    finally:
        info.write_text(original)


@pytest.mark.parametrize("setting", ["1", "maybe"])
def test_cuda_switch_is_checked(setting):
    """VSR_KERNELS_CUDA=1 where CUDA cannot be built, or a value that is not 0/1/auto, stops the
    build before compiling anything, saying why."""
    if setting == "1" and torch.version.cuda is not None:
        pytest.skip("this torch is a CUDA build: VSR_KERNELS_CUDA=1 may be satisfiable here")
    env = dict(_outside_env(), VSR_KERNELS_CUDA=setting)
    result = subprocess.run([sys.executable, "setup.py", "--name"], cwd=ROOT, env=env, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode != 0
    expected = "the CUDA kernels cannot be built" if setting == "1" else "must be 0, 1 or auto"
    assert expected in result.stderr, result.stderr
