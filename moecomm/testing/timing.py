"""The one timing harness of tests' benchmarks and `moecomm bench`.

GPU: CUDA events around each call, after warm-up; inputs rotated over several sets so that repeated
calls do not measure the L2 cache (an H100 has 50 MB of L2: pass enough sets to exceed it).
CPU: wall clock (perf_counter). Returns the median with the 10th/90th percentiles as spread.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float
    num_samples: int

    def __str__(self) -> str:
        return f"{self.median_ms:.4f} ms [{self.p10_ms:.4f}, {self.p90_ms:.4f}] (n={self.num_samples})"


def _quantile(sorted_vals: list[float], q: float) -> float:
    idx = min(len(sorted_vals) - 1, max(0, round(q * (len(sorted_vals) - 1))))
    return sorted_vals[idx]


def _timing(times_ms: list[float]) -> Timing:
    """Median and 10th/90th percentiles of per-call times."""
    ts = sorted(times_ms)
    return Timing(statistics.median(ts), _quantile(ts, 0.1), _quantile(ts, 0.9), len(ts))


def _on_cuda(sets: Sequence[Sequence[Any]]) -> bool:
    """Whether the argument sets hold CUDA tensors (then timing uses CUDA events)."""
    return torch.cuda.is_available() and any(isinstance(a, torch.Tensor) and a.is_cuda for s in sets for a in s)


def bench(
    fn: Callable[..., Any],
    inputs: Sequence[Sequence[Any]] | None = None,
    *,
    warmup: int = 5,
    rep: int = 30,
    device: torch.device | str | None = None,
    min_warmup_ms: float = 25.0,
) -> Timing:
    """Time ``fn(*inputs[i % len(inputs)])``; median of ``rep`` calls after ``warmup`` calls.

    Args:
        fn: the callable to time.
        inputs: a list of argument tuples, cycled through call after call (rotate past L2 by giving
            several sets whose total size exceeds it). None: fn is called with no arguments.
        warmup: calls before timing (at least ``min_warmup_ms`` of them run on GPU).
        rep: timed calls.
        device: where fn runs; default: CUDA when available, else CPU.
    """
    sets: Sequence[Sequence[Any]] = inputs if inputs else [()]
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda":
        return _bench_cuda(fn, sets, warmup, rep, min_warmup_ms)
    return _bench_cpu(fn, sets, warmup, rep)


def _bench_cpu(fn, sets, warmup, rep) -> Timing:
    for i in range(warmup):
        fn(*sets[i % len(sets)])
    times = []
    for i in range(rep):
        args = sets[i % len(sets)]
        t0 = time.perf_counter()
        fn(*args)
        times.append((time.perf_counter() - t0) * 1e3)
    return _timing(times)


def _bench_cuda(fn, sets, warmup, rep, min_warmup_ms) -> Timing:
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    i = 0
    while i < warmup or (time.perf_counter() - t0) * 1e3 < min_warmup_ms and i < 10 * warmup + 50:
        fn(*sets[i % len(sets)])
        i += 1
        if i == warmup:
            torch.cuda.synchronize()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(rep)]
    for j in range(rep):
        args = sets[(i + j) % len(sets)]
        starts[j].record()
        fn(*args)
        ends[j].record()
    torch.cuda.synchronize()
    return _timing([s.elapsed_time(e) for s, e in zip(starts, ends)])


def bench_interleaved(
    fns: dict[str, Callable[..., Any]],
    inputs: Sequence[Sequence[Any]] | None = None,
    *,
    warmup: int = 5,
    rep: int = 30,
    min_warmup_ms: float = 50.0,
) -> dict[str, Timing]:
    """Time several implementations of one op side by side on the GPU: call after call in turn
    (A, B, C, A, B, C, ...), CUDA events around each call, after a shared warm-up.

    Timed one after the other (``bench`` per implementation), a long compute-bound kernel meets
    the GPU in another clock and power state than the one timed before it (an idle H100 sits at
    ~400 MHz; under sustained load it holds its power limit by lowering the clock), and a ratio
    of 3-5% moves from run to run. Interleaved, every implementation sees the same states.
    CPU: wall clock per call, in the same interleaved order.

    Args:
        fns: name -> callable; each is called as ``fn(*inputs[i % len(inputs)])``.
        inputs: argument tuples rotated call after call (pass enough to exceed the L2 cache).
        warmup: rounds (one call of every implementation each) before timing; on GPU at least
            ``min_warmup_ms`` of them.
        rep: timed rounds.

    Returns:
        name -> Timing over its ``rep`` calls.
    """
    sets: Sequence[Sequence[Any]] = inputs if inputs else [()]
    names = list(fns)
    cuda = _on_cuda(sets)
    if cuda:
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    i = 0
    while i < warmup or (cuda and (time.perf_counter() - t0) * 1e3 < min_warmup_ms and i < 10 * warmup + 50):
        for n in names:
            fns[n](*sets[i % len(sets)])
        i += 1
        if cuda and i == warmup:
            torch.cuda.synchronize()
    times: dict[str, list[float]] = {n: [] for n in names}
    if cuda:
        torch.cuda.synchronize()
        events = []
        for j in range(rep):
            args = sets[(i + j) % len(sets)]
            for n in names:
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
                fns[n](*args)
                e.record()
                events.append((n, s, e))
        torch.cuda.synchronize()
        for n, s, e in events:
            times[n].append(s.elapsed_time(e))
    else:
        for j in range(rep):
            args = sets[(i + j) % len(sets)]
            for n in names:
                t = time.perf_counter()
                fns[n](*args)
                times[n].append((time.perf_counter() - t) * 1e3)
    return {n: _timing(ts) for n, ts in times.items()}


def bench_sustained(
    fns: dict[str, Callable[..., Any]],
    inputs: Sequence[Sequence[Any]] | None = None,
    *,
    block_ms: float = 300.0,
    rounds: int = 3,
    min_calls: int = 10,
    max_calls: int = 1000,
) -> dict[str, Timing]:
    """Time several implementations of one op side by side, each at its own sustained pace:
    alternating blocks of back-to-back calls (A for ~block_ms, B for ~block_ms, ..., ``rounds``
    times); only the second half of each block is timed (CUDA events around each call).

    Under a long compute-bound load an H100 reaches its power limit and lowers its clock (seen
    at 700 W: 1980 -> 1150-1470 MHz within a quarter second). Called one after the other, the
    first implementation timed meets a cool GPU; called in turn call by call, a light
    implementation lets the GPU recover before each call of a heavy one. In blocks, each meets the
    state its own load sustains. Rounds go forward and backward in turn (A B C, C B A, ...), so a
    slow drift (the GPU warming up) falls on all alike instead of on the last ones timed.
    CPU: wall clock per call, same blocks.

    Args:
        fns: name -> callable; each is called as ``fn(*inputs[i % len(inputs)])``.
        inputs: argument tuples rotated call after call (pass enough to exceed the L2 cache).
        block_ms: the length of one block of calls (from a first estimate of each call's time).
        rounds: blocks per implementation.
        min_calls, max_calls: bounds on the calls of one block.

    Returns:
        name -> Timing over its timed calls.
    """
    sets: Sequence[Sequence[Any]] = inputs if inputs else [()]
    cuda = _on_cuda(sets)
    dev = "cuda" if cuda else "cpu"
    est = {n: bench(fn, sets, warmup=2, rep=5, device=dev, min_warmup_ms=0.0).median_ms for n, fn in fns.items()}
    times: dict[str, list[float]] = {n: [] for n in fns}
    names = list(fns)
    for r in range(rounds):
        for n in names if r % 2 == 0 else names[::-1]:
            fn = fns[n]
            calls = max(min_calls, min(max_calls, int(block_ms / max(est[n], 1e-3))))
            first_timed = calls // 2
            if cuda:
                events = []
                for j in range(calls):
                    if j >= first_timed:
                        s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                        s.record()
                        fn(*sets[j % len(sets)])
                        e.record()
                        events.append((s, e))
                    else:
                        fn(*sets[j % len(sets)])
                torch.cuda.synchronize()
                times[n] += [s.elapsed_time(e) for s, e in events]
            else:
                for j in range(calls):
                    t = time.perf_counter()
                    fn(*sets[j % len(sets)])
                    if j >= first_timed:
                        times[n].append((time.perf_counter() - t) * 1e3)
    return {n: _timing(ts) for n, ts in times.items()}


def graph_bench(fn: Callable[..., Any], sets: Sequence[Sequence[Any]], *, replays: int, calls: int = 20) -> Timing:
    """Time per call of fn(*sets[i % len(sets)]), ``calls`` of them captured in one CUDA graph:
    the device time of the work, without the host's launch path.

    Warm-up runs every input set on a side stream first (Triton compiles, the caching allocator
    grows), as capture requires; inside the capture nothing syncs, and the outputs come from the
    graph's private memory pool, the same addresses at every replay. One warm replay, then CUDA
    events around each of ``replays`` replays; each sample is a replay's time / ``calls``.
    """
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for args in sets:
            fn(*args)
    torch.cuda.current_stream().wait_stream(side)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for j in range(calls):
            fn(*sets[j % len(sets)])
    graph.replay()
    torch.cuda.synchronize()
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(replays)]
    for j in range(replays):
        starts[j].record()
        graph.replay()
        ends[j].record()
    torch.cuda.synchronize()
    times = [s.elapsed_time(e) / calls for s, e in zip(starts, ends)]
    del graph  # its pool goes back to the caching allocator
    return _timing(times)


def host_us(fn: Callable[..., Any], sets: Sequence[Sequence[Any]], n: int) -> float:
    """Host time of one call in microseconds: n back-to-back calls, no sync inside (launches are
    asynchronous; n is far below the launch queue's depth, so the host never waits for the GPU)."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    for j in range(n):
        fn(*sets[j % len(sets)])
    t = time.perf_counter() - t0
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return t / n * 1e6
