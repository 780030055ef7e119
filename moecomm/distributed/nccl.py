"""NCCL called below torch.distributed: the all_to_all of the dispatcher's throughput mode.

    comm = communicator(group)          # once per group, collectively; None: use torch.distributed
    comm.all_to_all(out, inp, out_splits, in_splits, "dispatch: all_to_all")
    comm.check(group, "dispatch: count exchange")   # after a host sync: raises if the watchdog aborted

# W = the group's size; a row = one index of dim 0 of a contiguous tensor

Why: on the H200 host one torch.distributed.all_to_all_single costs ~20-80 us of host time before
NCCL's kernel is queued (the Python wrapper's checks and logging decorators, c10d's work object,
its stream handoff and tensor bookkeeping), and a dispatch + combine round trip makes three. NCCL's
own API queues the same exchange in W grouped ncclSend / ncclRecv pairs; through ctypes that is
2W + 2 foreign calls of ~0.5 us each. This module is that path, on the caller's current stream (so
it orders with the caller's kernels without an event handoff, and the caching allocator needs no
record_stream), for the synchronous exchanges of the throughput mode. Asynchronous exchanges
(async_op, whose point is to run beside the caller's stream), the static mode (CUDA-graph capture)
and gloo stay on torch.distributed.

The library: the libnccl torch loaded (found in /proc/self/maps), else ``libnccl.so.2`` on the
loader's path; MOECOMM_NCCL_LIBRARY names another; MOECOMM_EP_NCCL=c10d turns this path off. The
communicator is made once per group (ncclCommInitRank, the unique id sent by the group's first
rank through torch.distributed), only when every rank of the group can make it (agreed first, so a
rank that cannot never leaves the others waiting in the init). It holds NCCL's own buffers (like
torch's communicator of the group: a few MB per peer and channel).

Bounded waits: NCCL's kernels wait for a dead peer forever, and torch's watchdog does not know this
communicator. So each exchange records a CUDA event after itself, and a daemon thread (one per
communicator, 0.1 s ticks) aborts the communicator (ncclCommAbort: the queued kernels return) when
the oldest exchange not yet complete is older than MOECOMM_TIMEOUT_S. The aborted communicator
raises on its next use and at check(), through moecomm.distributed.health.explain_failure, which
names the rank that stopped (its heartbeat) or reported an error. Data received by an aborted
exchange is garbage: the dispatcher calls check() right after its host sync, before it uses the
counts, so nothing corrupt is handed out.
"""

from __future__ import annotations

import collections
import ctypes
import os
import threading
import time

import torch

from .. import _env
from ..errors import MoeCommError

_NCCL_INT8 = 0  # ncclInt8: the exchanges move bytes
_NCCL_SUCCESS, _NCCL_IN_PROGRESS = 0, 7
_CU_EVENT_DISABLE_TIMING = 2
_CUDA_ERROR_NOT_READY = 600
WATCHDOG_TICK_S = 0.1
MAX_PENDING = 1024  # exchanges tracked at once; beyond, the oldest (the one that matters) stays tracked


class NcclError(MoeCommError, RuntimeError):
    """An NCCL call returned an error (the message names the call and NCCL's reason)."""


class _UniqueId(ctypes.Structure):
    _fields_ = [("internal", ctypes.c_byte * 128)]


def library_path() -> str:
    """The libnccl to load: MOECOMM_NCCL_LIBRARY, else the one this process mapped, else the soname."""
    env = _env.get("MOECOMM_NCCL_LIBRARY").strip()
    if env:
        return env
    try:
        with open("/proc/self/maps") as f:
            for line in f:
                path = line.rsplit(None, 1)[-1]
                if "/libnccl" in path and ".so" in path:
                    return path
    except OSError:
        pass
    return "libnccl.so.2"


