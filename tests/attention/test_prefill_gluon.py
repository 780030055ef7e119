"""Paged prefill's Gluon kernel (_gluon_prefill, prefill.PREFILL_GLUON / MOECOMM_PREFILL_GLUON): which
launches take it; compiled for sm_90a without a GPU, it is the hand-made warp-specialised kernel (a
producer warp and two consumer warpgroups, wgmma, TMA, setmaxnreg, no spills); on the GPU, against
the fp32 reference. Gluon does not run in the interpreter: no CPU value test here (the interpreter
runs v2 in its place, checked below).

# B = batch, Hq / Hk = heads, D = head_dim, P = page_size
"""

from __future__ import annotations

import re

import numpy as np
import pytest
import torch
from test_prefill import _close, _run, _setup, _truth
from test_prefill_v2 import _consecutive, spy  # noqa: F401  (spy: a fixture)
from test_prefill_ws import BF16_ATOL, _gpu_cache

from moecomm.attention import prefill as pre

BF16, FP16, FP32 = torch.bfloat16, torch.float16, torch.float32


def test_gluon_domain():
    """sm_90 only; fp16 / bf16 with K / V alike; listed head_dims; causal or no mask only."""
    ok = lambda cap=(9, 0), dt=BF16, kdt=BF16, d=128, custom=False, window=-1, soft=False: pre.gluon_supports(
        cap, dt, kdt, kdt, d, custom, window, soft)
    assert ok() and ok(dt=FP16, kdt=FP16) and ok(d=64)
    assert not ok(cap=(10, 0)) and not ok(cap=(8, 0)) and not ok(cap=(12, 0))
    assert not ok(dt=FP32, kdt=FP32) and not ok(kdt=torch.float8_e4m3fn) and not ok(dt=FP16)
    assert not ok(d=256) and not ok(d=96)
    assert not ok(custom=True) and not ok(window=0) and not ok(soft=True)
    assert pre._gluon_importable()  # Triton 3.6's Gluon here: the kernel module imports


def test_gluon_switch(monkeypatch):
    """PREFILL_GLUON wins; else MOECOMM_PREFILL_GLUON (0 / 1); unset or empty: PREFILL_GLUON_DEFAULT."""
    monkeypatch.setattr(pre, "PREFILL_GLUON", None)
    monkeypatch.delenv("MOECOMM_PREFILL_GLUON", raising=False)
    for default in (True, False):
        monkeypatch.setattr(pre, "PREFILL_GLUON_DEFAULT", default)
        assert pre._gluon_enabled() is default
        monkeypatch.setenv("MOECOMM_PREFILL_GLUON", " ")
        assert pre._gluon_enabled() is default
        monkeypatch.setenv("MOECOMM_PREFILL_GLUON", "0")
        assert pre._gluon_enabled() is False
        monkeypatch.setenv("MOECOMM_PREFILL_GLUON", "1")
        assert pre._gluon_enabled() is True
        monkeypatch.delenv("MOECOMM_PREFILL_GLUON")
    monkeypatch.setenv("MOECOMM_PREFILL_GLUON", "1")
    monkeypatch.setattr(pre, "PREFILL_GLUON", False)
    assert pre._gluon_enabled() is False


def test_gluon_not_taken_off_hopper(triton_backend, spy, monkeypatch):
    """Switched on, a launch it cannot take (here: not a CUDA sm_90 device, the interpreter) runs v2's
    TMA path and stays right."""
    monkeypatch.setattr(pre, "PREFILL_GLUON", True)
    taken = []
    monkeypatch.setattr(pre, "_launch_gluon", lambda *a, **k: taken.append(1))
    qo_lens, kv_lens = [3, 20], [3, 40]
    cache, qo_indptr, q = _setup(qo_lens, kv_lens, 4, 2, 64, 16, dtype=FP16, device="cpu")
    cache = _consecutive(cache)
    cache.k, cache.v, q = cache.k.to(triton_backend), cache.v.to(triton_backend), q.to(triton_backend)
    out, lse = _run(cache, qo_indptr, q, triton_backend, causal=True)
    _close(out, lse, *_truth(q, qo_lens, cache, True), FP16)
    assert not taken and spy[-1][1]["KV_TMA"] is True


def test_gluon_grid_and_q_slots():
    """One program per work item, or with persistent one per SM (fewer with fewer items, >= 1); two
    Q tiles where they fit beside the K / V ring (D128: 2 stages yes, 3 no; D64 3 stages yes)."""
    cpu = torch.device("cpu")
    cfg = pre.PREFILL_GLUON_CONFIGS[128]
    one, per = cfg._replace(persistent=False), cfg._replace(persistent=True)
    assert pre.gluon_grid(8192, one, cpu) == 8192 and pre.gluon_grid(0, one, cpu) == 1
    assert pre.gluon_grid(8192, per, cpu) == pre.num_sms(cpu) == 132
    assert pre.gluon_grid(5, per, cpu) == 5 and pre.gluon_grid(0, per, cpu) == 1
    slots = lambda c, d, itemsize=2: pre.gluon_constexprs(c, 4, 16, d, itemsize, True, True)["Q_SLOTS"]
    assert slots(cfg._replace(stages=2), 128) == 2 and slots(cfg._replace(stages=3), 128) == 1
    assert slots(pre.PREFILL_GLUON_CONFIGS[64]._replace(stages=3), 64) == 2
    consts = pre.gluon_constexprs(cfg, 4, 16, 128, 2, False, True)
    assert consts["BRANCH_SOFTMAX"] is cfg.branch_softmax and consts["CAUSAL"] is False and consts["GROUP"] == 4


