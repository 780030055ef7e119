"""The NCCL dispatch path on ONE GPU: a one-rank NCCL group, the exchange forced (no local shortcut).

# T = num_tokens, H = hidden, k = top_k, E = num_experts, I = expert intermediate, S = rows sent

    python -m benchmarks.bench_dispatch_onerank            # GPU: NCCL one-rank group
    python -m benchmarks.bench_dispatch_onerank --quick    # CPU: gloo one-rank group, tiny shapes

What one GPU can say about the path that several GPUs run (the exchange itself is a local copy here,
through NCCL's own kernels):
  throughput  T 4096, H 4096, top-8 of 64: EPDispatcher(force_exchange=True) dispatch + combine,
              eager. host us = perf_counter around one call with the GPU idle at its start, median [p10] of 90
              (target <= 150 us; back-to-back calls are also reported: their count sync waits for
              the previous call's kernels, so they mix host and device time); device us =
              the sum of every kernel's time in one round trip (torch.profiler), beside the bytes
              it must move at this GPU's copy bandwidth (target: within 1.3x); wall ms per round trip.
  static      T 128 per rank, H 7168, top-8 of 256, I 2048 (DeepSeek-V3's shape): dispatch + the
              experts (expert_mlp) + combine in static-capacity mode, eager, and the same captured
              in ONE CUDA graph and replayed; beside it the EP-size-1 MoE layer's own graph replay.
Bytes a round trip must move (throughput mode, one rank): pack reads T*H*e and writes S*width*e,
the exchange reads and writes S*width*e, the receiver's sum reads N*H*e and writes S*H*e, the
return exchange reads and writes S*H*e, the source's sum reads S*H*e and writes T*H*e.
"""

from __future__ import annotations

import argparse
import os
import time

import torch
import torch.distributed as dist

from moecomm.testing import ResultWriter, bench, graph_bench


def _routing(T, E, k, device, seed=0):
    g = torch.Generator().manual_seed(seed)
    w, ids = torch.rand(T, E, generator=g).softmax(-1).topk(k, dim=1)
    return ids.to(torch.int32).to(device), w.float().to(device)


def _one_rank_group(device: torch.device) -> None:
    if not dist.is_initialized():
        backend = "nccl" if device.type == "cuda" else "gloo"
        kw = {"device_id": torch.device("cuda", torch.cuda.current_device())} if backend == "nccl" else {}
        dist.init_process_group(backend, store=dist.HashStore(), rank=0, world_size=1, **kw)


