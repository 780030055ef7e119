"""Launch configs: sm_90 compilation of every candidate (wgmma for the large tiles), the disk cache."""

# Shape legend: M = rows, K = in features, N = out features, E = groups.

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from moecomm.gemm import _configs

pytest.importorskip("triton")

# Under TRITON_INTERPRET=1 (conftest, CPU) every @triton.jit function, triton's own tl.cdiv/tl.sum
# combine functions included, is an interpreted object that the compiler rejects. So the sm_90
# compilation runs once, in a subprocess started with the interpreter off.
_AOT_SCRIPT = r"""
import json, sys
from moecomm.gemm import _configs, _triton
from moecomm.testing import compile_for_hopper
INTS = ("M", "N", "K", "E", "T", "stride_am", "stride_ak", "stride_be", "stride_bk", "stride_bn",
        "stride_cm", "stride_cn", "N_HALF")
out = []
for name, cfg, gather, glu, b_kn in json.loads(sys.stdin.read()):
    cfg = _configs.GemmConfig.from_json(cfg)
    ce = dict(NUM_PROGRAMS=132, BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k,
              GROUP_M=cfg.group_m, E_POW2=64, HAS_GATHER=gather, HAS_SCALE=True, FUSE_GLU=glu,
              ACT=_triton.ACT_SILU if glu else 0, USE_TMA=cfg.use_tma, B_KN=b_kn,
              FLATTEN=cfg.flatten, TMA_STORE=cfg.tma_store and not cfg.flatten)
    sig = {"a_ptr": "*bf16", "b_ptr": "*bf16", "c_ptr": "*bf16", "offs_ptr": "*i32", "gather_ptr": "*i32",
           "scale_ptr": "*fp32", **{k: "i32" for k in INTS}, **{k: "constexpr" for k in ce}}
    k = compile_for_hopper(_triton.grouped_mm_kernel, sig, ce, num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    ptx = k.asm["ptx"]
    out.append([name, "wgmma" in ptx, "cp.async.bulk.tensor" in ptx, k.metadata.shared,
                "cp.async.bulk.tensor.2d.global.shared" in ptx])
print("AOT" + json.dumps(out))
"""


@pytest.fixture(scope="module")
def compiled():
    """name -> (wgmma in PTX, TMA in PTX, shared memory bytes) for the configs that matter."""
    jobs = []
    for glu, b_kn in ((False, True), (False, False), (True, False)):
        for i, cfg in enumerate(_configs.candidates(8192, 28672, 4096, 8, glu=glu)):
            jobs.append((f"large{i} glu={glu} kn={b_kn}", cfg.to_json(), False, glu, b_kn))
    for rows in (512, 2048, 16384):
        for i, cfg in enumerate(_configs.candidates(rows, 4096, 7168, 32, glu=False)[:3]):
            jobs.append((f"rows{rows}-{i}", cfg.to_json(), True, False, False))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run([sys.executable, "-c", _AOT_SCRIPT], input=json.dumps(jobs), capture_output=True,
                         text=True, env=env, timeout=300)
    lines = [ln for ln in res.stdout.splitlines() if ln.startswith("AOT")]
    assert res.returncode == 0 and lines, res.stderr[-3000:]
    return {name: (wg, tma, smem, st) for name, wg, tma, smem, st in json.loads(lines[-1][3:])}


def test_large_tile_configs_use_wgmma_and_tma(compiled):
    large = _configs.candidates(8192, 28672, 4096, 8, glu=False) + _configs.candidates(8192, 28672, 4096, 8, glu=True)
    assert any(c.tma_store for c in large) and any(c.flatten for c in large)
    for name, (wgmma, tma, _, tma_store) in compiled.items():
        if name.startswith("large"):
            i, glu = int(name[5:name.index(" ")]), "glu=True" in name
            cfg = _configs.candidates(8192, 28672, 4096, 8, glu=glu)[i]
            assert wgmma and tma == cfg.use_tma, name
            # the TMA store shows in the PTX exactly where the config asks for it
            assert tma_store == (cfg.tma_store and cfg.use_tma and not cfg.flatten), name