class _Library:
    """libnccl through ctypes: the calls a communicator makes."""

    def __init__(self, path: str) -> None:
        self.path = path
        lib = self.lib = ctypes.CDLL(path)
        lib.ncclGetErrorString.restype = ctypes.c_char_p
        lib.ncclGetUniqueId.argtypes = [ctypes.POINTER(_UniqueId)]
        lib.ncclCommInitRank.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_int, _UniqueId, ctypes.c_int]
        lib.ncclCommAbort.argtypes = [ctypes.c_void_p]
        lib.ncclCommDestroy.argtypes = [ctypes.c_void_p]
        version = ctypes.c_int()
        self.check(lib.ncclGetVersion(ctypes.byref(version)), "ncclGetVersion")
        self.version = version.value
        # the hot calls without argtypes (no from_param conversions): every argument is passed as a
        # ctypes object of its C type, or an int < 2**31 where the C type is int
        self.send, self.recv = lib["ncclSend"], lib["ncclRecv"]
        self.group_start, self.group_end = lib["ncclGroupStart"], lib["ncclGroupEnd"]

    def check(self, rc: int, what: str) -> None:
        if rc not in (_NCCL_SUCCESS, _NCCL_IN_PROGRESS):
            reason = self.lib.ncclGetErrorString(rc) or b"?"
            raise NcclError(f"moecomm.distributed.nccl: {what} failed: {reason.decode()} ({rc}; {self.path})")


_library: _Library | None = None
_library_error: str | None = None
_library_lock = threading.Lock()


def load_library() -> _Library | None:
    """The process's NCCL library, or None (library_error() says why)."""
    global _library, _library_error
    if _library is not None or _library_error is not None:
        return _library
    with _library_lock:
        if _library is None and _library_error is None:
            try:
                _library = _Library(library_path())
            except (OSError, AttributeError, NcclError) as exc:
                _library_error = f"{type(exc).__name__}: {exc}"
    return _library


def library_error() -> str | None:
    load_library()
    return _library_error


class _Events:
    """CUDA events through the driver (moecomm.jit.cuda's), for the watchdog: create, record, query."""

    def __init__(self, device: int) -> None:
        from ..jit import cuda

        self.drv = cuda._get_driver()
        self.device = device
        self.ctx = self.drv.context(device)
        lib = self.drv.lib
        lib.cuEventCreate.argtypes = [ctypes.POINTER(ctypes.c_void_p), ctypes.c_uint]
        lib.cuEventDestroy_v2.argtypes = [ctypes.c_void_p]
        self._record, self._query = lib["cuEventRecord"], lib["cuEventQuery"]
        self.free: list[ctypes.c_void_p] = []

    def get(self) -> ctypes.c_void_p:
        if self.free:
            return self.free.pop()
        ev = ctypes.c_void_p()
        with self.drv.current(self.device):
            self.drv.check(self.drv.lib.cuEventCreate(ctypes.byref(ev), _CU_EVENT_DISABLE_TIMING), "cuEventCreate")
        return ev

    def record(self, ev: ctypes.c_void_p, stream: int) -> int:
        return self._record(ev, ctypes.c_void_p(stream))

    def done(self, ev: ctypes.c_void_p) -> bool | None:
        """True: complete; False: not yet; None: the query failed (the context is gone)."""
        rc = self._query(ev)
        return True if rc == 0 else (False if rc == _CUDA_ERROR_NOT_READY else None)

    def bind_thread(self) -> None:
        """Make the device's primary context current on the calling thread (the watchdog's)."""
        self.drv.check(self.drv.lib.cuCtxSetCurrent(self.ctx), "cuCtxSetCurrent")


