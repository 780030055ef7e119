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
    from .jit import host as _host

    cerr = _host.compile_error()
    rows.append(("host C (plan)", f"no: {cerr}; attention plan() runs its numpy path" if cerr else
                 f"yes ({_host.compiler_id()}): attention plan() in compiled C"))
    import torch.distributed as dist

    rows.append(("dist gloo", "yes" if dist.is_available() and dist.is_gloo_available() else "no: torch built without gloo"))
    if not (dist.is_available() and dist.is_nccl_available()):
        rows.append(("dist nccl", "no: this torch build has no NCCL (CPU build)"))
    elif not torch.cuda.is_available():
        rows.append(("dist nccl", "no: NCCL is built in but no GPU is visible"))
    else:
        rows.append(("dist nccl", "yes"))
    mpi_ver = _version("mpi4py")
    if mpi_ver.startswith("not usable"):
        rows.append(("launcher mpirun", f"no: mpi4py {mpi_ver} (pip install mpi4py mpich)"))
    else:
        from .apps.mpiexec import find_mpiexec
        from .errors import MoeCommError

        try:  # the launcher `moecomm demo --launcher mpirun` would start, found the way it finds it
            choice = find_mpiexec()
            rows.append(("launcher mpirun", f"yes ({choice.path}, {choice.reason})"))
        except MoeCommError as exc:
            rows.append(("launcher mpirun", f"no: {str(exc).removeprefix('moecomm demo: ')}"))
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


def bench_capabilities() -> list[str]:
    """The CAPABILITY names of `moecomm bench` (benchmarks/bench_CAPABILITY.py); [] outside a checkout."""
    bench_dir = _find_benchmarks_dir()
    return sorted(p.stem[len("bench_"):] for p in bench_dir.glob("bench_*.py")) if bench_dir else []


def bench_main(capability: str | None, argv: list[str]) -> int:
    bench_dir = _find_benchmarks_dir()
    if bench_dir is None:
        print("moecomm bench: the benchmarks live in the source repository (benchmarks/); "
              "run from a checkout or an editable install (pip install -e .)", file=sys.stderr)
        return 2
    available = bench_capabilities()
    if capability is None:
        print(f"usage: moecomm bench CAPABILITY [--quick] [--out results.jsonl] [...]\n"
              f"moecomm bench: name a capability, one of {available} "
              "(`moecomm bench CAPABILITY --help` lists its options)", file=sys.stderr)
        return 2
    if capability not in available:
        print(f"moecomm bench: capability must be one of {available}, got {capability!r}", file=sys.stderr)
        return 2
    sys.path.insert(0, str(bench_dir.parent))
    module = importlib.import_module(f"benchmarks.bench_{capability}")
    argv0 = sys.argv[0]
    sys.argv[0] = f"moecomm bench {capability}"  # argparse's prog in the benchmark's --help and errors
    try:
        result = module.main(argv)
    finally:
        sys.argv[0] = argv0
    return int(result or 0)


def demo_main(args: argparse.Namespace) -> int:
    if args.num_ranks == 1 and args.launcher == "local":
        import torch

        from .apps.demo import run_demo

        dtype = None if args.dtype == "auto" else getattr(torch, args.dtype)
        kw = {k: v for k, v in dict(hidden=args.hidden, intermediate=args.intermediate, top_k=args.top_k,
                                    iters=args.iters, seed=args.seed).items() if v is not None}
        rows = run_demo(device=args.device, tokens=None if args.tokens_per_rank is None else (args.tokens_per_rank,),
                        num_experts=args.num_experts or 8, dtype=dtype, **kw)
        ok = bool(rows) and all(r["passed"] for r in rows)
    else:
        from .apps.ep_demo import DemoConfig, main as dist_demo

        d = DemoConfig()
        ok = dist_demo(args.num_ranks, args.launcher,
                       tokens_per_rank=args.tokens_per_rank or d.tokens_per_rank, hidden=args.hidden or d.hidden,
                       num_experts=args.num_experts, top_k=args.top_k or d.top_k,
                       intermediate=args.intermediate or d.intermediate, iters=args.iters or d.iters,
                       seed=d.seed if args.seed is None else args.seed, dtype=args.dtype,
                       timeout_s=args.timeout or d.timeout_s)
    return 0 if ok else 1


