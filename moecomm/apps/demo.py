"""`moecomm demo` on one device: build an MoE layer, check it against its reference, time it.

# T = num_tokens, H = hidden, I = intermediate, E = num_experts, k = top_k

    from moecomm.apps.demo import run_demo
    rows = run_demo()                       # best device; prints progress and a table
    ok = all(r["passed"] for r in rows)
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

__all__ = ["run_demo"]

# tolerances of the check, |err| <= tol * (1 + |ref|): fp32 rounds each GEMM of depth H at ~2^-24
# sqrt(H); bf16 rounds the output and the MLP intermediate at 2^-8 each.
_TOL = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 5e-3}
# bf16 router logits can put two experts within an ulp of each other, and the kernel and the
# reference may then pick differently for that token: the check allows this share of tokens.
_MAX_BAD_FRACTION = 1e-3


def run_demo(
    device: str | torch.device | None = None,
    tokens: Sequence[int] | None = None,
    hidden: int | None = None,
    intermediate: int | None = None,
    num_experts: int = 8,
    top_k: int = 2,
    dtype: torch.dtype | None = None,
    stream: Callable[[str], Any] = print,
    *,
    iters: int | None = None,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run the MoE layer on one device, check it against MoE.reference_forward, print a timing table.

    Args:
        device: "cuda", "cpu" or a torch.device; default: the GPU when there is one, else the CPU.
        tokens: token counts T to run; default (1, 64, 512, 4096) on GPU, (1, 32, 256) on CPU.
        hidden: H; default 2048 on GPU, 256 on CPU (the CPU run finishes in a few seconds).
        intermediate: I per expert; default 1408 on GPU, 512 on CPU.
        num_experts: E. top_k: k.
        dtype: default bfloat16 on GPU, float32 on CPU.
        stream: where progress lines and the table go (print by default; a logger's info works).
        iters: timed forwards per token count (their median is shown); default 20 on GPU, 3 on CPU.
        seed: the layer's weights and the inputs come from torch.manual_seed(seed).

    Returns:
        one dict per token count: tokens, ms (median per forward), tokens_per_s, tflops (routed
        expert FLOPs, 6*T*k*H*I, per second), max_abs_err, bad_tokens, passed (the check held).
    """
    from .. import _env
    from ..errors import UnsupportedHardwareError
    from ..jit import backend as _backend
    from ..layer import MoE
    from ..testing import bench

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise UnsupportedHardwareError(f"moecomm demo: device {str(dev)!r} needs a CUDA GPU, and torch sees none "
                                       f"(torch {torch.__version__}, torch.cuda.is_available() is False)")
    gpu = dev.type == "cuda"
    tokens = tuple(tokens) if tokens is not None else ((1, 64, 512, 4096) if gpu else (1, 32, 256))
    hidden = hidden or (2048 if gpu else 256)
    intermediate = intermediate or (1408 if gpu else 512)
    dtype = dtype or (torch.bfloat16 if gpu else torch.float32)
    name = torch.cuda.get_device_name(dev) if gpu else "CPU"
    # Triton compiles each kernel on its first call on a GPU; a CPU runs the references
    compiles = gpu and _env.backend() != "reference" and _backend.triton_import_error() is None

    t0 = time.perf_counter()
    stream(f"moecomm demo: MoE H={hidden} I={intermediate} E={num_experts} top-{top_k}, {str(dtype).replace('torch.', '')} on {name}")
    torch.manual_seed(seed)
    moe = MoE(hidden, intermediate, num_experts, top_k, renormalize=True, dtype=dtype, device=dev).eval()
    tol = _TOL.get(dtype, 3e-2)
    rows: list[dict[str, Any]] = []
    with torch.no_grad():
        for T in tokens:
            x = torch.randn(T, hidden, device=dev, dtype=dtype)
            first = " (the first call compiles the Triton kernels)" if compiles and not rows else ""
            stream(f"  T={T}: forward and reference{first} ...")
            y = moe(x).float()
            ref = moe.reference_forward(x).float()
            excess = (y - ref).abs() - tol * (1 + ref.abs())
            bad = int((excess > 0).any(dim=-1).sum()) if T else 0
            max_err = float((y - ref).abs().max()) if T else 0.0
            passed = bool(torch.isfinite(y).all()) and bad <= _MAX_BAD_FRACTION * T
            # rotate a few inputs so a GPU timing does not measure the L2 cache
            sets = [(torch.randn(T, hidden, device=dev, dtype=dtype),) for _ in range(4 if gpu else 2)]
            timing = bench(moe, sets, warmup=3 if gpu else 1, rep=iters or (20 if gpu else 3), device=dev)
            ms = timing.median_ms
            row = {
                "tokens": T, "ms": ms, "tokens_per_s": T / (ms * 1e-3) if ms > 0 else 0.0,
                "tflops": 6 * T * top_k * hidden * intermediate / (ms * 1e-3) / 1e12 if ms > 0 else 0.0,
                "max_abs_err": max_err, "bad_tokens": bad, "passed": passed,
            }
            rows.append(row)
            stream(f"  T={T}: max |err| vs reference {max_err:.2e} (tol {tol:g}*(1+|ref|)): {'PASS' if passed else 'FAIL'}")

    stream("")
    stream(f"{'tokens':>8} {'ms/forward':>11} {'tokens/s':>12} {'TFLOP/s':>9} {'max err':>9} {'check':>6}")
    for r in rows:
        stream(
            f"{r['tokens']:>8} {r['ms']:>11.3f} {r['tokens_per_s']:>12.0f} {r['tflops']:>9.3f} "
            f"{r['max_abs_err']:>9.2e} {'PASS' if r['passed'] else 'FAIL':>6}"
        )
    stream(f"{'all checks passed' if all(r['passed'] for r in rows) else 'SOME CHECKS FAILED'} in {time.perf_counter() - t0:.1f} s")
    return rows
