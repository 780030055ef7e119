"""Paged prefill's Gluon kernel (moecomm/attention/_gluon_prefill.py, issue 15) against the shipped v2 TMA
kernel, cuDNN's SDPA and FlashInfer 0.7.2: one process, one GPU, every row timed interleaved.

    PYTHONPATH=$PWD:/tmp/fisite python -m benchmarks.probe_prefill_gluon   # H200: < 90 s (mostly compiles)
    python -m benchmarks.probe_prefill_gluon --no-flashinfer --no-non-causal

# B = batch, L = sequence length, Hq / Hk = heads, D = head_dim, P = page_size

The case is probe_prefill_ws's (its helpers are reused): B 8 x L 4096, causal, Hq 32 / Hk 8, bf16,
D 128, P 16, each request's pages consecutive. Causal prefill is 2 * B * Hq * L^2 * D = 1.1 TFLOP:
cuDNN's ~569 TFLOP/s is ~1.93 ms, the target 0.95x of it ~540 TFLOP/s = 2.03 ms.

Rows: v2 (prefill.PREFILL_GLUON = False) twice, the control (the spread between its rows is this run's
noise); the Gluon kernel at each GluonConfig of VARIANTS; SDPA cuDNN / flash on the same KV made
contiguous; FlashInfer 0.7.2's paged prefill when it imports. Then (unless --no-non-causal) the
non-causal case (4 * B * Hq * L^2 * D FLOPs) for the NON_CAUSAL labels and cuDNN.

Each Gluon variant is first compiled and run once in a child process (all at once): a kernel that
hangs on a barrier or faults costs its row only (the child is killed after --check-timeout). This
process then checks every row against cuDNN again (bf16: WRONG above 3e-2, timed anyway) and times
them interleaved (moecomm.testing.bench_interleaved with q as argument: CUDA events), with
probe_prefill_ws's guards (TIMING INVALID above the bf16 peak or under 0.7x of a synchronised clock).
"""

from __future__ import annotations

import argparse
import json
import re

import torch

from benchmarks import probe_prefill_ws as ws

B, L, HQ, HK, D, P = ws.B, ws.L, ws.HQ, ws.HK, ws.D, ws.P
ATOL = ws.ATOL


def _cfg(block_n, stages, pipe, pingpong, late_k_release, branch_softmax=True, persistent=False, consumer_regs=232,
         producer_regs=40):
    from moecomm.attention.prefill import GluonConfig

    return GluonConfig(128, block_n, stages, pipe, pingpong, late_k_release, consumer_regs, producer_regs,
                       branch_softmax, persistent)


# label -> _cfg args (None: v2, the Gluon kernel switched off). "branch": the softmax inside the mask /
# no-mask branches (P V's wait stays after it in SASS); "persistent": grid = SM count (the D128
# default since session 13, without branch); "plain": neither.
VARIANTS = {
    "v2 (shipped)": None,
    "gluon s2 plain": (128, 2, True, False, False, False, False),
    "gluon s2 branch": (128, 2, True, False, False, True, False),
    "gluon s2 persistent": (128, 2, True, False, False, False, True),
    "gluon s2 branch persistent": (128, 2, True, False, False, True, True),
    "gluon s2 branch persistent pingpong": (128, 2, True, True, False, True, True),
    "gluon s2 branch persistent late-k": (128, 2, True, False, True, True, True),
    "gluon s3 branch persistent": (128, 3, True, False, False, True, True),
}
NON_CAUSAL = ["v2 (shipped)", "gluon s2 plain", "gluon s2 persistent", "gluon s2 branch persistent"]


def _variant_fn(w, q, kv, label):
    from moecomm.attention import prefill as pre

    args = VARIANTS[label]

    def fn():
        pre.PREFILL_GLUON = args is not None
        if args is not None:
            pre.PREFILL_GLUON_CONFIGS[D] = _cfg(*args)
        return w.run(q, kv)

    return fn


def _gluon_cache() -> dict:
    from moecomm.attention import _gluon_prefill as gk

    return {key: k for cache in gk.prefill_gluon_kernel.device_caches.values() for key, k in cache[0].items()}


def _info(kk) -> dict:
    kk = kk.result() if hasattr(kk, "result") else kk
    ptx = kk.asm.get("ptx", "") if hasattr(kk.asm, "get") else ""
    return dict(warps=kk.metadata.num_warps, regs=getattr(kk, "n_regs", "?"), spills=getattr(kk, "n_spills", "?"),
                shared=kk.metadata.shared,
                setmaxnreg=sorted(set(re.findall(r"setmaxnreg\.\w+\.sync\.aligned\.u32\s+(\d+)", ptx))))


def _first_run(case, label):
    fn = _variant_fn(case["w"], case["q"], (case["k"], case["v"]), label)
    before = set(_gluon_cache())
    out = fn()
    torch.cuda.synchronize()
    err = (out.float() - case["ref"].float()).abs().max().item()
    new = [k for key, k in _gluon_cache().items() if key not in before]
    return fn, err, (_info(new[-1]) if new else None)


def _describe(info) -> str:
    if not info:
        return ""
    regs = f"regs {info['regs']}" + (f" (setmaxnreg {'/'.join(info['setmaxnreg'])})" if info.get("setmaxnreg") else "")
    return f"{info['warps']} warps, {regs}, spills {info['spills']}, smem {info['shared'] // 1024} KB"


def preflight(keys, timeout_s):
    return ws.preflight(keys, timeout_s, module="benchmarks.probe_prefill_gluon")


def run_case(causal, labels, checks, args):
    ws.run_case(causal, labels, checks, args, first_run=_first_run, describe=_describe, switch="PREFILL_GLUON",
                control="v2 (shipped)")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rep", type=int, default=50)
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--no-flashinfer", action="store_true")
    ap.add_argument("--no-non-causal", action="store_true")
    ap.add_argument("--only", nargs="*", help="variant labels to keep (default: all)")
    ap.add_argument("--check-timeout", type=float, default=60.0)
    ap.add_argument("--check-only", metavar="LABEL", help=argparse.SUPPRESS)
    ap.add_argument("--non-causal", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("probe_prefill_gluon times GPU kernels: it needs a CUDA GPU (none is visible here)")
        return 2
    if args.check_only:
        case = ws._case(not args.non_causal)
        _, err, info = _first_run(case, args.check_only)
        print(json.dumps(dict(err=err, info=info)), flush=True)
        return 0
    import triton

    print(f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton {triton.__version__}")
    labels = [x for x in VARIANTS if not args.only or x in args.only or VARIANTS[x] is None]
    non_causal = [] if args.no_non_causal else [x for x in NON_CAUSAL if x in labels]
    keys = [(x, True) for x in labels if VARIANTS[x] is not None] + [(x, False) for x in non_causal
                                                                     if VARIANTS[x] is not None]
    checks = preflight(keys, args.check_timeout)
    ws.print_checks(checks, _describe, "each Gluon variant")
    run_case(True, labels, checks, args)
    if non_causal:
        run_case(False, non_causal, checks, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
