"""Paged prefill's warp-specialised variant (issue 15) against the shipped TMA kernel, cuDNN's SDPA and
FlashInfer 0.7.2: one process, one GPU, every row timed interleaved with the others.

    PYTHONPATH=$PWD:/tmp/fisite python -m benchmarks.probe_prefill_ws   # H200: < 90 s (mostly compiles)
    python -m benchmarks.probe_prefill_ws --rep 60 --no-flashinfer      # more samples; no peer
    python -m benchmarks.probe_prefill_ws --non-causal-table            # also the non-causal table

# B = batch, L = sequence length, Hq / Hk = heads, D = head_dim, P = page_size

The case: B 8 x L 4096, causal, Hq 32 / Hk 8, bf16, D 128, P 16, each request's pages consecutive
(the TMA path; bench_attention's "v2 consec" row, same seed). Napkin math: causal prefill is
2 * B * Hq * L^2 * D FLOPs = 1.1 TFLOP; 534 TFLOP/s (cuDNN, session 8) is 2.06 ms, the target
0.95x of it ~507 TFLOP/s = 2.17 ms; the shipped kernel's 465 is 2.36 ms.

Rows: the shipped kernel (v2 TMA, PREFILL_TMA_CONFIGS, no WS) twice, as the control: the spread
between its two rows is the noise of this run; the WS variant (prefill.PREFILL_WS) at the tile shapes
Triton's Hopper pass takes (num_warps 4); the WS loop compiled with num_warps 8, which the pass leaves
alone (the one-loop, every-block-masked code without warp specialisation: what the loop form costs by
itself); SDPA's cuDNN and flash backends on the same KV made contiguous; FlashInfer 0.7.2's paged
prefill when it imports. With --non-causal-table, the non-causal case (4 * B * Hq * L^2 * D FLOPs) for
the shipped kernel, the default WS tiles and cuDNN: the loop's rate without the causal triangle's short rows.

Each variant is first compiled and run once in a child process of its own (all at once, on the same
GPU): a compile that aborts the interpreter (an assertion inside Triton's warp-specialisation pass
does) or a kernel that faults costs that row only. The child reports the error of its output against
cuDNN's and the compiled kernel: registers and spills (the driver's), shared memory, whether it came
out warp-specialised (ttg.warp_specialize in its TTGIR; 12 warps) and its setmaxnreg counts. This
process then runs the variants that passed (their compiles now in Triton's cache), checks each output
again (max abs error, bf16: flagged WRONG above 3e-2; timed anyway) and times them all interleaved
(moecomm.testing.bench_interleaved: the rows share the GPU's clock and power states).

Timing guards. bench_interleaved picks CUDA events only when its argument sets hold a CUDA tensor;
called with none (as the first version of this probe did) it takes the CPU path, wall clock around
each call with no synchronisation, and times the launch alone: every row came out ~35x too fast
(cuDNN "0.063 ms", 17431 TFLOP/s). The rows are now called with q as their argument (the events
path), and each row is timed a second way, wall clock around a few back-to-back calls between two
synchronisations ("sync ms"). A row faster than the H200's dense bf16 peak (989 TFLOP/s), or whose
event median is under SYNC_RATIO of its synchronised time, prints TIMING INVALID instead of numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import time

import torch

B, L, HQ, HK, D, P = 8, 4096, 32, 8, 128, 16
ATOL = 3e-2  # bf16 outputs of |o| < ~1: ~4e-3 each rounding, P.V in bf16 about as much again; bench_attention's flag
PEAK_TFLOPS = 989.0  # H200 (and H100 SXM) dense bf16 tensor-core peak: no row can beat it
SYNC_RATIO = 0.7  # event median / synchronised wall clock below this: the events missed the work
SYNC_CALLS = 5  # back-to-back calls of the synchronised check (~12 ms a row at ~2.3 ms a call)

# label -> (PREFILL_WS, config: (BLOCK_M, BLOCK_N, num_warps, num_stages) or None for the shipped one)
VARIANTS = {
    "shipped": (False, None),
    "ws 128x128 w4 s2": (True, (128, 128, 4, 2)),
    "ws 128x64 w4 s2": (True, (128, 64, 4, 2)),
    "ws 128x64 w4 s3": (True, (128, 64, 4, 3)),
    "ws-loop w8 s2 (no WS)": (True, (128, 128, 8, 2)),
    "ws-loop w8 s3 (no WS)": (True, (128, 64, 8, 3)),
}
NON_CAUSAL = ["shipped", "ws 128x128 w4 s2"]  # the second table's rows


# ------------------------------------------------------------------------------------------ case


def _case(causal: bool) -> dict:
    """The probe's case on the GPU: the paged cache (pages consecutive), q, our planned wrapper, SDPA's
    contiguous K / V, and the reference output (cuDNN's SDPA, else flash's)."""
    from benchmarks.bench_attention import _contiguous, _paged
    from moecomm.attention import BatchPrefillWithPagedKVCacheWrapper

    gen = torch.Generator(device="cuda").manual_seed(1)  # bench_attention's prefill seed
    k, v, perm, indptr, last = _paged(B, L, HK, D, P, torch.bfloat16, torch.device("cuda"), gen)
    k, v = k[perm.long()].contiguous(), v[perm.long()].contiguous()  # each request's pages consecutive
    ids = torch.arange(perm.shape[0], dtype=torch.int32)
    q = torch.randn(B * L, HQ, D, device="cuda", dtype=torch.bfloat16, generator=gen)
    qo_indptr = torch.arange(0, B * L + 1, L, dtype=torch.int32)
    w = BatchPrefillWithPagedKVCacheWrapper(torch.empty(16 << 20, dtype=torch.uint8, device="cuda"))
    w.plan(qo_indptr, indptr, ids, last, HQ, HK, D, P, causal=causal, q_data_type=torch.bfloat16)
    if not w._plan["kv_contiguous"]:
        raise RuntimeError("probe_prefill_ws: plan() did not see the pages consecutive (no TMA path)")
    qs = q.view(B, L, HQ, D).transpose(1, 2)
    kc, vc = _contiguous(k, v, ids.cuda(), B, L)
    sdpa, ref = {}, None
    for name in ("cudnn", "flash"):
        fn = _sdpa_fn(qs, kc, vc, causal, name)
        try:
            o = fn().transpose(1, 2).reshape(B * L, HQ, D)
        except Exception as exc:
            print(f"  sdpa {name}: not available ({type(exc).__name__}: {str(exc)[:100]})")
            continue
        sdpa[name] = (fn, o)
        ref = o if ref is None else ref
    if ref is None:
        raise RuntimeError("probe_prefill_ws: no SDPA backend ran, nothing to check against")
    return dict(k=k, v=v, q=q, w=w, indptr=indptr, last=last, ids=ids, sdpa=sdpa, ref=ref,
                ref_name=next(iter(sdpa)))


def _first_run(case: dict, label: str):
    """Run the variant once: (its function, max abs error against the reference, compile info of the
    kernel it launched or None when it was compiled before)."""
    fn = _variant_fn(case["w"], case["q"], (case["k"], case["v"]), label)
    before = _cache_keys()
    out = fn()
    torch.cuda.synchronize()
    err = (out.float() - case["ref"].float()).abs().max().item()
    ran = _ran_kernels(before)
    info = None
    if ran:
        kk = ran[-1]
        ttgir = kk.asm["ttgir"] if "ttgir" in kk.asm else ""
        ptx = kk.asm["ptx"] if "ptx" in kk.asm else ""
        info = dict(ws="ttg.warp_specialize" in ttgir, warps=kk.metadata.num_warps, regs=getattr(kk, "n_regs", "?"),
                    spills=getattr(kk, "n_spills", "?"), shared=kk.metadata.shared,
                    setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))))
    return fn, err, info


def check_variant(label: str, causal: bool) -> dict:
    """Child process: compile and run one variant on the case, check it: {"err", "info"}."""
    case = _case(causal)
    _, err, info = _first_run(case, label)
    return dict(err=err, info=info)


def preflight(keys: list[tuple[str, bool]], timeout_s: float,
              module: str = "benchmarks.probe_prefill_ws") -> dict[tuple[str, bool], dict]:
    """check_variant of every (variant, causal), each in its own child process (``python -m module
    --check-only``), all at once (the compiles run in parallel; a compile that aborts its process,
    or a kernel that faults, costs that row only): key -> {"err", "info"}, or {"error": ...}."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    procs = {}
    for label, causal in keys:
        cmd = [sys.executable, "-m", module, "--check-only", label]
        if not causal:
            cmd.append("--non-causal")
        procs[(label, causal)] = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                                  text=True)
    out = {}
    for key, proc in procs.items():
        try:
            so, se = proc.communicate(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            proc.kill()
            so, se = proc.communicate()
            out[key] = dict(error=f"timed out after {timeout_s:.0f} s (a hang on a barrier?)")
            continue
        line = next((x for x in reversed(so.splitlines()) if x.startswith("{")), None)
        if proc.returncode != 0 or line is None:
            lines = [x for x in se.strip().splitlines() if x.strip() and not x.startswith((" ", "#", "{", "}"))]
            out[key] = dict(error=f"failed (exit {proc.returncode}): {' | '.join(lines[-4:])[-500:]}")
        else:
            out[key] = json.loads(line)
    return out


def print_checks(checks: dict, describe, what: str) -> None:
    """preflight's results, a line each (its error, or the max abs error vs cuDNN and the compile)."""
    print(f"{what} compiled and checked in a child process (max abs error vs cuDNN; compile):")
    for (label, causal), chk in checks.items():
        line = chk["error"] if "error" in chk else f"err {chk['err']:.2g}; {describe(chk['info'])}"
        print(f"  {label:28s} {'causal' if causal else 'non-causal':10s} {line}", flush=True)


def _describe(info: dict | None) -> str:
    """One line of a kernel's compile info (or of why there is none)."""
    if not info:
        return "?"
    if "error" in info:
        return info["error"][:120]
    ws = f"WS {info['warps']} warps" if info["ws"] else f"no WS, {info['warps']} warps"
    regs = f"regs {info['regs']}" + (f" (setmaxnreg {'/'.join(info['setmaxnreg'])})" if info.get("setmaxnreg") else "")
    return f"{ws}, {regs}, spills {info['spills']}, smem {info['shared'] // 1024} KB"


# ------------------------------------------------------------------------------------------ GPU


def _ran_kernels(before: set) -> list:
    """The compiled prefill_v2_kernel specialisations added since ``before`` (Triton's device cache)."""
    from moecomm.attention import _triton_prefill_v2 as k2

    new = []
    for cache in k2.prefill_v2_kernel.device_caches.values():
        for key, k in cache[0].items():
            if key not in before:
                new.append(k.result() if hasattr(k, "result") else k)
    return new


def _cache_keys() -> set:
    from moecomm.attention import _triton_prefill_v2 as k2

    return {key for cache in k2.prefill_v2_kernel.device_caches.values() for key in cache[0]}


def _variant_fn(w, q, kv, label):
    """A call of our prefill with the variant's switches set (module globals read at run())."""
    from moecomm.attention import prefill as pre

    ws, cfg = VARIANTS[label]

    def fn():
        pre.PREFILL_WS = ws
        if ws:
            pre.PREFILL_WS_CONFIGS[D] = cfg
        return w.run(q, kv)

    return fn


def _flashinfer_fn(case: dict, causal: bool):
    """FlashInfer's paged prefill on the same cache: (its function, its name), or (None, why not)."""
    q, k, v = case["q"], case["k"], case["v"]
    os.environ.setdefault("FLASHINFER_DISABLE_JIT", "1")  # a kernel not precompiled errors instead of compiling
    os.environ.setdefault("FLASHINFER_CUDA_ARCH_LIST", "9.0")
    try:
        import flashinfer
    except Exception as exc:
        return None, f"not importable here ({type(exc).__name__}: {str(exc)[:100]}; put its site folder on PYTHONPATH)"
    try:
        w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(256 << 20, dtype=torch.uint8, device="cuda"), "NHD")
        qo_indptr = torch.arange(0, B * L + 1, L, dtype=torch.int32)
        w.plan(qo_indptr, case["indptr"], case["ids"].cuda(), case["last"], HQ, HK, D, P, causal=causal,
               q_data_type=q.dtype, kv_data_type=k.dtype)
        w.run(q, (k, v))
        return (lambda: w.run(q, (k, v))), f"flashinfer {getattr(flashinfer, '__version__', '?')}"
    except Exception as exc:
        return None, f"failed ({type(exc).__name__}: {str(exc)[:160]})"


