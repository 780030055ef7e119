"""The `moecomm` command: info, demo, bench.

    moecomm info                         versions, devices, usable backends (and why not)
    moecomm demo [-n N] [--launcher L]   the MoE layer checked against its reference, with timings
    moecomm bench CAPABILITY [ARGS...]   run benchmarks/bench_CAPABILITY.py (from a source checkout)
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import platform
import shutil
import sys
from pathlib import Path


def _version(module: str) -> str:
    try:
        mod = importlib.import_module(module)
    except Exception as exc:  # report, never crash `info`
        return f"not usable ({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''})"
    return getattr(mod, "__version__", "installed")


def info_rows() -> list[tuple[str, str]]:
    """(name, value) rows printed by `moecomm info`."""
    import torch

    from . import __version__, _env
    from .jit import backend as _backend

    rows: list[tuple[str, str]] = [
        ("moecomm", __version__),
        ("python", platform.python_version()),
        ("torch", torch.__version__),
    ]
    for mod in ("triton", "numpy", "cupy", "mpi4py", "ray", "transformers"):
        rows.append((mod, _version(mod)))
    if torch.cuda.is_available():
        for i in range(torch.cuda.device_count()):
            p = torch.cuda.get_device_properties(i)
            rows.append((f"cuda:{i}", f"{p.name}, sm_{p.major}{p.minor}, {p.total_memory / 2**30:.0f} GiB, {p.multi_processor_count} SMs"))
    else:
        rows.append(("cuda", "no GPU visible (torch.cuda.is_available() is False): ops run their CPU references"))

    terr = _backend.triton_import_error()
    if terr is not None:
        rows.append(("backend triton", f"no: {terr}"))
    elif torch.cuda.is_available():
        rows.append(("backend triton", "yes (compiled kernels on the GPU)"))
    else:
        rows.append(("backend triton", "interpreter only: no GPU (set TRITON_INTERPRET=1 MOECOMM_BACKEND=triton to run kernels on CPU)"))
    rows.append(("backend reference", "yes (pure torch, any device)"))
    import torch.distributed as dist

    rows.append(("dist gloo", "yes" if dist.is_available() and dist.is_gloo_available() else "no: torch built without gloo"))
    if not (dist.is_available() and dist.is_nccl_available()):
        rows.append(("dist nccl", "no: this torch build has no NCCL (CPU build)"))
    elif not torch.cuda.is_available():
        rows.append(("dist nccl", "no: NCCL is built in but no GPU is visible"))
    else:
        rows.append(("dist nccl", "yes"))
    mpiexec = shutil.which("mpiexec") or shutil.which("mpirun")
    mpi_ver = _version("mpi4py")
    if mpi_ver.startswith("not usable"):
        rows.append(("launcher mpirun", f"no: mpi4py {mpi_ver} (pip install mpi4py mpich)"))
    elif not mpiexec:
        rows.append(("launcher mpirun", "no: mpi4py imports but no mpiexec/mpirun on PATH (pip install mpich)"))
    else:
        rows.append(("launcher mpirun", f"yes ({mpiexec})"))
    ray_ver = _version("ray")
    rows.append(("launcher ray", "yes" if not ray_ver.startswith("not usable") else f"no: ray {ray_ver} (pip install ray)"))
    rows.append(("launcher torchrun", "yes" if dist.is_available() else "no: torch.distributed unavailable"))
    for name in _env.VARIABLES:
        rows.append((name, _env.get(name)))
    return rows


def _print_table(rows: list[tuple[str, str]]) -> None:
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")


def _find_benchmarks_dir() -> Path | None:
    here = Path(__file__).resolve().parent.parent / "benchmarks"
    for cand in (here, Path.cwd() / "benchmarks"):
        if (cand / "__init__.py").exists():
            return cand
    return None


def bench_main(capability: str, argv: list[str]) -> int:
    bench_dir = _find_benchmarks_dir()
    if bench_dir is None:
        print("moecomm bench: the benchmarks live in the source repository (benchmarks/); "
              "run from a checkout or an editable install (pip install -e .)", file=sys.stderr)
        return 2
    available = sorted(p.stem[len("bench_"):] for p in bench_dir.glob("bench_*.py"))
    if capability not in available:
        print(f"moecomm bench: capability must be one of {available}, got {capability!r}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(bench_dir.parent))
    module = importlib.import_module(f"benchmarks.bench_{capability}")
    result = module.main(argv)
    return int(result or 0)


def demo_main(args: argparse.Namespace) -> int:
    if args.num_ranks == 1 and args.launcher == "local":
        from .apps.demo import run_demo

        rows = run_demo(device=args.device)
        ok = bool(rows) and all(r["passed"] for r in rows)
    else:
        from .apps.ep_demo import main as dist_demo

        ok = dist_demo(args.num_ranks, args.launcher, tokens_per_rank=args.tokens_per_rank)
    return 0 if ok else 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecomm", description="Mixture-of-Experts communication and compute for PyTorch")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("info", help="versions, devices and which backends are usable (and why not)")
    d = sub.add_parser("demo", help="run the MoE layer, check it against the reference, print timings")
    d.add_argument("-n", "--num-ranks", type=int, default=1, help="number of expert-parallel ranks (default 1)")
    d.add_argument("--launcher", choices=["local", "torchrun", "mpirun", "ray"], default="local")
    d.add_argument("--device", default=None, help="single-rank demo: cuda or cpu (default: best available)")
    d.add_argument("--tokens-per-rank", type=int, default=512)
    b = sub.add_parser("bench", help="run benchmarks/bench_CAPABILITY.py; extra arguments go to it")
    b.add_argument("capability")
    b.add_argument("args", nargs=argparse.REMAINDER)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        _print_table(info_rows())
        return 0
    if args.command == "demo":
        if args.num_ranks < 1:
            print(f"moecomm demo: -n must be >= 1, got {args.num_ranks}", file=sys.stderr)
            return 2
        return demo_main(args)
    return bench_main(args.capability, args.args)


if __name__ == "__main__":
    sys.exit(main())
