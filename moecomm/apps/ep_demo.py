"""`moecomm demo -n N --launcher L`: the expert-parallel MoE forward on N ranks, checked and timed.

# T = tokens_per_rank, H = hidden, I = intermediate, E = num_experts, k = top_k, W = world size

Every rank builds the FULL layer from the same seed (so every rank holds the single-process truth),
then the expert-parallel layer over the world with its shard of those weights (placement's local
experts). Each rank feeds its own T tokens through the EP layer and compares with the full layer's
reference_forward on the same tokens. The phases of the forward (route, dispatch, experts, combine)
are timed one by one, with a device sync between them so each phase is charged its own time
(under gloo, dispatch also absorbs the wait for the slowest rank: that is what a rank experiences).

Launchers: "local" (run_distributed: torch.multiprocessing), "torchrun"
(python -m torch.distributed.run), "mpirun" (the mpiexec of the MPI library mpi4py loads, see
find_mpiexec; MPICH or Open MPI), "ray" (RayWorkerGroup).
Under torchrun and mpirun this module is the per-rank program: ``python -m moecomm.apps.ep_demo ...``.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import shutil
import sys
import tempfile
import time
from dataclasses import dataclass

import torch

from ..errors import MoeCommValueError, UnsupportedHardwareError, check_choice, check_positive_int
from .mpiexec import MpiexecChoice, find_mpiexec, mpirun_command  # noqa: F401  (re-exported)

LAUNCHERS = ("local", "torchrun", "mpirun", "ray")
_LAST_RANK = -1  # this process's rank in its last run_rank(): under torchrun/mpiexec rank 0 prints
# max |y - ref| / (atol + rtol |ref|) must stay <= 1. fp32: both paths accumulate in fp32 and differ
# only in summation order over H = 1024 terms (~sqrt(H) * 2^-24 relative, << 1e-4). bf16/fp16:
# the EP path rounds the [R, I] intermediate and the output to 8 (bf16) / 11 (fp16) mantissa bits
# while the reference keeps fp32 until the end: a few units of 2^-8 (bf16) / 2^-11 (fp16).
TOLERANCES = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (3e-2, 3e-2), torch.float16: (5e-3, 5e-3)}


@dataclass(frozen=True)
class DemoConfig:
    """One demo run's shape and settings (picklable: it travels to every rank)."""

    tokens_per_rank: int = 512
    hidden: int = 1024
    num_experts: int = 8
    top_k: int = 2
    intermediate: int = 1024
    iters: int = 3
    seed: int = 0
    dtype: str = "auto"
    timeout_s: float = 120.0
    verbose: bool = True
    launched_at: float = 0.0  # the driver's time.time() at launch, so progress shows time since then
    launcher: str = ""  # the launcher the user chose (its name in the output); "": what init() detected


def _say(rank: int, cfg: DemoConfig, msg: str) -> None:
    if cfg.verbose and rank == 0:
        since = f" +{time.time() - cfg.launched_at:.1f} s" if cfg.launched_at else ""
        print(f"[demo{since}] {msg}", flush=True)


def _bytes_sent(topk_ids: torch.Tensor, expert_to_rank: torch.Tensor, rank: int, world_size: int,
                row_bytes: int) -> int:
    """Token bytes this rank sends in dispatch: one row per (token, remote rank holding >= 1 of its
    experts): a token whose k experts share a rank travels there once. Combine sends as many back."""
    if topk_ids.numel() == 0:
        return 0
    dest = expert_to_rank[topk_ids.long()].long()  # [T, k]
    hit = torch.zeros(topk_ids.shape[0], world_size, dtype=torch.bool, device=topk_ids.device)
    hit.scatter_(1, dest, True)  # [T, W]
    hit[:, rank] = False
    return int(hit.sum().item()) * row_bytes  # set-up statistic: the host sync is fine here


