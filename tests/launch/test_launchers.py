"""moecomm.dist under real launchers: torchrun, mpiexec (MPICH or Open MPI) and a local Ray cluster.

Every subprocess has a hard timeout, so a hang fails the test instead of the CI job.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
TINY = ["--tokens-per-rank=33", "--hidden=64", "--num-experts=10", "--top-k=3", "--intermediate=32", "--iters=1"]
HARD_TIMEOUT_S = 150


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
                "-m", "moecomm.dist.demo", *TINY])
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


@pytest.mark.parametrize("n", [2, 4])
def test_mpiexec(n):
    _mpiexec()
    from moecomm.dist.demo import mpirun_command

    out = _run(mpirun_command(n, [sys.executable, "-m", "moecomm.dist.demo", *TINY]))
    _check_table(out, n, "mpi")


def test_mpiexec_local_ranks_and_rendezvous():
    _mpiexec()
    from moecomm.dist.demo import mpirun_command

    code = ("import moecomm.dist as d, torch, torch.distributed as dist; w = d.init(timeout_s=60); "
            "t = torch.ones(1); dist.all_reduce(t); "
            "import os; os.write(1, f'WORLD {w.rank} {w.world_size} {w.local_rank} {w.local_world_size} {w.launcher} {int(t.item())}\\n'.encode()); "
            "d.shutdown()")  # one write() per line: ranks share the pipe, and a single small write is atomic
    out = _run(mpirun_command(2, [sys.executable, "-c", code]))
    lines = sorted(line for line in out.splitlines() if line.startswith("WORLD"))
    assert lines == ["WORLD 0 2 0 2 mpi 2", "WORLD 1 2 1 2 mpi 2"], out


def test_launch_scripts_are_valid_shell():
    for script in sorted((ROOT / "launch").glob("*.sh")) + [ROOT / "launch" / "slurm_mpi.sbatch"]:
        p = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, (script, p.stderr)


def test_importing_dist_and_ray_starts_nothing():
    code = ("import sys, moecomm.dist, moecomm.ray; "
            "print(sorted(m for m in ('ray', 'mpi4py') if m in sys.modules))")
    out = _run([sys.executable, "-c", code])
    assert out.strip().splitlines()[-1] == "[]", out
