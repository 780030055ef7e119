"""Launch configurations of the grouped GEMM kernel: candidates per shape bucket, timing, disk cache.

Why per shape: prefill-sized groups (hundreds of rows per expert) are compute-bound and want
128x256 wgmma tiles; decode-sized groups (a few rows per expert) are bound by streaming the weights
and want BLOCK_M 16/32 (mma; wgmma needs 64-row tiles) with fine splits along N so that enough
programs and loads are in flight. One fixed config loses 2-5x at one end or the other.

Cold-start budget (first MoE forward <= 30 s, <= 3 s with a warm cache): at most 6 candidates per
bucket, each compiled once, warmed up for 10 ms and timed over 7 runs on the caller's own inputs.

Cache: one JSON file per (device name, Triton version) under moecomm.jit.cache.cache_root("gemm")
(MOECOMM_CACHE_DIR/gemm), {bucket key: config}. Each write merges its entries under the file's
cross-process lock and publishes atomically (temp file, fsync, os.replace: moecomm/jit/cache.py), so
concurrent ranks neither read half a file nor lose each other's entries; a corrupt file is ignored
with a warning and rewritten on the next tune.
"""

# Shape legend: M = rows, K = in features, N = out features, E = groups.

from __future__ import annotations

import dataclasses
import json
import re
import threading
import warnings
from pathlib import Path
from typing import Any, Callable

from ..jit import cache as _disk


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """One launch configuration of grouped_mm_kernel."""

    block_m: int
    block_n: int
    block_k: int
    group_m: int = 8
    num_warps: int = 4
    num_stages: int = 3
    use_tma: bool = True
    programs_per_sm: int = 1
    flatten: bool = False  # one software pipeline over tile and k loops (epilogue overlaps next loads)
    tma_store: bool = False  # full tiles stored through TMA (needs use_tma; ignored with flatten)

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, d: dict[str, Any]) -> "GemmConfig":
        # fields added later have defaults: cache files written before them still load
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls)
                      if f.name in d or f.default is dataclasses.MISSING})


def _pow2_bucket(x: int) -> int:
    return 1 if x <= 1 else 1 << (int(x) - 1).bit_length()