def _host_us(fn, reps: int) -> tuple[float, float]:
    """(median, 10th percentile) host time of one call, the GPU idle at its start (drained before,
    not timed): what the call costs the host. Back to back, the count exchange's sync inside a
    round trip would also wait for the previous trip's kernels (that is _b2b_us)."""
    fn()
    ts = []
    for _ in range(reps):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t0) * 1e6)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    ts.sort()
    return ts[len(ts) // 2], ts[len(ts) // 10]


def _b2b_us(fn, reps: int) -> float:
    """Mean time per call of back-to-back calls (host and device time mixed at the sync)."""
    fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    t1 = time.perf_counter()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return (t1 - t0) / reps * 1e6


def _kernel_us(fn, reps: int = 10, by_kernel: dict | None = None) -> float:
    """Sum of the device time of every kernel one call launches (torch.profiler), in us;
    ``by_kernel`` (a dict) receives each kernel name's us per call."""
    acts = [torch.profiler.ProfilerActivity.CUDA]
    with torch.profiler.profile(activities=acts) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    for ev in prof.events():
        if ev.device_type == torch.autograd.DeviceType.CUDA:
            total += ev.device_time_total
            if by_kernel is not None:
                by_kernel[ev.name] = by_kernel.get(ev.name, 0.0) + ev.device_time_total / reps
    return total / reps


def _copy_gbps(device, nbytes=1 << 30) -> float:
    a = torch.empty(nbytes // 2, dtype=torch.uint8, device=device)
    b = torch.empty_like(a)
    t = bench(lambda: b.copy_(a), [()], rep=20, device=device)
    return nbytes / t.median_ms / 1e6


def throughput(T, H, E, k, device, dtype, writer, rep, stream=print, path="native"):
    """path: "native" (one C call per phase, kernels/ep/native.c) or "python" (MOECOMM_EP_NATIVE=0)."""
    from moecomm.ep.nccl import native
    from moecomm.ep.nccl.dispatcher import EPDispatcher

    os.environ["MOECOMM_EP_NATIVE"] = "1" if path == "native" else "0"
    rt = native.runtime(None, device)
    programs = rt.programs if rt is not None else 0
    disp = EPDispatcher(E, k, H, dtype=dtype, force_exchange=True)
    ids, w = _routing(T, E, k, device)
    x = torch.randn(T, H, device=device).to(dtype)
    res = disp.dispatch(x, ids, w)
    N = res.gather_idx.shape[0]
    h = torch.randn(N, H, device=device).to(dtype)  # the experts' rows, computed once beforehand

    def round_trip():
        d = disp.dispatch(x, ids, w)
        d.tokens, d.gather_idx, d.expert_offsets, d.row_weights  # what the experts read (views made when read)
        return disp.combine(h, d.handle)

    e = torch.empty((), dtype=dtype).element_size()
    S = int(res.handle.send_splits[0])
    width = res.tokens.stride(0)
    nbytes = T * H * e + S * width * e + 2 * S * width * e + N * H * e + S * H * e + 2 * S * H * e + S * H * e + T * H * e
    host, host_p10 = _host_us(round_trip, max(rep, 90))
    b2b = _b2b_us(round_trip, rep)
    wall = bench(round_trip, [()], rep=rep, device=device)
    taken = rt is not None and rt.programs > programs
    if path == "native" and not taken:
        path = f"python (native path not taken: {native.why_not(None, device)})"
    row = dict(bench="dispatch_onerank", mode="throughput", path=path, T=T, H=H, E=E, k=k, S=S, N=N, host_us=host,
               host_p10_us=host_p10, back_to_back_us=b2b, median_ms=wall.median_ms, min_bytes=nbytes)
    line = (f"throughput [{path}] T{T} H{H} top-{k} of {E}: host {host:.0f} us [p10 {host_p10:.0f}] per dispatch + "
            f"combine, the GPU idle at its start, median of {max(rep, 90)} (target <= 150; back to back {b2b:.0f} us a call)")
    if device.type == "cuda":
        per: dict = {}
        kern = _kernel_us(round_trip, by_kernel=per)
        copy = _copy_gbps(device)
        floor_us = nbytes / copy / 1e3
        row.update(kernel_us=kern, copy_gbps=copy, floor_us=floor_us, kernel_over_floor=kern / floor_us)
        line += (f"; kernels {kern:.0f} us for {nbytes / 2**20:.0f} MiB, {floor_us:.0f} us at copy bandwidth "
                 f"({copy:.0f} GB/s): {kern / floor_us:.2f}x (target <= 1.3); wall {wall.median_ms:.3f} ms")
    stream(line)
    if device.type == "cuda":
        stream("  kernels of a round trip (us): " + ", ".join(
            f"{name[:48]} {us:.1f}" for name, us in sorted(per.items(), key=lambda kv: -kv[1])))
        row["kernels"] = per
    writer.write(**row)
    return row


def static(T, H, E, k, inter, device, dtype, writer, rep, stream=print):
    import moecomm
    from moecomm.ep.nccl.dispatcher import EPDispatcher
    from moecomm.gemm import expert_mlp

    disp = EPDispatcher(E, k, H, dtype=dtype, max_tokens=T, force_exchange=True)
    torch.manual_seed(0)
    moe = moecomm.MoE(H, inter, E, k, renormalize=True, dtype=dtype, device=device).eval()
    ids, w = _routing(T, E, k, device)
    x = torch.randn(T, H, device=device).to(dtype)

    def step(x):
        d = disp.dispatch(x, ids, w, validate=False)
        h = expert_mlp(d.tokens, moe.w_gate_up, moe.w_down, d.expert_offsets, layout="enk",
                       gather_idx=d.gather_idx, row_scale=d.row_weights, validate=False)
        return disp.combine(h, d.handle)

    with torch.inference_mode():
        eager = bench(step, [(x,)], rep=rep, device=device)
        row = dict(bench="dispatch_onerank", mode="static", T=T, H=H, E=E, k=k, I=inter, eager_ms=eager.median_ms)
        line = f"static T{T} H{H} top-{k} of {E} I{inter}: eager d + experts + c {eager.median_ms:.3f} ms"
        if device.type == "cuda":
            g = graph_bench(step, [(x,)], replays=rep)
            layer = graph_bench(lambda x: moe(x), [(x,)], replays=rep)  # EP size 1: the layer's own graph
            row.update(graph_ms=g.median_ms, layer_graph_ms=layer.median_ms)
            line += (f"; one CUDA graph {g.median_ms:.3f} ms; the EP-size-1 layer's graph {layer.median_ms:.3f} ms "
                     f"(graph / layer {g.median_ms / layer.median_ms:.2f}x)")
        disp.check_overflow()
    stream(line)
    writer.write(**row)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU: a one-rank gloo group)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--rep", type=int, default=None)
    args = p.parse_args(argv)
    gpu = torch.cuda.is_available() and not args.quick
    device = torch.device("cuda" if gpu else "cpu")
    dtype = torch.bfloat16 if gpu else torch.float32
    writer = ResultWriter(args.out)
    _one_rank_group(device)
    rep = args.rep or (30 if gpu else 2)
    print(f"one-rank {dist.get_backend()} group on {torch.cuda.get_device_name() if gpu else 'CPU'}, "
          f"{str(dtype).replace('torch.', '')}; the exchange forced (EPDispatcher(force_exchange=True))")
    try:
        shape = (4096, 4096, 64, 8) if gpu else (64, 32, 8, 2)
        # the native path, the Python path, the native path again (the control row: its spread is
        # noise); on CPU there is only the Python path
        for path in ("native", "python", "native") if gpu else ("python",):
            throughput(*shape, device, dtype, writer, rep, path=path)
        os.environ.pop("MOECOMM_EP_NATIVE", None)
        if gpu:
            static(128, 7168, 256, 8, 2048, device, dtype, writer, rep)
        else:
            static(8, 32, 8, 2, 16, device, dtype, writer, rep)
    finally:
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
