"""What CustomAllReduce (one rank per process) and VirtualAllReduce (W ranks in one process) share:
argument checks, staging, the error words and the timeout error.

Shape legend: W = world_size, R = ranks this process drives (1, or W virtual), n = elements per rank.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import torch

from .. import _env
from ..distributed.symmetric import SymmetricBuffer
from ..errors import MoeCommError, MoeCommTypeError, MoeCommValueError
from . import layout

DTYPES = (torch.bfloat16, torch.float16, torch.float32)


class AllReduceTimeoutError(MoeCommError, RuntimeError):
    """A rank did not arrive at an IPC all-reduce's barrier within the timeout (the message names it).

    The buffers are then poisoned (every later kernel on them exits at once): close the all-reduce
    and make a new one, typically after the job restarted the missing rank.
    """


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def check_sizes(op: str, max_size: Any, oneshot_max_bytes: Any, timeout_s: Any, max_blocks: Any) -> tuple[int, int | None, float, int | None]:
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 16 or max_size % 16:
        raise MoeCommValueError(f"{op}: max_size must be an int >= 16 and a multiple of 16 (bytes per rank), got "
                                f"{max_size!r}")
    if oneshot_max_bytes is not None and (isinstance(oneshot_max_bytes, bool) or not isinstance(oneshot_max_bytes, int)
                                          or oneshot_max_bytes < 0):
        raise MoeCommValueError(f"{op}: oneshot_max_bytes must be None or an int >= 0, got {oneshot_max_bytes!r}")
    if timeout_s is None:
        timeout_s = _env.timeout_s()
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
        raise MoeCommValueError(f"{op}: timeout_s must be a number of seconds > 0, got {timeout_s!r}")
    if max_blocks is not None and (isinstance(max_blocks, bool) or not isinstance(max_blocks, int)
                                   or not 1 <= max_blocks <= layout.MAX_BLOCKS):
        raise MoeCommValueError(f"{op}: max_blocks must be None or an int in [1, {layout.MAX_BLOCKS}], got {max_blocks!r}")
    return max_size, oneshot_max_bytes, float(timeout_s), max_blocks


def check_input(op: str, name: str, x: Any, device: torch.device, max_size: int | None) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise MoeCommTypeError(f"{op}: {name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in DTYPES:
        raise MoeCommTypeError(f"{op}: {name} must have dtype bfloat16, float16 or float32, got {dtype_name(x.dtype)}")
    if x.device != device:
        raise MoeCommValueError(f"{op}: {name} must be on {device} (the all-reduce's device), got {x.device}")
    if max_size is not None and x.numel() * x.element_size() > max_size:
        raise MoeCommValueError(f"{op}: {name} must hold at most max_size = {max_size} bytes per rank, got "
                                f"{x.numel() * x.element_size()} bytes (shape {tuple(x.shape)}, {dtype_name(x.dtype)})")
    return x


def timeout_message(op: str, err_rows: list[list[int]], ranks: list[int], timeout_s: float) -> str | None:
    """The error of the first rank whose error words are set, or None (err_rows[i] belongs to ranks[i])."""
    for rank, (missing, phase, block, seen_by) in zip(ranks, err_rows):
        if missing:
            ph = layout.PHASES[phase] if 0 <= phase < len(layout.PHASES) else f"phase {phase}"
            return (f"{op}: rank {missing - 1} did not arrive within the timeout of {timeout_s:g} s (the {ph} barrier, "
                    f"seen by rank {seen_by} in block {block}); this all-reduce's buffers are unusable now: close it "
                    "and make a new one")
    return None


class Engine:
    """The state of R ranks' views: peer pointers, staging, error words, timeouts, block cap."""

    def __init__(self, bufs: list[SymmetricBuffer], *, max_size: int, oneshot_max: int, timeout_s: float,
                 max_blocks: int, op: str):
        self.bufs, self.op = bufs, op
        self.world_size, self.device = bufs[0].world_size, bufs[0].device
        self.ranks = [b.rank for b in bufs]
        self.max_size, self.oneshot_max, self.timeout_s, self.max_blocks = max_size, oneshot_max, timeout_s, max_blocks
        self.timeout_ns = int(timeout_s * 1e9)
        self.peer_ptrs = bufs[0].peer_ptrs
        self.err = torch.zeros(len(bufs) * layout.ERR_WORDS, dtype=torch.int32, device=self.device)
        self.staging = [b.local[layout.HEADER_BYTES:layout.HEADER_BYTES + max_size] for b in bufs]
        self.capturing, self.register = 0, False
        self.pending: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
        # the registered calls' pointer tables: graph-pool memory the captured kernels read at every
        # replay, so it must never return to the pool while this object lives
        self.tables: list[torch.Tensor] = []

    def algo(self, nbytes: int) -> layout.Algo:
        return layout.choose_algo(nbytes, self.oneshot_max, self.max_size)

    def alive(self) -> None:
        """Raise if closed (the staging views would point at freed memory)."""
        if self.staging is None:
            raise MoeCommError(f"{self.op}: used after close()")

    def stage(self, i: int, x: torch.Tensor) -> None:
        """Copy rank i's input into its staging (on the current stream, before the kernel)."""
        self.alive()
        n = x.numel()
        self.staging[i][:n * x.element_size()].view(x.dtype).view(x.shape).copy_(x)

    def check(self) -> None:
        """Raise AllReduceTimeoutError if a kernel timed out (reads the error words: a device sync)."""
        rows = self.err.view(len(self.bufs), layout.ERR_WORDS).cpu().tolist()
        msg = timeout_message(self.op, rows, self.ranks, self.timeout_s)
        if msg:
            raise AllReduceTimeoutError(msg)

    @contextlib.contextmanager
    def capture(self, register: bool, fill: Callable[[list[tuple[torch.Tensor, list[torch.Tensor]]]], None]
                ) -> Iterator[None]:
        """The capture context of both front ends (their docstrings say how to use it).

        register=True: one-shot calls captured while it is open read the ranks' inputs in place
        (table_for); at exit, after the graph capture ended, ``fill`` writes every call's table of
        input pointers. register=False: the staging copies are captured with the kernels."""
        if self.capturing:
            raise MoeCommValueError(f"{self.op}.capture(): capture() does not nest, got a second one inside the first")
        self.alive()
        self.capturing, self.register, self.pending = 1, register, []
        try:
            yield
        finally:
            self.capturing = 0
        pending, self.pending = self.pending, []
        if pending:
            if torch.cuda.is_current_stream_capturing():
                raise MoeCommValueError(
                    f"{self.op}.capture(): with register=True it must enclose the graph capture "
                    "(with ar.capture(), torch.cuda.graph(g): ...), so that the inputs are registered after the "
                    f"capture ended; got capture() closed inside a running capture ({len(pending)} calls to register)")
            fill(pending)

    def table_for(self, xs: list[torch.Tensor]) -> torch.Tensor | None:
        """During a registering capture: a [W] int64 table (graph memory, filled at the capture's end)
        through which the one-shot kernel reads the inputs in place; else None (stage them)."""
        if not (self.capturing and self.register and torch.cuda.is_current_stream_capturing()):
            return None
        if not all(x.is_contiguous() and x.data_ptr() % 16 == 0 for x in xs):
            return None
        table = torch.empty(self.world_size, dtype=torch.int64, device=self.device)
        self.pending.append((table, list(xs)))
        self.tables.append(table)
        return table

    def close(self) -> None:
        self.staging = None
        for b in self.bufs:
            b.close()
