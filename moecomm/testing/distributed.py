"""run_distributed(): run a function on N local processes that form one process group.

Used by every multi-rank test and the local launcher. Each child gets torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT), so code inside may call
moecomm.distributed.init() as it would under torchrun. Never hangs: after ``timeout_s`` the survivors are
killed and the error names the ranks that failed or did not finish.
"""

from __future__ import annotations

import os
import queue
import socket
import time
import traceback
from collections.abc import Callable
from typing import Any

import torch.multiprocessing as mp

from ..errors import MoeCommError


class DistributedTestError(MoeCommError, RuntimeError):
    """One or more ranks of run_distributed() failed or timed out."""

    def __init__(self, message: str, failures: dict[int, str]):
        super().__init__(message)
        self.failures = failures


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _child(rank: int, world_size: int, port: int, fn, args, kwargs, init_group: str | None, env, results) -> None:
    os.environ.update(
        RANK=str(rank), WORLD_SIZE=str(world_size), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size),
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port),
    )
    os.environ.update(env or {})
    try:
        if init_group:
            import datetime

            import torch.distributed as dist

            dist.init_process_group(init_group, rank=rank, world_size=world_size, timeout=datetime.timedelta(seconds=60))
        out = fn(*args, **kwargs)
        results.put((rank, "ok", out))
    except BaseException as exc:  # report everything, KeyboardInterrupt included, to the parent
        results.put((rank, "error", f"{type(exc).__name__}: {exc}\n{traceback.format_exc()}"))
    finally:
        if init_group:
            import torch.distributed as dist

            if dist.is_initialized():
                dist.destroy_process_group()


def run_distributed(
    world_size: int,
    fn: Callable[..., Any],
    *args: Any,
    backend: str | None = "gloo",
    timeout_s: float = 120.0,
    env: dict[str, str] | None = None,
    start_method: str = "spawn",
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh processes; return each rank's result.

    Args:
        world_size: number of processes (ranks 0..world_size-1).
        fn: a picklable (module-level) function; it runs with the process group initialised
            (``backend``), or with only torchrun's environment set when backend is None.
        timeout_s: wall-clock bound on the whole run; ranks still running then are killed.
        env: extra environment variables for every rank.
        start_method: "spawn" (default: safe with CUDA and threads) or "fork" (CPU only: the ranks
            inherit the parent's imports instead of paying them once each).

    Raises:
        DistributedTestError naming every rank that raised (with its traceback) or did not finish.
    """
    if start_method not in ("spawn", "fork"):
        raise ValueError(f"run_distributed: start_method must be 'spawn' or 'fork', got {start_method!r}")
    ctx = mp.get_context(start_method)
    results = ctx.Queue()
    port = free_port()
    procs = [
        ctx.Process(target=_child, args=(r, world_size, port, fn, args, kwargs, backend, env, results), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    outs: dict[int, Any] = {}
    failures: dict[int, str] = {}
    deadline = time.monotonic() + timeout_s
    while len(outs) + len(failures) < world_size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            break
        try:
            rank, status, payload = results.get(timeout=min(remaining, 0.5))
        except queue.Empty:
            # a rank that died without reporting (killed, segfault) never will: record it now
            for r, p in enumerate(procs):
                if r not in outs and r not in failures and not p.is_alive() and p.exitcode not in (0, None):
                    try:  # its last words may still be in the queue
                        rank, status, payload = results.get(timeout=0.2)
                        (outs if status == "ok" else failures)[rank] = payload
                    except queue.Empty:
                        failures[r] = f"rank {r} exited with code {p.exitcode} without reporting"
            continue
        (outs if status == "ok" else failures)[rank] = payload
    for r in range(world_size):
        if r not in outs and r not in failures:
            failures[r] = f"rank {r} did not finish within {timeout_s:.0f} s"
    for p in procs:
        p.join(timeout=5 if not failures else 0.5)
        if p.is_alive():
            p.kill()
            p.join(timeout=5)
    if failures:
        detail = "\n".join(f"--- rank {r} ---\n{failures[r]}" for r in sorted(failures))
        raise DistributedTestError(
            f"run_distributed: ranks {sorted(failures)} of {world_size} failed:\n{detail}", failures
        )
    return [outs[r] for r in range(world_size)]
