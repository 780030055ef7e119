"""Benchmark moecomm.gemm.grouped_mm / expert_mlp against torch._grouped_mm and a dense torch.mm.

    python -m benchmarks.bench_gemm [--quick] [--out results.jsonl] [--only SUBSTRING]

Rows:
- grouped GEMM shapes of issue 2 (balanced routing, one skewed case): ours vs torch._grouped_mm vs a
  dense mm of equal FLOPs (x [M, K] @ w [K, N]); TFLOP/s = 2*M*K*N / time. Decode shapes also
  give weight GB/s = (E*K*N + M*K + M*N) * bytes / time (the weights dominate: every expert's
  weights must be read once).
- the Mixtral / Qwen3 MoE layers' expert GEMMs (gate_up + act*mul + down) at 1/64/4096 tokens:
  ours (expert_mlp, GLU fused) vs torch._grouped_mm twice plus the activation; the MoE layer's
  target is within 1.2x of these numbers.
Inputs rotate over several sets (> 100 MB in all) so that repeated calls do not measure the 50 MB L2.
The implementations of a row are timed side by side in alternating sustained blocks
(moecomm.testing.bench_sustained): at these sizes an H100 runs into its 700 W power limit and lowers
its clock (1980 -> 1150-1470 MHz, nvidia-smi in gpu_session.sh), so each implementation is timed at
the pace its own load sustains, not on a GPU cooled by what ran before it.
"""

# Shape legend: M = rows (tokens * top_k), K = in features, N = out features, E = experts,
# H = hidden, I = intermediate, T = tokens.

from __future__ import annotations

import argparse
import math

import torch
import torch.nn.functional as F

from moecomm.gemm import expert_mlp, grouped_mm
from moecomm.testing import ResultWriter, bench_sustained

# (name, E, M, K, N)
GEMM_SHAPES = [
    ("gate_up E8 M8192 K4096 N28672", 8, 8192, 4096, 28672),
    ("gate_up E32 M16384 K7168 N4096", 32, 16384, 7168, 4096),
    ("decode E64 M512 K2048 N1536", 64, 512, 2048, 1536),
    ("decode E32 M256 K7168 N4096", 32, 256, 7168, 4096),
]
SKEWED = [("skewed E32 M16384 K7168 N4096", 32, 16384, 7168, 4096)]
# (model, H, I, E, top_k)
MODELS = [("mixtral", 4096, 14336, 8, 2), ("qwen3", 2048, 768, 128, 8)]
TOKENS = (1, 64, 4096)
QUICK_SHAPES = [("quick E4 M64 K64 N96", 4, 64, 64, 96), ("quick E8 M16 K128 N64", 8, 16, 128, 64)]
QUICK_MODELS = [("tiny", 64, 48, 4, 2)]
QUICK_TOKENS = (1, 16)