_LAUNCHER_HELP = ("how the -n ranks start: local (processes forked/spawned by this command, the default), "
                  "torchrun (python -m torch.distributed.run), mpirun (the mpiexec of the MPI library "
                  "mpi4py loads; MOECOMM_MPIEXEC overrides) or ray (actors of a Ray started in this process)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="moecomm", description="Mixture-of-Experts communication and compute for PyTorch")
    sub = p.add_subparsers(dest="command", required=True, metavar="{info,demo,bench}")
    sub.add_parser("info", help="versions, devices and which backends are usable (and why not)")
    d = sub.add_parser("demo", help="run the MoE layer, check it against the reference, print timings",
                       description="The MoE layer on one device (default), or expert-parallel on -n ranks "
                                   "(gloo on CPU, NCCL on GPUs), checked against its reference and timed.")
    d.add_argument("-n", "--num-ranks", type=int, default=1, help="number of expert-parallel ranks (default 1)")
    d.add_argument("--launcher", choices=["local", "torchrun", "mpirun", "ray"], default="local", help=_LAUNCHER_HELP)
    d.add_argument("--device", default=None, help="one-device demo: cuda or cpu (default: the GPU if there is one)")
    d.add_argument("--tokens-per-rank", type=int, default=None, metavar="T",
                   help="tokens each rank routes per forward (default 512 with -n > 1; the one-device demo "
                        "runs T = 1, 32, 256 on a CPU and 1, 64, 512, 4096 on a GPU unless given)")
    d.add_argument("--num-experts", type=int, default=None, metavar="E",
                   help="routed experts over all ranks (default 8, or N with -n N > 8; a rank may hold none)")
    d.add_argument("--top-k", type=int, default=None, metavar="K", help="experts per token (default 2)")
    d.add_argument("--hidden", type=int, default=None, metavar="H",
                   help="model width (default 1024 with -n > 1; one device: 2048 on a GPU, 256 on a CPU)")
    d.add_argument("--intermediate", type=int, default=None, metavar="I",
                   help="each expert's MLP width (default 1024 with -n > 1; one device: 1408 on a GPU, 512 on a CPU)")
    d.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto: bfloat16 on GPUs, float32 on CPUs")
    d.add_argument("--iters", type=int, default=None, help="timed forwards, median shown (default 3 with -n > 1; "
                                                           "one device: 20 on a GPU, 3 on a CPU)")
    d.add_argument("--seed", type=int, default=None, help="seed of the weights and tokens (default 0)")
    d.add_argument("--timeout", "--timeout-s", type=float, default=None, metavar="SECONDS",
                   help="with -n > 1: timeout of every collective; a dead or failing rank ends the run "
                        "within it, named (default 120)")
    caps = bench_capabilities()
    b = sub.add_parser("bench", help="run benchmarks/bench_CAPABILITY.py (ours beside the baseline); extra "
                                     "arguments go to it",
                       description="Run benchmarks/bench_CAPABILITY.py from a source checkout: moecomm beside "
                                   "its baseline, in one process. `moecomm bench CAPABILITY --help` lists the "
                                   "benchmark's own options (every one takes --quick and --out FILE.jsonl).")
    b.add_argument("capability", nargs="?", default=None, metavar="CAPABILITY",
                   help=f"one of: {', '.join(caps)}" if caps else "the benchmark's name (benchmarks/ not found here)")
    b.add_argument("args", nargs=argparse.REMAINDER, help="passed to the benchmark, e.g. --quick --out results.jsonl")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "info":
        _print_table(info_rows())
        return 0
    if args.command == "demo":
        from .errors import MoeCommError

        if args.num_ranks < 1:
            print(f"moecomm demo: -n must be >= 1, got {args.num_ranks}", file=sys.stderr)
            return 2
        try:
            return demo_main(args)
        except MoeCommError as exc:  # a bad knob, a missing launcher: one line, no traceback
            print(str(exc) if str(exc).startswith("moecomm demo") else f"moecomm demo: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("moecomm demo: interrupted", file=sys.stderr)
            return 130
    return bench_main(args.capability, args.args)


if __name__ == "__main__":
    sys.exit(main())
