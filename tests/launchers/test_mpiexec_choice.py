"""Which mpiexec `moecomm demo --launcher mpirun` picks: the one of the MPI library mpi4py loads.

Fake prefixes under tmp_path (bin/mpiexec as a tiny shell script, lib/libmpi.so.* as empty files):
no MPI runs here, except the fake launcher that main() starts (it prints its arguments and exits 0).
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

from moecomm.apps.ep_demo import main
from moecomm.apps.mpiexec import find_mpiexec, mpirun_command
from moecomm.errors import MoeCommValueError, UnsupportedHardwareError


def _exe(path: Path, version: str = "HYDRA build details:") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    # `--version` prints the banner mpirun_command reads; anything else prints the arguments
    path.write_text(f'#!/bin/sh\nif [ "$1" = --version ]; then echo "{version}"; else echo "FAKE-MPIEXEC $*"; fi\n')
    path.chmod(0o755)
    return path


def _prefix(root: Path, libname: str | None, launchers=("mpiexec", "mpirun"), version: str = "HYDRA") -> Path:
    for name in launchers:
        _exe(root / "bin" / name, version)
    (root / "lib").mkdir(parents=True, exist_ok=True)
    if libname:
        (root / "lib" / libname).write_bytes(b"")
    return root


@pytest.fixture
def trees(tmp_path):
    """An Open MPI prefix, the Python prefix with the `mpich` wheel, and a PATH directory of a third MPI."""
    return dict(
        ompi=_prefix(tmp_path / "ompi", "libmpi.so.40", version="mpiexec (Open MPI) 5.0.11"),
        py=_prefix(tmp_path / "py", "libmpi.so.12"),
        path=_exe(tmp_path / "path" / "mpiexec").parent,
    )


def _choose(trees, config=None, prefixes=None, **env):
    env.setdefault("PATH", str(trees["path"]))
    return find_mpiexec(environ=env, mpi4py_config=config or {}, prefixes=[str(trees["py"])] if prefixes is None
                        else prefixes)


def test_mpi4py_libmpi_file_picks_that_prefix_over_python_prefix_and_path(trees):
    lib = trees["ompi"] / "lib" / "libmpi.so.40"
    c = _choose(trees, MPI4PY_LIBMPI=str(lib))
    assert (c.path, c.reason) == (str(trees["ompi"] / "bin" / "mpiexec"), f"beside MPI4PY_LIBMPI={lib}")


def test_mpi4py_libmpi_directory_and_list(trees, tmp_path):
    lib_dir = trees["ompi"] / "lib"
    assert _choose(trees, MPI4PY_LIBMPI=str(lib_dir)).path == str(trees["ompi"] / "bin" / "mpiexec")
    # mpi4py takes the first entry that loads: a missing file and a bare soname are passed over
    listed = os.pathsep.join([str(tmp_path / "gone" / "libmpi.so"), "libmpi.so.40", str(lib_dir / "libmpi.so.40")])
    assert _choose(trees, MPI4PY_LIBMPI=listed).path == str(trees["ompi"] / "bin" / "mpiexec")


def test_mpi4py_libmpi_through_symlinks(trees, tmp_path):
    ompi = str(trees["ompi"] / "bin" / "mpiexec")
    (tmp_path / "usr" / "lib").mkdir(parents=True)
    link = tmp_path / "usr" / "lib" / "libmpi.so.40"  # usr/bin has no launcher: the link's target's prefix does
    link.symlink_to(trees["ompi"] / "lib" / "libmpi.so.40")
    assert _choose(trees, MPI4PY_LIBMPI=str(link)).path == ompi
    (tmp_path / "other").mkdir()
    linked_dir = tmp_path / "other" / "lib"  # a symlinked lib/: its real prefix's bin/
    linked_dir.symlink_to(trees["ompi"] / "lib", target_is_directory=True)
    assert _choose(trees, MPI4PY_LIBMPI=str(linked_dir / "libmpi.so.40")).path == ompi
    assert _choose(trees, MPI4PY_LIBMPI=str(linked_dir)).path == ompi
    _exe(tmp_path / "usr" / "bin" / "mpiexec")  # a launcher beside the path as given comes first
    assert _choose(trees, MPI4PY_LIBMPI=str(link)).path == str(tmp_path / "usr" / "bin" / "mpiexec")


def test_mpirun_only_and_non_executable_mpiexec(trees, tmp_path):
    prefix = _prefix(tmp_path / "mpirun-only", "libmpi.so", launchers=("mpirun",))
    (prefix / "bin" / "mpiexec").write_text("not executable")  # a file that is not a launcher
    c = _choose(trees, MPI4PY_LIBMPI=str(prefix / "lib" / "libmpi.so"))
    assert c.path == str(prefix / "bin" / "mpirun")


def test_mpi4py_libmpi_without_a_launcher_beside_it_falls_to_path_not_python_prefix(trees, tmp_path):
    lone = tmp_path / "lone" / "lib"
    lone.mkdir(parents=True)
    (lone / "libmpi.so.40").write_bytes(b"")
    c = _choose(trees, MPI4PY_LIBMPI=str(lone / "libmpi.so.40"))
    # the Python prefix's mpiexec (the mpich wheel's) is not the library mpi4py loads: not chosen
    assert c.path == str(trees["path"] / "mpiexec")
    assert c.reason == (f"PATH; none beside MPI4PY_LIBMPI={lone / 'libmpi.so.40'} ({tmp_path / 'lone' / 'bin'}), "
                        "so it may belong to another MPI: set MOECOMM_MPIEXEC if the ranks fail")


def test_python_prefix_with_libmpi_beats_path(trees):
    c = _choose(trees)
    assert (c.path, c.reason) == (str(trees["py"] / "bin" / "mpiexec"), f"beside mpi4py's MPI ({trees['py'] / 'lib'})")


def test_python_prefix_without_libmpi_is_passed_over(trees, tmp_path):
    bare = _prefix(tmp_path / "bare", None)  # bin/mpiexec but no libmpi: mpi4py loads nothing from here
    c = _choose(trees, prefixes=[str(bare), str(trees["py"])])
    assert c.path == str(trees["py"] / "bin" / "mpiexec")
    assert _choose(trees, prefixes=[str(bare)]) == type(c)(str(trees["path"] / "mpiexec"), "PATH")


def test_mpi4py_get_config_compilers(trees, tmp_path):
    built = _prefix(tmp_path / "built", "libmpi.so")
    c = _choose(trees, config={"mpicc": f"{built / 'bin' / 'mpicc'} -O2"})
    assert (c.path, c.reason) == (str(built / "bin" / "mpiexec"), "beside mpi4py's MPI (mpi4py.get_config())")
    assert _choose(trees, config={"mpi_dir": str(built)}).path == str(built / "bin" / "mpiexec")
    _exe(trees["path"] / "mpicc")  # a bare compiler name: found on PATH, so PATH's directory is mpi4py's MPI
    c = _choose(trees, config={"mpicc": "mpicc"})
    assert (c.path, c.reason) == (str(trees["path"] / "mpiexec"), "beside mpi4py's MPI (mpi4py.get_config())")


def test_moecomm_mpiexec_overrides_everything(trees, tmp_path):
    mine = _exe(tmp_path / "mine" / "my-mpiexec")
    every = dict(MPI4PY_LIBMPI=str(trees["ompi"] / "lib"), config={"mpi_dir": str(trees["ompi"])})
    assert _choose(trees, MOECOMM_MPIEXEC=str(mine), **every) == type(_choose(trees))(str(mine), "MOECOMM_MPIEXEC")
    c = _choose(trees, MOECOMM_MPIEXEC="my-mpiexec", PATH=f"{trees['path']}{os.pathsep}{mine.parent}", **every)
    assert c.path == str(mine)  # a bare name is looked up on PATH


@pytest.mark.parametrize("value", ["/nonexistent/mpiexec", "no-such-mpiexec", "{tmp}"])
def test_moecomm_mpiexec_naming_nothing_is_an_error(trees, tmp_path, value):
    value = value.format(tmp=tmp_path)  # a directory is not an executable either
    with pytest.raises(MoeCommValueError, match=r"MOECOMM_MPIEXEC must name an executable mpiexec/mpirun "
                                                rf"\(a path, or a name on PATH\), got '{value}'"):
        _choose(trees, MOECOMM_MPIEXEC=value)


def test_nothing_found_names_where_it_looked(trees, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    lone = tmp_path / "lone" / "lib"
    lone.mkdir(parents=True)
    (lone / "libmpi.so").write_bytes(b"")
    with pytest.raises(UnsupportedHardwareError, match=(
            rf"launcher 'mpirun' needs mpiexec or mpirun; looked in {tmp_path / 'lone' / 'bin'}, and on PATH "
            rf"\({empty}\), found none \(pip install mpi4py mpich, or set MOECOMM_MPIEXEC=/path/to/mpiexec\)")):
        _choose(trees, MPI4PY_LIBMPI=str(lone / "libmpi.so"), PATH=str(empty))
    with pytest.raises(UnsupportedHardwareError, match=rf"looked in and on PATH \({empty}\), found none"):
        _choose(trees, PATH=str(empty), prefixes=[])


def test_mpirun_command_uses_the_choice_and_open_mpi_flags(trees, monkeypatch):
    monkeypatch.delenv("MOECOMM_MPIEXEC", raising=False)
    monkeypatch.setenv("MPI4PY_LIBMPI", str(trees["ompi"] / "lib" / "libmpi.so.40"))
    ompi = str(trees["ompi"] / "bin" / "mpiexec")
    assert mpirun_command(3, ["prog", "-x"]) == [ompi, "--allow-run-as-root", "--oversubscribe", "-n", "3",
                                                 "prog", "-x"]
    monkeypatch.setenv("MOECOMM_MPIEXEC", str(trees["path"] / "mpiexec"))  # MPICH-like banner: no flags
    assert mpirun_command(2, ["prog"]) == [str(trees["path"] / "mpiexec"), "-n", "2", "prog"]


def test_main_prints_the_chosen_launcher(trees, monkeypatch, capfd):
    monkeypatch.setenv("MOECOMM_MPIEXEC", str(trees["path"] / "mpiexec"))
    assert main(2, "mpirun", tokens_per_rank=4, hidden=8, num_experts=2, top_k=1, intermediate=8, iters=1,
                timeout_s=10)
    out = capfd.readouterr().out
    assert f"[demo] mpirun launcher: {trees['path'] / 'mpiexec'} (MOECOMM_MPIEXEC)" in out, out
    assert f"FAKE-MPIEXEC -n 2 {sys.executable} -m moecomm.apps.ep_demo --tokens-per-rank=4" in out, out
