"""Where the time of kernels/sampling/sample.cu goes, phase by phase, and the host time of the API.

    python -m benchmarks.profile_sampling            # GPU: the benchmark's rows
    python -m benchmarks.profile_sampling --host     # also: host us per API call, and its profile
    python -m benchmarks.profile_sampling --host-mock  # no GPU: the same host path over a fake driver

# B = rows, V = vocab

Phases: the kernel built with -DMOECOMM_SAMPLE_PROFILE writes, from thread 0 of each block, the
SM clock at the end of each phase; printed as the median over the blocks, in cycles and in us at
the clock given (--ghz; the H200 runs its SMs at ~1.98 GHz under this load). Beside it: the
production build's time per launch (CUDA events around 20 back-to-back launches on one input,
so the row may sit in L2 at B1), and the list sizes. Host: perf_counter over back-to-back calls at
B1 V1000 (the kernel is then shorter than the host path), and cProfile's top functions.

--host-mock (any machine, no GPU): the same calls on CPU tensors taken down the CUDA host path by
moecomm.testing.fake_cuda.gpu_host_mock (the real dispatch, checks, plan_launch and CudaKernel
packing and ctypes calls; a fake libcuda of C no-ops; torch's allocator, stream and generator
queries are the CPU's or Python stand-ins, so the figure is a lower bound of the GPU host's: compare
two versions of moecomm with it, not it with the GPU). Median of 7 runs of 2000 calls.
"""

# Shape legend: B = rows, V = vocab.

from __future__ import annotations

import argparse
import cProfile
import ctypes
import io
import pstats
import time

import torch

PHASES = ("pass A", "plan", "pass B (list)", "split", "select", "fallback", "race", "argmax+write")
# a split row's blocks (sample_row_split: one row over a cluster; slot 6 is rank 0's alone)
SPLIT_PHASES = ("pass A", "barrier 1", "totals+bins+plan", "pass B (list)", "barrier 2", "select (rank 0)",
                "barrier 3", "race + argmax", "barrier 4 + write")
PROFILE_ROWS, PROFILE_SLOTS = 4096, 32  # sample.cu's
# clock marks inside phases (sample.cu's MOECOMM_SAMPLE_CLOCK(16..)): printed as us from the block's start
MARKS = {16: "split: totals + bins summed", 17: "split: lists' totals (rank 0)", 18: "split: select done (rank 0)",
         20: "pass B: loop done", 21: "pass B: sums done", 22: "window_select: sub-bins counted",
         23: "window_select: scanned", 25: "window_select: summed + compacted"}
# marks inside the split rows' phases: (name, from slot, to slot)
SPLIT_MARKS = (("totals + bins", 2, 16), ("plan", 16, 3), ("lists' totals (rank 0)", 5, 17),
               ("select (rank 0)", 17, 18))


def _probs(batch: int, vocab: int, device) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(0)
    return torch.softmax(torch.randn(batch, vocab, generator=g) * 3, -1).to(device)


def _launch_plan(x, op: str):
    from moecomm.sampling import _cuda

    B = x.shape[0]
    out = torch.empty(B, dtype=torch.int32, device=x.device)
    valid = torch.empty(B, dtype=torch.bool, device=x.device)
    top_k = 50 if op == "top_k_top_p" else None
    return _cuda.plan_launch(x, None, B, out, valid, None, top_k, 0.9, None, True, 1234, 0, False), out


def _kernel_us(kernel, plan, launches: int = 20) -> float:
    """us a launch: CUDA events around back-to-back launches on one input (3 before, untimed)."""
    def run():
        kernel(plan.grid, plan.block, plan.args, shared_mem=plan.shared_bytes)

    for _ in range(3):
        run()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(launches):
        run()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / launches * 1e3


