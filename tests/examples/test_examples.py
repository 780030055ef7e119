"""Every script in examples/ runs as its docstring says, on CPU, and does what it claims.

Each is run the way a user runs it (a fresh interpreter; torchrun for the expert-parallel one) from a
temporary working directory, with only PYTHONPATH pointing at this checkout.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"
TIMEOUT_S = 180


def _run(cmd: list[str], cwd: Path) -> str:
    env = dict(os.environ, PYTHONPATH=str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
               OMP_NUM_THREADS="1")
    env.setdefault("RAY_AUTH_MODE", "disabled")
    env.pop("MOECOMM_BACKEND", None)
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = p.stdout + p.stderr
    assert p.returncode == 0, out[-4000:]
    return out


def test_every_example_is_tested():
    here = Path(__file__).read_text()
    scripts = sorted(p.name for p in EXAMPLES.glob("*.py"))
    assert scripts and all(name in here for name in scripts), scripts


def test_moe_in_a_model_trains(tmp_path):
    out = _run([sys.executable, str(EXAMPLES / "moe_in_a_model.py"), "--steps", "20"], tmp_path)
    first, last = map(float, re.search(r"loss ([0-9.]+) -> ([0-9.]+) in 20 steps", out).groups())
    assert last < 0.6 * first, out  # it learns the batch: the MoE's router and experts get gradients


def test_expert_parallel_under_torchrun(tmp_path):
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                f"--log-dir={tmp_path / 'logs'}", str(EXAMPLES / "expert_parallel_torchrun.py")], tmp_path)
    assert "rank 0: experts [0, 1, 2, 3]" in out and "rank 1: experts [4, 5, 6, 7]" in out, out
    assert "expert-parallel output matches the one-process layer" in out, out


def test_ray_actor_group(tmp_path):
    pytest.importorskip("ray", reason="Ray is not installed (pip install ray)")
    out = _run([sys.executable, str(EXAMPLES / "ray_actor_group.py")], tmp_path)
    assert "rank 1 on cpu: experts [4, 5, 6, 7]" in out, out
    assert "every actor matches the one-process layer" in out, out