def balanced_sizes(M: int, E: int) -> list[int]:
    return [M // E + (1 if e < M % E else 0) for e in range(E)]


def skewed_sizes(M: int, E: int) -> list[int]:
    """Zipf-like: expert e gets ~1/(e+1) of the weight (hot experts, several near-empty ones)."""
    w = [1.0 / (e + 1) for e in range(E)]
    raw = [int(M * x / sum(w)) for x in w]
    raw[0] += M - sum(raw)
    return raw


def offsets_of(sizes: list[int], device) -> torch.Tensor:
    o = [0]
    for s in sizes:
        o.append(o[-1] + s)
    return torch.tensor(o, dtype=torch.int32, device=device)


def _num_sets(bytes_per_set: int) -> int:
    return max(2, min(8, math.ceil(100e6 / max(bytes_per_set, 1))))


BLOCK_MS = 300.0  # bench_sustained blocks on the GPU; --quick (CPU) uses short ones


def _side_by_side(fns, sets):
    return bench_sustained(fns, sets, block_ms=BLOCK_MS)


def _grouped_baseline(x, w_ekn, ends):
    return torch._grouped_mm(x, w_ekn, offs=ends)


_FLASHINFER: list = []  # [(SegmentGEMMWrapper or None, why not)] once looked up


def flashinfer_segment_gemm(device):
    """FlashInfer's grouped GEMM (SegmentGEMMWrapper; CUTLASS on sm_90) as a peer, or (None, why not).

    A peer to measure against, never a dependency: used when importable (benchmarks/gpu_session.sh
    installs the wheel that ../shared/tools/build-flashinfer-wheel.sh builds); its first call
    compiles its kernels (1-2 minutes)."""
    if not _FLASHINFER:
        if device.type != "cuda":
            _FLASHINFER.append((None, "needs a CUDA GPU"))
        else:
            try:
                import flashinfer

                ws = torch.empty(128 * 2**20, dtype=torch.int8, device=device)
                _FLASHINFER.append((flashinfer.SegmentGEMMWrapper(ws), f"flashinfer {flashinfer.__version__}"))
            except Exception as exc:  # ImportError, or a failing import inside it
                _FLASHINFER.append((None, f"not importable ({type(exc).__name__}: {str(exc)[:80]})"))
    return _FLASHINFER[0]


def _flashinfer_fn(seg, indptr64, E, column_major):
    """seg.run over the rows of each expert; weights [E, K, N] (column_major False) or [E, N, K]."""
    def run(x, w):
        return seg.run(x, w, E, column_major, seg_indptr=indptr64)
    return run


def _flashinfer_checked(seg, indptr64, E, column_major, x, w, want, name):
    """The peer's function if its result matches ours on one input (else None, with a printed reason)."""
    fn = _flashinfer_fn(seg, indptr64, E, column_major)
    try:
        got = fn(x, w)
        torch.cuda.synchronize()
        torch.testing.assert_close(got.float(), want.float(), rtol=2e-2, atol=2e-2)
        return fn
    except Exception as exc:  # a compile failure or a wrong result: reported, not timed
        print(f"  {name}: flashinfer SegmentGEMM skipped ({type(exc).__name__}: {str(exc).splitlines()[0][:100]})")
        return None


def bench_gemm_shape(name, E, M, K, N, sizes, dtype, device, writer, rows):
    offs = offsets_of(sizes, device)
    ends = offs[1:].contiguous()
    es = torch.tensor([], dtype=dtype).element_size()
    set_bytes = (M * K + E * K * N) * es
    sets = []
    for _ in range(_num_sets(set_bytes)):
        sets.append((torch.randn(M, K, dtype=dtype, device=device), torch.randn(E, K, N, dtype=dtype, device=device) * K**-0.5))
    seg, _ = flashinfer_segment_gemm(device)
    indptr64 = offs.long()
    # alternating sustained blocks (ours, torch, dense, ours, ...): each at the pace its own load holds
    fns = {
        "ours": lambda x, w: grouped_mm(x, w, offs, validate=False),
        "base": lambda x, w: _grouped_baseline(x, w, ends),
        "dense": lambda x, w: torch.mm(x, w[0]),  # x [M, K] @ [K, N]: the FLOPs of the grouped GEMM
    }
    if seg is not None:
        want = fns["ours"](*sets[0])
        fi = _flashinfer_checked(seg, indptr64, E, False, *sets[0], want, name)
        if fi is not None:
            fns["flashinfer"] = fi
        del want
    t = _side_by_side(fns, sets)
    ours, base, dense = t["ours"], t["base"], t["dense"]
    # the Hugging Face layout [E, N, K]: ours reads it directly, torch._grouped_mm gets a transposed view
    sets_t = [(x, w.transpose(1, 2).contiguous()) for x, w in sets[:2]]
    fns_t = {
        "ours": lambda x, wt: grouped_mm(x, wt, offs, layout="enk", validate=False),
        "base": lambda x, wt: _grouped_baseline(x, wt.transpose(1, 2), ends),
    }
    if "flashinfer" in fns:
        fns_t["flashinfer"] = _flashinfer_fn(seg, indptr64, E, True)
    t_t = _side_by_side(fns_t, sets_t)
    ours_t, base_t = t_t["ours"], t_t["base"]
    del sets, sets_t
    flops = 2.0 * M * K * N
    min_bytes = (E * K * N + M * K + M * N) * es
    peers = [("flashinfer SegmentGEMM", t["flashinfer"])] if "flashinfer" in t else []
    peers_t = [("flashinfer SegmentGEMM enk", t_t["flashinfer"])] if "flashinfer" in t_t else []
    for impl, t in (("moecomm", ours), ("torch._grouped_mm", base), ("dense torch.mm", dense), *peers,
                    ("moecomm enk", ours_t), ("torch._grouped_mm enk-view", base_t), *peers_t):
        rec = writer.write(bench="gemm", shape=name, impl=impl, E=E, M=M, K=K, N=N, dtype=str(dtype),
                           median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                           tflops=flops / t.median_ms / 1e9, gbps=min_bytes / t.median_ms / 1e6,
                           ratio_vs_grouped_mm=(base if "enk" not in impl else base_t).median_ms / t.median_ms)
        rows.append(rec)


def bench_model(model, H, I, E, top_k, T, dtype, device, writer, rows):
    M = T * top_k
    sizes = balanced_sizes(M, E)
    offs = offsets_of(sizes, device)
    ends = offs[1:].contiguous()
    es = torch.tensor([], dtype=dtype).element_size()
    set_bytes = (M * H + E * 3 * H * I) * es
    sets = []
    for _ in range(_num_sets(set_bytes)):
        sets.append((torch.randn(M, H, dtype=dtype, device=device),
                     torch.randn(E, 2 * I, H, dtype=dtype, device=device) * H**-0.5,   # HF gate_up_proj
                     torch.randn(E, H, I, dtype=dtype, device=device) * I**-0.5,       # HF down_proj
                     torch.rand(M, dtype=torch.float32, device=device)))

    def ours(x, wgu, wd, s):
        return expert_mlp(x, wgu, wd, offs, row_scale=s, validate=False)

    def base(x, wgu, wd, s):
        h = torch._grouped_mm(x, wgu.transpose(1, 2), offs=ends)
        g, u = h.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(g) * u, wd.transpose(1, 2), offs=ends)
        return y * s[:, None].to(y.dtype)

    t = _side_by_side({"ours": ours, "base": base}, sets)
    t_ours, t_base = t["ours"], t["base"]
    del sets
    flops = 2.0 * M * H * 3 * I
    active = sum(1 for s in sizes if s) * 3 * H * I * es
    name = f"{model} MoE GEMMs T{T} (M{M} H{H} I{I} E{E} k{top_k})"
    for impl, t in (("moecomm expert_mlp", t_ours), ("torch._grouped_mm x2 + silu*mul", t_base)):
        rows.append(writer.write(bench="gemm_mlp", shape=name, impl=impl, E=E, M=M, H=H, I=I, T=T, dtype=str(dtype),
                                 median_ms=t.median_ms, p10_ms=t.p10_ms, p90_ms=t.p90_ms,
                                 tflops=flops / t.median_ms / 1e9, gbps=active / t.median_ms / 1e6,
                                 ratio_vs_grouped_mm=t_base.median_ms / t.median_ms))


