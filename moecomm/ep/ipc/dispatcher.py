"""Low-latency expert-parallel dispatch and combine inside a node, over symmetric (CUDA IPC) buffers.

# T = num_tokens (this rank), H = hidden, k = top_k, E = num_experts, W = ep_size, L = local experts,
# C = capacity (rows per peer), N = expanded rows (W * C * k)

    buf = open_symmetric(IPCDispatcher.buffer_bytes(8, 128, 7168, 8, torch.bfloat16), group)
    disp = IPCDispatcher(256, 8, 7168, buffer=buf, dtype=torch.bfloat16, max_tokens=128, group=group)
    d = disp.dispatch(x, topk_ids, topk_weights)       # d.tokens [W * C, H], d.gather_idx [W * C * k]
    y = disp.combine(h, d.handle)                      # [T, H]
    disp.check_overflow()                              # where the caller syncs anyway

The same API, handle and results as EPDispatcher's static-capacity mode (moecomm.ep.nccl), bit for
bit on integer payloads: the same rows in the same places (row s * C + slot of d.tokens is the
slot-th token, in token order, that rank s sent here), the same expansion by local expert
(moecomm.ep.nccl.plan.expand_received: the counting sort), the same sums in the same order. What
differs is the transport: no NCCL call. One kernel per direction (kernels/ep/ll.cu) writes each
token straight into the receive buffer of every rank holding any of its experts (once per rank:
the dedup), with its metadata, and signals with an epoch flag (st.release.sys after the data; the
receiver's ld.acquire.sys); combine stores the receiver's per-row sums into the source's buffer the
same way, and the source sums its rows (gather_sum, rank order: exact). No host sync anywhere, every
shape static: dispatch and combine can be captured in a CUDA graph with the experts.

torch.compile(fullgraph=True): dispatch / combine (and their _unchecked twins) are one opaque custom op
each (ops.py), one rank a process; the two-phase calls of virtual ranks stay eager.

Faults: a spin-wait is bounded (timeout_s, default MOECOMM_TIMEOUT_S); a peer that does not arrive
sets an error word naming it and the kernel goes on (its rows count as empty); check_errors() (also
called by check_overflow()) raises RankFailureError naming the rank(s). After that the dispatcher's
epochs no longer agree with its peers': build a new one. Capacity overflow is flagged on the device
(the rows that fit are exact, nothing is written out of bounds); check_overflow() raises it.

Two phases a direction. dispatch = dispatch_send (the signal phase: the LL kernel alone, which
sends, signals and spins until every peer's rows are in) + dispatch_finish (the finish phase: the
expansion, Triton and torch kernels); combine = combine_send (ll_combine: partial sums into the
sources' buffers, signal, spin) + combine_finish (gather_sum). One rank a process calls dispatch /
combine (both phases in a row): its peers' kernels are launched by their own processes.

Virtual ranks (open_virtual: W buffers on one GPU, the GPU tier): one IPCDispatcher per rank, each
rank's calls on its own CUDA stream, and THE RULE: launch every rank's signal phase before any rank's
finish phase, and between a rank's signal phase and the last rank's, call nothing that may
synchronise the context: no module load (CUDA lazy loading loads a kernel's module at its first
launch, and Triton loads each specialisation at its first launch: cuModuleLoadData, which may wait
for the context's running kernels; NVIDIA's Lazy Loading notes, "Concurrent execution"), no first
launch of any torch kernel, no cudaMalloc growth of the caching allocator, no .item() / .tolist().
Otherwise rank 0's kernel spins waiting for rank 1's, which the host cannot launch before the load,
which waits for rank 0's kernel: a deadlock broken only by the spin's timeout (what the first H200
run showed). moecomm.ep.ipc.virtual (virtual_dispatch / virtual_combine / virtual_step) is the
driver that keeps the rule (prepare_inputs for every rank, then every dispatch_send, then every
finish, every expert, every combine_send, every combine_finish); the tests and the benchmark use
it. The constructor loads ll.cu's kernels (compile + cuModuleLoad) so that no rank's first call does.
Only one block of each launch ever spins, so the W launches make progress whatever the order the
GPU schedules them in.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

from ... import _env
from ...distributed.collectives import global_rank as _global_rank
from ...distributed.health import RankFailureError
from ...errors import (
    MoeCommTypeError,
    MoeCommValueError,
    UnsupportedHardwareError,
    check_positive_int,
    check_tensor,
)
from ..nccl.dispatcher import EPHandle, _validate
from ..nccl.ops import gather_sum_unchecked
from ..nccl.plan import expand_received
from ..placement import ExpertPlacement
from ..types import DispatchResult
from . import layout as LY
from . import ops as _ops
from .layout import LLLayout

_FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


class PendingDispatch(NamedTuple):
    """A dispatch whose signal phase (dispatch_send) is launched and whose finish phase is not.

    Attributes: owner (the IPCDispatcher), num_tokens T, hidden H, home [T, k] int32 (a view of the
    dispatcher's preallocated home, written by the kernel)."""

    owner: Any
    num_tokens: int
    hidden: int
    home: torch.Tensor
_PHASES = {1: "dispatch", 2: "combine"}


def timeout_error(mask: int, phase: int, rank_names: list[int], timeout_s: float, seen_by: int) -> RankFailureError | None:
    """The error of a timed-out spin-wait, from the kernel's error words (None when mask is 0).

    Args:
        mask: error_mask, bit s set when rank s did not arrive; phase: 1 dispatch, 2 combine.
        rank_names: [W] the global rank of each group rank; seen_by: this rank's.
    """
    if not mask:
        return None
    ranks = [rank_names[s] for s in range(len(rank_names)) if mask >> s & 1]
    return RankFailureError(
        f"IPCDispatcher: rank(s) {ranks} did not arrive in {_PHASES.get(phase, 'an exchange')} within "
        f"timeout_s = {timeout_s:g} s (seen by rank {seen_by}); the dispatcher is out of step with its peers "
        "now: build a new one", ranks)


class IPCDispatcher:
    """Low-latency dispatcher of one MoE layer over a SymmetricBuffer (implements moecomm.ep.types.Dispatcher).

    Args:
        num_experts: E, global experts.
        top_k: k, experts per token.
        hidden: H.
        buffer: this rank's SymmetricBuffer (moecomm.distributed.symmetric: open_symmetric, or one of
            open_virtual's W) of at least ``buffer_bytes(W, capacity, H, k, dtype)`` bytes; its rank and
            world_size are the dispatcher's. Several dispatchers may share one buffer when their calls
            never interleave (the layers of a model) and their sizes agree.
        placement: expert -> rank map (W = buffer.world_size); None: contiguous blocks.
        dtype: the token dtype (bf16, fp16 or fp32) of every call.
        max_tokens: the most tokens a rank passes to one call (<= 1024).
        capacity_per_peer: C, rows a rank may send to one peer per call (default max_tokens: never
            overflows); a step that needs more drops the rest and sets the overflow flag.
        group: the process group the buffer was opened over (names ranks in errors; None with
            virtual buffers or the default group).
        timeout_s: the longest spin-wait for a peer (default MOECOMM_TIMEOUT_S).
        payload: "native" (tokens travel in ``dtype``) or "fp8" (bf16 only, hidden % 128 == 0: dispatch
            sends e4m3 bytes with one fp32 scale per 128 columns, H + H / 32 bytes a token instead of
            2H; dispatch_finish hands the experts q * scale in bf16, ``received_fp8()`` the raw rows;
            combine stays bf16). Exact against layout.quantize_fp8_reference.

    Every rank of the node builds one with the same arguments and calls dispatch and combine in
    lockstep (as with NCCL). A result's tensors are views of the buffer, valid until the next dispatch.
    """

    def __init__(self, num_experts: int, top_k: int, hidden: int, *, buffer: Any,
                 placement: ExpertPlacement | None = None, dtype: torch.dtype = torch.bfloat16, max_tokens: int = 128,
                 capacity_per_peer: int | None = None, group: Any = None, timeout_s: float | None = None,
                 payload: str = "native"):
        op = "IPCDispatcher"
        self.num_experts = check_positive_int(op, "num_experts", num_experts)
        self.top_k = check_positive_int(op, "top_k", top_k)
        self.hidden = check_positive_int(op, "hidden", hidden)
        if top_k > num_experts:
            raise MoeCommValueError(f"{op}: top_k must be <= num_experts ({num_experts}), got {top_k}")
        if top_k > 32:
            raise MoeCommValueError(f"{op}: top_k must be <= 32 (the kernels' metadata), got {top_k}")
        if dtype not in _FLOAT_DTYPES:
            raise MoeCommTypeError(f"{op}: dtype must be float32, float16 or bfloat16, got {dtype}")
        self.max_tokens = check_positive_int(op, "max_tokens", max_tokens)
        if max_tokens > LY.MAX_TOKENS:
            raise MoeCommValueError(f"{op}: max_tokens must be <= {LY.MAX_TOKENS} (the low-latency path is for "
                                    f"decode; use EPDispatcher above), got {max_tokens}")
        cap = max_tokens if capacity_per_peer is None else check_positive_int(op, "capacity_per_peer", capacity_per_peer)
        if cap > max_tokens:
            raise MoeCommValueError(f"{op}: capacity_per_peer must be <= max_tokens ({max_tokens}), got {cap}")
        for name in ("rank", "world_size", "nbytes", "device", "local", "peer_ptrs"):
            if not hasattr(buffer, name):
                raise MoeCommTypeError(f"{op}: buffer must be a SymmetricBuffer (open_symmetric / open_virtual), "
                                       f"got {type(buffer).__name__} (no attribute {name!r})")
        W = buffer.world_size
        if not 1 <= W <= LY.MAX_WORLD_SIZE:
            raise MoeCommValueError(f"{op}: buffer.world_size must be in [1, {LY.MAX_WORLD_SIZE}] (one node), got {W}")
        if placement is None:
            placement = ExpertPlacement(num_experts, W)
        if not isinstance(placement, ExpertPlacement):
            raise MoeCommTypeError(f"{op}: placement must be an ExpertPlacement, got {type(placement).__name__}")
        if placement.ep_size != W or placement.num_experts != num_experts:
            raise MoeCommValueError(f"{op}: placement must be for {num_experts} experts on {W} ranks (the buffer's), "
                                    f"got {placement.num_experts} experts on {placement.ep_size} ranks")
        if payload not in ("native", "fp8"):
            raise MoeCommValueError(f"{op}: payload must be 'native' or 'fp8', got {payload!r}")
        if payload == "fp8":
            if dtype is not torch.bfloat16:
                raise MoeCommTypeError(f"{op}: payload='fp8' needs dtype bfloat16 (the tokens it quantises), got {dtype}")
            if hidden % LY.FP8_GROUP or hidden > LY.FP8_MAX_HIDDEN:
                raise MoeCommValueError(f"{op}: payload='fp8' needs hidden a multiple of {LY.FP8_GROUP} (one scale per "
                                        f"{LY.FP8_GROUP} columns) and <= {LY.FP8_MAX_HIDDEN}, got {hidden}")
        self.payload = payload
        self.layout = LLLayout.of(W, cap, hidden, top_k, dtype, payload)
        if buffer.nbytes < self.layout.nbytes:
            raise MoeCommValueError(f"{op}: buffer.nbytes must be >= {self.layout.nbytes} (buffer_bytes({W}, {cap}, "
                                    f"{hidden}, {top_k}, {dtype}, {payload!r})), got {buffer.nbytes}")
        if timeout_s is None:
            timeout_s = _env.timeout_s()
        if isinstance(timeout_s, bool) or not isinstance(timeout_s, (int, float)) or not timeout_s > 0:
            raise MoeCommValueError(f"{op}: timeout_s must be a number > 0, got {timeout_s!r}")
        self.timeout_s = float(timeout_s)
        self.buffer, self.group, self.placement, self.dtype = buffer, group, placement, dtype
        self.rank, self.ep_size = buffer.rank, W
        self.device = torch.device(buffer.device)
        self.num_local_experts = placement.num_local_experts(self.rank)
        self.local_experts = placement.local_experts(self.rank)
        self._virtual = bool(getattr(buffer, "virtual", False))
        self._ranks_on_device = W if self._virtual else 1
        self._check_hardware(self.device)
        if self.device.type == "cuda":
            self._preload()
        self._e2r = placement.expert_to_rank_tensor(self.device)
        self._e2l = placement.expert_to_local_tensor(self.device)
        self._home = torch.full((max_tokens, top_k), -1, dtype=torch.int32, device=self.device)
        local = buffer.local
        self._recv = self.layout.recv(local)  # [W * C, width] (uint8 for the fp8 payload)
        # fp8: the dequantised tokens the experts read, allocated once (dispatch_finish writes them)
        self._tokens = (torch.empty(W * cap, hidden, dtype=dtype, device=self.device) if payload == "fp8"
                        else self._recv[:, :hidden])
        self._dq = (torch.empty(W * cap, hidden // LY.FP8_GROUP, LY.FP8_GROUP, dtype=torch.float32, device=self.device)
                    if payload == "fp8" else None)
        self._back = self.layout.back(local)  # [W * C, H]
        self._overflow = LLLayout.word(local, LY.OVERFLOW)
        self._errors = LLLayout.word(local, LY.ERROR_MASK, 2)  # mask, phase
        self._op_handle = _ops.REGISTRY.add(self)  # what torch.compile's ops (ops.py) find it by
        if W > 1 and not self._virtual:
            from ...distributed import check_agreement

            check_agreement(group, op, num_experts=num_experts, top_k=top_k, hidden=hidden, dtype=str(dtype),
                            ep_size=W, placement=placement.describe(), max_tokens=max_tokens, capacity_per_peer=cap)

    @staticmethod
    def _check_hardware(device: torch.device) -> None:
        """The kernels need a CUDA device and the toolchain (the CPU tests replace this check, and the
        kernels by the layout model, to run the dispatcher's own code)."""
        op = "IPCDispatcher"
        if device.type != "cuda":
            raise UnsupportedHardwareError(f"{op}: needs a CUDA device (the buffer is on {device}); "
                                           "use EPDispatcher(max_tokens=...) without one")
        from ...jit import cuda

        err = cuda.toolchain_error()
        if err is not None:
            raise UnsupportedHardwareError(f"{op}: the CUDA kernels of kernels/ep/ll.cu cannot run here: {err}")

    def _preload(self) -> None:
        """Compile (cache) and load ll.cu's two kernels of this dtype now, not inside a rank's first call."""
        from . import _cuda

        _cuda.kernel(_cuda.dispatch_entry(self.layout), self.device)
        _cuda.kernel(_cuda._COMBINE[self.dtype], self.device)

    @staticmethod
    def buffer_bytes(world_size: int, capacity: int, hidden: int, top_k: int, dtype: torch.dtype,
                     payload: str = "native") -> int:
        """Bytes of the SymmetricBuffer a dispatcher of these sizes (and payload) needs (moecomm.ep.ipc.layout)."""
        return LLLayout.of(world_size, capacity, hidden, top_k, dtype, payload).nbytes

    @property
    def capacity(self) -> int:
        """C, rows a rank may send to one peer per call."""
        return self.layout.capacity

    # ------------------------------------------------------------------------- dispatch

    def dispatch(self, x: Any, topk_ids: Any, topk_weights: Any) -> DispatchResult:
        """Send each token once to every rank holding any of its experts; no host sync.

        Args:
            x: [T, H] tokens of the dispatcher's dtype on its device, T <= max_tokens.
            topk_ids: [T, k] int32/int64 global expert ids in [0, E) (not checked on the device:
                ids outside are clamped, never out of bounds, as in the NCCL static mode).
            topk_weights: [T, k] fp32/fp16/bf16 routing weights.

        Returns:
            DispatchResult as EPDispatcher's static mode: tokens [W * C, H] (views of the buffer),
            gather_idx [W * C * k] int32, expert_offsets [L + 1] int32 (rows after offsets[L] are
            padding), tokens_per_expert [L] int32, row_weights [W * C * k] fp32, handle for combine.
        """
        op = "IPCDispatcher.dispatch"
        x, ids, w = _validate(op, x, topk_ids, topk_weights, self.hidden, self.top_k, self.dtype)
        if x.device != self.device:
            raise MoeCommValueError(f"{op}: x must be on device {self.device} (the buffer's), got {x.device}")
        if x.shape[0] > self.max_tokens:
            raise MoeCommValueError(f"{op}: x must have at most max_tokens = {self.max_tokens} rows, got {x.shape[0]} "
                                    "(the low-latency path has fixed capacity; use EPDispatcher for larger steps)")
        if torch.compiler.is_compiling():
            return self._dispatch_compiled(x, ids, w)
        return self.dispatch_unchecked(x, ids, w)

    def dispatch_unchecked(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> DispatchResult:
        """dispatch without the argument checks (the MoE forward: x [T <= max_tokens, H] of the
        dispatcher's dtype and device, topk_ids [T, k] int32, topk_weights [T, k] fp32).
        = dispatch_finish(dispatch_send_unchecked(...)): for one rank a process, never for virtual ranks.
        Under torch.compile: one opaque op (ops.py), the result built from its outputs."""
        if torch.compiler.is_compiling():
            return self._dispatch_compiled(x, topk_ids, topk_weights)
        return self.dispatch_finish(self.dispatch_send_unchecked(x, topk_ids, topk_weights))

    def _dispatch_compiled(self, x: torch.Tensor, ids: torch.Tensor, w: torch.Tensor) -> DispatchResult:
        tokens, offsets, tpe, row_w, gather_idx, home, slot_pos = _ops.ipc_ep_dispatch.op(x, ids, w, self._op_handle)
        handle = EPHandle(self.group, self.ep_size, None, None, home, slot_pos, x.shape[0], x.shape[1],
                          gather_idx.shape[0], buffers=self, op_handle=self._op_handle)
        return DispatchResult(tokens, offsets, tpe, row_w, gather_idx, handle)

    def dispatch_send(self, x: Any, topk_ids: Any, topk_weights: Any) -> PendingDispatch:
        """The signal phase of dispatch (the LL kernel only: send, signal, wait); dispatch_finish
        completes it. Arguments as dispatch (checked); returns the PendingDispatch to finish."""
        op = "IPCDispatcher.dispatch_send"
        x, ids, w = _validate(op, x, topk_ids, topk_weights, self.hidden, self.top_k, self.dtype)
        if x.device != self.device:
            raise MoeCommValueError(f"{op}: x must be on device {self.device} (the buffer's), got {x.device}")
        if x.shape[0] > self.max_tokens:
            raise MoeCommValueError(f"{op}: x must have at most max_tokens = {self.max_tokens} rows, got {x.shape[0]}")
        return self.dispatch_send_unchecked(x, ids, w)

    @staticmethod
    def prepare_inputs(x: torch.Tensor, topk_ids: torch.Tensor,
                       topk_weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x contiguous [T, H], topk_ids int32 contiguous [T, k], topk_weights fp32 contiguous [T, k]):
        the conversions dispatch_send makes (no-ops, no kernel, when the inputs already are so).
        Virtual-rank drivers call it for every rank before any rank's dispatch_send (module docstring)."""
        return x.contiguous(), topk_ids.to(torch.int32).contiguous(), topk_weights.to(torch.float32).contiguous()

    def dispatch_send_unchecked(self, x: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor) -> PendingDispatch:
        """dispatch_send without the argument checks. Launches exactly one kernel (ll_dispatch) when the
        inputs are prepared (prepare_inputs), else the conversions first."""
        from ._cuda import dispatch_cuda

        x, ids, w = self.prepare_inputs(x, topk_ids, topk_weights)
        T, H = x.shape
        home = self._home[:T]
        dispatch_cuda(x, ids, w, self._e2r, self._e2l, self.buffer.peer_ptrs, home, self.layout, self.rank,
                      self._timeout_ns(), self._ranks_on_device)
        return PendingDispatch(self, T, H, home)

    def dispatch_finish(self, pending: PendingDispatch) -> DispatchResult:
        """The finish phase of dispatch: the expansion by local expert (Triton / torch kernels, which
        may load modules at their first launch: never while a peer's signal phase is not launched yet).

        Args:
            pending: this dispatcher's latest dispatch_send's PendingDispatch.

        Returns:
            DispatchResult (as dispatch).
        """
        if not isinstance(pending, PendingDispatch) or pending.owner is not self:
            raise MoeCommTypeError("IPCDispatcher.dispatch_finish: pending must be this dispatcher's dispatch_send "
                                   f"result, got {type(pending).__name__}")
        ex = expand_received(self._recv, self.layout.rows, self.num_local_experts, None)
        if self.payload == "fp8":  # q * scale, rounded once to bf16 (layout.dequantize_fp8_reference)
            q, scales = self.received_fp8()
            R, G = scales.shape
            torch.mul(q.float().view(R, G, LY.FP8_GROUP), scales[:, :, None], out=self._dq)
            self._tokens.copy_(self._dq.view(R, -1))
        handle = EPHandle(self.group, self.ep_size, None, None, pending.home, ex.slot_pos, pending.num_tokens,
                          pending.hidden, ex.gather_idx.shape[0], buffers=self)
        return DispatchResult(self._tokens, ex.expert_offsets, ex.tokens_per_expert, ex.row_weights, ex.gather_idx,
                              handle)

    def received_fp8(self) -> tuple[torch.Tensor, torch.Tensor]:
        """payload='fp8': (q [W * C, H] float8_e4m3fn, scales [W * C, H / 128] fp32), views of RECV as the
        latest dispatch left it (for an expert GEMM that reads fp8 itself)."""
        if self.payload != "fp8":
            raise MoeCommValueError(f"IPCDispatcher.received_fp8: payload must be 'fp8', got {self.payload!r}")
        return LY.split_fp8_rows(self._recv, self.hidden)

    # ------------------------------------------------------------------------- combine

    def combine(self, expert_out: Any, handle: EPHandle) -> torch.Tensor:
        """y [T, H] = per token, the sum of its expert outputs (weights already applied); no host sync.

        Args:
            expert_out: [N, H] of the dispatcher's dtype, row i = the output of expanded row i of the
                dispatch result (N = W * C * k; the padding rows after expert_offsets[L] are never read).
            handle: DispatchResult.handle of this dispatcher's latest dispatch.

        Returns:
            y [T, H] of the dispatcher's dtype (a fresh tensor).
        """
        op = "IPCDispatcher.combine"
        self._check_handle(op, handle)
        out = check_tensor(op, "expert_out", expert_out, shape=[handle.num_rows, handle.hidden], dtype=(self.dtype,),
                           device=self.device)
        return self.combine_unchecked(out, handle)

    def combine_unchecked(self, expert_out: torch.Tensor, handle: EPHandle) -> torch.Tensor:
        """combine without checks, for the MoE forward (expert_out [N, H] from its expert_mlp).
        = combine_finish(combine_send_unchecked(...)): for one rank a process, never for virtual ranks.
        Under torch.compile: one opaque op (ops.py)."""
        if torch.compiler.is_compiling() or handle.op_handle is not None:  # compiling, or a handle made so
            return _ops.ipc_ep_combine(expert_out, handle.slot_pos, handle.home, self._op_handle)
        return self.combine_finish(self.combine_send_unchecked(expert_out, handle))

    def _combine_eager(self, expert_out: torch.Tensor, slot_pos: torch.Tensor, home: torch.Tensor) -> torch.Tensor:
        """ops.py's combine body: both phases over a handle rebuilt from the op's inputs."""
        handle = EPHandle(self.group, self.ep_size, None, None, home, slot_pos, home.shape[0], expert_out.shape[1],
                          expert_out.shape[0], buffers=self)
        return self.combine_finish(self.combine_send_unchecked(expert_out, handle))

    def combine_send(self, expert_out: Any, handle: EPHandle) -> EPHandle:
        """The signal phase of combine (the LL kernel only); combine_finish(returned handle) completes it.
        Arguments as combine (checked)."""
        op = "IPCDispatcher.combine_send"
        self._check_handle(op, handle)
        out = check_tensor(op, "expert_out", expert_out, shape=[handle.num_rows, handle.hidden], dtype=(self.dtype,),
                           device=self.device)
        return self.combine_send_unchecked(out, handle)

    def combine_send_unchecked(self, expert_out: torch.Tensor, handle: EPHandle) -> EPHandle:
        """combine_send without checks: exactly one kernel (ll_combine) when expert_out and
        handle.slot_pos are contiguous (they are: the expansion's and an expert's outputs)."""
        from ._cuda import combine_cuda

        combine_cuda(expert_out.contiguous(), handle.slot_pos.contiguous(), self.buffer.peer_ptrs, self.layout,
                     self.rank, self._timeout_ns(), self._ranks_on_device)
        return handle

    def combine_finish(self, handle: EPHandle) -> torch.Tensor:
        """The finish phase of combine: y [T, H] (dispatcher's dtype, a fresh tensor) = the source's sum
        of its rows in rank order (gather_sum, a Triton kernel: the same rule as dispatch_finish).

        Args:
            handle: the handle combine_send returned.
        """
        self._check_handle("IPCDispatcher.combine_finish", handle)
        return gather_sum_unchecked(self._back, handle.home)  # [T, H]: the rows of each rank, in slot order

    def _check_handle(self, op: str, handle: Any) -> None:
        if not isinstance(handle, EPHandle) or handle.buffers is not self:
            raise MoeCommTypeError(f"{op}: handle must be the handle of this IPCDispatcher's dispatch result, got "
                                   f"{type(handle).__name__}" + (" of another dispatcher" if isinstance(handle, EPHandle) else ""))

    # ------------------------------------------------------------------------- faults

    def _timeout_ns(self) -> int:
        return int(self.timeout_s * 1e9)

    def _rank_name(self, r: int) -> int:
        return r if self._virtual or self.ep_size == 1 else _global_rank(self.group, r)

    def check_errors(self) -> None:
        """Raise if a spin-wait timed out (one device read: a host sync).

        Raises:
            RankFailureError naming the rank(s) that did not arrive, the phase and the timeout.
        """
        mask, phase = self._errors.tolist()
        exc = timeout_error(mask, phase, [self._rank_name(r) for r in range(self.ep_size)], self.timeout_s,
                            self._rank_name(self.rank))
        if exc is not None:
            raise exc

    def overflowed(self) -> bool:
        """Whether a call since the last check_overflow() had more rows for a peer than capacity_per_peer
        (one device read: a host sync)."""
        return bool(self._overflow.item())

    def check_overflow(self) -> None:
        """Raise on a timeout (check_errors), or (clearing the flag) if a call dropped rows.

        Raises:
            RankFailureError (check_errors); MoeCommValueError naming this rank, the capacity and
            what to change.
        """
        self.check_errors()
        if self.overflowed():
            self._overflow.zero_()
            raise MoeCommValueError(
                f"IPCDispatcher: capacity_per_peer must hold every row a rank sends to one peer, got "
                f"{self.capacity} rows on rank {self._rank_name(self.rank)}, which a step exceeded: rows were "
                "dropped from that step (raise capacity_per_peer, up to max_tokens)")
