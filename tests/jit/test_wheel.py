"""kernels/ travels in the wheel and is found from an installed wheel and from an editable install.

Both installs go into one fresh venv (--system-site-packages for torch, pip and setuptools), built from a copy of the
repository's packaging files so the checkout gets no build/ or egg-info folders. PYTHONPATH is
cleared for the venv's interpreter, so it imports the installed moecomm, not this checkout.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_PROBE = r"""
import json, moecomm
from moecomm.jit import cuda
d = cuda.kernels_dir()
src = cuda.source_path("allreduce/reduce.cu")
print("PROBE" + json.dumps({"moecomm": moecomm.__file__, "kernels": str(d), "text": src.read_text(),
                            "includes": [str(p) for p in cuda.included_files(src)]}))
"""


def _probe(python: Path, cwd: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    res = subprocess.run([str(python), "-c", _PROBE], capture_output=True, text=True, env=env, cwd=cwd, timeout=120)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("PROBE")]
    assert res.returncode == 0 and lines, res.stdout[-2000:] + res.stderr[-3000:]
    return json.loads(lines[-1][5:])


def _pip(python: Path, *args: str, cwd: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    res = subprocess.run([str(python), "-m", "pip", *args], capture_output=True, text=True, env=env, cwd=cwd,
                         timeout=300)
    assert res.returncode == 0, f"pip {' '.join(args)} failed:\n{res.stdout[-2000:]}\n{res.stderr[-3000:]}"


@pytest.mark.slow
def test_wheel_and_editable_install_find_the_kernel_sources(tmp_path):
    pytest.importorskip("setuptools")
    src = tmp_path / "repo"
    src.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md"):
        shutil.copy2(ROOT / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    shutil.copytree(ROOT / "moecomm", src / "moecomm", ignore=ignore)
    shutil.copytree(ROOT / "kernels", src / "kernels", ignore=ignore)
    want = (ROOT / "kernels" / "allreduce" / "reduce.cu").read_text()

    # 1. the wheel carries kernels/ as moecomm/_kernels
    _pip(Path(sys.executable), "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(tmp_path / "wheels"),
         str(src), cwd=tmp_path)
    (wheel,) = (tmp_path / "wheels").glob("moecomm-*.whl")
    import zipfile

    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"moecomm/_kernels/allreduce/reduce.cu", "moecomm/_kernels/common/dtypes.cuh",
            "moecomm/_kernels/attention/plan_host.c"} <= names

    # 2. installed into a fresh venv, moecomm finds and reads the sources from site-packages
    venv = tmp_path / "venv"
    # --without-pip: the venv uses this interpreter's pip and setuptools through the system site (a
    # venv's own bundled setuptools may be too old to build, and ensurepip costs ~10 s)
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True,
                   timeout=120)
    python = venv / "bin" / "python"
    _pip(python, "install", "--no-deps", "-q", str(wheel), cwd=tmp_path)
    got = _probe(python, tmp_path)
    site = Path(got["moecomm"]).parent
    assert site.is_relative_to(venv) and Path(got["kernels"]) == site / "_kernels"
    assert got["text"] == want and [Path(p).name for p in got["includes"]] == ["reduce.cu", "dtypes.cuh"]

    # 3. an editable install of the same tree finds kernels/ in the tree
    _pip(python, "uninstall", "-y", "-q", "moecomm", cwd=tmp_path)
    _pip(python, "install", "--no-deps", "--no-build-isolation", "-q", "-e", str(src), cwd=tmp_path)
    got = _probe(python, tmp_path)
    assert Path(got["moecomm"]).parent == src / "moecomm" and Path(got["kernels"]) == src / "kernels"
    assert got["text"] == want