def phases(op: str, batch: int, vocab: int, ghz: float, device, base_source: str | None = None,
           source: str | None = None) -> str:
    from moecomm.jit import cuda
    from moecomm.sampling import _cuda

    source = source or _cuda.SOURCE  # a trial's copy of sample.cu (same entries and arguments) or the package's
    x = _probs(batch, vocab, device)
    plan, out = _launch_plan(x, op)
    prod = cuda.load(source, plan.entry, device=device, flags=_cuda.entry_flags(plan.entry))
    base_line = ""
    if base_source:  # the control row: an earlier sample.cu's production build, same launch, same run
        base = cuda.load(base_source, plan.entry, device=device, flags=_cuda.entry_flags(plan.entry))
        base_us = [_kernel_us(base, plan)]
        base_tok = out.clone()
    flags = _cuda.entry_flags(plan.entry, ("-DMOECOMM_SAMPLE_PROFILE",))  # the entry and the read kernel: one
    prof = cuda.load(source, plan.entry, device=device, flags=flags)   # cubin (the read kernel reads its marks)
    read = cuda.load(source, "moecomm_sample_profile_read", device=device, flags=flags)

    def run(k):
        k(plan.grid, plan.block, plan.args, shared_mem=plan.shared_bytes)

    kernel_us = _kernel_us(prod, plan)
    tok_prod = out.clone()
    if base_source:  # base, this source, base again: the spread of the two base figures is the noise
        base_us.append(_kernel_us(prod, plan))
        base_us.append(_kernel_us(base, plan))
        base_same = bool(torch.equal(base_tok, tok_prod)) and bool(torch.equal(out, tok_prod))
        base_line = (f"\n    control {base_source}: {base_us[0]:.1f} / {base_us[2]:.1f} us/launch vs this source "
                     f"{kernel_us:.1f} / {base_us[1]:.1f} (interleaved); tokens {'equal' if base_same else 'DIFFER'}")
    n = PROFILE_ROWS * PROFILE_SLOTS
    buf = torch.empty(n, dtype=torch.int64, device=device)
    for _ in range(2):  # the first read also resets the marks to -1 (a phase a row skips stays -1)
        run(prof)
        read((64,), (256,), (buf, ctypes.c_int(n)))
    torch.cuda.synchronize()
    same = bool(torch.equal(out, tok_prod))
    blocks = plan.grid[0]  # a split row: its cluster's blocks, rank 0 first
    split = blocks > batch
    names = SPLIT_PHASES if split else PHASES
    rows = buf.view(PROFILE_ROWS, PROFILE_SLOTS)[: min(blocks, PROFILE_ROWS)].cpu()
    t = rows[:, :len(names) + 1]
    line = [f"{op:12s} B{batch:<4d} V{vocab} [{source}]: kernel {kernel_us:7.1f} us/launch (production build); "
            f"profile build's tokens {'equal' if same else 'DIFFER'}"]
    prev = t[:, 0]
    total = torch.zeros(t.shape[0], dtype=torch.int64)
    for i, name in enumerate(names, start=1):
        cur = t[:, i]
        has = cur >= 0
        if not bool(has.any()):
            continue
        d = torch.where(has, cur - prev, torch.zeros_like(cur))
        total += d
        med = float(d[has].double().median())
        line.append(f"    {name:16s} {med:10.0f} cycles {med / ghz / 1e3:8.2f} us  ({'blocks' if split else 'rows'} "
                    f"{int(has.sum())})")
        prev = torch.where(has, cur, prev)
    med = float(total.double().median())
    line.append(f"    {'block total':16s} {med:10.0f} cycles {med / ghz / 1e3:8.2f} us")
    for name, a, b in SPLIT_MARKS if split else ():
        has = (rows[:, a] >= 0) & (rows[:, b] >= 0)
        if bool(has.any()):
            med = float((rows[:, b] - rows[:, a])[has].double().median())
            line.append(f"      of which {name:24s} {med:10.0f} cycles {med / ghz / 1e3:8.2f} us")
    ends = {0: 0.0}
    for i in range(1, len(names) + 1):
        has = t[:, i] >= 0
        if bool(has.any()):
            ends[i] = float((t[:, i] - t[:, 0])[has].double().median()) / ghz / 1e3
    line.append("    phase ends (us from the start): " + ", ".join(f"{names[i - 1]} {u:.2f}" for i, u in ends.items() if i))
    for slot, name in MARKS.items():
        has = (rows[:, slot] >= 0) & (rows[:, 0] >= 0)
        if bool(has.any()):
            med = float((rows[:, slot] - rows[:, 0])[has].double().median()) / ghz / 1e3
            line.append(f"    mark {name:36s} at {med:8.2f} us")
    levels = rows[:, 24]
    if bool((levels >= 0).any()):
        line.append(f"    window_select levels: median {float(levels[levels >= 0].double().median()):.0f}, "
                    f"max {int(levels.max())}")
    rounds = rows[:, 19]
    if bool((rounds >= 0).any()):
        r = rounds[rounds >= 0]
        line.append(f"    small_select rounds: median {float(r.double().median()):.0f}, max {int(r.max())}")
    vals = rows[:, 10:15].double()
    names = ("list n", "gather list" if split else "window nw", "estimate", "b0", "in list")
    line.append("    " + ", ".join(f"{nm} median {float(vals[:, j][vals[:, j] >= 0].median()):.0f}"
                               for j, nm in enumerate(names) if bool((vals[:, j] >= 0).any())))
    return "\n".join(line) + base_line


