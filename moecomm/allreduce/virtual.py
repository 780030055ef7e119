"""W virtual ranks of the IPC all-reduce in one process on one GPU: how its kernels are tested and timed.

    ar = VirtualAllReduce(world_size=8, max_size=8 << 20, device="cuda")
    out = ar.all_reduce(xs)          # xs [W, *shape]: rank r's input is xs[r]; out [W, *shape]
    ar.check()                       # raises AllReduceTimeoutError naming a rank that never arrived

Shape legend: W = world_size, n = elements per rank.

One launch covers all W ranks (grid (blocks, W), blockIdx.y = rank), with blocks <= SMs / W so
that every block of every rank is resident at once (a block spinning on a block that never gets an
SM would deadlock). The buffers come from moecomm.distributed.open_virtual (plain device pointers,
no IPC: one process), so the kernels, their barriers, epochs and timeouts run exactly as between
GPUs, only the memory is local.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from ..distributed.symmetric import open_virtual
from ..errors import MoeCommTypeError, MoeCommValueError
from . import _ipc, layout
from .engine import Engine, check_input, check_sizes
from .layout import Algo


class VirtualAllReduce:
    """The IPC all-reduce over W virtual ranks on one GPU (tests, benchmarks).

    Args:
        world_size: W, 1..32.
        max_size: the largest input in bytes per rank (the staging size), a multiple of 16.
        device: the CUDA device (default: the current one).
        oneshot_max_bytes: one-shot up to this many bytes per rank, two-shot above (default:
            layout.default_oneshot_max(W)).
        timeout_s: how long a barrier waits for a rank (default MOECOMM_TIMEOUT_S).
        max_blocks: blocks per rank (default SMs // W, the most that keeps all W ranks resident).
    """

    OP = "moecomm.allreduce.VirtualAllReduce"

    def __init__(self, world_size: int, *, max_size: int = layout.DEFAULT_MAX_SIZE, device: Any = None,
                 oneshot_max_bytes: int | None = None, timeout_s: float | None = None, max_blocks: int | None = None):
        max_size, oneshot_max_bytes, timeout_s, max_blocks = check_sizes(self.OP, max_size, oneshot_max_bytes,
                                                                          timeout_s, max_blocks)
        bufs = open_virtual(layout.buffer_bytes(max_size), world_size, device)
        dev = bufs[0].device
        sms = torch.cuda.get_device_properties(dev).multi_processor_count
        if max_blocks is None:
            max_blocks = max(1, min(layout.MAX_BLOCKS, sms // world_size))
        oneshot = layout.default_oneshot_max(world_size) if oneshot_max_bytes is None else oneshot_max_bytes
        self._e = Engine(bufs, max_size=max_size, oneshot_max=oneshot, timeout_s=timeout_s, max_blocks=max_blocks,
                         op=self.OP)
        self.world_size, self.device, self.max_size = world_size, dev, max_size

    @property
    def oneshot_max_bytes(self) -> int:
        return self._e.oneshot_max

    def algo_for(self, nbytes: int) -> Algo:
        """The path an input of ``nbytes`` per rank takes (NCCL above max_size: refused here)."""
        return self._e.algo(nbytes)

    def _inputs(self, op: str, name: str, xs: Any) -> list[torch.Tensor]:
        if isinstance(xs, torch.Tensor):
            if xs.dim() < 1 or xs.shape[0] != self.world_size:
                raise MoeCommValueError(f"{op}: {name} must have shape [world_size={self.world_size}, ...], got "
                                        f"{list(xs.shape)}")
            xs = list(xs.unbind(0))
        elif not isinstance(xs, Sequence) or len(xs) != self.world_size:
            raise MoeCommTypeError(f"{op}: {name} must be a tensor [W, ...] or a list of W = {self.world_size} tensors, "
                                   f"got {type(xs).__name__}")
        first = check_input(op, f"{name}[0]", xs[0], self.device, self.max_size)
        for r, x in enumerate(xs):
            check_input(op, f"{name}[{r}]", x, self.device, self.max_size)
            if x.shape != first.shape or x.dtype != first.dtype:
                raise MoeCommValueError(f"{op}: {name}[{r}] must match {name}[0] (shape {list(first.shape)}, "
                                        f"{first.dtype}), got shape {list(x.shape)}, {x.dtype}")
        return list(xs)

    @staticmethod
    def _stacked(xs: Any) -> tuple[torch.Tensor | None, int]:
        """(xs, rank stride in elements) when the kernel can stage it: one [W, ...] tensor whose rank
        slices are contiguous, start 16-byte aligned and lie a multiple of 16 bytes apart (a padded
        [W, stride][:, :n] view qualifies); else (None, 0): the host copies."""
        if not isinstance(xs, torch.Tensor) or xs.dim() < 2 or not xs[0].is_contiguous():
            return None, 0
        step = xs.stride(0)
        if xs.data_ptr() % 16 or (step * xs.element_size()) % 16 or step < xs[0].numel():
            return None, 0
        return xs, step

    def all_reduce(self, xs: Any, *, algo: Algo | None = None, launch_ranks: int | None = None) -> torch.Tensor:
        """Every virtual rank's all-reduce of the W inputs, in one launch.

        Args:
            xs: [W, *shape] (or a list of W tensors of one shape), bf16/fp16/fp32 on the device:
                rank r's input is xs[r]; at most max_size bytes per rank.
            algo: force Algo.ONESHOT or Algo.TWOSHOT (default: by size, layout.choose_algo).
            launch_ranks: tests: launch only ranks 0 .. launch_ranks - 1, so that the others never
                arrive (their barriers time out, check() names the first missing rank).

        Returns out [W, *shape]: out[r] is rank r's output (every row equal, bit for bit).
        One [W, *shape] tensor with contiguous, 16-byte-aligned rank slices (contiguous, or a padded
        [W, stride][:, :n] view) is copied into the staging by the kernel itself (one launch); a list,
        or another layout, by W host copies first.
        """
        op = self.OP + ".all_reduce"
        raw, xs = xs, self._inputs(op, "xs", xs)
        shape, dtype, n = xs[0].shape, xs[0].dtype, xs[0].numel()
        if algo is None:
            algo = self._e.algo(n * xs[0].element_size())
        if algo not in (Algo.ONESHOT, Algo.TWOSHOT):
            raise MoeCommValueError(f"{op}: algo must be Algo.ONESHOT or Algo.TWOSHOT, got {algo!r}")
        k = self.world_size if launch_ranks is None else launch_ranks
        if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= self.world_size:
            raise MoeCommValueError(f"{op}: launch_ranks must be None or an int in [1, {self.world_size}], got {k!r}")
        pack = layout.pack_elems(xs[0].element_size())
        stride = -(-n // pack) * pack  # every rank's output row starts 16-byte aligned
        store = torch.empty(self.world_size, max(stride, 1), dtype=dtype, device=self.device)
        out = store[:, :n].view(self.world_size, *shape)
        if n == 0:
            return out
        table = self._e.table_for(xs) if algo is Algo.ONESHOT else None
        src = None
        if table is None:
            src, step = self._stacked(raw)
            if src is None:  # not one aligned [W, n] tensor: the host copies, one per rank
                for r in range(self.world_size):
                    self._e.stage(r, xs[r])
        self._e.alive()
        _ipc.launch_allreduce(algo, self._e.peer_ptrs, self.world_size, 0, k, store, stride, n, self._e.err,
                              self._e.timeout_ns, self._e.max_blocks, in_ptrs=table, stage_src=src,
                              stage_stride=step if src is not None else 0)
        return out

    def launch_staged(self, algo: Algo, n: int, out: torch.Tensor, out_stride: int, *, launch_ranks: int | None = None) -> None:
        """The kernel alone over inputs already staged (benchmarks: the kernel time without the copies).

        Args:
            out: rank y's n outputs at out + y * out_stride elements, 16-byte aligned rows.
        """
        self._e.alive()
        k = self.world_size if launch_ranks is None else launch_ranks
        _ipc.launch_allreduce(algo, self._e.peer_ptrs, self.world_size, 0, k, out, out_stride, n, self._e.err,
                              self._e.timeout_ns, self._e.max_blocks)

    def stage(self, xs: Any) -> None:
        """Copy the W inputs into the staging buffers (what all_reduce does before its launch)."""
        for r, x in enumerate(self._inputs(self.OP + ".stage", "xs", xs)):
            self._e.stage(r, x)

    def all_reduce_residual_rmsnorm(self, xs: Any, residuals: Any, weight: torch.Tensor, eps: float = 1e-6,
                                    *, algo: Algo | None = None, launch_ranks: int | None = None
                                    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused all-reduce + residual add + RMSNorm for every virtual rank, in one launch.

        Args:
            xs: [W, num_tokens, hidden] rank r's partial sums (bf16/fp16/fp32).
            residuals: [W, num_tokens, hidden] rank r's residual stream, the same dtype.
            weight: [hidden] RMSNorm's scale, the same dtype.
            eps: added to the mean square (> 0).
            algo: Algo.ONESHOT (every rank reduces every row) or Algo.TWOSHOT (rank r reduces and
                normalises its shard of ceil(num_tokens / W) rows, then the ranks gather the rows);
                default by size, as all_reduce.
            launch_ranks: as all_reduce.

        Returns (out [W, num_tokens, hidden], new_residual [W, num_tokens, hidden]); both paths give
        the same bits when residuals[r] is the same on every rank (replicated, as under tensor
        parallelism): two-shot adds each row's residual on the rank that owns the row.
        """
        op = self.OP + ".all_reduce_residual_rmsnorm"
        raw = xs
        xl = self._inputs(op, "xs", xs)
        rl = self._inputs(op, "residuals", residuals)
        if xl[0].dim() != 2 or rl[0].shape != xl[0].shape or rl[0].dtype != xl[0].dtype:
            raise MoeCommValueError(f"{op}: xs and residuals must be [W, num_tokens, hidden] of one dtype, got "
                                    f"{list(xl[0].shape)} {xl[0].dtype} and {list(rl[0].shape)} {rl[0].dtype}")
        rows, hidden = xl[0].shape
        check_input(op, "weight", weight, self.device, None)
        if weight.shape != (hidden,) or weight.dtype != xl[0].dtype:
            raise MoeCommValueError(f"{op}: weight must be [{hidden}] {xl[0].dtype}, got {list(weight.shape)} {weight.dtype}")
        if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not eps > 0:
            raise MoeCommValueError(f"{op}: eps must be a number > 0, got {eps!r}")
        if algo is None:
            algo = self._e.algo(rows * hidden * xl[0].element_size())
        if algo not in (Algo.ONESHOT, Algo.TWOSHOT):
            raise MoeCommValueError(f"{op}: algo must be Algo.ONESHOT or Algo.TWOSHOT, got {algo!r}")
        if algo is Algo.TWOSHOT and -(-rows // self.world_size) > layout.MAX_NORM_ROWS:
            raise MoeCommValueError(f"{op}: with Algo.TWOSHOT num_tokens must be at most world_size * "
                                    f"{layout.MAX_NORM_ROWS} = {self.world_size * layout.MAX_NORM_ROWS}, got {rows}")
        k = self.world_size if launch_ranks is None else launch_ranks
        res_in = torch.stack(rl).contiguous()
        res_out = torch.empty_like(res_in)
        out = torch.empty_like(res_in)
        if rows * hidden == 0:
            return out, res_out
        src = raw if isinstance(raw, torch.Tensor) and raw.is_contiguous() else None
        if src is None:
            for r in range(self.world_size):
                self._e.stage(r, xl[r])
        self._e.alive()
        _ipc.launch_rmsnorm(algo, self._e.peer_ptrs, self.world_size, 0, k, src, res_in, res_out, out, rows * hidden,
                            weight.contiguous(), rows, hidden, float(eps), self._e.err, self._e.timeout_ns,
                            self._e.max_blocks)
        return out, res_out

    @contextlib.contextmanager
    def capture(self, register: bool = True) -> Iterator[VirtualAllReduce]:
        """CUDA-graph capture of the all-reduce calls.

        register=True (default): enclose the graph capture, ``with ar.capture(), torch.cuda.graph(g):``;
        one-shot calls on contiguous 16-byte-aligned inputs read the inputs in place (no staging
        copy in the graph); their pointer tables are written when capture() exits. Other calls
        (two-shot, fused RMSNorm, misaligned inputs) capture their staging copy (inside the kernel
        for an aligned [W, ...] tensor, else host copies).
        register=False: every call captures its staging copy (either nesting order works).
        Replays read the captured input tensors: copy fresh data into them before a replay.
        """
        def fill(pending):
            for table, xs in pending:
                table.copy_(torch.tensor([x.data_ptr() for x in xs], dtype=torch.int64))

        with self._e.capture(register, fill):
            yield self

    def check(self) -> None:
        """Raise AllReduceTimeoutError naming the first rank that did not arrive (a device sync)."""
        self._e.check()

    def close(self) -> None:
        """Free the W buffers (after this device's work). Idempotent."""
        self._e.close()

    def __enter__(self) -> VirtualAllReduce:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()