def _sdpa_fn(qs, kc, vc, causal, backend):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    be = {"cudnn": SDPBackend.CUDNN_ATTENTION, "flash": SDPBackend.FLASH_ATTENTION}[backend]

    def fn():
        with sdpa_kernel([be]):
            return torch.nn.functional.scaled_dot_product_attention(qs, kc, vc, is_causal=causal, enable_gqa=True)

    return fn


def _sync_ms(fn, calls: int) -> float:
    """Wall clock per call of ``calls`` back-to-back calls between two synchronisations: a bound the
    events cannot beat by much (launch gaps of a ~2 ms kernel are a few us)."""
    fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / calls


HEADER = (f"{'variant':28s} {'ms':>7s} {'p10':>7s} {'p90':>7s} {'sync ms':>7s} {'TFLOP/s':>8s} {'/cuDNN':>7s} "
          f"{'max err':>8s}  compile")


def timing_valid(t, sync_ms: float, flops: float) -> bool:
    """Whether a row's event median is possible: at most the bf16 peak, and not far under the wall
    clock of the same calls between synchronisations (False for NaN too)."""
    tf = flops / (t.median_ms * 1e-3) / 1e12 if t.median_ms > 0 else float("inf")
    return tf <= PEAK_TFLOPS and t.median_ms >= SYNC_RATIO * sync_ms