def test_every_candidate_compiles_for_sm90(compiled):
    """Each regime's first candidates compile and fit sm_90's 227 KB of shared memory per block."""
    assert len(compiled) == 27
    for name, (_, _, smem, _) in compiled.items():
        assert smem <= 232448, name


class _FakeClock:
    """A GPU whose clock ramps up: the n-th timed call takes base * max(1, 3 - n / 10) ms."""

    def __init__(self, cost):
        self.cost, self.calls, self.cur, self.timed = cost, 0, None, []

    def run(self, cfg):
        if cfg.block_m == 999:
            raise RuntimeError("out of resource: shared memory")
        self.cur = cfg

    def timer(self, fn):
        fn()
        self.calls += 1
        self.timed.append(self.cur)
        return self.cost[self.cur] * max(1.0, 3.0 - self.calls / 10)


def test_tune_warms_up_then_times_round_robin():
    """The fastest candidate wins even when it is first and the clock is still ramping up; a
    candidate that fails to compile is skipped with a warning."""
    fast, slow, broken = (_configs.GemmConfig(128, 128, 64), _configs.GemmConfig(128, 64, 64),
                          _configs.GemmConfig(999, 64, 64))
    clock = _FakeClock({fast: 2.6, slow: 3.0})
    with pytest.warns(RuntimeWarning, match="failed"):
        assert _configs.tune([fast, broken, slow], clock.run, timer=clock.timer) is fast
    warm = clock.timed[:-14]  # the warm-up (>= 50 ms of the first candidate), then 7 rounds of both
    assert len(warm) >= 5 and set(warm) == {fast} and clock.timed[-14:] == [fast, slow] * 7
    clock = _FakeClock({fast: 2.6, slow: 3.0})
    assert _configs.tune([slow, fast], clock.run, timer=clock.timer, warmup_ms=0) is fast
    with pytest.raises(RuntimeError, match="every launch configuration failed"):
        _configs.tune([broken], clock.run, timer=clock.timer)
    # prefill lists: within 2% of the fastest, the earlier candidate (the sweep-ordered list) wins
    near = _configs.GemmConfig(64, 64, 64)
    clock = _FakeClock({near: 2.65, fast: 2.6})
    assert _configs.tune([near, fast], clock.run, timer=clock.timer, warmup_ms=500, prefer_first_within=0.02) is near
    clock = _FakeClock({near: 2.65, fast: 2.6})
    assert _configs.tune([near, fast], clock.run, timer=clock.timer, warmup_ms=500) is fast
    assert _configs.prefer_first_within(8192, 8) == 0.02 and _configs.prefer_first_within(512, 64) == 0.0
    clock = _FakeClock({slow: 3.0, fast: 2.6})
    assert _configs.tune([slow, fast], clock.run, timer=clock.timer, warmup_ms=500) is fast


def test_old_cache_entries_load_with_new_fields_defaulted():
    old = {"block_m": 16, "block_n": 64, "block_k": 128, "group_m": 1, "num_warps": 4, "num_stages": 3,
           "use_tma": False, "programs_per_sm": 4}
    cfg = _configs.GemmConfig.from_json(old)
    assert cfg == _configs.GemmConfig(16, 64, 128, 1, 4, 3, False, 4) and not cfg.flatten and not cfg.tma_store
    with pytest.raises(KeyError):
        _configs.GemmConfig.from_json({"block_m": 16})


def test_bucket_key_groups_nearby_shapes():
    k1 = _configs.bucket_key(3000, 4096, 7168, 32, glu=False, gather=False, layout="enk", dtype="bfloat16")
    k2 = _configs.bucket_key(4000, 4096, 7168, 32, glu=False, gather=False, layout="enk", dtype="bfloat16")
    k3 = _configs.bucket_key(5000, 4096, 7168, 32, glu=False, gather=False, layout="enk", dtype="bfloat16")
    assert k1 == k2 != k3