class Communicator:
    """One NCCL communicator over the ranks of a torch.distributed group (see the module docstring)."""

    def __init__(self, lib: _Library, comm: ctypes.c_void_p, rank: int, size: int, device: int,
                 timeout_s: float, events: _Events | None) -> None:
        self.lib, self.comm, self.rank, self.size, self.device = lib, comm, rank, size, device
        self.timeout_s = timeout_s
        self.aborted: str | None = None  # why the watchdog aborted it
        self.exchanges = 0  # tests check that the path is taken
        self._events = events
        self._pending: collections.deque = collections.deque()  # (event, enqueued at, what)
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = None
        if events is not None:
            self._thread = threading.Thread(target=self._watch, name=f"moecomm-nccl-watchdog-{rank}", daemon=True)
            self._thread.start()
        self._stream_of = getattr(torch._C, "_cuda_getCurrentRawStream", None)

    # ------------------------------------------------------------------ the exchange

    def all_to_all(self, out: torch.Tensor, inp: torch.Tensor, out_splits, in_splits, what: str) -> None:
        """all_to_all_single's exchange of rows: inp's rows in_splits[p] to rank p, out's rows
        out_splits[p] from rank p (None: W equal parts). Contiguous tensors of the same row width,
        on this communicator's device; queued on torch's current stream, no host sync."""
        if self.aborted is not None:
            raise NcclError(f"moecomm.distributed.nccl: {what}: the communicator was aborted ({self.aborted})")
        W = self.size
        n_in, n_out = inp.shape[0], out.shape[0]
        row = inp.element_size() * (inp.numel() // n_in) if n_in else 0
        if in_splits is None:
            in_splits = [n_in // W] * W
        if out_splits is None:
            out_splits = [n_out // W] * W
        lib, comm = self.lib, self.comm
        stream = ctypes.c_void_p(self._stream_of(self.device) if self._stream_of is not None
                                 else torch.cuda.current_stream(self.device).cuda_stream)
        send_at, recv_at = inp.data_ptr(), out.data_ptr()
        size_t, ptr = ctypes.c_size_t, ctypes.c_void_p
        rc = lib.group_start()
        try:
            for p in range(W):
                s, r = in_splits[p], out_splits[p]
                if s:
                    rc = rc or lib.send(ptr(send_at), size_t(s * row), _NCCL_INT8, p, comm, stream)
                    send_at += s * row
                if r:
                    rc = rc or lib.recv(ptr(recv_at), size_t(r * row), _NCCL_INT8, p, comm, stream)
                    recv_at += r * row
        finally:
            end = lib.group_end()
        if rc or end not in (_NCCL_SUCCESS, _NCCL_IN_PROGRESS):
            lib.check(rc or end, f"{what} (ncclSend/ncclRecv)")
        self.exchanges += 1
        if self._events is not None and len(self._pending) < MAX_PENDING:
            with self._lock:
                ev = self._events.get()
                if self._events.record(ev, stream.value) == 0:
                    self._pending.append((ev, time.monotonic(), what))
                else:
                    self._events.free.append(ev)

    def check(self, group, what: str) -> None:
        """Raise (naming the rank at fault) when the watchdog aborted this communicator: call it
        after a host sync, before data the exchanges received is used."""
        if self.aborted is None:
            return
        from .health import explain_failure

        exc = NcclError(f"moecomm.distributed.nccl: {what}: {self.aborted}")
        explain_failure(group, what, exc)
        raise exc

    # ------------------------------------------------------------------ the watchdog

    def _watch(self) -> None:
        try:
            self._events.bind_thread()
        except Exception:  # noqa: BLE001 -- no context on this thread: nothing can be watched
            return
        while not self._stop.wait(WATCHDOG_TICK_S):
            with self._lock:
                while self._pending:
                    ev, t0, what = self._pending[0]
                    state = self._events.done(ev)
                    if state is None:  # the context is going away (interpreter exit)
                        return
                    if state:
                        self._pending.popleft()
                        self._events.free.append(ev)
                        continue
                    if time.monotonic() - t0 > self.timeout_s:
                        self._abort(f"{what} did not complete within {self.timeout_s:g} s "
                                    f"(MOECOMM_TIMEOUT_S): a peer stopped or never joined; communicator aborted")
                        return
                    break

    def _abort(self, why: str) -> None:
        self.aborted = why
        self._pending.clear()
        self.lib.lib.ncclCommAbort(self.comm)

    def close(self) -> None:
        """Stop the watchdog and destroy the communicator (a no-op after an abort)."""
        self._stop.set()
        if self.aborted is None and self.comm:
            self.lib.lib.ncclCommDestroy(self.comm)
            self.comm = ctypes.c_void_p()


# group -> Communicator, or None where torch.distributed keeps the exchange
_communicators: dict = {}
_made_lock = threading.Lock()


def enabled() -> bool:
    """MOECOMM_EP_NCCL: ``direct`` (default) or ``c10d``."""
    mode = _env.get("MOECOMM_EP_NCCL").strip().lower() or "direct"
    if mode not in ("direct", "c10d"):
        from ..errors import MoeCommValueError

        raise MoeCommValueError(f"MOECOMM_EP_NCCL must be 'direct' or 'c10d', got {mode!r}")
    return mode == "direct"


def communicator(group) -> Communicator | None:
    """The group's Communicator (made at the first call, collectively: every rank of the group must
    call it at the same point, as it does a collective), or None where the exchange stays on
    torch.distributed (a gloo group, MOECOMM_EP_NCCL=c10d, a rank without the library, CUDA-graph
    capture in progress at the first call)."""
    import torch.distributed as dist

    key = group if group is not None else dist.group.WORLD
    if key in _communicators:
        return _communicators[key]

    if not dist.is_initialized() or dist.get_backend(group) != "nccl" or not enabled():
        _communicators[key] = None
        return None
    if torch.cuda.is_current_stream_capturing():
        return None  # not made under capture (the init talks to the peers): decided at a later call
    with _made_lock:
        if key not in _communicators:
            _communicators[key] = _make(group)
    return _communicators[key]


def _make(group) -> Communicator | None:
    import torch.distributed as dist

    from .collectives import global_rank

    rank, W = dist.get_rank(group), dist.get_world_size(group)
    lib = load_library()
    uid = _UniqueId()
    ok = lib is not None
    if ok and rank == 0:
        try:
            lib.check(lib.lib.ncclGetUniqueId(ctypes.byref(uid)), "ncclGetUniqueId")
        except NcclError:
            ok = False
    # agree first (a rank without the library must not leave the others in ncclCommInitRank)
    box = [(ok, bytes(uid.internal) if rank == 0 else None)]
    gathered = [None] * W
    dist.all_gather_object(gathered, box[0], group=group)
    if not all(g[0] for g in gathered):
        from ..jit.backend import log

        log.info("moecomm: the EP exchange stays on torch.distributed (NCCL not loadable on every rank: %s)",
                 _library_error)
        return None
    ctypes.memmove(uid.internal, gathered[0][1], 128)
    device = torch.cuda.current_device()
    comm = ctypes.c_void_p()
    with torch.cuda.device(device):
        lib.check(lib.lib.ncclCommInitRank(ctypes.byref(comm), W, uid, rank),
                  f"ncclCommInitRank(rank {rank} of {W}, global rank {global_rank(group, rank)})")
    try:
        events = _Events(device)
    except Exception:  # noqa: BLE001 -- no driver events: exchanges are not watched (said once)
        from ..jit.backend import warn_once

        warn_once("nccl-watchdog", "moecomm: CUDA events unavailable: the direct NCCL exchanges run without a watchdog")
        events = None
    return Communicator(lib, comm, rank, W, device, _env.timeout_s(), events)


def forget(group=None) -> None:
    """Close and drop the communicator of ``group`` (all of them when None): before the process
    group is destroyed."""
    keys = list(_communicators) if group is None else [group]
    for k in keys:
        c = _communicators.pop(k, None)
        if c is not None:
            c.close()