def format_row(name: str, t, sync_ms: float, flops: float, base, err: float | None, desc: str) -> str:
    """One table row; TIMING INVALID in place of the numbers when timing_valid() says no (t, base:
    Timing, base the cuDNN row's, None when it has none or its own timing is invalid)."""
    tf = flops / (t.median_ms * 1e-3) / 1e12 if t.median_ms > 0 else float("inf")
    e = f"{err:8.2g}" if err is not None else f"{'':8s}"
    if not timing_valid(t, sync_ms, flops):
        why = (f"events {t.median_ms:.3f} ms = {tf:.0f} TFLOP/s, synchronised wall clock {sync_ms:.3f} ms; "
               f"peak {PEAK_TFLOPS:.0f}")
        return f"{name:28s} {'TIMING INVALID':>39s} {'':7s} {e}  ({why})"
    ratio = f"{base.median_ms / t.median_ms:7.3f}" if base else "    n/a"
    return f"{name:28s} {t.median_ms:7.3f} {t.p10_ms:7.3f} {t.p90_ms:7.3f} {sync_ms:7.3f} {tf:8.1f} {ratio} {e}  {desc}"


def run_case(causal: bool, labels: list[str], checks: dict, args, first_run=None, describe=None,
             switch: str = "PREFILL_WS", control: str = "shipped") -> None:
    """One table: every variant that passed its child's check, the control twice, SDPA, FlashInfer.
    first_run / describe: a probe's own (probe_prefill_gluon's); switch: the prefill module's flag
    and (+ "_CONFIGS") configs the variants set, restored after; control: the label timed twice."""
    from moecomm.attention import prefill as pre
    from moecomm.testing import bench_interleaved

    first_run, describe = first_run or _first_run, describe or _describe
    flops = (2 if causal else 4) * B * HQ * L * L * D
    case = _case(causal)
    fns, notes = {}, {}
    for name, (fn, o) in case["sdpa"].items():
        fns[f"sdpa {name}"] = fn
        notes[f"sdpa {name}"] = ((o.float() - case["ref"].float()).abs().max().item(), "")
    configs = getattr(pre, switch + "_CONFIGS")
    saved = getattr(pre, switch), dict(configs)
    try:
        for label in labels:
            chk = checks.get((label, causal), {})
            if "error" in chk:
                print(f"  {label}: skipped, its check {chk['error']}")
                continue
            try:
                fn, err, info = first_run(case, label)
            except Exception as exc:  # e.g. out of shared memory: the others' rows stay
                print(f"  {label}: failed, {type(exc).__name__}: {str(exc)[:300]}")
                continue
            notes[label] = (err, describe(info or chk.get("info")))
            if not err <= ATOL:  # NaN too
                print(f"  WRONG: {label}: max abs error vs {case['ref_name']} {err:.3g} (> {ATOL}); timed anyway, flagged")
            fns[label] = fn
        if control in fns:  # the control: the same function under a second name, timed in the same rounds
            fns[f"{control} (control, again)"] = fns[control]
            notes[f"{control} (control, again)"] = notes[control]
        if causal and not args.no_flashinfer:
            fi, why = _flashinfer_fn(case, causal)
            if fi is None:
                print(f"  FlashInfer: {why}")
            else:
                notes[why] = ((fi().float() - case["ref"].float()).abs().max().item(), "")
                fns[why] = fi
        # q as every call's argument: bench_interleaved takes CUDA events only when its argument sets hold a
        # CUDA tensor (without one it wall-clocks each launch unsynchronised: the ~35x of the first run)
        times = bench_interleaved({n: (lambda _q, f=f: f()) for n, f in fns.items()}, [(case["q"],)],
                                  warmup=args.warmup, rep=args.rep)
        sync_ms = {n: _sync_ms(f, SYNC_CALLS) for n, f in fns.items()}
    finally:
        setattr(pre, switch, saved[0])
        configs.clear()
        configs.update(saved[1])
    base = times.get("sdpa cudnn")
    if base is not None and not timing_valid(base, sync_ms["sdpa cudnn"], flops):
        base = None  # no ratio to an impossible time
    print(f"\n{'causal' if causal else 'non-causal'} B{B} L{L} {HQ}/{HK} heads D{D} P{P} bf16, consecutive pages; "
          f"median of {args.rep} interleaved calls (CUDA events) [p10, p90]; sync ms: wall clock of {SYNC_CALLS} "
          f"back-to-back calls; max err vs {case['ref_name']}")
    print(HEADER)
    invalid = 0
    for name, t in times.items():
        err, desc = notes.get(name, (None, ""))
        line = format_row(name, t, sync_ms[name], flops, base, err, desc)
        invalid += "TIMING INVALID" in line
        print(line, flush=True)
    if invalid:
        print(f"  {invalid} row(s) TIMING INVALID: faster than {PEAK_TFLOPS:.0f} TFLOP/s or than their synchronised "
              f"wall clock; no number of this table can be trusted")
    del case, fns
    torch.cuda.empty_cache()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rep", type=int, default=50, help="timed rounds (one call of every row each)")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--non-causal-table", action="store_true", help="also the non-causal table (~+20 s)")
    ap.add_argument("--check-timeout", type=float, default=60.0, help="seconds for each variant's child check")
    ap.add_argument("--check-only", metavar="LABEL", help=argparse.SUPPRESS)  # the child of preflight()
    ap.add_argument("--non-causal", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_prefill_ws times GPU kernels: it needs a CUDA GPU (none is visible here)")
        return 2
    if args.check_only:
        print(json.dumps(check_variant(args.check_only, causal=not args.non_causal)), flush=True)
        return 0
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    labels = list(VARIANTS)
    non_causal = NON_CAUSAL if args.non_causal_table else []
    checks = preflight([(label, True) for label in labels] + [(label, False) for label in non_causal],
                       args.check_timeout)
    print_checks(checks, _describe, "each variant")
    run_case(True, labels, checks, args)
    if non_causal:
        run_case(False, non_causal, checks, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
