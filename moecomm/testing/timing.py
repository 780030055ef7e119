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
    times.sort()
    return Timing(statistics.median(times), _quantile(times, 0.1), _quantile(times, 0.9), len(times))


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
    times = sorted(s.elapsed_time(e) for s, e in zip(starts, ends))
    return Timing(statistics.median(times), _quantile(times, 0.1), _quantile(times, 0.9), len(times))