def host(device) -> str:
    x = _probs(1, 1000, device)
    fns = _host_calls(x)
    lines = []
    for fn in fns.values():
        for _ in range(50):
            fn()
    torch.cuda.synchronize()
    times: dict = {name: [] for name in fns}
    for _ in range(5):  # the calls in turn, five loops each: the medians
        for name, fn in fns.items():
            t0 = time.perf_counter()
            for _ in range(500):
                fn()
            times[name].append((time.perf_counter() - t0) / 500 * 1e6)
            torch.cuda.synchronize()
    for name, ts in times.items():
        ts.sort()
        lines.append(f"host {name:16s} {ts[2]:7.1f} us per call (B1 V1000, back to back; median of 5 x 500, "
                     f"min {ts[0]:.1f}, max {ts[-1]:.1f})")
    from moecomm.sampling import api

    gen = torch.cuda.default_generators[torch.device(device).index or 0]
    off = gen.get_offset()
    pieces = {
        "torch.randint (device seed)": lambda: torch.randint(-2**63, 2**63 - 1, (1,), dtype=torch.int64, device=device),
        "generator state on the host": lambda: api._philox_on_host(None, device, True),  # what eager calls use
        "  torch.compiler.is_compiling": torch.compiler.is_compiling,
        "  torch.cuda.current_device": torch.cuda.current_device,
        "  is_current_stream_capturing": torch.cuda.is_current_stream_capturing,
        "  generator.get_offset": gen.get_offset,
        "  generator.set_offset": lambda: gen.set_offset(off),
        "  generator.initial_seed": gen.initial_seed,
        "torch.empty x2": lambda: (torch.empty(1, dtype=torch.int32, device=device),
                                   torch.empty(1, dtype=torch.bool, device=device)),
        "api._sample_impl (no checks)": _impl_call(x),
    }
    pieces.update(_launch_pieces(x))
    from .bench_sampling import find_flashinfer

    fi, version = find_flashinfer()
    if fi is not None:
        fi.sampling.top_p_sampling_from_probs(x, 0.9)  # its first call (module load) outside the loop
        torch.cuda.synchronize()
        pieces[f"flashinfer {version} top_p (whole call)"] = lambda: fi.sampling.top_p_sampling_from_probs(x, 0.9)
    else:
        lines.append(f"host flashinfer: not importable ({version}; no peer row)")
    for name, fn in pieces.items():
        for _ in range(50):
            fn()
        t0 = time.perf_counter()
        for _ in range(1000):
            fn()
        lines.append(f"host {name:28s} {(time.perf_counter() - t0) / 1000 * 1e6:6.1f} us")
    pr = cProfile.Profile()
    fn = fns["top_p"]
    pr.enable()
    for _ in range(500):
        fn()
    pr.disable()
    torch.cuda.synchronize()
    s = io.StringIO()
    pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(18)
    lines.append(s.getvalue())
    return "\n".join(lines)


def _impl_call(x):
    """The sampling op's implementation with prepared arguments: the public call less its checks."""
    from moecomm.sampling import api

    kw = dict(x=x, indices=None, num_rows=x.shape[0], from_logits=False,
              top_k_t=None, top_k_v=0, has_top_k=False, top_p_t=None, top_p_v=0.9, has_top_p=True,
              min_p_t=None, min_p_v=0.0, has_min_p=False, temp_t=None, temp_v=1.0, has_temp=False,
              top_k_first=False, seed_t=torch.zeros(1, dtype=torch.int64, device=x.device), seed_v=0,
              offset_t=None, offset_v=0, per_row_seed=False, seed_drawn=False, out_int64=False, want_logprob=False)
    return lambda: api._sample_impl(**kw)