def run_rank(cfg: DemoConfig) -> list[dict]:
    """The per-rank program: join the world, build, check, time. Returns every rank's stats.

    Args:
        cfg: the run's settings; identical on every rank.

    Returns:
        [W] dicts, one per rank (all_gather_object): rank, tokens, route/dispatch/experts/combine/
        total ms (median over cfg.iters), bytes_sent, max_err, ok, startup_s.
    """
    import torch.distributed as dist

    from ..distributed import current_world, health, init, new_ep_groups, shutdown
    from ..gemm import expert_mlp
    from ..layer import MoE

    t0 = time.perf_counter()
    owns_world = current_world() is None  # under RayWorkerGroup the world outlives this call
    world = init(timeout_s=cfg.timeout_s)
    try:
        rank, W, dev = world.rank, world.world_size, world.device
        global _LAST_RANK
        _LAST_RANK = rank
        if dev.type == "cpu":
            # W processes share the host's cores: oversubscribed threads make gloo ranks crawl
            torch.set_num_threads(max(1, (os.cpu_count() or 1) // max(1, world.local_world_size)))
        launcher = cfg.launcher or world.launcher
        _say(rank, cfg, f"{W} ranks joined ({world.backend}, {dev.type}, launcher {launcher}) "
                        f"in {time.perf_counter() - t0:.1f} s")
        ep_group = new_ep_groups(world, W)
        dtype = {"auto": torch.bfloat16 if dev.type == "cuda" else torch.float32, "float32": torch.float32,
                 "bfloat16": torch.bfloat16, "float16": torch.float16}[cfg.dtype]
        H, I, E, k = cfg.hidden, cfg.intermediate, cfg.num_experts, cfg.top_k
        torch.manual_seed(cfg.seed)
        full = MoE(H, I, E, k, dtype=dtype, device=dev)  # the same weights on every rank: same seed
        ep = MoE(H, I, E, k, dtype=dtype, device=dev, ep_group=ep_group if W > 1 else None)
        ids = torch.tensor(ep.local_expert_ids, dtype=torch.long, device=dev)
        with torch.no_grad():
            ep.gate.weight.copy_(full.gate.weight)
            ep.w_gate_up.copy_(full.w_gate_up[ids])
            ep.w_down.copy_(full.w_down[ids])
        g = torch.Generator().manual_seed(cfg.seed + 1 + rank)  # each rank its own tokens
        x = torch.randn(cfg.tokens_per_rank, H, generator=g).to(dtype=dtype, device=dev)  # [T, H]
        startup_s = time.perf_counter() - t0
        _say(rank, cfg, f"layer built (E={E}, local {ep.num_local_experts}/rank, H={H}, I={I}, {dtype}); "
                        f"running 1 checked + {cfg.iters} timed forwards")

        def sync() -> float:
            if dev.type == "cuda":
                torch.cuda.synchronize(dev)
            return time.perf_counter()

        def phased() -> tuple[torch.Tensor, list[float], torch.Tensor]:
            t = [sync()]
            r = ep.route(x)
            t.append(sync())
            with health.watch(ep_group, "demo: dispatch"):
                d = ep.dispatcher.dispatch(x, r.topk_ids, r.topk_weights)
            t.append(sync())
            # validate=False: the groups come from dispatch, and in static-capacity mode (decode
            # sizes) the rows after expert_offsets[L] are padding that the GEMMs skip
            h = expert_mlp(d.tokens, ep.w_gate_up, ep.w_down, d.expert_offsets, layout="enk",
                           activation=ep.activation, gather_idx=d.gather_idx, row_scale=d.row_weights,
                           validate=False)
            t.append(sync())
            with health.watch(ep_group, "demo: combine"):
                y = ep.dispatcher.combine(h, d.handle)
            t.append(sync())
            return y, [(b - a) * 1e3 for a, b in zip(t, t[1:])], r.topk_ids

        with torch.no_grad():
            # the public forward, checked below, doubles as the warm-up (first-call allocations)
            with health.watch(ep_group, "demo: MoE.forward"):
                y = ep(x)
            runs = [phased() for _ in range(cfg.iters)]
            y_phased, _, topk_ids = runs[-1]
            _say(rank, cfg, "timed forwards done; checking against the single-process reference")
            ref = full.reference_forward(x)
        atol, rtol = TOLERANCES[dtype]
        err = (y.float() - ref.float()).abs()
        max_err = float(err.max()) if err.numel() else 0.0
        # the phase-by-phase path must be the layer's forward, or its timings would describe another op
        ok = bool(torch.all(err <= atol + rtol * ref.float().abs())) and bool(torch.equal(y, y_phased))
        phases = list(zip(*[r[1] for r in runs]))  # 4 x iters
        med = [sorted(p)[len(p) // 2] for p in phases]
        e2r = ep.placement.expert_to_rank_tensor(dev)
        stats = dict(rank=rank, tokens=cfg.tokens_per_rank, route_ms=med[0], dispatch_ms=med[1],
                     experts_ms=med[2], combine_ms=med[3], total_ms=sum(med),
                     bytes_sent=_bytes_sent(topk_ids, e2r, rank, W, H * x.element_size()),
                     max_err=max_err, ok=ok, startup_s=startup_s, backend=world.backend, device=dev.type,
                     launcher=launcher, dtype=str(dtype).replace("torch.", ""), world_size=W)
        _say(rank, cfg, "checked; gathering the results")
        everyone: list = [None] * W
        if W > 1:
            with health.watch(None, "demo: gathering the results"):
                dist.all_gather_object(everyone, stats)
        else:
            everyone = [stats]
        return everyone
    except Exception as exc:
        health.report_failure(exc)  # the other ranks' errors then name this rank and its reason
        raise
    finally:
        if owns_world:
            shutdown()


def format_table(stats: list[dict], cfg: DemoConfig, launcher: str | None = None) -> str:
    """The demo's result table: one row per rank and a total row.

    Args:
        stats: [W] dicts from run_rank.
        cfg: the run's settings (for the title).
        launcher: the name to show; default what the ranks report (the launcher chosen in main()).
    """
    s0 = stats[0]
    lines = [
        f"moecomm demo: {s0['world_size']} ranks ({s0['backend']}, {s0['device']}, launcher {launcher or s0['launcher']}), "
        f"{cfg.tokens_per_rank} tokens/rank, hidden {cfg.hidden}, {cfg.num_experts} experts, top-{cfg.top_k}, "
        f"intermediate {cfg.intermediate}, {s0['dtype']}; median of {cfg.iters} forwards",
        f"{'rank':>4} {'tokens':>6} {'route ms':>9} {'dispatch ms':>11} {'experts ms':>10} {'combine ms':>10} "
        f"{'total ms':>9} {'tokens/s':>10} {'MB sent':>8} {'max err':>9}  check",
    ]
    for s in stats:
        lines.append(
            f"{s['rank']:>4} {s['tokens']:>6} {s['route_ms']:>9.2f} {s['dispatch_ms']:>11.2f} {s['experts_ms']:>10.2f} "
            f"{s['combine_ms']:>10.2f} {s['total_ms']:>9.2f} {s['tokens'] / (s['total_ms'] / 1e3):>10.0f} "
            f"{s['bytes_sent'] / 1e6:>8.2f} {s['max_err']:>9.2e}  {'ok' if s['ok'] else 'MISMATCH'}")
    total_tokens = sum(s["tokens"] for s in stats)
    slowest = max(s["total_ms"] for s in stats)  # a step lasts as long as its slowest rank
    lines.append(f"{'all':>4} {total_tokens:>6} {'':>9} {'':>11} {'':>10} {'':>10} {slowest:>9.2f} "
                 f"{total_tokens / (slowest / 1e3):>10.0f} {sum(s['bytes_sent'] for s in stats) / 1e6:>8.2f}")
    lines.append("MB sent: token rows this rank sends in dispatch (combine sends as many back); "
                 "a token goes once to each remote rank holding any of its experts.")
    return "\n".join(lines)


def _cli_args(cfg: DemoConfig) -> list[str]:
    return [f"--tokens-per-rank={cfg.tokens_per_rank}", f"--hidden={cfg.hidden}", f"--num-experts={cfg.num_experts}",
            f"--top-k={cfg.top_k}", f"--intermediate={cfg.intermediate}", f"--iters={cfg.iters}",
            f"--seed={cfg.seed}", f"--dtype={cfg.dtype}", f"--timeout-s={cfg.timeout_s}",
            f"--launched-at={cfg.launched_at}"] + \
        ([f"--launcher={cfg.launcher}"] if cfg.launcher else []) + ([] if cfg.verbose else ["--quiet"])


def _subprocess_env() -> dict[str, str]:
    env = dict(os.environ)
    # ranks must import this very moecomm, installed or not
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    return env


def default_num_experts(n: int) -> int:
    """The demo's number of experts on n ranks: 8, or n when there are more ranks (one expert each)."""
    return max(8, n)


def main(n: int, launcher: str = "local", tokens_per_rank: int = 512, hidden: int = 1024,
         num_experts: int | None = None, top_k: int = 2, *, intermediate: int = 1024, iters: int = 3, seed: int = 0,
         dtype: str = "auto", timeout_s: float = 120.0, verbose: bool = True) -> bool:
    """Run the expert-parallel MoE forward on ``n`` ranks, check it, print the table; True if all match.

    Args:
        n: number of ranks (the EP size): each holds num_experts / n experts (uneven split allowed;
            with more ranks than experts some hold none: they route, send and combine).
        launcher: "local" (torch.multiprocessing), "torchrun", "mpirun" (mpiexec) or "ray".
        tokens_per_rank: T, tokens each rank routes.
        hidden: H; num_experts: E (default default_num_experts(n): 8, or n if larger); top_k: k;
            intermediate: I, each expert's MLP width.
        iters: timed forwards (after one warm-up); the table shows their median.
        seed: weights from ``seed`` on every rank; rank r's tokens from ``seed + 1 + r``.
        dtype: "auto" (bf16 on GPUs, fp32 on CPUs), "float32", "bfloat16" or "float16".
        timeout_s: collective timeout; a dead or failing rank ends the run within it, named.
        verbose: print progress while ranks start and run.

    Returns:
        True when every rank matched the reference. A failed run prints one line per failure (the
        failing rank's error; one line for the ranks that stopped because of it) and returns False;
        Ctrl-C stops every rank and raises KeyboardInterrupt.

    Raises:
        MoeCommValueError for a bad argument; MoeCommError (UnsupportedHardwareError) when the
        launcher is missing (no mpiexec, Ray not installed), before any rank starts.

    Example:
        moecomm.apps.ep_demo.main(4, "local", tokens_per_rank=512)   # = moecomm demo -n 4
    """
    op = "moecomm demo"
    check_positive_int(op, "n", n)
    check_choice(op, "launcher", launcher, LAUNCHERS)
    if num_experts is None:
        num_experts = default_num_experts(n)
    for name, v in dict(tokens_per_rank=tokens_per_rank, hidden=hidden, num_experts=num_experts, top_k=top_k,
                        intermediate=intermediate, iters=iters).items():
        check_positive_int(op, name, v)
    if top_k > num_experts:
        raise MoeCommValueError(f"{op}: top_k must be <= num_experts ({num_experts}), got {top_k}")
    check_choice(op, "dtype", dtype, ("auto", "float32", "bfloat16", "float16"))
    if not (isinstance(timeout_s, (int, float)) and not isinstance(timeout_s, bool) and timeout_s > 0):
        raise MoeCommValueError(f"{op}: timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    cfg = DemoConfig(tokens_per_rank, hidden, num_experts, top_k, intermediate, iters, seed, dtype,
                     float(timeout_s), verbose, time.time(), launcher)
    t0 = time.perf_counter()
    if launcher == "mpirun":
        choice = find_mpiexec()  # a missing mpiexec is an error now, before anything starts
    elif launcher == "ray" and importlib.util.find_spec("ray") is None:
        raise UnsupportedHardwareError(f"{op}: launcher 'ray' needs Ray, which is not installed (pip install ray)")
    if verbose:
        print(f"[demo] starting {n} ranks with launcher {launcher}", flush=True)
    if launcher in ("torchrun", "mpirun"):
        return _run_launcher(n, launcher, cfg, choice if launcher == "mpirun" else None, t0)
    if launcher == "local":
        from ..testing import DistributedTestError, run_distributed

        from ..distributed import current_world

        # a CPU-only torch: fork the ranks from a parent that has already paid the imports (torch's
        # custom ops import torch._dynamo on first call: ~2 s of CPU per rank on a small machine).
        # CUDA builds spawn: a CUDA context does not survive fork.
        fork = torch.version.cuda is None and getattr(torch.version, "hip", None) is None and current_world() is None
        if fork:
            importlib.import_module("torch._dynamo")
            from .. import layer  # noqa: F401
            from ..ep import nccl  # noqa: F401
        try:
            stats = run_distributed(n, run_rank, cfg, backend=None, timeout_s=timeout_s + 60,
                                    start_method="fork" if fork else "spawn")[0]
        except DistributedTestError as exc:
            for line in failure_lines(exc.failures):
                print(f"[demo] {line}", file=sys.stderr, flush=True)
            return False
    else:
        from .ray import RayWorkerGroup

        with RayWorkerGroup(n) as group:
            if verbose:
                print(f"[demo] {n} Ray workers up in {time.perf_counter() - t0:.1f} s", flush=True)
            try:
                stats = group.run(run_rank, cfg)[0]
            except Exception as exc:  # Ray's RayTaskError: the first failing worker's error, inside
                cause = getattr(exc, "cause", None) or exc
                print(f"[demo] a Ray worker failed: {_first_line(cause)}", file=sys.stderr, flush=True)
                return False
    print(format_table(stats, cfg, launcher), flush=True)
    ok = all(s["ok"] for s in stats)
    if verbose:
        print(f"[demo] {'all ranks match the reference' if ok else 'MISMATCH against the reference'}; "
              f"done in {time.perf_counter() - t0:.1f} s", flush=True)
    return ok


def _run_launcher(n: int, launcher: str, cfg: DemoConfig, choice: MpiexecChoice | None, t0: float) -> bool:
    """torchrun / mpirun: this module is each rank's program; rank 0 prints the table."""
    from .launch import INTERRUPTED, run_job, torchrun_command

    program = ["-m", "moecomm.apps.ep_demo", *_cli_args(cfg)]
    env = _subprocess_env()
    # n ranks share this host's cores (torchrun warns and sets 1 when this is unset)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // n)))
    scratch = tempfile.mkdtemp(prefix="moecomm-demo-")  # torchrun's log folder: removed below
    try:
        if launcher == "torchrun":
            cmd = torchrun_command(n, program, scratch)
        else:
            print(f"[demo] mpirun launcher: {choice.path} ({choice.reason})", flush=True)
            cmd = mpirun_command(n, [sys.executable, *program], choice.path)
        # a hard bound on top of the collectives' timeout, so nothing hangs
        rc = run_job(cmd, env, timeout_s=cfg.timeout_s + 120, launcher=launcher)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    if rc == INTERRUPTED:
        raise KeyboardInterrupt
    if cfg.verbose:
        print(f"[demo] done in {time.perf_counter() - t0:.1f} s (exit code {rc})", flush=True)
    return rc == 0


def _rank_main(argv: list[str] | None = None) -> int:
    """Entry point of one rank under torchrun / mpiexec: ``python -m moecomm.apps.ep_demo [flags]``."""
    p = argparse.ArgumentParser(prog="python -m moecomm.apps.ep_demo", description=__doc__.splitlines()[0])
    d = DemoConfig()
    p.add_argument("--tokens-per-rank", type=int, default=d.tokens_per_rank)
    p.add_argument("--hidden", type=int, default=d.hidden)
    p.add_argument("--num-experts", type=int, default=d.num_experts)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--intermediate", type=int, default=d.intermediate)
    p.add_argument("--iters", type=int, default=d.iters)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--dtype", default=d.dtype, choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--timeout-s", type=float, default=d.timeout_s)
    p.add_argument("--quiet", action="store_true")
    p.add_argument("--launched-at", type=float, default=0.0, help=argparse.SUPPRESS)  # progress: time since launch
    p.add_argument("--launcher", default="", help=argparse.SUPPRESS)  # the name `moecomm demo --launcher` shows
    a = p.parse_args(argv)
    cfg = DemoConfig(a.tokens_per_rank, a.hidden, a.num_experts, a.top_k, a.intermediate, a.iters, a.seed, a.dtype,
                     a.timeout_s, not a.quiet, a.launched_at, a.launcher)
    try:
        stats = run_rank(cfg)
    except KeyboardInterrupt:
        return 130  # the launcher was interrupted too and says so: no traceback per rank
    except Exception as exc:  # one line per failing rank; the launcher's driver reports the job
        rank = os.environ.get("RANK", os.environ.get("PMI_RANK", "?"))
        print(f"[demo] rank {rank} failed: {_first_line(exc)}", file=sys.stderr, flush=True)
        return 1
    if _LAST_RANK == 0:
        print(format_table(stats, cfg), flush=True)
    return 0 if all(s["ok"] for s in stats) else 1


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0] if text else ''}"


def _ranks(ranks: list[int]) -> str:
    """[0, 1, 2, 3, 5] -> "0-3, 5"."""
    out, start = [], None
    for i, r in enumerate(ranks):
        if start is None:
            start = r
        if i + 1 == len(ranks) or ranks[i + 1] != r + 1:
            out.append(str(start) if start == r else f"{start}-{r}")
            start = None
    return ", ".join(out)


def failure_lines(failures: dict[int, str]) -> list[str]:
    """One line per failure of a run: each rank's own error, and one line for the ranks that only
    stopped because of another (their RankFailureError names it), instead of N tracebacks.

    Args:
        failures: rank -> its error text ("Type: message" then its traceback), as run_distributed gives.
    """
    first = {r: (t.strip().splitlines() or ["unknown error"])[0] for r, t in failures.items()}
    causes = sorted(r for r, line in first.items() if not line.startswith("RankFailureError"))
    lines = [f"rank {r} failed: {first[r]}" for r in (causes or sorted(first))]
    followers = sorted(set(first) - set(causes)) if causes else []
    if followers:
        lines.append(f"rank{'s' if len(followers) > 1 else ''} {_ranks(followers)} stopped because "
                     f"rank{'s' if len(causes) > 1 else ''} {_ranks(causes)} failed (RankFailureError)")
    return lines


def run_on_group(group, tokens_per_rank: int = 512, hidden: int = 1024, num_experts: int = 8, top_k: int = 2, *,
                 intermediate: int = 1024, iters: int = 3, seed: int = 0, dtype: str = "auto",
                 verbose: bool = False) -> list[dict]:
    """Run the expert-parallel MoE layer on every worker of a RayWorkerGroup, checked against the reference.

    Same settings as main(). Returns [W] dicts (rank, route/dispatch/experts/combine/total ms,
    bytes_sent, max_err, ok, ...); ``all(s["ok"] for s in stats)`` is the check.

    Example:
        with RayWorkerGroup(4) as group:
            stats = run_on_group(group, tokens_per_rank=512)
    """
    cfg = DemoConfig(tokens_per_rank, hidden, num_experts, top_k, intermediate, iters, seed, dtype,
                     float(group.timeout_s or 120.0), verbose)
    return group.run(run_rank, cfg)[0]


__all__ = ["DemoConfig", "MpiexecChoice", "default_num_experts", "failure_lines", "find_mpiexec", "format_table", "main",
           "mpirun_command", "run_on_group", "run_rank"]

if __name__ == "__main__":
    sys.exit(_rank_main())
