"""benchmarks/bench_attention.py --quick runs on CPU (the table, the JSON lines, a peer in a child
process: here a stand-in module with FlashInfer's class names, moecomm.attention itself)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

FAKE = '''from moecomm.attention import *  # noqa: F403  a stand-in with FlashInfer's API
from moecomm.attention import BatchDecodeWithPagedKVCacheWrapper as _D
__version__ = "stand-in"
class BatchDecodeWithPagedKVCacheWrapper(_D):
    def __init__(self, ws, layout="NHD", use_tensor_cores=False):
        super().__init__(ws, layout)
'''


def test_bench_quick_with_a_peer(tmp_path):
    (tmp_path / "site" / "flashinfer").mkdir(parents=True)
    (tmp_path / "site" / "flashinfer" / "__init__.py").write_text(FAKE)
    out = tmp_path / "r.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOECOMM_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_attention", "--quick", "--peer", f"fake={tmp_path / 'site'}",
                           "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "peers found: ['fake']" in proc.stdout and "WRONG" not in proc.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    impls = {(r["op"], r["impl"]) for r in rows}
    assert ("attention_decode", "moecomm") in impls and ("attention_decode", "fake-stand-in") in impls
    assert ("attention_prefill", "moecomm") in impls and ("attention_prefill", "fake-stand-in") in impls
    # the target's row again, ours and SDPA timed call after call
    inter = [r for r in rows if r["op"] == "attention_prefill_interleaved"]
    assert len(inter) == 1 and inter[0]["median_ms"] > 0 and inter[0]["sdpa_median_ms"] > 0
    assert abs(inter[0]["ratio_to_sdpa"] - inter[0]["sdpa_median_ms"] / inter[0]["median_ms"]) < 1e-9
    assert "interleaved with SDPA" in proc.stdout


def test_plan_only_with_pieces_and_device_ids(tmp_path):
    """--plan-only --pieces --quick on CPU: every case, host and device page ids ("dev ids": a meta
    tensor here, the code path that never reads them), each through plan()'s numpy path and (where a
    C compiler is here) its C path, with its pieces, in the JSON lines."""
    from moecomm.attention import _plan_host

    paths = ["numpy", "c"] if _plan_host.library() is not None else ["numpy"]
    out = tmp_path / "plan.jsonl"
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "MOECOMM_BACKEND")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_attention", "--plan-only", "--pieces", "--profile",
                           "--quick", "--out", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    cases = [(r["case"], r["path"]) for r in rows]
    assert len(cases) == 4 * len(paths) and sum("dev ids" in c for c, _ in cases) == 2 * len(paths), cases
    assert {p for _, p in cases} == set(paths), cases
    for r in rows:
        assert r["op"] == "attention_plan_host" and r["median_us"] > 0
        if r["path"] == "c":
            assert set(r["pieces_us"]) == {"tables", "c call", "staging", "rest"} and r["numpy_over_c"] > 0, r
            continue
        want = {"to numpy", "check_page_table", "staging", "rest"} | ({"check_indices"} if "host ids" in r["case"] else set())
        assert set(r["pieces_us"]) == want, r
