"""CustomAllReduce: the all-reduce of one node over symmetric IPC buffers, vLLM-like.

    ar = CustomAllReduce(group, max_size=8 << 20)          # collective; once per group
    y = ar.all_reduce(x)                                    # one-shot / two-shot / NCCL by size
    out, residual = ar.all_reduce_residual_rmsnorm(x, residual, weight, eps=1e-6)
    with ar.capture(), torch.cuda.graph(g):
        y = ar.all_reduce(x_static)                         # reads x_static in place at replay
    ar.check()                                              # raises if a peer never arrived
    ar.close()

Shape legend: W = world_size, n = elements per rank.

Paths (moecomm/allreduce/layout.py: thresholds and why): one-shot up to oneshot_max_bytes, two-shot
up to max_size, torch.distributed.all_reduce (NCCL) above, and NCCL for everything when the group
is not eligible (moecomm.distributed.symmetric.eligibility: one node, a GPU per rank, peer access,
a real probe), which is logged once with the reason. ``path_for(nbytes)`` says which path a size
takes; ``ipc`` whether the IPC buffers are in use.

Results: IPC paths add in rank order in fp32 and round once, so every rank gets bit-identical output
(and the same bits as the virtual-rank tests); NCCL's order is its own.

Eager calls: the kernel itself first copies the input into the rank's pre-registered staging buffer
(n bytes read and written inside the one launch; a separate copy kernel cost a launch), then
signals the peers; a non-contiguous or misaligned input is copied by the host first. CUDA graphs (``capture()``): one-shot calls read the graph's own input buffers,
registered over IPC when the capture ends (vLLM's register_graph_buffers), so replays copy nothing;
``capture(register=False)`` captures the staging copy instead.

torch.compile(fullgraph=True): all_reduce and all_reduce_residual_rmsnorm check their arguments, then
call one custom op each (moecomm/allreduce/ops.py: the object found by an int handle, every path, NCCL's
included, inside the op); eager calls run the same code without the dispatcher.

Errors: a barrier waits at most timeout_s (MOECOMM_TIMEOUT_S by default); on timeout the kernel
writes which rank did not arrive into a device error word and exits; ``check()`` (a device sync, at
a point the caller chooses) raises AllReduceTimeoutError naming the op and the rank.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist

from ..distributed.agreement import check_agreement
from ..distributed.symmetric import (Eligibility, close_allocation, eligibility, export_allocation, open_allocation,
                                     open_symmetric)
from ..errors import MoeCommError, MoeCommValueError
from . import _ipc, layout
from . import ops as _ops
from .engine import Engine, check_input, check_sizes
from .layout import Algo
from .reference import residual_rmsnorm_reference

log = logging.getLogger("moecomm")


class CustomAllReduce:
    """The IPC all-reduce over the ranks of ``group`` (one GPU per rank, one node). Collective to build.

    Args:
        group: the process group (default: the world); gloo or NCCL (NCCL for the fallback path).
        max_size: the largest input in bytes per rank taking an IPC path (the staging size; a
            multiple of 16; default 8 MB); larger inputs go to NCCL.
        device: this rank's CUDA device (default: the current one).
        oneshot_max_bytes: one-shot up to this many bytes per rank (default: layout.default_oneshot_max(W),
            MOECOMM_ALLREDUCE_ONESHOT_BYTES when set).
        timeout_s: how long a barrier waits for a peer (default MOECOMM_TIMEOUT_S).
        max_blocks: blocks per rank (default: the smallest SM count of the group's GPUs, capped at 256).
    """

    OP = "moecomm.allreduce.CustomAllReduce"

    def __init__(self, group: dist.ProcessGroup | None = None, *, max_size: int = layout.DEFAULT_MAX_SIZE,
                 device: Any = None, oneshot_max_bytes: int | None = None, timeout_s: float | None = None,
                 max_blocks: int | None = None):
        max_size, oneshot_max_bytes, timeout_s, max_blocks = check_sizes(self.OP, max_size, oneshot_max_bytes,
                                                                          timeout_s, max_blocks)
        if not dist.is_available() or not dist.is_initialized():
            raise MoeCommValueError(f"{self.OP}: needs an initialised process group (moecomm.distributed.init()), "
                                    "got none; for ranks in one process use VirtualAllReduce")
        self.group, self.max_size = group, max_size
        self.world_size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        if torch.cuda.is_available():
            dev = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
            dev = torch.device("cuda", torch.cuda.current_device()) if dev.index is None else dev
        else:
            dev = torch.device("cpu") if device is None else torch.device(device)
        self.device = dev
        self._handle = _ops.REGISTRY.add(self)  # what the custom ops find it by (torch.compile)
        self.eligibility: Eligibility = (eligibility(group, device=dev) if dev.type == "cuda"
                                         else Eligibility(False, f"the device is {dev}, not CUDA"))
        self._e: Engine | None = None
        self._opened: dict[bytes, tuple[int, int]] = {}  # a peer's graph-input allocation: (base here, rank)
        if self.eligibility.ok:
            sms = torch.cuda.get_device_properties(dev).multi_processor_count
            gathered: list[Any] = [None] * self.world_size
            dist.all_gather_object(gathered, sms, group=group)
            if max_blocks is None:  # the grid must be the same on every rank: the smallest GPU decides
                max_blocks = max(1, min(layout.MAX_BLOCKS, min(gathered)))
            oneshot = layout.default_oneshot_max(self.world_size) if oneshot_max_bytes is None else oneshot_max_bytes
            # every rank must pick the same path and grid for a call, or the barriers never match
            check_agreement(group, self.OP, max_size=max_size, oneshot_max_bytes=oneshot, max_blocks=max_blocks)
            buf = open_symmetric(layout.buffer_bytes(max_size), group, device=dev)
            self._e = Engine([buf], max_size=max_size, oneshot_max=oneshot, timeout_s=timeout_s,
                             max_blocks=max_blocks, op=self.OP)
        elif self.world_size > 1:
            log.info("%s: IPC paths off (%s); every call uses torch.distributed.all_reduce", self.OP,
                     self.eligibility.reason)

    @property
    def ipc(self) -> bool:
        """True when the IPC buffers are in use (the group is eligible and the buffer is open)."""
        return self._e is not None

    def path_for(self, nbytes: int) -> Algo:
        """The path of an input of ``nbytes`` per rank: Algo.ONESHOT, TWOSHOT or NCCL."""
        return self._e.algo(nbytes) if self._e is not None else Algo.NCCL

    def _nccl(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        res = x.clone() if out is None else out.copy_(x)
        dist.all_reduce(res, group=self.group)
        return res

    def all_reduce(self, x: torch.Tensor, out: torch.Tensor | None = None) -> torch.Tensor:
        """The sum over the group's ranks of ``x``, on every rank.

        Args:
            x: [*shape] bf16/fp16/fp32 on this rank's device (any strides).
            out: optional [*shape] of x's dtype on the device (may be x).

        Returns out (or a new tensor) with the sum: bit-identical on every rank on the IPC paths.
        """
        op = self.OP + ".all_reduce"
        check_input(op, "x", x, self.device, None)
        if out is not None:
            check_input(op, "out", out, self.device, None)
            if out.shape != x.shape or out.dtype != x.dtype:
                raise MoeCommValueError(f"{op}: out must have x's shape {list(x.shape)} and dtype {x.dtype}, got "
                                        f"{list(out.shape)} {out.dtype}")
        if torch.compiler.is_compiling():  # one opaque node (moecomm/allreduce/ops.py); eager skips the dispatcher
            y = _ops.ipc_all_reduce.op(x, self._handle)
            return y if out is None else out.copy_(y)
        return self._all_reduce_trusted(x, out)

    def _all_reduce_trusted(self, x: torch.Tensor, out: torch.Tensor | None) -> torch.Tensor:
        """all_reduce after its checks (x, out checked): the eager path and the custom op's body."""
        nbytes = x.numel() * x.element_size()
        algo = self.path_for(nbytes)
        if algo is Algo.NCCL:
            return self._nccl(x, out)
        e = self._e
        direct = out is not None and out.is_contiguous() and out.data_ptr() % 16 == 0
        dst = out if direct else torch.empty(x.shape, dtype=x.dtype, device=self.device)
        if x.numel() == 0:
            return dst if out is None else out
        table = e.table_for([x]) if algo is Algo.ONESHOT else None
        src = None
        if table is None:
            src = x if _ipc.stage_in_kernel(x, 0) else None
            if src is None:  # not contiguous and aligned: a host copy into the staging first
                e.stage(0, x)
        e.alive()
        _ipc.launch_allreduce(algo, e.peer_ptrs, self.world_size, self.rank, 1, dst, x.numel(), x.numel(), e.err,
                              e.timeout_ns, e.max_blocks, in_ptrs=table, stage_src=src)
        if out is not None and not direct:
            out.copy_(dst)
            return out
        return dst

    def all_reduce_residual_rmsnorm(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor,
                                    eps: float = 1e-6, *, residual_out: torch.Tensor | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """All-reduce of ``x``, plus ``residual``, then RMSNorm: the end of a tensor-parallel block.

        Args:
            x: [num_tokens, hidden] this rank's partial sum, bf16/fp16/fp32.
            residual: [num_tokens, hidden] the residual stream, x's dtype.
            weight: [hidden] RMSNorm's scale, x's dtype.
            eps: added to the mean square (> 0).
            residual_out: optional [num_tokens, hidden] for the new residual (may be ``residual``:
                in place).

        Returns (out, new_residual), both [num_tokens, hidden]: new_residual = all_reduce(x) +
        residual (rounded to the dtype), out = RMSNorm(new_residual) * weight. One fused kernel:
        one-shot up to oneshot_max_bytes, two-shot (each rank reduces and normalises its
        ceil(num_tokens / W) rows, then gathers the others') up to max_size while a shard has at
        most layout.MAX_NORM_ROWS rows; beyond, all_reduce then the reference's add and norm.
        The two-shot kernel adds each row's residual on the rank that owns the row: residual must
        be the same on every rank (replicated, as under tensor parallelism).
        """
        op = self.OP + ".all_reduce_residual_rmsnorm"
        check_input(op, "x", x, self.device, None)
        if x.dim() != 2:
            raise MoeCommValueError(f"{op}: x must be [num_tokens, hidden], got shape {list(x.shape)}")
        rows, hidden = x.shape
        for name, t, shape in (("residual", residual, (rows, hidden)), ("weight", weight, (hidden,)),
                               ("residual_out", residual_out, (rows, hidden))):
            if t is None:
                continue
            check_input(op, name, t, self.device, None)
            if tuple(t.shape) != shape or t.dtype != x.dtype:
                raise MoeCommValueError(f"{op}: {name} must be {list(shape)} {x.dtype}, got {list(t.shape)} {t.dtype}")
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise MoeCommValueError(f"{op}: eps must be a number > 0, got {eps!r}")
        if torch.compiler.is_compiling():  # one opaque node (moecomm/allreduce/ops.py)
            out, new_res = _ops.ipc_all_reduce_residual_rmsnorm.op(x, residual, weight, float(eps), self._handle)
            if residual_out is not None:
                new_res = residual_out.copy_(new_res)
            return out, new_res
        return self._rmsnorm_trusted(x, residual, weight, float(eps), residual_out)

    def _rmsnorm_trusted(self, x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                         residual_out: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
        """all_reduce_residual_rmsnorm after its checks: the eager path and the custom op's body."""
        rows, hidden = x.shape
        nbytes = x.numel() * x.element_size()
        algo = self.path_for(nbytes)
        if algo is Algo.NCCL or (algo is Algo.TWOSHOT and -(-rows // self.world_size) > layout.MAX_NORM_ROWS):
            out, new_res = residual_rmsnorm_reference(self._all_reduce_trusted(x, None), residual, weight, float(eps))
            if residual_out is not None:
                residual_out.copy_(new_res)
                new_res = residual_out
            return out, new_res
        e = self._e
        res_in = residual.contiguous()
        direct = residual_out is not None and residual_out.is_contiguous()
        res_out = residual_out if direct else torch.empty_like(res_in)
        out = torch.empty_like(res_in)
        if x.numel() == 0:
            return out, residual_out if residual_out is not None else res_out
        src = x if x.is_contiguous() else None  # the kernel copies x into the staging itself
        if src is None:
            e.stage(0, x)
        e.alive()
        _ipc.launch_rmsnorm(algo, e.peer_ptrs, self.world_size, self.rank, 1, src, res_in, res_out, out, rows * hidden,
                            weight.contiguous(), rows, hidden, float(eps), e.err, e.timeout_ns, e.max_blocks)
        if residual_out is not None and not direct:
            residual_out.copy_(res_out)
            res_out = residual_out
        return out, res_out

    @contextlib.contextmanager
    def capture(self, register: bool = True) -> Iterator[CustomAllReduce]:
        """CUDA-graph capture of the all-reduce calls. Collective at its exit when register=True.

        register=True (default): enclose the graph capture, ``with ar.capture(), torch.cuda.graph(g):``.
        One-shot calls on contiguous 16-byte-aligned inputs then read every rank's input in place:
        at exit (after the capture ended) each rank exports the allocations holding its captured
        inputs (cuMemGetAddressRange + cuIpcGetMemHandle), the handles and offsets are exchanged
        over the group, the peers' are opened once each, and every call's table of input pointers
        is written: replays copy nothing into staging. Every rank must capture the same calls.
        Other calls (two-shot, fused RMSNorm, misaligned inputs) capture their staging copy (inside
        their kernel when the input is contiguous and aligned). register=False: every call captures its staging copy (either nesting order works).
        On the NCCL path (not eligible, or above max_size) the captured call is NCCL's.
        """
        if self._e is None:
            yield self
            return
        with self._e.capture(register, self._register_inputs):
            yield self

    def _register_inputs(self, pending: list[tuple[torch.Tensor, list[torch.Tensor]]]) -> None:
        op = self.OP + ".capture"
        mine, err = [], None
        try:
            for _, (x,) in pending:
                mine.append(export_allocation(x.data_ptr(), self.device))
        except Exception as exc:  # reported through the exchange, so that no peer waits for us
            err = f"{type(exc).__name__}: {exc}"
        gathered: list[Any] = [None] * self.world_size
        dist.all_gather_object(gathered, (err, mine), group=self.group)
        problems = [f"rank {r}: {e}" for r, (e, _) in enumerate(gathered) if e]
        counts = {len(m) for _, m in gathered}
        if not problems and len(counts) > 1:
            problems.append("the ranks captured different numbers of registrable one-shot calls: "
                            + ", ".join(f"rank {r} {len(m)}" for r, (_, m) in enumerate(gathered)))
        if not problems:
            try:
                for k, (table, (x,)) in enumerate(pending):
                    ptrs = []
                    for r, (_, theirs) in enumerate(gathered):
                        if r == self.rank:
                            ptrs.append(x.data_ptr())
                            continue
                        handle, offset = theirs[k]
                        base = self._opened.get(handle)
                        if base is None:
                            base = self._opened[handle] = (open_allocation(handle, self.device, r), r)
                        ptrs.append(base[0] + offset)
                    table.copy_(torch.tensor(ptrs, dtype=torch.int64))
            except Exception as exc:
                err = f"{type(exc).__name__}: {exc}"
            outcome: list[Any] = [None] * self.world_size
            dist.all_gather_object(outcome, err, group=self.group)
            problems = [f"rank {r}: {e}" for r, e in enumerate(outcome) if e]
        if problems:
            raise MoeCommError(f"{op}: registering the graph's inputs over IPC failed ({'; '.join(problems)}); the "
                               "graph must not be replayed: capture again with capture(register=False), which "
                               "copies the inputs into the staging buffers inside the graph")

    def check(self) -> None:
        """Raise AllReduceTimeoutError if a barrier of an earlier call timed out (a device sync)."""
        if self._e is not None:
            self._e.check()

    def close(self) -> None:
        """Unmap the peers' buffers and free ours (collective: a barrier over the group). Idempotent."""
        _ops.REGISTRY.remove(self._handle)
        if self._e is not None:
            if self._opened:
                torch.cuda.synchronize(self.device)  # no kernel of ours still reads a peer's graph input
                for base, r in self._opened.values():
                    close_allocation(base, self.device, r)
                self._opened.clear()
            self._e.close()

    def __enter__(self) -> CustomAllReduce:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