def _launch_pieces(x):
    """launch_sample's three steps, each alone with the arguments of a top-p 0.9 call: the plan, the
    kernel's lookup, the driver launch."""
    from moecomm.jit import cuda
    from moecomm.sampling import _cuda

    out = torch.empty(x.shape[0], dtype=torch.int32, device=x.device)
    valid = torch.empty(x.shape[0], dtype=torch.bool, device=x.device)
    seed = torch.zeros(1, dtype=torch.int64, device=x.device)
    plan_args = (x, None, x.shape[0], out, valid, None, None, 0.9, None, False, seed, 0, False)
    entry, tensors, scalars, smem = _cuda._plan(*plan_args)
    flags = _cuda.entry_flags(entry)
    kernel = cuda.load(_cuda.SOURCE, entry, device=x.device, flags=flags)
    values = [t.data_ptr() for t in tensors] + scalars
    grid, block = (x.shape[0] * _cuda.cluster_of(entry), 1, 1), (_cuda.threads_of(entry), 1, 1)
    return {f"  _cuda._plan ({entry})": lambda: _cuda._plan(*plan_args),
            "  cuda.load (cached)": lambda: cuda.load(_cuda.SOURCE, entry, device=x.device, flags=flags),
            "  kernel.launch (driver)": lambda: kernel.launch(grid, block, _cuda.SIGNATURE, values, shared_mem=smem)}


def _host_calls(x):
    import moecomm.sampling as S

    return {"top_p": lambda: S.top_p_sampling_from_probs(x, 0.9),
            "top_k_top_p": lambda: S.top_k_top_p_sampling_from_probs(x, 50, 0.9),
            "top_p seed=int": lambda: S.top_p_sampling_from_probs(x, 0.9, seed=1, offset=0)}


def host_mock(profile: bool = False, runs: int = 7, n: int = 2000) -> str:
    """Host us per call on this CPU, the GPU's host path over a fake driver (see the module docstring)."""
    from moecomm.sampling import _cuda
    from moecomm.testing.fake_cuda import gpu_host_mock

    x = _probs(1, 1000, "cpu")
    lines = []
    with gpu_host_mock(kernels=[(_cuda.SOURCE, e, _cuda.entry_flags(e)) for e in _cuda.ENTRY.values()]) as mock:
        for name, fn in _host_calls(x).items():
            for _ in range(200):
                fn()
            before = mock.launches()
            ts = []
            for _ in range(runs):
                t0 = time.perf_counter()
                for _ in range(n):
                    fn()
                ts.append((time.perf_counter() - t0) / n * 1e6)
            launched = mock.launches() - before
            if launched != runs * n:  # the mock must have taken the CUDA kernel's path, once a call
                raise RuntimeError(f"profile_sampling --host-mock: {name}: {launched} launches for {runs * n} calls")
            ts.sort()
            lines.append(f"host-mock {name:16s} {ts[runs // 2]:6.2f} us per call (median of {runs} x {n}; "
                         f"min {ts[0]:.2f}, max {ts[-1]:.2f}; B1 V1000, fake driver)")
        if profile:
            pr = cProfile.Profile()
            fn = _host_calls(x)["top_p"]
            pr.enable()
            for _ in range(n):
                fn()
            pr.disable()
            s = io.StringIO()
            pstats.Stats(pr, stream=s).sort_stats("tottime").print_stats(25)
            lines.append(s.getvalue())
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", action="store_true", help="also the host time of the API")
    parser.add_argument("--host-mock", action="store_true",
                        help="only the host time of the API, on this CPU over a fake driver (no GPU needed)")
    parser.add_argument("--cprofile", action="store_true", help="with --host-mock: also cProfile's top functions")
    parser.add_argument("--ghz", type=float, default=1.98, help="SM clock to convert cycles (default 1.98)")
    parser.add_argument("--base-source", default=None,
                        help="an earlier sample.cu (path under kernels/): its production build timed beside each row")
    parser.add_argument("--source", default=None,
                        help="profile this copy of sample.cu (path under kernels/) instead of the package's")
    parser.add_argument("--rows", default="top_p:1:128256,top_p:128:128256,top_p:512:151936,top_k_top_p:1:128256,"
                        "top_k_top_p:128:128256,top_k_top_p:512:151936", help="op:B:V,... (default: the benchmark's)")
    args = parser.parse_args(argv)
    if args.host_mock:
        print(host_mock(profile=args.cprofile))
        return 0
    if not torch.cuda.is_available():
        print("profile_sampling: needs a CUDA device (the kernel's clock marks); nothing to do here")
        return 0
    device = torch.device("cuda")
    print(f"device: {torch.cuda.get_device_name()}; cycles -> us at {args.ghz} GHz")
    for row in filter(None, args.rows.split(",")):
        op, batch, vocab = row.split(":")
        print(phases(op, int(batch), int(vocab), args.ghz, device, args.base_source, args.source), flush=True)
    if args.host:
        print(host(device))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