def _mufu_between_waits(cubin: bytes) -> list[int]:
    """For each wgmma.wait_group 1 in the SASS, the MUFU.EX2 (softmax exponentials) before the next
    wait_group 0: the softmax that runs while P V is still in flight."""
    import subprocess
    import tempfile

    import triton

    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([triton.knobs.nvidia.cuobjdump.path, "--dump-sass", f.name], capture_output=True,
                              text=True, check=True).stdout
    counts, n = [], None
    for line in sass.splitlines():
        if "WARPGROUP.DEPBAR.LE gsb0, 0x1" in line:
            n = 0
        elif n is not None and "MUFU.EX2" in line:
            n += 1
        elif n is not None and "WARPGROUP.DEPBAR.LE gsb0, 0x0" in line:
            counts.append(n)
            n = None
    return counts


def _compile_gluon_for_hopper() -> str:
    """The shipped configurations (D128 causal, D64 non-causal; bf16, GQA 4) compiled for sm_90a with
    a real launch's hints: one ttg.warp_specialize with two worker partitions (a consumer warpgroup,
    the producer warp), 12 warps, wgmma, TMA, setmaxnreg, no spills, shared memory within 227 KB."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.experimental.gluon._runtime import GluonASTSource

    from moecomm.attention import _gluon_prefill as gk
    from moecomm.testing.aot import cubin_resources

    kern = gk.prefill_gluon_kernel
    ptrs = {"q_ptr": "*bf16", "k_ptr": "*bf16", "v_ptr": "*bf16", "out_ptr": "*bf16", "lse_ptr": "*fp32",
            "meta_ptr": "*i32", "kv_indices_ptr": "*i32", "mask_ptr": "*u8"}
    sig = {p.name: "constexpr" if p.is_constexpr else ptrs.get(p.name, "fp32" if p.name in ("sm_scale", "soft_cap")
                                                                 else "i32") for p in kern.params}
    attrs = {(i,): [["tt.divisibility", 16]] for i, p in enumerate(kern.params)
             if not p.is_constexpr and (sig[p.name].startswith("*") or p.name.startswith(("stride_", "off_")))}
    words = []
    for head_dim, causal in ((128, True), (64, False)):
        cfg = pre.PREFILL_GLUON_CONFIGS[head_dim]
        consts = pre.gluon_constexprs(cfg, 4, 16, head_dim, 2, causal, True)
        k = triton.compile(GluonASTSource(kern, sig, consts, attrs), target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": 4})
        ttgir, ptx = k.asm["ttgir"], k.asm["ptx"]
        assert ttgir.count("ttg.warp_specialize(") == 1, "expected one warp-specialised region"
        parts = re.findall(r"^\s*partition(\d+)\(.*num_warps\((\d+)\)", ttgir, re.M)
        assert sorted(w for _, w in parts) == ["1", "4"], parts  # a consumer warpgroup, the producer warp
        assert k.metadata.num_warps == 12  # default consumer 4 + consumer 4 + producer 1, whole warpgroups
        assert re.search(r"wgmma\.mma_async\.sync\.aligned\.m64n\d+k16\.f32\.bf16\.bf16", ptx), "no bf16 wgmma"
        assert "cp.async.bulk.tensor" in ptx and "mbarrier.try_wait" in ptx
        regs = sorted({int(x) for x in re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx)})
        assert cfg.consumer_regs in regs and cfg.producer_regs in regs, regs
        if cfg.pipe:
            assert "wgmma.wait_group.sync.aligned 1;" in ptx, "Q K^T of the next block no longer overlaps P V"
        assert k.metadata.shared <= 232448, k.metadata.shared
        if cfg.pipe and cfg.branch_softmax:
            # ptxas hoists the P V wait to the top of its basic block: with the whole softmax inside the
            # mask branches it stays after the softmax's exponentials (BLOCK_N / 2 a thread, both
            # branches' copies), in each consumer warpgroup's loop
            mufu = _mufu_between_waits(k.asm["cubin"])
            assert len(mufu) == 2 and min(mufu) >= cfg.block_n // 2, mufu
        nregs, stack, local = cubin_resources(k.asm["cubin"])
        assert stack == 0 and local == 0, f"spills: stack {stack} B, local {local} B"
        words.append(f"D{head_dim}:regs{nregs}")
    return ",".join(words)


def test_gluon_compiles_warp_specialized_for_hopper():
    """Two compiles in a fresh process without TRITON_INTERPRET (~10 s on 2 cores)."""
    pytest.importorskip("triton.experimental.gluon")
    from moecomm.testing import run_without_interpreter

    assert run_without_interpreter(__file__, "_compile_gluon_for_hopper").startswith("D128:regs")


# ------------------------------------------------------------------------------------------ GPU


def _cuda_sm90() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0)


GPU_CASES = [  # (qo_lens, kv_lens, Hq, Hk, D, dtype)
    ([4096] * 2, [4096] * 2, 32, 8, 128, BF16),                     # the benchmark's sequences, GQA 4
    ([1, 17, 1023, 4096], [1, 17, 1023, 4096], 32, 8, 128, BF16),  # lengths 1, 17, 1023, 4096 (partial tiles)
    ([1, 300, 2000, 77], [33000, 301, 4096, 77], 32, 8, 128, BF16),  # ragged, queries after a prefix
    ([129, 5, 3], [129, 0, 1], 8, 2, 128, FP16),                   # a partial second tile; no keys; fp16
    ([200, 1, 1023], [250, 17, 1023], 8, 2, 64, BF16),             # head_dim 64
]
# other schedules of the D128 kernel (benchmarks/probe_prefill_gluon.py times them): the second and
# third cases each, as GluonConfig fields; "sms" caps the persistent grid (programs then loop over
# many items each: ring and Q-slot phases across items, items without keys, descriptor reuse).
ALT_SCHEDULES = [dict(persistent=False), dict(branch_softmax=True), dict(branch_softmax=True, pingpong=True),
                 dict(branch_softmax=True, late_k_release=True), dict(branch_softmax=True, stages=3),
                 dict(persistent=False, stages=3, late_k_release=True)]
SMALL_GRID = dict(persistent=True, sms=3)


def _schedule_id(x):
    if isinstance(x, dict):
        return "-".join(f"{k}={v}" for k, v in x.items())
    return "default" if x is None else None


@pytest.mark.gpu
@pytest.mark.skipif(not _cuda_sm90(), reason="the Gluon kernel needs an sm_90 GPU")
@pytest.mark.parametrize("case,schedule", [(c, None) for c in GPU_CASES] + [(c, SMALL_GRID) for c in GPU_CASES]
                         + [(c, s) for s in ALT_SCHEDULES for c in GPU_CASES[1:3]], ids=_schedule_id)
def test_gluon_gpu_matches_reference(monkeypatch, case, schedule):
    from moecomm.attention import BatchPrefillWithPagedKVCacheWrapper
    from moecomm.attention import reference as ref

    qo_lens, kv_lens, Hq, Hk, D, dtype = case
    monkeypatch.setattr(pre, "PREFILL_GLUON", True)
    if schedule is not None:
        fields = dict(schedule)
        sms = fields.pop("sms", None)
        if sms is not None:
            monkeypatch.setattr(pre, "num_sms", lambda device: sms)
        monkeypatch.setitem(pre.PREFILL_GLUON_CONFIGS, D, pre.PREFILL_GLUON_CONFIGS[D]._replace(**fields))
    taken = []
    real = pre._launch_gluon
    monkeypatch.setattr(pre, "_launch_gluon", lambda *a, **k: (taken.append(1), real(*a, **k))[1])
    P = 16
    k, v, indices, indptr, last = _gpu_cache(kv_lens, Hk, D, P, dtype)
    qo_indptr = torch.tensor([0] + np.cumsum(qo_lens).tolist(), dtype=torch.int32)
    q = torch.randn(sum(qo_lens), Hq, D, device="cuda").to(dtype)
    w = BatchPrefillWithPagedKVCacheWrapper(torch.empty(1 << 20, dtype=torch.uint8, device="cuda"))
    for kw in (dict(causal=True), dict(causal=False), dict(causal=True, sm_scale=0.3)):
        w.plan(qo_indptr, indptr, indices, last, Hq, Hk, D, P, q_data_type=dtype, **kw)
        out = torch.full_like(q, float("nan"))
        lse = torch.full((q.shape[0], Hq), float("nan"), device="cuda")
        taken.clear()
        w.run(q, (k, v), out=out, lse=lse, return_lse=True)
        assert taken, "the Gluon kernel did not run"
        r_out, r_lse = ref.batch_prefill(q, qo_indptr, k, v, "NHD", indptr, indices, last, **kw)
        assert not out.isnan().any()
        torch.testing.assert_close(out.float(), r_out.float(), atol=BF16_ATOL, rtol=0)
        fin = torch.isfinite(r_lse)
        assert torch.equal(torch.isfinite(lse), fin)
        torch.testing.assert_close(lse[fin], r_lse[fin], atol=2e-3, rtol=1e-4)
        # the LSE is v2's (same rows, same base): v2 on the same plan agrees
        monkeypatch.setattr(pre, "PREFILL_GLUON", False)
        out2, lse2 = w.run(q, (k, v), return_lse=True)
        monkeypatch.setattr(pre, "PREFILL_GLUON", True)
        torch.testing.assert_close(lse[fin], lse2[fin], atol=2e-3, rtol=1e-4)
        torch.testing.assert_close(out.float(), out2.float(), atol=BF16_ATOL, rtol=0)
