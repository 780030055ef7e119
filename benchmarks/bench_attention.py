"""Paged attention: moecomm.attention decode / prefill vs torch SDPA on contiguous KV and FlashInfer.

# B = batch, L = KV length, Hq / Hk = heads, D = head_dim (128), P = page_size (16), bf16

    python -m benchmarks.bench_attention                          # GPU: the issue's shapes
    python -m benchmarks.bench_attention --peer fi072=/tmp/fisite # + FlashInfer from that site folder
                                     (default: $FI031_SITE / $FI072_SITE as benchmarks/gpu_session.sh sets them,
                                     else an importable flashinfer; --peer-jit lets 0.3.1 compile its kernels)
    python -m benchmarks.bench_attention --sweep                  # + kernel configurations of ours
    python -m benchmarks.bench_attention --quick                  # tiny shapes, CPU, seconds (CI)
    python -m benchmarks.bench_attention --plan-only              # plan() host time only (CPU or GPU): its
                                                                  compiled C path and its numpy path, a row each
    python -m benchmarks.bench_attention --plan-only --profile    # + cProfile of each plan() (tottime)
    python -m benchmarks.bench_attention --plan-only --pieces     # + plan()'s parts timed one by one
                                                                  (with --quick: tiny shapes, a few calls)

Napkin math. Decode reads every K and V byte once: B * L * Hk * D * 2 (K and V) * 2 bytes; B64 L4096
Hk8 is 1.07 GB, 0.22 ms at the H200's 4.8 TB/s (~4.2 TB/s reachable by a copy). Effective GB/s =
those bytes / time; the issue's targets are in these units. Prefill (causal) does 2 * 2 * B * Hq *
L^2 / 2 * D FLOPs: 8 x 4096, 32 heads is 1.1 TFLOP, ~1.5 ms at 750 TFLOP/s.

FlashInfer cannot be imported beside another FlashInfer (nor is it needed in this process): each
peer runs in a child process (``--peer-only``), which prints JSON lines read back here, so the rows
of one table come from one run on one GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time

import torch

DECODE_SHAPES = [  # (B, L, Hq, Hk): the three, with its targets in GB/s
    (64, 4096, 32, 8, 3800),
    (16, 32768, 32, 8, 3900),
    (128, 1024, 64, 8, 3500),
]
PREFILL_SHAPES = [(8, 4096, 32, 8)]  # (B, L, Hq, Hk), causal; target 0.95x the fastest SDPA
QUICK_DECODE, QUICK_PREFILL = [(2, 64, 4, 2, 0)], [(1, 64, 4, 2)]
HEAD_DIM, PAGE = 128, 16


def _paged(B, L, Hk, D, P, dtype, device, gen):
    """A paged cache holding B sequences of L tokens (pages shuffled), and the same KV contiguous."""
    pages_per = math.ceil(L / P)
    num_pages = B * pages_per
    k = torch.randn(num_pages, P, Hk, D, device=device, dtype=dtype, generator=gen)
    v = torch.randn(num_pages, P, Hk, D, device=device, dtype=dtype, generator=gen)
    perm = torch.randperm(num_pages, device=device, generator=gen).to(torch.int32)
    indptr = torch.arange(0, num_pages + 1, pages_per, dtype=torch.int32)
    last = torch.full((B,), L - (pages_per - 1) * P, dtype=torch.int32)
    return k, v, perm, indptr, last


def _contiguous(k, v, perm, B, L):
    """[B, Hk, L, D] K and V (SDPA's layout) from the pages."""
    Hk, D = k.shape[2], k.shape[3]
    kc = k[perm.long()].reshape(B, -1, Hk, D)[:, :L].transpose(1, 2).contiguous()
    vc = v[perm.long()].reshape(B, -1, Hk, D)[:, :L].transpose(1, 2).contiguous()
    return kc, vc


def _time(fn, warmup, rep):
    from moecomm.testing import bench

    return bench(fn, None, warmup=warmup, rep=rep).median_ms


def _host_us(fn, n=30):
    for _ in range(3):
        fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    return (time.perf_counter() - t0) / n * 1e6


def _sdpa_fn(q, k, v, causal, name):
    """SDPA on one backend (flash, cudnn, efficient, math) as a callable."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"flash": SDPBackend.FLASH_ATTENTION, "cudnn": SDPBackend.CUDNN_ATTENTION,
          "efficient": SDPBackend.EFFICIENT_ATTENTION, "math": SDPBackend.MATH}[name]

    def fn():
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=True)

    return fn


def _sdpa_best(q, k, v, causal, warmup, rep):
    """The fastest SDPA backend (flash, cuDNN, efficient) on contiguous KV: (ms, name, out)."""
    best = None
    names = ["flash", "cudnn", "efficient"] if q.is_cuda else ["math"]
    for name in names:
        fn = _sdpa_fn(q, k, v, causal, name)
        try:
            out = fn()
            ms = _time(fn, warmup, rep)
        except Exception as exc:  # a backend that does not take this shape
            print(f"  sdpa {name}: not available here ({type(exc).__name__}: {str(exc)[:80]})")
            continue
        if best is None or ms < best[0]:
            best = (ms, name, out)
    return best


# ------------------------------------------------------------------------------------------ ours


def ours_decode(B, L, Hq, Hk, dtype, device, warmup, rep, gen, check=True):
    from moecomm.attention import BatchDecodeWithPagedKVCacheWrapper

    k, v, perm, indptr, last = _paged(B, L, Hk, HEAD_DIM, PAGE, dtype, device, gen)
    q = torch.randn(B, Hq, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    w = BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=device))
    plan = lambda: w.plan(indptr, perm, last, Hq, Hk, HEAD_DIM, PAGE, q_data_type=dtype)
    plan_us = _host_us(plan)
    plan()
    out = w.run(q, (k, v))
    ms = _time(lambda: w.run(q, (k, v)), warmup, rep)
    run_us = _host_us(lambda: w.run(q, (k, v)), 20)
    return dict(ms=ms, plan_us=plan_us, run_us=run_us, out=out, q=q, k=k, v=v, perm=perm, num_work=w._plan["num_work"],
                direct=w._plan["direct"])


def ours_prefill(B, L, Hq, Hk, dtype, device, warmup, rep, gen, kernel=None, consecutive=False, gluon=None):
    """Our paged prefill; kernel: "v1" / "v2" (None: the default); consecutive: each request's pages
    in order (v2's TMA path; the same random KV, so the output matches the shuffled run's); gluon:
    prefill.PREFILL_GLUON for the call (None: the default; on sm_90 the TMA path then launches the
    Gluon kernel, False keeps v2's own TMA loop)."""
    from moecomm.attention import BatchPrefillWithPagedKVCacheWrapper
    from moecomm.attention import prefill as pre

    k, v, perm, indptr, last = _paged(B, L, Hk, HEAD_DIM, PAGE, dtype, device, gen)
    if consecutive:  # the same tokens, their pages renumbered 0, 1, 2, ... in request order
        k, v = k[perm.long()].contiguous(), v[perm.long()].contiguous()
        perm = torch.arange(perm.shape[0], dtype=torch.int32, device=device)
    saved = pre.PREFILL_KERNEL, pre.PREFILL_GLUON
    if kernel is not None:
        pre.PREFILL_KERNEL = kernel
    if gluon is not None:
        pre.PREFILL_GLUON = gluon
    q = torch.randn(B * L, Hq, HEAD_DIM, device=device, dtype=dtype, generator=gen)
    qo_indptr = torch.arange(0, B * L + 1, L, dtype=torch.int32)
    w = BatchPrefillWithPagedKVCacheWrapper(torch.empty(16 << 20, dtype=torch.uint8, device=device))
    ids = perm.cpu()  # host page ids (as a server passes them): plan() checks them and sees consecutive pages
    plan = lambda: w.plan(qo_indptr, indptr, ids, last, Hq, Hk, HEAD_DIM, PAGE, causal=True, q_data_type=dtype)
    try:
        plan_us = _host_us(plan, 10)
        plan()
        out = w.run(q, (k, v))
        ms = _time(lambda: w.run(q, (k, v)), warmup, rep)
        tma = bool(w._plan["kv_contiguous"]) and pre.PREFILL_KERNEL != "v1"
    finally:
        pre.PREFILL_KERNEL, pre.PREFILL_GLUON = saved
    # run: the timed call (valid after return only for the defaults: kernel and gluon None, or their values)
    return dict(ms=ms, plan_us=plan_us, out=out, q=q, k=k, v=v, perm=perm, tma=tma, run=lambda: w.run(q, (k, v)))


def _per_call_us(fn, calls: int, repeats: int) -> tuple[float, float]:
    """(best, median) over ``repeats`` runs of ``calls`` calls in a row, us per call (a shared CPU's
    noise only adds time: the best is the floor, the median what a loaded host sees)."""
    return _per_call_us_each([fn], calls, repeats)[0]


def _per_call_us_each(fns, calls: int, repeats: int) -> list[tuple[float, float]]:
    """_per_call_us of each of ``fns``, their runs interleaved (a drift of the host's speed during
    the measurement shifts them alike, so their ratio holds)."""
    runs = [[] for _ in fns]
    for _ in range(repeats):
        for fn, r in zip(fns, runs):
            t0 = time.perf_counter()
            for _ in range(calls):
                fn()
            r.append((time.perf_counter() - t0) / calls * 1e6)
    return [(sorted(r)[0], sorted(r)[len(r) // 2]) for r in runs]


def _plan_pieces(kind: str, w, args: tuple) -> list[tuple[str, object]]:
    """plan()'s pieces as separate calls on the same inputs, for its numpy path: the page table to
    numpy, its check, the host ids' range check, the staging buffer's ensure + upload (on a GPU: the
    one H2D copy and, per 4 plans, an event record and query). For its C path: the Python that
    writes the call's inputs ("tables"), the C call itself ("c call": checks, split / tiles, every
    staging section), ensure + upload. What the total has beyond their sum is the rest (scalars,
    split / tiles, writes into the staging buffer, the plan record)."""
    from moecomm.attention import _common as C

    if kind == "decode":
        indptr, indices, last = args[:3]
        qo = None
    else:
        qo, indptr, indices, last = args[:4]
    p, st = w._plan, w._staging
    if kind == "decode":
        fixed = w._layout(p["batch"], p["num_work"])[1]
    else:
        fixed = w._layout(p["batch"], p["num_tiles"])[1]
    host_ids = not (isinstance(indices, torch.Tensor) and not indices.is_cpu)
    need = fixed + (indices.shape[0] if host_ids else 0)
    if w._cargs is not None:  # the C path
        a = w._cargs
        flags = a.tables(indptr, last, indices, None, st, qo)
        return [("tables", lambda: a.tables(indptr, last, indices, None, st, qo, flags & 96)),
                ("c call", lambda: a.call(st)), ("staging", lambda: (st.ensure(need), st.upload(need)))]
    op = "bench"
    ip_np, last_np = C.host_ints(op, "indptr", indptr), C.host_ints(op, "last_page_len", last)
    pieces = [
        ("to numpy", lambda: (C.host_ints(op, "indptr", indptr), C.host_ints(op, "last_page_len", last))),
        ("check_page_table", lambda: C.check_page_table(op, ip_np, last_np, indices.shape[0], PAGE)),
    ]
    if host_ids:
        pieces.append(("check_indices", lambda: C.check_indices(op, indices, None)))
    pieces.append(("staging", lambda: (st.ensure(need), st.upload(need))))
    return pieces


def _made_with_host_c(make, on: bool):
    """make() with plan()'s C path allowed or not (MOECOMM_HOST_C, read when a wrapper is made)."""
    saved = os.environ.get("MOECOMM_HOST_C")
    os.environ["MOECOMM_HOST_C"] = "1" if on else "0"
    try:
        return make()
    finally:
        if saved is None:
            del os.environ["MOECOMM_HOST_C"]
        else:
            os.environ["MOECOMM_HOST_C"] = saved


def plan_host_times(device, calls: int = 50, repeats: int = 9, profile: bool = False, pieces: bool = False,
                    decode_shapes=None, prefill_shapes=None) -> list[dict]:
    """plan() host time per call (us) of the decode wrapper at the issue's three shapes and of the
    prefill wrapper at the benchmark's shape and at B128 x 128 tokens, each with the page ids on the
    host (range-checked, copied with the metadata) and on the device (not read: the FlashInfer user's
    usual case; indptr and last_page_len stay on the host): int32, shuffled pages, ``calls`` plans in
    a row, the best and the median of ``repeats`` such runs. Each case twice, interleaved: plan()'s
    numpy path (MOECOMM_HOST_C=0) and its compiled C path (kernels/attention/plan_host.c; "c": one
    row each, the C row with numpy / c). On CPU "device ids" are a meta tensor (the same code path,
    which cannot read them) and the upload is no copy (the "device" buffer is the host one): the
    figure is plan()'s Python and numpy work, the part the GPU's host shares. ``pieces`` also times
    plan()'s parts one by one (_plan_pieces)."""
    from moecomm.attention import (
        BatchDecodeWithPagedKVCacheWrapper,
        BatchPrefillWithPagedKVCacheWrapper,
        _plan_host,
    )
    from moecomm.jit import host

    paths = ["numpy", "c"]
    if _plan_host.library() is None:
        print(f"  (no C path here: {host.compile_error() or 'plan_host.c did not build or load (see the log)'}; "
              "numpy rows only)")
        paths = ["numpy"]

    def page_table(B, L):
        pp = math.ceil(L / PAGE)
        return (torch.arange(0, B * pp + 1, pp, dtype=torch.int32), torch.randperm(B * pp).to(torch.int32),
                torch.full((B,), L - (pp - 1) * PAGE, dtype=torch.int32))

    def on_device(ids):
        return ids.to(device) if device.type == "cuda" else torch.empty(ids.shape, dtype=ids.dtype, device="meta")

    cases = []  # (name, kind, make a wrapper, plan args, plan kwargs)
    for B, L, Hq, Hk, *_ in decode_shapes or DECODE_SHAPES:
        indptr, indices, last = page_table(B, L)
        for where, ids in (("host ids", indices), ("dev ids", on_device(indices))):
            make = lambda: BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=device))
            cases.append((f"decode B{B} L{L} {Hq}/{Hk} {where}", "decode", make, (indptr, ids, last, Hq, Hk, HEAD_DIM, PAGE),
                          dict(q_data_type=torch.bfloat16)))
    for B, L, Hq, Hk in prefill_shapes or PREFILL_SHAPES + [(128, 128, 32, 8)]:
        indptr, indices, last = page_table(B, L)
        qo_indptr = torch.arange(0, B * L + 1, L, dtype=torch.int32)
        for where, ids in (("host ids", indices), ("dev ids", on_device(indices))):
            make = lambda: BatchPrefillWithPagedKVCacheWrapper(torch.empty(16 << 20, dtype=torch.uint8, device=device))
            cases.append((f"prefill B{B} L{L} {Hq}/{Hk} causal {where}", "prefill", make,
                          (qo_indptr, indptr, ids, last, Hq, Hk, HEAD_DIM, PAGE), dict(causal=True, q_data_type=torch.bfloat16)))
    rows = []
    for name, kind, make, a, kw in cases:
        ws = {path: _made_with_host_c(make, path == "c") for path in paths}
        fns = {path: (lambda w=w: w.plan(*a, **kw)) for path, w in ws.items()}
        for fn in fns.values():
            for _ in range(5):
                fn()
        if "c" in ws:
            assert ws["c"]._cargs is not None and ws["numpy"]._cargs is None
        if device.type == "cuda":
            torch.cuda.synchronize()
        times = dict(zip(paths, _per_call_us_each([fns[p] for p in paths], calls, repeats)))
        for path in paths:
            best, median = times[path]
            row = dict(case=name, path=path, best_us=best, median_us=median)
            extra = ""
            if path == "c":
                row["numpy_over_c"] = times["numpy"][1] / median
                extra = f"  numpy / c {row['numpy_over_c']:4.1f}x"
            print(f"  {name:40s} {path:5s} best {best:6.1f} us  median {median:6.1f} us{extra}", flush=True)
            w = ws[path]
            if pieces:
                parts = {}
                for piece, pfn in _plan_pieces(kind, w, a):
                    pfn()
                    parts[piece] = _per_call_us(pfn, calls, repeats)[1]
                parts["rest"] = median - sum(parts.values())
                row["pieces_us"] = parts
                print("      " + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()), flush=True)
            rows.append(row)
            if profile:
                import cProfile
                import pstats

                fn = fns[path]
                prof = cProfile.Profile()
                prof.enable()
                for _ in range(calls):
                    fn()
                prof.disable()
                stats = pstats.Stats(prof).stats  # (file, line, name) -> (cc, ncalls, tottime, cumtime, callers)
                top = sorted(stats.items(), key=lambda kv: -kv[1][2])[:10]
                print("      tottime us per plan (cProfile's own overhead included), function")
                for (file, line, fname), (_, ncalls, tottime, _, _) in top:
                    print(f"      {tottime / calls * 1e6:7.2f}  {ncalls // calls:3d}x  {os.path.basename(file)}:{line}({fname})")
    return rows


# ------------------------------------------------------------------------------------------ peers


def peer_main(args) -> int:
    """Child process: time FlashInfer on the same shapes (same seeds), print one JSON line each."""
    import flashinfer

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    ver = getattr(flashinfer, "__version__", "?")
    decode_shapes, prefill_shapes = (QUICK_DECODE, QUICK_PREFILL) if args.quick else (DECODE_SHAPES, PREFILL_SHAPES)
    for B, L, Hq, Hk, _ in decode_shapes:
        gen = torch.Generator(device=device).manual_seed(0)
        k, v, perm, indptr, last = _paged(B, L, Hk, HEAD_DIM, PAGE, dtype, device, gen)
        q = torch.randn(B, Hq, HEAD_DIM, device=device, dtype=dtype, generator=gen)
        best = None
        for tc in (False, True):  # FlashInfer's CUDA-core and tensor-core decode: the faster one is reported
            try:
                w = flashinfer.BatchDecodeWithPagedKVCacheWrapper(torch.empty(128 << 20, dtype=torch.uint8, device=device),
                                                                  "NHD", use_tensor_cores=tc)
                plan = lambda: w.plan(indptr, perm, last, Hq, Hk, HEAD_DIM, PAGE, q_data_type=dtype, kv_data_type=dtype)
                plan_us = _host_us(plan, 10)
                plan()
                w.run(q, (k, v))
                ms = _time(lambda: w.run(q, (k, v)), args.warmup, args.rep)
                if best is None or ms < best["ms"]:
                    best = dict(kind="decode", B=B, L=L, Hq=Hq, Hk=Hk, ms=ms, plan_us=plan_us, version=ver, tensor_cores=tc)
            except Exception as exc:
                print(json.dumps(dict(kind="decode-error", B=B, L=L, Hq=Hq, Hk=Hk, tensor_cores=tc,
                                      error=f"{type(exc).__name__}: {str(exc)[:200]}")), flush=True)
        print(json.dumps(best or dict(kind="decode", B=B, L=L, Hq=Hq, Hk=Hk, error="no variant ran")), flush=True)
        del k, v
        torch.cuda.empty_cache()
    for B, L, Hq, Hk in prefill_shapes:
        gen = torch.Generator(device=device).manual_seed(1)
        k, v, perm, indptr, last = _paged(B, L, Hk, HEAD_DIM, PAGE, dtype, device, gen)
        q = torch.randn(B * L, Hq, HEAD_DIM, device=device, dtype=dtype, generator=gen)
        qo_indptr = torch.arange(0, B * L + 1, L, dtype=torch.int32)
        try:
            w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device=device), "NHD")
            plan = lambda: w.plan(qo_indptr, indptr, perm, last, Hq, Hk, HEAD_DIM, PAGE, causal=True,
                                  q_data_type=dtype, kv_data_type=dtype)
            plan_us = _host_us(plan, 5)
            plan()
            w.run(q, (k, v))
            ms = _time(lambda: w.run(q, (k, v)), args.warmup, max(10, args.rep // 3))
            print(json.dumps(dict(kind="prefill", B=B, L=L, Hq=Hq, Hk=Hk, ms=ms, plan_us=plan_us, version=ver)), flush=True)
        except Exception as exc:
            print(json.dumps(dict(kind="prefill", B=B, L=L, Hq=Hq, Hk=Hk, error=f"{type(exc).__name__}: {str(exc)[:200]}")),
                  flush=True)
    return 0


def run_peer(name: str, path: str | None, args) -> dict:
    """Run this module with --peer-only in a child process (path prepended to PYTHONPATH)."""
    env = dict(os.environ)
    if path:
        env["PYTHONPATH"] = path + os.pathsep + env.get("PYTHONPATH", "")
    env.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0")
    if not args.peer_jit:  # a variant that is not precompiled errors instead of compiling for minutes
        env["FLASHINFER_DISABLE_JIT"] = "1"
    cmd = [sys.executable, "-m", "benchmarks.bench_attention", "--peer-only", "--warmup", str(args.warmup), "--rep", str(args.rep)]
    if args.quick:
        cmd.append("--quick")
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=args.peer_timeout)
    except subprocess.TimeoutExpired:
        print(f"peer {name}: timed out after {args.peer_timeout} s")
        return {}
    rows = {}
    for line in proc.stdout.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            if r["kind"].endswith("-error"):
                print(f"peer {name}: {r}")
                continue
            rows[(r["kind"], r["B"], r["L"], r["Hq"], r["Hk"])] = r
    if proc.returncode != 0 or not rows:
        print(f"peer {name}: exit {proc.returncode}; stderr tail: {proc.stderr[-600:]}")
    return rows


def find_peers(args) -> list[tuple[str, str | None]]:
    peers = []
    for spec in args.peer:
        name, _, path = spec.partition("=")
        peers.append((name, path or None))
    if not peers:  # the sites benchmarks/gpu_session.sh unpacks
        for name, var in (("fi031", "FI031_SITE"), ("fi072", "FI072_SITE")):
            if os.environ.get(var):
                peers.append((name, os.environ[var]))
    if not peers and torch.cuda.is_available():
        import importlib.util

        if importlib.util.find_spec("flashinfer") is not None:
            peers.append(("flashinfer", None))
    return peers


# ------------------------------------------------------------------------------------------ main


_SWEEP_OUTPUTS: dict = {}


def _sweep_decode(writer, device, dtype, args, variants):
    from moecomm.attention import decode as dec

    saved = dict(dec.DECODE_CONFIGS), dec._TARGET_PROGRAMS_PER_SM, dec._SPLIT_BELOW_PER_SM, dec.HEADS_FIRST
    first_out = _SWEEP_OUTPUTS  # shape -> the first variant's output: every variant must agree with it
    try:
        for cfg, target, below, heads_first in variants:
            dec.DECODE_CONFIGS[HEAD_DIM] = cfg
            dec._TARGET_PROGRAMS_PER_SM, dec._SPLIT_BELOW_PER_SM, dec.HEADS_FIRST = target, below, heads_first
            cells = []
            for B, L, Hq, Hk, _ in DECODE_SHAPES:
                gen = torch.Generator(device=device).manual_seed(0)
                r = None
                try:
                    r = ours_decode(B, L, Hq, Hk, dtype, device, args.warmup, args.rep, gen)
                    gbps = B * L * Hk * HEAD_DIM * 4 / (r["ms"] * 1e-3) / 1e9
                    ref_out = first_out.setdefault((B, L, Hq, Hk), r["out"].float())
                    err = (r["out"].float() - ref_out).abs().max().item()
                    cells.append(f"{gbps:7.0f}" + ("" if err < 2e-2 else f"(WRONG {err:.2g})"))
                    writer.write(op="attention_decode_sweep", B=B, L=L, Hq=Hq, Hk=Hk, config=list(cfg), target=target,
                                 split_below=below, heads_first=heads_first, median_ms=r["ms"], gbps=gbps,
                                 num_work=r["num_work"])
                except Exception as exc:
                    cells.append(f"  error({type(exc).__name__}: {str(exc)[:60]})")
                del r
                if device.type == "cuda":
                    torch.cuda.empty_cache()
            print(f"  {cfg!s:14s} {target:3d} {below:3d} {heads_first!s:5s} " + " ".join(cells), flush=True)
    finally:
        dec.DECODE_CONFIGS.clear()
        dec.DECODE_CONFIGS.update(saved[0])
        dec._TARGET_PROGRAMS_PER_SM, dec._SPLIT_BELOW_PER_SM, dec.HEADS_FIRST = saved[1], saved[2], saved[3]


def _sweep_prefill(writer, device, dtype, args, configs, kernel="v1", consecutive=False):
    """Prefill under each (BLOCK_M, BLOCK_N, warps, stages): of the gather (PREFILL_CONFIGS, v1 or
    v2 on shuffled pages) or of v2's TMA path (PREFILL_TMA_CONFIGS, consecutive pages)."""
    from moecomm.attention import prefill as pre

    table = pre.PREFILL_TMA_CONFIGS if consecutive else pre.PREFILL_CONFIGS
    saved = dict(table)
    try:
        for cfg in configs:
            table[HEAD_DIM] = cfg
            for B, L, Hq, Hk in PREFILL_SHAPES:
                gen = torch.Generator(device=device).manual_seed(1)
                try:
                    r = ours_prefill(B, L, Hq, Hk, dtype, device, args.warmup, max(10, args.rep // 3), gen, kernel=kernel,
                                     consecutive=consecutive, gluon=False)  # v2's own configurations
                    tf = 2 * B * Hq * L * L * HEAD_DIM / (r["ms"] * 1e-3) / 1e12
                    ref_out = _SWEEP_OUTPUTS.setdefault(("prefill", B, L, Hq, Hk), r["out"])
                    err = (r["out"].float() - ref_out.float()).abs().max().item()
                    flag = "" if err < 2e-2 else f" WRONG (differs from the first configuration by {err:.2g})"
                    print(f"  {kernel} {'TMA' if r['tma'] else 'gather':6s} {cfg!s:18s} {tf:7.1f} TFLOP/s "
                          f"({r['ms']:.3f} ms){flag}", flush=True)
                    writer.write(op="attention_prefill_sweep", B=B, L=L, Hq=Hq, Hk=Hk, kernel=kernel, tma=r["tma"],
                                 config=list(cfg), median_ms=r["ms"], tflops=tf)
                except Exception as exc:
                    print(f"  {kernel} {cfg!s:18s} error {type(exc).__name__}: {str(exc)[:120]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
    finally:
        table.clear()
        table.update(saved)


def sweep(writer, device, dtype, args):
    """Ours under other kernel configurations, split thresholds and grid orders (the defaults are
    guesses until this has run on the GPU). Most promising first, decode and prefill interleaved,
    so that a run cut short by its time limit keeps the rows printed so far."""
    head = "  (BLOCK_N, warps, stages) target/SM split-below/SM heads_first: GB/s per decode shape"
    # H200, 2026-12-01, GB/s at the three shapes: (128, 4, 2) 4013 / 4137 / 3905 (the default since),
    # (64, 4, 3) 3752 / 4141 / 4031, (64, 4, 2) 4132 / 3724 / 4021, (64, 4, 5) 3926 / 4228 / 3863,
    # (128, 8, 3) 2640 / 2740 / 2579; never splitting (8, 0): 3271 / 2082 / 4045; grid order False: -1%
    first = [((128, 4, 2), 8, 4, True), ((64, 4, 3), 8, 4, True), ((128, 4, 2), 16, 8, True), ((128, 4, 2), 4, 2, True),
             ((128, 2, 2), 8, 4, True), ((128, 4, 1), 8, 4, True), ((128, 4, 3), 8, 4, True)]
    rest = [(cfg, 8, 4, True) for cfg in [(64, 4, 2), (64, 2, 3), (64, 4, 5), (128, 2, 3), (128, 8, 2), (64, 4, 4)]]
    if not args.prefill_only:
        print("\nsweep, decode\n" + head)
        _sweep_decode(writer, device, dtype, args, first)
    print("sweep, prefill (BLOCK_M, BLOCK_N, warps, stages): TFLOP/s")
    # H200, 2026-12-01: (128, 32, 4, 4) 322.6 TFLOP/s (the default since), (128, 128, 8, 3) 302.5,
    # (128, 64, 8, 3) 276.9, (64, 64, 4, 3) 267.6, (128, 64, 4, 3) 242.0: now around the best
    # v2's TMA path first (consecutive pages; BLOCK_M must stay PREFILL_CONFIGS' 128): tutorial 06's
    # sm_90 tiles, then v2's gather on shuffled pages, then the first kernel's (the 2026-12-01 sweep)
    _sweep_prefill(writer, device, dtype, args, [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 8, 4), (128, 128, 8, 2),
                                                 (128, 64, 4, 3), (128, 32, 4, 4)], kernel="v2", consecutive=True)
    _sweep_prefill(writer, device, dtype, args, [(128, 32, 4, 4), (128, 64, 8, 3), (128, 32, 8, 3), (128, 64, 4, 4)],
                   kernel="v2")
    _sweep_prefill(writer, device, dtype, args, [(128, 32, 4, 4), (128, 32, 4, 3), (128, 32, 8, 4), (64, 32, 4, 4),
                                                 (128, 16, 4, 4), (128, 64, 4, 4), (128, 128, 8, 3)], kernel="v1")
    if not args.prefill_only:
        print("sweep, decode (continued)\n" + head)
        _sweep_decode(writer, device, dtype, args, rest)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny shapes on whatever device (CI smoke test)")
    parser.add_argument("--out", default=None, help="append JSON lines here")
    parser.add_argument("--peer", action="append", default=[], help="NAME=SITE_PATH of a FlashInfer to time (repeatable)")
    parser.add_argument("--peer-only", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--peer-timeout", type=float, default=120)
    parser.add_argument("--peer-jit", action="store_true",
                        help="let a peer JIT-compile what it lacks (FlashInfer 0.3.1: minutes; give --peer-timeout 400)")
    parser.add_argument("--sweep", action="store_true", help="also time our kernels under other configurations")
    parser.add_argument("--sweep-only", action="store_true", help="only the sweep (no baselines)")
    parser.add_argument("--prefill-only", action="store_true", help="only the prefill rows (v1 / v2, SDPA, peers); with --sweep(-only), only prefill's sweep")
    parser.add_argument("--no-prefill", action="store_true")
    parser.add_argument("--plan-only", action="store_true", help="only plan()'s host time (works on CPU)")
    parser.add_argument("--profile", action="store_true", help="with --plan-only: cProfile each case")
    parser.add_argument("--pieces", action="store_true", help="with --plan-only: also time plan()'s parts one by one")
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--rep", type=int, default=50)
    args = parser.parse_args(argv)
    if args.peer_only:
        return peer_main(args)

    from moecomm.testing import ResultWriter

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    global DECODE_SHAPES, PREFILL_SHAPES
    if args.plan_only:  # the shapes even on CPU: plan() does no device work there
        print(f"plan() host time, {device.type}, D{HEAD_DIM}, page {PAGE}, int32 page tables, indptr and last_page_len "
              f"on the host (target <= 30 us)")
        writer = ResultWriter(args.out)
        quick = dict(calls=5, repeats=3, decode_shapes=QUICK_DECODE, prefill_shapes=QUICK_PREFILL) if args.quick else {}
        for row in plan_host_times(device, profile=args.profile, pieces=args.pieces, **quick):
            writer.write(op="attention_plan_host", device=device.type, **row)
        return 0
    if args.quick or device.type != "cuda":
        DECODE_SHAPES, PREFILL_SHAPES = QUICK_DECODE, QUICK_PREFILL
        args.warmup, args.rep = 1, 3
    writer = ResultWriter(args.out)
    peers = find_peers(args) if device.type == "cuda" or args.peer else []
    print(f"device: {torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}, {str(dtype)[6:]}, D{HEAD_DIM}, "
          f"page {PAGE}; peers found: {[n for n, _ in peers] or 'none'}")
    if args.sweep_only:
        sweep(writer, device, dtype, args)
        return 0
    peer_rows = {name: run_peer(name, path, args) for name, path in peers}

    decode_shapes = [] if args.prefill_only else DECODE_SHAPES
    print("\ndecode, effective GB/s = K+V bytes / time (ours run() on a plan; SDPA on contiguous KV)")
    hdr = (f"{'B':>4s} {'L':>6s} {'Hq/Hk':>6s} {'ours ms':>8s} {'GB/s':>6s} {'plan us':>7s} {'run us':>6s} {'items':>5s} "
           f"{'sdpa GB/s':>9s} {'ours/sdpa':>9s}")
    for name, _ in peers:
        hdr += f" {name + ' GB/s':>14s} {'plan us':>7s} {'ours/' + name:>12s}"
    print(hdr + f" {'target':>6s}")
    for B, L, Hq, Hk, target in decode_shapes:
        try:
            _decode_row(writer, device, dtype, args, peers, peer_rows, B, L, Hq, Hk, target)
        except Exception as exc:  # one shape failing keeps the others' rows
            print(f"{B:4d} {L:6d} {Hq:3d}/{Hk:<2d} error {type(exc).__name__}: {str(exc)[:200]}", flush=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()

    if not args.no_prefill:
        print("\nprefill, causal, TFLOP/s (2 * 2 * B * Hq * L^2 / 2 * D FLOPs)")
        hdr = (f"{'B':>4s} {'L':>6s} {'Hq/Hk':>6s} {'kernel/pages':12s} {'KV':>6s} {'ours ms':>8s} {'TFLOP/s':>7s} "
               f"{'plan us':>7s} {'sdpa':>14s} {'ours/sdpa':>9s}")
        for name, _ in peers:
            hdr += f" {name + ' TF/s':>14s} {'ours/' + name:>12s}"
        print(hdr + " target 0.95")
        for B, L, Hq, Hk in PREFILL_SHAPES:
            try:
                _prefill_row(writer, device, dtype, args, peers, peer_rows, B, L, Hq, Hk)
            except Exception as exc:
                print(f"{B:4d} {L:6d} {Hq:3d}/{Hk:<2d} error {type(exc).__name__}: {str(exc)[:200]}", flush=True)
    if device.type == "cuda":
        _kernel_stats()
    if args.sweep:
        sweep(writer, device, dtype, args)
    return 0


def _decode_row(writer, device, dtype, args, peers, peer_rows, B, L, Hq, Hk, target):
    gen = torch.Generator(device=device).manual_seed(0)
    r = ours_decode(B, L, Hq, Hk, dtype, device, args.warmup, args.rep, gen)
    kv_bytes = B * L * Hk * HEAD_DIM * 2 * 2
    gbps = kv_bytes / (r["ms"] * 1e-3) / 1e9
    kc, vc = _contiguous(r["k"], r["v"], r["perm"], B, L)
    s_ms, s_name, s_out = _sdpa_best(r["q"][:, :, None], kc, vc, False, args.warmup, args.rep)
    err = (s_out[:, :, 0].float() - r["out"].float()).abs().max().item()
    if err > 3e-2:  # the row is still printed, flagged
        print(f"  WRONG: decode B{B} L{L}: ours and SDPA differ by {err}")
    s_gbps = kv_bytes / (s_ms * 1e-3) / 1e9
    line = (f"{B:4d} {L:6d} {Hq:3d}/{Hk:<2d} {r['ms']:8.4f} {gbps:6.0f} {r['plan_us']:7.1f} {r['run_us']:6.1f} "
            f"{r['num_work']:5d} {s_gbps:9.0f} {gbps / s_gbps:9.2f}")
    shape = dict(B=B, L=L, Hq=Hq, Hk=Hk, D=HEAD_DIM, page_size=PAGE, dtype=str(dtype)[6:])
    writer.write(op="attention_decode", impl="moecomm", **shape, median_ms=r["ms"], gbps=gbps, plan_us=r["plan_us"],
                 run_host_us=r["run_us"], num_work=r["num_work"], direct=r["direct"], ratio_to_sdpa=gbps / s_gbps, target_gbps=target, max_err=err)
    writer.write(op="attention_decode", impl=f"sdpa-{s_name}", **shape, median_ms=s_ms, gbps=s_gbps)
    for name, _ in peers:
        pr = peer_rows[name].get(("decode", B, L, Hq, Hk))
        if pr is None or "ms" not in pr:
            line += f" {'n/a':>14s} {'':>7s} {'':>12s}"
            if pr:
                print(f"  {name}: {pr.get('error')}")
            continue
        p_gbps = kv_bytes / (pr["ms"] * 1e-3) / 1e9
        line += f" {p_gbps:14.0f} {pr['plan_us']:7.1f} {gbps / p_gbps:12.2f}"
        writer.write(op="attention_decode", impl=f"{name}-{pr['version']}", **shape, median_ms=pr["ms"], gbps=p_gbps,
                     plan_us=pr["plan_us"], tensor_cores=pr.get("tensor_cores"))
    print(line + f" {target:6d}", flush=True)


PREFILL_VARIANTS = [  # (label, kernel, consecutive pages, PREFILL_GLUON): the default first, the old kernels as control
    ("v2 shuffled", "v2", False, None),
    ("v1 shuffled", "v1", False, None),
    ("gluon consec", "v2", True, None),  # the default on sm_90 (elsewhere v2's TMA loop, as the next row)
    ("v2 consec", "v2", True, False),
    ("v1 consec", "v1", True, None),
]


def _prefill_row(writer, device, dtype, args, peers, peer_rows, B, L, Hq, Hk):
    """One line per kernel variant (PREFILL_VARIANTS), each beside the same SDPA and peers: the
    ratio column is the target's (>= 0.95x the fastest SDPA backend on contiguous KV)."""
    flops = 2 * B * Hq * L * L * HEAD_DIM  # causal: half of 4 * B * Hq * L^2 * D
    shape = dict(B=B, L=L, Hq=Hq, Hk=Hk, D=HEAD_DIM, page_size=PAGE, dtype=str(dtype)[6:], causal=True)
    sdpa = None
    for label, kernel, consecutive, gluon in PREFILL_VARIANTS:
        gen = torch.Generator(device=device).manual_seed(1)
        try:
            r = ours_prefill(B, L, Hq, Hk, dtype, device, args.warmup, max(10, args.rep // 3), gen, kernel=kernel,
                             consecutive=consecutive, gluon=gluon)
        except Exception as exc:  # one variant failing keeps the others' rows
            print(f"{B:4d} {L:6d} {Hq:3d}/{Hk:<2d} {label:12s} error {type(exc).__name__}: {str(exc)[:200]}", flush=True)
            continue
        tf = flops / (r["ms"] * 1e-3) / 1e12
        qs = r["q"].view(B, L, Hq, HEAD_DIM).transpose(1, 2)
        if sdpa is None:  # the same seed: every variant has the same q, K and V (pages renumbered only)
            kc, vc = _contiguous(r["k"], r["v"], r["perm"], B, L)
            sdpa = _sdpa_best(qs, kc, vc, True, args.warmup, max(10, args.rep // 3))
            s_ms, s_name, s_out = sdpa
            writer.write(op="attention_prefill", impl=f"sdpa-{s_name}", **shape, median_ms=s_ms,
                         tflops=flops / (s_ms * 1e-3) / 1e12)
        s_ms, s_name, s_out = sdpa
        err = (s_out.transpose(1, 2).reshape(B * L, Hq, HEAD_DIM).float() - r["out"].float()).abs().max().item()
        if err > 3e-2:  # the row is still printed, flagged
            print(f"  WRONG: prefill {label} B{B} L{L}: ours and SDPA differ by {err}")
        s_tf = flops / (s_ms * 1e-3) / 1e12
        line = (f"{B:4d} {L:6d} {Hq:3d}/{Hk:<2d} {label:12s} {'TMA' if r['tma'] else 'gather':>6s} {r['ms']:8.3f} "
                f"{tf:7.1f} {r['plan_us']:7.1f} {s_tf:8.1f} {s_name:>5s} {tf / s_tf:9.2f}")
        writer.write(op="attention_prefill", impl="moecomm", kernel=kernel, consecutive_pages=consecutive,
                     tma=r["tma"], **shape, median_ms=r["ms"], tflops=tf, plan_us=r["plan_us"],
                     ratio_to_sdpa=tf / s_tf, max_err=err)
        for name, _ in peers:
            pr = peer_rows[name].get(("prefill", B, L, Hq, Hk))
            if pr is None or "ms" not in pr:
                line += f" {'n/a':>14s} {'':>12s}"
                if pr and kernel == "v2" and not consecutive:
                    print(f"  {name}: {pr.get('error')}")
                continue
            p_tf = flops / (pr["ms"] * 1e-3) / 1e12
            line += f" {p_tf:14.1f} {tf / p_tf:12.2f}"
            if kernel == "v2" and not consecutive:
                writer.write(op="attention_prefill", impl=f"{name}-{pr['version']}", **shape, median_ms=pr["ms"],
                             tflops=p_tf)
        print(line, flush=True)
        if label == INTERLEAVED_VARIANT:  # the target's row again, ours and that SDPA backend call after call
            _interleaved_row(writer, shape, flops, r["run"], _sdpa_fn(qs, kc, vc, True, s_name), s_name, args)
        del r
        if device.type == "cuda":
            torch.cuda.empty_cache()


INTERLEAVED_VARIANT = "gluon consec"  # the default kernel on sm_90: the target row


def _interleaved_row(writer, shape, flops, ours, sdpa, s_name, args):
    """ours and SDPA timed call after call (moecomm.testing.bench_interleaved: both in the same clock
    and power state; the rows above time each alone, SDPA before ours), the ratio the target reads."""
    from moecomm.testing import bench_interleaved

    t = bench_interleaved({"ours": ours, "sdpa": sdpa}, warmup=args.warmup, rep=max(10, args.rep // 3))
    o_ms, s_ms = t["ours"].median_ms, t["sdpa"].median_ms
    o_tf, s_tf = flops / (o_ms * 1e-3) / 1e12, flops / (s_ms * 1e-3) / 1e12
    print(f"{'':19s} {INTERLEAVED_VARIANT}, interleaved with SDPA {s_name}: ours {o_ms:.3f} ms ({o_tf:.1f} TFLOP/s), "
          f"SDPA {s_ms:.3f} ms ({s_tf:.1f}): ours/sdpa {o_tf / s_tf:.3f}", flush=True)
    writer.write(op="attention_prefill_interleaved", impl="moecomm", sdpa=s_name, **shape, median_ms=o_ms,
                 sdpa_median_ms=s_ms, tflops=o_tf, sdpa_tflops=s_tf, ratio_to_sdpa=o_tf / s_tf)


def _kernel_stats():
    """Registers, spills and shared memory of our compiled kernels (Triton's per-device cache)."""
    from moecomm.attention import _triton_decode, _triton_prefill, _triton_prefill_v2

    for fn in (_triton_decode.decode_kernel, _triton_decode.merge_partials_kernel, _triton_prefill.prefill_kernel,
               _triton_prefill_v2.prefill_v2_kernel):
        try:
            for cache in fn.device_caches.values():
                for key, k in cache[0].items():
                    k = k.result() if hasattr(k, "result") else k
                    print(f"  {fn.__name__}: regs {getattr(k, 'n_regs', '?')}, spills {getattr(k, 'n_spills', '?')}, "
                          f"smem {k.metadata.shared}, warps {k.metadata.num_warps}, stages {k.metadata.num_stages}")
        except Exception as exc:  # a Triton without this cache layout: the figures are a nicety
            print(f"  {getattr(fn, '__name__', fn)}: no compile stats ({type(exc).__name__}: {exc})")


if __name__ == "__main__":
    raise SystemExit(main())