def run(argv=None) -> list[dict]:
    """Run the benchmark (same flags as the command line); returns the measured rows."""
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny shapes (CPU smoke test in seconds)")
    p.add_argument("--out", default=None, help="append JSON lines here")
    p.add_argument("--only", default=None, help="comma-separated substrings: run only rows whose name has one")
    args = p.parse_args(argv)
    cuda = torch.cuda.is_available()
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    writer = ResultWriter(args.out)
    rows: list[dict] = _Rows()
    quick = args.quick or not cuda
    global BLOCK_MS
    if quick:
        BLOCK_MS = 5.0
    wanted = [w for w in (args.only or "").split(",") if w]

    def skip(name: str) -> bool:
        return bool(wanted) and not any(w in name for w in wanted)

    peer, why = flashinfer_segment_gemm(device)
    print(f"FlashInfer peer: {why}" + ("" if peer is not None else "; its rows are skipped"))
    shapes = QUICK_SHAPES if quick else GEMM_SHAPES
    for name, E, M, K, N in shapes:
        if skip(name):
            continue
        bench_gemm_shape(name, E, M, K, N, balanced_sizes(M, E), dtype, device, writer, rows)
    if not quick:
        for name, E, M, K, N in SKEWED:
            if skip(name):
                continue
            bench_gemm_shape(name, E, M, K, N, skewed_sizes(M, E), dtype, device, writer, rows)
    for model, H, I, E, k in (QUICK_MODELS if quick else MODELS):
        for T in (QUICK_TOKENS if quick else TOKENS):
            if skip(f"{model} T{T}"):
                continue
            bench_model(model, H, I, E, k, T, dtype, device, writer, rows)
    print(f"\n{'shape':58s} {'impl':34s} {'ms':>9s} {'TFLOP/s':>8s} {'GB/s':>7s} {'x vs gmm':>8s}")
    for r in rows:
        print(_fmt(r))
    return rows


def main(argv=None) -> int:
    """The command line (`moecomm bench gemm`, `python -m benchmarks.bench_gemm`): exit code 0."""
    run(argv)
    return 0


def _fmt(r: dict) -> str:
    return (f"{r['shape']:58s} {r['impl']:34s} {r['median_ms']:9.4f} {r['tflops']:8.1f} {r['gbps']:7.0f} "
            f"{r['ratio_vs_grouped_mm']:8.3f}")


class _Rows(list):
    """Prints each row as it is measured, so a run cut off by a time limit still shows its numbers."""

    def append(self, r):
        print(_fmt(r), flush=True)
        super().append(r)


if __name__ == "__main__":
    raise SystemExit(main())