def test_cache_roundtrip_atomic_and_corrupt(tmp_path, monkeypatch):
    monkeypatch.setenv("MOECOMM_CACHE_DIR", str(tmp_path))
    _configs.clear_memory()
    path = _configs.cache_path("NVIDIA H100 80GB HBM3", "3.6.0")
    assert str(path).startswith(str(tmp_path)) and " " not in path.name
    cfg = _configs.GemmConfig(16, 64, 128, 1, 4, 4, False, 8)
    replaced = []
    real_replace = os.replace
    monkeypatch.setattr(os, "replace", lambda a, b: (replaced.append((a, b)), real_replace(a, b)))
    _configs.remember(path, "keyA", cfg)
    assert replaced and replaced[0][1] == path and replaced[0][0] != str(path)  # temp file, then rename
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
    _configs.clear_memory()
    assert _configs.lookup(path, "keyA") == cfg  # read back from disk
    _configs.remember(path, "keyB", _configs.interpreter_config())
    assert set(json.loads(path.read_text())) == {"keyA", "keyB"}  # merged, not overwritten

    path.write_text('{"keyA": {"block_m": 16')  # truncated JSON
    _configs.clear_memory()
    with pytest.warns(RuntimeWarning, match="ignoring corrupt tuning cache"):
        assert _configs.lookup(path, "keyA") is None
    _configs.remember(path, "keyC", cfg)  # rewritten after the next tune
    assert set(json.loads(path.read_text())) == {"keyC"}
    _configs.clear_memory()


def test_sustained_sweep_lists_the_candidates_then_distinct_neighbours(monkeypatch):
    """gpu_gemm_tune --sweep --sustained times the tuner's own prefill list first, then GROUP_M,
    transposed-tile and deeper-pipeline neighbours of its first entry, each config once."""
    import os

    monkeypatch.syspath_prepend(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
    from benchmarks.gpu_gemm_tune import _sweep_configs

    from moecomm.gemm._configs import candidates

    for glu in (False, True):
        cands = candidates(8192, 28672, 4096, 8, glu=glu)
        swept = _sweep_configs(8192, 28672, 4096, 8, glu, sustained=True)
        assert swept[:len(cands)] == cands and len(set(swept)) == len(swept) > len(cands)
        first = cands[0]
        extra = swept[len(cands):]
        assert any(c.group_m != first.group_m for c in extra)
        assert any((c.block_m, c.block_n) == (first.block_n, first.block_m) for c in extra) or first.block_m == first.block_n


def _remember_many(cache_dir, worker, rounds, start):
    os.environ["MOECOMM_CACHE_DIR"] = cache_dir
    path = _configs.cache_path("NVIDIA H100 80GB HBM3", "3.6.0")
    start.wait(30)
    for i in range(rounds):
        _configs.remember(path, f"key-{worker}-{i}", _configs.GemmConfig(16, 64, 128, 1, 4, 3, False, worker + 1))
        _configs.remember(path, "shared", _configs.GemmConfig(16, 64, 128, 1, 4, 3, False, worker + 1))


def test_concurrent_processes_tuning_into_one_cache_lose_no_entry(tmp_path):
    """4 processes (ranks tuning at once) each remember 10 entries and rewrite one shared entry into
    the same file: under the file lock every entry survives, and the file is always valid JSON."""
    import multiprocessing

    ctx = multiprocessing.get_context("fork")  # the workers only write files
    start = ctx.Event()
    workers, rounds = 4, 10
    procs = [ctx.Process(target=_remember_many, args=(str(tmp_path), w, rounds, start)) for w in range(workers)]
    for p in procs:
        p.start()
    start.set()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    path = tmp_path / "gemm" / _configs.cache_path("NVIDIA H100 80GB HBM3", "3.6.0").name
    raw = json.loads(path.read_text())
    assert set(raw) == {f"key-{w}-{i}" for w in range(workers) for i in range(rounds)} | {"shared"}
    for k, v in raw.items():
        cfg = _configs.GemmConfig.from_json(v)
        assert k == "shared" or cfg.programs_per_sm == int(k.split("-")[1]) + 1
    assert 1 <= _configs.GemmConfig.from_json(raw["shared"]).programs_per_sm <= workers
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]
