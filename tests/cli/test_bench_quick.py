"""Every `moecomm bench CAPABILITY --quick` runs on CPU, as a user types it, and writes its JSON lines.

One test per benchmarks/bench_*.py (found, not listed: a new benchmark is tested from its first day).
Each is a fresh process through the command line, so the exit code path of cli.bench_main is the one a
user meets (it once ended `moecomm bench gemm --quick` in a TypeError after the table). Each takes a
few seconds on 2 cores.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moecomm.cli import bench_capabilities

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 180


def test_every_benchmark_is_found():
    assert set(bench_capabilities()) >= {"dispatch", "gemm", "moe", "permute", "routing"}


@pytest.mark.parametrize("triton", ["with_triton", "without_triton"])
@pytest.mark.parametrize("capability", bench_capabilities())
def test_bench_quick_runs_on_cpu(capability, triton, tmp_path):
    """Also where Triton is not installed (it is not a dependency; bench_sampling --quick once
    imported the Triton kernels' module for its control rows and crashed there)."""
    from test_without_triton import _BLOCKER

    out = tmp_path / "results.jsonl"
    paths = [str(ROOT)]
    if triton == "without_triton":
        shim = tmp_path / "no_triton"
        shim.mkdir()
        (shim / "sitecustomize.py").write_text(_BLOCKER)
        paths.insert(0, str(shim))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(paths + [os.environ.get("PYTHONPATH", "")]))
    env.pop("MOECOMM_BACKEND", None)
    p = subprocess.run([sys.executable, "-m", "moecomm.cli", "bench", capability, "--quick", "--out", str(out)],
                       cwd=tmp_path, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert p.returncode == 0, (p.stdout + p.stderr)[-4000:]
    assert "Traceback" not in p.stderr, p.stderr[-4000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    assert rows, p.stdout[-2000:]  # it measured something and said so