def bucket_key(M: int, N: int, K: int, E: int, *, glu: bool, gather: bool, layout: str, dtype: str) -> str:
    """Shape bucket: M to the next power of two, the average rows per expert likewise, N/K/E exact."""
    rows_per_expert = _pow2_bucket(max(1, M // max(E, 1)))
    return f"M{_pow2_bucket(M)}-rpe{rows_per_expert}-N{N}-K{K}-E{E}-{layout}-{dtype}-glu{int(glu)}-g{int(gather)}"


# Rows per expert above which the prefill lists (128-row wgmma tiles) apply.
PREFILL_MIN_RPE = 96


def candidates(M: int, N: int, K: int, E: int, *, glu: bool) -> list[GemmConfig]:
    """A few configs per regime, the heuristic pick first."""
    rpe = M / max(E, 1)
    if rpe <= 24:
        # Decode: weight streaming. 402 MB of weights at 2.8 TB/s is 0.144 ms. Pointer loads beat
        # TMA here, and the grid matters more than the tile: with 1536 tiles, 8 programs per SM
        # (1056 programs) leave a second wave 45% full (0.203 ms in run 2), while 4 (about 3 tiles
        # each) or 16 (one tile each, the hardware balances) reach 0.138-0.140 ms (sweep of run 3,
        # benchmarks/NOTES-gemm.md). BLOCK_N 128 gives 256-byte rows for the [E, K, N] layout.
        cands = [
            GemmConfig(16, 64, 256, 1, 4, 3, False, 4),
            GemmConfig(16, 128, 128, 1, 4, 3, False, 16),
            GemmConfig(16, 64, 256, 1, 4, 3, False, 16),
            GemmConfig(16, 64, 128, 1, 4, 4, False, 16),
            GemmConfig(16, 128, 64, 1, 4, 4, False, 16),
            GemmConfig(16, 64, 256, 1, 4, 3, True, 4),
        ]
        if rpe > 6:
            # Rows per expert scatter around the mean (Mixtral at 64 tokens: 16 +- 4); an expert
            # with 17 rows needs a second 16-row tile, which streams its weights a second time
            # (the layer measured 2.1 TB/s there, against 2.9 at 1 token). 32- and 64-row tiles
            # cover the tail in one pass; the tuner keeps 16 where no expert passes 16 rows.
            cands = [
                GemmConfig(32, 64, 256, 1, 4, 3, False, 4),
                GemmConfig(32, 128, 128, 1, 4, 3, False, 16),
                GemmConfig(64, 64, 128, 1, 4, 3, False, 4),
            ] + cands[:3]
    elif rpe <= PREFILL_MIN_RPE:
        cands = [
            GemmConfig(64, 128, 64, 8, 4, 4, True, 1),
            GemmConfig(64, 64, 128, 8, 4, 4, True, 2),
            GemmConfig(32, 128, 128, 8, 4, 3, True, 1),
            GemmConfig(64, 128, 64, 8, 4, 4, False, 1),
            GemmConfig(128, 128, 64, 8, 8, 3, True, 1),
        ]
    else:
        if glu:
            # two B tiles per k-step: keep stages x (A + 2 B) under ~200 KB of shared memory.
            # Sweep of session 3 (Mixtral gate_up+SiLU, M8192 K4096 N28672): 128x128 4 stages
            # 2.59 ms, its TMA-store twin 2.66, flattened 3.78 (so no flatten candidate here)
            cands = [
                GemmConfig(128, 128, 64, 8, 8, 4, True, 1),
                GemmConfig(128, 128, 64, 8, 8, 3, True, 1),
                GemmConfig(128, 128, 64, 8, 8, 4, True, 1, tma_store=True),
                GemmConfig(128, 64, 64, 8, 4, 4, True, 1),
                GemmConfig(64, 128, 64, 8, 4, 4, True, 1),
                GemmConfig(128, 128, 64, 8, 8, 3, False, 1),
            ]
        else:
            # 128x256x64, 8 warps. Sweep of session 3, same run as torch._grouped_mm (2.58 / 2.74 ms
            # for gate_up E8 [E, K, N] / [E, N, K]): the TMA-store epilogue 2.47 ms [E, K, N], the
            # flattened tile loop 2.52 ms [E, N, K] and 1.27 ms at E32 (4 stages), the plain loop
            # 2.57 / 2.68: which variant wins depends on the layout, so the tuner sees each
            cands = [
                GemmConfig(128, 256, 64, 8, 8, 3, True, 1, tma_store=True),
                GemmConfig(128, 256, 64, 8, 8, 3, True, 1, flatten=True),
                GemmConfig(128, 256, 64, 8, 8, 4, True, 1, flatten=True),
                GemmConfig(128, 256, 64, 8, 8, 3, True, 1),
                GemmConfig(128, 256, 64, 4, 8, 3, True, 1, tma_store=True),
                GemmConfig(256, 128, 64, 4, 8, 4, True, 1),
            ]
    return cands


def interpreter_config() -> GemmConfig:
    """Small tiles for the Triton interpreter on CPU (numpy runs every lane; big tiles are slow)."""
    return GemmConfig(16, 32, 32, 2, 4, 1, True, 1)


# --------------------------------------------------------------------------- disk cache

_lock = threading.Lock()
_memory: dict[str, dict[str, GemmConfig]] = {}


def _sanitize(s: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", s)


def cache_path(device_name: str, triton_version: str) -> Path:
    return _disk.cache_root("gemm") / f"configs-{_sanitize(device_name)}-triton{_sanitize(triton_version)}.json"


def load_cache(path: Path) -> dict[str, GemmConfig]:
    """Read a cache file; a missing file is empty, a corrupt one is ignored with a warning."""
    if not path.exists():
        return {}
    try:
        raw = json.loads(path.read_text())
        if not isinstance(raw, dict):
            raise ValueError(f"top level is {type(raw).__name__}, not an object")
        return {k: GemmConfig.from_json(v) for k, v in raw.items()}
    except Exception as exc:  # any parse/shape problem: tuning again is always safe
        warnings.warn(f"moecomm.gemm: ignoring corrupt tuning cache {path} ({type(exc).__name__}: {exc}); "
                      "it will be rewritten after the next tuning", RuntimeWarning, stacklevel=2)
        return {}


def store_cache(path: Path, entries: dict[str, GemmConfig]) -> None:
    """Merge ``entries`` into the file at ``path`` under its lock; published atomically."""
    with _disk.lock(path):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)
            merged = load_cache(path)
        merged.update(entries)
        _disk.atomic_write(path, json.dumps({k: v.to_json() for k, v in sorted(merged.items())}, indent=1))


def lookup(path: Path, key: str) -> GemmConfig | None:
    with _lock:
        table = _memory.get(str(path))
        if table is None:
            table = load_cache(path)
            _memory[str(path)] = table
        return table.get(key)


def remember(path: Path, key: str, cfg: GemmConfig, *, persist: bool = True) -> None:
    with _lock:
        _memory.setdefault(str(path), {})[key] = cfg
    if persist:
        try:
            store_cache(path, {key: cfg})
        except OSError as exc:  # read-only home, full disk, lock wait ran out: keep the in-memory pick
            warnings.warn(f"moecomm.gemm: could not write tuning cache {path}: {exc}", RuntimeWarning, stacklevel=2)


def clear_memory() -> None:
    """Forget configs held in memory (tests; the disk cache stays)."""
    with _lock:
        _memory.clear()


def _cuda_time_ms(fn: Callable[[], None]) -> float:
    import torch

    start = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    end.synchronize()
    return start.elapsed_time(end)


def tune(cands: list[GemmConfig], run: Callable[[GemmConfig], None], *, reps: int = 7, warmup_ms: float = 50.0,
         prefer_first_within: float = 0.0,
         timer: Callable[[Callable[[], None]], float] | None = None) -> GemmConfig:
    """Time each candidate on the GPU and return the fastest (the median of ``reps`` timings).

    1. Every candidate is compiled and launched once; one that fails (too much shared memory, say)
       is skipped with a warning.
    2. Warm-up: the first candidate runs until ``warmup_ms`` of GPU time have passed. An idle H100
       sits at ~400 MHz and ramps up over tens of ms; timed one after the other, the first candidate
       ran on a slower clock than the rest and lost for that reason alone (Mixtral's gate_up tuned to
       a 3.07 ms config beside a 2.59 ms one).
    3. The candidates are then timed round-robin, ``reps`` rounds, so any drift of the clock (power
       or temperature) falls on all of them alike. The fastest median wins, or, with
       ``prefer_first_within`` (a fraction), the first candidate that close to it.

    ``timer(fn) -> ms`` times one call (default: CUDA events); the tests pass a fake one.
    """
    timer = timer or _cuda_time_ms
    live: list[GemmConfig] = []
    for cfg in cands:
        try:
            run(cfg)
            live.append(cfg)
        except Exception as exc:  # compile/launch failure of one candidate is not fatal
            warnings.warn(f"moecomm.gemm: candidate {cfg} failed ({type(exc).__name__}: {str(exc)[:200]})",
                          RuntimeWarning, stacklevel=2)
    if not live:
        raise RuntimeError(f"moecomm.gemm: every launch configuration failed: {cands}")
    spent, n = 0.0, 0
    while spent < warmup_ms and n < 2000:
        spent += timer(lambda: run(live[0]))
        n += 1
    times: list[list[float]] = [[] for _ in live]
    for _ in range(reps):
        for i, cfg in enumerate(live):
            times[i].append(timer(lambda cfg=cfg: run(cfg)))
    medians = [sorted(t)[len(t) // 2] for t in times]
    best = min(medians)
    return next(cfg for cfg, ms in zip(live, medians) if ms <= (1.0 + prefer_first_within) * best)


def prefer_first_within(M: int, E: int) -> float:
    """How close to the fastest the tuner keeps the earlier candidate: 2% for the prefill lists,
    which side-by-side sweeps under sustained load ordered (session 3: isolated timings tuned gate_up
    E8 to a config 7% slower in the benchmark than the list's first); 0 for the others (with the 2%
    rule a decode shape took a 32-row config that the benchmark then timed 5x slower)."""
    return 0.02 if M / max(E, 1) > PREFILL_MIN_RPE else 0.0
